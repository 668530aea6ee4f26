package coriolistest

import (
	"net/http"
	"sync"
)

// diskHold is HoldDisk's gate.
type diskHold struct {
	from    int64         // disk bytes served at which reads start waiting
	held    chan struct{} // closed when the first read waits
	open    chan struct{} // closed by release
	heldOne sync.Once
	openOne sync.Once
}

// HoldDisk keeps a reader mid-copy: once the simulator has served after
// more bytes of disk data from now, every disk GET that arrives waits, before
// sending anything, until release is called or its client gives up. held is
// closed when the first one waits: a copy is then running, with real
// progress behind it, for as long as the test wants. Requests already
// answering finish. release is idempotent, and ends the hold for good; one
// hold at a time.
func (s *Server) HoldDisk(after int64) (held <-chan struct{}, release func()) {
	h := &diskHold{from: s.diskBytes.Load() + after, held: make(chan struct{}), open: make(chan struct{})}
	s.hold.Store(h)
	return h.held, func() {
		h.openOne.Do(func() { close(h.open) })
		s.hold.CompareAndSwap(h, nil)
	}
}

// waitHold makes a disk GET wait while a hold is on; false: the client
// went away meanwhile.
func (s *Server) waitHold(r *http.Request) bool {
	h := s.hold.Load()
	if h == nil || r.Method != http.MethodGet || s.diskBytes.Load() < h.from {
		return true
	}
	h.heldOne.Do(func() { close(h.held) })
	select {
	case <-h.open:
		return true
	case <-r.Context().Done():
		return false
	}
}
