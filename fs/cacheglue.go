package fs

import (
	"context"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/cache"
)

// stream is one open handle's reader: readahead state lives per stream.
type stream interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
	Close()
}

// pinningStream hands a read's bytes out of the block cache itself, so a
// READ reply is written to /dev/fuse from the blocks: no copy into go-fuse's
// reply buffer, whose pages then stay untouched (64 readers of 1 MiB held
// 64 MiB of them).
type pinningStream interface {
	ReadPinned(ctx context.Context, off, n int64) (*cache.Pinned, error)
}

// pinnedResult is a READ reply of pinned cache blocks. go-fuse writes its
// Slices with writev and then calls Done, which lets the blocks go; Bytes
// is its fallback (a debug mount's logging, splicing) and copies.
type pinnedResult struct {
	p    *cache.Pinned
	size int
}

func (r pinnedResult) Size() int { return r.size }

func (r pinnedResult) Bytes(buf []byte) ([]byte, fuse.Status) {
	buf = buf[:0]
	for _, b := range r.p.Bufs {
		buf = append(buf, b...)
	}
	return buf, fuse.OK
}

func (r pinnedResult) Slices() ([][]byte, fuse.Status) { return r.p.Bufs, fuse.OK }

func (r pinnedResult) Done() { r.p.Release() }

// fetcher is where a stream gets bytes it does not have.
type fetcher interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
}

// readerOpener opens a stream over a disk whose data extents are data (its
// own map, or a part of it); holes read as zeros without a fetch. The
// stream's reads count in the disk's meter.
type readerOpener func(key string, d *diskHandle, data extent.Map) stream

func cacheOpener(c *cache.Cache) readerOpener {
	if c == nil {
		return func(_ string, d *diskHandle, data extent.Map) stream {
			return &directStream{data: data, f: d}
		}
	}
	return func(key string, d *diskHandle, data extent.Map) stream {
		return c.OpenCounted(key, d.Size(), data, d, &d.meter().tally)
	}
}

// directStream reads straight from the backend, fetching only data extents.
type directStream struct {
	data extent.Map
	f    fetcher
}

func (d *directStream) ReadAt(ctx context.Context, p []byte, off int64) error {
	clear(p)
	for _, e := range d.data.Clip(off, int64(len(p))) {
		if err := d.f.ReadAt(ctx, p[e.Off-off:e.End()-off], e.Off); err != nil {
			return err
		}
	}
	return nil
}

func (d *directStream) Close() {}
