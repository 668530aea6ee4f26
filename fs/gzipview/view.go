// Package gzipview serves a deterministic, randomly accessible gzip of a raw
// disk: one independent gzip member per fixed-size raw chunk, so any byte of
// the .gz can be produced by compressing just the chunks that cover it.
package gzipview

import (
	"bytes"
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"sort"
	"sync"
	"time"

	"github.com/klauspost/compress/gzip"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// Reader reads the raw disk; ReadAt fills p entirely or returns an error.
type Reader interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
}

// Options tune a View. Zero values select the defaults.
type Options struct {
	ChunkSize int64 // raw bytes per gzip member; default 4 MiB
	Level     int   // klauspost gzip level; default 1 (BestSpeed); part of the index identity
	Workers   int   // parallel compressors; default runtime.NumCPU()
	IndexPath string
	Logger    *slog.Logger
	Name      string // the file served, for logs

	// OnLayoutChange, when set, is called when the member layout, and with
	// it the stream's size and bytes, changes: when a stale index is
	// dropped and again when its replacement is ready. It runs on the
	// goroutine of the read or stat that caused it, outside the view's
	// locks, and must not block (invalidate the kernel's caches from a
	// goroutine of its own).
	OnLayoutChange func()
}

const defaultChunkSize = 4 << 20

// ErrOutOfRange reports a read outside [0, Size).
var ErrOutOfRange = errors.New("gzipview: read out of range")

// ErrStaleIndex reports a member that compresses to another length than the
// index says: the data under an unchanged snapshot identity changed since
// the index was built. The first time, the view drops the index (file
// included) and rebuilds it on next use; after that rebuild it is final.
var ErrStaleIndex = errors.New("gzipview: index does not match the data")

// ErrLayoutChanged reports a read planned against a member layout that has
// been replaced since (see ReadAtGeneration): its bytes would be placed by
// one layout and sized by another. Reopen the file.
var ErrLayoutChanged = errors.New("gzipview: member layout changed since the file was opened")

// View is the gzip view of one disk. It is safe for concurrent use.
type View struct {
	raw     Reader
	size    int64
	data    extent.Map
	opts    Options
	log     *slog.Logger
	members int64
	id      identity

	// sem bounds compressions across index building, reads and read-ahead,
	// so a View never uses more than Workers cores.
	sem chan struct{}

	bgCtx    context.Context
	bgCancel context.CancelFunc
	bgWG     sync.WaitGroup

	// build serializes loading and building the index (a one-slot
	// semaphore, so waiting for someone else's build honours the context);
	// layoutMu guards the layout, so dropping one never waits for a build.
	build    chan struct{}
	layoutMu sync.Mutex
	offsets  []int64 // offsets[i] = start of member i in the .gz; len = members+1; nil until loaded or built
	gen      uint64  // layout generation, bumped when a stale index is dropped
	healed   bool    // a stale index was dropped: its rebuild is final

	zeroMu      sync.Mutex
	zeroMembers map[int64][]byte // keyed by raw length

	cacheMu  sync.Mutex
	cache    map[int64]*list.Element
	lru      *list.List
	cacheCap int
	lastEnd  int64 // end of the previous read, to detect sequential access
}

type cacheEntry struct {
	idx  int64
	done chan struct{}
	data []byte
	err  error
}

// New returns a view of the raw disk of the given size whose data lives only
// in data (everything else reads as zero and is never fetched). New does no
// I/O; the index is built or loaded on first use.
func New(raw Reader, size int64, data extent.Map, opts Options) *View {
	if opts.ChunkSize <= 0 {
		opts.ChunkSize = defaultChunkSize
	}
	if opts.Level == 0 {
		opts.Level = gzip.BestSpeed
	}
	if opts.Workers <= 0 {
		opts.Workers = runtime.NumCPU()
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if size < 0 {
		size = 0
	}
	members := (size + opts.ChunkSize - 1) / opts.ChunkSize
	if members == 0 {
		members = 1 // an empty disk is one empty member: still a valid gzip
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &View{
		raw:     raw,
		size:    size,
		data:    data,
		opts:    opts,
		log:     log,
		members: members,
		id: identity{
			compressVersion: compressModuleVersion(),
			level:           int32(opts.Level),
			chunkSize:       opts.ChunkSize,
			rawSize:         size,
			extentHash:      hashExtents(data, size),
		},
		sem:         make(chan struct{}, opts.Workers),
		build:       make(chan struct{}, 1),
		bgCtx:       ctx,
		bgCancel:    cancel,
		zeroMembers: map[int64][]byte{},
		cache:       map[int64]*list.Element{},
		lru:         list.New(),
		cacheCap:    max(2*opts.Workers, 4),
		lastEnd:     -1,
	}
}

// Close stops read-ahead and waits for it. The View must not be used after.
func (v *View) Close() {
	v.bgCancel()
	v.bgWG.Wait()
}

// Size returns the exact length of the gzip stream, loading or building the
// member index as needed.
func (v *View) Size(ctx context.Context) (int64, error) {
	offs, err := v.index(ctx)
	if err != nil {
		return 0, err
	}
	return offs[len(offs)-1], nil
}

func (v *View) chunkRange(i int64) (off, n int64) {
	off = i * v.opts.ChunkSize
	return off, min(v.opts.ChunkSize, v.size-off)
}

func (v *View) index(ctx context.Context) ([]int64, error) {
	offs, _, err := v.layout(ctx)
	return offs, err
}

// Generation is the current member layout's generation: 0 for the first
// index of the view (loaded or built), one more after a stale index was
// dropped. It does no I/O.
func (v *View) Generation() uint64 {
	v.layoutMu.Lock()
	defer v.layoutMu.Unlock()
	return v.gen
}

func (v *View) current() ([]int64, uint64, bool) {
	v.layoutMu.Lock()
	defer v.layoutMu.Unlock()
	return v.offsets, v.gen, v.healed
}

// layout returns the member offsets and their generation, loading or
// building the index as needed.
func (v *View) layout(ctx context.Context) ([]int64, uint64, error) {
	if offs, gen, _ := v.current(); offs != nil {
		return offs, gen, nil
	}
	select {
	case v.build <- struct{}{}:
	case <-ctx.Done():
		return nil, 0, fmt.Errorf("gzip index: %w", ctx.Err())
	}
	defer func() { <-v.build }()
	offs, gen, healed := v.current()
	if offs != nil {
		return offs, gen, nil
	}
	// After a stale index was dropped, never trust a file again (its
	// removal may have failed): the rebuild is what the data says now.
	var lengths []int64
	if !healed {
		lengths = v.loadIndex()
	}
	if lengths == nil {
		var err error
		lengths, err = v.buildIndex(ctx)
		if err != nil {
			return nil, 0, err
		}
		v.saveIndex(lengths)
	}
	offs = make([]int64, len(lengths)+1)
	for i, n := range lengths {
		offs[i+1] = offs[i] + n
	}
	// Only a published layout can be dropped, and publishing happens here
	// under v.build: gen cannot have moved since current().
	v.layoutMu.Lock()
	v.offsets = offs
	v.layoutMu.Unlock()
	if healed {
		v.log.Warn("gzipview: index rebuilt after a stale one was dropped", "file", v.opts.Name, "index", v.opts.IndexPath, "size", offs[len(offs)-1], "generation", gen)
		v.layoutChanged()
	}
	return offs, gen, nil
}

// stale handles member i of layout gen compressing to got bytes where the
// index says want: the first time, the layout and its index file are
// dropped (the next use rebuilds them); after that rebuild, and for a read
// of an already replaced layout, it only fails the read.
func (v *View) stale(gen uint64, i, got, want int64) error {
	v.layoutMu.Lock()
	switch {
	case v.gen != gen:
		v.layoutMu.Unlock()
		return fmt.Errorf("%w (member %d)", ErrLayoutChanged, i)
	case v.healed:
		v.layoutMu.Unlock()
		v.log.Error("gzipview: member disagrees with the rebuilt index too: the data under this snapshot keeps changing; failing the read",
			"file", v.opts.Name, "index", v.opts.IndexPath, "member", i, "index_length", want, "compressed_length", got)
		return fmt.Errorf("%w: member %d compresses to %d bytes, the rebuilt index says %d", ErrStaleIndex, i, got, want)
	}
	v.gen++
	v.healed = true
	v.offsets = nil
	// Removed before anyone can rebuild (that needs this lock to see the
	// layout gone), so the removal never hits the fresh index.
	var rmErr error
	if v.opts.IndexPath != "" {
		if err := os.Remove(v.opts.IndexPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			rmErr = err
		}
	}
	v.layoutMu.Unlock()
	v.log.Warn("gzipview: stale index: the data under this snapshot changed since the index was built; dropped it, rebuilding once",
		"file", v.opts.Name, "index", v.opts.IndexPath, "member", i, "index_length", want, "compressed_length", got)
	if rmErr != nil {
		v.log.Warn("gzipview: cannot remove stale index", "index", v.opts.IndexPath, "err", rmErr)
	}
	v.layoutChanged()
	return fmt.Errorf("%w: member %d compresses to %d bytes, the index says %d (index dropped; reopen the file)", ErrStaleIndex, i, got, want)
}

func (v *View) layoutChanged() {
	if v.opts.OnLayoutChange != nil {
		v.opts.OnLayoutChange()
	}
}

func (v *View) loadIndex() []int64 {
	if v.opts.IndexPath == "" {
		return nil
	}
	buf, err := os.ReadFile(v.opts.IndexPath)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			v.log.Warn("gzipview: cannot read index, rebuilding", "path", v.opts.IndexPath, "err", err)
		}
		return nil
	}
	lengths, err := decodeIndex(buf, v.id, v.members)
	if err != nil {
		v.log.Warn("gzipview: ignoring index, rebuilding", "path", v.opts.IndexPath, "err", err)
		return nil
	}
	return lengths
}

func (v *View) saveIndex(lengths []int64) {
	if v.opts.IndexPath == "" {
		return
	}
	// A failed save only costs a rebuild on the next mount.
	if err := writeFileAtomic(v.opts.IndexPath, encodeIndex(v.id, lengths)); err != nil {
		v.log.Warn("gzipview: cannot persist index", "path", v.opts.IndexPath, "err", err)
	}
}

// buildIndex compresses every data chunk once (Workers in parallel) to learn
// its length; hole chunks use the precomputed zero member.
func (v *View) buildIndex(ctx context.Context) ([]int64, error) {
	lengths := make([]int64, v.members)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	jobs := make(chan int64)
	var wg sync.WaitGroup
	var errOnce sync.Once
	var firstErr error
	for range v.opts.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				// Only the first members stay cached: a `cp` right
				// after `stat` starts there, whereas caching the
				// last ones would just be evicted before use.
				var m []byte
				var err error
				if i < int64(v.cacheCap) {
					m, err = v.member(ctx, i)
				} else {
					m, err = v.uncachedMember(ctx, i)
				}
				if err != nil {
					errOnce.Do(func() { firstErr = err; cancel() })
					continue
				}
				lengths[i] = int64(len(m))
			}
		}()
	}
feed:
	for i := range v.members {
		select {
		case jobs <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	if firstErr != nil {
		return nil, fmt.Errorf("build gzip index: %w", firstErr)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("build gzip index: %w", err)
	}
	return lengths, nil
}

// ReadAt fills p with the gzip stream at off, in the current layout.
// off+len(p) must not exceed Size.
func (v *View) ReadAt(ctx context.Context, p []byte, off int64) error {
	return v.readAt(ctx, p, off, false, 0)
}

// ReadAtGeneration is ReadAt for a reader that learned the size in layout
// gen (an open file): once that layout is replaced it fails with
// ErrLayoutChanged, never returning bytes placed by another layout.
func (v *View) ReadAtGeneration(ctx context.Context, gen uint64, p []byte, off int64) error {
	return v.readAt(ctx, p, off, true, gen)
}

func (v *View) readAt(ctx context.Context, p []byte, off int64, pinned bool, want uint64) error {
	if pinned && v.Generation() != want {
		// Checked first: a gone layout must not make this read rebuild.
		return fmt.Errorf("read gzip at %d: %w", off, ErrLayoutChanged)
	}
	offs, gen, err := v.layout(ctx)
	if err != nil {
		return err
	}
	if pinned && gen != want {
		return fmt.Errorf("read gzip at %d: %w", off, ErrLayoutChanged)
	}
	total := offs[len(offs)-1]
	if off < 0 || int64(len(p)) > total-off {
		return fmt.Errorf("%w: offset %d length %d size %d", ErrOutOfRange, off, len(p), total)
	}
	if len(p) == 0 {
		return nil
	}
	// Member containing off: last i with offs[i] <= off.
	first := int64(sort.Search(len(offs)-1, func(i int) bool { return offs[i+1] > off }))
	end := off + int64(len(p))
	last := int64(sort.Search(len(offs)-1, func(i int) bool { return offs[i+1] >= end }))
	v.readAhead(off, end, last)
	for i := first; i <= last; i++ {
		m, err := v.member(ctx, i)
		if err != nil {
			return fmt.Errorf("read gzip member %d: %w", i, err)
		}
		if int64(len(m)) != offs[i+1]-offs[i] {
			// The index disagrees with what we produce now (different
			// data behind the same identity): never serve mixed bytes.
			return fmt.Errorf("read gzip member %d: %w", i, v.stale(gen, i, int64(len(m)), offs[i+1]-offs[i]))
		}
		lo := max(off, offs[i])
		hi := min(end, offs[i+1])
		copy(p[lo-off:hi-off], m[lo-offs[i]:hi-offs[i]])
	}
	if v.Generation() != gen {
		// Dropped while we copied: these bytes were placed by a layout
		// known to be wrong.
		return fmt.Errorf("read gzip at %d: %w", off, ErrLayoutChanged)
	}
	return nil
}

// readAhead starts compressing the members after last when reads are
// sequential, so a streaming copy keeps all workers busy.
func (v *View) readAhead(off, end, last int64) {
	v.cacheMu.Lock()
	sequential := v.lastEnd == off || off == 0
	v.lastEnd = end
	v.cacheMu.Unlock()
	if !sequential {
		return
	}
	for i := last + 1; i <= last+int64(v.opts.Workers) && i < v.members; i++ {
		if !v.data.Overlaps(v.chunkRange(i)) {
			continue // zero members are free
		}
		v.cacheMu.Lock()
		_, cached := v.cache[i]
		v.cacheMu.Unlock()
		if cached {
			continue
		}
		v.bgWG.Add(1)
		go func() {
			defer v.bgWG.Done()
			if _, err := v.member(v.bgCtx, i); err != nil && v.bgCtx.Err() == nil {
				v.log.Debug("gzipview: read-ahead failed", "member", i, "err", err)
			}
		}()
	}
}

func (v *View) uncachedMember(ctx context.Context, i int64) ([]byte, error) {
	off, n := v.chunkRange(i)
	if v.size == 0 || !v.data.Overlaps(off, n) {
		return v.zeroMember(ctx, max(n, 0))
	}
	return v.compressChunk(ctx, off, n)
}

// member returns the compressed bytes of member i, compressing each member
// at most once at a time and keeping recent ones in a small LRU.
func (v *View) member(ctx context.Context, i int64) ([]byte, error) {
	off, n := v.chunkRange(i)
	if v.size == 0 || !v.data.Overlaps(off, n) {
		return v.zeroMember(ctx, max(n, 0))
	}
	v.cacheMu.Lock()
	if el, ok := v.cache[i]; ok {
		v.lru.MoveToFront(el)
		e := el.Value.(*cacheEntry)
		v.cacheMu.Unlock()
		select {
		case <-e.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if e.err == nil {
			return e.data, nil
		}
		// The owner failed (perhaps only its context was cancelled):
		// retry under our own context.
		v.cacheMu.Lock()
		if cur, ok := v.cache[i]; ok && cur == el {
			v.lru.Remove(el)
			delete(v.cache, i)
		}
		v.cacheMu.Unlock()
		return v.member(ctx, i)
	}
	e := &cacheEntry{idx: i, done: make(chan struct{})}
	v.cache[i] = v.lru.PushFront(e)
	v.evictLocked()
	v.cacheMu.Unlock()

	e.data, e.err = v.compressChunk(ctx, off, n)
	close(e.done)
	if e.err != nil {
		v.cacheMu.Lock()
		if el, ok := v.cache[i]; ok && el.Value.(*cacheEntry) == e {
			v.lru.Remove(el)
			delete(v.cache, i)
		}
		v.cacheMu.Unlock()
		return nil, e.err
	}
	return e.data, nil
}

// evictLocked drops the least recently used finished entries beyond the
// capacity; in-flight entries stay so waiters keep their deduplication.
func (v *View) evictLocked() {
	for el := v.lru.Back(); el != nil && v.lru.Len() > v.cacheCap; {
		prev := el.Prev()
		e := el.Value.(*cacheEntry)
		select {
		case <-e.done:
			v.lru.Remove(el)
			delete(v.cache, e.idx)
		default:
		}
		el = prev
	}
}

func (v *View) zeroMember(ctx context.Context, n int64) ([]byte, error) {
	v.zeroMu.Lock()
	defer v.zeroMu.Unlock()
	if m, ok := v.zeroMembers[n]; ok {
		return m, nil
	}
	m, err := v.compress(ctx, bytes.NewReader(make([]byte, n)))
	if err != nil {
		return nil, fmt.Errorf("compress zero run of %d bytes: %w", n, err)
	}
	v.zeroMembers[n] = m
	return m, nil
}

// readGap is the longest hole compressChunk reads through: extents closer
// than this are read with one call and the holes zeroed after, so a member
// of many small extents (4096 of them per MiB on a fragmented disk) costs a
// few reads, not one each. The block cache coalesces its fetches the same way.
const readGap = 64 << 10

// compressChunk reads only the data of the chunk from raw (long holes stay
// zero without a fetch) and compresses it as one gzip member.
func (v *View) compressChunk(ctx context.Context, off, n int64) ([]byte, error) {
	buf := make([]byte, n)
	for _, e := range v.data.Runs(off, n, readGap) {
		if err := v.raw.ReadAt(ctx, buf[e.Off-off:e.End()-off], e.Off); err != nil {
			return nil, fmt.Errorf("read raw [%d,+%d): %w", e.Off, e.Len, err)
		}
	}
	v.data.ZeroHoles(buf, off) // the map's holes are zeros, whatever raw said
	m, err := v.compress(ctx, bytes.NewReader(buf))
	if err != nil {
		return nil, fmt.Errorf("compress chunk at %d: %w", off, err)
	}
	return m, nil
}

func (v *View) compress(ctx context.Context, src io.Reader) ([]byte, error) {
	select {
	case v.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-v.sem }()
	var out bytes.Buffer
	zw, err := gzip.NewWriterLevel(&out, v.opts.Level)
	if err != nil {
		return nil, fmt.Errorf("gzip writer level %d: %w", v.opts.Level, err)
	}
	// Fixed header fields keep every member byte-for-byte reproducible.
	zw.ModTime = time.Unix(0, 0)
	zw.OS = 255
	if _, err := io.Copy(zw, src); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}
