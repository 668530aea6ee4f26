package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// request is one command in flight on a connection.
type request struct {
	typ    uint16
	off    uint64
	length uint32
	buf    []byte // NBD_CMD_READ: the destination, len(buf) == length

	// Filled by the reader goroutine only, read after done is closed.
	covered []extent.Extent // sorted, disjoint, relative to off
	got     int64           // bytes covered
	srvErr  error           // an error chunk or simple error reply
	exts    []statusExtent  // NBD_CMD_BLOCK_STATUS
	err     error           // final outcome
	done    chan struct{}
}

type statusExtent struct {
	len   uint32
	flags uint32
}

// conn is one NBD connection in transmission phase: writers serialize on
// wmu, one reader goroutine matches replies to requests by handle. Any reply
// that does not fit a request exactly breaks the connection: every request
// on it fails and the client dials another.
type conn struct {
	r      *bufio.Reader
	w      io.Writer
	closer io.Closer
	info   exportInfo

	wmu sync.Mutex

	mu      sync.Mutex
	pending map[uint64]*request
	next    uint64
	broken  error // set once, when the connection stops being usable

	slots  chan struct{} // bounds requests in flight
	exited chan struct{} // closed when the reader goroutine returns
	hdr    [32]byte      // reader's scratch
}

func newConn(rw io.ReadWriter, closer io.Closer, info exportInfo, inFlight int) *conn {
	return &conn{
		r:       bufio.NewReaderSize(rw, 64<<10),
		w:       rw,
		closer:  closer,
		info:    info,
		pending: make(map[uint64]*request),
		slots:   make(chan struct{}, inFlight),
		exited:  make(chan struct{}),
	}
}

func (c *conn) start() { go c.readLoop() }

func (c *conn) isBroken() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.broken != nil
}

// fail marks the connection broken, closes it (which ends the reader) and
// fails every request in flight with err.
func (c *conn) fail(err error) {
	c.mu.Lock()
	if c.broken != nil {
		c.mu.Unlock()
		return
	}
	c.broken = err
	pend := c.pending
	c.pending = map[uint64]*request{}
	c.mu.Unlock()
	c.closer.Close()
	for _, rq := range pend {
		rq.err = err
		close(rq.done)
	}
}

func (c *conn) readLoop() {
	defer close(c.exited)
	for {
		if err := c.readReply(); err != nil {
			if !errors.Is(err, backend.ErrUnavailable) {
				err = fmt.Errorf("nbd: %w: %w", backend.ErrUnavailable, err)
			}
			c.fail(err)
			return
		}
	}
}

// do sends rq and waits for its outcome. When ctx ends first the connection
// is closed, and do waits for the reader to stop: the reader may be writing
// into rq.buf, the caller's memory, and must be done with it before do
// returns. One slow read costs the connection; the others on it are retried
// on a fresh one.
func (c *conn) do(ctx context.Context, rq *request) error {
	select {
	case c.slots <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-c.slots }()
	rq.done = make(chan struct{})

	c.mu.Lock()
	if c.broken != nil {
		err := c.broken
		c.mu.Unlock()
		return err
	}
	c.next++
	h := c.next
	c.pending[h] = rq
	c.mu.Unlock()

	var b [28]byte
	binary.BigEndian.PutUint32(b[0:], magicRequest)
	binary.BigEndian.PutUint16(b[6:], rq.typ)
	binary.BigEndian.PutUint64(b[8:], h)
	binary.BigEndian.PutUint64(b[16:], rq.off)
	binary.BigEndian.PutUint32(b[24:], rq.length)
	c.wmu.Lock()
	err := writeAll(c.w, b[:])
	c.wmu.Unlock()
	if err != nil {
		c.fail(err)
	}

	select {
	case <-rq.done:
		if rq.err != nil && c.isBroken() {
			// Another request broke the connection; the reader may be
			// mid-way through this one's buffer until it notices.
			<-c.exited
		}
		return rq.err
	case <-ctx.Done():
		c.fail(fmt.Errorf("nbd: %w: request abandoned: %w", backend.ErrUnavailable, ctx.Err()))
		<-c.exited
		<-rq.done
		return ctx.Err()
	}
}

// close sends NBD_CMD_DISC (best effort: the server may be gone) and
// closes the connection.
func (c *conn) close() {
	if !c.isBroken() {
		var b [28]byte
		binary.BigEndian.PutUint32(b[0:], magicRequest)
		binary.BigEndian.PutUint16(b[6:], cmdDisc)
		c.wmu.Lock()
		_, err := c.w.Write(b[:])
		c.wmu.Unlock()
		c.mu.Lock()
		idle := len(c.pending) == 0
		c.mu.Unlock()
		// The server counts the connection until it has seen it end: wait
		// (briefly) for it to hang up, so that the slot this frees in a
		// host's limit is free on the server too when the next client
		// dials (xapi-nbd refuses a 17th).
		if err == nil && idle {
			t := time.NewTimer(discWait)
			select {
			case <-c.exited:
			case <-t.C:
			}
			t.Stop()
		}
	}
	c.fail(fmt.Errorf("nbd: %w: connection closed", backend.ErrUnavailable))
	<-c.exited
}

// discWait bounds close's wait for the server to hang up after
// NBD_CMD_DISC.
const discWait = 2 * time.Second

// lookup finds the request a reply names; a handle not in flight is a
// violation (a reply to nothing, or a second final reply).
func (c *conn) lookup(h uint64, remove bool) (*request, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	rq, ok := c.pending[h]
	if !ok {
		return nil, violation("reply for handle %d not in flight", h)
	}
	if remove {
		delete(c.pending, h)
	}
	return rq, nil
}

func (c *conn) finish(rq *request, err error) {
	rq.err = err
	close(rq.done)
}

func readFull(r io.Reader, b []byte) error {
	if _, err := io.ReadFull(r, b); err != nil {
		return fmt.Errorf("nbd: reply: %w: %w", backend.ErrUnavailable, err)
	}
	return nil
}

// readReply reads and applies one reply or chunk. A returned error breaks
// the connection.
func (c *conn) readReply() error {
	h := c.hdr[:]
	if err := readFull(c.r, h[:4]); err != nil {
		return err
	}
	switch binary.BigEndian.Uint32(h) {
	case magicSimple:
		return c.readSimple()
	case magicChunk:
		if !c.info.structured {
			return violation("structured reply not negotiated")
		}
		return c.readChunk()
	}
	return violation("bad reply magic %#x", binary.BigEndian.Uint32(h))
}

func (c *conn) readSimple() error {
	h := c.hdr[4:16]
	if err := readFull(c.r, h); err != nil {
		return err
	}
	errno := binary.BigEndian.Uint32(h)
	rq, err := c.lookup(binary.BigEndian.Uint64(h[4:]), true)
	if err != nil {
		return err
	}
	if errno != 0 {
		c.finish(rq, &errnoError{errno: errno})
		return nil
	}
	switch {
	case rq.typ == cmdRead && c.info.structured:
		return c.lost(rq, violation("simple reply with data to a read on a structured connection"))
	case rq.typ == cmdRead:
		if err := readFull(c.r, rq.buf); err != nil {
			return c.lost(rq, err)
		}
	case rq.typ == cmdBlockStatus:
		return c.lost(rq, violation("simple success reply to block status"))
	}
	c.finish(rq, nil)
	return nil
}

// lost fails a request already taken out of pending along with the
// connection.
func (c *conn) lost(rq *request, err error) error {
	c.finish(rq, err)
	return err
}

func (c *conn) readChunk() error {
	h := c.hdr[4:20]
	if err := readFull(c.r, h); err != nil {
		return err
	}
	flags := binary.BigEndian.Uint16(h)
	typ := binary.BigEndian.Uint16(h[2:])
	handle := binary.BigEndian.Uint64(h[4:])
	n := binary.BigEndian.Uint32(h[12:])
	done := flags&chunkFlagDone != 0
	rq, err := c.lookup(handle, done)
	if err != nil {
		return err
	}
	fail := func(err error) error {
		if !done {
			// Still pending: fail() takes it with the connection.
			return err
		}
		return c.lost(rq, err)
	}
	// No chunk is larger than the request's data plus its offset; an
	// error chunk is bounded by its message limit. Anything bigger is a
	// server trying to make us read garbage as data.
	switch {
	case typ == chunkNone:
		if n != 0 || !done {
			return fail(violation("NONE chunk of %d bytes, done=%v", n, done))
		}
	case typ == chunkOffsetData:
		if rq.typ != cmdRead || n <= 8 || n-8 > rq.length {
			return fail(violation("OFFSET_DATA chunk of %d bytes for a %d-byte request", n, rq.length))
		}
		if err := readFull(c.r, c.hdr[:8]); err != nil {
			return fail(err)
		}
		off := binary.BigEndian.Uint64(c.hdr[:8])
		rel, err := rq.cover(off, uint64(n-8))
		if err != nil {
			return fail(err)
		}
		if err := readFull(c.r, rq.buf[rel:rel+int64(n-8)]); err != nil {
			return fail(err)
		}
	case typ == chunkOffsetHole:
		if rq.typ != cmdRead || n != 12 {
			return fail(violation("OFFSET_HOLE chunk of %d bytes", n))
		}
		if err := readFull(c.r, c.hdr[:12]); err != nil {
			return fail(err)
		}
		off := binary.BigEndian.Uint64(c.hdr[:8])
		hl := binary.BigEndian.Uint32(c.hdr[8:12])
		rel, err := rq.cover(off, uint64(hl))
		if err != nil {
			return fail(err)
		}
		clear(rq.buf[rel : rel+int64(hl)])
	case typ == chunkBlockStatus:
		if rq.typ != cmdBlockStatus || n < 12 || (n-4)%8 != 0 || (n-4)/8 > maxStatus/defaultAlign {
			return fail(violation("BLOCK_STATUS chunk of %d bytes", n))
		}
		// Read extent by extent: a hostile length costs no memory
		// until the bytes arrive.
		if err := readFull(c.r, c.hdr[:4]); err != nil {
			return fail(err)
		}
		if id := binary.BigEndian.Uint32(c.hdr[:4]); id != c.info.metaID {
			return fail(violation("block status for context %d", id))
		}
		if rq.exts != nil {
			return fail(violation("second BLOCK_STATUS chunk for one context"))
		}
		for i := uint32(4); i < n; i += 8 {
			if err := readFull(c.r, c.hdr[:8]); err != nil {
				return fail(err)
			}
			rq.exts = append(rq.exts, statusExtent{len: binary.BigEndian.Uint32(c.hdr[:4]), flags: binary.BigEndian.Uint32(c.hdr[4:8])})
		}
	case typ&chunkErrBit != 0:
		if n < 6 || n > 6+maxErrMsg+8 {
			return fail(violation("error chunk of %d bytes", n))
		}
		b := make([]byte, n)
		if err := readFull(c.r, b); err != nil {
			return fail(err)
		}
		errno := binary.BigEndian.Uint32(b)
		ml := int(binary.BigEndian.Uint16(b[4:]))
		if 6+ml > len(b) {
			return fail(violation("error message of %d bytes in a %d-byte chunk", ml, n))
		}
		if errno == 0 {
			return fail(violation("error chunk with error 0"))
		}
		// The first error is the one reported; the offset of
		// ERROR_OFFSET is not needed, since the whole read fails.
		if rq.srvErr == nil {
			rq.srvErr = &errnoError{errno: errno, msg: string(b[6 : 6+ml])}
		}
	default:
		return fail(violation("unknown chunk type %d", typ))
	}
	if !done {
		return nil
	}
	switch {
	case rq.srvErr != nil:
		c.finish(rq, rq.srvErr)
	case rq.typ == cmdRead && rq.got != int64(rq.length):
		return c.lost(rq, violation("read of %d bytes answered with %d", rq.length, rq.got))
	case rq.typ == cmdBlockStatus && len(rq.exts) == 0:
		return c.lost(rq, violation("block status answered without extents"))
	default:
		c.finish(rq, nil)
	}
	return nil
}

// cover records that [off, off+n) of the disk arrived and returns its
// position in the request's buffer. It must lie inside the request and
// touch no byte already covered: libnbd 1.14 accepts overlapping chunks and
// returns wrong bytes; we refuse them.
func (rq *request) cover(off, n uint64) (int64, error) {
	if n == 0 || off < rq.off || off-rq.off > uint64(rq.length) || n > uint64(rq.length)-(off-rq.off) {
		return 0, violation("chunk [%d,+%d) outside request [%d,+%d)", off, n, rq.off, rq.length)
	}
	e := extent.Extent{Off: int64(off - rq.off), Len: int64(n)}
	i, _ := slices.BinarySearchFunc(rq.covered, e.Off, func(x extent.Extent, t int64) int {
		switch {
		case x.Off < t:
			return -1
		case x.Off > t:
			return 1
		}
		return 0
	})
	if (i > 0 && rq.covered[i-1].End() > e.Off) || (i < len(rq.covered) && rq.covered[i].Off < e.End()) {
		return 0, violation("chunk [%d,+%d) overlaps another", off, n)
	}
	// Chunks usually arrive in order: extend the last extent instead of
	// growing the list.
	if i > 0 && i == len(rq.covered) && rq.covered[i-1].End() == e.Off {
		rq.covered[i-1].Len += e.Len
	} else {
		rq.covered = slices.Insert(rq.covered, i, e)
	}
	rq.got += e.Len
	return e.Off, nil
}
