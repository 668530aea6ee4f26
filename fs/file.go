package fs

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// view is one file's content: the raw disk or a derived format. A new view
// is one constructor.
type view interface {
	Size(ctx context.Context) (int64, error)
	ReadAt(ctx context.Context, p []byte, off int64) error // off+len(p) <= size; fills p
	Data(ctx context.Context) (extent.Map, error)          // data extents of THIS file (lseek, st_blocks)
}

// streamOpener is implemented by views that keep per-handle read state.
type streamOpener interface {
	OpenStream(ctx context.Context) (stream, error)
}

// changeTracker is implemented by views whose bytes line up with the
// backend's change maps.
type changeTracker interface {
	ChangedSince(ctx context.Context, baseSnapshotID string) (extent.Map, error)
	TracksChanges(ctx context.Context) bool // cheap: no backend round trip
}

// rawView is disk.img: the snapshot disk as is.
type rawView struct {
	st  *state
	ref backend.DiskRef

	mu      sync.Mutex
	aligned *extent.Map
}

// dataAlign is the granularity data is reported at: tools such as qemu-img
// assume holes never split a sector, so byte-granular backend extents are
// widened (reporting zeros as data is always safe).
const dataAlign = 4096

func (v *rawView) Size(ctx context.Context) (int64, error) {
	d, err := v.st.disk(ctx, v.ref)
	if err != nil {
		return 0, err
	}
	return d.Size(), nil
}

func (v *rawView) Data(ctx context.Context) (extent.Map, error) {
	d, err := v.st.disk(ctx, v.ref)
	if err != nil {
		return extent.Map{}, err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.aligned == nil {
		m, err := alignOut(d.Allocated(), d.Size(), dataAlign)
		if err != nil {
			return extent.Map{}, fmt.Errorf("data map: %w", err)
		}
		v.aligned = &m
	}
	return *v.aligned, nil
}

// alignOut widens every extent to multiples of align, within size.
func alignOut(m extent.Map, size, align int64) (extent.Map, error) {
	exts := make([]extent.Extent, 0, m.Len())
	for _, e := range m.Extents() {
		off := e.Off / align * align
		end := min((e.End()+align-1)/align*align, size)
		exts = append(exts, extent.Extent{Off: off, Len: end - off})
	}
	return extent.Normalize(exts, size)
}

func (v *rawView) ReadAt(ctx context.Context, p []byte, off int64) error {
	s, err := v.OpenStream(ctx)
	if err != nil {
		return err
	}
	defer s.Close()
	return s.ReadAt(ctx, p, off)
}

func (v *rawView) OpenStream(ctx context.Context) (stream, error) {
	d, err := v.st.disk(ctx, v.ref)
	if err != nil {
		return nil, err
	}
	return v.st.open(cacheKey(v.ref), d, d.Allocated()), nil
}

func (v *rawView) TracksChanges(context.Context) bool {
	_, ok := v.st.src.(backend.DeltaOpener)
	return ok
}

func (v *rawView) ChangedSince(ctx context.Context, base string) (extent.Map, error) {
	b, err := v.st.baseRef(ctx, v.ref, base)
	if err != nil {
		return extent.Map{}, err
	}
	h, err := v.st.delta(ctx, v.ref, b)
	if err != nil {
		return extent.Map{}, err
	}
	return h.changed, nil
}

// deltaSource is what a delta from base reads and must hold: the platform's
// opening against base and its changed extents where it can compare the two,
// else the disk itself and every extent written in either snapshot (where
// both are holes they agree; anywhere else they may not), a larger delta but
// a correct one.
func (v *rawView) deltaSource(ctx context.Context, base backend.DiskRef) (*diskHandle, extent.Map, error) {
	h, err := v.st.delta(ctx, v.ref, base)
	if err == nil {
		return h, h.changed, nil
	}
	if !errors.Is(err, backend.ErrUnsupported) {
		return nil, extent.Map{}, err
	}
	d, err := v.st.disk(ctx, v.ref)
	if err != nil {
		return nil, extent.Map{}, err
	}
	b, err := v.st.disk(ctx, base)
	if err != nil {
		return nil, extent.Map{}, fmt.Errorf("delta from %s: %w", base.Snapshot, err)
	}
	m, err := extent.Normalize(d.Allocated().Union(b.Allocated()).Clip(0, d.Size()), d.Size())
	if err != nil {
		return nil, extent.Map{}, fmt.Errorf("delta from %s: %w", base.Snapshot, err)
	}
	return d, m, nil
}

// baseRef is the disk of snapshot base that is ref's disk at an older time:
// the one of the same identity. A base the listing does not show keeps ref's
// disk id, for the platform to judge.
func (st *state) baseRef(ctx context.Context, ref backend.DiskRef, base string) (backend.DiskRef, error) {
	out := backend.DiskRef{VM: ref.VM, Snapshot: base, Disk: ref.Disk}
	l, err := st.listSnapshots(ctx, ref.VM)
	if err != nil {
		return out, err
	}
	cur, old := l.byID[ref.Snapshot], l.byID[base]
	if cur == nil || old == nil {
		return out, nil
	}
	for _, d := range cur.snap.Disks {
		if d.ID != ref.Disk {
			continue
		}
		for _, b := range old.snap.Disks {
			if b.Identity() == d.Identity() {
				out.Disk = b.ID
				return out, nil
			}
		}
		return out, fmt.Errorf("snapshot %s has no disk %s: %w", base, d.Identity(), backend.ErrNotFound)
	}
	return out, nil
}

// diskFile is a read-only file over a view.
type diskFile struct {
	gofs.Inode
	st   *state
	vm   string
	e    *snapEntry
	ref  backend.DiskRef
	path string
	v    view
	// timeout is how long the kernel may keep the entry and attributes:
	// immutableTimeout, except for a file that exists only while another
	// snapshot does (a delta, gone with its base), which is kept no longer
	// than a listing.
	timeout time.Duration
	meter   atomic.Pointer[diskMeter]  // made on first use: a disk only looked up is not in the stats
	seeks   atomic.Pointer[extent.Map] // seekMap's, made on first use unless the layout can change
}

// minSeekHole is the shortest hole lseek reports between two extents; a
// shorter one is reported as data, and read as zeros (never fetched) by
// whoever reads it. cp, tar and qemu-img ask SEEK_DATA and SEEK_HOLE of
// every hole, two round trips through /dev/fuse (20-30 µs each here, idle),
// while reading a hole of this length costs about as much: a disk of 4 KiB
// extents 4 KiB apart took 2,000,000 round trips, a minute on their own.
// cp --sparse and qemu-img convert find the zeros and leave the copy as
// sparse; st_blocks and the user.vmexport maps stay exact. Like ZFS, which
// reports holes by 128 KiB record.
const minSeekHole = 64 << 10

// seekMap is the map SEEK_DATA and SEEK_HOLE answer from, and which the
// page cache filler follows: what a reader that seeks is told to read.
func (f *diskFile) seekMap(ctx context.Context) (extent.Map, error) {
	if m := f.seeks.Load(); m != nil {
		return *m, nil
	}
	data, err := f.v.Data(ctx)
	if err != nil {
		return extent.Map{}, err
	}
	m := data.WithoutHolesUnder(minSeekHole)
	if _, changes := f.v.(layoutWatcher); !changes {
		f.seeks.Store(&m)
	}
	return m, nil
}

// counters are the disk's meter, shared by its files.
func (f *diskFile) counters() *diskMeter {
	if m := f.meter.Load(); m != nil {
		return m
	}
	m := f.st.meters.disk(f.ref)
	f.meter.Store(m)
	return m
}

var (
	_ gofs.NodeOpener      = (*diskFile)(nil)
	_ gofs.NodeReader      = (*diskFile)(nil)
	_ gofs.NodeLseeker     = (*diskFile)(nil)
	_ gofs.NodeGetattrer   = (*diskFile)(nil)
	_ gofs.NodeSetattrer   = (*diskFile)(nil)
	_ gofs.NodeGetxattrer  = (*diskFile)(nil)
	_ gofs.NodeListxattrer = (*diskFile)(nil)
	_ gofs.NodeStatfser    = (*diskFile)(nil)
	_ gofs.NodeReleaser    = (*diskFile)(nil)
	_ gofs.NodeOnForgetter = (*diskFile)(nil)
	_ gofs.NodeOnAdder     = (*diskFile)(nil)
)

// layoutWatcher is implemented by views whose size and bytes can change
// while the inode lives (disk.img.gz after a stale index is dropped).
type layoutWatcher interface {
	watchLayout(fn func())
}

// OnAdd runs once the file has an inode: from then on a layout change
// invalidates what the kernel caches of it.
func (f *diskFile) OnAdd(ctx context.Context) {
	if w, ok := f.v.(layoutWatcher); ok {
		w.watchLayout(f.invalidateKernelCache)
	}
}

// invalidateKernelCache drops the kernel's cached attributes and pages of the
// file, so the next stat asks again and no page of an old layout is served.
// It notifies from a goroutine: the change is found inside a READ whose pages
// the kernel keeps locked until we answer, and invalidating them from there
// would deadlock.
func (f *diskFile) invalidateKernelCache() {
	go func() {
		if errno := f.NotifyContent(0, 0); errno != 0 && errno != syscall.ENOENT {
			f.st.log.Debug("fs: cannot invalidate kernel cache", "path", f.path, "errno", errno.Error())
		}
	}()
}

// OnForget drops what a derived view keeps (its raw stream, read-ahead).
func (f *diskFile) OnForget() {
	if c, ok := f.v.(interface{ Close() }); ok {
		c.Close()
	}
}

func (f *diskFile) fillAttr(ctx context.Context, a *fuse.Attr) syscall.Errno {
	f.st.inflight.Add(1)
	defer f.st.inflight.Add(-1)
	size, err := f.v.Size(ctx)
	if err != nil {
		return f.st.toErrno(ctx, "stat", f.path, err)
	}
	data, err := f.v.Data(ctx)
	if err != nil {
		return f.st.toErrno(ctx, "stat", f.path, err)
	}
	a.Mode = syscall.S_IFREG | 0o444
	a.Size = uint64(size)
	a.Nlink = 1
	// go-fuse keeps Blocks only when Blksize is set; tar -S skips a file
	// with 0 blocks, so any data means at least one.
	blocks := (data.Bytes() + 511) / 512
	if blocks == 0 && data.Bytes() > 0 {
		blocks = 1
	}
	a.Blocks = uint64(blocks)
	f.st.fillOwner(a, f.e.mtime)
	return 0
}

func (f *diskFile) Getattr(ctx context.Context, fh gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.SetTimeout(f.timeout)
	return f.fillAttr(ctx, &out.Attr)
}

func (f *diskFile) Setattr(context.Context, gofs.FileHandle, *fuse.SetAttrIn, *fuse.AttrOut) syscall.Errno {
	return syscall.EROFS
}
func (f *diskFile) Setxattr(context.Context, string, []byte, uint32) syscall.Errno {
	return syscall.EROFS
}
func (f *diskFile) Removexattr(context.Context, string) syscall.Errno { return syscall.EROFS }

func (f *diskFile) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	return statfs(out)
}

// handle is one open of a disk file.
type handle struct {
	s    stream      // nil for views without per-handle state
	fill *pageFiller // disk.img only
}

// stream is the handle's stream; nil for a nil handle or a view without one.
func (h *handle) stream() stream {
	if h == nil {
		return nil
	}
	return h.s
}

const writeFlags = syscall.O_WRONLY | syscall.O_RDWR | syscall.O_TRUNC | syscall.O_APPEND

func (f *diskFile) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	if flags&writeFlags != 0 {
		return nil, 0, syscall.EROFS
	}
	h := &handle{}
	if so, ok := f.v.(streamOpener); ok {
		s, err := so.OpenStream(ctx)
		if err != nil {
			return nil, 0, f.st.toErrno(ctx, "open", f.path, err)
		}
		h.s = s
		if rv, ok := f.v.(*rawView); ok {
			data, err := f.seekMap(ctx)
			var size int64
			if err == nil {
				size, err = rv.Size(ctx)
			}
			if err != nil {
				s.Close()
				return nil, 0, f.st.toErrno(ctx, "open", f.path, err)
			}
			h.fill = newPageFiller(f.st.bg, f, rv.OpenStream, data, size, &f.counters().pageCacheBytes, f.st.log)
		}
	}
	f.st.openFiles.Add(1)
	return h, fuse.FOPEN_KEEP_CACHE, 0
}

func (f *diskFile) Release(ctx context.Context, fh gofs.FileHandle) syscall.Errno {
	if h, ok := fh.(*handle); ok {
		f.st.openFiles.Add(-1)
		if h.fill != nil {
			h.fill.stop()
		}
		if h.s != nil {
			h.s.Close()
		}
	}
	return 0
}

func (f *diskFile) Read(ctx context.Context, fh gofs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	f.st.inflight.Add(1)
	defer f.st.inflight.Add(-1)
	f.counters().readRequests.Add(1)
	h, _ := fh.(*handle)
	if s, ok := h.stream().(interface{ valid() error }); ok {
		if err := s.valid(); err != nil {
			return nil, f.st.toErrno(ctx, "read", f.path, err)
		}
	}
	size, err := f.v.Size(ctx)
	if err != nil {
		return nil, f.st.toErrno(ctx, "read", f.path, err)
	}
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if off >= size {
		return fuse.ReadResultData(nil), 0
	}
	// A short read before EOF would shrink the kernel's idea of the file:
	// the whole range or an error.
	n := min(int64(len(dest)), size-off)
	var res fuse.ReadResult
	if ps, ok := h.stream().(pinningStream); ok {
		pinned, e := ps.ReadPinned(ctx, off, n)
		res, err = pinnedResult{pinned, int(n)}, e
	} else {
		p := dest[:n]
		if s := h.stream(); s != nil {
			err = s.ReadAt(ctx, p, off)
		} else {
			err = f.v.ReadAt(ctx, p, off)
		}
		res = fuse.ReadResultData(p)
	}
	if err != nil {
		return nil, f.st.toErrno(ctx, "read", f.path, err)
	}
	if h != nil && h.fill != nil {
		h.fill.read(off + n)
	}
	return res, 0
}

const (
	seekData = 3
	seekHole = 4
)

func (f *diskFile) Lseek(ctx context.Context, fh gofs.FileHandle, off uint64, whence uint32) (uint64, syscall.Errno) {
	if whence != seekData && whence != seekHole {
		return 0, syscall.EINVAL
	}
	size, err := f.v.Size(ctx)
	if err != nil {
		return 0, f.st.toErrno(ctx, "lseek", f.path, err)
	}
	if off >= uint64(size) {
		return 0, syscall.ENXIO
	}
	data, err := f.seekMap(ctx)
	if err != nil {
		return 0, f.st.toErrno(ctx, "lseek", f.path, err)
	}
	var to int64
	if whence == seekData {
		next, ok := data.SeekData(int64(off))
		if !ok {
			return 0, syscall.ENXIO
		}
		to = next
	} else {
		to = data.SeekHole(int64(off), size)
	}
	if h, ok := fh.(*handle); ok && h.fill != nil {
		h.fill.sought(to)
	}
	return uint64(to), 0
}
