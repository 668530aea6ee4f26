package xapitest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/nbd"
	"github.com/vmexportfs/vmexportfs/backend/retry"
)

const nbdTestSubject = "nbd.xapi.test"

// nbdFastPolicy keeps failing dials quick.
var nbdFastPolicy = retry.Policy{Attempts: 2, BaseDelay: time.Millisecond, MaxDelay: 2 * time.Millisecond, AttemptTimeout: 10 * time.Second}

// nbdSelfSigned makes the kind of certificate xapi-nbd serves: self-signed,
// its own root, for the DNS subject get_nbd_info returns.
func nbdSelfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(mrand.Int64()),
		Subject:               pkix.Name{CommonName: nbdTestSubject},
		DNSNames:              []string{nbdTestSubject},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	leaf, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}

// nbdServerTLS is xapi-nbd's TLS: 1.2 with ECDHE-RSA-AES-GCM only.
func nbdServerTLS(cert tls.Certificate) *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
		MaxVersion:   tls.VersionTLS12,
		CipherSuites: []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384},
	}
}

// nbdDisks serves random disks by export name and counts releases.
type nbdDisks struct {
	mu       sync.Mutex
	disks    map[string][]byte
	lookups  map[string]int
	releases map[string]int
	twice    atomic.Int32 // releases called more than once
}

func newNBDDisks() *nbdDisks {
	return &nbdDisks{disks: map[string][]byte{}, lookups: map[string]int{}, releases: map[string]int{}}
}

func (d *nbdDisks) add(name string, size int) []byte {
	b := make([]byte, size)
	_, _ = mrand.NewChaCha8([32]byte{byte(size), byte(size >> 8), byte(size >> 16)}).Read(b)
	d.mu.Lock()
	d.disks[name] = b
	d.mu.Unlock()
	return b
}

func (d *nbdDisks) lookup(export string) (io.ReaderAt, int64, func(), error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	b, ok := d.disks[export]
	if !ok {
		return nil, 0, nil, fmt.Errorf("no export %q", export)
	}
	d.lookups[export]++
	var once atomic.Bool
	return bytes.NewReader(b), int64(len(b)), func() {
		if once.Swap(true) {
			d.twice.Add(1)
			return
		}
		d.mu.Lock()
		d.releases[export]++
		d.mu.Unlock()
	}, nil
}

func (d *nbdDisks) counts(export string) (lookups, releases int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.lookups[export], d.releases[export]
}

func startTestNBD(t *testing.T, cfg nbdConfig) *nbdServer {
	t.Helper()
	s, err := newNBDServer(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, s.Close()) })
	return s
}

// waitNBDIdle waits until every connection has ended on the server side.
func waitNBDIdle(t *testing.T, s *nbdServer) {
	t.Helper()
	require.Eventually(t, func() bool { return s.stats().Conns == 0 }, 5*time.Second, 5*time.Millisecond)
}

const nbdTestExport = "/4c9f63e8-0d5c-4a8e-9a53-6a1f0e3c2b71?session_id=OpaqueRef:5b0e2f0a-94c4-4d6d-8d6e-0c2b7e1a9f00"

func TestNBDClientOverTLS(t *testing.T) {
	cert, pool := nbdSelfSigned(t)
	disks := newNBDDisks()
	size := 5<<20 + 3*512 // not a multiple of the client's 2 MiB requests
	data := disks.add(nbdTestExport, size)
	s := startTestNBD(t, nbdConfig{TLS: nbdServerTLS(cert), Lookup: disks.lookup})

	ctx := context.Background()
	cl, err := nbd.Dial(ctx, nbd.Options{
		Addr: s.Addr(), Export: nbdTestExport,
		TLS:         &tls.Config{RootCAs: pool, ServerName: nbdTestSubject},
		Connections: 4, Policy: nbdFastPolicy,
	})
	require.NoError(t, err)
	assert.False(t, cl.Structured(), "xapi-nbd has no structured replies")
	assert.False(t, cl.BlockStatus(), "xapi-nbd has no block status")
	require.Equal(t, int64(size), cl.Size())

	all := make([]byte, size)
	require.NoError(t, cl.ReadAt(ctx, all, 0))
	require.True(t, bytes.Equal(data, all), "whole disk differs")

	// Odd offsets and lengths, which the client widens to 512 bytes, in
	// parallel so several connections carry several requests each.
	var wg sync.WaitGroup
	for i := range 64 {
		off := int64(mrand.N(size))
		n := mrand.N(min(size-int(off), 3<<20)) + 1
		if i == 0 {
			off, n = 1, 511
		}
		wg.Go(func() {
			p := make([]byte, n)
			if assert.NoError(t, cl.ReadAt(ctx, p, off)) {
				assert.True(t, bytes.Equal(data[off:off+int64(n)], p), "read [%d,+%d) differs", off, n)
			}
		})
	}
	wg.Wait()
	st := s.stats()
	assert.Greater(t, st.Peak, 1, "several connections")
	assert.LessOrEqual(t, st.Peak, 4)
	assert.GreaterOrEqual(t, st.Bytes, int64(size))
	assert.Zero(t, st.Bytes%512)

	require.NoError(t, cl.Close())
	waitNBDIdle(t, s)
	lookups, releases := disks.counts(nbdTestExport)
	assert.Equal(t, st.Peak, lookups, "one lookup per connection")
	assert.Equal(t, lookups, releases, "one release per connection")
	assert.Zero(t, disks.twice.Load())
}

func TestNBDClientRefusedTLS(t *testing.T) {
	cert, pool := nbdSelfSigned(t)
	_, otherPool := nbdSelfSigned(t)
	disks := newNBDDisks()
	disks.add(nbdTestExport, 1<<20)
	s := startTestNBD(t, nbdConfig{TLS: nbdServerTLS(cert), Lookup: disks.lookup})
	ctx := context.Background()
	dial := func(cfg *tls.Config) error {
		cl, err := nbd.Dial(ctx, nbd.Options{Addr: s.Addr(), Export: nbdTestExport, TLS: cfg, Policy: nbdFastPolicy})
		if err == nil {
			cl.Close()
		}
		return err
	}

	// No TLS: every option is answered TLS_REQD, GO included, and the
	// client does not fall back to EXPORT_NAME on that.
	err := dial(nil)
	require.Error(t, err)
	assert.ErrorIs(t, err, backend.ErrPermission)

	err = dial(&tls.Config{RootCAs: otherPool, ServerName: nbdTestSubject})
	require.Error(t, err)
	assert.ErrorIs(t, err, backend.ErrPermission)
	var cv *tls.CertificateVerificationError
	assert.ErrorAs(t, err, &cv)

	err = dial(&tls.Config{RootCAs: pool, ServerName: "xapi.example"})
	require.Error(t, err)
	assert.ErrorIs(t, err, backend.ErrPermission)

	// xapi-nbd does TLS 1.2 only.
	err = dial(&tls.Config{RootCAs: pool, ServerName: nbdTestSubject, MinVersion: tls.VersionTLS13})
	require.Error(t, err)

	waitNBDIdle(t, s)
	lookups, _ := disks.counts(nbdTestExport)
	assert.Zero(t, lookups, "no export reached without TLS")
	require.NoError(t, dial(&tls.Config{RootCAs: pool, ServerName: nbdTestSubject}))
}

func TestNBDClientInsecure(t *testing.T) {
	disks := newNBDDisks()
	data := disks.add(nbdTestExport, 3<<20)
	s := startTestNBD(t, nbdConfig{Lookup: disks.lookup})
	ctx := context.Background()

	cl, err := nbd.Dial(ctx, nbd.Options{Addr: s.Addr(), Export: nbdTestExport, Connections: 2, Policy: nbdFastPolicy})
	require.NoError(t, err)
	p := make([]byte, 1<<20+7)
	require.NoError(t, cl.ReadAt(ctx, p, 12345))
	assert.True(t, bytes.Equal(data[12345:12345+len(p)], p))
	require.NoError(t, cl.Close())

	// A client that wants TLS from an insecure_nbd network is refused
	// (STARTTLS → ERR_POLICY) and never goes on in clear.
	_, err = nbd.Dial(ctx, nbd.Options{Addr: s.Addr(), Export: nbdTestExport, TLS: &tls.Config{ServerName: nbdTestSubject}, Policy: nbdFastPolicy})
	require.Error(t, err)

	// An unknown export: the connection is dropped, as xapi-nbd does.
	_, err = nbd.Dial(ctx, nbd.Options{Addr: s.Addr(), Export: "/nope", Policy: nbdFastPolicy})
	require.Error(t, err)
	assert.ErrorIs(t, err, backend.ErrUnavailable)

	waitNBDIdle(t, s)
	lookups, releases := disks.counts(nbdTestExport)
	assert.Positive(t, lookups)
	assert.Equal(t, lookups, releases)
}

func TestNBDClientNoZeroes(t *testing.T) {
	disks := newNBDDisks()
	data := disks.add(nbdTestExport, 1<<20)
	s := startTestNBD(t, nbdConfig{Lookup: disks.lookup, NoZeroes: true})
	cl, err := nbd.Dial(context.Background(), nbd.Options{Addr: s.Addr(), Export: nbdTestExport, Policy: nbdFastPolicy})
	require.NoError(t, err)
	defer cl.Close()
	p := make([]byte, 4096)
	require.NoError(t, cl.ReadAt(context.Background(), p, 1000))
	assert.True(t, bytes.Equal(data[1000:1000+4096], p))
}

// rawNBD drives the protocol by hand.
type rawNBD struct {
	t  *testing.T
	c  net.Conn
	rw io.ReadWriter
}

func dialRawNBD(t *testing.T, addr string) *rawNBD {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
	return &rawNBD{t: t, c: c, rw: c}
}

// greet reads the greeting and sends the client flags.
func (r *rawNBD) greet(cflags uint32) uint16 {
	r.t.Helper()
	var g [18]byte
	_, err := io.ReadFull(r.rw, g[:])
	require.NoError(r.t, err)
	require.Equal(r.t, uint64(nbdMagic), binary.BigEndian.Uint64(g[:]))
	require.Equal(r.t, uint64(nbdOptMagic), binary.BigEndian.Uint64(g[8:]))
	require.NoError(r.t, binary.Write(r.rw, binary.BigEndian, cflags))
	return binary.BigEndian.Uint16(g[16:])
}

func (r *rawNBD) opt(opt uint32, data []byte) {
	r.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, nbdOptMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	_, err := r.rw.Write(append(b, data...))
	require.NoError(r.t, err)
}

// optReply reads one option reply to opt and returns its type.
func (r *rawNBD) optReply(opt uint32) uint32 {
	r.t.Helper()
	var h [20]byte
	_, err := io.ReadFull(r.rw, h[:])
	require.NoError(r.t, err)
	require.Equal(r.t, uint64(nbdOptReplyMagic), binary.BigEndian.Uint64(h[:]))
	require.Equal(r.t, opt, binary.BigEndian.Uint32(h[8:]))
	require.Zero(r.t, binary.BigEndian.Uint32(h[16:]), "xapi-nbd replies carry no data")
	return binary.BigEndian.Uint32(h[12:])
}

// closed says the server ended the connection.
func (r *rawNBD) closed() {
	r.t.Helper()
	var b [1]byte
	_, err := r.rw.Read(b[:])
	require.Error(r.t, err)
	var ne net.Error
	require.False(r.t, errors.As(err, &ne) && ne.Timeout(), "connection still open")
}

// export sends EXPORT_NAME and reads the size and flags.
func (r *rawNBD) export(name string, zeroes bool) (int64, uint16) {
	r.t.Helper()
	r.opt(nbdOptExportName, []byte(name))
	n := 10
	if zeroes {
		n += 124
	}
	b := make([]byte, n)
	_, err := io.ReadFull(r.rw, b)
	require.NoError(r.t, err)
	require.Equal(r.t, make([]byte, n-10), b[10:])
	return int64(binary.BigEndian.Uint64(b)), binary.BigEndian.Uint16(b[8:])
}

func (r *rawNBD) request(cmd uint32, handle, off uint64, n uint32, payload []byte) {
	r.t.Helper()
	b := binary.BigEndian.AppendUint32(nil, nbdRequestMagic)
	b = binary.BigEndian.AppendUint32(b, cmd)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, n)
	_, err := r.rw.Write(append(b, payload...))
	require.NoError(r.t, err)
}

// reply reads a simple reply to handle and, when it succeeded, n bytes.
func (r *rawNBD) reply(handle uint64, n int) (uint32, []byte) {
	r.t.Helper()
	var h [16]byte
	_, err := io.ReadFull(r.rw, h[:])
	require.NoError(r.t, err)
	require.Equal(r.t, uint32(nbdSimpleMagic), binary.BigEndian.Uint32(h[:]))
	require.Equal(r.t, handle, binary.BigEndian.Uint64(h[8:]))
	errno := binary.BigEndian.Uint32(h[4:])
	if errno != 0 {
		return errno, nil
	}
	b := make([]byte, n)
	_, err = io.ReadFull(r.rw, b)
	require.NoError(r.t, err)
	return 0, b
}

func TestNBDHandshakeInsecure(t *testing.T) {
	disks := newNBDDisks()
	disks.add(nbdTestExport, 1<<20)
	s := startTestNBD(t, nbdConfig{Lookup: disks.lookup})

	r := dialRawNBD(t, s.Addr())
	assert.Equal(t, uint16(nbdFlagFixedNewstyle), r.greet(nbdFlagFixedNewstyle|nbdFlagNoZeroes), "xapi-nbd does not offer NO_ZEROES")
	r.opt(nbdOptList, nil)
	assert.Equal(t, uint32(nbdRepErrPolicy), r.optReply(nbdOptList))
	for _, o := range []uint32{6, 7, 8, 10, 42} { // INFO, GO, STRUCTURED_REPLY, SET_META_CONTEXT, unknown
		r.opt(o, []byte("\x00\x00\x00\x00\x00\x00"))
		assert.Equal(t, uint32(nbdRepErrUnsup), r.optReply(o), "option %d", o)
	}
	r.opt(nbdOptStartTLS, nil)
	assert.Equal(t, uint32(nbdRepErrPolicy), r.optReply(nbdOptStartTLS), "no TLS on an insecure_nbd network")
	size, flags := r.export(nbdTestExport, true)
	assert.Equal(t, int64(1<<20), size)
	assert.Equal(t, uint16(nbdTFlagHasFlags|nbdTFlagReadOnly), flags)

	r = dialRawNBD(t, s.Addr())
	r.greet(nbdFlagFixedNewstyle)
	r.opt(nbdOptAbort, nil)
	assert.Equal(t, uint32(nbdRepAck), r.optReply(nbdOptAbort))
	r.closed()

	r = dialRawNBD(t, s.Addr())
	r.greet(nbdFlagFixedNewstyle)
	r.opt(nbdOptExportName, []byte("/unknown"))
	r.closed()

	// Garbage instead of an option.
	r = dialRawNBD(t, s.Addr())
	r.greet(nbdFlagFixedNewstyle)
	_, err := r.c.Write(make([]byte, 16))
	require.NoError(t, err)
	r.closed()

	// An old client is served without TLS (xapi-nbd only warns).
	r = dialRawNBD(t, s.Addr())
	r.greet(0)
	size, _ = r.export(nbdTestExport, true)
	assert.Equal(t, int64(1<<20), size)
}

func TestNBDHandshakeForcedTLS(t *testing.T) {
	cert, pool := nbdSelfSigned(t)
	disks := newNBDDisks()
	disks.add(nbdTestExport, 1<<20)
	s := startTestNBD(t, nbdConfig{TLS: nbdServerTLS(cert), Lookup: disks.lookup, NoZeroes: true})

	r := dialRawNBD(t, s.Addr())
	assert.Equal(t, uint16(nbdFlagFixedNewstyle|nbdFlagNoZeroes), r.greet(nbdFlagFixedNewstyle|nbdFlagNoZeroes))
	for _, o := range []uint32{nbdOptList, 6, 7, 8, 42} {
		r.opt(o, nil)
		assert.Equal(t, uint32(nbdRepErrTLSReqd), r.optReply(o), "option %d before STARTTLS", o)
	}
	r.opt(nbdOptStartTLS, nil)
	require.Equal(t, uint32(nbdRepAck), r.optReply(nbdOptStartTLS))
	tc := tls.Client(r.c, &tls.Config{RootCAs: pool, ServerName: nbdTestSubject})
	require.NoError(t, tc.Handshake())
	assert.Equal(t, uint16(tls.VersionTLS12), tc.ConnectionState().Version)
	r.rw = tc
	r.opt(nbdOptStartTLS, nil)
	assert.Equal(t, uint32(nbdRepErrInvalid), r.optReply(nbdOptStartTLS), "STARTTLS twice")
	r.opt(nbdOptList, nil)
	assert.Equal(t, uint32(nbdRepErrPolicy), r.optReply(nbdOptList))
	r.opt(7, nil)
	assert.Equal(t, uint32(nbdRepErrUnsup), r.optReply(7))
	size, _ := r.export(nbdTestExport, false)
	assert.Equal(t, int64(1<<20), size)
	r.request(nbdCmdRead, 1, 0, 512, nil)
	errno, _ := r.reply(1, 512)
	assert.Zero(t, errno)
	r.c.Close()

	// EXPORT_NAME in clear has no error reply: the connection ends.
	r = dialRawNBD(t, s.Addr())
	r.greet(nbdFlagFixedNewstyle)
	r.opt(nbdOptExportName, []byte(nbdTestExport))
	r.closed()

	// ABORT before TLS: closed without an ACK.
	r = dialRawNBD(t, s.Addr())
	r.greet(nbdFlagFixedNewstyle)
	r.opt(nbdOptAbort, nil)
	r.closed()

	// No fixed newstyle: no STARTTLS possible, refused.
	r = dialRawNBD(t, s.Addr())
	r.greet(0)
	r.closed()

	// Not TLS after the ACK.
	r = dialRawNBD(t, s.Addr())
	r.greet(nbdFlagFixedNewstyle)
	r.opt(nbdOptStartTLS, nil)
	require.Equal(t, uint32(nbdRepAck), r.optReply(nbdOptStartTLS))
	r.opt(nbdOptExportName, []byte(nbdTestExport))
	r.closed()

	waitNBDIdle(t, s)
	lookups, releases := disks.counts(nbdTestExport)
	assert.Equal(t, 1, lookups)
	assert.Equal(t, 1, releases)
}

func TestNBDTransmission(t *testing.T) {
	disks := newNBDDisks()
	size := 1<<20 + 512
	data := disks.add(nbdTestExport, size)
	s := startTestNBD(t, nbdConfig{Lookup: disks.lookup})
	r := dialRawNBD(t, s.Addr())
	r.greet(nbdFlagFixedNewstyle)
	got, flags := r.export(nbdTestExport, true)
	require.Equal(t, int64(size), got)
	require.Equal(t, uint16(nbdTFlagHasFlags|nbdTFlagReadOnly), flags)

	read := func(handle, off uint64, n uint32) uint32 {
		t.Helper()
		r.request(nbdCmdRead, handle, off, n, nil)
		errno, b := r.reply(handle, int(n))
		if errno == 0 {
			require.True(t, bytes.Equal(data[off:off+uint64(n)], b), "read [%d,+%d)", off, n)
		}
		return errno
	}
	assert.Zero(t, read(1, 0, 4096))
	assert.Equal(t, uint32(nbdEINVAL), read(2, 1, 512), "unaligned offset")
	assert.Equal(t, uint32(nbdEINVAL), read(3, 512, 100), "unaligned length")
	assert.Equal(t, uint32(nbdEINVAL), read(4, uint64(size), 512), "past the end")
	assert.Equal(t, uint32(nbdEINVAL), read(5, 1<<64-512, 1024), "offset overflows")
	assert.Zero(t, read(6, uint64(size-512), 512), "last sector")

	big := newNBDDisks()
	big.add("big", 40<<20)
	bs := startTestNBD(t, nbdConfig{Lookup: big.lookup})
	br := dialRawNBD(t, bs.Addr())
	br.greet(nbdFlagFixedNewstyle)
	br.export("big", true)
	br.request(nbdCmdRead, 9, 0, 33<<20, nil)
	errno, _ := br.reply(9, 0)
	assert.Equal(t, uint32(nbdEINVAL), errno, "over 32 MiB")
	br.request(nbdCmdRead, 10, 0, 32<<20, nil)
	errno, b := br.reply(10, 32<<20)
	assert.Zero(t, errno)
	assert.Len(t, b, 32<<20)

	// A refused WRITE leaves the connection in sync.
	r.request(nbdCmdWrite, 7, 0, 1024, make([]byte, 1024))
	errno, _ = r.reply(7, 0)
	assert.Equal(t, uint32(nbdEPERM), errno)
	assert.Zero(t, read(8, 512, 512))

	// Commands xapi-nbd does not know, and a READ with a flag set.
	for i, cmd := range []uint32{3, 4, 5, 6, 7, 99, 1<<16 | nbdCmdRead} {
		h := uint64(100 + i)
		r.request(cmd, h, 0, 512, nil)
		errno, _ := r.reply(h, 0)
		assert.Equal(t, uint32(nbdEINVAL), errno, "command %#x", cmd)
	}

	// Pipelined requests are answered in order.
	var batch []byte
	type rq struct {
		off uint64
		n   uint32
	}
	rqs := []rq{{0, 65536}, {1, 512}, {4096, 512}, {uint64(size - 1024), 1024}, {512, 2048}}
	for i, q := range rqs {
		batch = binary.BigEndian.AppendUint32(batch, nbdRequestMagic)
		batch = binary.BigEndian.AppendUint32(batch, nbdCmdRead)
		batch = binary.BigEndian.AppendUint64(batch, uint64(200+i))
		batch = binary.BigEndian.AppendUint64(batch, q.off)
		batch = binary.BigEndian.AppendUint32(batch, q.n)
	}
	_, err := r.c.Write(batch)
	require.NoError(t, err)
	for i, q := range rqs {
		errno, b := r.reply(uint64(200+i), int(q.n))
		if i == 1 {
			assert.Equal(t, uint32(nbdEINVAL), errno)
			continue
		}
		require.Zero(t, errno)
		assert.True(t, bytes.Equal(data[q.off:q.off+uint64(q.n)], b))
	}

	r.request(nbdCmdDisc, 300, 0, 0, nil)
	r.closed()
	waitNBDIdle(t, s)
	_, releases := disks.counts(nbdTestExport)
	assert.Equal(t, 1, releases)
	assert.Zero(t, disks.twice.Load())
	// Data sent: 4096+512+512 (reads 1, 6, 8) and the pipelined batch.
	assert.Equal(t, int64(4096+512+512+65536+512+1024+2048), s.stats().Bytes)
}

func TestNBDConnectionLimit(t *testing.T) {
	disks := newNBDDisks()
	disks.add(nbdTestExport, 1<<20)
	s := startTestNBD(t, nbdConfig{Lookup: disks.lookup})
	var open []*rawNBD
	for range 16 {
		r := dialRawNBD(t, s.Addr())
		r.greet(nbdFlagFixedNewstyle) // accepted and counted once greeted
		open = append(open, r)
	}
	extra := dialRawNBD(t, s.Addr())
	extra.closed() // before the greeting
	st := s.stats()
	assert.Equal(t, nbdStats{Conns: 16, Peak: 16, Refused: 1}, st)

	// The client, told to use 4 connections, finds none.
	_, err := nbd.Dial(context.Background(), nbd.Options{Addr: s.Addr(), Export: nbdTestExport, Policy: nbdFastPolicy})
	require.Error(t, err)
	assert.ErrorIs(t, err, backend.ErrUnavailable)
	assert.Equal(t, 1+nbdFastPolicy.Attempts, s.stats().Refused)

	for _, r := range open {
		r.c.Close()
	}
	waitNBDIdle(t, s)
	r := dialRawNBD(t, s.Addr())
	r.greet(nbdFlagFixedNewstyle)
	size, _ := r.export(nbdTestExport, true)
	assert.Equal(t, int64(1<<20), size)
	st = s.stats()
	assert.Equal(t, 1, st.Conns)
	assert.Equal(t, 16, st.Peak)
}

func TestNBDMaxConns(t *testing.T) {
	disks := newNBDDisks()
	s := startTestNBD(t, nbdConfig{Lookup: disks.lookup, MaxConns: 2})
	a, b := dialRawNBD(t, s.Addr()), dialRawNBD(t, s.Addr())
	a.greet(nbdFlagFixedNewstyle)
	b.greet(nbdFlagFixedNewstyle)
	dialRawNBD(t, s.Addr()).closed()
	assert.Equal(t, nbdStats{Conns: 2, Peak: 2, Refused: 1}, s.stats())
}

func TestNBDCloseEndsConnections(t *testing.T) {
	cert, _ := nbdSelfSigned(t)
	disks := newNBDDisks()
	disks.add(nbdTestExport, 1<<20)
	s, err := newNBDServer(nbdConfig{TLS: nbdServerTLS(cert), Lookup: disks.lookup})
	require.NoError(t, err)
	ins, err := newNBDServer(nbdConfig{Lookup: disks.lookup})
	require.NoError(t, err)

	// One waiting for client flags, one mid-TLS handshake, one in
	// transmission.
	greeted := dialRawNBD(t, s.Addr())
	var g [18]byte
	_, err = io.ReadFull(greeted.c, g[:])
	require.NoError(t, err)
	mid := dialRawNBD(t, s.Addr())
	mid.greet(nbdFlagFixedNewstyle)
	mid.opt(nbdOptStartTLS, nil)
	require.Equal(t, uint32(nbdRepAck), mid.optReply(nbdOptStartTLS))
	tx := dialRawNBD(t, ins.Addr())
	tx.greet(nbdFlagFixedNewstyle)
	tx.export(nbdTestExport, true)
	require.Eventually(t, func() bool { return s.stats().Conns == 2 && ins.stats().Conns == 1 }, 5*time.Second, time.Millisecond)

	done := make(chan struct{})
	go func() {
		defer close(done)
		assert.NoError(t, s.Close())
		assert.NoError(t, ins.Close())
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close hangs")
	}
	greeted.closed()
	mid.closed()
	tx.closed()
	assert.Zero(t, s.stats().Conns)
	_, releases := disks.counts(nbdTestExport)
	assert.Equal(t, 1, releases, "release when Close ends the connection")
	require.NoError(t, s.Close(), "twice")
	_, err = net.DialTimeout("tcp", s.Addr(), time.Second)
	assert.Error(t, err, "no longer listening")
}

// TestNBDQemuImg shows what the spec says: qemu-img cannot read from
// xapi-nbd, because after GO is refused its fallback sends LIST, which
// xapi-nbd refuses by policy.
func TestNBDQemuImg(t *testing.T) {
	needQemuImg(t)
	disks := newNBDDisks()
	disks.add("disk0", 1<<20)
	s := startTestNBD(t, nbdConfig{Lookup: disks.lookup})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "qemu-img", "info", "nbd://"+s.Addr()+"/disk0").CombinedOutput()
	t.Logf("qemu-img: %s", out)
	require.Error(t, err, "qemu-img read from xapi-nbd")
	assert.Contains(t, string(out), "Denied by server for option 3")
	lookups, _ := disks.counts("disk0")
	assert.Zero(t, lookups)
	assert.False(t, strings.Contains(string(out), "virtual size"))
}
