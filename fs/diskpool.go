package fs

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// A platform disk may hold server resources while open (an image transfer,
// NBD connections counted against a host's limit, a backup export), so the
// tree never keeps one open for the life of the mount. The pool opens a disk
// when a read needs it, shares it between readers, and closes it once it has
// been idle for Options.DiskIdle; of the idle ones at most
// Options.MaxIdleDisks stay open, the least recently used closing first. A
// disk is in use only while a read of it runs, so no more are open than reads
// in flight (the cache's parallelism) plus that many idle ones.
//
// What a disk says about itself (size, allocated and changed extents) is
// immutable and outlives the opening: a stat or lseek of a closed disk costs
// nothing, and a reopened disk must say the same.

// Defaults of the pool's Options.
const (
	DefaultDiskIdle     = 30 * time.Second
	DefaultMaxIdleDisks = 16
)

// diskKey names one opening: a disk, or a disk against a delta base.
type diskKey struct {
	ref  backend.DiskRef
	base backend.DiskRef // zero: a plain OpenDisk
}

// openedDisk is one disk the pool has, or is, opening.
type openedDisk struct {
	ready    chan struct{} // closed when the open finished
	disk     backend.Disk  // nil after a failed open
	changed  extent.Map    // with a base: what the delta opener said
	err      error
	users    int
	lastUsed time.Time
}

type diskPool struct {
	src     backend.Source
	idle    time.Duration
	maxIdle int
	log     func(msg string, args ...any)

	mu     sync.Mutex
	open   map[diskKey]*openedDisk
	closed bool
	stop   chan struct{}
	done   chan struct{}
}

func newDiskPool(src backend.Source, idle time.Duration, maxIdle int, log func(msg string, args ...any)) *diskPool {
	if idle <= 0 {
		idle = DefaultDiskIdle
	}
	if maxIdle <= 0 {
		maxIdle = DefaultMaxIdleDisks
	}
	p := &diskPool{src: src, idle: idle, maxIdle: maxIdle, log: log,
		open: map[diskKey]*openedDisk{}, stop: make(chan struct{}), done: make(chan struct{})}
	go p.reap()
	return p
}

var errPoolClosed = errors.New("disk pool closed")

// acquire returns the opened disk for k, opening it if nobody has; release
// must follow. The open is detached from ctx so one interrupted caller does
// not fail the others; a failed open is not remembered.
func (p *diskPool) acquire(ctx context.Context, k diskKey) (*openedDisk, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, fmt.Errorf("open disk: %w: %w", backend.ErrUnavailable, errPoolClosed)
	}
	o, ok := p.open[k]
	if !ok {
		o = &openedDisk{ready: make(chan struct{})}
		p.open[k] = o
		go p.fill(context.WithoutCancel(ctx), k, o)
	}
	o.users++
	p.mu.Unlock()
	select {
	case <-o.ready:
	case <-ctx.Done():
		p.release(k, o)
		return nil, ctx.Err()
	}
	if o.err != nil {
		p.release(k, o)
		return nil, o.err
	}
	return o, nil
}

func (p *diskPool) fill(ctx context.Context, k diskKey, o *openedDisk) {
	var err error
	if k.base == (backend.DiskRef{}) {
		o.disk, err = p.src.OpenDisk(ctx, k.ref)
	} else if do, ok := p.src.(backend.DeltaOpener); ok {
		o.disk, o.changed, err = do.OpenDelta(ctx, k.ref, k.base)
	} else {
		err = fmt.Errorf("open delta: %w", backend.ErrUnsupported)
	}
	if err == nil && o.disk == nil {
		err = fmt.Errorf("open disk: backend returned nil disk: %w", backend.ErrUnavailable)
	}
	p.mu.Lock()
	if err == nil && p.closed {
		// The pool closed while this disk was opening: nobody will.
		o.disk.Close()
		err = fmt.Errorf("open disk: %w: %w", backend.ErrUnavailable, errPoolClosed)
	}
	o.err = err
	if err != nil {
		o.disk = nil
		if p.open[k] == o {
			delete(p.open, k)
		}
	}
	o.lastUsed = time.Now()
	p.mu.Unlock()
	close(o.ready)
}

// release ends one use; an idle disk beyond the pool's bound is closed now,
// the others when they have been idle long enough.
func (p *diskPool) release(k diskKey, o *openedDisk) {
	p.mu.Lock()
	o.users--
	o.lastUsed = time.Now()
	victims := p.overflowLocked()
	p.mu.Unlock()
	p.closeAll(victims)
}

// overflowLocked removes the least recently used idle disks beyond maxIdle
// and returns them, to be closed outside the lock.
func (p *diskPool) overflowLocked() []*openedDisk {
	var idle []diskKey
	for k, o := range p.open {
		if p.idleLocked(o) {
			idle = append(idle, k)
		}
	}
	if len(idle) <= p.maxIdle {
		return nil
	}
	slices.SortFunc(idle, func(a, b diskKey) int { return p.open[a].lastUsed.Compare(p.open[b].lastUsed) })
	var out []*openedDisk
	for _, k := range idle[:len(idle)-p.maxIdle] {
		out = append(out, p.open[k])
		delete(p.open, k)
	}
	return out
}

func (p *diskPool) idleLocked(o *openedDisk) bool {
	select {
	case <-o.ready:
		return o.users == 0 && o.disk != nil
	default:
		return false
	}
}

// reap closes disks idle for longer than the pool's idle time.
func (p *diskPool) reap() {
	defer close(p.done)
	tick := time.NewTicker(max(p.idle/4, 10*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-p.stop:
			return
		case now := <-tick.C:
			var victims []*openedDisk
			p.mu.Lock()
			for k, o := range p.open {
				if p.idleLocked(o) && now.Sub(o.lastUsed) >= p.idle {
					victims = append(victims, o)
					delete(p.open, k)
				}
			}
			p.mu.Unlock()
			p.closeAll(victims)
		}
	}
}

func (p *diskPool) closeAll(victims []*openedDisk) {
	for _, o := range victims {
		if err := o.disk.Close(); err != nil {
			p.log("fs: closing a disk failed", "err", err)
		}
	}
}

// closeSnapshot closes the idle disks of one snapshot (opened plainly or as
// a delta, or as another's delta base): a platform may refuse to delete a
// disk still attached (XenServer's VDI_IN_USE while NBD holds it).
func (p *diskPool) closeSnapshot(vm, snapshot string) {
	of := func(r backend.DiskRef) bool { return r.VM == vm && r.Snapshot == snapshot }
	var victims []*openedDisk
	p.mu.Lock()
	for k, o := range p.open {
		if (of(k.ref) || of(k.base)) && p.idleLocked(o) {
			victims = append(victims, o)
			delete(p.open, k)
		}
	}
	p.mu.Unlock()
	p.closeAll(victims)
}

// count is how many disks are open (or opening).
func (p *diskPool) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.open)
}

// openRefs are the disks open now (by themselves or against a base).
func (p *diskPool) openRefs() map[backend.DiskRef]bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	refs := make(map[backend.DiskRef]bool, len(p.open))
	for k := range p.open {
		refs[k.ref] = true
	}
	return refs
}

// close closes every disk, in use or not (the mount is going: reads still
// running fail), and stops the reaper.
func (p *diskPool) close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	var victims []*openedDisk
	for k, o := range p.open {
		select {
		case <-o.ready:
			if o.disk != nil {
				victims = append(victims, o)
			}
		default: // still opening: fill sees closed and closes it
		}
		delete(p.open, k)
	}
	p.mu.Unlock()
	close(p.stop)
	<-p.done
	p.closeAll(victims)
}
