package httprange

import (
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
)

var testData = func() []byte {
	b := make([]byte, 4096)
	for i := range b {
		b[i] = byte(i*7 + i/251)
	}
	return b
}()

func fastPolicy() Policy {
	return Policy{Attempts: 3, BaseDelay: time.Millisecond, MaxDelay: 2 * time.Millisecond, AttemptTimeout: 300 * time.Millisecond}
}

// faulty serves testData correctly except for the first `bad` requests, which
// get fault.
func faulty(bad int, fault func(w http.ResponseWriter, r *http.Request)) (*httptest.Server, *atomic.Int32) {
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if int(n.Add(1)) <= bad {
			fault(w, r)
			return
		}
		http.ServeContent(w, r, "", time.Time{}, strings.NewReader(string(testData)))
	}))
	return srv, &n
}

func TestReadRangeFaults(t *testing.T) {
	faults := []struct {
		name  string
		fault func(w http.ResponseWriter, r *http.Request)
		want  string
	}{
		{"ignored range", func(w http.ResponseWriter, r *http.Request) { w.Write(testData) }, "server ignored Range: status 200"},
		{"wrong content-range", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 0-99/%d", len(testData)))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(testData[:100])
		}, "Content-Range mismatch"},
		{"garbage content-range", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", "bytes x-y/z")
			w.WriteHeader(http.StatusPartialContent)
		}, "bad Content-Range"},
		{"short body", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 100-299/%d", len(testData)))
			w.Header().Set("Content-Length", "200")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(testData[100:150])
		}, "short body: got 50 of 200 bytes"},
		{"long body", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 100-299/%d", len(testData)))
			w.WriteHeader(http.StatusPartialContent)
			w.(http.Flusher).Flush() // chunked: no Content-Length to give it away
			w.Write(testData[100:400])
		}, "long body"},
		{"content-length mismatch", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 100-299/%d", len(testData)))
			w.Header().Set("Content-Length", "150")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(testData[100:250])
		}, "Content-Length mismatch"},
		{"stall", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 100-299/%d", len(testData)))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(testData[100:120])
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
			case <-time.After(5 * time.Second):
			}
		}, "read body"},
		{"connection reset", func(w http.ResponseWriter, r *http.Request) {
			conn, _, err := w.(http.Hijacker).Hijack()
			if err == nil {
				conn.Close()
			}
		}, "backend unavailable"},
		{"server error", func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "disk on fire", http.StatusInternalServerError)
		}, "disk on fire"},
	}
	for _, tc := range faults {
		t.Run(tc.name+"/persistent", func(t *testing.T) {
			srv, hits := faulty(1000, tc.fault)
			defer srv.Close()
			c := &Client{HTTP: srv.Client(), Policy: fastPolicy()}
			p := make([]byte, 200)
			err := c.ReadRange(context.Background(), srv.URL, p, 100)
			require.Error(t, err)
			assert.ErrorIs(t, err, backend.ErrUnavailable)
			assert.Contains(t, err.Error(), tc.want)
			assert.EqualValues(t, 3, hits.Load())
		})
		t.Run(tc.name+"/transient", func(t *testing.T) {
			srv, hits := faulty(2, tc.fault)
			defer srv.Close()
			c := &Client{HTTP: srv.Client(), Policy: fastPolicy()}
			p := make([]byte, 200)
			require.NoError(t, c.ReadRange(context.Background(), srv.URL, p, 100))
			assert.Equal(t, testData[100:300], p)
			assert.EqualValues(t, 3, hits.Load())
		})
	}
}

func TestReadRangeCorrect(t *testing.T) {
	srv, _ := faulty(0, nil)
	defer srv.Close()
	c := &Client{HTTP: srv.Client()}
	for _, tc := range []struct{ off, n int }{{0, 1}, {0, len(testData)}, {4095, 1}, {17, 1000}, {10, 0}} {
		p := make([]byte, tc.n)
		require.NoError(t, c.ReadRange(context.Background(), srv.URL, p, int64(tc.off)))
		assert.Equal(t, testData[tc.off:tc.off+tc.n], p)
	}
	size, err := c.Size(context.Background(), srv.URL)
	require.NoError(t, err)
	assert.EqualValues(t, len(testData), size)
}

func TestReadRangeUnsatisfiable(t *testing.T) {
	srv, hits := faulty(0, nil)
	defer srv.Close()
	c := &Client{HTTP: srv.Client(), Policy: fastPolicy()}
	err := c.ReadRange(context.Background(), srv.URL, make([]byte, 10), int64(len(testData)+10))
	require.ErrorIs(t, err, backend.ErrInvalid)
	assert.EqualValues(t, 1, hits.Load())
	require.ErrorIs(t, c.ReadRange(context.Background(), srv.URL, make([]byte, 10), -1), backend.ErrInvalid)
}

type tokenAuth struct {
	token  atomic.Value
	renews atomic.Int32
	next   string
}

func (a *tokenAuth) Authorize(_ context.Context, r *http.Request) error {
	r.Header.Set("Authorization", "Bearer "+a.token.Load().(string))
	return nil
}

func (a *tokenAuth) Renew(context.Context) error {
	a.renews.Add(1)
	a.token.Store(a.next)
	return nil
}

func TestUnauthorizedRenew(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer good" {
			http.Error(w, "Not Authorized", http.StatusUnauthorized)
			return
		}
		http.ServeContent(w, r, "", time.Time{}, strings.NewReader(string(testData)))
	}))
	defer srv.Close()
	for _, tc := range []struct {
		name, next string
		wantErr    error
	}{{"renew fixes", "good", nil}, {"still refused", "bad2", backend.ErrPermission}} {
		t.Run(tc.name, func(t *testing.T) {
			a := &tokenAuth{next: tc.next}
			a.token.Store("expired")
			c := &Client{HTTP: srv.Client(), Auth: a, Policy: fastPolicy()}
			p := make([]byte, 64)
			err := c.ReadRange(context.Background(), srv.URL, p, 5)
			if tc.wantErr != nil {
				// A refusal that outlasts renewals is retried within the
				// attempt budget (a 401 storm passes), then reported.
				assert.EqualValues(t, fastPolicy().Attempts+1, a.renews.Load()) // one free, then one per attempt
				require.ErrorIs(t, err, tc.wantErr)
				assert.NotContains(t, err.Error(), "bad2")
				return
			}
			assert.EqualValues(t, 1, a.renews.Load())
			require.NoError(t, err)
			assert.Equal(t, testData[5:69], p)
		})
	}
}

func TestDoStatusMapping(t *testing.T) {
	for _, tc := range []struct {
		status int
		want   error
		hits   int32
	}{{404, backend.ErrNotFound, 1}, {403, backend.ErrPermission, 1}, {400, backend.ErrInvalid, 1},
		{409, backend.ErrExists, 1}, {503, backend.ErrUnavailable, 3}} {
		t.Run(fmt.Sprint(tc.status), func(t *testing.T) {
			var hits atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				hits.Add(1)
				http.Error(w, `{"error":"nope","details":"`+strings.Repeat("x", 2000)+`"}`, tc.status)
			}))
			defer srv.Close()
			c := &Client{HTTP: srv.Client(), Policy: fastPolicy()}
			_, err := c.Do(context.Background(), func(ctx context.Context) (*http.Request, error) {
				return http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/x?token=secret", nil)
			})
			require.ErrorIs(t, err, tc.want)
			assert.Contains(t, err.Error(), "nope")
			assert.NotContains(t, err.Error(), "secret")
			assert.Less(t, len(err.Error()), 1200)
			assert.Equal(t, tc.hits, hits.Load())
		})
	}
}

func TestDoPostNotRetried(t *testing.T) {
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		w.WriteHeader(http.StatusBadGateway)
	}))
	defer srv.Close()
	c := &Client{HTTP: srv.Client(), Policy: fastPolicy()}
	_, err := c.Do(context.Background(), func(ctx context.Context) (*http.Request, error) {
		return http.NewRequestWithContext(ctx, http.MethodPost, srv.URL, nil)
	})
	require.ErrorIs(t, err, backend.ErrUnavailable)
	assert.EqualValues(t, 1, hits.Load())
}

func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{"bytes 0-99/100", "bytes 5-5/*", "bytes 10-5/100", "bytes -1-2/3", "bytes 0-9223372036854775807/*", "items 0-1/2", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		first, last, total, err := ParseContentRange(s)
		if err != nil {
			return
		}
		if first < 0 || last < first || (total != -1 && last >= total) {
			t.Fatalf("accepted inconsistent range %q: %d-%d/%d", s, first, last, total)
		}
		want := fmt.Sprintf("bytes %d-%d/", first, last)
		if !strings.HasPrefix(strings.TrimSpace(s), "bytes ") {
			t.Fatalf("accepted %q without bytes unit (%s)", s, want)
		}
	})
}
