package fs

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// A reader that skips holes (cp --sparse, tar -S, qemu-img convert) asks
// SEEK_DATA and SEEK_HOLE before every extent and then reads it. The kernel
// forwards both seeks to us, and, because the extents are apart, its
// readahead never reads ahead of them: every extent costs three round trips
// through /dev/fuse. A pageFiller takes the read off that list: it stores the
// data ahead of such a reader in the kernel's page cache (FUSE_NOTIFY_STORE),
// so the read is answered there. The seeks, which keep coming, tell it where
// the reader is.
//
// It reads through a stream of its own, so the cache sees one sequential
// reader (and reads ahead of it) instead of the user's reads, which now come
// only for pages the kernel dropped.
const (
	// fillAhead is how far, in bytes stored, the filler runs ahead of the
	// reader: a few milliseconds of copying, enough for the store of the
	// next extents to finish before the reader gets there.
	fillAhead = 8 << 20
	// fillChunk is the most one store carries.
	fillChunk = 1 << 20
	// fillGap is the longest hole stored as zeros so that the extents on
	// either side go in one store: a store is a system call, about as
	// costly as copying this many bytes.
	fillGap = 16 << 10
	// fillMaxExtent: extents this long or longer are not stored. A reader
	// reads them in several reads one after the other (cp: 128 KiB each),
	// and the kernel's readahead takes them from there.
	fillMaxExtent = 128 << 10
	// fillChunkExtents bounds the extents walked for one chunk.
	fillChunkExtents = 256
)

// cacheStorer puts bytes in the kernel's page cache of one file
// (gofs.Inode.WriteCache).
type cacheStorer interface {
	WriteCache(off int64, data []byte) syscall.Errno
}

type pageFiller struct {
	node   cacheStorer
	open   func(context.Context) (stream, error)
	data   extent.Map
	size   int64
	stored *atomic.Int64 // bytes stored, for the stats
	log    *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	cond    *sync.Cond
	seeks   bool  // the reader asked SEEK_DATA or SEEK_HOLE
	started bool  // it read too (it reads what it seeks): the goroutine runs
	pos     int64 // where the reader is
	filled  int64 // stored up to here (from where the filler last started)
	storing int64 // the end of the store under way, else filled
	ahead   []storedChunk
	aheadN  int64 // bytes of ahead
	stopped bool
}

// storedChunk is a stored range that the reader has not reached yet.
type storedChunk struct{ end, n int64 }

// newPageFiller returns a filler that stores nothing until the reader has
// sought and read; its work ends with stop, or with ctx (the tree's).
func newPageFiller(ctx context.Context, node cacheStorer, open func(context.Context) (stream, error), data extent.Map, size int64, stored *atomic.Int64, log *slog.Logger) *pageFiller {
	ctx, cancel := context.WithCancel(ctx)
	pf := &pageFiller{node: node, open: open, data: data, size: size, stored: stored, log: log, ctx: ctx, cancel: cancel, done: make(chan struct{})}
	pf.cond = sync.NewCond(&pf.mu)
	return pf
}

// sought records a SEEK_DATA or SEEK_HOLE answer: the reader is at off.
func (pf *pageFiller) sought(off int64) {
	pf.mu.Lock()
	defer pf.mu.Unlock()
	pf.seeks = true
	pf.moveLocked(off)
}

// read records a read that reached us and ended at end: the page cache did
// not have it. Only a reader that reads as well as seeks is filled for: a
// walk of the map alone (qemu-img map) must not fetch the data it skips,
// and one that reads everything (dd, rsync) has the kernel's readahead.
func (pf *pageFiller) read(end int64) {
	pf.mu.Lock()
	defer pf.mu.Unlock()
	if pf.seeks && !pf.started && !pf.stopped {
		pf.started = true
		go pf.run()
	}
	pf.moveLocked(end)
}

func (pf *pageFiller) moveLocked(off int64) {
	if pf.stopped {
		return
	}
	if off < pf.pos-fillAhead || off > max(pf.filled, pf.storing) {
		// A jump (back, or past what is stored): fill from there.
		pf.filled, pf.storing = off, off
		pf.ahead = pf.ahead[:0]
		pf.aheadN = 0
	}
	pf.pos = off
	i := 0
	for i < len(pf.ahead) && pf.ahead[i].end <= off {
		pf.aheadN -= pf.ahead[i].n
		i++
	}
	pf.ahead = pf.ahead[i:]
	if pf.started {
		pf.cond.Signal()
	}
}

// stop ends the filling and waits for it.
func (pf *pageFiller) stop() {
	pf.mu.Lock()
	pf.stopped = true
	started := pf.started
	pf.cond.Broadcast()
	pf.mu.Unlock()
	pf.cancel()
	if started {
		<-pf.done
	}
}

func (pf *pageFiller) run() {
	defer close(pf.done)
	s, err := pf.open(pf.ctx)
	if err != nil {
		pf.log.Debug("fs: page cache filler: open", "err", err)
		return
	}
	defer s.Close()
	buf := make([]byte, fillChunk)
	for {
		off, end, ok := pf.next()
		if !ok {
			return
		}
		p := buf[:end-off]
		if err := s.ReadAt(pf.ctx, p, off); err != nil {
			// The reader's own reads will meet the fault and report it.
			pf.log.Debug("fs: page cache filler: read", "off", off, "err", err)
			return
		}
		if errno := pf.node.WriteCache(off, p); errno != 0 {
			pf.log.Debug("fs: page cache filler: store", "off", off, "errno", errno.Error())
			return
		}
		pf.stored.Add(end - off)
		pf.mu.Lock()
		if pf.filled == off { // no jump meanwhile
			pf.filled, pf.storing = end, end
			pf.ahead = append(pf.ahead, storedChunk{end, end - off})
			pf.aheadN += end - off
		}
		pf.mu.Unlock()
	}
}

// next waits until the reader is less than fillAhead behind the filler and
// returns the next chunk to store: data from filled on, with holes shorter
// than fillGap inside it, within one fillChunk.
func (pf *pageFiller) next() (off, end int64, ok bool) {
	pf.mu.Lock()
	defer pf.mu.Unlock()
	for {
		if pf.stopped {
			return 0, 0, false
		}
		if pf.aheadN < fillAhead {
			if off, end, ok := pf.chunkAt(pf.filled); ok {
				return off, end, true
			}
		}
		pf.cond.Wait()
	}
}

func (pf *pageFiller) chunkAt(from int64) (off, end int64, ok bool) {
	for skipped := 0; ; skipped++ {
		if off, ok = pf.data.SeekData(from); !ok {
			return 0, 0, false
		}
		if end = pf.data.SeekHole(off, pf.size); end-off < fillMaxExtent {
			break
		}
		// The kernel reads ahead inside a long extent: storing it too
		// would copy it twice.
		from = end
		if skipped == fillChunkExtents {
			// Go on when the reader moves: never a long walk under
			// the lock.
			pf.filled, pf.storing = from, from
			return 0, 0, false
		}
	}
	limit := min(off+fillChunk, pf.size)
	end = min(end, limit)
	for i := 0; i < fillChunkExtents && end < limit; i++ {
		next, ok := pf.data.SeekData(end)
		if !ok || next-end > fillGap || next >= limit {
			break
		}
		nextEnd := pf.data.SeekHole(next, pf.size)
		if nextEnd-next >= fillMaxExtent {
			break
		}
		end = min(nextEnd, limit)
	}
	// The filler starts where the data starts: the hole before it is
	// nothing to store.
	pf.filled, pf.storing = off, end
	return off, end, true
}
