package fs

import (
	"context"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// namesOnlyDir is the handle of a directory too large to look up whole on
// every read (/vms of 100,000 VMs): READDIRPLUS answers its names without
// attributes, so the kernel looks up only the entries that something then
// stats or enters, instead of the filesystem making a node for every VM at
// each listing. An entry without a node id is, to the kernel, "no
// attributes given", not "absent" (fuse_direntplus_link).
type namesOnlyDir struct {
	list func(context.Context) (gofs.DirStream, syscall.Errno)
	ds   gofs.DirStream
}

var (
	_ gofs.FileReaddirenter = (*namesOnlyDir)(nil)
	_ gofs.FileLookuper     = (*namesOnlyDir)(nil)
	_ gofs.FileSeekdirer    = (*namesOnlyDir)(nil)
	_ gofs.FileReleasedirer = (*namesOnlyDir)(nil)
)

// opendirNamesOnly is an OpendirHandle for a node whose listing is list.
func opendirNamesOnly(list func(context.Context) (gofs.DirStream, syscall.Errno)) (gofs.FileHandle, uint32, syscall.Errno) {
	return &namesOnlyDir{list: list}, 0, 0
}

func (d *namesOnlyDir) stream(ctx context.Context) syscall.Errno {
	if d.ds != nil {
		return 0
	}
	var errno syscall.Errno
	d.ds, errno = d.list(ctx)
	return errno
}

func (d *namesOnlyDir) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	if errno := d.stream(ctx); errno != 0 {
		return nil, errno
	}
	if !d.ds.HasNext() {
		return nil, 0
	}
	e, errno := d.ds.Next()
	return &e, errno
}

// Lookup is READDIRPLUS asking for an entry's attributes: none are given
// (the errno leaves the entry's node id zero).
func (d *namesOnlyDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, syscall.ENOENT
}

func (d *namesOnlyDir) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	if errno := d.stream(ctx); errno != 0 {
		return errno
	}
	if sd, ok := d.ds.(gofs.FileSeekdirer); ok {
		return sd.Seekdir(ctx, off)
	}
	return syscall.ENOTSUP
}

func (d *namesOnlyDir) Releasedir(ctx context.Context, flags uint32) {
	if d.ds != nil {
		d.ds.Close()
	}
}
