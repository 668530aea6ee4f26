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
}

const defaultChunkSize = 4 << 20

// ErrOutOfRange reports a read outside [0, Size).
var ErrOutOfRange = errors.New("gzipview: read out of range")

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

	indexMu sync.Mutex
	offsets []int64 // offsets[i] = start of member i in the .gz; len = members+1

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
	v.indexMu.Lock()
	defer v.indexMu.Unlock()
	if v.offsets != nil {
		return v.offsets, nil
	}
	lengths := v.loadIndex()
	if lengths == nil {
		var err error
		lengths, err = v.buildIndex(ctx)
		if err != nil {
			return nil, err
		}
		v.saveIndex(lengths)
	}
	offs := make([]int64, len(lengths)+1)
	for i, n := range lengths {
		offs[i+1] = offs[i] + n
	}
	v.offsets = offs
	return offs, nil
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

// ReadAt fills p with the gzip stream at off. off+len(p) must not exceed Size.
func (v *View) ReadAt(ctx context.Context, p []byte, off int64) error {
	offs, err := v.index(ctx)
	if err != nil {
		return err
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
			return fmt.Errorf("read gzip member %d: compressed length %d, index says %d", i, len(m), offs[i+1]-offs[i])
		}
		lo := max(off, offs[i])
		hi := min(end, offs[i+1])
		copy(p[lo-off:hi-off], m[lo-offs[i]:hi-offs[i]])
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

// compressChunk reads only the data extents of the chunk from raw (holes
// stay zero without a fetch) and compresses it as one gzip member.
func (v *View) compressChunk(ctx context.Context, off, n int64) ([]byte, error) {
	buf := make([]byte, n)
	for _, e := range v.data.Clip(off, n) {
		if err := v.raw.ReadAt(ctx, buf[e.Off-off:e.End()-off], e.Off); err != nil {
			return nil, fmt.Errorf("read raw [%d,+%d): %w", e.Off, e.Len, err)
		}
	}
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
