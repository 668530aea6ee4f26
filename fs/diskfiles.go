package fs

import (
	"context"
	"path"
	"strings"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/fs/vhdview"
)

// gzipMaxSize bounds disk.img.gz to disks whose member index (8 bytes per
// 4 MiB) stays small: 16 TiB gives 32 MiB.
const gzipMaxSize = 16 << 40

const (
	gzipFileName = "disk.img.gz"
	vhdFileName  = "disk.vhd"
	deltaPrefix  = "delta-from-"
	deltaSuffix  = ".vhd"
)

// diskFiles are the files of one snapshot disk: in the snapshot directory
// when the VM has one disk, else in the disk's own directory.
type diskFiles struct {
	st    *state
	vm    string
	e     *snapEntry
	disk  diskEntry
	dir   string // the directory's path, for logs
	multi bool   // several disks: a delta's parent name carries the disk's name
}

func (d *diskFiles) raw() *rawView {
	return &rawView{st: d.st, ref: backend.DiskRef{VM: d.vm, Snapshot: d.e.snap.ID, Disk: d.disk.info.ID}}
}

// vhdPossible answers whether VHDs of the disk exist: ENOENT when the disk
// is too large for the format, the backend's errno when the disk cannot be
// opened to tell.
func (d *diskFiles) vhdPossible(ctx context.Context, raw *rawView) syscall.Errno {
	disk, err := d.st.disk(ctx, raw.ref)
	if err != nil {
		return d.st.toErrno(ctx, "lookup", d.dir, err)
	}
	if disk.Size() > vhdview.MaxSize {
		return syscall.ENOENT
	}
	return 0
}

func (d *diskFiles) names(ctx context.Context) ([]string, error) {
	names := []string{diskFileName}
	disk, err := d.st.disk(ctx, d.raw().ref)
	if err != nil {
		return nil, err
	}
	if disk.Size() <= gzipMaxSize {
		names = append(names, gzipFileName)
	}
	if disk.Size() > vhdview.MaxSize {
		return names, nil
	}
	names = append(names, vhdFileName)
	bases, err := d.bases(ctx)
	if err != nil {
		return nil, err
	}
	for _, b := range bases {
		names = append(names, deltaPrefix+b.name+deltaSuffix)
	}
	return names, nil
}

// bases are the shown snapshots older than this one that hold the same disk
// (the same identity: the id may differ between snapshots).
func (d *diskFiles) bases(ctx context.Context) ([]*snapEntry, error) {
	l, err := d.st.listSnapshots(ctx, d.vm)
	if err != nil {
		return nil, err
	}
	var out []*snapEntry
	for _, e := range l.entries {
		if e.snap.ID == d.e.snap.ID {
			return out, nil
		}
		if e.snap.Pending != "" {
			continue
		}
		for _, info := range e.snap.Disks {
			if info.Identity() == d.disk.info.Identity() {
				out = append(out, e)
				break
			}
		}
	}
	return nil, nil // not listed any more: no bases to offer
}

func (d *diskFiles) readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	names, err := d.names(ctx)
	if err != nil {
		return nil, d.st.toErrno(ctx, "readdir", d.dir, err)
	}
	es := make([]fuse.DirEntry, 0, len(names))
	for _, n := range names {
		es = append(es, fuse.DirEntry{Name: n, Mode: syscall.S_IFREG})
	}
	return gofs.NewListDirStream(es), 0
}

func (d *diskFiles) lookup(ctx context.Context, parent *gofs.Inode, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	raw := d.raw()
	identity := name
	timeout := immutableTimeout
	var v view
	switch {
	case name == diskFileName:
		v = raw
	case name == gzipFileName:
		disk, err := d.st.disk(ctx, raw.ref)
		if err != nil {
			return nil, d.st.toErrno(ctx, "lookup", path.Join(d.dir, name), err)
		}
		if disk.Size() > gzipMaxSize {
			return nil, syscall.ENOENT
		}
		v = newGzipView(raw, d.st.cacheDir, path.Join(d.dir, name))
	case name == vhdFileName:
		if errno := d.vhdPossible(ctx, raw); errno != 0 {
			return nil, errno
		}
		v = newDynamicVHDView(raw)
	case strings.HasPrefix(name, deltaPrefix) && strings.HasSuffix(name, deltaSuffix):
		baseID, parentName, err := d.resolveBase(ctx, strings.TrimSuffix(strings.TrimPrefix(name, deltaPrefix), deltaSuffix))
		if err != nil {
			return nil, d.st.toErrno(ctx, "lookup", path.Join(d.dir, name), err)
		}
		if baseID == "" || d.st.isGone(d.vm, baseID) {
			return nil, syscall.ENOENT
		}
		base, err := d.st.baseRef(ctx, raw.ref, baseID)
		if err != nil {
			return nil, d.st.toErrno(ctx, "lookup", path.Join(d.dir, name), err)
		}
		if errno := d.vhdPossible(ctx, raw); errno != 0 {
			return nil, errno
		}
		v = newDeltaVHDView(raw, base, parentName)
		// Gone with its base: cached no longer than the listing that says
		// the base exists.
		timeout = min(d.st.ttl, immutableTimeout)
		identity = deltaPrefix + "\x00" + baseID + "\x00" + base.Disk + "\x00" + parentName
	default:
		return nil, syscall.ENOENT
	}
	attr := stableAttr(syscall.S_IFREG, "file", raw.ref.VM, raw.ref.Snapshot, raw.ref.Disk, identity)
	// A known file keeps its node, and with it what its view has built
	// (a gzip index, an open stream).
	if ch := parent.GetChild(name); ch != nil && ch.StableAttr() == attr {
		if f, ok := ch.Operations().(*diskFile); ok {
			if errno := f.fillAttr(ctx, &out.Attr); errno != 0 {
				return nil, errno
			}
			out.SetEntryTimeout(f.timeout)
			out.SetAttrTimeout(f.timeout)
			return ch, 0
		}
	}
	f := &diskFile{st: d.st, vm: d.vm, e: d.e, ref: raw.ref, path: path.Join(d.dir, name), v: v, timeout: timeout}
	if errno := f.fillAttr(ctx, &out.Attr); errno != 0 {
		f.OnForget()
		return nil, errno
	}
	out.SetEntryTimeout(timeout)
	out.SetAttrTimeout(timeout)
	ch := parent.NewInode(ctx, f, attr)
	if ch.Operations() != gofs.InodeEmbedder(f) {
		f.OnForget() // another lookup registered this file first
	}
	return ch, 0
}

// resolveBase finds a delta's base by shown name or id; "" when there is no
// such base. A listed base must be older than this snapshot; an unlisted id
// is left to the backend to judge.
func (d *diskFiles) resolveBase(ctx context.Context, base string) (id, parentName string, err error) {
	if base == "" || nameProblem(base) != "" {
		return "", "", nil
	}
	l, err := d.st.listSnapshots(ctx, d.vm)
	if err != nil {
		return "", "", err
	}
	id, shown := base, base
	if e := l.lookup(base); e != nil {
		bases, err := d.bases(ctx)
		if err != nil {
			return "", "", err
		}
		older := false
		for _, b := range bases {
			older = older || b == e
		}
		if !older {
			return "", "", nil
		}
		id, shown = e.snap.ID, e.name
	}
	parentName = shown + ".vhd"
	if d.multi {
		parentName = shown + "-" + d.disk.name + ".vhd"
	}
	return id, parentName, nil
}
