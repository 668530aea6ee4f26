// Package cache is the bounded block cache between the FUSE read path and a
// backend: it answers holes locally, fetches each allocated block once, keeps
// blocks under a byte budget with CLOCK eviction, and prefetches ahead of
// sequential streams.
package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// Fetcher reads bytes from the backend; it fills p entirely or errors
// (backend.Disk satisfies it).
type Fetcher interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
}

// VecFetcher is a Fetcher that fills several buffers, laid end to end from
// off, with one backend request (backend.VecReader): a run read through
// several blocks then costs one request, not one per block.
type VecFetcher interface {
	Fetcher
	ReadVecAt(ctx context.Context, bufs [][]byte, off int64) error
}

// RangesFetcher is a Fetcher that fills pieces far apart with one backend
// request (backend.RangesReader): a fetch of a fragmented disk's blocks then
// carries its extents only, neither the holes between them nor a request
// for each.
type RangesFetcher interface {
	Fetcher
	MultipleRanges() bool
	ReadRanges(ctx context.Context, pieces []backend.Piece) error
}

// Options configures a Cache; zero values take the defaults.
type Options struct {
	Capacity     int64         // bytes of block data kept; default 64 MiB
	BlockSize    int64         // default 1 MiB
	MaxReadahead int64         // largest readahead window per stream; default a quarter of Capacity, at least 32 MiB
	Parallel     int           // fetches in flight per Cache; default 8
	FetchTimeout time.Duration // bound on one block fetch; default 2m
	Logger       *slog.Logger  // nil discards
}

// ErrClosed is returned by reads after Close.
var ErrClosed = errors.New("cache closed")

// Stats are cumulative counters, except ResidentBytes which is current
// and Capacity, the budget.
type Stats struct {
	Hits, Misses, FetchedBytes, Fetches, Evictions, ResidentBytes int64
	Capacity                                                      int64
	Pinned                                                        int64 // block pins held by Pinned results not yet released
}

type blockKey struct {
	file uint64
	idx  int64
}

// block is one cached block. buf and state change only under Cache.mu
// (write); readers copy out, or pin, under the read lock, so a buffer is
// never recycled while being copied or while pinned.
type block struct {
	key   blockKey
	buf   []byte
	ready bool
	// done is closed when the fetch finishes; err is set before that.
	done chan struct{}
	err  error
	// readahead marks a fetch started speculatively; if it was cancelled
	// because its stream closed, waiters retry instead of failing.
	readahead bool
	used      atomic.Bool // CLOCK reference bit
	unread    atomic.Bool // read ahead and not read yet
	// pins counts the Pinned results that hand buf out without a copy.
	// It rises only under the read lock, so the write lock sees every
	// pin taken before it; a pinned block is not evicted, and its buffer
	// never goes back to the pool (if Close drops it, the collector has it).
	pins atomic.Int32
}

// Cache is a block cache shared by all readers; safe for concurrent use.
type Cache struct {
	opts   Options
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	sem    chan struct{}
	pool   sync.Pool
	zeros  []byte // a block of zeros that Pinned results hand out for holes; never written

	mu       sync.RWMutex
	closed   bool
	blocks   map[blockKey]*block
	clock    []*block // ready blocks in CLOCK order
	hand     int
	resident int64 // ready + in-flight buffer bytes
	files    map[string]*fileState

	hits, misses, fetchedBytes, fetches, evictions atomic.Int64
	pinned                                         atomic.Int64
	// streams counts the readers now reading sequentially: they share the
	// readahead budget, half the capacity.
	streams atomic.Int64
}

// New returns a Cache; call Close to stop its background work.
func New(opts Options) *Cache {
	if opts.Capacity <= 0 {
		opts.Capacity = 64 << 20
	}
	if opts.BlockSize <= 0 {
		opts.BlockSize = 1 << 20
	}
	if opts.MaxReadahead <= 0 {
		// A larger cache is given for slower, costlier requests: a window
		// that grows with it keeps more of them in flight.
		opts.MaxReadahead = max(32<<20, opts.Capacity/4)
	}
	if opts.Parallel <= 0 {
		opts.Parallel = 8
	}
	if opts.FetchTimeout <= 0 {
		opts.FetchTimeout = 2 * time.Minute
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Cache{
		opts:   opts,
		log:    log,
		ctx:    ctx,
		cancel: cancel,
		sem:    make(chan struct{}, opts.Parallel),
		blocks: make(map[blockKey]*block),
		files:  make(map[string]*fileState),
	}
	bs := opts.BlockSize
	c.pool.New = func() any { b := make([]byte, bs); return &b }
	c.zeros = make([]byte, bs)
	return c
}

// Stats returns a snapshot of the counters.
func (c *Cache) Stats() Stats {
	c.mu.RLock()
	res := c.resident
	c.mu.RUnlock()
	return Stats{
		Hits:          c.hits.Load(),
		Misses:        c.misses.Load(),
		FetchedBytes:  c.fetchedBytes.Load(),
		Fetches:       c.fetches.Load(),
		Evictions:     c.evictions.Load(),
		ResidentBytes: res,
		Capacity:      c.opts.Capacity,
		Pinned:        c.pinned.Load(),
	}
}

// Close stops all background fetches, waits for them and drops every block.
func (c *Cache) Close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
	c.mu.Lock()
	for _, b := range c.clock {
		c.freeLocked(b)
	}
	c.clock = nil
	c.blocks = map[blockKey]*block{}
	c.mu.Unlock()
}

// fileState is what the cache keeps per disk for all its readers.
type fileState struct {
	id   uint64
	cost *costModel // what the disk's backend requests cost, learnt from its fetches
}

// Open returns a reader for one disk. key identifies immutable content (same
// key = same bytes); data is the allocated map, everything else reads as
// zeros without a fetch.
func (c *Cache) Open(key string, size int64, data extent.Map, f Fetcher) *Reader {
	return c.OpenCounted(key, size, data, f, nil)
}

// OpenCounted is Open with the reads counted in t.
func (c *Cache) OpenCounted(key string, size int64, data extent.Map, f Fetcher, t *Tally) *Reader {
	c.mu.Lock()
	fs, ok := c.files[key]
	if !ok {
		fs = &fileState{id: uint64(len(c.files) + 1), cost: newCostModel()}
		c.files[key] = fs
	}
	closed := c.closed
	c.mu.Unlock()
	ctx, cancel := context.WithCancel(c.ctx)
	r := &Reader{c: c, file: fs.id, size: max(size, 0), data: data, f: f, cost: fs.cost, tally: t, ctx: ctx, cancel: cancel}
	if closed {
		r.closed.Store(true)
	}
	return r
}

func (c *Cache) blockLen(idx, size int64) int64 {
	return min(c.opts.BlockSize, size-idx*c.opts.BlockSize)
}

// useReady calls use with the ready block k under the read lock. It
// reports false when the block is absent or not ready yet, returning the
// pending block if a fetch is in flight.
func (c *Cache) useReady(k blockKey, use func(*block)) (bool, *block) {
	c.mu.RLock()
	b := c.blocks[k]
	if b == nil || !b.ready {
		c.mu.RUnlock()
		return false, b
	}
	use(b)
	b.used.Store(true)
	b.unread.Store(false)
	c.mu.RUnlock()
	return true, nil
}

// startFetch returns the block for k, starting its fetch if nobody has. It
// returns nil when the cache is closed.
func (c *Cache) startFetch(r *Reader, k blockKey, readahead bool) (b *block, started bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, false
	}
	if b := c.blocks[k]; b != nil {
		return b, false
	}
	b = c.addLocked(k, readahead)
	c.launchLocked(r, []*block{b}, readahead)
	return b, true
}

// startSpans starts the readahead of the blocks from..to (inclusive) that
// hold data and are neither cached nor being fetched: consecutive ones
// together, up to span bytes a fetch, so that one request fills several
// blocks where the platform's requests cost more than their bytes.
func (c *Cache) startSpans(r *Reader, from, to, span int64) {
	bs := c.opts.BlockSize
	perJob := max(span/bs, 1)
	c.mu.Lock()
	defer c.mu.Unlock()
	var job []*block
	flush := func() {
		if len(job) > 0 {
			c.launchLocked(r, job, true)
			job = nil
		}
	}
	for idx := from; idx <= to && !c.closed; idx++ {
		k := blockKey{r.file, idx}
		if c.blocks[k] != nil || !r.data.Overlaps(idx*bs, c.blockLen(idx, r.size)) {
			flush()
			continue
		}
		job = append(job, c.addLocked(k, true))
		if int64(len(job)) == perJob {
			flush()
		}
	}
	flush()
}

func (c *Cache) addLocked(k blockKey, readahead bool) *block {
	b := &block{key: k, done: make(chan struct{}), readahead: readahead}
	c.blocks[k] = b
	return b
}

func (c *Cache) launchLocked(r *Reader, job []*block, readahead bool) {
	ctx := c.ctx
	if readahead {
		ctx = r.ctx
	}
	c.wg.Add(1)
	go c.fetch(ctx, r, job)
}

// fetch fills the consecutive blocks of one job: the data parts from the
// backend, the holes with zeros. It runs under the cache's (or, for
// readahead, the stream's) context, never a caller's, so one interrupted
// caller cannot fail the others.
func (c *Cache) fetch(ctx context.Context, r *Reader, job []*block) {
	defer c.wg.Done()
	err := c.fill(ctx, r, job)
	c.mu.Lock()
	var bytes int64
	for _, b := range job {
		bytes += int64(len(b.buf))
	}
	switch {
	case err != nil:
		first, last := job[0].key.idx, job[len(job)-1].key.idx
		lo, hi := first*c.opts.BlockSize, last*c.opts.BlockSize+c.blockLen(last, r.size)
		err = fmt.Errorf("fetch blocks [%d, %d): %w", lo, hi, err)
		if !job[0].readahead || !errors.Is(err, context.Canceled) {
			c.log.Warn("block fetch failed", "block", first, "blocks", len(job), "err", err)
		}
		c.dropLocked(job, err)
	case c.closed:
		c.dropLocked(job, ErrClosed)
	default:
		// Room was made when the fetch began (fill), but not always
		// enough: fetches in flight are not evictable, so one started
		// while others filled the budget leaves it over. Ready now,
		// these bytes bring the ready blocks back within Capacity.
		c.resident -= bytes
		c.evictLocked(bytes)
		c.resident += bytes
		for _, b := range job {
			b.ready = true
			b.used.Store(true)
			b.unread.Store(b.readahead)
			c.clock = append(c.clock, b)
		}
	}
	for _, b := range job {
		close(b.done)
	}
	c.mu.Unlock()
}

func (c *Cache) dropLocked(job []*block, err error) {
	for _, b := range job {
		b.err = err
		if b.buf != nil {
			c.resident -= int64(len(b.buf))
			c.putBuf(b.buf)
			b.buf = nil
		}
		delete(c.blocks, b.key)
	}
}

func (c *Cache) fill(ctx context.Context, r *Reader, job []*block) error {
	select {
	case c.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-c.sem }()
	bs := c.opts.BlockSize
	lo := job[0].key.idx * bs
	var n int64
	c.mu.Lock()
	for _, b := range job {
		bp := c.pool.Get().(*[]byte)
		b.buf = (*bp)[:c.blockLen(b.key.idx, r.size)]
		n += int64(len(b.buf))
	}
	// Room is made before the bytes arrive, so that what is in flight
	// (several blocks a fetch) is inside Capacity too.
	c.evictLocked(n)
	c.resident += n
	c.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, c.opts.FetchTimeout)
	defer cancel()
	if rf := r.rangesFetcher(); rf != nil {
		// One request for the whole job, carrying the extents only: a
		// hole costs more to read through than a part of a multipart
		// answer (a few header lines) unless it is shorter than one.
		runs := r.data.Runs(lo, n, partOverhead)
		var pieces []backend.Piece
		var data int64
		for _, run := range runs {
			off := run.Off
			for _, buf := range r.runBufs(job, lo, run) {
				pieces = append(pieces, backend.Piece{Off: off, Buf: buf})
				off += int64(len(buf))
			}
			data += run.Len
		}
		if len(pieces) > 0 {
			c.fetches.Add(1)
			start := time.Now()
			if err := rf.ReadRanges(ctx, pieces); err != nil {
				return fetchErr(ctx, err)
			}
			r.cost.observe(data, time.Since(start))
			c.fetchedBytes.Add(data)
		}
	} else {
		for _, run := range r.data.Runs(lo, n, r.cost.gap()) {
			c.fetches.Add(1)
			start := time.Now()
			if err := r.readRun(ctx, job, lo, run); err != nil {
				return fetchErr(ctx, err)
			}
			r.cost.observe(run.Len, time.Since(start))
			c.fetchedBytes.Add(run.Len)
		}
	}
	// The map says the holes inside the runs (and the rest of the blocks)
	// are zeros, and lseek and cp --sparse say so too: whatever the backend
	// sent for them, and whatever the recycled buffers held, must not show.
	for _, b := range job {
		r.data.ZeroHoles(b.buf, b.key.idx*bs)
	}
	return nil
}

// partOverhead is what one more range costs in a multipart answer, in
// bytes: its part's header lines (about 100 bytes), its entry in the Range
// header (about 20) and the parsing of both. Holes shorter than that are
// read through; a filesystem's extents (whole 4 KiB blocks) never have such
// holes between them, a hostile map of tiny extents does.
const partOverhead = 512

// fetchErr says, when the fetch's own deadline cut err short, so.
func fetchErr(ctx context.Context, err error) error {
	if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
		return fmt.Errorf("%w (%v)", err, ctx.Err())
	}
	return err
}

// evictLocked frees ready blocks until need more bytes fit in Capacity. It
// is CLOCK, except that a block read ahead and not yet read is passed over
// while anything else can go: evicting it would mean fetching it twice.
func (c *Cache) evictLocked(need int64) {
	passes := 0
	for c.resident+need > c.opts.Capacity && len(c.clock) > 0 {
		if c.hand >= len(c.clock) {
			c.hand = 0
			passes++
			if passes > 2 {
				// Everything left is pinned: the pins go within
				// microseconds (a reply's write), the next fetch evicts.
				return
			}
		}
		b := c.clock[c.hand]
		if b.used.Swap(false) || (b.unread.Load() && passes < 2) || b.pins.Load() > 0 {
			c.hand++
			continue
		}
		// Remove in place so the order, and with it every block's
		// second chance, is kept.
		c.clock = append(c.clock[:c.hand], c.clock[c.hand+1:]...)
		c.clock[len(c.clock):cap(c.clock)][0] = nil
		delete(c.blocks, b.key)
		c.freeLocked(b)
		c.evictions.Add(1)
	}
}

func (c *Cache) freeLocked(b *block) {
	c.resident -= int64(len(b.buf))
	if b.pins.Load() == 0 {
		c.putBuf(b.buf)
	}
	b.buf = nil
	b.ready = false
}

func (c *Cache) putBuf(buf []byte) {
	if int64(cap(buf)) == c.opts.BlockSize {
		buf = buf[:cap(buf)]
		c.pool.Put(&buf)
	}
}
