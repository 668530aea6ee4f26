// Package faultproxy is an HTTPS reverse proxy that injects the faults a disk
// export server or the network between can produce, in the manner of
// net/http/httptest: tests put it in front of a platform simulator and point
// the client at it. Faults hit disk data requests (GET with a Range header);
// everything else passes through, except Restart, which drops everything.
package faultproxy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
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
)

// Faults lists every fault, for test matrices.
var Faults = []Fault{Reset, Stall, ServerError, ShortBody, IgnoreRange, WrongRange, Unauthorized, Restart}

func (f Fault) String() string {
	return [...]string{"none", "reset", "stall", "server-error", "short-body", "ignore-range", "wrong-range", "unauthorized", "restart"}[f]
}

// Options configure a Proxy.
type Options struct {
	Upstream   string         // base URL of the simulator
	UpstreamCA *x509.CertPool // verifies the simulator
	Dir        string         // where CAFile is written
	Seed       uint64
	StallFor   time.Duration // default 3 s
	RestartFor time.Duration // default 1 s
	BurstLen   int           // default 3
}

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

	injected, requests atomic.Int64
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
		opts.BurstLen = 3
	}
	cert, caPEM, err := selfSigned()
	if err != nil {
		return nil, err
	}
	p := &Proxy{opts: opts, target: target, rng: mrand.New(mrand.NewPCG(opts.Seed, 0x5eed))}
	p.caFile = filepath.Join(opts.Dir, "faultproxy-ca.pem")
	if err := os.WriteFile(p.caFile, caPEM, 0o600); err != nil {
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
	return p, nil
}

// URL is the proxy's base URL.
func (p *Proxy) URL() string { return "https://" + p.ln.Addr().String() }

// CAFile is the PEM CA the proxy's certificate chains to.
func (p *Proxy) CAFile() string { return p.caFile }

// Close stops the proxy.
func (p *Proxy) Close() error { return p.srv.Close() }

// Set selects the fault and the chance that a data request triggers it; a
// rate of 0 turns faults off (the backend has recovered).
func (p *Proxy) Set(f Fault, rate float64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.fault, p.rate, p.burst, p.downTill = f, rate, 0, time.Time{}
}

// Injected counts the faults injected so far.
func (p *Proxy) Injected() int64 { return p.injected.Load() }

// Requests counts the requests the proxy has seen.
func (p *Proxy) Requests() int64 { return p.requests.Load() }

// decide picks what happens to one request.
func (p *Proxy) decide(r *http.Request) Fault {
	p.mu.Lock()
	defer p.mu.Unlock()
	if time.Now().Before(p.downTill) {
		return Restart
	}
	if p.burst > 0 {
		p.burst--
		return p.fault
	}
	data := r.Method == http.MethodGet && r.Header.Get("Range") != ""
	if p.fault == None || p.rate <= 0 {
		return None
	}
	if !data && p.fault != Unauthorized {
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
	}
}

// partial forwards the request but delivers only part of the body: with
// clean=true the connection then closes normally (a short body), else it is
// reset.
func (p *Proxy) partial(w http.ResponseWriter, r *http.Request, clean bool) {
	out := r.Clone(r.Context())
	out.URL.Scheme, out.URL.Host, out.Host, out.RequestURI = p.target.Scheme, p.target.Host, p.target.Host, ""
	resp, err := p.rp.Transport.RoundTrip(out)
	if err != nil {
		reset(w)
		return
	}
	defer resp.Body.Close()
	hj, ok := w.(http.Hijacker)
	if !ok {
		return
	}
	conn, buf, err := hj.Hijack()
	if err != nil {
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

// selfSigned makes a throwaway CA-signed-by-itself certificate for 127.0.0.1.
func selfSigned() (tls.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("faultproxy: key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "faultproxy"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("faultproxy: certificate: %w", err)
	}
	pemCert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return tls.Certificate{}, nil, errors.Join(errors.New("faultproxy: key"), err)
	}
	cert, err := tls.X509KeyPair(pemCert, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("faultproxy: key pair: %w", err)
	}
	return cert, pemCert, nil
}
