package fs

import (
	"context"

	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/cache"
)

// stream is one open handle's reader: readahead state lives per stream.
type stream interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
	Close()
}

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
