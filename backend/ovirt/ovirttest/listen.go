package ovirttest

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/vmexportfs/vmexportfs/backend/internal/testpki"
)

// listener is one HTTPS endpoint. It does its own TLS and hands
// http.Server connections through a channel, so that a connection taken
// over (hijacked) to write what net/http refuses to write, a body on a
// HEAD answer, can be handed back and keep serving, as on the real daemon.
type listener struct {
	name   string
	tcp    net.Listener
	tlsCfg *tls.Config
	srv    *http.Server
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
	done   chan struct{}
}

// conn is a served connection; r, when set, yields bytes the previous
// owner had buffered before the socket's.
type conn struct {
	net.Conn
	r     io.Reader
	track *connTrack
}

func (c *conn) Read(p []byte) (int, error) {
	if c.r != nil {
		return c.r.Read(p)
	}
	return c.Conn.Read(p)
}

type connKey struct{}

type listenerKey struct{}

// listen serves h on 127.0.0.1 with a certificate of the engine CA. With
// track, imageio connections are followed per ticket (track is told when
// one closes).
func (s *Server) listen(name string, h http.Handler, track func(*connTrack)) (*listener, error) {
	leaf, err := s.ca.Issue(testpki.Loopback())
	if err != nil {
		return nil, err
	}
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("%s listen: %w", name, err)
	}
	l := &listener{
		name: name, tcp: tcp,
		// Both the engine (Apache) and imageio speak HTTP/1.1 only, and a
		// hijack needs it.
		tlsCfg: &tls.Config{Certificates: []tls.Certificate{leaf}, MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}},
		conns:  make(chan net.Conn), closed: make(chan struct{}), done: make(chan struct{}),
	}
	l.srv = &http.Server{
		Handler: h,
		// Handshake failures of clients that distrust the CA are expected
		// in tests; keep them out of stderr.
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			ctx = context.WithValue(ctx, listenerKey{}, l)
			if cc, ok := c.(*conn); ok {
				return context.WithValue(ctx, connKey{}, cc.track)
			}
			return ctx
		},
	}
	if track != nil {
		// The daemon closes connections idle this long without a word;
		// the first request gets as long.
		l.srv.IdleTimeout = s.opts.InactivityTimeout
		l.srv.ReadHeaderTimeout = s.opts.InactivityTimeout
		l.srv.ConnState = func(c net.Conn, st http.ConnState) {
			if cc, ok := c.(*conn); ok && st == http.StateClosed {
				track(cc.track)
			}
		}
	} else {
		l.srv.ReadHeaderTimeout = 30 * time.Second
	}
	go l.accept()
	go func() {
		defer close(l.done)
		if err := l.srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("ovirt simulator serve", "listener", name, "err", err)
		}
	}()
	return l, nil
}

func (l *listener) accept() {
	for {
		c, err := l.tcp.Accept()
		if err != nil {
			return
		}
		if !l.give(&conn{Conn: tls.Server(c, l.tlsCfg), track: &connTrack{tickets: map[*ticket]struct{}{}}}) {
			return
		}
	}
}

// give hands c to the http.Server; false once the listener is closed.
func (l *listener) give(c net.Conn) bool {
	select {
	case l.conns <- c:
		return true
	case <-l.closed:
		_ = c.Close()
		return false
	}
}

// Accept implements net.Listener for http.Server.
func (l *listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

// Close implements net.Listener.
func (l *listener) Close() error {
	var err error
	l.once.Do(func() {
		close(l.closed)
		err = l.tcp.Close()
	})
	return err
}

// Addr implements net.Listener.
func (l *listener) Addr() net.Addr { return l.tcp.Addr() }

func (l *listener) url() string { return "https://" + l.tcp.Addr().String() }

func (l *listener) close() error {
	err := l.srv.Close()
	<-l.done
	return err
}

// writeRaw takes the connection over, writes an answer net/http would not
// (it drops bodies of HEAD answers), and hands the connection back so it
// keeps serving requests.
func (l *listener) writeRaw(w http.ResponseWriter, status int, h http.Header, body []byte) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		w.WriteHeader(status)
		return
	}
	c, brw, err := hj.Hijack()
	if err != nil {
		return
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "HTTP/1.1 %d %s\r\n", status, http.StatusText(status))
	h.Set("Date", time.Now().UTC().Format(http.TimeFormat))
	h.Set("Content-Length", fmt.Sprint(len(body)))
	_ = h.Write(&b)
	b.WriteString("\r\n")
	b.Write(body)
	if _, err := c.Write(b.Bytes()); err != nil {
		_ = c.Close()
		return
	}
	cc, ok := c.(*conn)
	if !ok {
		_ = c.Close()
		return
	}
	buffered, _ := brw.Reader.Peek(brw.Reader.Buffered())
	next := &conn{Conn: cc.Conn, track: cc.track, r: cc.Conn}
	if cc.r != nil {
		next.r = cc.r
	}
	next.r = io.MultiReader(bytes.NewReader(bytes.Clone(buffered)), next.r)
	go l.give(next)
}
