package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/kubevirt/kubevirttest"
)

// TestKubeVirtBackupChangeTracking: on a cluster with VirtualMachineBackup,
// mkdir makes backups (full, then incremental from the last checkpoint);
// user.vmexport.changed.<full> on the incremental is its dirty extents, and
// the chain full disk.vhd + delta-from-<full>.vhd, opened with vhdimount,
// equals the incremental backup's disk. The delta fetches only the changes.
func TestKubeVirtBackupChangeTracking(t *testing.T) {
	requireTools(t, "getfattr", "vhdiinfo", "vhdimount", "fusermount3", "cp")
	f := newKVFixtureWith(t, kubevirttest.Options{BackupAPI: true})
	const size = 24 * mib
	f.addVM(t, "vm-b", kubevirttest.VolumeSpec{Name: "root", Size: size})
	f.write(t, "vm-b", "root", 0, 2*mib)
	f.write(t, "vm-b", "root", 10*mib, 4*mib)
	m := f.mount(t, "--list-ttl", "1ms")
	snaps := m.path("vms", "vm-b", "snapshots")
	tool(t, "mkdir", filepath.Join(snaps, "full"))
	f.write(t, "vm-b", "root", 1*mib, 512*kib)  // inside data: dirty
	f.write(t, "vm-b", "root", 20*mib, 1*mib)   // in a hole: dirty
	f.discard(t, "vm-b", "root", 12*mib, 1*mib) // zeroed: dirty,zero
	tool(t, "mkdir", filepath.Join(snaps, "incr"))
	assert.Equal(t, "full", f.sim.BackupPrevious("incr"))
	assert.ElementsMatch(t, []string{"full", "incr"}, strings.Fields(tool(t, "ls", snaps)))

	img := filepath.Join(snaps, "incr", "disk.img")
	text := tool(t, "getfattr", "--only-values", "-n", "user.vmexport.changed.full", img)
	changed, err := extent.Parse(text, size)
	require.NoError(t, err)
	want, err := extent.Normalize([]extent.Extent{{Off: 1 * mib, Len: 512 * kib}, {Off: 12 * mib, Len: 1 * mib}, {Off: 20 * mib, Len: 1 * mib}}, size)
	require.NoError(t, err)
	assert.Equal(t, want.Format(), changed.Format(), "changed map = the dirty extents")
	assert.Contains(t, tool(t, "getfattr", "-d", "-m", "user.vmexport", img), "user.vmexport.changed.full")

	chain := t.TempDir()
	tool(t, "cp", filepath.Join(snaps, "full", "disk.vhd"), filepath.Join(chain, "full.vhd"))
	fresh := f.mount(t) // cold, to count what the delta fetches
	before := f.sim.Stats().DiskBytes
	tool(t, "cp", fresh.path("vms", "vm-b", "snapshots", "incr", "delta-from-full.vhd"), filepath.Join(chain, "delta.vhd"))
	served := f.sim.Stats().DiskBytes - before
	assert.LessOrEqual(t, served, int64(1*mib+512*kib)*102/100, "the delta fetched only changed data")
	assert.Contains(t, tool(t, "vhdiinfo", filepath.Join(chain, "delta.vhd")), "Parent filename\t\t: full.vhd")
	applied := t.TempDir()
	tool(t, "vhdimount", filepath.Join(chain, "delta.vhd"), applied)
	defer toolErr("fusermount3", "-u", applied)
	assert.Equal(t, sha256File(t, f.sim.BackupFile("incr", "root")), sha256Range(t, filepath.Join(applied, "vhdi2"), 0, size),
		"full disk.vhd + delta = the incremental backup")

	// rmdir deletes the backup and its export.
	tool(t, "rmdir", filepath.Join(snaps, "incr"))
	assert.Equal(t, 404, f.object(t, "backup.kubevirt.io", "v1alpha1", "virtualmachinebackups", "incr"))
	assert.Eventually(t, func() bool { return !strings.Contains(tool(t, "ls", snaps), "incr") }, 5*time.Second, 50*time.Millisecond)
	_ = os.Remove
}
