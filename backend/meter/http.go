package meter

import (
	"context"
	"io"
	"net"
	"net/http"
)

// RoundTripper counts every request rt sends, redirects included (each is
// a request the platform sees), and the body bytes of their answers. A
// request lasts until its body is read to the end or closed.
func (m *Meter) RoundTripper(rt http.RoundTripper) http.RoundTripper {
	if m == nil {
		return rt
	}
	return &countingTransport{m: m, rt: rt}
}

type countingTransport struct {
	m  *Meter
	rt http.RoundTripper
}

func (t *countingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	r := t.m.Begin(HTTP)
	resp, err := t.rt.RoundTrip(req)
	if err != nil {
		r.End(true)
		return resp, err
	}
	failed := resp.StatusCode >= 400
	if resp.Body == nil || resp.Body == http.NoBody {
		r.End(failed)
		return resp, nil
	}
	resp.Body = &countingBody{ReadCloser: resp.Body, r: r, failed: failed}
	return resp, nil
}

// CloseIdleConnections reaches the transport underneath, so that
// http.Client.CloseIdleConnections still works through the counter.
func (t *countingTransport) CloseIdleConnections() {
	if c, ok := t.rt.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

type countingBody struct {
	io.ReadCloser
	r      *Request
	failed bool
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.r.Received(n)
	if err == io.EOF {
		b.r.End(b.failed)
	} else if err != nil {
		b.r.End(true)
	}
	return n, err
}

func (b *countingBody) Close() error {
	b.r.End(b.failed)
	return b.ReadCloser.Close()
}

// DialContext wraps dial so that the connections it makes are counted open
// over transport name until closed.
func (m *Meter) DialContext(name string, dial func(ctx context.Context, network, addr string) (net.Conn, error)) func(ctx context.Context, network, addr string) (net.Conn, error) {
	if m == nil {
		return dial
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return m.Conn(name, c), nil
	}
}
