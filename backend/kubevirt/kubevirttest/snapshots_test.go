package kubevirttest

import (
	"bytes"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestDirectHelpers: a snapshot taken with TakeSnapshot is the objects mkdir
// makes (snapshot, owned secret and export, Ready after ReadyDelay), its data
// is frozen, Snapshots lists oldest first even within one second, and a
// discard reads as zeros.
func TestDirectHelpers(t *testing.T) {
	var last time.Time
	sim, err := Start(Options{Dir: t.TempDir(), ReadyDelay: 50 * time.Millisecond, Clock: func() time.Time {
		last = last.Add(time.Second)
		return last
	}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sim.Close() })
	require.NoError(t, sim.AddVM("vm", []VolumeSpec{{Name: "root", Size: 1 << 20}}))
	data := bytes.Repeat([]byte{7}, 4096)
	require.NoError(t, sim.WriteDisk("vm", "root", 8192, data))

	require.NoError(t, sim.TakeSnapshot("vm", "zz"))
	require.NoError(t, sim.DiscardDisk("vm", "root", 8192, 1024))
	require.NoError(t, sim.TakeSnapshot("vm", "aa"))
	assert.Error(t, sim.TakeSnapshot("vm", "aa"), "a used name")
	assert.Error(t, sim.TakeSnapshot("no-vm", "bb"))
	assert.Error(t, sim.DiscardDisk("vm", "root", 1<<20-10, 20), "past the end")

	names, err := sim.Snapshots("vm")
	require.NoError(t, err)
	assert.Equal(t, []string{"zz", "aa"}, names, "oldest first, not by name")

	raw, err := sim.ExportStatus("zz")
	require.NoError(t, err)
	assert.Contains(t, string(raw), `"phase":"Pending"`, "not Ready before ReadyDelay")
	time.Sleep(60 * time.Millisecond)
	raw, err = sim.ExportStatus("zz")
	require.NoError(t, err)
	assert.Contains(t, string(raw), `"phase":"Ready"`)
	assert.Contains(t, string(raw), `"tokenSecretRef":"zz-export-token"`)
	_, err = sim.ExportToken("zz")
	require.NoError(t, err)

	for name, want := range map[string][]byte{"zz": data, "aa": append(make([]byte, 1024), data[1024:]...)} {
		path, err := sim.SnapshotData(name, "root")
		require.NoError(t, err)
		got, err := os.ReadFile(path)
		require.NoError(t, err)
		assert.Equal(t, want, got[8192:8192+4096], name)
	}
	_, err = sim.SnapshotData("zz", "nope")
	assert.Error(t, err)

	// Deleting the snapshot deletes what it owns, as the garbage collector does.
	sim.mu.Lock()
	require.NoError(t, sim.delete("virtualmachinesnapshots", "zz"))
	_, export := sim.exports["zz"]
	_, secret := sim.secrets["zz-export-token"]
	sim.mu.Unlock()
	assert.False(t, export)
	assert.False(t, secret)
}
