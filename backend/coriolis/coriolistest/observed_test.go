package coriolistest

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The behaviours observed on the real server (specs/coriolis.md) that the
// other tests do not cover.

// TestObservedCoWSplitKeepsPhysical: a copy-on-write write inside an extent
// splits it in the unsquashed map; the untouched pieces keep their physical
// location (reflink sharing with the older snapshot), only the written range
// gets a new one. compareTo still reports the whole extent.
func TestObservedCoWSplitKeepsPhysical(t *testing.T) {
	h := newHarness(t)
	m := setupDisk(t, h, 8*Granularity)
	h.write(m, 0, pattern(1, 4*Granularity))
	s1, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	h.write(m, 2*Granularity, pattern(2, Granularity))
	s2, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	old := h.snapshot("vm1", s1, "squashChunks=false").Disks[0].Chunks
	cur := h.snapshot("vm1", s2, "squashChunks=false").Disks[0].Chunks
	require.Len(t, old, 1)
	require.Len(t, cur, 3)
	g := uint64(Granularity)
	p := old[0].PhysicalStart
	assert.Equal(t, Chunk{Start: 0, Length: 2 * g, PhysicalStart: p}, cur[0])
	assert.Equal(t, uint64(2*g), cur[1].Start)
	assert.Equal(t, g, cur[1].Length)
	assert.NotEqual(t, p+2*g, cur[1].PhysicalStart, "the written range moved")
	assert.Equal(t, Chunk{Start: 3 * g, Length: g, PhysicalStart: p + 3*g}, cur[2])
	coarse := h.snapshot("vm1", s2, "compareTo="+s1).Disks[0].Chunks
	require.Len(t, coarse, 1)
	assert.Equal(t, uint64(4*g), coarse[0].Length, "compareTo reports the split extent whole")
	r := h.get("/api/v1/vms/vm1/snapshots/" + s1 + "?compareTo=" + s1)
	assert.Equal(t, 400, r.status, "compareTo itself")
}

// TestObservedTypedISORefused: a VM whose ISO is typed as not a virtual disk
// cannot be snapshotted: 400 "VM does not support reflink cloning", and no
// snapshot is left behind.
func TestObservedTypedISORefused(t *testing.T) {
	h := newHarness(t)
	require.NoError(t, h.srv.AddVM(VMSpec{ID: "vm1", Disks: []DiskSpec{{Name: "root.img", Size: 1 << 20},
		{Name: "boot.iso", Size: 4096, CDROM: true, ISOTyped: true}}}))
	r := h.do("POST", "/api/v1/vms/vm1/snapshots", h.token, nil, nil)
	require.Equal(t, 400, r.status)
	assert.Equal(t, apiError{Error: "Bad Request", Details: "VM does not support reflink cloning"}, decodeAPIError(t, r.body))
	ids, err := h.srv.Snapshots("vm1")
	require.NoError(t, err)
	assert.Empty(t, ids)
	_, err = h.srv.TakeSnapshot("vm1")
	assert.ErrorIs(t, err, errInvalid)
}
