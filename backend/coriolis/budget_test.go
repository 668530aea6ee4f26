package coriolis

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
)

// smallFloor makes chunkFloor n for one test, so that answers past it are
// small enough to build.
func smallFloor(t *testing.T, n int64) {
	old := chunkFloor
	chunkFloor = n
	t.Cleanup(func() { chunkFloor = old })
}

// endless is an answer that never ends: head, then body repeated forever
// (each repetition numbered by %d when it has one).
type endless struct {
	head, body string
	buf        []byte
	i          int
}

func (e *endless) Read(p []byte) (int, error) {
	for len(e.buf) < len(p) {
		if e.head != "" {
			e.buf, e.head = append(e.buf, e.head...), ""
			continue
		}
		if strings.Contains(e.body, "%d") {
			e.buf = fmt.Appendf(e.buf, e.body, e.i*8192)
		} else {
			e.buf = append(e.buf, e.body...)
		}
		e.i++
	}
	n := copy(p, e.buf)
	e.buf = e.buf[n:]
	return n, nil
}

// hostileExporter logs in like the exporter and answers the one route under
// test with an endless body, every other one as a VM with one 1 MiB disk
// and one snapshot would.
type hostileExporter struct {
	t      *testing.T
	secret []byte
	route  string // path under /api/v1 whose GET is answered with answer()
	answer func() io.Reader
	served atomic.Int64 // bytes of the hostile answers written
}

func (h *hostileExporter) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p := strings.TrimSuffix(r.URL.Path, "/")
	if p == "/api/v1/auth/login" {
		tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{
			"exp": time.Now().Add(time.Hour).Unix(), "iss": "gopherbin", "user": testUser}).SignedString(h.secret)
		require.NoError(h.t, err)
		fmt.Fprintf(w, `{"token":%q}`, tok)
		return
	}
	if p == "/api/v1/"+h.route && r.Method == http.MethodGet {
		n, _ := io.Copy(w, h.answer())
		h.served.Add(n)
		return
	}
	vm := `{"name":"vm1","snapshots":["s1"],"disks":[{"name":"disk0.img","device_name":"xvda","mode":"w"}]}`
	switch p {
	case "/api/v1/vms":
		fmt.Fprint(w, "["+vm+"]")
	case "/api/v1/vms/vm1":
		fmt.Fprint(w, vm)
	case "/api/v1/vms/vm1/snapshots":
		fmt.Fprint(w, `[{"id":"s1","vm_id":"vm1","disks":[{"name":"disk0.img","chunks":[]}]}]`)
	case "/api/v1/vms/vm1/snapshots/s1":
		fmt.Fprint(w, `{"id":"s1","vm_id":"vm1","disks":[{"name":"disk0.img","chunks":[]}]}`)
	case "/api/v1/vms/vm1/snapshots/s1/disks/disk0.img":
		w.Header().Set("Content-Length", "1048576")
	default:
		http.Error(w, `{"error":"Not found"}`, http.StatusNotFound)
	}
}

// TestEndlessAnswersCutOff: an exporter whose answer never ends, or is far
// larger than what it describes can take, is cut off with an error that
// says so (EIO), after reading about what the answer's budget allows, and
// with memory bounded by that budget, not by what the server sends.
func TestEndlessAnswersCutOff(t *testing.T) {
	smallFloor(t, 10_000)
	chunk := `{"start":%d,"length":4096,"physical_start":1},`
	for _, tc := range []struct {
		name, route string
		answer      endless
		call        func(context.Context, *Client) error
		want        string
		maxRead     int64 // bytes the client may read before cutting off
	}{
		{"snapshot of endless chunks", "vms/vm1/snapshots/s1",
			endless{head: `{"id":"s1","disks":[{"name":"disk0.img","chunks":[`, body: chunk},
			func(ctx context.Context, c *Client) error {
				_, err := c.OpenDisk(ctx, backend.DiskRef{VM: "vm1", Snapshot: "s1", Disk: "disk0.img"})
				return err
			},
			// A 1 MiB disk holds 256 blocks; the floor is 10,000 chunks.
			"more than the 10256 chunks its disks can hold (1 disk, 1048576 bytes", 1<<20 + 10_256*chunkJSONMax + 1<<20},
		{"listing of endless chunks", "vms/vm1/snapshots",
			endless{head: `[{"id":"s1","disks":[{"path":"/r/CoriolisSnapshots/s1/disk0.img","chunks":[`, body: chunk},
			func(ctx context.Context, c *Client) error { _, err := c.Snapshots(ctx, "vm1"); return err },
			"more than the 10256 chunks its disks can hold (1 disk, 1048576 bytes", 1<<20 + 10_256*chunkJSONMax + 1<<20},
		{"snapshot of endless whitespace", "vms/vm1/snapshots/s1",
			endless{head: `{"id":"s1",`, body: strings.Repeat(" ", 4096)},
			func(ctx context.Context, c *Client) error {
				_, err := c.OpenDisk(ctx, backend.DiskRef{VM: "vm1", Snapshot: "s1", Disk: "disk0.img"})
				return err
			},
			"answer cut off after", 2<<20 + 1<<20},
		{"snapshot with an endless id", "vms/vm1/snapshots/s1",
			endless{head: `{"id":"`, body: strings.Repeat("a", 4096)},
			func(ctx context.Context, c *Client) error {
				_, err := c.OpenDisk(ctx, backend.DiskRef{VM: "vm1", Snapshot: "s1", Disk: "disk0.img"})
				return err
			},
			"answer cut off after", 2<<20 + 1<<20},
		{"listing of endless empty snapshots", "vms/vm1/snapshots",
			endless{head: `[`, body: `{"id":"x","disks":[]},`},
			func(ctx context.Context, c *Client) error { _, err := c.Snapshots(ctx, "vm1"); return err },
			"answer cut off after", 2<<20 + 1<<20},
		{"VM listing with an endless unknown field", "vms",
			endless{head: `[{"name":"vm1","x":[`, body: `1,`},
			func(ctx context.Context, c *Client) error { _, err := c.VMs(ctx); return err },
			"answer cut off after", 1<<20 + vmMeta + 1<<20},
		{"VM of endless disks", "vms/vm1",
			endless{head: `{"name":"vm1","disks":[`, body: `{"name":"d"},`},
			func(ctx context.Context, c *Client) error { _, err := c.Snapshots(ctx, "vm1"); return err },
			"answer cut off after", 1<<20 + 1<<20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &hostileExporter{t: t, secret: []byte("k"), route: tc.route}
			h.answer = func() io.Reader { a := tc.answer; return &a }
			srv := httptest.NewTLSServer(h)
			defer srv.Close()
			pool := srv.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs
			c, err := New(context.Background(), Config{URL: srv.URL, Username: testUser, Password: testPass, RootCAs: pool,
				Policy: httprange.Policy{Attempts: 1, AttemptTimeout: 20 * time.Second}})
			require.NoError(t, err)
			defer c.Close()
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			start := time.Now()
			err = tc.call(context.Background(), c)
			runtime.ReadMemStats(&after)
			require.Error(t, err)
			assert.ErrorIs(t, err, backend.ErrUnavailable)
			assert.Contains(t, err.Error(), tc.want)
			t.Logf("%.2f s: %v", time.Since(start).Seconds(), err)
			c.Close()
			srv.CloseClientConnections()
			// The server writes ahead of what the client reads by what the
			// socket buffers hold.
			served := h.served.Load()
			assert.Less(t, served, tc.maxRead+8<<20, "bytes served before the client stopped reading")
			grown := int64(after.HeapInuse) - int64(before.HeapInuse)
			assert.Less(t, grown, int64(64<<20), "heap grown while reading the answer")
		})
	}
}

// TestListingPastFloorSized: a listing past the chunk floor is read once the
// disks the VM names are sized (a HEAD each, kept for the mount: the disks'
// openings need no other), and cut off when it carries more chunks than
// those disks have 4 KiB blocks.
func TestListingPastFloorSized(t *testing.T) {
	smallFloor(t, 1000)
	const size = 4 << 20 // 1,024 blocks
	sim, c, _ := observedSim(t, coriolistest.VMSpec{ID: "vm", Disks: []coriolistest.DiskSpec{{Name: "root.img", Size: size}}})
	var sids []string
	for range 3 {
		sid, err := sim.TakeSnapshot("vm")
		require.NoError(t, err)
		sids = append(sids, sid)
	}
	chunks := func(n int) []coriolistest.Chunk {
		out := make([]coriolistest.Chunk, n)
		for i := range out {
			out[i] = coriolistest.Chunk{Start: uint64(i) * 4096, Length: 4096, PhysicalStart: uint64(i) * 4096}
		}
		return out
	}
	for _, sid := range sids {
		require.NoError(t, sim.OverrideChunks("vm", sid, "root.img", chunks(900)))
	}
	ctx := context.Background()
	_, err := c.VMs(ctx)
	require.NoError(t, err)
	sim.ResetStats()
	snaps, err := c.Snapshots(ctx, "vm")
	require.NoError(t, err, "2,700 chunks: past the floor, within the 3 × 1,024 blocks + 1,000")
	require.Len(t, snaps, 3)
	assert.Equal(t, int64(3), sim.Stats().DiskHeads, "each disk sized once")
	for _, sid := range sids {
		d, err := c.OpenDisk(ctx, backend.DiskRef{VM: "vm", Snapshot: sid, Disk: "root.img"})
		require.NoError(t, err)
		assert.True(t, d.Allocated().Contains(0, 900*4096), "the listing's chunks")
		d.Close()
	}
	st := sim.Stats()
	assert.Equal(t, int64(3), st.DiskHeads, "opening the disks costs no other HEAD")
	assert.Equal(t, int64(0), st.SnapshotGets, "nor a GET: the listing kept the chunks")

	// 3 × 1,500 chunks cannot be the FIEMAP extents of three 4 MiB disks
	// (1,024 blocks each) plus the floor.
	for _, sid := range sids {
		require.NoError(t, sim.OverrideChunks("vm", sid, "root.img", chunks(1500)))
	}
	_, err = c.Snapshots(ctx, "vm")
	require.ErrorIs(t, err, backend.ErrUnavailable)
	assert.Contains(t, err.Error(), "answer cut off at chunk 4073: more than the 4072 chunks its disks can hold (3 disks, 12582912 bytes in all")
	assert.Equal(t, c.keep.free.Load(), int64(listKeep), "what the cut-off listing kept went back to the pool")
}

// TestKeepPool: a listing keeps its chunk lists while the pool has room,
// drops the rest (their disks take a GET), and what the opened disks and
// the dropped answers held goes back to the pool.
func TestKeepPool(t *testing.T) {
	sim, c, _ := observedSim(t, coriolistest.VMSpec{ID: "vm", Disks: []coriolistest.DiskSpec{{Name: "root.img", Size: 64 << 20}}})
	var sids []string
	for range 3 {
		sid, err := sim.TakeSnapshot("vm")
		require.NoError(t, err)
		chunks := make([]coriolistest.Chunk, 6000)
		for i := range chunks {
			chunks[i] = coriolistest.Chunk{Start: uint64(i) * 8192, Length: 4096, PhysicalStart: uint64(i) * 4096}
		}
		require.NoError(t, sim.OverrideChunks("vm", sid, "root.img", chunks))
		sids = append(sids, sid)
	}
	c.keep = newKeepPool(10_000) // one list of 6,000, not two
	ctx := context.Background()
	_, err := c.VMs(ctx)
	require.NoError(t, err)
	sim.ResetStats()
	_, err = c.Snapshots(ctx, "vm")
	require.NoError(t, err)
	assert.Less(t, c.keep.free.Load(), int64(10_000-6000+1), "one list kept")
	var wg sync.WaitGroup
	for _, sid := range sids {
		for range 2 { // opened twice at once: one GET, one HEAD
			wg.Go(func() {
				d, err := c.OpenDisk(ctx, backend.DiskRef{VM: "vm", Snapshot: sid, Disk: "root.img"})
				if assert.NoError(t, err) {
					assert.Equal(t, 6000, d.Allocated().Len())
					d.Close()
				}
			})
		}
	}
	wg.Wait()
	st := sim.Stats()
	assert.Equal(t, int64(2), st.SnapshotGets, "the two snapshots whose lists were dropped")
	assert.Equal(t, int64(3), st.DiskHeads)
	assert.Equal(t, int64(10_000), c.keep.free.Load(), "an opened disk's list goes back to the pool")
}

// TestVMStreamedLikeEncodingJSON: a VM decoded with its snapshot ids one at
// a time reads as encoding/json reads it, duplicate keys and nulls included.
func TestVMStreamedLikeEncodingJSON(t *testing.T) {
	for _, s := range []string{
		`{"name":"a","snapshots":["x","y"],"Snapshots":[null,"z","w"]}`,
		`{"name":"a","snapshots":["x","y"],"snapshots":[]}`,
		`{"name":"a","snapshots":null}`,
		`{"name":"a","snapshots":["x",null]}`,
		`{"name":"a","disks":[{"name":"d","mode":"w"}],"disks":[{"name":"e"}]}`,
		`{"NAME":"a","name":null,"friendly_name":"f","uuid":"u","other":{"snapshots":[1]}}`,
		`null`,
	} {
		var want, got apiVM
		require.NoError(t, json.Unmarshal([]byte(s), &want), s)
		require.NoError(t, decodeJSON(strings.NewReader(s), &got), s)
		assert.Equal(t, want, got, s)
	}
	for _, s := range []string{`{"snapshots":[1]}`, `{"snapshots":[["x"]]}`, `{"snapshots":"x"}`, `{"name":1}`, `[]`} {
		var v apiVM
		assert.Error(t, json.Unmarshal([]byte(s), &v), s)
		assert.Error(t, decodeJSON(strings.NewReader(s), &v), s)
	}
}

// TestReopenCostsNothing: a disk opened once opens again (the filesystem
// closes idle disks) without a request, its size and map kept for the
// mount, and a listing refreshed after keeps none of its chunks.
func TestReopenCostsNothing(t *testing.T) {
	sim, c, _ := observedSim(t, coriolistest.VMSpec{ID: "vm", Disks: []coriolistest.DiskSpec{{Name: "root.img", Size: 8 << 20}}})
	require.NoError(t, sim.WriteDisk("vm", "root.img", 1<<20, []byte("data")))
	sid, err := sim.TakeSnapshot("vm")
	require.NoError(t, err)
	ctx := context.Background()
	_, err = c.VMs(ctx)
	require.NoError(t, err)
	_, err = c.Snapshots(ctx, "vm")
	require.NoError(t, err)
	ref := backend.DiskRef{VM: "vm", Snapshot: sid, Disk: "root.img"}
	d, err := c.OpenDisk(ctx, ref)
	require.NoError(t, err)
	want := d.Allocated()
	d.Close()
	sim.ResetStats()
	for range 3 {
		d, err := c.OpenDisk(ctx, ref)
		require.NoError(t, err)
		assert.Equal(t, want, d.Allocated())
		assert.Equal(t, int64(8<<20), d.Size())
		d.Close()
	}
	st := sim.Stats()
	assert.Zero(t, st.APIRequests+st.DiskRequests, "reopening asks nothing")

	free := c.keep.free.Load()
	_, err = c.Snapshots(ctx, "vm")
	require.NoError(t, err)
	assert.Equal(t, free, c.keep.free.Load(), "the refreshed listing keeps nothing of an opened snapshot")

	require.NoError(t, c.DeleteSnapshot(ctx, "vm", sid))
	_, err = c.OpenDisk(ctx, ref)
	assert.ErrorIs(t, err, backend.ErrNotFound, "a deleted snapshot's map is forgotten")
}
