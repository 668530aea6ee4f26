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

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// Fetcher reads bytes from the backend; it fills p entirely or errors
// (backend.Disk satisfies it).
type Fetcher interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
}

// Options configures a Cache; zero values take the defaults.
type Options struct {
	Capacity     int64         // bytes of block data kept; default 64 MiB
	BlockSize    int64         // default 1 MiB
	MaxReadahead int64         // largest readahead window per stream; default 32 MiB
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
}

type blockKey struct {
	file uint64
	idx  int64
}

// block is one cached block. buf and state change only under Cache.mu
// (write); readers copy out under the read lock, so a buffer is never
// recycled while being copied.
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

	mu       sync.RWMutex
	closed   bool
	blocks   map[blockKey]*block
	clock    []*block // ready blocks in CLOCK order
	hand     int
	resident int64 // ready + in-flight buffer bytes
	files    map[string]uint64

	hits, misses, fetchedBytes, fetches, evictions atomic.Int64
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
		opts.MaxReadahead = 32 << 20
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
		files:  make(map[string]uint64),
	}
	bs := opts.BlockSize
	c.pool.New = func() any { b := make([]byte, bs); return &b }
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

// Open returns a reader for one disk. key identifies immutable content (same
// key = same bytes); data is the allocated map, everything else reads as
// zeros without a fetch.
func (c *Cache) Open(key string, size int64, data extent.Map, f Fetcher) *Reader {
	return c.OpenCounted(key, size, data, f, nil)
}

// OpenCounted is Open with the reads counted in t.
func (c *Cache) OpenCounted(key string, size int64, data extent.Map, f Fetcher, t *Tally) *Reader {
	c.mu.Lock()
	id, ok := c.files[key]
	if !ok {
		id = uint64(len(c.files) + 1)
		c.files[key] = id
	}
	closed := c.closed
	c.mu.Unlock()
	ctx, cancel := context.WithCancel(c.ctx)
	r := &Reader{c: c, file: id, size: max(size, 0), data: data, f: f, tally: t, ctx: ctx, cancel: cancel}
	if closed {
		r.closed.Store(true)
	}
	return r
}

func (c *Cache) blockLen(idx, size int64) int64 {
	return min(c.opts.BlockSize, size-idx*c.opts.BlockSize)
}

// copyOut copies from a ready block under the read lock. It reports false
// when the block is absent or not ready yet, returning the pending block if
// a fetch is in flight.
func (c *Cache) copyOut(k blockKey, dst []byte, inBlock int64) (bool, *block) {
	c.mu.RLock()
	b := c.blocks[k]
	if b == nil || !b.ready {
		c.mu.RUnlock()
		return false, b
	}
	copy(dst, b.buf[inBlock:])
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
	b = &block{key: k, done: make(chan struct{}), readahead: readahead}
	c.blocks[k] = b
	ctx := c.ctx
	if readahead {
		ctx = r.ctx
	}
	c.wg.Add(1)
	go c.fetch(ctx, r, b)
	return b, true
}

// coalesceGap is the longest hole a block fetch reads through. Data extents
// of a block separated by holes of at most this size are fetched with one
// Range request and the holes are zeroed after (extent.Map.Runs), so a map of
// many small extents (FIEMAP of a fragmented file: 16-byte extents 256 bytes
// apart) costs a few requests per block instead of one per extent, each of
// which costs a round trip and, on the Coriolis exporter, a re-read of the
// whole chunk list. 64 KiB is about what one round trip costs in transfer
// time on a LAN, so reading through a shorter hole is cheaper than another
// request. The over-read is bounded: less than 64 KiB per merged hole, never
// past the block, so a block holds at most BlockSize/64 KiB runs and a read
// never fetches more than the blocks that hold data; a map whose holes are
// all longer (the benchmark's 64 extents of 8 MiB) fetches exactly its
// extents.
const coalesceGap = 64 << 10

// fetch fills one block: the data parts from the backend, the holes with
// zeros. It runs under the cache's (or, for readahead, the stream's) context,
// never a caller's, so one interrupted caller cannot fail the others.
func (c *Cache) fetch(ctx context.Context, r *Reader, b *block) {
	defer c.wg.Done()
	err := c.fill(ctx, r, b)
	c.mu.Lock()
	if err != nil {
		lo := b.key.idx * c.opts.BlockSize
		b.err = fmt.Errorf("fetch block [%d, %d): %w", lo, lo+c.blockLen(b.key.idx, r.size), err)
		if b.buf != nil {
			c.resident -= int64(len(b.buf))
			c.putBuf(b.buf)
			b.buf = nil
		}
		delete(c.blocks, b.key)
		if !b.readahead || !errors.Is(err, context.Canceled) {
			c.log.Warn("block fetch failed", "block", b.key.idx, "err", err)
		}
	} else if c.closed {
		c.resident -= int64(len(b.buf))
		c.putBuf(b.buf)
		b.buf = nil
		b.err = ErrClosed
		delete(c.blocks, b.key)
	} else {
		// In-flight bytes become ready bytes; make room so ready blocks
		// stay within Capacity.
		c.resident -= int64(len(b.buf))
		c.evictLocked(int64(len(b.buf)))
		c.resident += int64(len(b.buf))
		b.ready = true
		b.used.Store(true)
		b.unread.Store(b.readahead)
		c.clock = append(c.clock, b)
	}
	close(b.done)
	c.mu.Unlock()
}

func (c *Cache) fill(ctx context.Context, r *Reader, b *block) error {
	select {
	case c.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-c.sem }()
	n := c.blockLen(b.key.idx, r.size)
	bp := c.pool.Get().(*[]byte)
	buf := (*bp)[:n]
	c.mu.Lock()
	b.buf = buf
	c.resident += n
	c.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, c.opts.FetchTimeout)
	defer cancel()
	lo := b.key.idx * c.opts.BlockSize
	for _, run := range r.data.Runs(lo, n, coalesceGap) {
		c.fetches.Add(1)
		if err := r.f.ReadAt(ctx, buf[run.Off-lo:run.End()-lo], run.Off); err != nil {
			if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
				err = fmt.Errorf("%w (%v)", err, ctx.Err())
			}
			return err
		}
		c.fetchedBytes.Add(run.Len)
	}
	// The map says the holes inside the runs (and the rest of the block)
	// are zeros, and lseek and cp --sparse say so too: whatever the backend
	// sent for them, and whatever the recycled buffer held, must not show.
	r.data.ZeroHoles(buf, lo)
	return nil
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
		}
		b := c.clock[c.hand]
		if b.used.Swap(false) || (b.unread.Load() && passes < 2) {
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
	c.putBuf(b.buf)
	b.buf = nil
	b.ready = false
}

func (c *Cache) putBuf(buf []byte) {
	if int64(cap(buf)) == c.opts.BlockSize {
		buf = buf[:cap(buf)]
		c.pool.Put(&buf)
	}
}
