package httprange

import (
	"context"
	"fmt"
	"sync/atomic"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// Disk is a backend.Disk read by checked Range requests of one URL: what the
// disk of every HTTP platform is once it knows the size and the map.
type Disk struct {
	client *Client
	url    string
	size   int64
	alloc  extent.Map
	opts   DiskOptions
	closed atomic.Bool
	read   func(ctx context.Context, url string, size int64, p []byte, off int64) error // nil: ReadRange
}

type extentMap = extent.Map

// DiskOptions are what a platform adds to its HTTP disks.
type DiskOptions struct {
	Name string // in error messages, such as "coriolis disk vm/snap/disk.img"
	// Explain, when set, sees every read error before it is returned (to
	// log a rejected token by name, say) and returns the error to give.
	Explain func(error) error
	// OnClose, when set, runs once on Close (to release a connection the
	// disk owns).
	OnClose func()
}

var (
	_ backend.Disk      = (*Disk)(nil)
	_ backend.VecReader = (*Disk)(nil)
)

// Disk returns the disk at url, of size bytes with alloc allocated.
func (c *Client) Disk(url string, size int64, alloc extent.Map, opts DiskOptions) *Disk {
	return &Disk{client: c, url: url, size: size, alloc: alloc, opts: opts}
}

// Size implements backend.Disk.
func (d *Disk) Size() int64 { return d.size }

// Allocated implements backend.Disk.
func (d *Disk) Allocated() extent.Map { return d.alloc }

// ReadAt implements backend.Disk; holes are answered without a request.
func (d *Disk) ReadAt(ctx context.Context, p []byte, off int64) error {
	return d.ReadVecAt(ctx, [][]byte{p}, off)
}

// ReadVecAt implements backend.VecReader: bufs, laid end to end from off,
// filled by one Range request, so a read planned across several cache
// blocks costs the platform one request.
func (d *Disk) ReadVecAt(ctx context.Context, bufs [][]byte, off int64) error {
	n := backend.VecLen(bufs)
	if off < 0 || off > d.size || n > d.size-off {
		return fmt.Errorf("%s: read: %w: %d bytes at %d past disk size %d", d.opts.Name, backend.ErrInvalid, n, off, d.size)
	}
	if d.closed.Load() {
		return fmt.Errorf("%s: read: %w: disk closed", d.opts.Name, backend.ErrInvalid)
	}
	if err := d.readVec(ctx, bufs, off); err != nil {
		err = fmt.Errorf("%s: %w", d.opts.Name, err)
		if d.opts.Explain != nil {
			err = d.opts.Explain(err)
		}
		return err
	}
	return nil
}

// readVec fills bufs from the platform, answering holes without a request:
// a Range route in one request, a query route (ReadQuery) a buffer at a
// time.
func (d *Disk) readVec(ctx context.Context, bufs [][]byte, off int64) error {
	if d.read == nil {
		if !d.alloc.Overlaps(off, backend.VecLen(bufs)) {
			for _, p := range bufs {
				clear(p)
			}
			return nil
		}
		return d.client.ReadRangeVec(ctx, d.url, d.size, bufs, off)
	}
	return backend.ReadEach(ctx, func(ctx context.Context, p []byte, off int64) error {
		if !d.alloc.Overlaps(off, int64(len(p))) {
			clear(p)
			return nil
		}
		return d.read(ctx, d.url, d.size, p, off)
	}, bufs, off)
}

// Close implements backend.Disk.
func (d *Disk) Close() error {
	if !d.closed.Swap(true) && d.opts.OnClose != nil {
		d.opts.OnClose()
	}
	return nil
}
