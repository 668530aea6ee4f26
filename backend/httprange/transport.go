package httprange

import (
	"crypto/tls"
	"net"
	"net/http"
	"time"

	"github.com/vmexportfs/vmexportfs/backend/meter"
)

// Transport is the transport of a platform's HTTP requests: http.Transport
// (for its knobs and CloseIdleConnections) with every request, answer byte
// and connection counted in a meter.
type Transport struct {
	*http.Transport
	counted http.RoundTripper
}

// RoundTrip sends req through the counting transport.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	return t.counted.RoundTrip(req)
}

// NewTransport returns the transport disk reads should use: TLS verified with
// tlsConfig, HTTP/1.1 only, and enough idle connections for every fetch that
// may be in flight, counted in m (the mount's, from Policy.Meter; nil counts
// nothing). HTTP/2 would multiplex all parallel Range reads onto one TCP
// connection under a single flow-control window, which measured at well
// under half the throughput of parallel HTTP/1.1 connections for bulk reads.
func NewTransport(tlsConfig *tls.Config, m *meter.Meter) *Transport {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = tlsConfig
	tr.ForceAttemptHTTP2 = false
	tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	tr.MaxIdleConns = 64
	tr.MaxIdleConnsPerHost = 32
	tr.DialContext = m.DialContext(meter.HTTP, (&net.Dialer{Timeout: dialTimeout, KeepAlive: keepAlive}).DialContext)
	return &Transport{Transport: tr, counted: m.RoundTripper(tr)}
}

// dialTimeout and keepAlive are net/http's defaults, which the DialContext
// set above replaces.
const (
	dialTimeout = 30 * time.Second
	keepAlive   = 30 * time.Second
)
