package fs

import (
	"context"
	"path"
	"sync"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vmexportfs/vmexportfs/backend"
)

const (
	// listingTimeout is for entries that come and go with backend listings.
	listingTimeout = time.Second
	// immutableTimeout is for snapshot contents, which never change.
	immutableTimeout = time.Hour
	diskFileName     = "disk.img"
)

// dirNode is the read-only base of every directory: everything that would
// change the tree fails with EROFS unless a node overrides it.
type dirNode struct {
	gofs.Inode
	st    *state
	mode  uint32
	mtime time.Time
}

var (
	_ gofs.NodeGetattrer     = (*dirNode)(nil)
	_ gofs.NodeStatfser      = (*dirNode)(nil)
	_ gofs.NodeSetattrer     = (*dirNode)(nil)
	_ gofs.NodeCreater       = (*dirNode)(nil)
	_ gofs.NodeMkdirer       = (*dirNode)(nil)
	_ gofs.NodeRmdirer       = (*dirNode)(nil)
	_ gofs.NodeUnlinker      = (*dirNode)(nil)
	_ gofs.NodeRenamer       = (*dirNode)(nil)
	_ gofs.NodeSymlinker     = (*dirNode)(nil)
	_ gofs.NodeLinker        = (*dirNode)(nil)
	_ gofs.NodeMknoder       = (*dirNode)(nil)
	_ gofs.NodeSetxattrer    = (*dirNode)(nil)
	_ gofs.NodeRemovexattrer = (*dirNode)(nil)
)

func (n *dirNode) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | n.mode
	n.st.fillOwner(&out.Attr, n.mtime)
	return 0
}

func (st *state) fillOwner(a *fuse.Attr, mtime time.Time) {
	a.Uid, a.Gid = st.uid, st.gid
	if mtime.IsZero() {
		mtime = st.epoch
	}
	a.SetTimes(&mtime, &mtime, &mtime)
	a.Blksize = 4096
	// 1 is the conventional "not counted" link count of FUSE directories;
	// 0 would read as a deleted file.
	a.Nlink = 1
}

func (n *dirNode) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	return statfs(out)
}

func statfs(out *fuse.StatfsOut) syscall.Errno {
	// A read-only virtual fs: no free space, sizes are not worth a backend call.
	*out = fuse.StatfsOut{Bsize: 4096, Frsize: 4096, NameLen: 255}
	return 0
}

func (n *dirNode) Setattr(context.Context, gofs.FileHandle, *fuse.SetAttrIn, *fuse.AttrOut) syscall.Errno {
	return syscall.EROFS
}
func (n *dirNode) Create(context.Context, string, uint32, uint32, *fuse.EntryOut) (*gofs.Inode, gofs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, syscall.EROFS
}
func (n *dirNode) Mkdir(context.Context, string, uint32, *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, syscall.EROFS
}
func (n *dirNode) Rmdir(context.Context, string) syscall.Errno  { return syscall.EROFS }
func (n *dirNode) Unlink(context.Context, string) syscall.Errno { return syscall.EROFS }
func (n *dirNode) Rename(context.Context, string, gofs.InodeEmbedder, string, uint32) syscall.Errno {
	return syscall.EROFS
}
func (n *dirNode) Symlink(context.Context, string, string, *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, syscall.EROFS
}
func (n *dirNode) Link(context.Context, gofs.InodeEmbedder, string, *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, syscall.EROFS
}
func (n *dirNode) Mknod(context.Context, string, uint32, uint32, *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, syscall.EROFS
}
func (n *dirNode) Setxattr(context.Context, string, []byte, uint32) syscall.Errno {
	return syscall.EROFS
}
func (n *dirNode) Removexattr(context.Context, string) syscall.Errno { return syscall.EROFS }

// dirEntryOut fills a looked-up directory's entry.
func (st *state) dirEntryOut(out *fuse.EntryOut, mode uint32, mtime time.Time, timeout time.Duration) {
	out.Mode = syscall.S_IFDIR | mode
	st.fillOwner(&out.Attr, mtime)
	out.SetEntryTimeout(timeout)
	out.SetAttrTimeout(timeout)
}

// idXattr answers one id attribute.
func idXattr(attr, want, value string, dest []byte) (uint32, syscall.Errno, bool) {
	if attr != want {
		return 0, 0, false
	}
	sz, errno := xattrValue([]byte(value), dest)
	return sz, errno, true
}

// ---- /vms

type vmsDir struct{ dirNode }

func (n *vmsDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	l, err := n.st.lookupVM(ctx, name)
	if err != nil {
		return nil, n.st.toErrno(ctx, "lookup", "/vms/"+name, err)
	}
	if !l.has(name) {
		return nil, syscall.ENOENT
	}
	n.st.useVM(name)
	n.st.dirEntryOut(out, 0o555, time.Time{}, listingTimeout)
	vm := &vmDir{dirNode: dirNode{st: n.st, mode: 0o555}, id: name}
	return n.NewInode(ctx, vm, stableAttr(syscall.S_IFDIR, "vm", name)), 0
}

// OpendirHandle makes listings of /vms names only (namesOnlyDir).
func (n *vmsDir) OpendirHandle(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	return opendirNamesOnly(n.Readdir)
}

func (n *vmsDir) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	l, err := n.st.listVMs(ctx)
	if err != nil {
		return nil, n.st.toErrno(ctx, "readdir", "/vms", err)
	}
	es := make([]fuse.DirEntry, 0, len(l.ids))
	for _, id := range l.ids {
		es = append(es, fuse.DirEntry{Name: id, Mode: syscall.S_IFDIR})
	}
	return gofs.NewListDirStream(es), 0
}

// ---- /vms/<id>

type vmDir struct {
	dirNode
	id string
}

func (n *vmDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	if name != "snapshots" {
		return nil, syscall.ENOENT
	}
	n.st.dirEntryOut(out, 0o755, time.Time{}, listingTimeout)
	s := &snapshotsDir{dirNode: dirNode{st: n.st, mode: 0o755}, vm: n.id}
	ino := n.NewInode(ctx, s, stableAttr(syscall.S_IFDIR, "snapshots", n.id))
	if sd, ok := ino.Operations().(*snapshotsDir); ok {
		n.st.mu.Lock()
		n.st.snapDirs[n.id] = sd
		n.st.mu.Unlock()
	}
	return ino, 0
}

func (n *vmDir) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	return gofs.NewListDirStream([]fuse.DirEntry{{Name: "snapshots", Mode: syscall.S_IFDIR}}), 0
}

func (n *vmDir) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	if sz, errno, ok := idXattr(attr, xattrVM, n.id, dest); ok {
		return sz, errno
	}
	return 0, syscall.ENODATA
}

func (n *vmDir) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	return xattrList([]string{xattrVM}, dest)
}

// ---- /vms/<id>/snapshots

type snapshotsDir struct {
	dirNode
	vm string
}

func (n *snapshotsDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	l, err := n.st.listSnapshots(ctx, n.vm)
	if err != nil {
		return nil, n.st.toErrno(ctx, "lookup", path.Join("/vms", n.vm, "snapshots", name), err)
	}
	e := l.lookup(name)
	if e == nil {
		return nil, syscall.ENOENT
	}
	return n.newSnapDir(ctx, e, out), 0
}

func (n *snapshotsDir) newSnapDir(ctx context.Context, e *snapEntry, out *fuse.EntryOut) *gofs.Inode {
	n.st.dirEntryOut(out, 0o555, e.mtime, listingTimeout)
	d := &snapDir{dirNode: dirNode{st: n.st, mode: 0o555, mtime: e.mtime}, vm: n.vm, e: e}
	return n.NewInode(ctx, d, stableAttr(syscall.S_IFDIR, "snapshot", n.vm, e.snap.ID))
}

func (n *snapshotsDir) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	n.st.walk.read(n.vm)
	l, err := n.st.listSnapshots(ctx, n.vm)
	if err != nil {
		return nil, n.st.toErrno(ctx, "readdir", path.Join("/vms", n.vm, "snapshots"), err)
	}
	es := make([]fuse.DirEntry, 0, len(l.entries))
	for _, e := range l.entries {
		es = append(es, fuse.DirEntry{Name: e.name, Mode: syscall.S_IFDIR})
	}
	return gofs.NewListDirStream(es), 0
}

// ---- /vms/<id>/snapshots/<name>

type snapDir struct {
	dirNode
	vm string

	mu sync.Mutex
	e  *snapEntry // refreshed from the listing while the snapshot is pending
}

// entry is the snapshot as shown now. A ready snapshot never changes; a
// pending one is looked up in the listing again (which its TTL keeps
// fresh), so its files appear once it is ready.
func (n *snapDir) entry(ctx context.Context) *snapEntry {
	n.mu.Lock()
	e := n.e
	n.mu.Unlock()
	if e.snap.Pending == "" {
		return e
	}
	l, err := n.st.listSnapshots(ctx, n.vm)
	if err != nil {
		return e
	}
	if fresh, ok := l.byID[e.snap.ID]; ok {
		n.mu.Lock()
		n.e = fresh
		n.mu.Unlock()
		return fresh
	}
	return e
}

func (n *snapDir) files(e *snapEntry, disk diskEntry, multi bool) *diskFiles {
	dir := path.Join("/vms", n.vm, "snapshots", e.name)
	if multi {
		dir = path.Join(dir, disk.name)
	}
	return &diskFiles{st: n.st, vm: n.vm, e: e, disk: disk, dir: dir, multi: multi}
}

func (n *snapDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	e := n.entry(ctx)
	disks := n.st.disksOf(n.vm, e.snap)
	if len(disks) == 1 {
		return n.files(e, disks[0], false).lookup(ctx, &n.Inode, name, out)
	}
	for _, d := range disks {
		if d.name == name {
			n.st.dirEntryOut(out, 0o555, e.mtime, immutableTimeout)
			dd := &diskDir{dirNode: dirNode{st: n.st, mode: 0o555, mtime: e.mtime}, vm: n.vm, e: e, disk: d.info, files: n.files(e, d, true)}
			return n.NewInode(ctx, dd, stableAttr(syscall.S_IFDIR, "disk", n.vm, e.snap.ID, d.info.ID)), 0
		}
	}
	return nil, syscall.ENOENT
}

func (n *snapDir) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	e := n.entry(ctx)
	disks := n.st.disksOf(n.vm, e.snap)
	if len(disks) == 1 {
		return n.files(e, disks[0], false).readdir(ctx)
	}
	es := make([]fuse.DirEntry, 0, len(disks))
	for _, d := range disks {
		es = append(es, fuse.DirEntry{Name: d.name, Mode: syscall.S_IFDIR})
	}
	return gofs.NewListDirStream(es), 0
}

func (n *snapDir) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	e := n.entry(ctx)
	if sz, errno, ok := idXattr(attr, xattrVM, n.vm, dest); ok {
		return sz, errno
	}
	if sz, errno, ok := idXattr(attr, xattrSnapshot, e.snap.ID, dest); ok {
		return sz, errno
	}
	state := "ready"
	if e.snap.Pending != "" {
		state = e.snap.Pending
	}
	if sz, errno, ok := idXattr(attr, xattrState, state, dest); ok {
		return sz, errno
	}
	return 0, syscall.ENODATA
}

func (n *snapDir) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	return xattrList([]string{xattrVM, xattrSnapshot, xattrState}, dest)
}

// ---- /vms/<id>/snapshots/<name>/<device>

type diskDir struct {
	dirNode
	vm    string
	e     *snapEntry
	disk  backend.DiskInfo
	files *diskFiles
}

func (n *diskDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return n.files.lookup(ctx, &n.Inode, name, out)
}

func (n *diskDir) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	return n.files.readdir(ctx)
}

func (n *diskDir) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	for _, kv := range [][2]string{{xattrVM, n.vm}, {xattrSnapshot, n.e.snap.ID}, {xattrDisk, n.disk.ID}} {
		if sz, errno, ok := idXattr(attr, kv[0], kv[1], dest); ok {
			return sz, errno
		}
	}
	return 0, syscall.ENODATA
}

func (n *diskDir) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	return xattrList([]string{xattrVM, xattrSnapshot, xattrDisk}, dest)
}

// ---- /by-name

type byNameDir struct{ dirNode }

func (n *byNameDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	l, err := n.st.listVMs(ctx)
	if err != nil {
		return nil, n.st.toErrno(ctx, "lookup", "/by-name/"+name, err)
	}
	byName, _ := l.links(n.st)
	id, ok := byName[name]
	if !ok {
		return nil, syscall.ENOENT
	}
	link := &symlinkNode{st: n.st, target: "../vms/" + id}
	out.Mode = syscall.S_IFLNK | 0o777
	out.Size = uint64(len(link.target))
	n.st.fillOwner(&out.Attr, time.Time{})
	out.SetEntryTimeout(listingTimeout)
	out.SetAttrTimeout(listingTimeout)
	return n.NewInode(ctx, link, stableAttr(syscall.S_IFLNK, "by-name", name, id)), 0
}

// OpendirHandle makes listings of /by-name names only (namesOnlyDir).
func (n *byNameDir) OpendirHandle(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	return opendirNamesOnly(n.Readdir)
}

func (n *byNameDir) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	l, err := n.st.listVMs(ctx)
	if err != nil {
		return nil, n.st.toErrno(ctx, "readdir", "/by-name", err)
	}
	_, names := l.links(n.st)
	es := make([]fuse.DirEntry, 0, len(names))
	for _, name := range names {
		es = append(es, fuse.DirEntry{Name: name, Mode: syscall.S_IFLNK})
	}
	return gofs.NewListDirStream(es), 0
}

type symlinkNode struct {
	gofs.Inode
	st     *state
	target string
}

var _ gofs.NodeReadlinker = (*symlinkNode)(nil)

func (n *symlinkNode) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	return []byte(n.target), 0
}

func (n *symlinkNode) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFLNK | 0o777
	out.Size = uint64(len(n.target))
	n.st.fillOwner(&out.Attr, time.Time{})
	return 0
}

func (n *symlinkNode) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	return statfs(out)
}
