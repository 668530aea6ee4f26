package coriolis

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
)

func TestAgainstSimulator(t *testing.T) {
	sim, err := coriolistest.Start(coriolistest.Options{Dir: t.TempDir(), Username: "op", Password: "pw-sim"})
	require.NoError(t, err)
	defer sim.Close()
	const size = 4 << 20
	require.NoError(t, sim.AddVM(coriolistest.VMSpec{ID: "vm-a", FriendlyName: "alpha", Disks: []coriolistest.DiskSpec{
		{Name: "a0.img", Size: size}, {Name: "cd.iso", Size: 1 << 20, CDROM: true}}}))
	first := make([]byte, 100_000)
	for i := range first {
		first[i] = byte(i*31 + 7)
	}
	require.NoError(t, sim.WriteDisk("vm-a", "a0.img", 1<<20, first))
	base, err := sim.TakeSnapshot("vm-a")
	require.NoError(t, err)
	second := []byte("changed bytes after the base snapshot")
	require.NoError(t, sim.WriteDisk("vm-a", "a0.img", 3<<20, second))

	ctx := context.Background()
	c, err := New(ctx, Config{URL: sim.URL(), Username: "op", Password: "pw-sim", RootCAs: sim.CAPool()})
	require.NoError(t, err)
	vms, err := c.VMs(ctx)
	require.NoError(t, err)
	require.Len(t, vms, 1)
	assert.Equal(t, []backend.DiskInfo{{ID: "a0.img", Device: "xvda"}}, vms[0].Disks)

	created, err := c.CreateSnapshot(ctx, "vm-a", "")
	require.NoError(t, err)
	snaps, err := c.Snapshots(ctx, "vm-a")
	require.NoError(t, err)
	require.Len(t, snaps, 2)
	assert.Equal(t, base, snaps[0].ID)
	assert.Equal(t, created.ID, snaps[1].ID)

	d, err := c.OpenDisk(ctx, backend.DiskRef{VM: "vm-a", Snapshot: created.ID, Disk: "a0.img"})
	require.NoError(t, err)
	assert.EqualValues(t, size, d.Size())
	assert.True(t, d.Allocated().Contains(1<<20, int64(len(first))))
	assert.True(t, d.Allocated().Contains(3<<20, int64(len(second))))
	assert.False(t, d.Allocated().Overlaps(2<<20, 4096))
	got := make([]byte, len(first))
	require.NoError(t, d.ReadAt(ctx, got, 1<<20))
	assert.Equal(t, first, got)

	delta, changed, err := c.OpenDelta(ctx, backend.DiskRef{VM: "vm-a", Snapshot: created.ID, Disk: "a0.img"}, backend.DiskRef{VM: "vm-a", Snapshot: base, Disk: "a0.img"})
	require.NoError(t, err)
	require.NoError(t, delta.Close())
	assert.True(t, changed.Contains(3<<20, int64(len(second))))
	assert.False(t, changed.Overlaps(1<<20, int64(len(first))))

	require.NoError(t, c.DeleteSnapshot(ctx, "vm-a", created.ID))
	snaps, err = c.Snapshots(ctx, "vm-a")
	require.NoError(t, err)
	assert.Len(t, snaps, 1)
}

// TestListingRequests: listing a VM's snapshots after the VM listing costs
// one request (the VM's snapshot order comes from the listing), and opening
// a disk of a listed snapshot costs a HEAD only (its chunks came with the
// listing) — what a walk of a large estate pays per snapshot.
func TestListingRequests(t *testing.T) {
	sim, err := coriolistest.Start(coriolistest.Options{Dir: t.TempDir(), Username: "op", Password: "pw-sim"})
	require.NoError(t, err)
	defer sim.Close()
	require.NoError(t, sim.AddVM(coriolistest.VMSpec{ID: "vm-a", Disks: []coriolistest.DiskSpec{{Name: "a0.img", Size: 4 << 20}}}))
	require.NoError(t, sim.WriteDisk("vm-a", "a0.img", 1<<20, []byte("data")))
	sid, err := sim.TakeSnapshot("vm-a")
	require.NoError(t, err)

	ctx := context.Background()
	c, err := New(ctx, Config{URL: sim.URL(), Username: "op", Password: "pw-sim", RootCAs: sim.CAPool()})
	require.NoError(t, err)
	_, err = c.VMs(ctx)
	require.NoError(t, err)
	sim.ResetStats()
	snaps, err := c.Snapshots(ctx, "vm-a")
	require.NoError(t, err)
	require.Len(t, snaps, 1)
	assert.Equal(t, int64(1), sim.Stats().APIRequests, "the snapshot list only")
	d, err := c.OpenDisk(ctx, backend.DiskRef{VM: "vm-a", Snapshot: sid, Disk: "a0.img"})
	require.NoError(t, err)
	st := sim.Stats()
	assert.Equal(t, int64(1), st.APIRequests, "no snapshot GET")
	assert.Equal(t, int64(1), st.DiskHeads)
	assert.True(t, d.Allocated().Contains(1<<20, 4), "the map from the listing's chunks")
	assert.False(t, d.Allocated().Overlaps(2<<20, 4096))
	got := make([]byte, 4)
	require.NoError(t, d.ReadAt(ctx, got, 1<<20))
	assert.Equal(t, "data", string(got))
}
