package httprange

import (
	"context"
	"errors"
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

	// singleRanges is set once the server has shown it does not answer
	// several ranges a request (opts.MultipleRanges): ReadRanges then reads
	// a run of touching pieces a request.
	singleRanges atomic.Bool
	// maxRanges is how many ranges a request may carry since the server
	// refused more; 0: as many as a Range header of maxRangeHeader holds.
	maxRanges atomic.Int64
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
	// MultipleRanges says the platform's server answers a request of
	// several ranges with 206 multipart/byteranges (http.ServeContent
	// does): ReadRanges then fills pieces far apart with one request. A
	// server that turns out not to (200, or a refusal at one range) turns
	// it off for the life of the Disk.
	MultipleRanges bool
}

var (
	_ backend.Disk         = (*Disk)(nil)
	_ backend.VecReader    = (*Disk)(nil)
	_ backend.RangesReader = (*Disk)(nil)
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

// MultipleRanges implements backend.RangesReader: whether ReadRanges fills
// pieces far apart with one request. It does on a Range route whose server
// answers several ranges (DiskOptions.MultipleRanges), until that server
// has shown it does not; a query route (QueryDisk) reads one range a
// request.
func (d *Disk) MultipleRanges() bool {
	return d.opts.MultipleRanges && d.read == nil && !d.singleRanges.Load()
}

// ReadRanges implements backend.RangesReader. Pieces lying wholly in holes
// are cleared and never asked for. The others go in as few requests as the
// server takes (Client.ReadRanges) while MultipleRanges holds, else in a
// request per run of touching pieces (backend.ReadRuns of ReadVecAt's
// reads). A server that ignores several ranges (200) or that still answers
// them wrongly once a read's attempts are used up turns multi-range off;
// one that refuses them (416, 400, 413, 431) gets half as many ranges a
// request, and at one multi-range is off. Either way the read is redone
// then, not failed: what was filled stays filled.
func (d *Disk) ReadRanges(ctx context.Context, pieces []backend.Piece) error {
	if err := checkPieces(pieces, d.size); err != nil {
		return fmt.Errorf("%s: read ranges: %w", d.opts.Name, err)
	}
	if d.closed.Load() {
		return fmt.Errorf("%s: read: %w: disk closed", d.opts.Name, backend.ErrInvalid)
	}
	if err := d.readRanges(ctx, pieces); err != nil {
		err = fmt.Errorf("%s: %w", d.opts.Name, err)
		if d.opts.Explain != nil {
			err = d.opts.Explain(err)
		}
		return err
	}
	return nil
}

func (d *Disk) readRanges(ctx context.Context, pieces []backend.Piece) error {
	var data []backend.Piece
	for _, p := range pieces {
		if !d.alloc.Overlaps(p.Off, int64(len(p.Buf))) {
			clear(p.Buf) // a hole, or empty
			continue
		}
		data = append(data, p)
	}
	runs := backend.PieceRuns(data)
	done := 0 // of data: the pieces of the runs read
	for len(runs) > 0 {
		if !d.MultipleRanges() {
			return backend.ReadRuns(ctx, d.readVec, data[done:])
		}
		k := batch(runs, int(d.maxRanges.Load()))
		err := d.client.readRuns(ctx, d.url, d.size, runs[:k])
		var refused *RangesRefusedError
		switch {
		case err == nil:
			for _, r := range runs[:k] {
				done += len(r.Pieces)
			}
			runs = runs[k:]
		case ctx.Err() != nil:
			return err
		case errors.As(err, &refused):
			d.fewerRanges(refused)
		case errors.Is(err, ErrRangesIgnored):
			d.singleRangesFrom("the server ignores several ranges (status 200)", err)
		case errors.Is(err, errBadAnswer):
			d.singleRangesFrom("the server answers several ranges wrongly", err)
		default:
			return err
		}
	}
	return nil
}

// fewerRanges halves the ranges a request carries after a refusal of
// refused.Ranges; at one, multi-range is off. Concurrent reads only ever
// lower the bound.
func (d *Disk) fewerRanges(refused *RangesRefusedError) {
	limit := int64(refused.Ranges / 2)
	if limit <= 1 {
		d.singleRangesFrom("the server refuses several ranges a request", refused)
		return
	}
	for {
		cur := d.maxRanges.Load()
		if cur != 0 && cur <= limit {
			return
		}
		if d.maxRanges.CompareAndSwap(cur, limit) {
			d.client.logger().Info("httprange: server refused a request of several ranges; asking fewer", "disk", d.opts.Name, "refused", refused.Ranges, "now", limit, "status", refused.Status.Code)
			return
		}
	}
}

// singleRangesFrom turns multi-range off for the life of the disk, saying
// why once.
func (d *Disk) singleRangesFrom(why string, err error) {
	if !d.singleRanges.Swap(true) {
		d.client.logger().Warn("httprange: reading one range a request: "+why, "disk", d.opts.Name, "err", err.Error())
	}
}

// Close implements backend.Disk.
func (d *Disk) Close() error {
	if !d.closed.Swap(true) && d.opts.OnClose != nil {
		d.opts.OnClose()
	}
	return nil
}
