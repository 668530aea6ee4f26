// Package meter counts what a mount's transports do on the platform:
// requests, bytes received, how long requests take, faults by kind, retries
// and the connections open. Transports add to it (package retry, httprange,
// nbd); the command reads it for the stats xattr and for Prometheus. A nil
// *Meter counts nothing, so code that was given none needs no checks.
//
// Its labels are closed sets (the platform's scheme, a transport, a fault
// kind): never a URL, a host or an error text, which could carry a secret
// or grow without bound.
package meter

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Transports a request can go over.
const (
	HTTP = "http"
	NBD  = "nbd"
)

// Fault kinds: what went wrong in a failed attempt.
const (
	FaultTimeout    = "timeout"    // the attempt's deadline passed
	FaultConnection = "connection" // refused, reset or cut connection
	FaultStatus     = "status"     // the platform answered with an error status
	FaultAuth       = "auth"       // credentials refused
	FaultProtocol   = "protocol"   // an answer that is not what was asked (short body, wrong range, bad reply)
)

// FaultKinds are every kind, in the order they are shown.
var FaultKinds = []string{FaultTimeout, FaultConnection, FaultStatus, FaultAuth, FaultProtocol}

// Kinder is an error that knows its fault kind (an HTTP status error).
type Kinder interface{ FaultKind() string }

// Meter is one mount's counters. Safe for concurrent use.
type Meter struct {
	platform string
	start    time.Time

	mu         sync.Mutex
	transports map[string]*transport
	faults     map[string]*atomic.Int64
	gauges     map[string]*Gauge

	retries, exhausted atomic.Int64
}

// New returns a Meter for a mount of platform (its scheme: "coriolis").
func New(platform string) *Meter {
	return &Meter{
		platform:   platform,
		start:      time.Now(),
		transports: map[string]*transport{},
		faults:     map[string]*atomic.Int64{},
		gauges:     map[string]*Gauge{},
	}
}

// Platform is the scheme the Meter was made for.
func (m *Meter) Platform() string {
	if m == nil {
		return ""
	}
	return m.platform
}

type transport struct {
	requests, failed, bytes atomic.Int64
	opened                  atomic.Int64
	open                    atomic.Int64
	durations               Histogram
}

func (m *Meter) transport(name string) *transport {
	m.mu.Lock()
	defer m.mu.Unlock()
	t := m.transports[name]
	if t == nil {
		t = &transport{}
		m.transports[name] = t
	}
	return t
}

// Request is one request in flight; End it once, when its answer has been
// read (or it failed).
type Request struct {
	t     *transport
	start time.Time
	done  atomic.Bool
}

// Begin counts a request over transport name.
func (m *Meter) Begin(name string) *Request {
	if m == nil {
		return nil
	}
	t := m.transport(name)
	t.requests.Add(1)
	return &Request{t: t, start: time.Now()}
}

// Received counts n bytes of the request's answer.
func (r *Request) Received(n int) {
	if r != nil && n > 0 {
		r.t.bytes.Add(int64(n))
	}
}

// End records the request's duration; failed says no usable answer came.
// Only the first call counts.
func (r *Request) End(failed bool) {
	if r == nil || r.done.Swap(true) {
		return
	}
	if failed {
		r.t.failed.Add(1)
	}
	r.t.durations.Observe(time.Since(r.start))
}

// Fault counts a failed attempt, classified by its error; renew says the
// attempt was refused for its credentials.
func (m *Meter) Fault(err error, renew bool) {
	if m == nil || err == nil {
		return
	}
	kind := Classify(err)
	if renew {
		kind = FaultAuth
	}
	m.mu.Lock()
	c := m.faults[kind]
	if c == nil {
		c = &atomic.Int64{}
		m.faults[kind] = c
	}
	m.mu.Unlock()
	c.Add(1)
}

// Retry counts an attempt made again after a fault.
func (m *Meter) Retry() {
	if m != nil {
		m.retries.Add(1)
	}
}

// Exhausted counts an operation that failed after all its attempts: what
// becomes an EIO.
func (m *Meter) Exhausted() {
	if m != nil {
		m.exhausted.Add(1)
	}
}

// Classify names the kind of a fault's error.
func Classify(err error) string {
	var k Kinder
	var ne net.Error
	switch {
	case errors.As(err, &k):
		return k.FaultKind()
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded),
		errors.As(err, &ne) && ne.Timeout():
		return FaultTimeout
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed),
		errors.As(err, new(*net.OpError)):
		return FaultConnection
	}
	return FaultProtocol
}

// Conn counts one connection open over transport name until it is closed.
func (m *Meter) Conn(name string, c net.Conn) net.Conn {
	if m == nil {
		return c
	}
	t := m.transport(name)
	t.opened.Add(1)
	t.open.Add(1)
	return &countedConn{Conn: c, t: t}
}

type countedConn struct {
	net.Conn
	t      *transport
	closed atomic.Bool
}

func (c *countedConn) Close() error {
	if !c.closed.Swap(true) {
		c.t.open.Add(-1)
	}
	return c.Conn.Close()
}

// Gauge is a count of something a platform holds open (oVirt image
// transfers), by a name of the platform's choosing.
type Gauge struct{ n atomic.Int64 }

// Add changes the gauge by d; a nil Gauge ignores it.
func (g *Gauge) Add(d int64) {
	if g != nil {
		g.n.Add(d)
	}
}

// Gauge returns the gauge called name, made on first use: a resource the
// platform holds ("transfers"). name is a constant of the platform's code.
func (m *Meter) Gauge(name string) *Gauge {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	g := m.gauges[name]
	if g == nil {
		g = &Gauge{}
		m.gauges[name] = g
	}
	return g
}

// Reading is the counters at one moment.
type Reading struct {
	Platform   string
	Uptime     time.Duration
	Transports []TransportReading // sorted by name
	Faults     map[string]int64   // by kind; kinds never seen are absent
	Retries    int64
	Exhausted  int64
	Held       map[string]int64 // the platform's gauges
}

// TransportReading is one transport's counters.
type TransportReading struct {
	Name             string
	Requests, Failed int64
	BytesReceived    int64
	ConnsOpened      int64 // connections ever opened
	ConnsOpen        int64 // open now
	Durations        HistogramReading
}

// Read returns the counters now; a nil Meter reads as empty.
func (m *Meter) Read() Reading {
	if m == nil {
		return Reading{Faults: map[string]int64{}, Held: map[string]int64{}}
	}
	r := Reading{
		Platform:  m.platform,
		Uptime:    time.Since(m.start),
		Faults:    map[string]int64{},
		Held:      map[string]int64{},
		Retries:   m.retries.Load(),
		Exhausted: m.exhausted.Load(),
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for name, t := range m.transports {
		r.Transports = append(r.Transports, TransportReading{
			Name: name, Requests: t.requests.Load(), Failed: t.failed.Load(), BytesReceived: t.bytes.Load(),
			ConnsOpened: t.opened.Load(), ConnsOpen: t.open.Load(), Durations: t.durations.Read(),
		})
	}
	sort.Slice(r.Transports, func(i, j int) bool { return r.Transports[i].Name < r.Transports[j].Name })
	for kind, c := range m.faults {
		r.Faults[kind] = c.Load()
	}
	for name, g := range m.gauges {
		r.Held[name] = g.n.Load()
	}
	return r
}
