package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// memSource serves a reference slice and checks every request against the
// allocated map, so a fetch of hole bytes beyond what coalescing allows (a
// request that starts or ends in a hole, or, from a backend too fast to plan
// around, spans a hole longer than defaultGap) fails the test.
type memSource struct {
	t        testing.TB
	ref      []byte
	data     extent.Map
	holeByte byte // what the backend sends for hole bytes (a real one sends zeros)
	latency  time.Duration
	calls    atomic.Int64
	bytes    atomic.Int64
	maxOff   atomic.Int64 // highest end offset requested
	fail     atomic.Int64 // remaining calls to fail
	gate     chan struct{}
	atGate   chan struct{} // optional: a send (when there is room) per call held at gate
}

var errInjected = errors.New("injected backend failure")

func (m *memSource) ReadAt(ctx context.Context, p []byte, off int64) error {
	if m.gate != nil {
		select {
		case m.atGate <- struct{}{}:
		default:
		}
		select {
		case <-m.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if m.latency > 0 {
		select {
		case <-time.After(m.latency):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if !coalescedRange(m.data, off, int64(len(p))) {
		m.t.Errorf("fetch of hole bytes [%d, +%d)", off, len(p))
		return errors.New("hole fetched")
	}
	m.calls.Add(1)
	if m.fail.Add(-1) >= 0 {
		return errInjected
	}
	m.bytes.Add(int64(len(p)))
	for {
		cur := m.maxOff.Load()
		end := off + int64(len(p))
		if end <= cur || m.maxOff.CompareAndSwap(cur, end) {
			break
		}
	}
	copy(p, m.ref[off:])
	if m.holeByte != 0 {
		for i := range p {
			if !m.data.Contains(off+int64(i), 1) {
				p[i] = m.holeByte
			}
		}
	}
	return nil
}

// coalescedRange reports whether [off, off+n) is a range the cache may fetch:
// it starts and ends in data and no hole inside is longer than defaultGap.
func coalescedRange(m extent.Map, off, n int64) bool {
	if n <= 0 || !m.Contains(off, 1) || !m.Contains(off+n-1, 1) {
		return false
	}
	exts := m.Clip(off, n)
	for i := 1; i < len(exts); i++ {
		if exts[i].Off-exts[i-1].End() > defaultGap {
			return false
		}
	}
	return true
}

// randomDisk builds a disk with random, block-unaligned extents; hole bytes
// in ref are zero.
func randomDisk(t testing.TB, rng *rand.Rand, size int64, nExt int) *memSource {
	var raw []extent.Extent
	for range nExt {
		off := rng.Int64N(size)
		raw = append(raw, extent.Extent{Off: off, Len: min(rng.Int64N(size/4+1), size-off)})
	}
	m, err := extent.Normalize(raw, size)
	require.NoError(t, err)
	ref := make([]byte, size)
	for _, e := range m.Extents() {
		for i := e.Off; i < e.End(); i++ {
			ref[i] = byte(rng.Uint32()) | 1 // nonzero so a missed fetch shows
		}
	}
	return &memSource{t: t, ref: ref, data: m}
}

func TestRandomReadsMatchReference(t *testing.T) {
	tests := []struct {
		name      string
		size      int64
		blockSize int64
		capacity  int64
		nExt      int
	}{
		{"unaligned size, small blocks", 1<<20 + 12345, 4096, 64 << 10, 20},
		{"tiny cache forces eviction", 300001, 1024, 4096, 50},
		{"all data", 1 << 18, 8192, 1 << 20, 0},
		{"all hole", 1 << 18, 8192, 1 << 20, -1},
		{"many extents", 2<<20 + 7, 65536, 512 << 10, 200},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(tc.size), uint64(tc.nExt+2)))
			var src *memSource
			switch tc.nExt {
			case 0:
				src = randomDisk(t, rng, tc.size, 0)
				src.data = extent.Full(tc.size)
				for i := range src.ref {
					src.ref[i] = byte(i*7 + 1)
				}
			case -1:
				src = randomDisk(t, rng, tc.size, 0)
			default:
				src = randomDisk(t, rng, tc.size, tc.nExt)
			}
			c := New(Options{Capacity: tc.capacity, BlockSize: tc.blockSize, Parallel: 3})
			defer c.Close()
			r := c.Open("disk", tc.size, src.data, src)
			defer r.Close()
			ctx := context.Background()
			for range 500 {
				off := rng.Int64N(tc.size)
				n := rng.Int64N(min(tc.size-off, 3*tc.blockSize) + 1)
				p := make([]byte, n)
				for i := range p {
					p[i] = 0xAA // stale bytes must be overwritten
				}
				require.NoError(t, r.ReadAt(ctx, p, off))
				require.Equal(t, src.ref[off:off+n], p, "read [%d,+%d)", off, n)
				pinned, err := r.ReadPinned(ctx, off, n)
				require.NoError(t, err)
				got := bytes.Join(pinned.Bufs, nil)
				pinned.Release()
				require.Equal(t, src.ref[off:off+n], append([]byte{}, got...), "pinned read [%d,+%d)", off, n)
				assert.LessOrEqual(t, c.Stats().ResidentBytes, tc.capacity+3*tc.blockSize)
			}
			assert.Equal(t, make([]byte, tc.blockSize), c.zeros, "the zeros handed out for holes were written to")
			assert.Zero(t, c.Stats().Pinned, "pins left after every release")
			if tc.nExt == -1 {
				assert.Zero(t, src.calls.Load(), "an all-hole disk needs no fetch")
			}
		})
	}
}

func TestSequentialFetchesExactlyAllocated(t *testing.T) {
	for _, size := range []int64{5<<20 + 333, 8 << 20} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(size), 9))
			src := randomDisk(t, rng, size, 12)
			c := New(Options{BlockSize: 256 << 10, Capacity: 64 << 20, MaxReadahead: 4 << 20})
			defer c.Close()
			r := c.Open("d", size, src.data, src)
			defer r.Close()
			p := make([]byte, 128<<10)
			for off := int64(0); off < size; off += int64(len(p)) {
				n := min(int64(len(p)), size-off)
				require.NoError(t, r.ReadAt(context.Background(), p[:n], off))
				require.Equal(t, src.ref[off:off+n], p[:n])
			}
			// Exactly the data, plus the short holes each block's runs read
			// through.
			want := runBytes(src.data, size, 256<<10)
			assert.Equal(t, want, src.bytes.Load())
			assert.Equal(t, want, c.Stats().FetchedBytes)
			assert.LessOrEqual(t, want-src.data.Bytes(), int64(src.data.Len())*defaultGap)
		})
	}
}

func TestSingleflight(t *testing.T) {
	size := int64(1 << 20)
	src := &memSource{t: t, ref: make([]byte, size), data: extent.Full(size), gate: make(chan struct{})}
	c := New(Options{BlockSize: size})
	defer c.Close()
	r := c.Open("d", size, src.data, src)
	const n = 16
	waiting := make(chan struct{}, n)
	ctx := waitingCtx{context.Background(), waiting}
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = r.ReadAt(ctx, make([]byte, 4096), int64(i)*4096)
		}()
	}
	// The gate holds the fetch, so no reader can have been answered: all n
	// are waiting for a fetch when the gate opens.
	awaitN(t, waiting, n, "readers waiting for the block")
	close(src.gate)
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	assert.Equal(t, int64(1), src.calls.Load())
}

func TestCancelledWaiterDoesNotFailOthers(t *testing.T) {
	size := int64(64 << 10)
	src := &memSource{t: t, ref: make([]byte, size), data: extent.Full(size), gate: make(chan struct{}), atGate: make(chan struct{}, 1)}
	for i := range src.ref {
		src.ref[i] = byte(i)
	}
	c := New(Options{BlockSize: size})
	defer c.Close()
	r := c.Open("d", size, src.data, src)
	// The reader to be cancelled starts the fetch; the other joins it. Each
	// tells through its own channel, so neither is taken for the other.
	waitingFirst, waitingSecond := make(chan struct{}, 1), make(chan struct{}, 1)
	cctx, cancel := context.WithCancel(context.Background())
	cancelled := make(chan error, 1)
	go func() { cancelled <- r.ReadAt(waitingCtx{cctx, waitingFirst}, make([]byte, 10), 0) }()
	awaitN(t, waitingFirst, 1, "first reader waiting for its fetch")
	ok := make(chan error, 1)
	p := make([]byte, 100)
	go func() { ok <- r.ReadAt(waitingCtx{context.Background(), waitingSecond}, p, 5) }()
	awaitN(t, waitingSecond, 1, "second reader waiting for the same fetch")
	// The fetch is held at the gate when the cancel comes: a fetch bound to
	// the cancelled reader would end now, before the gate opens.
	awaitN(t, src.atGate, 1, "fetch held at the gate")
	cancel()
	require.ErrorIs(t, <-cancelled, context.Canceled)
	close(src.gate)
	require.NoError(t, <-ok)
	assert.Equal(t, src.ref[5:105], p)
	assert.Equal(t, int64(1), src.calls.Load())
}

func TestFetchErrorNotCached(t *testing.T) {
	size := int64(32 << 10) // block 1 is the last: no readahead muddies the count
	src := &memSource{t: t, ref: make([]byte, size), data: extent.Full(size)}
	src.fail.Store(1)
	c := New(Options{BlockSize: 16 << 10})
	defer c.Close()
	r := c.Open("d", size, src.data, src)
	err := r.ReadAt(context.Background(), make([]byte, 10), 20000)
	require.ErrorIs(t, err, errInjected)
	assert.Contains(t, err.Error(), "[16384, 32768)")
	require.NoError(t, r.ReadAt(context.Background(), make([]byte, 10), 20000))
	assert.Equal(t, int64(2), src.calls.Load())
}

func TestFetchTimeout(t *testing.T) {
	size := int64(4096)
	src := &memSource{t: t, ref: make([]byte, size), data: extent.Full(size), latency: time.Hour}
	c := New(Options{BlockSize: 4096, FetchTimeout: 50 * time.Millisecond})
	defer c.Close()
	r := c.Open("d", size, src.data, src)
	start := time.Now()
	err := r.ReadAt(context.Background(), make([]byte, 10), 0)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Less(t, time.Since(start), 5*time.Second)
}

func TestEvictionBoundUnderLoad(t *testing.T) {
	const bs, capacity, parallel = 4096, 16 * 4096, 4
	rng := rand.New(rand.NewPCG(1, 2))
	size := int64(1<<20 + 100)
	src := randomDisk(t, rng, size, 30)
	c := New(Options{BlockSize: bs, Capacity: capacity, Parallel: parallel, MaxReadahead: 8 * bs})
	defer c.Close()
	var stop atomic.Bool
	var maxRes atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for !stop.Load() {
			if r := c.Stats().ResidentBytes; r > maxRes.Load() {
				maxRes.Store(r)
			}
			time.Sleep(100 * time.Microsecond)
		}
	}()
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := c.Open(fmt.Sprint("d", g%2), size, src.data, src)
			defer r.Close()
			lr := rand.New(rand.NewPCG(uint64(g), 3))
			seq := int64(0)
			for range 400 {
				off := lr.Int64N(size)
				if g%2 == 0 { // sequential streams, wrapping
					off, seq = seq, (seq+8192)%(size-8192)
				}
				n := min(lr.Int64N(3*bs), size-off)
				p := make([]byte, n)
				if !assert.NoError(t, r.ReadAt(context.Background(), p, off)) {
					return
				}
				if !assert.Equal(t, src.ref[off:off+n], p) {
					return
				}
			}
		}()
	}
	wg.Wait()
	stop.Store(true)
	<-done
	assert.LessOrEqual(t, maxRes.Load(), int64(capacity+parallel*bs))
	assert.Positive(t, c.Stats().Evictions)
}

func TestReadaheadPrefetchesAndStopsOnClose(t *testing.T) {
	const bs = 64 << 10
	size := int64(64 * bs)
	src := &memSource{t: t, ref: make([]byte, size), data: extent.Full(size)}
	hold := &holdFrom{memSource: src, limit: 2 * bs, held: make(chan struct{}, 64)}
	// Parallel above the readahead window: held readahead never keeps a
	// read's own fetch from starting.
	c := New(Options{BlockSize: bs, MaxReadahead: 8 * bs, Capacity: 64 * bs, Parallel: 16})
	defer c.Close()
	r := c.Open("d", size, src.data, hold)
	ctx := context.Background()
	p := make([]byte, 16<<10)
	var off int64
	for ; off < 2*bs; off += int64(len(p)) {
		require.NoError(t, r.ReadAt(ctx, p, off))
	}
	awaitN(t, hold.held, 1, "readahead past the read position")
	r.Close()
	// No read runs any more, so no fetch can start: wait for those started.
	c.wg.Wait()
	assert.Zero(t, hold.served.Load(), "readahead in flight at Close ran on")
	assert.LessOrEqual(t, src.maxOff.Load(), hold.limit, "nothing past the reads was fetched")
	require.ErrorIs(t, r.ReadAt(ctx, p, off), ErrClosed)

	// Random reads do not trigger readahead.
	src2 := &memSource{t: t, ref: make([]byte, size), data: extent.Full(size)}
	r2 := c.Open("d2", size, src2.data, src2)
	defer r2.Close()
	for _, o := range []int64{40 * bs, 3 * bs, 50 * bs, 10 * bs, 30 * bs} {
		require.NoError(t, r2.ReadAt(ctx, p, o))
	}
	c.wg.Wait() // a readahead the reads started would have ended by now
	assert.Equal(t, int64(5), src2.calls.Load())
}

// holdFrom serves reads below limit and holds those from limit on until
// their context ends, as a slow backend keeps readahead in flight. A held
// read still held after 10 s is served and counted: a fetch that Close did
// not stop.
type holdFrom struct {
	*memSource
	limit  int64
	held   chan struct{} // a send (when there is room) per held read
	served atomic.Int64
}

func (h *holdFrom) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off < h.limit {
		return h.memSource.ReadAt(ctx, p, off)
	}
	select {
	case h.held <- struct{}{}:
	default:
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(10 * time.Second):
		h.served.Add(1)
		return h.memSource.ReadAt(ctx, p, off)
	}
}

// waitingCtx tells when a read starts waiting for a block fetch: the read
// selects on its context's Done then, so a test knows each reader it
// started is waiting on the fetch, not merely running. A send is dropped
// when waiting is full.
type waitingCtx struct {
	context.Context
	waiting chan<- struct{}
}

func (c waitingCtx) Done() <-chan struct{} {
	select {
	case c.waiting <- struct{}{}:
	default:
	}
	return c.Context.Done()
}

// awaitN receives n values from ch, failing the test when they do not come
// within 10 s.
func awaitN(t *testing.T, ch <-chan struct{}, n int, what string) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for i := range n {
		select {
		case <-ch:
		case <-timeout:
			t.Fatalf("%s: %d of %d after 10s", what, i, n)
		}
	}
}

func TestClosedCache(t *testing.T) {
	c := New(Options{})
	size := int64(4096)
	src := &memSource{t: t, ref: make([]byte, size), data: extent.Full(size)}
	r := c.Open("d", size, src.data, src)
	c.Close()
	require.ErrorIs(t, r.ReadAt(context.Background(), make([]byte, 1), 0), ErrClosed)
	r2 := c.Open("e", size, src.data, src)
	require.ErrorIs(t, r2.ReadAt(context.Background(), make([]byte, 1), 0), ErrClosed)
}

func TestBadRange(t *testing.T) {
	c := New(Options{})
	defer c.Close()
	r := c.Open("d", 100, extent.Full(100), &memSource{t: t, ref: make([]byte, 100), data: extent.Full(100)})
	for _, tc := range []struct{ off, n int64 }{{-1, 1}, {99, 2}, {101, 0}} {
		require.Error(t, r.ReadAt(context.Background(), make([]byte, tc.n), tc.off))
	}
}

// runBytes is what fetching every block of a disk reads: the blocks' runs.
func runBytes(m extent.Map, size, bs int64) int64 {
	var n int64
	for lo := int64(0); lo < size; lo += bs {
		for _, r := range m.Runs(lo, min(bs, size-lo), defaultGap) {
			n += r.Len
		}
	}
	return n
}

// TestCoalescedFetches: a block's extents separated by holes of at most
// defaultGap are one request, the holes read as zeros whatever the backend
// sent for them, and extents further apart are fetched apart.
func TestCoalescedFetches(t *testing.T) {
	const bs = 1 << 20
	every := func(n int, length, stride, from int64) []extent.Extent {
		var out []extent.Extent
		for i := range int64(n) {
			out = append(out, extent.Extent{Off: from + i*stride, Len: length})
		}
		return out
	}
	tests := []struct {
		name    string
		size    int64
		raw     []extent.Extent
		fetches int64
		fetched int64
	}{
		{"4096 extents of 16 bytes 256 apart", bs, every(4096, 16, 256, 0), 1, 4095*256 + 16},
		{"hole of exactly defaultGap", bs, []extent.Extent{{Off: 0, Len: 100}, {Off: 100 + defaultGap, Len: 100}}, 1, 200 + defaultGap},
		{"hole one byte longer", bs, []extent.Extent{{Off: 0, Len: 100}, {Off: 101 + defaultGap, Len: 100}}, 2, 200},
		{"far apart: fetched as they are", bs, every(4, 64<<10, 256<<10, 0), 4, 4 * 64 << 10},
		{"a run is cut at the block end", 2 * bs, every(2, 4096, 8192, bs-4096), 2, 2 * 4096},
		{"bench layout: 8 MiB every 32 MiB", 64 << 20, every(2, 8<<20, 32<<20, 0), 16, 16 << 20},
		{"mixed: two runs and a lone extent", bs, append(every(100, 16, 256, 0), append(every(100, 16, 256, 512<<10), extent.Extent{Off: bs - 16, Len: 16})...), 3, 2*(99*256+16) + 16},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := extent.Normalize(tt.raw, tt.size)
			require.NoError(t, err)
			ref := make([]byte, tt.size)
			for _, e := range m.Extents() {
				for i := e.Off; i < e.End(); i++ {
					ref[i] = byte(i%251) | 1
				}
			}
			src := &memSource{t: t, ref: ref, data: m, holeByte: 0xEE}
			c := New(Options{BlockSize: bs, Capacity: 64 << 20, MaxReadahead: bs})
			defer c.Close()
			r := c.Open("d", tt.size, m, src)
			defer r.Close()
			got := make([]byte, tt.size)
			for off := int64(0); off < tt.size; off += bs {
				require.NoError(t, r.ReadAt(context.Background(), got[off:off+bs], off))
			}
			require.Equal(t, ref, got, "holes read as zeros, data as data")
			assert.Equal(t, tt.fetches, c.Stats().Fetches, "requests")
			assert.Equal(t, tt.fetches, src.calls.Load(), "requests the backend saw")
			assert.Equal(t, tt.fetched, c.Stats().FetchedBytes, "bytes requested")
			assert.Equal(t, tt.fetched, src.bytes.Load(), "bytes the backend sent")
		})
	}
}

// TestTally: every byte read is counted once, as a hole, as data found in
// the cache or as data that waited for a fetch; reading again finds it all
// in the cache.
func TestTally(t *testing.T) {
	const bs = 64 << 10
	size := int64(10*bs + 1000)
	data, err := extent.Normalize([]extent.Extent{{Off: 100, Len: bs}, {Off: 4*bs + 7, Len: 3 * bs}, {Off: size - 500, Len: 500}}, size)
	require.NoError(t, err)
	ref := make([]byte, size)
	for _, e := range data.Extents() {
		for i := e.Off; i < e.End(); i++ {
			ref[i] = byte(i%251 + 1)
		}
	}
	src := &memSource{t: t, ref: ref, data: data}
	c := New(Options{BlockSize: bs, Capacity: 64 * bs})
	defer c.Close()
	var tally Tally
	r := c.OpenCounted("d", size, data, src, &tally)
	defer r.Close()
	read := func() {
		got := make([]byte, size)
		for off := int64(0); off < size; off += 10_000 {
			require.NoError(t, r.ReadAt(context.Background(), got[off:min(off+10_000, size)], off))
		}
		require.Equal(t, ref, got)
	}
	read()
	holes := size - data.Bytes()
	assert.Equal(t, holes, tally.HoleBytes.Load())
	assert.Equal(t, data.Bytes(), tally.HitBytes.Load()+tally.MissBytes.Load())
	assert.Positive(t, tally.MissBytes.Load(), "the first reading fetched")
	assert.Equal(t, (size+9_999)/10_000, tally.Reads.Load())
	hits, misses := tally.HitBytes.Load(), tally.MissBytes.Load()
	read()
	assert.Equal(t, 2*holes, tally.HoleBytes.Load())
	assert.Equal(t, misses, tally.MissBytes.Load(), "nothing waited the second time")
	assert.Equal(t, hits+data.Bytes(), tally.HitBytes.Load())
}

// TestReadaheadAcrossHoles: a reader that seeks over holes, as cp --sparse
// does, stays a sequential stream, and readahead counts only the blocks
// with data: by the time the reader is done with one extent, the next
// one's first block is on its way, however long the hole between them. So a
// 1 TiB disk costs what a 2 GiB one with the same data costs.
func TestReadaheadAcrossHoles(t *testing.T) {
	const bs, extentLen, extents = 1 << 20, 4 << 20, 6
	for _, hole := range []int64{4 << 20, 60 << 20, 16 << 30} {
		t.Run(fmt.Sprintf("hole %d MiB", hole>>20), func(t *testing.T) {
			stride := extentLen + hole
			var raw []extent.Extent
			for i := range int64(extents) {
				raw = append(raw, extent.Extent{Off: i * stride, Len: extentLen})
			}
			size := extents * stride
			m, err := extent.Normalize(raw, size)
			require.NoError(t, err)
			c := New(Options{BlockSize: bs, Capacity: 64 << 20})
			defer c.Close()
			src := newPattern()
			r := c.Open("d", size, m, src)
			defer r.Close()
			p := make([]byte, 128<<10)
			for i, e := range raw {
				for off := e.Off; off < e.End(); off += int64(len(p)) {
					require.NoError(t, r.ReadAt(context.Background(), p, off))
					for j := range p {
						if o := off + int64(j); p[j] != src.pattern[o%int64(len(src.pattern))] {
							require.Failf(t, "wrong byte", "at %d", o)
						}
					}
				}
				if i+1 < len(raw) {
					next := blockKey{r.file, raw[i+1].Off / bs}
					c.mu.Lock()
					ahead := c.blocks[next] != nil
					c.mu.Unlock()
					assert.True(t, ahead, "extent %d read: the next extent's first block is not being read ahead", i)
				}
			}
		})
	}
}

// TestReadaheadSharedByStreams: many sequential readers share half the
// capacity for readahead, so none of it is evicted before it is read and
// fetched again: every block is fetched once. (Each stream growing its own
// 32 MiB window fetched 1.4 times what 64 dd readers read.)
func TestReadaheadSharedByStreams(t *testing.T) {
	const bs, perReader, readers = 1 << 20, 32 << 20, 16
	c := New(Options{BlockSize: bs, Capacity: 64 << 20})
	defer c.Close()
	src := newPattern()
	var rs []*Reader
	for i := range readers {
		r := c.Open(fmt.Sprintf("d%d", i), perReader, extent.Full(perReader), src)
		defer r.Close()
		rs = append(rs, r)
	}
	p := make([]byte, bs)
	for off := int64(0); off < perReader; off += bs {
		for _, r := range rs {
			require.NoError(t, r.ReadAt(context.Background(), p, off))
			require.Equal(t, src.pattern[off%int64(len(src.pattern))], p[0])
		}
	}
	for _, r := range rs {
		r.Close()
	}
	c.wg.Wait()
	assert.Equal(t, int64(readers*perReader), c.Stats().FetchedBytes, "bytes fetched for %d MiB read", readers*perReader>>20)
	assert.Zero(t, c.streams.Load(), "streams left counted after Close")
}

// TestDataBlocksAfter: the n-th block with data after a block, from the
// runs of blocks, is what counting blocks one by one in the map gives.
func TestDataBlocksAfter(t *testing.T) {
	const bs = 64 << 10
	rng := rand.New(rand.NewPCG(3, 4))
	for round := range 50 {
		size := int64(1+rng.IntN(400)) * bs / 3
		var raw []extent.Extent
		for off := int64(rng.IntN(4 * bs)); off < size; off += int64(1 + rng.IntN(3*bs)) {
			n := int64(1 + rng.IntN(bs))
			raw = append(raw, extent.Extent{Off: off, Len: min(n, size-off)})
			off += n
		}
		m, err := extent.Normalize(raw, size)
		require.NoError(t, err)
		c := New(Options{BlockSize: bs, Capacity: 64 * bs})
		r := c.Open("d", size, m, newPattern())
		last := (size - 1) / bs
		for cur := int64(-1); cur <= last; cur++ {
			for _, n := range []int64{1, 2, 5, 40} {
				want, seen := last, int64(0)
				for b := cur + 1; b <= last; b++ {
					if m.Overlaps(b*bs, min(bs, size-b*bs)) {
						if seen++; seen == n {
							want = b
							break
						}
					}
				}
				require.Equal(t, want, r.dataBlocksAfter(cur, n, last), "round %d: block %d, n %d", round, cur, n)
			}
		}
		r.Close()
		c.Close()
	}
}
