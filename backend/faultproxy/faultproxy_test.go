package faultproxy

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// startProxy runs a proxy with opts in front of a server of content and
// returns it with a pool trusting its certificate.
func startProxy(t *testing.T, content []byte, opts Options) (*Proxy, *x509.CertPool) {
	upstream := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		http.ServeContent(w, r, "disk.img", time.Time{}, bytes.NewReader(content))
	}))
	t.Cleanup(upstream.Close)
	opts.Upstream, opts.UpstreamCA, opts.Dir = upstream.URL, x509.NewCertPool(), t.TempDir()
	opts.UpstreamCA.AddCert(upstream.Certificate())
	p, err := Start(opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = p.Close() })
	caPEM, err := os.ReadFile(p.CAFile())
	require.NoError(t, err)
	pool := x509.NewCertPool()
	require.True(t, pool.AppendCertsFromPEM(caPEM))
	return p, pool
}

// TestFaults checks that each fault shows the client the symptom it is named
// for, so the fault matrices built on the proxy test what they claim.
func TestFaults(t *testing.T) {
	content := bytes.Repeat([]byte("0123456789abcdef"), 4096)
	p, pool := startProxy(t, content, Options{StallFor: 2 * time.Second, RestartFor: 300 * time.Millisecond, BurstLen: 2})
	client := &http.Client{
		Timeout:   500 * time.Millisecond,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, DisableKeepAlives: true},
	}

	type result struct {
		status        int
		contentRange  string
		contentLength int64
		body          []byte
		err           error // of the request or of reading the body
	}
	get := func(rangeHeader string) result {
		req, err := http.NewRequest(http.MethodGet, p.URL()+"/disk.img", nil)
		require.NoError(t, err)
		if rangeHeader != "" {
			req.Header.Set("Range", rangeHeader)
		}
		resp, err := client.Do(req)
		if err != nil {
			return result{err: err}
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		return result{status: resp.StatusCode, contentRange: resp.Header.Get("Content-Range"),
			contentLength: resp.ContentLength, body: body, err: err}
	}
	want := content[4096:8192]

	for _, tc := range []struct {
		fault Fault
		check func(t *testing.T, r result)
	}{
		{None, func(t *testing.T, r result) {
			require.NoError(t, r.err)
			assert.Equal(t, http.StatusPartialContent, r.status)
			assert.Equal(t, "bytes 4096-8191/65536", r.contentRange)
			assert.Equal(t, want, r.body)
		}},
		{Reset, func(t *testing.T, r result) {
			require.Error(t, r.err)
			assert.Less(t, len(r.body), len(want))
		}},
		{Stall, func(t *testing.T, r result) {
			require.Error(t, r.err)
			assert.ErrorContains(t, r.err, "Timeout")
		}},
		{ServerError, func(t *testing.T, r result) {
			require.NoError(t, r.err)
			assert.Equal(t, http.StatusServiceUnavailable, r.status)
		}},
		{ShortBody, func(t *testing.T, r result) {
			assert.Equal(t, int64(len(want)), r.contentLength)
			assert.ErrorIs(t, r.err, io.ErrUnexpectedEOF)
			assert.Equal(t, want[:len(r.body)], r.body, "what arrives is a true prefix")
		}},
		{IgnoreRange, func(t *testing.T, r result) {
			require.NoError(t, r.err)
			assert.Equal(t, http.StatusOK, r.status)
			assert.Empty(t, r.contentRange)
			assert.Equal(t, content, r.body)
		}},
		{WrongRange, func(t *testing.T, r result) {
			require.NoError(t, r.err)
			assert.Equal(t, http.StatusPartialContent, r.status)
			assert.Equal(t, "bytes 3584-7679/65536", r.contentRange, "honest about the shifted range")
			assert.Equal(t, content[3584:7680], r.body)
		}},
		{Unauthorized, func(t *testing.T, r result) {
			require.NoError(t, r.err)
			assert.Equal(t, http.StatusUnauthorized, r.status)
		}},
		{Restart, func(t *testing.T, r result) {
			require.Error(t, r.err)
		}},
	} {
		t.Run(tc.fault.String(), func(t *testing.T) {
			p.Set(tc.fault, 1)
			before := p.Injected()
			tc.check(t, get("bytes=4096-8191"))
			if tc.fault != None {
				assert.Equal(t, before+1, p.Injected())
			}
			p.Set(None, 0)
			time.Sleep(10 * time.Millisecond)
			r := get("bytes=4096-8191")
			require.NoError(t, r.err, "recovers once the fault is off")
			assert.Equal(t, want, r.body)
		})
	}

	t.Run("bursts and windows", func(t *testing.T) {
		// A burst of BurstLen answers, then the fault is drawn again.
		p.Set(ServerError, 1)
		before := p.Injected()
		for range 2 {
			assert.Equal(t, http.StatusServiceUnavailable, get("bytes=0-1").status)
		}
		assert.Equal(t, before+1, p.Injected(), "a burst counts as one fault")
		p.Set(ServerError, 0.5)
		var failed int
		for range 40 {
			if get("bytes=0-1").status != http.StatusPartialContent {
				failed++
			}
		}
		assert.InDelta(t, 27, failed, 13, "rate 0.5 with bursts of 2 fails about 2 in 3")
		// Only data requests (GET with Range) start a fault, except 401s.
		p.Set(ServerError, 1)
		r := get("")
		require.NoError(t, r.err)
		assert.Equal(t, http.StatusOK, r.status)
		p.Set(Unauthorized, 1)
		assert.Equal(t, http.StatusUnauthorized, get("").status)
		// Restart drops everything until the window ends.
		p.Set(Restart, 1)
		require.Error(t, get("bytes=0-1").err)
		require.Error(t, get("").err, "still down inside the restart window")
		time.Sleep(350 * time.Millisecond)
		require.NoError(t, get("").err)
	})
}

// TestHostileFaults checks that each hostile answer is what its name says,
// and that the redirect targets catch what follows them.
func TestHostileFaults(t *testing.T) {
	content := bytes.Repeat([]byte("0123456789abcdef"), 4096)
	p, pool := startProxy(t, content, Options{})
	client := &http.Client{
		Timeout:       2 * time.Second,
		Transport:     &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, DisableKeepAlives: true},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	do := func(method, body string) (*http.Response, []byte) {
		req, err := http.NewRequest(method, p.URL()+"/disk.img?q=1", strings.NewReader(body))
		require.NoError(t, err)
		if method == http.MethodGet {
			req.Header.Set("Range", "bytes=4096-8191")
		}
		req.Header.Set("Authorization", "Bearer the-token")
		resp, err := client.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, b
	}
	want := content[4096:8192]
	do(http.MethodPost, `{"password":"the-password"}`) // a login the proxy sees

	for _, tc := range []struct {
		fault  Fault
		method string
		check  func(t *testing.T, resp *http.Response, body []byte)
	}{
		{GzipEncoding, http.MethodGet, func(t *testing.T, resp *http.Response, body []byte) {
			assert.Equal(t, http.StatusPartialContent, resp.StatusCode)
			assert.Equal(t, "gzip", resp.Header.Get("Content-Encoding"))
			assert.Equal(t, "bytes 4096-8191/65536", resp.Header.Get("Content-Range"))
			assert.Len(t, body, len(want), "the length gives nothing away")
			assert.NotEqual(t, want, body)
			assert.Equal(t, []byte{0x1f, 0x8b}, body[:2])
		}},
		{Multipart, http.MethodGet, func(t *testing.T, resp *http.Response, body []byte) {
			assert.Equal(t, http.StatusPartialContent, resp.StatusCode)
			assert.Contains(t, resp.Header.Get("Content-Type"), "multipart/byteranges")
			assert.Equal(t, "bytes 4096-8191/65536", resp.Header.Get("Content-Range"))
			assert.Len(t, body, len(want))
			assert.True(t, bytes.HasPrefix(body, []byte("--")), "the framing is what a careless client reads")
		}},
		{WrongTotal, http.MethodGet, func(t *testing.T, resp *http.Response, body []byte) {
			assert.Equal(t, "bytes 4096-8191/1114112", resp.Header.Get("Content-Range"))
			assert.Equal(t, want, body)
		}},
		{Unsatisfiable, http.MethodGet, func(t *testing.T, resp *http.Response, body []byte) {
			assert.Equal(t, http.StatusRequestedRangeNotSatisfiable, resp.StatusCode)
		}},
		{RedirectHTTP, http.MethodGet, func(t *testing.T, resp *http.Response, body []byte) {
			assert.Equal(t, http.StatusFound, resp.StatusCode)
			assert.True(t, strings.HasPrefix(resp.Header.Get("Location"), "http://127.0.0.1:"), resp.Header.Get("Location"))
		}},
		{RedirectOrigin, http.MethodGet, func(t *testing.T, resp *http.Response, body []byte) {
			assert.Equal(t, http.StatusFound, resp.StatusCode)
			loc := resp.Header.Get("Location")
			assert.True(t, strings.HasPrefix(loc, "https://127.0.0.1:") && !strings.HasPrefix(loc, p.URL()), loc)
		}},
		{RedirectLogin, http.MethodPost, func(t *testing.T, resp *http.Response, body []byte) {
			assert.Equal(t, http.StatusTemporaryRedirect, resp.StatusCode)
			assert.True(t, strings.HasPrefix(resp.Header.Get("Location"), "http://127.0.0.1:"))
		}},
		{EchoSecrets, http.MethodGet, func(t *testing.T, resp *http.Response, body []byte) {
			assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)
			assert.Contains(t, string(body), "the-token")
			assert.Contains(t, string(body), "the-password")
		}},
	} {
		t.Run(tc.fault.String(), func(t *testing.T) {
			p.Set(tc.fault, 1)
			resp, body := do(tc.method, "{}")
			tc.check(t, resp, body)
			p.Set(None, 0)
			resp, body = do(http.MethodGet, "")
			assert.Equal(t, want, body, "recovers once the fault is off")
			assert.Equal(t, http.StatusPartialContent, resp.StatusCode)
		})
	}

	// A client that follows the redirects hands the catchers its token.
	follow := &http.Client{Transport: client.Transport}
	for _, f := range []Fault{RedirectHTTP, RedirectOrigin} {
		p.Set(f, 1)
		req, _ := http.NewRequest(http.MethodGet, p.URL()+"/disk.img", nil)
		req.Header.Set("Range", "bytes=0-9")
		req.Header.Set("X-Kubevirt-Export-Token", "followed-token")
		resp, err := follow.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
	}
	p.Set(None, 0)
	caught := p.Caught()
	require.Len(t, caught, 2)
	for _, c := range caught {
		assert.Contains(t, c, "followed-token")
	}
}

// TestFirstAttempts checks SetFirst: each distinct data request fails its
// first k attempts and passes after, however the attempts of different
// requests interleave, and exactly k faults are counted per request; and
// LongestRun, the most attempts in a row one request failed.
func TestFirstAttempts(t *testing.T) {
	content := bytes.Repeat([]byte("0123456789abcdef"), 4096)
	p, pool := startProxy(t, content, Options{})
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	get := func(path, rangeHeader string) int {
		req, err := http.NewRequest(http.MethodGet, p.URL()+path, nil)
		require.NoError(t, err)
		if rangeHeader != "" {
			req.Header.Set("Range", rangeHeader)
		}
		resp, err := client.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode
	}
	const k = 2
	p.SetFirst(ServerError, k)
	injected, data := p.Injected(), p.DataRequests()
	requests := []struct{ path, rng string }{
		{"/disk.img", "bytes=0-99"}, {"/disk.img", "bytes=100-199"}, {"/other.img", "bytes=0-99"},
	}
	// Interleaved: a fault for one request is not an attempt of another.
	for try := range k + 2 {
		for _, r := range requests {
			want := http.StatusPartialContent
			if try < k {
				want = http.StatusServiceUnavailable
			}
			assert.Equal(t, want, get(r.path, r.rng), "attempt %d of %s %s", try+1, r.path, r.rng)
		}
	}
	assert.Equal(t, http.StatusOK, get("/disk.img", ""), "not a data request: never faulted")
	assert.Equal(t, int64(k*len(requests)), p.Injected()-injected)
	assert.Equal(t, int64((k+2)*len(requests)), p.DataRequests()-data)
	assert.Equal(t, k, p.LongestRun(), "each request failed k attempts in a row, interleaved with the others")

	// Set ends the mode: a request never seen passes.
	p.Set(None, 0)
	assert.Zero(t, p.LongestRun())
	assert.Equal(t, http.StatusPartialContent, get("/disk.img", "bytes=200-299"))

	// Runs are per request, and a success ends one.
	p.Set(ServerError, 1)
	for range 3 {
		assert.Equal(t, http.StatusServiceUnavailable, get("/disk.img", "bytes=0-99"))
	}
	assert.Equal(t, http.StatusServiceUnavailable, get("/disk.img", "bytes=100-199"))
	assert.Equal(t, 3, p.LongestRun())
	p.SetFirst(ServerError, 1)
	assert.Equal(t, http.StatusServiceUnavailable, get("/disk.img", "bytes=0-99"))
	assert.Equal(t, http.StatusPartialContent, get("/disk.img", "bytes=0-99"))
	assert.Equal(t, http.StatusServiceUnavailable, get("/disk.img", "bytes=100-199"))
	assert.Equal(t, 1, p.LongestRun())

	// A success ends a run: the longest is the client's longest streak of
	// failures of one request, not its count of them.
	p.Set(ServerError, 0.5)
	longest, streak, failed := 0, 0, 0
	for range 40 {
		if get("/disk.img", "bytes=0-99") == http.StatusServiceUnavailable {
			streak++
			failed++
			longest = max(longest, streak)
		} else {
			streak = 0
		}
	}
	require.Less(t, longest, failed, "some run of failures was ended by a success")
	assert.Equal(t, longest, p.LongestRun())
}
