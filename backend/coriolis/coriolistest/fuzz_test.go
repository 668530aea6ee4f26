package coriolistest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
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
	})
}

// FuzzDiskModel applies a random sequence of writes and discards, then checks
// that a snapshot holds exactly the written bytes, that its chunks cover all
// data, and that compareTo covers every byte changed since the previous one.
func FuzzDiskModel(f *testing.F) {
	f.Add([]byte{0, 1, 0, 0, 16, 0, 1, 0, 8, 0, 0, 4, 0, 2})
	f.Add([]byte{1, 255, 255, 255, 255, 0, 2, 0, 0, 0, 0, 0, 0})
	srv, err := Start(Options{Dir: f.TempDir()})
	require.NoError(f, err)
	f.Cleanup(func() { _ = srv.Close() })
	const size = 5*Granularity + 333
	n := 0
	f.Fuzz(func(t *testing.T, script []byte) {
		n++
		vmID := fmt.Sprintf("vm%d", n)
		require.NoError(t, srv.AddVM(VMSpec{ID: vmID, Disks: []DiskSpec{{Name: "d", Size: size}}}))
		defer func() { require.NoError(t, srv.deleteSnapshots(vmID, "")) }()
		data := make([]byte, size)
		var prevID string
		var prev []byte
		for len(script) >= 6 {
			op := script[0]
			off := int64(binary.LittleEndian.Uint32(script[1:5])) % size
			ln := int64(script[5]) * 997 % (size - off + 1)
			script = script[6:]
			switch op % 3 {
			case 0:
				b := pattern(op, int(ln))
				require.NoError(t, srv.WriteDisk(vmID, "d", off, b))
				copy(data[off:], b)
			case 1:
				require.NoError(t, srv.DiscardDisk(vmID, "d", off, ln))
				clear(data[off : off+ln])
			case 2:
				id, err := srv.TakeSnapshot(vmID)
				require.NoError(t, err)
				checkSnapshot(t, srv, vmID, id, prevID, data, prev)
				prevID, prev = id, append([]byte(nil), data...)
			}
		}
		id, err := srv.TakeSnapshot(vmID)
		require.NoError(t, err)
		checkSnapshot(t, srv, vmID, id, prevID, data, prev)
	})
}

func checkSnapshot(t *testing.T, srv *Server, vmID, id, prevID string, data, prev []byte) {
	t.Helper()
	p, err := srv.SnapshotData(vmID, id, "d")
	require.NoError(t, err)
	got, err := os.ReadFile(p)
	require.NoError(t, err)
	require.True(t, bytes.Equal(data, got), "snapshot bytes differ")
	for _, squash := range []bool{true, false} {
		s, err := srv.renderSnapshot(vmID, id, "", squash)
		require.NoError(t, err)
		requireChunksCover(t, s.Disks[0].Chunks, data)
	}
	if prevID == "" {
		return
	}
	s, err := srv.renderSnapshot(vmID, id, prevID, true)
	require.NoError(t, err)
	changed := make([]byte, len(data))
	for i := range data {
		if data[i] != prev[i] && data[i] != 0 {
			changed[i] = 1
		}
	}
	requireChunksCover(t, s.Disks[0].Chunks, changed)
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
