package vhdstream

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/retry"
)

// SpillOptions configure a Spill.
type SpillOptions struct {
	// Open is a fresh GET of the whole VHD stream, from byte 0. Its body
	// must allow Close concurrent with Read (HTTP bodies and pipes do):
	// that is how a stalled stream is abandoned. An error that wraps a
	// *retry.Fault is retried as the fault says; one wrapping
	// backend.ErrInvalid, ErrPermission or ErrNotFound is not retried.
	Open func(ctx context.Context) (io.ReadCloser, error)
	// Dir is the mount's cache directory; the file is created there and
	// unlinked at once (the descriptor is kept), so a crash leaves nothing.
	Dir    string
	Budget *Budget
	// Policy bounds the retries. Its AttemptTimeout is applied to silence,
	// not to a whole attempt: opening the stream and every read of it must
	// make progress within it, since one attempt streams the whole disk.
	Policy retry.Policy
	Logger *slog.Logger // nil discards
	Name   string       // for logs and errors: which disk
}

// Spill is a backend.Disk fed by one pass over a VHD stream. It reads the
// layout, then the present blocks in file order, and stores their data in a
// sparse file: only sectors whose bitmap bit is set and that are not all
// zeros (the file reads zeros wherever nothing was written). ReadAt of a
// range waits until the stream has stored the blocks it covers; holes and
// stored blocks are answered at once.
//
// A failed or truncated stream is opened again and read from the start,
// skipping the blocks already stored. Attempts are counted by retry.Runner
// per stretch without progress: an attempt that stored new blocks before it
// failed starts a fresh count, so a long stream over a flaky link gets
// through while a server that never gets further is given up on.
//
// When the budget is exhausted the stream stops for good for this Spill
// (the filesystem reopens idle disks, which tries again): ranges already
// stored keep working, the others fail with backend.ErrUnavailable.
type Spill struct {
	opts   SpillOptions
	log    *slog.Logger
	layout *Layout
	alloc  extent.Map
	idle   time.Duration
	cancel context.CancelFunc // ends the stream's context: Close
	exited chan struct{}      // closed when the stream goroutine returns

	fileMu sync.RWMutex // read-held by ReadAt while it reads the file, held by Close to close it
	file   *os.File

	mu        sync.Mutex
	stored    []uint64 // one bit per BAT entry: the block is wholly stored
	remaining int      // present blocks within Size not stored yet
	changed   chan struct{}
	err       error // why no more blocks will be stored; nil while the stream goes on
	closed    bool

	// Owned by the stream goroutine (Close reads charged after it exits).
	charged        int64 // bytes taken from the budget
	partial        int   // the block being stored when the last stream broke
	partialCharged int64 // bytes of it already charged: a retry rewrites them without charging twice
}

var _ backend.Disk = (*Spill)(nil)

// NewSpill opens the stream and reads the layout before returning, so Size
// and Allocated are known, then stores the blocks in a goroutine that lives
// until Close. ctx bounds only NewSpill itself. A differencing VHD is
// refused (backend.ErrInvalid): its absent sectors belong to a parent this
// package knows nothing about; read deltas with ReadLayout.
func NewSpill(ctx context.Context, opts SpillOptions) (*Spill, error) {
	if opts.Open == nil || opts.Budget == nil || opts.Dir == "" {
		return nil, fmt.Errorf("vhdstream %s: new spill: %w: Open, Budget and Dir are required", opts.Name, backend.ErrInvalid)
	}
	s := &Spill{
		opts:    opts,
		log:     opts.Logger,
		idle:    opts.Policy.WithDefaults().AttemptTimeout,
		exited:  make(chan struct{}),
		changed: make(chan struct{}),
		partial: -1,
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.log = s.log.With("disk", opts.Name)

	// The file first: a cache directory we cannot write to is found
	// without a GET.
	f, err := os.CreateTemp(opts.Dir, "vhdstream-*.spill")
	if err != nil {
		return nil, fmt.Errorf("vhdstream %s: new spill: create file: %w", opts.Name, err)
	}
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, fmt.Errorf("vhdstream %s: new spill: unlink file: %w", opts.Name, err)
	}
	s.file = f

	// The stream outlives NewSpill (it goes on until Close) but the
	// opening is a blocking call of the caller's, so ctx ending during it
	// aborts it.
	life, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s.cancel = cancel
	openCtx, openCancel := context.WithCancel(life)
	stop := context.AfterFunc(ctx, openCancel)
	var st *stream
	_, err = s.runner().Do(ctx, s.op, func(context.Context) *retry.Fault {
		var err error
		st, s.layout, err = s.open(openCtx)
		if err != nil {
			return &retry.Fault{Kind: classify(err), Err: err}
		}
		return nil
	})
	if !stop() && err == nil {
		st.close()
		err = fmt.Errorf("%s: %w", s.op(), ctx.Err())
	}
	if err == nil && s.layout.DiskType != DiskTypeDynamic {
		st.close()
		err = fmt.Errorf("%s: %w: disk type %d is not a dynamic VHD; a differencing VHD has no data of its own for absent sectors", s.op(), backend.ErrInvalid, s.layout.DiskType)
	}
	if err != nil {
		cancel()
		f.Close()
		if !wrapsSentinel(err) {
			err = fmt.Errorf("%w: %w", backend.ErrUnavailable, err)
		}
		return nil, fmt.Errorf("vhdstream %s: new spill: %w", opts.Name, err)
	}

	l := s.layout
	s.alloc = l.Allocated()
	s.stored = make([]uint64, (len(l.BAT)+63)/64)
	for _, b := range l.order {
		if s.inDisk(int(b)) {
			s.remaining++
		}
	}
	s.log.Info("vhdstream: layout read", "size", l.Size, "block_size", l.BlockSize,
		"blocks", len(l.BAT), "present", s.remaining, "allocated_bytes", s.alloc.Bytes(), "creator", l.Creator)
	go s.run(life, st)
	return s, nil
}

// Size implements backend.Disk: the footer's current size.
func (s *Spill) Size() int64 { return s.layout.Size }

// Allocated implements backend.Disk: the present blocks, clipped to Size.
func (s *Spill) Allocated() extent.Map { return s.alloc }

// Layout is what the stream's start said. It must not be modified.
func (s *Spill) Layout() *Layout { return s.layout }

// Done reports whether every present block has been stored.
func (s *Spill) Done() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.remaining == 0
}

// ReadAt implements backend.Disk: it fills all of p or returns an error,
// waiting (as long as ctx allows) for the stream to store the blocks p
// covers.
func (s *Spill) ReadAt(ctx context.Context, p []byte, off int64) error {
	size, n := s.layout.Size, int64(len(p))
	if off < 0 || off > size || n > size-off {
		return fmt.Errorf("vhdstream %s: read: %w: %d bytes at %d past disk size %d", s.opts.Name, backend.ErrInvalid, n, off, size)
	}
	if n == 0 {
		return nil
	}
	if err := s.wait(ctx, off, n); err != nil {
		return err
	}
	if !s.alloc.Overlaps(off, n) {
		clear(p)
		return nil
	}
	s.fileMu.RLock()
	defer s.fileMu.RUnlock()
	if s.file == nil {
		return s.errClosed()
	}
	got, err := s.file.ReadAt(p, off)
	if got < len(p) {
		if !errors.Is(err, io.EOF) {
			return fmt.Errorf("vhdstream %s: read %d bytes at %d: spill file: %w: %w", s.opts.Name, n, off, backend.ErrUnavailable, err)
		}
		// The file ends at the last byte written; nothing was written
		// after it, so the rest is zeros. (The file is not extended to
		// Size up front: 64 TiB is past some filesystems' file size limit
		// even when sparse.)
		clear(p[got:])
	}
	return nil
}

// wait returns when every present block in [off, off+n) is stored, or why
// it will not be.
func (s *Spill) wait(ctx context.Context, off, n int64) error {
	bs := s.layout.BlockSize
	b, last := int(off/bs), int((off+n-1)/bs)
	for {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return s.errClosed()
		}
		for b <= last && (s.layout.BAT[b] == Absent || s.isStored(b)) {
			b++
		}
		if b > last {
			s.mu.Unlock()
			return nil
		}
		if s.err != nil {
			err := s.err
			s.mu.Unlock()
			return fmt.Errorf("vhdstream %s: read %d bytes at %d: block %d not stored: %w", s.opts.Name, n, off, b, err)
		}
		ch := s.changed
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("vhdstream %s: read %d bytes at %d: waiting for block %d of the stream: %w: %w", s.opts.Name, n, off, b, backend.ErrUnavailable, ctx.Err())
		}
	}
}

// Close stops the stream, closes (and so frees) the file and returns its
// bytes to the budget. Reads waiting for the stream fail.
func (s *Spill) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.signal()
	s.mu.Unlock()
	s.cancel()
	<-s.exited
	s.fileMu.Lock()
	err := s.file.Close()
	s.file = nil
	s.fileMu.Unlock()
	s.opts.Budget.give(s.charged)
	s.charged = 0
	if err != nil {
		return fmt.Errorf("vhdstream %s: close: %w", s.opts.Name, err)
	}
	return nil
}

func (s *Spill) errClosed() error {
	return fmt.Errorf("vhdstream %s: read: %w: disk closed", s.opts.Name, backend.ErrInvalid)
}

// op names the stream in retry logs (whose logger carries the disk) and in
// errors, which the callers prefix with the disk.
func (s *Spill) op() string { return "stream" }

func (s *Spill) runner() retry.Runner {
	pol := s.opts.Policy
	// The idle watchdog (stream) bounds each wait instead; the attempt
	// itself may take as long as the disk takes to stream.
	pol.AttemptTimeout = 100 * 365 * 24 * time.Hour
	return retry.Runner{Policy: pol, Logger: s.log}
}

// open opens a stream and reads its layout.
func (s *Spill) open(ctx context.Context) (*stream, *Layout, error) {
	st, err := openStream(ctx, s.opts.Open, s.idle)
	if err != nil {
		return nil, nil, fmt.Errorf("open: %w", err)
	}
	l, err := ReadLayout(st)
	if err != nil {
		st.close()
		return nil, nil, err
	}
	return st, l, nil
}

// wrapsSentinel reports whether err already says which errno it is: an
// Open that answered "permission denied" must not also become EIO.
func wrapsSentinel(err error) bool {
	for _, e := range []error{backend.ErrUnavailable, backend.ErrInvalid, backend.ErrPermission, backend.ErrNotFound, backend.ErrUnsupported} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// classify says whether an error of opening or reading the stream is worth
// another attempt.
func classify(err error) retry.Kind {
	var f *retry.Fault
	switch {
	case errors.As(err, &f):
		return f.Kind
	case errors.Is(err, ErrMalformed), errors.Is(err, backend.ErrInvalid),
		errors.Is(err, backend.ErrPermission), errors.Is(err, backend.ErrNotFound):
		return retry.Stop
	}
	return retry.Again
}

// Local failures end the stream for good: reading it again would not help.
var (
	errBudget    = errors.New("spill budget exhausted")
	errSpillFile = errors.New("spill file")
)

// run stores the blocks, reopening the stream as needed, until every block
// is stored, the stream is given up on, or Close.
func (s *Spill) run(ctx context.Context, st *stream) {
	defer close(s.exited)
	defer func() {
		if st != nil {
			st.close()
		}
	}()
	for {
		broke := false
		_, err := s.runner().Do(ctx, s.op, func(context.Context) *retry.Fault {
			if st == nil {
				var l *Layout
				var err error
				if st, l, err = s.open(ctx); err != nil {
					return &retry.Fault{Kind: classify(err), Err: err}
				}
				if err := sameLayout(s.layout, l); err != nil {
					st.close()
					st = nil
					return &retry.Fault{Kind: retry.Stop, Err: err}
				}
				s.log.Info("vhdstream: stream reopened", "skipping_stored", len(s.layout.order)-s.remainingNow())
			}
			n, err := s.pass(st)
			if err == nil {
				s.trailer(st)
			}
			st.close()
			st = nil
			switch {
			case err == nil:
				return nil
			case errors.Is(err, errBudget), errors.Is(err, errSpillFile):
				return &retry.Fault{Kind: retry.Stop, Err: err}
			case n > 0 && ctx.Err() == nil:
				// Progress was made: reopen at once with a fresh count of
				// attempts (see Spill).
				s.log.Warn("vhdstream: stream broke, reopening", "stored_blocks", n, "err", err)
				broke = true
				return nil
			}
			return &retry.Fault{Kind: retry.Again, Err: err}
		})
		if err == nil && broke {
			continue
		}
		if err != nil {
			// Whatever the cause, blocks not stored cannot be read: EIO
			// for the reads that need them.
			if !errors.Is(err, backend.ErrUnavailable) {
				err = fmt.Errorf("%w: %w", backend.ErrUnavailable, err)
			}
			s.fail(err)
			return
		}
		s.log.Info("vhdstream: stream stored", "bytes_stored", s.charged)
		return
	}
}

// sameLayout checks that a reopened stream is the same VHD: the blocks
// already stored must still be where they were and mean what they meant.
// The unique id is not compared: a writer may make a new one per export.
func sameLayout(was, now *Layout) error {
	if was.Size != now.Size || was.BlockSize != now.BlockSize || was.DiskType != now.DiskType ||
		was.TableOffset != now.TableOffset || !slices.Equal(was.BAT, now.BAT) {
		return fmt.Errorf("%w: the VHD's layout changed between openings of the stream (size %d, was %d; block size %d, was %d; %d BAT entries, were %d)",
			backend.ErrUnavailable, now.Size, was.Size, now.BlockSize, was.BlockSize, len(now.BAT), len(was.BAT))
	}
	return nil
}

// pass reads the rest of one stream, positioned right after the BAT, and
// stores the blocks not stored yet, in file order. It returns how many it
// stored, and nil once nothing is left to store.
func (s *Spill) pass(st *stream) (int, error) {
	l := s.layout
	bitmap := make([]byte, l.BitmapSize)
	// Both powers of two, so pieces tile a block exactly.
	buf := make([]byte, min(l.BlockSize, 256<<10))
	zeros := make([]byte, SectorSize)
	stored := 0
	for _, b := range l.order {
		if !s.inDisk(int(b)) || s.isStoredLocked(int(b)) {
			continue
		}
		off := int64(l.BAT[b]) * SectorSize
		// checkBAT guarantees blocks in this order do not overlap, so
		// the stream has not passed off yet.
		if err := discard(st, off-st.pos, fmt.Sprintf("bytes before block %d at %d", b, off)); err != nil {
			return stored, fmt.Errorf("read at byte %d: %w", st.pos, err)
		}
		if err := s.storeBlock(st, int(b), bitmap, buf, zeros); err != nil {
			return stored, err
		}
		s.markStored(int(b))
		stored++
	}
	return stored, nil
}

// storeBlock reads block b (bitmap and data) and writes its sectors that
// have their bit set and are not all zeros.
func (s *Spill) storeBlock(st *stream, b int, bitmap, buf, zeros []byte) error {
	l := s.layout
	if err := readFull(st, bitmap, "bitmap"); err != nil {
		return fmt.Errorf("block %d at byte %d: %w", b, st.pos, err)
	}
	base := int64(b) * l.BlockSize
	limit := min(l.BlockSize, l.Size-base) // the rest of the last block is past the disk
	if s.partial != b {
		s.partial, s.partialCharged = b, 0
	}
	var written int64
	write := func(p []byte, in int64) error {
		written += int64(len(p))
		if written > s.partialCharged {
			need := written - s.partialCharged
			if !s.opts.Budget.take(need) {
				return fmt.Errorf("%w: %w: the --spill-size of %d bytes is used up by the stored disks (raise --spill-size, or read fewer disks at once)",
					backend.ErrUnavailable, errBudget, s.opts.Budget.Total())
			}
			s.partialCharged = written
			s.charged += need
		}
		if _, err := s.file.WriteAt(p, base+in); err != nil {
			return fmt.Errorf("%w: %w: %w", backend.ErrUnavailable, errSpillFile, err)
		}
		return nil
	}
	for in := int64(0); in < l.BlockSize; in += int64(len(buf)) {
		if err := readFull(st, buf, "data"); err != nil {
			return fmt.Errorf("block %d at byte %d: %w", b, st.pos, err)
		}
		if in >= limit {
			continue
		}
		// Write runs of kept sectors, one WriteAt per run.
		run := -1
		end := min(int64(len(buf)), limit-in)
		for j := int64(0); j < end; j += SectorSize {
			sec := (in + j) / SectorSize
			set := bitmap[sec/8]&(0x80>>(sec%8)) != 0
			data := buf[j:min(j+SectorSize, end)]
			keep := set && !bytes.Equal(data, zeros[:len(data)])
			if keep && run < 0 {
				run = int(j)
			}
			if !keep && run >= 0 {
				if err := write(buf[run:j], in+int64(run)); err != nil {
					return err
				}
				run = -1
			}
		}
		if run >= 0 {
			if err := write(buf[run:end], in+int64(run)); err != nil {
				return err
			}
		}
	}
	return nil
}

// trailer looks at the footer that should follow the last block. Its
// absence is tolerated: every block is stored by then, and a server that
// closes the connection right after the data has lost us nothing. A footer
// that is there but differs from the copy at byte 0 is logged, not fatal,
// for the same reason; the copy at byte 0 is the one the layout came from.
func (s *Spill) trailer(st *stream) {
	l := s.layout
	want := (l.End + SectorSize - 1) / SectorSize * SectorSize
	if n := len(l.order); n > 0 {
		last := l.order[n-1]
		if !s.inDisk(int(last)) {
			return // the stream was left before the blocks past the disk
		}
		want = int64(l.BAT[last])*SectorSize + l.Stride()
	}
	if st.pos > want {
		return
	}
	if err := discard(st, want-st.pos, "padding"); err != nil {
		s.log.Debug("vhdstream: no trailing footer", "err", err)
		return
	}
	var f [FooterSize]byte
	n, err := io.ReadFull(st, f[:])
	switch {
	case n == 0 && errors.Is(err, io.EOF):
		s.log.Debug("vhdstream: stream ended after the last block, without a trailing footer")
	case err != nil:
		s.log.Warn("vhdstream: trailing footer incomplete", "bytes", n, "err", err)
	case f != l.footer:
		s.log.Warn("vhdstream: trailing footer differs from the footer copy at byte 0")
	}
}

// inDisk reports whether block b holds bytes of the disk (a BAT may have
// entries past Size).
func (s *Spill) inDisk(b int) bool { return int64(b)*s.layout.BlockSize < s.layout.Size }

// isStored must be called with mu held.
func (s *Spill) isStored(b int) bool { return s.stored[b/64]&(1<<(b%64)) != 0 }

func (s *Spill) isStoredLocked(b int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.isStored(b)
}

func (s *Spill) remainingNow() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.remaining
}

func (s *Spill) markStored(b int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stored[b/64] |= 1 << (b % 64)
	s.remaining--
	s.partial, s.partialCharged = -1, 0
	s.signal()
}

// fail records why no more blocks will be stored and wakes the readers.
func (s *Spill) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil && !s.closed {
		s.log.Warn("vhdstream: stream given up", "err", err)
	}
	if s.err == nil {
		s.err = err
	}
	s.signal()
}

// signal wakes every waiting reader; mu must be held.
func (s *Spill) signal() {
	close(s.changed)
	s.changed = make(chan struct{})
}
