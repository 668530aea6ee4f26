package s3_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/minio/minio-go/v7/pkg/signer"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/s3"
	"github.com/vmexportfs/vmexportfs/backend/s3/s3test"
)

const bucket = "vmimages"

// startReal starts versitygw with one bucket, shared by the subtests of a
// test (a start takes well under a second once the binary is built).
func startReal(t *testing.T) (*s3test.Server, *s3.Client) {
	t.Helper()
	srv := s3test.Start(t, s3test.Options{Buckets: []string{bucket}})
	return srv, srv.Client(t)
}

func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func put(t *testing.T, c *s3.Client, key string, data []byte) {
	t.Helper()
	require.NoError(t, c.Put(context.Background(), bucket, key, bytes.NewReader(data), int64(len(data))))
}

func TestRealPutListHeadRemove(t *testing.T) {
	_, c := startReal(t)
	ctx := context.Background()
	put(t, c, "good/a.qcow2", randomBytes(1000, 1))
	put(t, c, "good/sub/nested image+1.qcow2", randomBytes(2000, 2))
	put(t, c, "other/b", []byte("x"))
	put(t, c, "good/empty", nil)

	list, err := c.List(ctx, bucket, "good/")
	require.NoError(t, err)
	sizes := map[string]int64{}
	for _, o := range list {
		sizes[o.Key] = o.Size
		assert.NotEmpty(t, o.ETag)
		assert.False(t, o.LastModified.IsZero())
	}
	assert.Equal(t, map[string]int64{"good/a.qcow2": 1000, "good/sub/nested image+1.qcow2": 2000, "good/empty": 0}, sizes)

	o, err := c.Object(ctx, bucket, "good/sub/nested image+1.qcow2")
	require.NoError(t, err)
	assert.Equal(t, int64(2000), o.Size())
	assert.Equal(t, "good/sub/nested image+1.qcow2", o.Key())
	assert.False(t, o.LastModified().IsZero())
	for _, li := range list {
		if li.Key == o.Key() {
			assert.Equal(t, li.ETag, o.ETag(), "HEAD and the listing agree on the ETag")
		}
	}

	_, err = c.Object(ctx, bucket, "good/missing")
	require.ErrorIs(t, err, backend.ErrNotFound)
	_, err = c.List(ctx, "nosuchbucket", "")
	require.ErrorIs(t, err, backend.ErrNotFound)

	require.NoError(t, c.Remove(ctx, bucket, "good/a.qcow2"))
	require.NoError(t, c.Remove(ctx, bucket, "good/a.qcow2"), "removing a missing key succeeds, as in S3")
	_, err = c.Object(ctx, bucket, "good/a.qcow2")
	require.ErrorIs(t, err, backend.ErrNotFound)
	list, err = c.List(ctx, bucket, "good/")
	require.NoError(t, err)
	assert.Len(t, list, 2)
}

func TestRealReadAtOddOffsets(t *testing.T) {
	_, c := startReal(t)
	ctx := context.Background()
	data := randomBytes(3<<20+17, 3)
	put(t, c, "img", data)
	o, err := c.Object(ctx, bucket, "img")
	require.NoError(t, err)
	require.Equal(t, int64(len(data)), o.Size())

	var total int64
	for _, r := range []struct{ off, n int64 }{
		{0, 1}, {1, 511}, {4095, 4097}, {65537, 1 << 20}, {int64(len(data)) - 1, 1}, {int64(len(data)) - 12345, 12345}, {0, int64(len(data))},
	} {
		p := make([]byte, r.n)
		require.NoError(t, o.ReadAt(ctx, p, r.off), "range %d+%d", r.off, r.n)
		require.True(t, bytes.Equal(data[r.off:r.off+r.n], p), "range %d+%d", r.off, r.n)
		total += r.n
	}
	st := c.Stats()
	assert.Equal(t, total, st.BytesRead)
	assert.Equal(t, int64(7), st.Reads)
}

// proxy sits between the client and versitygw: it records every request's
// signature and may rewrite the Range header, re-signing the request so the
// real server judges the rewritten Range and not a broken signature.
type proxy struct {
	mu         sync.Mutex
	signatures []string
	rewrite    string // new Range, "" leaves it
	bodyBytes  int64  // bytes of answer bodies passed to the client
}

var sigRE = regexp.MustCompile(`Signature=([0-9a-f]+)`)

func startProxy(t *testing.T, srv *s3test.Server, px *proxy, mod func(*s3.Config)) *s3.Client {
	t.Helper()
	target, err := url.Parse(srv.Endpoint())
	require.NoError(t, err)
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.Transport = srv.HTTPClient().Transport
	rp.ModifyResponse = func(resp *http.Response) error {
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		px.mu.Lock()
		px.bodyBytes += int64(len(b))
		px.mu.Unlock()
		resp.Body = io.NopCloser(bytes.NewReader(b))
		return err
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		px.mu.Lock()
		if m := sigRE.FindStringSubmatch(r.Header.Get("Authorization")); m != nil {
			px.signatures = append(px.signatures, m[1])
		}
		rewrite := px.rewrite
		px.mu.Unlock()
		if rewrite != "" && r.Header.Get("Range") != "" {
			r.Header.Set("Range", rewrite)
			r.Header.Del("Authorization")
			r.Header.Del("X-Amz-Date")
			r.Host = target.Host
			r.URL.Scheme, r.URL.Host = target.Scheme, target.Host
			signed := signer.SignV4(*r, srv.AccessKey(), srv.SecretKey(), "", srv.Region())
			r.Header = signed.Header
		}
		// The Host header stays the client's: it is signed.
		rp.ServeHTTP(w, r)
	})
	front := httptest.NewUnstartedServer(h)
	front.TLS = &tls.Config{}
	front.StartTLS()
	t.Cleanup(front.Close)
	cfg := srv.Config()
	cfg.Endpoint = front.URL
	cfg.RootCAs = front.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs
	if mod != nil {
		mod(&cfg)
	}
	c, err := s3.New(context.Background(), cfg)
	require.NoError(t, err)
	return c
}

// versitygw answers a backwards, malformed or multi-range Range with 200 and
// the whole object; ReadAt must never hand any of it out.
func TestRealIgnoredRangeNeverYieldsBytes(t *testing.T) {
	srv, c := startReal(t)
	ctx := context.Background()
	data := randomBytes(100000, 4)
	put(t, c, "img", data)
	for _, rng := range []string{"bytes=10-5", "bytes=abc", "bytes=0-1,5-6"} {
		t.Run(rng, func(t *testing.T) {
			px := &proxy{rewrite: rng}
			pc := startProxy(t, srv, px, nil)
			o, err := pc.Object(ctx, bucket, "img")
			require.NoError(t, err)
			p := make([]byte, 100)
			err = o.ReadAt(ctx, p, 10)
			require.ErrorIs(t, err, backend.ErrUnavailable)
			assert.Contains(t, err.Error(), "status 200")
			assert.Zero(t, pc.Stats().BytesRead)
			assert.Equal(t, make([]byte, 100), p, "not one byte of the whole-object answer reached p")
		})
	}
}

func TestRealWrongSecret(t *testing.T) {
	srv, good := startReal(t)
	ctx := context.Background()
	put(t, good, "img", randomBytes(5000, 5))
	const wrongSecret = "wrong-secret-0123456789abcdef0123456789"
	px := &proxy{}
	c := startProxy(t, srv, px, func(c *s3.Config) { c.SecretKey = wrongSecret })

	_, err := c.Object(ctx, bucket, "img")
	checkRefused(t, err, px, wrongSecret, srv.SecretKey(), "SignatureDoesNotMatch")
	_, err = c.List(ctx, bucket, "")
	checkRefused(t, err, px, wrongSecret, srv.SecretKey(), "SignatureDoesNotMatch")
	err = c.Put(ctx, bucket, "x", strings.NewReader("x"), 1)
	checkRefused(t, err, px, wrongSecret, srv.SecretKey(), "SignatureDoesNotMatch")
}

func checkRefused(t *testing.T, err error, px *proxy, secrets ...string) {
	t.Helper()
	code := secrets[len(secrets)-1]
	secrets = secrets[:len(secrets)-1]
	require.Error(t, err)
	assert.ErrorIs(t, err, backend.ErrPermission)
	assert.NotErrorIs(t, err, backend.ErrNotFound)
	msg := err.Error()
	assert.Contains(t, msg, code, "the error says why")
	for _, s := range secrets {
		assert.NotContains(t, msg, s)
	}
	assert.NotContains(t, msg, "AWS4-HMAC-SHA256", "no StringToSign")
	px.mu.Lock()
	defer px.mu.Unlock()
	require.NotEmpty(t, px.signatures)
	for _, sig := range px.signatures {
		assert.NotContains(t, msg, sig, "no signature")
	}
}

func TestRealUnknownAccessKey(t *testing.T) {
	srv, good := startReal(t)
	ctx := context.Background()
	put(t, good, "img", randomBytes(5000, 6))
	px := &proxy{}
	c := startProxy(t, srv, px, func(c *s3.Config) { c.AccessKey = "RS3NOSUCHUSER0000001" })

	_, err := c.Object(ctx, bucket, "img")
	checkRefused(t, err, px, srv.SecretKey(), "RS3NOSUCHUSER0000001", "XAdminUserNotFound")
	_, err = c.Object(ctx, bucket, "missing")
	checkRefused(t, err, px, srv.SecretKey(), "XAdminUserNotFound")
	_, err = c.List(ctx, bucket, "")
	checkRefused(t, err, px, srv.SecretKey(), "XAdminUserNotFound")
}

func TestRealObjectReplacedMidRead(t *testing.T) {
	_, c := startReal(t)
	ctx := context.Background()
	v1, v2 := randomBytes(10000, 7), randomBytes(10000, 8)
	put(t, c, "img", v1)
	o, err := c.Object(ctx, bucket, "img")
	require.NoError(t, err)
	p := make([]byte, 1000)
	require.NoError(t, o.ReadAt(ctx, p, 3))
	require.Equal(t, v1[3:1003], p)

	put(t, c, "img", v2) // same size, other bytes
	err = o.ReadAt(ctx, p, 3)
	require.ErrorIs(t, err, s3.ErrChanged)
	require.ErrorIs(t, err, backend.ErrUnavailable)

	require.NoError(t, c.Remove(ctx, bucket, "img"))
	err = o.ReadAt(ctx, p, 3)
	require.ErrorIs(t, err, s3.ErrChanged)
}

// The harness must be the server the probes were recorded from: compare a
// few probes' status and telling headers.
func TestRealMatchesRecordedProbes(t *testing.T) {
	srv, c := startReal(t)
	ctx := context.Background()
	put(t, c, "good/README.txt", []byte("not an image\n"))
	hc := srv.HTTPClient()
	send := func(method, key, rng, accessKey string) *http.Response {
		u := srv.Endpoint() + "/" + bucket + "/" + key
		req, err := http.NewRequestWithContext(ctx, method, u, nil)
		require.NoError(t, err)
		if rng != "" {
			req.Header.Set("Range", rng)
		}
		req.Header.Set("X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD")
		if accessKey != "" {
			req = signer.SignV4(*req, accessKey, srv.SecretKey(), "", srv.Region())
		}
		resp, err := hc.Do(req)
		require.NoError(t, err)
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}
	ak := srv.AccessKey()
	tests := []struct {
		probe string
		resp  *http.Response
	}{
		{"head", send(http.MethodHead, "good/README.txt", "", ak)},
		{"head-range", send(http.MethodHead, "good/README.txt", "bytes=0-3", ak)},
		{"head-missing", send(http.MethodHead, "good/nope", "", ak)},
		{"get-range", send(http.MethodGet, "good/README.txt", "bytes=0-3", ak)},
		{"get-multirange", send(http.MethodGet, "good/README.txt", "bytes=0-1,5-6", ak)},
		{"get-range-backwards", send(http.MethodGet, "good/README.txt", "bytes=10-5", ak)},
		{"get-range-416", send(http.MethodGet, "good/README.txt", "bytes=13-20", ak)},
		{"wrong-access-key", send(http.MethodGet, "good/README.txt", "", "RS3UNKNOWN0000000000")},
		{"anonymous", send(http.MethodGet, "good/README.txt", "", "")},
		{"nosuchkey", send(http.MethodGet, "good/nope", "", ak)},
	}
	for _, tt := range tests {
		t.Run(tt.probe, func(t *testing.T) {
			rec := readProbe(t, tt.probe)
			hdr := rec.Header
			assert.Equal(t, rec.StatusCode, tt.resp.StatusCode, "status")
			for _, name := range []string{"Server", "Content-Type", "Accept-Ranges"} {
				assert.Equal(t, hdr.Get(name), tt.resp.Header.Get(name), name)
			}
			// net/http takes "Connection: close" out of the header into
			// Close (versitygw without --keep-alive sends it).
			assert.Equal(t, rec.Close, tt.resp.Close, "Connection: close")
			for _, name := range []string{"Content-Range", "ETag", "Last-Modified", "X-Amz-Request-Id"} {
				assert.Equal(t, hdr.Get(name) != "", tt.resp.Header.Get(name) != "", "presence of %s", name)
			}
		})
	}
}

// recordedDir holds the answers of a real versitygw (its README says how
// they were taken): NAME.h is a probe's headers.
const recordedDir = "../../testdata/s3-versitygw"

func readProbe(t *testing.T, name string) *http.Response {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(recordedDir, name+".h"))
	require.NoError(t, err)
	resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(append(bytes.TrimRight(raw, "\r\n"), "\r\n\r\n"...))), nil)
	require.NoError(t, err)
	return resp
}
