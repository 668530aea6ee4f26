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

// readerOpener opens a stream over a fetcher whose data extents are data;
// holes read as zeros without a fetch.
type readerOpener func(key string, size int64, data extent.Map, f fetcher) stream

func cacheOpener(c *cache.Cache) readerOpener {
	if c == nil {
		return func(_ string, _ int64, data extent.Map, f fetcher) stream {
			return &directStream{data: data, f: f}
		}
	}
	return func(key string, size int64, data extent.Map, f fetcher) stream {
		return c.Open(key, size, data, f)
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
