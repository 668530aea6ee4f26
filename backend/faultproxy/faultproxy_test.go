package faultproxy

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestFaults checks that each fault shows the client the symptom it is named
// for, so the fault matrices built on the proxy test what they claim.
func TestFaults(t *testing.T) {
	content := bytes.Repeat([]byte("0123456789abcdef"), 4096)
	upstream := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "disk.img", time.Time{}, bytes.NewReader(content))
	}))
	t.Cleanup(upstream.Close)
	upstreamCA := x509.NewCertPool()
	upstreamCA.AddCert(upstream.Certificate())

	p, err := Start(Options{Upstream: upstream.URL, UpstreamCA: upstreamCA, Dir: t.TempDir(),
		StallFor: 2 * time.Second, RestartFor: 300 * time.Millisecond, BurstLen: 2})
	require.NoError(t, err)
	t.Cleanup(func() { _ = p.Close() })
	caPEM, err := os.ReadFile(p.CAFile())
	require.NoError(t, err)
	pool := x509.NewCertPool()
	require.True(t, pool.AppendCertsFromPEM(caPEM))
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
