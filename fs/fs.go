// Package fs is the FUSE tree of vmexportfs: VMs, their snapshots and each
// snapshot disk as a sparse read-only file. It knows nothing of platforms; it
// uses backend.Source, the optional capability interfaces, the block cache and
// the views.
package fs

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"golang.org/x/sync/singleflight"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/meter"
	"github.com/vmexportfs/vmexportfs/cache"
	"github.com/vmexportfs/vmexportfs/fs/statedir"
)

// Options configure the tree.
type Options struct {
	Cache    *cache.Cache // nil reads straight from the backend (tests)
	StateDir string       // snapshot names given by mkdir; "" keeps them in memory
	CacheDir string       // for derived-view indexes; created 0700
	ListTTL  time.Duration
	Logger   *slog.Logger
	// DiskIdle is how long an unused disk stays open (DefaultDiskIdle);
	// MaxIdleDisks how many unused ones may (DefaultMaxIdleDisks).
	DiskIdle     time.Duration
	MaxIdleDisks int
	// Meter is the platform's, for the stats document; nil shows none.
	Meter *meter.Meter
	// ProgressInterval is how often a snapshot still being made is logged
	// (DefaultProgressInterval).
	ProgressInterval time.Duration
}

// DefaultProgressInterval is how often a long mkdir says how it is doing.
const DefaultProgressInterval = 15 * time.Second

// DefaultListTTL is how long a VM or snapshot listing is reused.
const DefaultListTTL = 5 * time.Second

// Root is the root directory node; pass it to Mount.
type Root struct {
	dirNode
}

// state is what every node shares.
type state struct {
	src      backend.Source
	cacheDir string // derived-view indexes; "" = keep none
	open     readerOpener
	cache    *cache.Cache // nil: none (tests)
	meter    *meter.Meter // the platform's counters, nil: none
	started  time.Time    // for the stats' uptime
	store    *statedir.Store
	log      *slog.Logger
	ttl      time.Duration
	uid, gid uint32
	epoch    time.Time

	vms cachedList[*vmListing]

	// openFiles counts open file handles, inflight the file operations
	// running (reads, stats): what a shutdown would cut short.
	openFiles, inflight atomic.Int64

	pool *diskPool

	mu    sync.Mutex
	snaps map[string]*cachedList[*snapListing]
	// snapDirs is each VM's snapshots/ node, to drop kernel entries of
	// snapshots a listing lost.
	snapDirs map[string]*snapshotsDir
	// gone holds vm+"\x00"+id of snapshots deleted (rmdir) or lost from a
	// listing: a delta from one is ENOENT even by direct id lookup, and
	// handles opened against it are forgotten.
	gone map[string]bool
	// handles are by VM, so a VM forgotten (recent) drops its own.
	handles map[string]map[diskKey]*diskHandle
	warned  map[string]bool
	recent  *recentVMs
	vmsDir  *vmsDir // to make the kernel forget VMs recent pushed out

	meters    meters
	creations *creations
	walk      *walkAhead
	// bg is the tree's own context, for work nobody waits for (listing
	// ahead of a walk); Close cancels it.
	bg        context.Context
	cancelBg  context.CancelFunc
	closed    chan struct{} // closed by Root.Close
	closeOnce sync.Once

	statsMu  sync.Mutex
	statsDoc []byte
	statsAt  time.Time
}

// NewRoot builds the tree over src.
func NewRoot(src backend.Source, opts Options) (*Root, error) {
	if src == nil {
		return nil, errors.New("fs new root: nil source")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ttl := opts.ListTTL
	if ttl <= 0 {
		ttl = DefaultListTTL
	}
	if opts.CacheDir != "" {
		if err := os.MkdirAll(opts.CacheDir, 0o700); err != nil {
			return nil, fmt.Errorf("fs new root: cache dir: %w", err)
		}
	}
	store, err := statedir.Open(opts.StateDir, log)
	if err != nil {
		return nil, fmt.Errorf("fs new root: %w", err)
	}
	st := &state{
		src:      src,
		cacheDir: opts.CacheDir,
		open:     cacheOpener(opts.Cache),
		cache:    opts.Cache,
		meter:    opts.Meter,
		started:  time.Now(),
		closed:   make(chan struct{}),
		store:    store,
		log:      log,
		ttl:      ttl,
		uid:      uint32(os.Getuid()),
		gid:      uint32(os.Getgid()),
		epoch:    time.Unix(0, 0),
		snaps:    map[string]*cachedList[*snapListing]{},
		snapDirs: map[string]*snapshotsDir{},
		gone:     map[string]bool{},
		handles:  map[string]map[diskKey]*diskHandle{},
		warned:   map[string]bool{},
		recent:   newRecentVMs(maxRecentVMs),
	}
	st.pool = newDiskPool(src, opts.DiskIdle, opts.MaxIdleDisks, log.Warn)
	every := opts.ProgressInterval
	if every <= 0 {
		every = DefaultProgressInterval
	}
	st.creations = &creations{every: every, done: st.closed, log: log.Info}
	st.bg, st.cancelBg = context.WithCancel(context.Background())
	st.walk = newWalkAhead(st)
	return &Root{dirNode{st: st, mode: 0o555}}, nil
}

// Close closes every disk the tree has open; call it once the filesystem is
// unmounted, before closing the source.
func (r *Root) Close() {
	r.st.closeOnce.Do(func() { close(r.st.closed); r.st.cancelBg() })
	r.st.pool.close()
	_ = r.st.store.Close() // logs what it could not write
}

// OpenDisks is how many backend disks the tree has open now.
func (r *Root) OpenDisks() int { return r.st.pool.count() }

// Activity reports the file handles open on the tree (in any mount
// namespace) and the file operations (reads, stats) running now.
func (r *Root) Activity() (openFiles, inflight int64) {
	return r.st.openFiles.Load(), r.st.inflight.Load()
}

// OnAdd builds the static top of the tree.
func (r *Root) OnAdd(ctx context.Context) {
	r.st.vmsDir = &vmsDir{dirNode{st: r.st, mode: 0o555}}
	vms := r.NewPersistentInode(ctx, r.st.vmsDir, gofs.StableAttr{Mode: syscall.S_IFDIR})
	r.AddChild("vms", vms, false)
	byName := r.NewPersistentInode(ctx, &byNameDir{dirNode{st: r.st, mode: 0o555}}, gofs.StableAttr{Mode: syscall.S_IFDIR})
	r.AddChild("by-name", byName, false)
}

// warnOnce logs a skipped hostile or duplicate name once per mount.
func (st *state) warnOnce(key, msg string, args ...any) {
	st.mu.Lock()
	seen := st.warned[key]
	st.warned[key] = true
	st.mu.Unlock()
	if !seen {
		st.log.Warn(msg, args...)
	}
}

// nameProblem says why a backend-supplied name cannot be a path component,
// or "" when it can.
func nameProblem(name string) string {
	switch {
	case name == "":
		return "empty"
	case name == "." || name == "..":
		return "dot name"
	case strings.ContainsRune(name, '/'):
		return "contains /"
	case strings.ContainsRune(name, 0):
		return "contains NUL"
	case len(name) > 255:
		return "longer than 255 bytes"
	}
	return ""
}

// quoteShort quotes a hostile name for logs without flooding them.
func quoteShort(s string) string {
	if len(s) > 64 {
		return fmt.Sprintf("%q...(%d bytes)", s[:64], len(s))
	}
	return fmt.Sprintf("%q", s)
}

// toErrno maps a backend error to an errno, logging the ones a user will
// want explained.
func (st *state) toErrno(ctx context.Context, op, path string, err error) syscall.Errno {
	var errno syscall.Errno
	switch {
	case err == nil:
		return 0
	case ctx.Err() != nil:
		// The kernel gave up on the request (the reader was
		// interrupted); a deadline inside the backend is a fault, not this.
		return syscall.EINTR
	case errors.Is(err, backend.ErrNotFound):
		return syscall.ENOENT
	case errors.Is(err, backend.ErrPermission):
		errno = syscall.EACCES
	case errors.Is(err, backend.ErrInvalid):
		errno = syscall.EINVAL
		if !userAction(op) {
			return errno
		}
	case errors.Is(err, backend.ErrExists):
		return syscall.EEXIST
	case errors.Is(err, backend.ErrUnsupported):
		errno = syscall.ENOTSUP
		if !userAction(op) {
			return errno
		}
	case errors.Is(err, backend.ErrUnavailable):
		// Checked before any errno inside: a reset or refused connection
		// to the platform is a backend fault (EIO), not ours to pass on.
		errno = syscall.EIO
	case errors.As(err, &errno):
		return errno
	default:
		errno = syscall.EIO
	}
	st.meters.errno(errno)
	st.log.Error("fs: "+op+" failed", "path", path, "err", err, "errno", errno.Error())
	return errno
}

// userAction reports the operations whose refusal by the platform is worth a
// log line with its reason (mkdir, rmdir): a user asked for a change.
func userAction(op string) bool { return op == "mkdir" || op == "rmdir" }

// MaxDiskSize is the largest disk served (64 PiB): larger sizes come from a
// confused or hostile backend, and would overflow offsets and indexes.
const MaxDiskSize = 1 << 56

// stableAttr gives a node an inode number derived from what it shows (ids,
// never shown names, which can be reused for another snapshot). A path walk
// that looks a name up again, e.g. after a short listing timeout expired
// during a long stat, then gets the same inode back: cp and tar treat a
// changed inode number as a file replaced under them.
func stableAttr(mode uint32, parts ...string) gofs.StableAttr {
	h := fnv.New64a()
	for _, p := range parts {
		h.Write([]byte(p))
		h.Write([]byte{0})
	}
	// Below 2^63, where go-fuse numbers automatically (and its poll hack
	// lives at ^0), and clear of 0 and the root's 1.
	return gofs.StableAttr{Mode: mode, Ino: max(h.Sum64()&(1<<63-1), 2)}
}

// cacheKey names a disk in the block cache; each part is escaped so no two
// refs share a key.
func cacheKey(ref backend.DiskRef) string {
	return url.PathEscape(ref.VM) + "/" + url.PathEscape(ref.Snapshot) + "/" + url.PathEscape(ref.Disk)
}

// diskHandle is what the tree knows of a disk, open or not: its immutable
// size and maps, and reads that borrow the pooled disk while they run.
type diskHandle struct {
	pool    *diskPool
	meters  *meters
	key     diskKey
	size    int64
	alloc   extent.Map
	changed extent.Map // of a delta opening

	meterOnce sync.Once
	counted   *diskMeter

	// multipleRanges is what the disk said when last opened: whether one
	// request fills pieces far apart (backend.RangesReader).
	multipleRanges atomic.Bool
}

func (h *diskHandle) Size() int64           { return h.size }
func (h *diskHandle) Allocated() extent.Map { return h.alloc }

func (h *diskHandle) ReadAt(ctx context.Context, p []byte, off int64) error {
	return h.ReadVecAt(ctx, [][]byte{p}, off)
}

// ReadVecAt is ReadAt into bufs laid end to end from off, in one request
// where the disk can (backend.VecReader): the cache's multi-block fetches.
func (h *diskHandle) ReadVecAt(ctx context.Context, bufs [][]byte, off int64) error {
	return h.borrow(ctx, backend.VecLen(bufs), func(d backend.Disk) error {
		return backend.ReadVec(ctx, d, bufs, off)
	})
}

// MultipleRanges reports what the disk said when last opened; false before
// it was ever opened, so a first fetch is planned as for any disk.
func (h *diskHandle) MultipleRanges() bool { return h.multipleRanges.Load() }

// ReadRanges fills pieces far apart with one request where the disk can
// (backend.RangesReader): a fetch of a fragmented disk's blocks that
// carries only its extents.
func (h *diskHandle) ReadRanges(ctx context.Context, pieces []backend.Piece) error {
	var n int64
	for _, p := range pieces {
		n += int64(len(p.Buf))
	}
	return h.borrow(ctx, n, func(d backend.Disk) error {
		return backend.ReadRanges(ctx, d, pieces)
	})
}

// borrow runs read, which fetches n bytes, on the pooled disk, and meters
// it.
func (h *diskHandle) borrow(ctx context.Context, n int64, read func(backend.Disk) error) error {
	o, err := h.pool.acquire(ctx, h.key)
	if err != nil {
		return err
	}
	defer h.pool.release(h.key, o)
	if o.disk.Size() != h.size {
		return fmt.Errorf("read: %w: disk reopened with size %d, was %d", backend.ErrUnavailable, o.disk.Size(), h.size)
	}
	m := h.meter()
	m.fetches.Add(1)
	err = read(o.disk)
	h.multipleRanges.Store(backend.MultipleRanges(o.disk))
	if err != nil {
		if ctx.Err() == nil {
			m.fetchErrors.Add(1)
		}
		return err
	}
	m.fetchedBytes.Add(n)
	return nil
}

// meter is the disk's counters, made when it is first read: the stats list
// the disks read, not every disk a walk of the tree looked at.
func (h *diskHandle) meter() *diskMeter {
	h.meterOnce.Do(func() { h.counted = h.meters.disk(h.key.ref) })
	return h.counted
}

// disk returns the handle of ref, opening the disk the first time.
func (st *state) disk(ctx context.Context, ref backend.DiskRef) (*diskHandle, error) {
	return st.handle(ctx, diskKey{ref: ref})
}

// delta returns the handle of ref opened against base: its changed map and
// reads through that opening. It wraps ErrUnsupported when the platform
// cannot compare the two.
func (st *state) delta(ctx context.Context, ref, base backend.DiskRef) (*diskHandle, error) {
	if _, ok := st.src.(backend.DeltaOpener); !ok {
		return nil, fmt.Errorf("changes since %s: %w", base.Snapshot, backend.ErrUnsupported)
	}
	return st.handle(ctx, diskKey{ref: ref, base: base})
}

func (st *state) handle(ctx context.Context, k diskKey) (*diskHandle, error) {
	st.mu.Lock()
	h := st.handles[k.ref.VM][k]
	st.mu.Unlock()
	if h != nil {
		return h, nil
	}
	// Only a handle made counts as a use: every read asks for its handle,
	// and a VM pushed out while read makes a new one at its next read.
	st.useVM(k.ref.VM)
	o, err := st.pool.acquire(ctx, k)
	if err != nil {
		return nil, err
	}
	defer st.pool.release(k, o)
	ref := k.ref
	if size := o.disk.Size(); size < 0 || size > MaxDiskSize {
		st.warnOnce("disk-size:"+cacheKey(ref), "fs: refusing disk with implausible size", "vm", ref.VM, "snapshot", ref.Snapshot, "disk", quoteShort(ref.Disk), "size", size)
		return nil, fmt.Errorf("open disk: %w: size %d is not plausible (0 to %d bytes)", backend.ErrInvalid, size, int64(MaxDiskSize))
	}
	h = &diskHandle{pool: st.pool, meters: &st.meters, key: k, size: o.disk.Size(), alloc: o.disk.Allocated(), changed: o.changed}
	st.mu.Lock()
	defer st.mu.Unlock()
	if prev := st.handles[k.ref.VM][k]; prev != nil {
		return prev, nil
	}
	if st.handles[k.ref.VM] == nil {
		st.handles[k.ref.VM] = map[diskKey]*diskHandle{}
	}
	st.handles[k.ref.VM][k] = h
	return h, nil
}

// cachedList is a listing reused for a TTL; concurrent callers share one
// fetch. Errors are not remembered, so the next call retries.
type cachedList[T any] struct {
	mu    sync.Mutex
	val   T
	at    time.Time
	took  time.Duration // how long the last fetch took
	valid bool
	fetch singleflight.Group
}

func (c *cachedList[T]) get(ctx context.Context, ttl time.Duration, fetch func(context.Context) (T, error)) (T, error) {
	c.mu.Lock()
	if c.valid && time.Since(c.at) < ttl {
		v := c.val
		c.mu.Unlock()
		return v, nil
	}
	c.mu.Unlock()
	return c.refresh(ctx, fetch)
}

// getKnown is get for a lookup that the listing answers when known says
// so: a listing that knows it answers at once even when expired, and is
// then refreshed in the background. A walk of a large estate (100,000 VMs
// in a listing of tens of MB) then never waits for the whole listing again,
// while a lookup the last listing cannot answer waits for a fresh one, so
// what just appeared is found.
func (c *cachedList[T]) getKnown(ctx context.Context, ttl time.Duration, fetch func(context.Context) (T, error), known func(T) bool) (T, error) {
	c.mu.Lock()
	// A listing that takes long to fetch is refreshed behind lookups at
	// most every refreshSpacing fetches' time, so that its refreshes (each
	// one a second of CPU and two listings in memory at 100,000 VMs) cost
	// a walk little.
	v, ok, expired := c.val, c.valid && known(c.val), time.Since(c.at) >= max(ttl, refreshSpacing*c.took)
	c.mu.Unlock()
	if !ok {
		return c.get(ctx, ttl, fetch)
	}
	if expired {
		c.fetch.DoChan("", func() (any, error) { return c.fill(context.WithoutCancel(ctx), fetch) })
	}
	return v, nil
}

// refreshSpacing is how many fetches' time an answering listing is kept
// before a background refresh (getKnown).
const refreshSpacing = 30

// refresh fetches the listing, shared by concurrent callers.
func (c *cachedList[T]) refresh(ctx context.Context, fetch func(context.Context) (T, error)) (T, error) {
	done := c.fetch.DoChan("", func() (any, error) {
		// Detached so one interrupted caller does not fail the others.
		return c.fill(context.WithoutCancel(ctx), fetch)
	})
	var zero T
	select {
	case r := <-done:
		if r.Err != nil {
			return zero, r.Err
		}
		return r.Val.(T), nil
	case <-ctx.Done():
		return zero, ctx.Err()
	}
}

// fill fetches the listing and keeps it.
func (c *cachedList[T]) fill(ctx context.Context, fetch func(context.Context) (T, error)) (T, error) {
	start := time.Now()
	v, err := fetch(ctx)
	if err == nil {
		c.mu.Lock()
		c.val, c.at, c.valid, c.took = v, time.Now(), true, time.Since(start)
		c.mu.Unlock()
	}
	return v, err
}

// forgetSnapshot records that snapshot id of vm is gone and drops the
// handles opened of it or against it, so no cached delta outlives its base.
func (st *state) forgetSnapshot(vm, id string) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.gone[vm+"\x00"+id] = true
	for k := range st.handles[vm] {
		if k.ref.Snapshot == id || k.base.Snapshot == id {
			delete(st.handles[vm], k)
		}
	}
}

// isGone reports a snapshot forgetSnapshot was told about.
func (st *state) isGone(vm, id string) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.gone[vm+"\x00"+id]
}

// last is the most recent listing fetched, expired or not.
func (c *cachedList[T]) last() (T, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.val, c.at != time.Time{}
}

func (c *cachedList[T]) invalidate() {
	c.mu.Lock()
	c.valid = false
	c.mu.Unlock()
}
