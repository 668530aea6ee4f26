package coriolistest

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/coriolis"
)

func TestParseRoute(t *testing.T) {
	tests := []struct {
		path string
		want route
	}{
		{"/api/v1/auth/login", route{kind: routeLogin}},
		{"/api/v1/auth/login/", route{kind: routeLogin}},
		{"/api/v1/auth/login//", route{}},
		{"/api/v1/vms", route{kind: routeVMs}},
		{"/api/v1/vms/a", route{kind: routeVM, vmID: "a"}},
		{"/api/v1/vms/a/snapshots/", route{kind: routeSnapshots, vmID: "a"}},
		{"/api/v1/vms/a/snapshots/s", route{kind: routeSnapshot, vmID: "a", snapID: "s"}},
		{"/api/v1/vms/a/snapshots/s/disks/d/", route{kind: routeDisk, vmID: "a", snapID: "s", diskID: "d"}},
		{"/api/v1/vms/a/snapshots/s/disks/", route{}},
		{"/api/v1/vms//snapshots", route{}},
		{"/api/v1/other", route{}},
		{"", route{}},
	}
	for _, tc := range tests {
		t.Run(tc.path, func(t *testing.T) {
			assert.Equal(t, tc.want, parseRoute(tc.path))
		})
	}
}

func FuzzParseRoute(f *testing.F) {
	for _, s := range []string{"/api/v1/vms/a/snapshots/s/disks/d", "/api/v1/auth/login/", "/api/v1//", "/", "/api/v1/vms/x/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		rt := parseRoute(p)
		if rt.kind == routeUnknown {
			return
		}
		// A routed path never yields ids that could escape Dir or be empty.
		for _, id := range []string{rt.vmID, rt.snapID, rt.diskID} {
			if id != "" && strings.Contains(id, "/") {
				t.Fatalf("id %q from %q contains a slash", id, p)
			}
		}
		if rt.kind >= routeVM && rt.vmID == "" {
			t.Fatalf("route %v from %q has no vm id", rt.kind, p)
		}
		// Routed are exactly the route's own path and that path with one
		// trailing slash, as the server registers them.
		canon := routePath(rt)
		require.Equal(t, rt, parseRoute(canon), "route %+v rendered %q", rt, canon)
		require.Contains(t, []string{canon, canon + "/"}, p, "route %+v", rt)
	})
}

// routePath is the path of a route, without a trailing slash.
func routePath(rt route) string {
	vm := "/api/v1/vms/" + rt.vmID
	switch rt.kind {
	case routeLogin:
		return "/api/v1/auth/login"
	case routeVMs:
		return "/api/v1/vms"
	case routeVM:
		return vm
	case routeSnapshots:
		return vm + "/snapshots"
	case routeSnapshot:
		return vm + "/snapshots/" + rt.snapID
	case routeDisk:
		return vm + "/snapshots/" + rt.snapID + "/disks/" + rt.diskID
	}
	return ""
}

// FuzzDiskModel applies a random sequence of writes and discards, then checks
// that a snapshot holds exactly the written bytes, that its chunks cover all
// data, that compareTo covers every byte rewritten since the previous
// snapshot, and that the changed set the README promises (what the Coriolis
// client's OpenDelta gives, user.vmexport.changed.<base>) counts rewritten
// and discarded bytes both, and nothing outside the granules they touched.
func FuzzDiskModel(f *testing.F) {
	f.Add([]byte{0, 1, 0, 0, 16, 0, 1, 0, 8, 0, 0, 4, 0, 2})
	f.Add([]byte{1, 255, 255, 255, 255, 0, 2, 0, 0, 0, 0, 0, 0})
	// Write, snapshot, discard part of it, write elsewhere, snapshot: the
	// change is the discarded and the newly written bytes.
	f.Add([]byte{0, 0, 0, 1, 0, 200, 2, 0, 0, 0, 0, 0, 1, 0, 16, 1, 0, 40, 0, 0, 0, 0, 0, 10, 2, 0, 0, 0, 0, 0})
	// The same with a whole granule discarded: the snapshot no longer has it.
	f.Add([]byte{0, 0, 0, 1, 0, 200, 2, 0, 0, 0, 0, 0, 4, 0, 16, 2, 0, 66, 2, 0, 0, 0, 0, 0})
	srv, err := Start(Options{Dir: f.TempDir()})
	require.NoError(f, err)
	f.Cleanup(func() { _ = srv.Close() })
	cl, err := coriolis.New(context.Background(), coriolis.Config{URL: srv.URL(), Username: "admin", Password: "secret", RootCAs: srv.CAPool()})
	require.NoError(f, err)
	const size = 5*Granularity + 333
	n := 0
	f.Fuzz(func(t *testing.T, script []byte) {
		n++
		vmID := fmt.Sprintf("vm%d", n)
		require.NoError(t, srv.AddVM(VMSpec{ID: vmID, Disks: []DiskSpec{{Name: "d", Size: size}}}))
		defer func() { require.NoError(t, srv.deleteSnapshots(vmID, "")) }()
		cur := newDiskModel(size)
		var prevID string
		var prev diskModel
		for len(script) >= 6 {
			op := script[0]
			off := int64(binary.LittleEndian.Uint32(script[1:5])) % size
			if op%3 == 1 && op&4 != 0 {
				// A granule-aligned discard, so that whole granules are
				// discarded often, not only by chance.
				off -= off % Granularity
			}
			ln := int64(script[5]) * 997 % (size - off + 1)
			script = script[6:]
			switch op % 3 {
			case 0:
				b := pattern(op, int(ln))
				require.NoError(t, srv.WriteDisk(vmID, "d", off, b))
				cur.write(off, b)
			case 1:
				require.NoError(t, srv.DiscardDisk(vmID, "d", off, ln))
				cur.discard(off, ln)
			case 2:
				id, err := srv.TakeSnapshot(vmID)
				require.NoError(t, err)
				checkSnapshot(t, srv, cl, vmID, id, prevID, cur, prev)
				prevID, prev = id, cur.snapshot()
			}
		}
		id, err := srv.TakeSnapshot(vmID)
		require.NoError(t, err)
		checkSnapshot(t, srv, cl, vmID, id, prevID, cur, prev)
	})
}

// diskModel is what a script did to a disk, byte by byte: its bytes, which
// of them hold written data (written and not discarded since), and which
// were written or discarded since the last snapshot.
type diskModel struct {
	data    []byte
	alloc   []bool
	touched []bool
}

func newDiskModel(size int64) diskModel {
	return diskModel{data: make([]byte, size), alloc: make([]bool, size), touched: make([]bool, size)}
}

func (m diskModel) write(off int64, b []byte) {
	copy(m.data[off:], b)
	for i := off; i < off+int64(len(b)); i++ {
		m.alloc[i], m.touched[i] = true, true
	}
}

func (m diskModel) discard(off, n int64) {
	clear(m.data[off : off+n])
	for i := off; i < off+n; i++ {
		m.alloc[i], m.touched[i] = false, true
	}
}

// snapshot returns a copy of m as a snapshot keeps it, and starts a new
// count of touched bytes in m.
func (m diskModel) snapshot() diskModel {
	out := diskModel{data: bytes.Clone(m.data), alloc: slices.Clone(m.alloc)}
	clear(m.touched)
	return out
}

func checkSnapshot(t *testing.T, srv *Server, cl *coriolis.Client, vmID, id, prevID string, cur, prev diskModel) {
	t.Helper()
	p, err := srv.SnapshotData(vmID, id, "d")
	require.NoError(t, err)
	got, err := os.ReadFile(p)
	require.NoError(t, err)
	require.True(t, bytes.Equal(cur.data, got), "snapshot bytes differ")
	for _, squash := range []bool{true, false} {
		s, err := srv.renderSnapshot(vmID, id, "", squash)
		require.NoError(t, err)
		requireChunksCover(t, s.Disks[0].Chunks, cur.data)
	}
	if prevID == "" {
		return
	}
	size := int64(len(cur.data))
	// compareTo, like the real server, reports what holds data now and was
	// rewritten since the base; never a discarded range.
	s, err := srv.renderSnapshot(vmID, id, prevID, true)
	require.NoError(t, err)
	rewritten := make([]byte, size)
	for i := range rewritten {
		if cur.touched[i] && cur.alloc[i] {
			rewritten[i] = 1
		}
	}
	requireChunksCover(t, s.Disks[0].Chunks, rewritten)

	ctx := context.Background()
	d, changed, err := cl.OpenDelta(ctx, backend.DiskRef{VM: vmID, Snapshot: id, Disk: "d"}, backend.DiskRef{VM: vmID, Snapshot: prevID, Disk: "d"})
	require.NoError(t, err)
	require.NoError(t, d.Close())
	in := make([]bool, size)
	for _, e := range changed.Extents() {
		require.True(t, e.Off >= 0 && e.Len > 0 && e.End() <= size, "changed extent %+v of a %d-byte disk", e, size)
		for i := e.Off; i < e.End(); i++ {
			in[i] = true
		}
	}
	// Complete: every byte that reads differently, every byte rewritten,
	// and every byte discarded that held data in the base.
	for i := range in {
		must := cur.data[i] != prev.data[i] || cur.touched[i] && (cur.alloc[i] || prev.alloc[i])
		if must && !in[i] {
			require.Failf(t, "changed set misses a change", "byte %d (was %#x, is %#x, written now %v, in the base %v) not in %v",
				i, prev.data[i], cur.data[i], cur.alloc[i], prev.alloc[i], changed.Extents())
		}
	}
	// Minimal: changed ⊆ (written ∪ discarded since the base), rounded out
	// to the granule the simulator allocates in.
	for g := int64(0); g*Granularity < size; g++ {
		lo, hi := g*Granularity, min((g+1)*Granularity, size)
		if !slices.Contains(in[lo:hi], true) || slices.Contains(cur.touched[lo:hi], true) {
			continue
		}
		require.Failf(t, "changed set holds an untouched granule", "granule [%d, %d) neither written nor discarded since the base, in %v", lo, hi, changed.Extents())
	}
}

func TestLiveDiskStaysSparse(t *testing.T) {
	h := newHarness(t)
	const size = 1 << 30
	require.NoError(t, h.srv.AddVM(VMSpec{ID: "vm", Disks: []DiskSpec{{Name: "d", Size: size}}}))
	require.NoError(t, h.srv.WriteDisk("vm", "d", 512<<20, pattern(1, 8<<20)))
	require.NoError(t, h.srv.DiscardDisk("vm", "d", 512<<20, 8<<20))
	require.NoError(t, h.srv.WriteDisk("vm", "d", 0, pattern(2, 4096)))
	sid, err := h.srv.TakeSnapshot("vm")
	require.NoError(t, err)
	p, err := h.srv.SnapshotData("vm", sid, "d")
	require.NoError(t, err)
	var st syscall.Stat_t
	require.NoError(t, syscall.Stat(p, &st))
	assert.Less(t, st.Blocks*512, int64(1<<20), "snapshot copies only data extents")
	live := h.srv.findVM("vm").disks[0].livePath
	require.NoError(t, syscall.Stat(live, &st))
	assert.Less(t, st.Blocks*512, int64(1<<20), "discard punched the live file")
}
