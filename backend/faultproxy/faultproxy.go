// Package faultproxy is an HTTPS reverse proxy that injects the faults a disk
// export server or the network between can produce, and the answers a hostile
// server gives, in the manner of net/http/httptest: tests put it in front of a
// platform simulator and point the client at it. Faults hit disk data
// requests (GET with a Range header); everything else passes through, except
// Restart, which drops everything, Unauthorized, which hits any request, and
// RedirectLogin, which hits POSTs.
package faultproxy

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmexportfs/vmexportfs/backend/internal/testpki"
)

// Fault is one kind of misbehaviour.
type Fault int

const (
	None Fault = iota
	// Reset sends the headers and part of the body, then resets the
	// connection.
	Reset
	// Stall sends nothing for StallFor, longer than the client's request
	// deadline, then resets.
	Stall
	// ServerError answers 503 to a burst of BurstLen data requests.
	ServerError
	// ShortBody announces the full Content-Length and sends less.
	ShortBody
	// IgnoreRange answers 200 with the whole disk, as a server without
	// Range support does.
	IgnoreRange
	// WrongRange answers 206 for a range 512 bytes off from the one asked,
	// with an honest Content-Range.
	WrongRange
	// Unauthorized answers 401 to a burst of BurstLen requests of any kind,
	// logins included.
	Unauthorized
	// Restart makes the backend unreachable for RestartFor: every request
	// and connection in that window is dropped.
	Restart

	// The hostile ones: answers built to pass a careless client's checks.

	// GzipEncoding answers 206 with the right Content-Range and a body
	// that is the range gzip-compressed (Content-Encoding: gzip), cut or
	// padded to the length asked for, so that only the encoding gives it
	// away.
	GzipEncoding
	// Multipart answers a single range with a multipart/byteranges body
	// whose Content-Length and Content-Range claim the plain range: a
	// client reading Content-Length bytes gets the framing.
	Multipart
	// WrongTotal answers the right bytes with a Content-Range total that
	// differs from the disk's size (a disk replaced under its id).
	WrongTotal
	// Unsatisfiable answers 416 to a range inside the disk.
	Unsatisfiable
	// RedirectHTTP answers 302 to the same path on a plain-HTTP port of
	// the same host (the proxy's own catcher).
	RedirectHTTP
	// RedirectOrigin answers 302 to the same path on another HTTPS port of
	// the same host, with a certificate the client trusts.
	RedirectOrigin
	// RedirectLogin answers every POST (a login) with 307 to the plain-HTTP
	// catcher, which would receive the body again.
	RedirectLogin
	// EchoSecrets answers 401, 500 or 502 (in turn) with a body quoting
	// every credential the proxy has seen: Authorization and token
	// headers, cookies, and login bodies.
	EchoSecrets
)

// Faults lists every fault, for test matrices.
var Faults = []Fault{Reset, Stall, ServerError, ShortBody, IgnoreRange, WrongRange, Unauthorized, Restart,
	GzipEncoding, Multipart, WrongTotal, Unsatisfiable, RedirectHTTP, RedirectOrigin, EchoSecrets}

// Hostile lists the faults of a hostile server that hit data requests.
var Hostile = []Fault{GzipEncoding, Multipart, WrongTotal, Unsatisfiable, RedirectHTTP, RedirectOrigin, EchoSecrets}

func (f Fault) String() string {
	return [...]string{"none", "reset", "stall", "server-error", "short-body", "ignore-range", "wrong-range", "unauthorized", "restart",
		"gzip-encoding", "multipart", "wrong-total", "unsatisfiable", "redirect-http", "redirect-origin", "redirect-login", "echo-secrets"}[f]
}

// credentialHeaders are the request headers that carry credentials on the
// platforms the proxy stands in front of.
var credentialHeaders = []string{"Authorization", "X-Kubevirt-Export-Token", "Cookie"}

// maxRecorded bounds what the proxy remembers of credentials it saw.
const maxRecorded = 16

// Options configure a Proxy.
type Options struct {
	Upstream   string         // base URL of the simulator
	UpstreamCA *x509.CertPool // verifies the simulator
	Dir        string         // where CAFile is written
	Seed       uint64
	StallFor   time.Duration // default 3 s
	RestartFor time.Duration // default 1 s
	BurstLen   int           // default DefaultBurstLen
}

// DefaultBurstLen is the requests a ServerError or Unauthorized burst fails
// when Options.BurstLen is not set.
const DefaultBurstLen = 3

// Proxy is a running fault-injecting proxy.
type Proxy struct {
	opts   Options
	srv    *http.Server
	ln     net.Listener
	caFile string
	rp     *httputil.ReverseProxy
	target *url.URL

	mu       sync.Mutex
	fault    Fault
	rate     float64 // chance that a data request starts a fault
	rng      *mrand.Rand
	burst    int       // requests left in the current burst
	downTill time.Time // Restart window
	// firstK > 0 is SetFirst's mode: tries counts the attempts of each
	// distinct data request (path and Range).
	firstK int
	tries  map[string]int
	// run counts the attempts in a row each data request failed, longest
	// the most of them.
	run     map[string]int
	longest int

	seen   []string // credentials seen, newest last, for EchoSecrets
	echoes int

	catchHTTP, catchTLS *catcher

	injected, requests, dataRequests atomic.Int64
}

// catcher is a listener the proxy redirects to: whatever reaches it was sent
// where it should not have gone.
type catcher struct {
	srv  *http.Server
	ln   net.Listener
	mu   sync.Mutex
	reqs []string // method, path, credential headers and body of each request
}

func startCatcher(cert *tls.Certificate) (*catcher, error) {
	c := &catcher{}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("faultproxy: catcher: %w", err)
	}
	c.ln = ln
	c.srv = &http.Server{ErrorLog: log.New(io.Discard, "", 0), Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(io.LimitReader(r.Body, 64<<10))
		rec := r.Method + " " + r.URL.String()
		for _, h := range credentialHeaders {
			if v := r.Header.Get(h); v != "" {
				rec += " " + h + ": " + v
			}
		}
		c.mu.Lock()
		c.reqs = append(c.reqs, rec+" "+string(body))
		c.mu.Unlock()
		// Bytes that are not the disk's, should anyone take them.
		w.Write(bytes.Repeat([]byte{0xee}, 4096))
	})}
	if cert != nil {
		c.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{*cert}, NextProtos: []string{"http/1.1"}}
		go c.srv.ServeTLS(ln, "", "")
	} else {
		go c.srv.Serve(ln)
	}
	return c, nil
}

func (c *catcher) requests() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.reqs...)
}

// Start runs a proxy on loopback; it injects nothing until Set.
func Start(opts Options) (*Proxy, error) {
	target, err := url.Parse(opts.Upstream)
	if err != nil {
		return nil, fmt.Errorf("faultproxy: upstream: %w", err)
	}
	if opts.StallFor <= 0 {
		opts.StallFor = 3 * time.Second
	}
	if opts.RestartFor <= 0 {
		opts.RestartFor = time.Second
	}
	if opts.BurstLen <= 0 {
		opts.BurstLen = DefaultBurstLen
	}
	ca, err := testpki.NewCA("faultproxy CA")
	if err != nil {
		return nil, fmt.Errorf("faultproxy: %w", err)
	}
	cert, err := ca.Issue(testpki.Loopback())
	if err != nil {
		return nil, fmt.Errorf("faultproxy: %w", err)
	}
	p := &Proxy{opts: opts, target: target, rng: mrand.New(mrand.NewPCG(opts.Seed, 0x5eed)), run: map[string]int{}}
	p.caFile = filepath.Join(opts.Dir, "faultproxy-ca.pem")
	if err := os.WriteFile(p.caFile, ca.PEM(), 0o600); err != nil {
		return nil, fmt.Errorf("faultproxy: %w", err)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: opts.UpstreamCA}
	p.rp = &httputil.ReverseProxy{
		Transport: tr,
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(target)
			r.Out.Host = target.Host
		},
		ErrorLog: log.New(io.Discard, "", 0),
	}
	p.ln, err = net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("faultproxy: %w", err)
	}
	p.srv = &http.Server{
		Handler: p,
		// HTTP/1.1 only: faults need to own the connection.
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}},
		ErrorLog:  log.New(io.Discard, "", 0),
	}
	go p.srv.ServeTLS(p.ln, "", "")
	if p.catchHTTP, err = startCatcher(nil); err != nil {
		return nil, err
	}
	if p.catchTLS, err = startCatcher(&cert); err != nil {
		return nil, err
	}
	return p, nil
}

// Caught lists the requests that followed a redirect to one of the proxy's
// catchers, with the credentials and body they carried.
func (p *Proxy) Caught() []string {
	return append(p.catchHTTP.requests(), p.catchTLS.requests()...)
}

// URL is the proxy's base URL.
func (p *Proxy) URL() string { return "https://" + p.ln.Addr().String() }

// CAFile is the PEM CA the proxy's certificate chains to.
func (p *Proxy) CAFile() string { return p.caFile }

// Close stops the proxy.
func (p *Proxy) Close() error {
	p.catchHTTP.srv.Close()
	p.catchTLS.srv.Close()
	return p.srv.Close()
}

// Set selects the fault and the chance that a data request triggers it; a
// rate of 0 turns faults off (the backend has recovered).
func (p *Proxy) Set(f Fault, rate float64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.fault, p.rate, p.burst, p.downTill = f, rate, 0, time.Time{}
	p.firstK, p.tries = 0, nil
	p.run, p.longest = map[string]int{}, 0
}

// SetFirst makes the first k attempts of every distinct data request (the
// same path and Range) fail with f and the later ones pass, whatever else
// runs at the same time: a client that tries each request more than k times
// reads everything, and exactly k faults are injected per distinct request.
// For the faults that answer one request (not Restart, Unauthorized's
// bursts or RedirectLogin); Set or SetFirst again ends it.
func (p *Proxy) SetFirst(f Fault, k int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.fault, p.rate, p.burst, p.downTill = f, 0, 0, time.Time{}
	p.firstK, p.tries = k, map[string]int{}
	p.run, p.longest = map[string]int{}, 0
}

// Injected counts the faults injected so far.
func (p *Proxy) Injected() int64 { return p.injected.Load() }

// Requests counts the requests the proxy has seen.
func (p *Proxy) Requests() int64 { return p.requests.Load() }

// DataRequests counts the data requests (GET with a Range header) the proxy
// has seen, the ones faults hit.
func (p *Proxy) DataRequests() int64 { return p.dataRequests.Load() }

func isData(r *http.Request) bool {
	return r.Method == http.MethodGet && r.Header.Get("Range") != ""
}

// decide picks what happens to one request, and keeps the runs of faults
// of data requests.
func (p *Proxy) decide(r *http.Request) Fault {
	p.mu.Lock()
	defer p.mu.Unlock()
	f := p.decideLocked(r)
	if isData(r) {
		key := requestKey(r)
		if f == None {
			p.run[key] = 0
		} else {
			p.run[key]++
			p.longest = max(p.longest, p.run[key])
		}
	}
	return f
}

// requestKey names a data request the same on each of its attempts.
func requestKey(r *http.Request) string { return r.URL.Path + " " + r.Header.Get("Range") }

// LongestRun is the most attempts in a row that one data request (the same
// path and Range) failed since the last Set or SetFirst: a client that
// makes n tries of a request can only have given one up if it is n or more.
func (p *Proxy) LongestRun() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.longest
}

func (p *Proxy) decideLocked(r *http.Request) Fault {
	if time.Now().Before(p.downTill) {
		return Restart
	}
	if p.burst > 0 {
		p.burst--
		return p.fault
	}
	data := isData(r)
	if p.firstK > 0 {
		if !data || p.fault == None {
			return None
		}
		key := requestKey(r)
		if p.tries[key] >= p.firstK {
			return None
		}
		p.tries[key]++
		p.injected.Add(1)
		return p.fault
	}
	if p.fault == None || p.rate <= 0 {
		return None
	}
	switch {
	case p.fault == Unauthorized:
	case p.fault == RedirectLogin:
		if r.Method != http.MethodPost {
			return None
		}
	case !data:
		return None
	}
	if p.rng.Float64() >= p.rate {
		return None
	}
	p.injected.Add(1)
	switch p.fault {
	case ServerError, Unauthorized:
		p.burst = p.opts.BurstLen - 1
	case Restart:
		p.downTill = time.Now().Add(p.opts.RestartFor)
	}
	return p.fault
}

func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.requests.Add(1)
	if isData(r) {
		p.dataRequests.Add(1)
	}
	p.record(r)
	switch p.decide(r) {
	case None:
		p.rp.ServeHTTP(w, r)
	case Reset:
		p.partial(w, r, false)
	case ShortBody:
		p.partial(w, r, true)
	case Stall:
		select {
		case <-time.After(p.opts.StallFor):
		case <-r.Context().Done():
		}
		reset(w)
	case ServerError:
		http.Error(w, "injected: service unavailable", http.StatusServiceUnavailable)
	case Unauthorized:
		w.WriteHeader(http.StatusUnauthorized)
	case IgnoreRange:
		r.Header.Del("Range")
		p.rp.ServeHTTP(w, r)
	case WrongRange:
		shifted, ok := shiftRange(r.Header.Get("Range"), 512)
		if ok {
			r.Header.Set("Range", shifted)
		}
		p.rp.ServeHTTP(w, r)
	case Restart:
		reset(w)
	case GzipEncoding:
		p.rewrite(w, r, gzipBody)
	case Multipart:
		p.rewrite(w, r, multipartBody)
	case WrongTotal:
		p.rewrite(w, r, wrongTotal)
	case Unsatisfiable:
		w.Header().Set("Content-Range", "bytes */0")
		http.Error(w, "injected: range not satisfiable", http.StatusRequestedRangeNotSatisfiable)
	case RedirectHTTP:
		http.Redirect(w, r, "http://"+p.catchHTTP.ln.Addr().String()+r.URL.RequestURI(), http.StatusFound)
	case RedirectOrigin:
		http.Redirect(w, r, "https://"+p.catchTLS.ln.Addr().String()+r.URL.RequestURI(), http.StatusFound)
	case RedirectLogin:
		http.Redirect(w, r, "http://"+p.catchHTTP.ln.Addr().String()+r.URL.RequestURI(), http.StatusTemporaryRedirect)
	case EchoSecrets:
		p.echo(w, r)
	}
}

// record keeps the credentials a request carries (and a POST's body, which
// is how logins send passwords), for EchoSecrets to quote back.
func (p *Proxy) record(r *http.Request) {
	var got []string
	for _, h := range credentialHeaders {
		if v := r.Header.Get(h); v != "" {
			got = append(got, v)
		}
	}
	if r.Method == http.MethodPost && r.Body != nil {
		body, _ := io.ReadAll(io.LimitReader(r.Body, 64<<10))
		r.Body.Close()
		r.Body = io.NopCloser(bytes.NewReader(body))
		got = append(got, string(body))
	}
	if len(got) == 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, g := range got {
		if !slices.Contains(p.seen, g) {
			p.seen = append(p.seen, g)
		}
	}
	if len(p.seen) > maxRecorded {
		p.seen = p.seen[len(p.seen)-maxRecorded:]
	}
}

// echo answers with an error whose body quotes every credential seen, as a
// server that reflects its request (or a debug page) does.
func (p *Proxy) echo(w http.ResponseWriter, r *http.Request) {
	p.mu.Lock()
	status := [...]int{http.StatusUnauthorized, http.StatusInternalServerError, http.StatusBadGateway}[p.echoes%3]
	p.echoes++
	seen := strings.Join(p.seen, "\n")
	p.mu.Unlock()
	w.Header().Set("Content-Type", "text/plain")
	w.WriteHeader(status)
	fmt.Fprintf(w, "error handling %s %s\nrequest headers: %v\ncredentials seen: %s\n", r.Method, r.URL.RequestURI(), r.Header, seen)
}

// rewrite forwards a data request and rewrites the answer with change,
// which returns the status, headers and body to send instead. The connection
// is closed after: a lying Content-Length leaves the rest of the body on it.
func (p *Proxy) rewrite(w http.ResponseWriter, r *http.Request, change func(resp *http.Response, body []byte) (int, http.Header, []byte)) {
	resp, err := p.upstream(r)
	if err != nil {
		reset(w)
		return
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusPartialContent {
		reset(w)
		return
	}
	status, header, newBody := change(resp, body)
	conn, buf, ok := hijack(w)
	if !ok {
		return
	}
	defer conn.Close()
	fmt.Fprintf(buf, "HTTP/1.1 %d %s\r\n", status, http.StatusText(status))
	header.Set("Connection", "close")
	header.Write(buf)
	buf.WriteString("\r\n")
	buf.Write(newBody)
	buf.Flush()
}

// gzipBody compresses the range and cuts or pads the result to the range's
// length, so that status, Content-Range and Content-Length are all right.
func gzipBody(resp *http.Response, body []byte) (int, http.Header, []byte) {
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	zw.Write(body)
	zw.Close()
	enc := z.Bytes()
	if len(enc) > len(body) {
		enc = enc[:len(body)]
	}
	enc = append(enc, make([]byte, len(body)-len(enc))...)
	h := http.Header{}
	h.Set("Content-Range", resp.Header.Get("Content-Range"))
	h.Set("Content-Encoding", "gzip")
	h.Set("Content-Length", strconv.Itoa(len(enc)))
	return http.StatusPartialContent, h, enc
}

// multipartBody frames the range as multipart/byteranges and claims the plain
// range's length: the first Content-Length bytes are framing and data.
func multipartBody(resp *http.Response, body []byte) (int, http.Header, []byte) {
	const boundary = "3d6b6a416f9b5"
	cr := resp.Header.Get("Content-Range")
	framed := fmt.Appendf(nil, "--%s\r\nContent-Type: application/octet-stream\r\nContent-Range: %s\r\n\r\n%s\r\n--%s--\r\n", boundary, cr, body, boundary)
	h := http.Header{}
	h.Set("Content-Type", "multipart/byteranges; boundary="+boundary)
	h.Set("Content-Range", cr)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	return http.StatusPartialContent, h, framed
}

// wrongTotal passes the bytes on with a Content-Range total 1 MiB larger.
func wrongTotal(resp *http.Response, body []byte) (int, http.Header, []byte) {
	h := http.Header{}
	cr := resp.Header.Get("Content-Range")
	if i := strings.LastIndexByte(cr, '/'); i >= 0 {
		if total, err := strconv.ParseInt(cr[i+1:], 10, 64); err == nil {
			cr = cr[:i+1] + strconv.FormatInt(total+1<<20, 10)
		}
	}
	h.Set("Content-Range", cr)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	return http.StatusPartialContent, h, body
}

// partial forwards the request but delivers only part of the body: with
// clean=true the connection then closes normally (a short body), else it is
// reset.
func (p *Proxy) partial(w http.ResponseWriter, r *http.Request, clean bool) {
	resp, err := p.upstream(r)
	if err != nil {
		reset(w)
		return
	}
	defer resp.Body.Close()
	conn, buf, ok := hijack(w)
	if !ok {
		return
	}
	defer conn.Close()
	n := resp.ContentLength / 2
	fmt.Fprintf(buf, "HTTP/1.1 %s\r\n", resp.Status)
	resp.Header.Set("Connection", "close")
	resp.Header.Write(buf)
	buf.WriteString("\r\n")
	io.CopyN(buf, resp.Body, n)
	buf.Flush()
	if !clean {
		abort(conn)
	}
}

// upstream sends r to the simulator and returns its answer, for the faults
// that write their own from it.
func (p *Proxy) upstream(r *http.Request) (*http.Response, error) {
	out := r.Clone(r.Context())
	out.URL.Scheme, out.URL.Host, out.Host, out.RequestURI = p.target.Scheme, p.target.Host, p.target.Host, ""
	return p.rp.Transport.RoundTrip(out)
}

// hijack takes the connection over, so that a fault can write raw HTTP.
func hijack(w http.ResponseWriter) (net.Conn, *bufio.ReadWriter, bool) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		return nil, nil, false
	}
	conn, buf, err := hj.Hijack()
	return conn, buf, err == nil
}

// reset drops the connection with a TCP RST.
func reset(w http.ResponseWriter) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		panic(http.ErrAbortHandler)
	}
	conn, _, err := hj.Hijack()
	if err != nil {
		return
	}
	abort(conn)
}

func abort(conn net.Conn) {
	if tc, ok := conn.(*tls.Conn); ok {
		if nc, ok := tc.NetConn().(*net.TCPConn); ok {
			nc.SetLinger(0)
		}
	}
	conn.Close()
}

// shiftRange moves "bytes=a-b" by delta bytes (toward the start when a
// shift forward would pass b).
func shiftRange(h string, delta int64) (string, bool) {
	spec, ok := strings.CutPrefix(h, "bytes=")
	if !ok {
		return "", false
	}
	a, b, ok := strings.Cut(spec, "-")
	if !ok {
		return "", false
	}
	start, err1 := strconv.ParseInt(a, 10, 64)
	end, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil {
		return "", false
	}
	if start >= delta {
		delta = -delta
	}
	return fmt.Sprintf("bytes=%d-%d", start+delta, end+delta), true
}
