package cache

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// Sequential-stream tolerance: the kernel's async readahead arrives slightly
// out of order.
const (
	seqBackTolerance    = 256 << 10
	seqForwardTolerance = 1 << 20
)

// Reader reads one disk through the cache; safe for concurrent use.
type Reader struct {
	c      *Cache
	file   uint64
	size   int64
	data   extent.Map
	f      Fetcher
	cost   *costModel
	tally  *Tally          // nil: not counted
	ctx    context.Context // readahead runs under it; Close cancels it
	cancel context.CancelFunc
	closed atomic.Bool

	blockRunsOnce sync.Once
	blockRuns     []blockRun // dataBlockRuns

	mu        sync.Mutex // guards the stream state below
	lastEnd   int64
	streaming bool  // the last read was sequential: counted in Cache.streams
	window    int64 // current readahead window in bytes, 0 = none
	raNext    int64 // first block index readahead has not yet covered
}

// Tally counts what the reads of one disk were answered from; all of the
// disk's readers may share one. Every byte read is counted once, in one of
// the three.
type Tally struct {
	Reads     atomic.Int64 // ReadAt calls
	HitBytes  atomic.Int64 // data found in a cached block
	MissBytes atomic.Int64 // data that waited for a fetch (its own or one in flight)
	HoleBytes atomic.Int64 // zeros of holes, never fetched
}

// Close stops this reader's readahead; later reads fail.
func (r *Reader) Close() {
	r.closed.Store(true)
	r.cancel()
	r.mu.Lock()
	r.setStreaming(false)
	r.mu.Unlock()
}

// setStreaming records whether the reader reads sequentially; r.mu held.
func (r *Reader) setStreaming(on bool) {
	if on != r.streaming {
		r.streaming = on
		if on {
			r.c.streams.Add(1)
		} else {
			r.c.streams.Add(-1)
		}
	}
}

// ReadAt fills p with [off, off+len(p)); it never returns partial data.
func (r *Reader) ReadAt(ctx context.Context, p []byte, off int64) error {
	n := int64(len(p))
	if err := r.begin(off, n); err != nil || n == 0 {
		return err
	}
	return r.eachBlock(ctx, off, n,
		func(pos, m int64) { clear(p[pos-off : pos-off+m]) },
		func(b *block, pos, inBlock, m int64) { copy(p[pos-off:pos-off+m], b.buf[inBlock:]) })
}

// Pinned is a range's bytes where they lie in the cache, for a FUSE reply
// written straight from them (writev) instead of copied into a buffer
// first. Until Release, none of its blocks is evicted or recycled.
type Pinned struct {
	Bufs   [][]byte
	c      *Cache
	blocks []*block
}

// Release lets the blocks go; Bufs must not be used after it. Safe to call
// more than once.
func (p *Pinned) Release() {
	for _, b := range p.blocks {
		b.pins.Add(-1)
	}
	p.c.pinned.Add(-int64(len(p.blocks)))
	p.blocks = nil
}

// ReadPinned is ReadAt without the copy: the bytes of [off, off+n) as
// slices of the cached blocks (holes as slices of zeros), fetched first
// where missing. The slices are read-only.
func (r *Reader) ReadPinned(ctx context.Context, off, n int64) (*Pinned, error) {
	if err := r.begin(off, n); err != nil {
		return nil, err
	}
	p := &Pinned{Bufs: make([][]byte, 0, n/r.c.opts.BlockSize+2), c: r.c}
	err := r.eachBlock(ctx, off, n,
		func(_, m int64) { p.Bufs = append(p.Bufs, r.c.zeros[:m]) },
		func(b *block, _, inBlock, m int64) {
			b.pins.Add(1)
			r.c.pinned.Add(1)
			p.blocks = append(p.blocks, b)
			p.Bufs = append(p.Bufs, b.buf[inBlock:inBlock+m])
		})
	if err != nil {
		p.Release()
		return nil, err
	}
	return p, nil
}

// eachBlock walks [off, off+n) a block at a time: hole gets the parts the
// map has no data in, use each data part's block once it is ready (under
// the cache's read lock, fetched first on a miss), with the part's offset
// in the disk and in the block and its length.
func (r *Reader) eachBlock(ctx context.Context, off, n int64, hole func(pos, m int64), use func(b *block, pos, inBlock, m int64)) error {
	bs := r.c.opts.BlockSize
	for pos := off; pos < off+n; {
		idx := pos / bs
		end := min((idx+1)*bs, off+n)
		inBlock, m := pos-idx*bs, end-pos
		if !r.data.Overlaps(pos, m) {
			hole(pos, m)
		} else if err := r.awaitBlock(ctx, idx, inBlock, int(m), func(b *block) { use(b, pos, inBlock, m) }); err != nil {
			return err
		}
		pos = end
	}
	return nil
}

// begin checks a read of [off, off+n), counts it and feeds the readahead.
func (r *Reader) begin(off, n int64) error {
	if n < 0 || off < 0 || off > r.size-n {
		return fmt.Errorf("cache read [%d, +%d) of disk size %d: out of range", off, n, r.size)
	}
	if r.closed.Load() {
		return fmt.Errorf("cache read at %d: %w", off, ErrClosed)
	}
	if n == 0 {
		return nil
	}
	if r.tally != nil {
		r.tally.Reads.Add(1)
		r.tally.HoleBytes.Add(n - r.data.DataIn(off, n))
	}
	r.track(off, n)
	return nil
}

// awaitBlock calls use with block idx once it is ready (under the cache's
// read lock), fetching it on a miss; n bytes from inBlock are what the
// caller takes, for the counters.
func (r *Reader) awaitBlock(ctx context.Context, idx, inBlock int64, n int, use func(*block)) error {
	c := r.c
	k := blockKey{r.file, idx}
	counted := false
	for {
		ok, b := c.useReady(k, use)
		if ok {
			if !counted {
				c.hits.Add(1)
				r.count(true, idx, inBlock, n)
			}
			return nil
		}
		if !counted {
			c.misses.Add(1)
			r.count(false, idx, inBlock, n)
			counted = true
		}
		if b == nil {
			if b, _ = c.startFetch(r, k, false); b == nil {
				return fmt.Errorf("cache read block %d: %w", idx, ErrClosed)
			}
		}
		select {
		case <-b.done:
		case <-ctx.Done():
			return fmt.Errorf("cache read block %d: %w", idx, ctx.Err())
		}
		if b.err != nil {
			// A readahead fetch cancelled because its stream closed says
			// nothing about the data: fetch again on demand.
			if b.readahead && errors.Is(b.err, context.Canceled) && c.ctx.Err() == nil {
				continue
			}
			return b.err
		}
		// Ready now; loop to use it (or refetch if already evicted).
	}
}

// count adds the data bytes of [inBlock, +n) of block idx to the tally's
// hits or misses.
func (r *Reader) count(hit bool, idx, inBlock int64, n int) {
	if r.tally == nil {
		return
	}
	d := r.data.DataIn(idx*r.c.opts.BlockSize+inBlock, int64(n))
	if hit {
		r.tally.HitBytes.Add(d)
	} else {
		r.tally.MissBytes.Add(d)
	}
}

// track updates the stream state and starts readahead on sequential streams.
func (r *Reader) track(off, n int64) {
	c := r.c
	bs := c.opts.BlockSize
	r.mu.Lock()
	// A read past a hole (cp --sparse and tar -S seek over them) is as
	// sequential as the next read of the data: the stream skipped nothing
	// it would have read.
	sequential := r.lastEnd > 0 && off >= r.lastEnd-seqBackTolerance &&
		(off <= r.lastEnd+seqForwardTolerance || !r.data.Overlaps(r.lastEnd, off-r.lastEnd))
	if end := off + n; end > r.lastEnd || !sequential {
		r.lastEnd = end
	}
	r.setStreaming(sequential && !r.closed.Load())
	// The streams share half the capacity: readahead beyond that would be
	// evicted before it is read, and fetched again. A stream whose share
	// is under a block reads what it is asked for, no more.
	limit := min(c.opts.MaxReadahead, c.opts.Capacity/2/max(c.streams.Load(), 1))
	limit = max(limit-limit%bs, 0)
	if !sequential || limit < bs {
		r.window = 0
		r.mu.Unlock()
		return
	}
	r.window = min(r.window, limit)
	cur := (off + n - 1) / bs
	if r.window == 0 {
		r.window = min(2*bs, limit)
		r.raNext = cur + 1
	}
	// One fetch carries up to span bytes, at most half the window (the
	// other half stays in flight) and a 2×Parallel-th of the capacity (all
	// fetches in flight stay within half of it); readahead waits until
	// that much is due.
	maxSpan := max(min(r.window/2, c.opts.Capacity/int64(2*c.opts.Parallel)), bs)
	span := r.cost.span(bs, maxSpan)
	if r.rangesFetcher() != nil {
		// Only the extents travel, however far apart: the largest fetch
		// is the cheapest per byte.
		span = maxSpan
	}
	// The window counts blocks that hold data: the hole between two
	// extents, however long, costs readahead nothing, so a disk's size
	// does not change how far ahead its data is read.
	last := (r.size - 1) / bs
	from := max(r.raNext, cur+1)
	to := r.dataBlocksAfter(cur, r.window/bs, last) // inclusive
	if to < last && r.dataBlocksAfter(from-1, max(span/bs, 1), last) > to {
		to = from - 1 // less than a fetch's worth due yet
	}
	if from <= to {
		r.raNext = to + 1
		// Grow once per window consumed, so the window doubles per "round".
		r.window = min(r.window*2, limit)
	}
	r.mu.Unlock()
	if from <= to && r.ctx.Err() == nil {
		c.startSpans(r, from, to, span)
	}
}

// dataBlocksAfter returns the block that holds the n-th block with data
// after block cur, or last if there are fewer. It runs on every sequential
// read, so it walks runs of blocks, not extents: a map of a million 4 KiB
// extents, one every 8 KiB, is one run.
func (r *Reader) dataBlocksAfter(cur, n, last int64) int64 {
	runs := r.dataBlockRuns()
	i := sort.Search(len(runs), func(i int) bool { return runs[i].last > cur })
	b := cur + 1
	for ; n > 0 && i < len(runs); i++ {
		b = max(b, runs[i].first)
		k := min(runs[i].last-b+1, n)
		n -= k
		b += k
	}
	if n > 0 {
		return last
	}
	return min(b-1, last)
}

// blockRun is a run of consecutive blocks that all hold data.
type blockRun struct{ first, last int64 }

// dataBlockRuns are the runs of blocks with data, made on the first
// sequential read (random readers never need them).
func (r *Reader) dataBlockRuns() []blockRun {
	r.blockRunsOnce.Do(func() {
		bs := r.c.opts.BlockSize
		for _, e := range r.data.Extents() {
			first, last := e.Off/bs, (e.End()-1)/bs
			if k := len(r.blockRuns); k > 0 && first <= r.blockRuns[k-1].last+1 {
				r.blockRuns[k-1].last = max(r.blockRuns[k-1].last, last)
				continue
			}
			r.blockRuns = append(r.blockRuns, blockRun{first, last})
		}
	})
	return r.blockRuns
}

// rangesFetcher is the fetcher when it now fills ranges far apart with one
// request, else nil.
func (r *Reader) rangesFetcher() RangesFetcher {
	if rf, ok := r.f.(RangesFetcher); ok && rf.MultipleRanges() {
		return rf
	}
	return nil
}

// readRun reads run, which lies inside the job's blocks (the first at lo),
// into their buffers: with one request when the fetcher can fill several
// buffers at once.
func (r *Reader) readRun(ctx context.Context, job []*block, lo int64, run extent.Extent) error {
	bufs := r.runBufs(job, lo, run)
	if v, ok := r.f.(VecFetcher); ok && len(bufs) > 1 {
		return v.ReadVecAt(ctx, bufs, run.Off)
	}
	return backend.ReadEach(ctx, r.f.ReadAt, bufs, run.Off)
}

// runBufs are the parts of the job's buffers (the first block at lo) that
// run covers, in order.
func (r *Reader) runBufs(job []*block, lo int64, run extent.Extent) [][]byte {
	bs := r.c.opts.BlockSize
	first := (run.Off - lo) / bs
	last := (run.End() - 1 - lo) / bs
	bufs := make([][]byte, 0, last-first+1)
	for i := first; i <= last; i++ {
		b := job[i]
		blo := b.key.idx * bs
		from, to := max(run.Off, blo), min(run.End(), blo+int64(len(b.buf)))
		bufs = append(bufs, b.buf[from-blo:to-blo])
	}
	return bufs
}
