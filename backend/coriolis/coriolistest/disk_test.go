package coriolistest

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"os"
	"strconv"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const testDiskSize = 1<<20 + 12345 // not a multiple of the granularity

// model mirrors what the live disk must contain, byte for byte.
type model struct{ data []byte }

func (m *model) write(off int64, b []byte) { copy(m.data[off:], b) }
func (m *model) discard(off, n int64)      { clear(m.data[off : off+n]) }

func setupDisk(t *testing.T, h *harness, size int64) *model {
	t.Helper()
	require.NoError(t, h.srv.AddVM(VMSpec{ID: "vm1", Disks: []DiskSpec{{Name: "d.img", Size: size}}}))
	return &model{data: make([]byte, size)}
}

func (h *harness) write(m *model, off int64, b []byte) {
	h.t.Helper()
	require.NoError(h.t, h.srv.WriteDisk("vm1", "d.img", off, b))
	m.write(off, b)
}

func (h *harness) discard(m *model, off, n int64) {
	h.t.Helper()
	require.NoError(h.t, h.srv.DiscardDisk("vm1", "d.img", off, n))
	m.discard(off, n)
}

// requireChunksCover checks that every non-zero byte lies in some chunk and
// that chunks are sorted, non-overlapping and inside the disk.
func requireChunksCover(t *testing.T, chunks []Chunk, data []byte) {
	t.Helper()
	covered := make([]bool, len(data))
	var prevEnd uint64
	for i, c := range chunks {
		require.Positive(t, c.Length)
		if i > 0 {
			require.GreaterOrEqual(t, c.Start, prevEnd, "chunks sorted and disjoint")
		}
		// Whole filesystem blocks: the last one may run past the end.
		require.LessOrEqual(t, c.Start+c.Length, uint64((len(data)+fsBlock-1)/fsBlock*fsBlock))
		for j := c.Start; j < min(c.Start+c.Length, uint64(len(data))); j++ {
			covered[j] = true
		}
		prevEnd = c.Start + c.Length
	}
	for i, b := range data {
		if b != 0 && !covered[i] {
			require.Failf(t, "uncovered data", "byte %d is %#x but outside every chunk", i, b)
		}
	}
}

func TestDiskRanges(t *testing.T) {
	h := newHarness(t)
	m := setupDisk(t, h, testDiskSize)
	h.write(m, 100, pattern(1, 5000))
	h.write(m, testDiskSize-777, pattern(2, 777))
	sid, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	p := diskPath("vm1", sid, "d.img")
	size := int64(testDiskSize)

	tests := []struct {
		name         string
		rng          string
		status       int
		off, n       int64
		contentRange string
	}{
		{"whole", "", 200, 0, size, ""},
		{"first bytes", "bytes=0-99", 206, 0, 100, fmt.Sprintf("bytes 0-99/%d", size)},
		{"in data", "bytes=150-4999", 206, 150, 4850, fmt.Sprintf("bytes 150-4999/%d", size)},
		{"in hole", "bytes=200000-200009", 206, 200000, 10, fmt.Sprintf("bytes 200000-200009/%d", size)},
		{"open end", fmt.Sprintf("bytes=%d-", size-1000), 206, size - 1000, 1000, fmt.Sprintf("bytes %d-%d/%d", size-1000, size-1, size)},
		{"suffix", "bytes=-500", 206, size - 500, 500, fmt.Sprintf("bytes %d-%d/%d", size-500, size-1, size)},
		{"past end clipped", fmt.Sprintf("bytes=%d-%d", size-10, size+100), 206, size - 10, 10, fmt.Sprintf("bytes %d-%d/%d", size-10, size-1, size)},
		{"unsatisfiable", fmt.Sprintf("bytes=%d-", size), 416, 0, 0, fmt.Sprintf("bytes */%d", size)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			hdr := map[string]string{}
			if tc.rng != "" {
				hdr["Range"] = tc.rng
			}
			r := h.do("GET", p, h.token, nil, hdr)
			require.Equal(t, tc.status, r.status)
			assert.Equal(t, tc.contentRange, r.header.Get("Content-Range"))
			assert.Empty(t, r.header.Get("Last-Modified"))
			if tc.status == 416 {
				return
			}
			assert.Equal(t, "bytes", r.header.Get("Accept-Ranges"))
			require.Equal(t, strconv.FormatInt(tc.n, 10), r.header.Get("Content-Length"))
			require.True(t, bytes.Equal(m.data[tc.off:tc.off+tc.n], r.body), "body differs")
		})
	}

	t.Run("HEAD", func(t *testing.T) {
		before := h.srv.Stats()
		r := h.do("HEAD", p, h.token, nil, nil)
		require.Equal(t, 200, r.status)
		assert.Equal(t, strconv.FormatInt(size, 10), r.header.Get("Content-Length"))
		assert.Equal(t, "bytes", r.header.Get("Accept-Ranges"))
		assert.Empty(t, r.header.Get("Last-Modified"))
		assert.Empty(t, r.body)
		assert.Equal(t, before.DiskBytes, h.srv.Stats().DiskBytes)
		assert.Equal(t, before.DiskRequests+1, h.srv.Stats().DiskRequests)
	})

	t.Run("multipart", func(t *testing.T) {
		ranges := [][2]int64{{0, 199}, {4000, 5199}, {size - 50, size - 1}}
		r := h.do("GET", p, h.token, nil, map[string]string{"Range": "bytes=0-199,4000-5199,-50"})
		require.Equal(t, 206, r.status)
		mt, params, err := mime.ParseMediaType(r.header.Get("Content-Type"))
		require.NoError(t, err)
		require.Equal(t, "multipart/byteranges", mt)
		mr := multipart.NewReader(bytes.NewReader(r.body), params["boundary"])
		for i, want := range ranges {
			part, err := mr.NextPart()
			require.NoError(t, err, "part %d", i)
			assert.Equal(t, fmt.Sprintf("bytes %d-%d/%d", want[0], want[1], size), part.Header.Get("Content-Range"))
			got, err := io.ReadAll(part)
			require.NoError(t, err)
			require.True(t, bytes.Equal(m.data[want[0]:want[1]+1], got), "part %d differs", i)
		}
		_, err = mr.NextPart()
		assert.ErrorIs(t, err, io.EOF)
	})
}

func TestChunks(t *testing.T) {
	g := int64(Granularity)
	type op struct {
		discard bool
		off, n  int64
	}
	tests := []struct {
		name       string
		ops        []op
		squashed   []Chunk // Start/Length only; PhysicalStart is checked for monotony
		unsquashed int     // number of unsquashed chunks
	}{
		{"empty disk", nil, []Chunk{}, 0},
		{"one byte", []op{{off: 5, n: 1}}, []Chunk{{Start: 0, Length: uint64(g)}}, 1},
		{"straddles granules", []op{{off: g - 1, n: 2}}, []Chunk{{Start: 0, Length: uint64(2 * g)}}, 1},
		{"two separate writes adjacent", []op{{off: 0, n: g}, {off: g, n: g}}, []Chunk{{Start: 0, Length: uint64(2 * g)}}, 1},
		{"written out of order", []op{{off: g, n: g}, {off: 0, n: g}}, []Chunk{{Start: 0, Length: uint64(2 * g)}}, 2},
		{"gap", []op{{off: 0, n: 10}, {off: 3 * g, n: 10}}, []Chunk{{Start: 0, Length: uint64(g)}, {Start: uint64(3 * g), Length: uint64(g)}}, 2},
		// FIEMAP answers whole 4 KiB blocks: the last chunk ends past EOF.
		{"tail granule ends on a block past EOF", []op{{off: testDiskSize - 1, n: 1}}, []Chunk{{Start: uint64(testDiskSize / g * g), Length: uint64((testDiskSize%g + fsBlock - 1) / fsBlock * fsBlock)}}, 1},
		{"full discard removes", []op{{off: 0, n: 3 * g}, {discard: true, off: g, n: g}}, []Chunk{{Start: 0, Length: uint64(g)}, {Start: uint64(2 * g), Length: uint64(g)}}, 2},
		{"partial discard keeps granules", []op{{off: 0, n: 2 * g}, {discard: true, off: 10, n: g}}, []Chunk{{Start: 0, Length: uint64(2 * g)}}, 1},
		{"partial discard splits physically", []op{{off: 0, n: 3 * g}, {discard: true, off: g + 10, n: 10}}, []Chunk{{Start: 0, Length: uint64(3 * g)}}, 3},
		{"discard of hole", []op{{discard: true, off: 0, n: testDiskSize}}, []Chunk{}, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			m := setupDisk(t, h, testDiskSize)
			for i, o := range tc.ops {
				if o.discard {
					h.discard(m, o.off, o.n)
				} else {
					h.write(m, o.off, pattern(byte(i+1), int(o.n)))
				}
			}
			sid, err := h.srv.TakeSnapshot("vm1")
			require.NoError(t, err)

			sq := h.snapshot("vm1", sid, "").Disks[0].Chunks
			require.Len(t, sq, len(tc.squashed))
			for i := range sq {
				assert.Equal(t, tc.squashed[i].Start, sq[i].Start)
				assert.Equal(t, tc.squashed[i].Length, sq[i].Length)
			}
			assert.Equal(t, sq, h.snapshot("vm1", sid, "squashChunks=true").Disks[0].Chunks)
			requireChunksCover(t, sq, m.data)

			un := h.snapshot("vm1", sid, "squashChunks=false").Disks[0].Chunks
			require.Len(t, un, tc.unsquashed)
			requireChunksCover(t, un, m.data)
			var total uint64
			for _, c := range un {
				total += c.Length
			}
			var sqTotal uint64
			for _, c := range sq {
				sqTotal += c.Length
			}
			assert.Equal(t, sqTotal, total, "same bytes either way")

			r := h.get(diskPath("vm1", sid, "d.img"))
			require.Equal(t, 200, r.status)
			require.True(t, bytes.Equal(m.data, r.body), "snapshot bytes differ from written data")
		})
	}
}

func TestCompareTo(t *testing.T) {
	g := int64(Granularity)
	tests := []struct {
		name string
		// oneExtent writes the base as one physically contiguous extent;
		// otherwise each granule is its own extent (written out of order so
		// that no two neighbours are physically contiguous, before or after).
		oneExtent bool
		change    func(h *harness, m *model)
		want      []Chunk // Start/Length of the squashed answer
	}{
		{"no change", false, func(*harness, *model) {}, []Chunk{}},
		{"overwrite one granule", false, func(h *harness, m *model) { h.write(m, g+5, []byte{9}) }, []Chunk{{Start: uint64(g), Length: uint64(g)}}},
		{"same bytes rewritten still moves", false, func(h *harness, m *model) { h.write(m, 0, m.data[:10]) }, []Chunk{{Start: 0, Length: uint64(g)}}},
		{"overwrite across granules", false, func(h *harness, m *model) { h.write(m, g, pattern(3, int(2*g))) }, []Chunk{{Start: uint64(g), Length: uint64(2 * g)}}},
		{"write into hole", false, func(h *harness, m *model) { h.write(m, 10*g, []byte{1, 2}) }, []Chunk{{Start: uint64(10 * g), Length: uint64(g)}}},
		{"full discard is not a chunk", false, func(h *harness, m *model) { h.discard(m, 2*g, g) }, []Chunk{}},
		{"partial discard rewrites", false, func(h *harness, m *model) { h.discard(m, 2*g, 100) }, []Chunk{{Start: uint64(2 * g), Length: uint64(g)}}},
		{"two runs", false, func(h *harness, m *model) {
			h.write(m, 0, []byte{1})
			h.write(m, 3*g, pattern(4, int(g)))
		}, []Chunk{{Start: 0, Length: uint64(g)}, {Start: uint64(3 * g), Length: uint64(g)}}},
		// Splitting an extent moves only the rewritten piece, but the real
		// compareTo matches whole extents (start, length, physical start):
		// none of the pieces matches the base's extent, so all of it is
		// reported (the unsquashed maps' physical starts tell the truth).
		{"overwrite splits an extent: reported whole", true, func(h *harness, m *model) { h.write(m, g+5, []byte{9}) }, []Chunk{{Start: 0, Length: uint64(4 * g)}}},
		{"untouched extent is skipped", true, func(h *harness, m *model) { h.write(m, 6*g, []byte{9}) }, []Chunk{{Start: uint64(6 * g), Length: uint64(g)}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			m := setupDisk(t, h, testDiskSize)
			if tc.oneExtent {
				h.write(m, 0, pattern(1, int(4*g)))
			} else {
				for _, i := range []int64{0, 2, 1, 3} {
					h.write(m, i*g, pattern(byte(i+1), int(g)))
				}
			}
			s1, err := h.srv.TakeSnapshot("vm1")
			require.NoError(t, err)
			base := append([]byte(nil), m.data...)
			tc.change(h, m)
			s2, err := h.srv.TakeSnapshot("vm1")
			require.NoError(t, err)

			got := h.snapshot("vm1", s2, "compareTo="+s1).Disks[0].Chunks
			require.Len(t, got, len(tc.want), "%+v", got)
			for i := range got {
				assert.Equal(t, tc.want[i].Start, got[i].Start)
				assert.Equal(t, tc.want[i].Length, got[i].Length)
			}
			// Every byte that differs from the base snapshot and is non-zero
			// must be inside a compareTo chunk, or an incremental copy would
			// keep stale data.
			changed := make([]byte, len(m.data))
			for i := range m.data {
				if m.data[i] != base[i] && m.data[i] != 0 {
					changed[i] = 1
				}
			}
			requireChunksCover(t, got, changed)
			unsquashed := h.snapshot("vm1", s2, "squashChunks=false&compareTo="+s1).Disks[0].Chunks
			requireChunksCover(t, unsquashed, changed)
			assert.Equal(t, squashChunks(unsquashed), got)
		})
	}
}

func TestCompareToNoChangeUnsquashedIsNull(t *testing.T) {
	h := newHarness(t)
	m := setupDisk(t, h, testDiskSize)
	h.write(m, 0, []byte{1})
	s1, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	s2, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	r := h.get("/api/v1/vms/vm1/snapshots/" + s2 + "?squashChunks=false&compareTo=" + s1)
	require.Equal(t, 200, r.status)
	assert.Contains(t, string(r.body), `"chunks":null`, "the real server encodes an empty diff as null")
	r = h.get("/api/v1/vms/vm1/snapshots/" + s2 + "?compareTo=" + s1)
	assert.Contains(t, string(r.body), `"chunks":[]`)
}

func TestSnapshotImmutable(t *testing.T) {
	h := newHarness(t)
	m := setupDisk(t, h, testDiskSize)
	h.write(m, 0, pattern(1, 200000))
	sid, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	want := append([]byte(nil), m.data...)
	chunks := h.snapshot("vm1", sid, "squashChunks=false").Disks[0].Chunks

	h.write(m, 1000, pattern(2, 300000))
	h.discard(m, 0, Granularity)
	h.write(m, testDiskSize-10, pattern(3, 10))
	_, err = h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)

	r := h.get(diskPath("vm1", sid, "d.img"))
	require.Equal(t, 200, r.status)
	assert.True(t, bytes.Equal(want, r.body), "snapshot changed after live writes")
	p, err := h.srv.SnapshotData("vm1", sid, "d.img")
	require.NoError(t, err)
	onDisk, err := os.ReadFile(p)
	require.NoError(t, err)
	assert.Equal(t, sha256.Sum256(want), sha256.Sum256(onDisk))
	assert.Equal(t, chunks, h.snapshot("vm1", sid, "squashChunks=false").Disks[0].Chunks)
}

func TestHugeSparseDisk(t *testing.T) {
	h := newHarness(t)
	const size = 100 << 30
	require.NoError(t, h.srv.AddVM(VMSpec{ID: "big", Disks: []DiskSpec{{Name: "d", Size: size}}}))
	data := pattern(7, 4096)
	require.NoError(t, h.srv.WriteDisk("big", "d", size-4096, data))
	require.NoError(t, h.srv.WriteDisk("big", "d", 50<<30, data))
	require.Error(t, h.srv.WriteDisk("big", "d", size-1, data), "past the end")
	require.Error(t, h.srv.WriteDisk("big", "d", -1, data))
	require.Error(t, h.srv.DiscardDisk("big", "d", 0, size+1))
	require.Error(t, h.srv.WriteDisk("nope", "d", 0, data))
	require.Error(t, h.srv.WriteDisk("big", "nope", 0, data))
	sid, err := h.srv.TakeSnapshot("big")
	require.NoError(t, err)

	snap := h.snapshot("big", sid, "")
	require.Len(t, snap.Disks[0].Chunks, 2)
	assert.Equal(t, uint64(50<<30), snap.Disks[0].Chunks[0].Start)
	assert.Equal(t, uint64(size-Granularity), snap.Disks[0].Chunks[1].Start)

	r := h.do("GET", diskPath("big", sid, "d"), h.token, nil, map[string]string{"Range": fmt.Sprintf("bytes=%d-", size-4096)})
	require.Equal(t, 206, r.status)
	assert.Equal(t, data, r.body)
	r = h.do("HEAD", diskPath("big", sid, "d"), h.token, nil, nil)
	assert.Equal(t, strconv.FormatInt(size, 10), r.header.Get("Content-Length"))

	p, err := h.srv.SnapshotData("big", sid, "d")
	require.NoError(t, err)
	st, err := os.Stat(p)
	require.NoError(t, err)
	assert.Equal(t, int64(size), st.Size())
}

func TestStats(t *testing.T) {
	h := newHarness(t)
	m := setupDisk(t, h, testDiskSize)
	h.write(m, 0, pattern(1, 1000))
	sid, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	h.srv.ResetStats()
	assert.Equal(t, Stats{}, h.srv.Stats())

	p := diskPath("vm1", sid, "d.img")
	h.do("GET", p, h.token, nil, map[string]string{"Range": "bytes=0-99"})
	h.do("GET", p, h.token, nil, map[string]string{"Range": "bytes=1000-1499"})
	h.do("HEAD", p, h.token, nil, nil)
	h.do("GET", p, h.token, nil, map[string]string{"Range": fmt.Sprintf("bytes=%d-", testDiskSize)}) // 416
	h.get("/api/v1/vms")
	h.get("/api/v1/vms/vm1/snapshots/" + sid)
	h.get("/api/v1/nothing") // unrouted: not counted
	h.login("admin", "secret")
	st := h.srv.Stats()
	assert.Equal(t, int64(4), st.DiskRequests)
	assert.Equal(t, int64(2), st.APIRequests)
	assert.Equal(t, int64(1), st.Logins)
	// The 416 body is ServeContent's short text; count it exactly via a
	// second, isolated request.
	h.srv.ResetStats()
	r := h.do("GET", p, h.token, nil, map[string]string{"Range": fmt.Sprintf("bytes=%d-", testDiskSize)})
	assert.Equal(t, int64(len(r.body)), h.srv.Stats().DiskBytes)
	diff416 := st.DiskBytes - int64(len(r.body))
	assert.Equal(t, int64(600), diff416, "100 + 500 range bytes")

	h.srv.ResetStats()
	r = h.get(p)
	assert.Equal(t, int64(len(r.body)), h.srv.Stats().DiskBytes)
	assert.Equal(t, int64(testDiskSize), h.srv.Stats().DiskBytes)
}

func TestParallelRangeReads(t *testing.T) {
	h := newHarness(t)
	m := setupDisk(t, h, testDiskSize)
	h.write(m, 0, pattern(5, testDiskSize))
	sid, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	p := diskPath("vm1", sid, "d.img")
	h.srv.ResetStats()

	const workers, per = 8, 8
	const span = 10000
	var wg sync.WaitGroup
	errs := make(chan error, workers*per)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range per {
				off := int64((w*per+i)*span) % (testDiskSize - span)
				r, err := h.tryDo("GET", p, h.token, nil, map[string]string{"Range": fmt.Sprintf("bytes=%d-%d", off, off+span-1)})
				if err != nil {
					errs <- err
					continue
				}
				if r.status != 206 || !bytes.Equal(m.data[off:off+span], r.body) {
					errs <- fmt.Errorf("range at %d: status %d, %d bytes", off, r.status, len(r.body))
				}
			}
		}()
	}
	// Writers on the live disk must not disturb snapshot readers.
	for i := range 20 {
		require.NoError(t, h.srv.WriteDisk("vm1", "d.img", int64(i)*span, pattern(99, span)))
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	assert.Equal(t, int64(workers*per*span), h.srv.Stats().DiskBytes)
	assert.Equal(t, int64(workers*per), h.srv.Stats().DiskRequests)
}
