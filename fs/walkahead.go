package fs

import (
	"sync"

	"github.com/vmexportfs/vmexportfs/backend"
)

// walkAhead lists ahead of a walk of the tree. When VMs' snapshot
// directories are read in the order /vms lists them (find, ls -R, rsync,
// a backup tool's scan), the next VMs' snapshots are listed in the
// background, a few at a time, in a window that doubles while the walk
// stays in order: the walk then waits for about one round trip per window,
// not one or more per VM. Where the platform says opening a disk costs it
// nothing (backend.CheapOpener), their disks are opened too, which readdir
// of a snapshot needs (a disk's size decides which files it has).
type walkAhead struct {
	st *state

	mu     sync.Mutex
	next   int // index in the VM listing after the last VM read
	ahead  int // index up to which listings were asked for
	window int

	sem chan struct{} // listings in flight
}

const (
	walkAheadMax      = 64 // VMs listed ahead at most
	walkAheadParallel = 8  // listings in flight
)

func newWalkAhead(st *state) *walkAhead {
	return &walkAhead{st: st, sem: make(chan struct{}, walkAheadParallel)}
}

// read says that vm's snapshot directory is being read.
func (w *walkAhead) read(vm string) {
	l, ok := w.st.vms.last()
	if !ok {
		return
	}
	i, ok := l.index[vm]
	if !ok {
		return
	}
	w.mu.Lock()
	if i == w.next && i > 0 {
		w.window = min(max(2*w.window, 2), walkAheadMax)
	} else {
		w.window, w.ahead = 0, 0
	}
	w.next = i + 1
	from, to := max(w.ahead, i+1), min(i+w.window, len(l.ids)-1)
	if from <= to {
		w.ahead = to + 1
	}
	w.mu.Unlock()
	for j := from; j <= to; j++ {
		go w.prefetch(l.ids[j])
	}
}

func (w *walkAhead) prefetch(vm string) {
	ctx := w.st.bg
	select {
	case w.sem <- struct{}{}:
	case <-ctx.Done():
		return
	}
	defer func() { <-w.sem }()
	l, err := w.st.listSnapshots(ctx, vm)
	if err != nil {
		w.st.log.Debug("fs: listing ahead of a walk failed", "vm", vm, "err", err)
		return
	}
	if c, ok := w.st.src.(backend.CheapOpener); !ok || !c.CheapOpen() {
		return
	}
	for _, e := range l.entries {
		for _, d := range w.st.disksOf(vm, e.snap) {
			if _, err := w.st.disk(ctx, backend.DiskRef{VM: vm, Snapshot: e.snap.ID, Disk: d.info.ID}); err != nil {
				w.st.log.Debug("fs: opening ahead of a walk failed", "vm", vm, "snapshot", e.snap.ID, "err", err)
			}
		}
	}
}
