package s3_test

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/retry"
	"github.com/vmexportfs/vmexportfs/backend/s3"
)

// fakeStore answers HEAD honestly and Range GETs in one of many wrong ways,
// to show that ReadAt refuses each. A real server cannot be made to lie.
type fakeStore struct {
	data  []byte
	etag  string
	mode  string
	gets  atomic.Int64
	srv   *httptest.Server
	calls func(r *http.Request)
}

func newFake(t *testing.T, mode string) (*fakeStore, *s3.Client) {
	t.Helper()
	f := &fakeStore{data: bytes.Repeat([]byte("0123456789abcdef"), 256), etag: `"abc123"`, mode: mode}
	f.srv = httptest.NewTLSServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	pool := f.srv.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs
	c, err := s3.New(context.Background(), s3.Config{
		Endpoint: f.srv.URL, Region: "cn-east-2", AccessKey: "AKFAKE", SecretKey: "fake-secret-key",
		RootCAs: pool,
		Policy:  retry.Policy{Attempts: 3, BaseDelay: time.Millisecond, MaxDelay: 2 * time.Millisecond},
	})
	require.NoError(t, err)
	return f, c
}

func (f *fakeStore) serve(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("ETag", f.etag)
	h.Set("Last-Modified", time.Unix(1700000000, 0).UTC().Format(http.TimeFormat))
	if r.Method == http.MethodHead {
		h.Set("Content-Length", fmt.Sprint(len(f.data)))
		return
	}
	f.gets.Add(1)
	var a, b int
	if _, err := fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-%d", &a, &b); err != nil {
		http.Error(w, "bad range", http.StatusBadRequest)
		return
	}
	body := f.data[a : b+1]
	cr := fmt.Sprintf("bytes %d-%d/%d", a, b, len(f.data))
	status := http.StatusPartialContent
	switch f.mode {
	case "ok":
	case "200-whole":
		status, body, cr = http.StatusOK, f.data, ""
	case "wrong-range":
		cr = fmt.Sprintf("bytes %d-%d/%d", a+1, b+1, len(f.data))
		body = f.data[a+1 : b+2]
	case "wrong-total":
		cr = fmt.Sprintf("bytes %d-%d/%d", a, b, len(f.data)+1)
	case "no-content-range":
		cr = ""
	case "short-body":
		h.Set("Content-Length", fmt.Sprint(len(body)))
		h.Set("Content-Range", cr)
		w.WriteHeader(status)
		_, _ = w.Write(body[:len(body)-1])
		return // the server closes the connection: a short body
	case "no-length":
		h.Set("Content-Range", cr)
		w.WriteHeader(status)
		_, _ = w.Write(body)
		w.(http.Flusher).Flush() // chunked: no Content-Length
		return
	case "gzip":
		h.Set("Content-Encoding", "gzip")
	case "multipart":
		h.Set("Content-Type", "multipart/byteranges; boundary=x")
	case "changed-etag":
		h.Set("ETag", `"other"`)
	case "no-etag":
		h.Del("ETag")
	case "416":
		h.Set("Content-Type", "application/xml")
		w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
		fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidRange</Code><Message>The requested range is not satisfiable</Message></Error>`)
		return
	case "412":
		w.WriteHeader(http.StatusPreconditionFailed)
		fmt.Fprint(w, `<Error><Code>PreconditionFailed</Code><Message>At least one of the pre-conditions you specified did not hold</Message></Error>`)
		return
	case "500-then-ok":
		if f.gets.Load() == 1 {
			w.WriteHeader(http.StatusInternalServerError)
			fmt.Fprint(w, `<Error><Code>InternalError</Code><Message>try again</Message></Error>`)
			return
		}
	case "echo-secret":
		w.WriteHeader(http.StatusForbidden)
		fmt.Fprint(w, `<Error><Code>AccessDenied</Code><Message>key AKFAKE secret fake-secret-key</Message></Error>`)
		return
	}
	if cr != "" {
		h.Set("Content-Range", cr)
	}
	h.Set("Content-Length", fmt.Sprint(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func TestReadAtRefusesWrongAnswers(t *testing.T) {
	tests := []struct {
		mode      string
		retried   bool // a fault worth retrying, so all 3 attempts are used
		sentinel  error
		errSubstr string
	}{
		{"200-whole", true, backend.ErrUnavailable, "ignored Range: status 200"},
		{"wrong-range", true, backend.ErrUnavailable, "Content-Range mismatch"},
		{"wrong-total", true, backend.ErrUnavailable, "total"},
		{"no-content-range", true, backend.ErrUnavailable, "bad Content-Range"},
		{"short-body", true, backend.ErrUnavailable, ""},
		{"no-length", true, backend.ErrUnavailable, "Content-Length -1"},
		{"gzip", true, backend.ErrUnavailable, "Content-Encoding"},
		{"multipart", true, backend.ErrUnavailable, "multipart"},
		{"changed-etag", false, s3.ErrChanged, "ETag"},
		{"no-etag", false, s3.ErrChanged, "ETag"},
		{"416", true, backend.ErrUnavailable, "InvalidRange"},
		{"412", false, s3.ErrChanged, "If-Match"},
	}
	for _, tt := range tests {
		t.Run(tt.mode, func(t *testing.T) {
			f, c := newFake(t, tt.mode)
			ctx := context.Background()
			o, err := c.Object(ctx, "bucket", "dir/disk.qcow2")
			require.NoError(t, err)
			require.Equal(t, int64(len(f.data)), o.Size())
			assert.Equal(t, "abc123", o.ETag())
			p := make([]byte, 100)
			err = o.ReadAt(ctx, p, 17)
			require.Error(t, err)
			assert.ErrorIs(t, err, tt.sentinel)
			assert.NotErrorIs(t, err, backend.ErrNotFound)
			assert.Contains(t, err.Error(), tt.errSubstr)
			want := int64(1)
			if tt.retried {
				want = 3
			}
			assert.Equal(t, want, f.gets.Load(), "attempts")
			assert.Zero(t, c.Stats().BytesRead, "no bytes counted as read")
		})
	}
}

func TestReadAtFake(t *testing.T) {
	for _, mode := range []string{"ok", "500-then-ok"} {
		t.Run(mode, func(t *testing.T) {
			f, c := newFake(t, mode)
			ctx := context.Background()
			o, err := c.Object(ctx, "bucket", "k")
			require.NoError(t, err)
			p := make([]byte, 333)
			require.NoError(t, o.ReadAt(ctx, p, 1001))
			assert.Equal(t, f.data[1001:1334], p)
			st := c.Stats()
			assert.Equal(t, int64(333), st.BytesRead)
			assert.Equal(t, int64(1), st.Reads)
			// Outside the object: refused before any request.
			before := f.gets.Load()
			assert.ErrorIs(t, o.ReadAt(ctx, p, int64(len(f.data))-10), backend.ErrInvalid)
			assert.Equal(t, before, f.gets.Load())
		})
	}
}

func TestEchoedKeysMasked(t *testing.T) {
	_, c := newFake(t, "echo-secret")
	ctx := context.Background()
	o, err := c.Object(ctx, "bucket", "k")
	require.NoError(t, err)
	err = o.ReadAt(ctx, make([]byte, 10), 0)
	require.ErrorIs(t, err, backend.ErrPermission)
	assert.NotContains(t, err.Error(), "fake-secret-key")
	assert.NotContains(t, err.Error(), "AKFAKE")
	assert.Contains(t, err.Error(), "AccessDenied")
}

func TestNewRefusesBadConfig(t *testing.T) {
	ctx := context.Background()
	good := s3.Config{Endpoint: "https://s3.example:9000", Region: "r", AccessKey: "a", SecretKey: "s"}
	_, err := s3.New(ctx, good)
	require.NoError(t, err)
	for name, mod := range map[string]func(*s3.Config){
		"http":      func(c *s3.Config) { c.Endpoint = "http://s3.example" },
		"path":      func(c *s3.Config) { c.Endpoint = "https://s3.example/bucket" },
		"userinfo":  func(c *s3.Config) { c.Endpoint = "https://u:fake-pass@s3.example" },
		"no region": func(c *s3.Config) { c.Region = "" },
		"no secret": func(c *s3.Config) { c.SecretKey = "" },
	} {
		t.Run(name, func(t *testing.T) {
			cfg := good
			mod(&cfg)
			_, err := s3.New(ctx, cfg)
			require.ErrorIs(t, err, backend.ErrInvalid)
			assert.False(t, strings.Contains(err.Error(), "fake-pass"))
		})
	}
}
