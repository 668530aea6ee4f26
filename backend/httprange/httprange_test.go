package httprange

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/redact"
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
		{"gzip encoded", func(w http.ResponseWriter, r *http.Request) {
			var z bytes.Buffer
			zw := gzip.NewWriter(&z)
			zw.Write(testData[100:300])
			zw.Close()
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 100-299/%d", len(testData)))
			w.Header().Set("Content-Encoding", "gzip")
			w.Header().Set("Content-Length", fmt.Sprint(z.Len()))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(z.Bytes())
		}, `Content-Encoding "gzip"`},
		{"gzip encoded with a length matching the range", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 100-299/%d", len(testData)))
			w.Header().Set("Content-Encoding", "identity, br")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(bytes.Repeat([]byte{0xa5}, 200))
		}, `Content-Encoding "identity, br"`},
		{"multipart", func(w http.ResponseWriter, r *http.Request) {
			body := fmt.Sprintf("--B\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 100-299/%d\r\n\r\n%s\r\n--B--\r\n", len(testData), testData[100:300])
			w.Header().Set("Content-Type", "multipart/byteranges; boundary=B")
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 100-299/%d", len(testData)))
			w.Header().Set("Content-Length", "200") // lies: the transport cuts the framing to 200 bytes
			w.WriteHeader(http.StatusPartialContent)
			w.Write([]byte(body))
		}, "multipart answer"},
		{"total differs from the disk size", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 100-299/%d", len(testData)+512))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(testData[100:300])
		}, "Content-Range total mismatch"},
		{"total unknown", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", "bytes 100-299/*")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(testData[100:300])
		}, "total unknown"},
		{"416 inside the disk", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", "bytes */0")
			http.Error(w, "range not satisfiable", http.StatusRequestedRangeNotSatisfiable)
		}, "status 416"},
	}
	for _, tc := range faults {
		t.Run(tc.name+"/persistent", func(t *testing.T) {
			srv, hits := faulty(1000, tc.fault)
			defer srv.Close()
			c := &Client{HTTP: srv.Client(), Policy: fastPolicy()}
			p := make([]byte, 200)
			err := c.ReadRange(context.Background(), srv.URL, int64(len(testData)), p, 100)
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
			require.NoError(t, c.ReadRange(context.Background(), srv.URL, int64(len(testData)), p, 100))
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
		require.NoError(t, c.ReadRange(context.Background(), srv.URL, int64(len(testData)), p, int64(tc.off)))
		assert.Equal(t, testData[tc.off:tc.off+tc.n], p)
	}
	size, err := c.Size(context.Background(), srv.URL)
	require.NoError(t, err)
	assert.EqualValues(t, len(testData), size)
}

func TestReadRangeOutsideTheDisk(t *testing.T) {
	srv, hits := faulty(0, nil)
	defer srv.Close()
	c := &Client{HTTP: srv.Client(), Policy: fastPolicy()}
	size := int64(len(testData))
	for _, tc := range []struct {
		name   string
		off, n int64
		size   int64
	}{{"past the end", size + 10, 10, size}, {"straddling the end", size - 5, 10, size}, {"negative", -1, 10, size}, {"unknown size", 0, 10, -1}} {
		t.Run(tc.name, func(t *testing.T) {
			err := c.ReadRange(context.Background(), srv.URL, tc.size, make([]byte, tc.n), tc.off)
			require.ErrorIs(t, err, backend.ErrInvalid)
		})
	}
	assert.Zero(t, hits.Load(), "a range outside the disk is refused before any request")
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
			err := c.ReadRange(context.Background(), srv.URL, int64(len(testData)), p, 5)
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
	f.Add("bytes 007-09/0100")
	f.Add(" bytes 0-0/1\t")
	f.Add("bytes +0-1/+2")
	// The leading zeros of a decimal number, keeping its last digit.
	leadingZeros := regexp.MustCompile(`\b0+([0-9])`)
	f.Fuzz(func(t *testing.T, s string) {
		first, last, total, err := ParseContentRange(s)
		if err != nil {
			return
		}
		if first < 0 || last < first || (total != -1 && last >= total) {
			t.Fatalf("accepted inconsistent range %q: %d-%d/%d", s, first, last, total)
		}
		want := fmt.Sprintf("bytes %d-%d/", first, last)
		if total == -1 {
			want += "*"
		} else {
			want += strconv.FormatInt(total, 10)
		}
		// What was accepted is the canonical header, up to surrounding
		// space and leading zeros: the numbers read are the numbers sent.
		if got := leadingZeros.ReplaceAllString(strings.TrimSpace(s), "$1"); got != want {
			t.Fatalf("accepted %q as %q", s, want)
		}
		f2, l2, t2, err := ParseContentRange(want)
		if err != nil || f2 != first || l2 != last || t2 != total {
			t.Fatalf("canonical %q of %q reads as %d-%d/%d (%v)", want, s, f2, l2, t2, err)
		}
	})
}

// redirector answers every request with a redirect to target and records
// what reached it.
func redirector(t *testing.T, status int, target func() string) *httptest.Server {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Location", target())
		w.WriteHeader(status)
	}))
	t.Cleanup(srv.Close)
	return srv
}

// catcher records the credentials and bodies it is sent, then serves testData.
type catcher struct {
	srv  *httptest.Server
	hits atomic.Int32
	seen atomic.Value // string: headers and body of the last request
}

func newCatcher(t *testing.T, tls bool) *catcher {
	c := &catcher{}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.hits.Add(1)
		body, _ := io.ReadAll(r.Body)
		c.seen.Store(fmt.Sprint(r.Header, r.URL.RawQuery, string(body)))
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(testData))
	})
	if tls {
		c.srv = httptest.NewTLSServer(h)
	} else {
		c.srv = httptest.NewServer(h)
	}
	t.Cleanup(c.srv.Close)
	return c
}

func TestRedirectsKeepCredentialsHome(t *testing.T) {
	const secret = "jwt-secret-value"
	for _, tc := range []struct {
		name    string
		status  int
		tls     bool // the catcher's scheme
		trusted bool
		follow  bool
	}{
		{"302 to plain http", http.StatusFound, false, false, false},
		{"302 to plain http, even when trusted", http.StatusFound, false, true, false},
		{"302 to another https origin", http.StatusFound, true, false, false},
		{"307 to another https origin", http.StatusTemporaryRedirect, true, false, false},
		{"302 to a trusted https origin", http.StatusFound, true, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := newCatcher(t, tc.tls)
			src := redirector(t, tc.status, func() string { return dst.srv.URL + "/disk" })
			hc := src.Client()
			var logs bytes.Buffer
			c := &Client{HTTP: hc, Policy: fastPolicy(), Auth: &tokenAuth{}, Logger: slog.New(slog.NewTextHandler(&logs, nil))}
			c.Auth.(*tokenAuth).token.Store(secret)
			if tc.trusted {
				c.TrustRedirect = func(from, to *url.URL) bool {
					return to.Host == strings.TrimPrefix(strings.TrimPrefix(dst.srv.URL, "https://"), "http://")
				}
			}
			// A read, and a login-like POST with a body that must not travel.
			err := c.ReadRange(context.Background(), src.URL+"/disk?session=x", int64(len(testData)), make([]byte, 10), 0)
			_, perr := c.Do(context.Background(), func(ctx context.Context) (*http.Request, error) {
				return http.NewRequestWithContext(ctx, http.MethodPost, src.URL+"/login", strings.NewReader(`{"password":"`+secret+`"}`))
			})
			if tc.follow {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, backend.ErrUnavailable)
			require.ErrorIs(t, perr, backend.ErrUnavailable)
			assert.Contains(t, err.Error(), "redirect refused")
			assert.Contains(t, logs.String(), "redirect refused")
			assert.Zero(t, dst.hits.Load(), "nothing may reach the other origin")
			assert.NotContains(t, err.Error()+logs.String(), secret)
		})
	}
}

func TestRedirectSameOriginFollowed(t *testing.T) {
	var srv *httptest.Server
	srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/old" {
			http.Redirect(w, r, srv.URL+"/new", http.StatusFound)
			return
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(testData))
	}))
	defer srv.Close()
	c := &Client{HTTP: srv.Client(), Policy: fastPolicy()}
	p := make([]byte, 100)
	require.NoError(t, c.ReadRange(context.Background(), srv.URL+"/old", int64(len(testData)), p, 7))
	assert.Equal(t, testData[7:107], p)
}

func TestOrigin(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		same bool
	}{
		{"https://h:443/x", "https://H/y", true},
		{"http://h/x", "http://h:80/y", true},
		{"https://h/x", "http://h/x", false},
		{"https://h:5544/x", "https://h:5545/x", false},
		{"https://h/x", "https://h.evil/x", false},
	} {
		a, _ := url.Parse(tc.a)
		b, _ := url.Parse(tc.b)
		assert.Equal(t, tc.same, origin(a) == origin(b), "%s vs %s", tc.a, tc.b)
	}
}

func TestEchoedSecretsMasked(t *testing.T) {
	const password, token = "hunter2-password", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
	for _, status := range []int{401, 500, 502} {
		t.Run(fmt.Sprint(status), func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				http.Error(w, "bad login for password "+password+" token "+token+"\x1b[2J\nlevel=ERROR forged", status)
			}))
			defer srv.Close()
			secrets := &redact.Secrets{}
			secrets.Add(password)
			var logs bytes.Buffer
			c := &Client{HTTP: srv.Client(), Policy: fastPolicy(), Secrets: secrets, Logger: slog.New(slog.NewTextHandler(&logs, nil))}
			err := c.ReadRange(context.Background(), srv.URL, int64(len(testData)), make([]byte, 10), 0)
			require.Error(t, err)
			out := err.Error() + logs.String()
			assert.NotContains(t, out, password)
			assert.NotContains(t, out, token)
			assert.NotContains(t, out, "\x1b")
			assert.NotContains(t, err.Error(), "\n")
			assert.Contains(t, err.Error(), redact.Mask)
		})
	}
}

// FuzzRangeAnswer builds raw HTTP answers to a Range request from the source
// bytes, transformed the way a broken or hostile server transforms them
// (encoded, framed as multipart, cut, padded, shifted, the whole resource)
// under fuzzed status and headers, and parses them as the transport does.
// Whatever checkRange accepts must be exactly the bytes asked for. Only lies
// that no client can see through are excluded: a shifted or whole body is
// always labelled with its true Content-Range.
func FuzzRangeAnswer(f *testing.F) {
	f.Add(uint16(206), uint8(0), int64(0), int64(100), int64(0), "", "", "", "", true)
	f.Add(uint16(206), uint8(1), int64(10), int64(200), int64(0), "", "gzip", "", "", true)
	f.Add(uint16(206), uint8(2), int64(10), int64(200), int64(0), "200", "", "multipart/byteranges; boundary=B", "", true)
	f.Add(uint16(206), uint8(3), int64(10), int64(200), int64(5), "", "", "", "", true)
	f.Add(uint16(206), uint8(4), int64(10), int64(200), int64(5), "200", "", "", "", true)
	f.Add(uint16(206), uint8(5), int64(10), int64(200), int64(512), "", "", "", "", true)
	f.Add(uint16(200), uint8(6), int64(0), int64(4096), int64(0), "", "", "", "", true)
	f.Add(uint16(206), uint8(0), int64(1), int64(2), int64(0), "2", "", "text/plain", "bytes 1-2/*", false)
	f.Fuzz(func(t *testing.T, status uint16, mode uint8, off, n, k int64, contentLength, contentEncoding, contentType, contentRange string, honestRange bool) {
		size := int64(len(testData))
		if n <= 0 || n > size || off < 0 || off > size-n || status < 100 || status > 999 {
			return
		}
		k = k & 1023
		want := testData[off : off+n]
		var body []byte
		first, last := off, off+n-1
		switch mode % 7 {
		case 0: // as asked
			body = want
		case 1: // compressed
			var z bytes.Buffer
			zw := gzip.NewWriter(&z)
			zw.Write(want)
			zw.Close()
			body = z.Bytes()
			if contentEncoding == "" {
				contentEncoding = "gzip"
			}
		case 2: // multipart framing around the right bytes
			body = fmt.Appendf(nil, "--B\r\nContent-Range: bytes %d-%d/%d\r\n\r\n%s\r\n--B--\r\n", first, last, size, want)
			if !strings.HasPrefix(strings.ToLower(strings.TrimSpace(contentType)), "multipart/") {
				contentType = "multipart/byteranges; boundary=B"
			}
		case 3: // cut short
			body = want[:max(n-1-k, 0)]
		case 4: // padded
			body = append(append([]byte{}, want...), bytes.Repeat([]byte{0x5a}, int(k)+1)...)
		case 5: // another range, truthfully labelled
			first = min(off+k+1, size-n)
			if first == off {
				first = max(off-k-1, 0)
			}
			if first == off {
				return
			}
			last = first + n - 1
			body = testData[first : last+1]
			honestRange = true
		case 6: // the whole resource, truthfully labelled
			first, last, body = 0, size-1, testData
			honestRange = true
		}
		if honestRange {
			contentRange = fmt.Sprintf("bytes %d-%d/%d", first, last, size)
		}
		var raw bytes.Buffer
		fmt.Fprintf(&raw, "HTTP/1.1 %d X\r\n", status)
		header := func(k, v string) {
			if v = strings.NewReplacer("\r", "", "\n", "").Replace(v); v != "" {
				fmt.Fprintf(&raw, "%s: %s\r\n", k, v)
			}
		}
		header("Content-Range", contentRange)
		header("Content-Encoding", contentEncoding)
		header("Content-Type", contentType)
		if contentLength == "" {
			contentLength = fmt.Sprint(len(body))
		}
		header("Content-Length", contentLength)
		raw.WriteString("\r\n")
		raw.Write(body)
		req, _ := http.NewRequest(http.MethodGet, "http://disk/", nil)
		resp, err := http.ReadResponse(bufio.NewReader(&raw), req)
		if err != nil {
			return // the transport refuses it before we see it
		}
		defer resp.Body.Close()
		p := make([]byte, n)
		c := &Client{}
		if aerr := c.checkRange(resp, size, [][]byte{p}, off); aerr == nil && !bytes.Equal(p, want) {
			t.Fatalf("accepted wrong bytes: mode %d status %d headers %v", mode%7, status, resp.Header)
		}
	})
}
