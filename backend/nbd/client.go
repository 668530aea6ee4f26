// Package nbd is a read-only NBD client for snapshot disks: fixed newstyle
// handshake, STARTTLS, NBD_OPT_GO with a fallback to NBD_OPT_EXPORT_NAME,
// structured replies and base:allocation block status when the server
// offers them and simple replies when not (xapi-nbd offers neither).
//
// It trusts nothing the server sends: every reply must match a request in
// flight, in handle, length and (for structured chunks) coverage; anything
// else breaks the connection, and the read is retried on a new one through
// backend/retry. A read returns the disk's bytes or an error, never other
// bytes.
package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"

	"golang.org/x/sync/errgroup"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/meter"
	"github.com/vmexportfs/vmexportfs/backend/retry"
)

// Defaults.
const (
	DefaultConnections = 4
	// MaxConnections is xapi-nbd's limit per host, and so ours per client.
	MaxConnections  = 16
	DefaultInFlight = 4
	// maxRequest is the largest read sent: 2 MiB, as Xen Orchestra does.
	maxRequest = 2 << 20
	// maxStatus is the largest block status query.
	maxStatus = 1 << 30
)

// Options say where an export is and how to read it.
type Options struct {
	Addr   string // host:port
	Export string // export name, opaque (xapi: "/<vdi>?session_id=...")
	// TLS, when set, makes the client send STARTTLS and refuse a server
	// that will not. Its MinVersion is raised to TLS 1.2; ServerName and
	// RootCAs should be the subject and cert get_nbd_info returns.
	TLS *tls.Config
	// Connections is how many connections a client may open (default 4,
	// at most MaxConnections). They are opened on demand.
	Connections int
	// InFlight is how many requests each connection carries at once.
	InFlight int
	// Host, when set, bounds connections across all clients to one host.
	Host *HostLimit
	// NoStructured does not ask for structured replies (tests, and
	// servers known to mishandle them).
	NoStructured bool
	Policy       retry.Policy
	Logger       *slog.Logger
	// Dialer dials the TCP connection; nil uses net.Dialer.
	Dialer func(ctx context.Context, addr string) (net.Conn, error)
}

// HostLimit is a count of connections shared by the clients of one host
// (xapi-nbd serves at most 16 per host).
type HostLimit struct{ sem chan struct{} }

// NewHostLimit allows n connections in total.
func NewHostLimit(n int) *HostLimit { return &HostLimit{sem: make(chan struct{}, n)} }

// Client is one opened export. It implements backend.Disk.
type Client struct {
	opts   Options
	info   exportInfo
	align  int64
	maxReq int64
	runner retry.Runner
	alloc  extent.Map

	slots  []slot
	rr     atomic.Uint64
	live   atomic.Int32 // slots holding a connection
	closed atomic.Bool
}

type slot struct {
	mu sync.Mutex
	c  *conn
}

var _ backend.Disk = (*Client)(nil)

// Dial opens the first connection (so a wrong address, export or
// certificate fails here) and, when the server offers block status, reads
// the allocation map.
func Dial(ctx context.Context, opts Options) (*Client, error) {
	if opts.Connections <= 0 {
		opts.Connections = DefaultConnections
	}
	opts.Connections = min(opts.Connections, MaxConnections)
	if opts.InFlight <= 0 {
		opts.InFlight = DefaultInFlight
	}
	if opts.TLS != nil {
		opts.TLS = opts.TLS.Clone()
		opts.TLS.MinVersion = max(opts.TLS.MinVersion, tls.VersionTLS12)
	}
	cl := &Client{opts: opts, slots: make([]slot, opts.Connections)}
	cl.runner = retry.Runner{Policy: opts.Policy, Logger: opts.Logger}
	var first *conn
	if err := cl.run(ctx, func() string { return "nbd: connect to " + opts.Addr }, func(ctx context.Context) *retry.Fault {
		c, err := cl.connect(ctx)
		if err != nil {
			return classify(err)
		}
		first = c
		return nil
	}); err != nil {
		return nil, err
	}
	cl.info = first.info
	cl.slots[0].c = first
	cl.live.Add(1)
	cl.align = defaultAlign
	if m := int64(cl.info.minBlock); m > cl.align {
		cl.align = m
	}
	cl.maxReq = maxRequest
	if m := int64(cl.info.maxBlock); m > 0 && m < cl.maxReq {
		cl.maxReq = m / cl.align * cl.align
	}
	if cl.maxReq < cl.align {
		cl.Close()
		return nil, fmt.Errorf("nbd: %s: %w: maximum block size %d below alignment %d", opts.Addr, backend.ErrUnsupported, cl.info.maxBlock, cl.align)
	}
	cl.alloc = extent.Full(cl.info.size)
	if cl.info.hasMeta {
		m, err := cl.blockStatus(ctx)
		if err != nil {
			cl.Close()
			return nil, err
		}
		cl.alloc = m
	}
	return cl, nil
}

// Size is the export's size.
func (cl *Client) Size() int64 { return cl.info.size }

// Allocated is the map read with block status at Dial, or the whole disk
// when the server has none.
func (cl *Client) Allocated() extent.Map { return cl.alloc }

// Structured says whether structured replies were negotiated.
func (cl *Client) Structured() bool { return cl.info.structured }

// BlockStatus says whether base:allocation was negotiated.
func (cl *Client) BlockStatus() bool { return cl.info.hasMeta }

// Close disconnects every connection; reads after it fail.
func (cl *Client) Close() error {
	cl.closed.Store(true)
	var wg sync.WaitGroup
	for i := range cl.slots {
		s := &cl.slots[i]
		wg.Go(func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.c != nil {
				s.c.close()
				cl.release()
				s.c = nil
				cl.live.Add(-1)
			}
		})
	}
	wg.Wait()
	return nil
}

var errClosed = fmt.Errorf("nbd: %w: disk closed", backend.ErrUnavailable)

func (cl *Client) acquire(ctx context.Context) error {
	if cl.opts.Host == nil {
		return nil
	}
	select {
	case cl.opts.Host.sem <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (cl *Client) release() {
	if cl.opts.Host != nil {
		<-cl.opts.Host.sem
	}
}

// connect dials and negotiates one connection.
func (cl *Client) connect(ctx context.Context) (*conn, error) {
	if err := cl.acquire(ctx); err != nil {
		return nil, err
	}
	c, err := cl.connect1(ctx)
	if err != nil {
		cl.release()
		return nil, err
	}
	return c, nil
}

func (cl *Client) connect1(ctx context.Context) (*conn, error) {
	dial := cl.opts.Dialer
	if dial == nil {
		dial = func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr)
		}
	}
	nc, err := dial(ctx, cl.opts.Addr)
	if err != nil {
		return nil, fmt.Errorf("nbd: dial %s: %w: %w", cl.opts.Addr, backend.ErrUnavailable, err)
	}
	nc = cl.opts.Policy.Meter.Conn(meter.NBD, nc)
	// The handshake runs under the attempt's deadline.
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	defer stop()
	var closer io.Closer = nc
	startTLS := func() (io.ReadWriter, error) {
		tc := tls.Client(nc, cl.opts.TLS)
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, &tlsError{err}
		}
		closer = tc
		return tc, nil
	}
	rw, info, err := negotiate(nc, negotiateConfig{export: cl.opts.Export, tls: cl.opts.TLS != nil, structured: !cl.opts.NoStructured}, startTLS)
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("nbd: %s: %w", cl.opts.Addr, err)
	}
	if !stop() {
		nc.Close()
		return nil, fmt.Errorf("nbd: %s: %w: %w", cl.opts.Addr, backend.ErrUnavailable, ctx.Err())
	}
	c := newConn(rw, closer, info, cl.opts.InFlight)
	c.start()
	return c, nil
}

// tlsError is a failed TLS handshake: a bad certificate is not retried.
type tlsError struct{ err error }

func (e *tlsError) Error() string { return "nbd: TLS handshake: " + e.err.Error() }
func (e *tlsError) Unwrap() error { return e.err }

// classify turns an error into a retry fault: protocol violations and
// transport errors are worth retrying, refusals and bad certificates not.
func classify(err error) *retry.Fault {
	var te *tlsError
	var ref *refusal
	var ee *errnoError
	switch {
	case errors.Is(err, errClosed):
		return &retry.Fault{Kind: retry.Stop, Err: err}
	case errors.As(err, &te):
		var cv *tls.CertificateVerificationError
		if errors.As(err, &cv) {
			return &retry.Fault{Kind: retry.Stop, Err: fmt.Errorf("%w: %w", backend.ErrPermission, err)}
		}
		return &retry.Fault{Kind: retry.Again, Err: fmt.Errorf("%w: %w", backend.ErrUnavailable, err)}
	case errors.As(err, &ref):
		return &retry.Fault{Kind: retry.Stop, Err: err}
	case errors.As(err, &ee):
		if ee.retryable() {
			return &retry.Fault{Kind: retry.Again, Err: err}
		}
		return &retry.Fault{Kind: retry.Stop, Err: err}
	case errors.Is(err, backend.ErrPermission), errors.Is(err, backend.ErrUnsupported):
		return &retry.Fault{Kind: retry.Stop, Err: err}
	}
	if !errors.Is(err, backend.ErrUnavailable) {
		err = fmt.Errorf("%w: %w", backend.ErrUnavailable, err)
	}
	return &retry.Fault{Kind: retry.Again, Err: err}
}

// run runs attempts through the retry runner; exhausted attempts wrap
// backend.ErrUnavailable, as every transport's do.
func (cl *Client) run(ctx context.Context, op func() string, attempt func(context.Context) *retry.Fault) error {
	last, err := cl.runner.Do(ctx, op, attempt)
	if err == nil || !errors.Is(err, retry.ErrExhausted) {
		return err
	}
	return fmt.Errorf("%s: %w after %d attempts: %w", op(), backend.ErrUnavailable, cl.runner.Policy.WithDefaults().Attempts, last)
}

// pick returns a live connection, dialing one into an empty or broken slot.
// Slots fill round-robin, so load spreads once all are open. When the host
// has no connection to spare (its limit is shared with other disks), a
// client that has one shares it rather than wait for a slot.
func (cl *Client) pick(ctx context.Context) (*conn, error) {
	if cl.closed.Load() {
		return nil, errClosed
	}
	i := int((cl.rr.Add(1) - 1) % uint64(len(cl.slots))) // slot 0 first: the connection Dial made
	s := &cl.slots[i]
	s.mu.Lock()
	defer s.mu.Unlock()
	if cl.closed.Load() {
		return nil, errClosed
	}
	if s.c != nil && !s.c.isBroken() {
		return s.c, nil
	}
	if s.c != nil {
		s.c.close()
		cl.release()
		s.c = nil
		cl.live.Add(-1)
	}
	// Room on the host: a client that has a connection to share takes room
	// only if there is some now; one that has none waits for it.
	held := false
	if cl.live.Load() > 0 {
		if held = cl.tryAcquire(); !held {
			if c := cl.anyLive(i); c != nil {
				return c, nil
			}
		}
	}
	if !held {
		if err := cl.acquire(ctx); err != nil {
			return nil, err
		}
	}
	c, err := cl.connect1(ctx)
	if err != nil {
		cl.release()
		if errors.Is(err, ErrHangUp) && cl.live.Load() > 0 {
			// The host is full (other clients hold its connections):
			// make do with the ones this disk has.
			if c := cl.anyLive(i); c != nil {
				return c, nil
			}
		}
		return nil, err
	}
	// A snapshot does not change: a reconnection that sees another export
	// is a server we must not read from.
	if c.info.size != cl.info.size || c.info.structured != cl.info.structured || c.info.hasMeta != cl.info.hasMeta || c.info.metaID != cl.info.metaID && cl.info.hasMeta {
		c.close()
		cl.release()
		return nil, fmt.Errorf("nbd: %s: %w: export changed on reconnection (size %d, was %d)", cl.opts.Addr, backend.ErrUnavailable, c.info.size, cl.info.size)
	}
	s.c = c
	cl.live.Add(1)
	return c, nil
}

// tryAcquire takes room for a connection on the host if there is some now.
func (cl *Client) tryAcquire() bool {
	if cl.opts.Host == nil {
		return true
	}
	select {
	case cl.opts.Host.sem <- struct{}{}:
		return true
	default:
		return false
	}
}

// anyLive is a live connection of another slot than skip, or nil. Slots
// are only tried, never waited for: the caller holds its own slot's lock.
func (cl *Client) anyLive(skip int) *conn {
	for j := range cl.slots {
		if j == skip {
			continue
		}
		o := &cl.slots[j]
		if !o.mu.TryLock() {
			continue
		}
		c := o.c
		o.mu.Unlock()
		if c != nil && !c.isBroken() {
			return c
		}
	}
	return nil
}

// ReadAt fills p from off. The range is widened to the alignment, split
// into requests of at most 2 MiB that run in parallel over the
// connections, each retried on its own.
func (cl *Client) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off < 0 || off > cl.info.size || int64(len(p)) > cl.info.size-off {
		return fmt.Errorf("nbd: read [%d,+%d) of a %d-byte disk: %w", off, len(p), cl.info.size, backend.ErrInvalid)
	}
	if len(p) == 0 {
		return nil
	}
	start := off / cl.align * cl.align
	end := min((off+int64(len(p))+cl.align-1)/cl.align*cl.align, cl.info.size)
	buf := p
	if start != off || end != off+int64(len(p)) {
		buf = make([]byte, end-start)
	}
	var g errgroup.Group // not WithContext: cancelling siblings would cost their connections
	g.SetLimit(len(cl.slots) * cl.opts.InFlight)
	for o := start; o < end; o += cl.maxReq {
		n := min(cl.maxReq, end-o)
		part := buf[o-start : o-start+n]
		g.Go(func() error { return cl.read(ctx, part, o) })
	}
	if err := g.Wait(); err != nil {
		return err
	}
	if &buf[0] != &p[0] {
		copy(p, buf[off-start:])
	}
	return nil
}

func (cl *Client) read(ctx context.Context, p []byte, off int64) error {
	return cl.run(ctx, func() string { return fmt.Sprintf("nbd: read [%d,+%d) from %s", off, len(p), cl.opts.Addr) }, func(ctx context.Context) *retry.Fault {
		c, err := cl.pick(ctx)
		if err != nil {
			return classify(err)
		}
		mr := cl.opts.Policy.Meter.Begin(meter.NBD)
		if err := c.do(ctx, &request{typ: cmdRead, off: uint64(off), length: uint32(len(p)), buf: p}); err != nil {
			mr.End(true)
			return classify(err)
		}
		mr.Received(len(p))
		mr.End(false)
		return nil
	})
}

// blockStatus walks the disk with NBD_CMD_BLOCK_STATUS. A range is left out
// of the map only when base:allocation promises it reads as zeros
// (NBD_STATE_ZERO, which servers set on holes): NBD_STATE_HOLE alone makes
// no promise about the bytes, and the map must never hide data.
func (cl *Client) blockStatus(ctx context.Context) (extent.Map, error) {
	var data []extent.Extent
	for off := int64(0); off < cl.info.size; {
		n := min(int64(maxStatus), cl.info.size-off)
		var rq *request
		err := cl.run(ctx, func() string { return fmt.Sprintf("nbd: block status at %d from %s", off, cl.opts.Addr) }, func(ctx context.Context) *retry.Fault {
			c, err := cl.pick(ctx)
			if err != nil {
				return classify(err)
			}
			rq = &request{typ: cmdBlockStatus, off: uint64(off), length: uint32(n)}
			mr := cl.opts.Policy.Meter.Begin(meter.NBD)
			err = c.do(ctx, rq)
			mr.End(err != nil)
			if err != nil {
				return classify(err)
			}
			return nil
		})
		if err != nil {
			return extent.Map{}, err
		}
		pos := off
		for _, e := range rq.exts {
			if e.len == 0 {
				return extent.Map{}, fmt.Errorf("nbd: %s: %w: block status extent of length 0", cl.opts.Addr, backend.ErrUnavailable)
			}
			l := min(int64(e.len), cl.info.size-pos) // the last may run past the request
			if e.flags&stateZero == 0 {
				data = append(data, extent.Extent{Off: pos, Len: l})
			}
			pos += l
			if pos >= cl.info.size {
				break
			}
		}
		off = pos
	}
	return extent.Normalize(data, cl.info.size)
}
