package fs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/url"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/fs/gzipview"
	"github.com/vmexportfs/vmexportfs/fs/vhdview"
)

// Derived views are computed from the raw disk on demand. Each keeps one
// stream over the raw disk for its lifetime (the inode's), so its reads share
// the block cache and readahead with disk.img.

// lazyView builds an expensive view once, on first use, and retries after a
// failure (a backend outage must not stick to the inode).
type lazyView[V any] struct {
	mu    sync.Mutex
	v     V
	built bool
	s     stream
	build func(ctx context.Context, d *diskHandle) (V, stream, error)
	raw   *rawView
}

func (l *lazyView[V]) get(ctx context.Context) (V, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.built {
		return l.v, nil
	}
	var zero V
	d, err := l.raw.st.disk(ctx, l.raw.ref)
	if err != nil {
		return zero, err
	}
	v, s, err := l.build(ctx, d)
	if err != nil {
		return zero, err
	}
	l.v, l.s, l.built = v, s, true
	return v, nil
}

func (l *lazyView[V]) close(closeView func(V)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.built {
		return
	}
	if closeView != nil {
		closeView(l.v)
	}
	if l.s != nil {
		l.s.Close()
	}
	var zero V
	l.v, l.s, l.built = zero, nil, false
}

// gzipView is disk.img.gz: a multi-member gzip whose member index is kept in
// the cache directory, so only the first full stat of a snapshot compresses.
//
// An index that turns out stale (the data under an unchanged snapshot id
// changed: a member compresses to another length) is dropped and rebuilt
// once, which changes the file's size and bytes. Each open handle is pinned
// to the layout it was opened on and fails with EIO once that layout is
// gone, so no reader gets bytes of two layouts; the kernel's cached
// attributes and pages of the inode are invalidated when the layout is
// dropped and again when the rebuilt one is ready, so a fresh open or stat
// sees the new size.
type gzipView struct {
	lazy lazyView[*gzipview.View]
	// onChange is set once the file's inode exists (diskFile.OnAdd).
	onChange atomic.Pointer[func()]
}

func newGzipView(raw *rawView, cacheDir, name string) *gzipView {
	v := &gzipView{}
	v.lazy = lazyView[*gzipview.View]{raw: raw, build: func(ctx context.Context, d *diskHandle) (*gzipview.View, stream, error) {
		s := raw.st.open(cacheKey(raw.ref), d, d.Allocated())
		opts := gzipview.Options{Logger: raw.st.log, Name: name, OnLayoutChange: v.layoutChanged}
		if cacheDir != "" {
			sum := sha256.Sum256([]byte(cacheKey(raw.ref)))
			opts.IndexPath = filepath.Join(cacheDir, "gzip-"+hex.EncodeToString(sum[:16])+".idx")
		}
		return gzipview.New(s, d.Size(), d.Allocated(), opts), s, nil
	}}
	return v
}

func (v *gzipView) Size(ctx context.Context) (int64, error) {
	g, err := v.lazy.get(ctx)
	if err != nil {
		return 0, err
	}
	return g.Size(ctx)
}

func (v *gzipView) ReadAt(ctx context.Context, p []byte, off int64) error {
	g, err := v.lazy.get(ctx)
	if err != nil {
		return err
	}
	return g.ReadAt(ctx, p, off)
}

// Data is the whole file: compressed holes are bytes too.
func (v *gzipView) Data(ctx context.Context) (extent.Map, error) {
	size, err := v.Size(ctx)
	return extent.Full(size), err
}

func (v *gzipView) Close() { v.lazy.close((*gzipview.View).Close) }

// watchLayout makes fn run (and not block) whenever the layout changes.
func (v *gzipView) watchLayout(fn func()) { v.onChange.Store(&fn) }

func (v *gzipView) layoutChanged() {
	if fn := v.onChange.Load(); fn != nil {
		(*fn)()
	}
}

// OpenStream pins a handle to the current layout: its reads fail with
// gzipview.ErrLayoutChanged (EIO) once a stale index was dropped, because
// its opener sized the file by the old one.
func (v *gzipView) OpenStream(ctx context.Context) (stream, error) {
	g, err := v.lazy.get(ctx)
	if err != nil {
		return nil, err
	}
	return &gzipStream{g: g, gen: g.Generation()}, nil
}

type gzipStream struct {
	g   *gzipview.View
	gen uint64
}

func (s *gzipStream) ReadAt(ctx context.Context, p []byte, off int64) error {
	return s.g.ReadAtGeneration(ctx, s.gen, p, off)
}

// valid fails once the stream's layout is gone, before the read would size
// the file by (and so rebuild) the new one.
func (s *gzipStream) valid() error {
	if s.g.Generation() != s.gen {
		return fmt.Errorf("gzip: %w", gzipview.ErrLayoutChanged)
	}
	return nil
}

func (s *gzipStream) Close() {}

// vhdView is disk.vhd (dynamic) or delta-from-<base>.vhd (differencing). Its
// layout needs only the extent maps, so stat costs no data reads.
type vhdView struct {
	lazy lazyView[*vhdview.View]
}

// vhdID is the unique id of a snapshot disk's disk.vhd; a delta built on that
// snapshot names it as parent, which is what makes the chain open.
func vhdID(ref backend.DiskRef) [16]byte {
	return vhdview.ID("vmexportfs disk.vhd", ref.VM, ref.Snapshot, ref.Disk)
}

func newDynamicVHDView(raw *rawView) *vhdView {
	v := &vhdView{}
	v.lazy = lazyView[*vhdview.View]{raw: raw, build: func(ctx context.Context, d *diskHandle) (*vhdview.View, stream, error) {
		s := raw.st.open(cacheKey(raw.ref), d, d.Allocated())
		h, err := vhdview.NewDynamic(s, vhdview.Dynamic{Size: d.Size(), Data: d.Allocated(), ID: vhdID(raw.ref)})
		return h, s, err
	}}
	return v
}

// newDeltaVHDView holds the changes of raw's disk since base, the same disk
// in an older snapshot. parentName is the file name the user gives the
// base's disk.vhd beside it.
func newDeltaVHDView(raw *rawView, base backend.DiskRef, parentName string) *vhdView {
	v := &vhdView{}
	baseID := base.Snapshot
	v.lazy = lazyView[*vhdview.View]{raw: raw, build: func(ctx context.Context, _ *diskHandle) (*vhdview.View, stream, error) {
		// Reads go through the platform's opening against base where it
		// has one: the pair may hold resources of its own (a backup).
		d, changed, err := raw.deltaSource(ctx, base)
		if err != nil {
			return nil, nil, err
		}
		// The delta reads only changed data, in the 4 KiB units it marks, so
		// its stream fetches exactly those; the key keeps these blocks,
		// zero outside the changes, apart from disk.img's.
		marked, err := alignOut(changed, d.Size(), vhdview.ChangeUnit)
		if err != nil {
			return nil, nil, fmt.Errorf("delta map: %w", err)
		}
		s := raw.st.open(cacheKey(raw.ref)+"/changed-since/"+url.PathEscape(baseID), d, marked)
		h, err := vhdview.NewDifferencing(s, vhdview.Differencing{
			Size:       d.Size(),
			Changed:    changed,
			ID:         vhdview.ID("vmexportfs delta", raw.ref.VM, raw.ref.Snapshot, baseID, raw.ref.Disk),
			ParentID:   vhdID(base),
			ParentName: parentName,
			ParentPath: `.\` + parentName,
		})
		if err != nil {
			s.Close()
		}
		return h, s, err
	}}
	return v
}

func (v *vhdView) Size(ctx context.Context) (int64, error) {
	h, err := v.lazy.get(ctx)
	if err != nil {
		return 0, err
	}
	return h.Size(), nil
}

func (v *vhdView) ReadAt(ctx context.Context, p []byte, off int64) error {
	h, err := v.lazy.get(ctx)
	if err != nil {
		return err
	}
	if err := h.ReadAt(ctx, p, off); err != nil {
		return fmt.Errorf("vhd: %w", err)
	}
	return nil
}

// Data is the whole file: a VHD stores absent blocks by leaving them out,
// so the image itself has no holes.
func (v *vhdView) Data(ctx context.Context) (extent.Map, error) {
	size, err := v.Size(ctx)
	return extent.Full(size), err
}

func (v *vhdView) Close() { v.lazy.close(nil) }
