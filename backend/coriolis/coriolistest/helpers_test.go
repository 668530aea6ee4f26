package coriolistest

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

type harness struct {
	t      *testing.T
	srv    *Server
	client *http.Client
	token  string
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	srv, err := Start(Options{Dir: t.TempDir()})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, srv.Close()) })
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: srv.CAPool()}, MaxIdleConnsPerHost: 32}
	t.Cleanup(tr.CloseIdleConnections)
	h := &harness{t: t, srv: srv, client: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
	h.token = h.login("admin", "secret")
	return h
}

type reply struct {
	status int
	header http.Header
	body   []byte
}

func (h *harness) do(method, path, token string, body io.Reader, hdr map[string]string) reply {
	h.t.Helper()
	r, err := h.tryDo(method, path, token, body, hdr)
	require.NoError(h.t, err)
	return r
}

// tryDo is do without assertions, safe to call from other goroutines.
func (h *harness) tryDo(method, path, token string, body io.Reader, hdr map[string]string) (reply, error) {
	req, err := http.NewRequest(method, h.srv.URL()+path, body)
	if err != nil {
		return reply{}, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return reply{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return reply{}, err
	}
	return reply{status: resp.StatusCode, header: resp.Header, body: b}, nil
}

func (h *harness) get(path string) reply { return h.do(http.MethodGet, path, h.token, nil, nil) }

func (h *harness) login(user, pass string) string {
	h.t.Helper()
	body, err := json.Marshal(loginRequest{Username: user, Password: pass})
	require.NoError(h.t, err)
	r := h.do(http.MethodPost, "/api/v1/auth/login", "", bytes.NewReader(body), nil)
	require.Equal(h.t, http.StatusOK, r.status, string(r.body))
	var lr loginResponse
	require.NoError(h.t, json.Unmarshal(r.body, &lr))
	require.NotEmpty(h.t, lr.Token)
	return lr.Token
}

func (h *harness) snapshot(vmID, snapID, query string) apiSnapshot {
	h.t.Helper()
	p := "/api/v1/vms/" + vmID + "/snapshots/" + snapID
	if query != "" {
		p += "?" + query
	}
	r := h.get(p)
	require.Equal(h.t, http.StatusOK, r.status, string(r.body))
	var s apiSnapshot
	require.NoError(h.t, json.Unmarshal(r.body, &s))
	return s
}

func decodeAPIError(t *testing.T, body []byte) apiError {
	t.Helper()
	var e apiError
	require.NoError(t, json.Unmarshal(body, &e), string(body))
	return e
}

// pattern returns n deterministic, non-zero-heavy bytes distinct per seed.
func pattern(seed byte, n int) []byte {
	b := make([]byte, n)
	x := uint32(seed)*2654435761 + 1
	for i := range b {
		x = x*1664525 + 1013904223
		b[i] = byte(x>>24) | 1
	}
	return b
}

func diskPath(vmID, snapID, disk string) string {
	return "/api/v1/vms/" + vmID + "/snapshots/" + snapID + "/disks/" + disk
}

func withSlash(p string, slash bool) string {
	if slash && !strings.HasSuffix(p, "/") {
		return p + "/"
	}
	return p
}
