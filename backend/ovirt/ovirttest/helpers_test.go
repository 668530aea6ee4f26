package ovirttest

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

const mib = 1 << 20

// fakeClock is a clock tests move by hand; the simulator computes every
// timed state from it, so phases change exactly when told.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// api is a tiny test-local engine client.
type api struct {
	t     *testing.T
	srv   *Server
	http  *http.Client
	token string
}

func start(t *testing.T, opts Options) (*Server, *api) {
	t.Helper()
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	srv, err := Start(opts)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, srv.Close()) })
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: srv.CAPool()}}
	t.Cleanup(tr.CloseIdleConnections)
	return srv, &api{t: t, srv: srv, http: &http.Client{Transport: tr, Timeout: 60 * time.Second}}
}

// sso posts a password grant and returns the status and decoded body.
func (a *api) sso(user, pass, accept string) (int, map[string]any) {
	a.t.Helper()
	form := url.Values{"grant_type": {"password"}, "scope": {"ovirt-app-api"}, "username": {user}, "password": {pass}}
	req, err := http.NewRequest("POST", a.srv.URL()+ssoPath, strings.NewReader(form.Encode()))
	require.NoError(a.t, err)
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", accept)
	resp, err := a.http.Do(req)
	require.NoError(a.t, err)
	defer resp.Body.Close()
	var m map[string]any
	require.NoError(a.t, json.NewDecoder(resp.Body).Decode(&m))
	return resp.StatusCode, m
}

func (a *api) login() {
	a.t.Helper()
	code, m := a.sso(DefaultUser, DefaultPassword, "application/json")
	require.Equal(a.t, 200, code, m)
	a.token = m["access_token"].(string)
}

// do calls the API (path under /ovirt-engine/api) and returns the status
// and raw body.
func (a *api) do(method, path string, body any) (int, []byte) {
	a.t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		require.NoError(a.t, err)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, a.srv.URL()+apiPrefix+path, rd)
	require.NoError(a.t, err)
	req.Header.Set("Accept", "application/json")
	req.Header.Set("Version", "4")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if a.token != "" {
		req.Header.Set("Authorization", "Bearer "+a.token)
	}
	resp, err := a.http.Do(req)
	require.NoError(a.t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(a.t, err)
	return resp.StatusCode, b
}

// get calls the API and decodes a JSON object, requiring want.
func (a *api) call(method, path string, body any, want int) map[string]any {
	a.t.Helper()
	code, b := a.do(method, path, body)
	require.Equal(a.t, want, code, "%s %s: %s", method, path, b)
	var m map[string]any
	if len(b) > 0 {
		require.NoError(a.t, json.Unmarshal(b, &m), string(b))
	}
	return m
}

func list(m map[string]any, key string) []map[string]any {
	var out []map[string]any
	l, _ := m[key].([]any)
	for _, e := range l {
		out = append(out, e.(map[string]any))
	}
	return out
}

// imageio is a client of the daemon/proxy.
func (a *api) imageio(method, u string, hdr map[string]string) (*http.Response, []byte) {
	a.t.Helper()
	req, err := http.NewRequest(method, u, nil)
	require.NoError(a.t, err)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := a.http.Do(req)
	require.NoError(a.t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(a.t, err)
	return resp, b
}

// startTransfer creates a transfer and waits (moving clk when given)
// until it is transferring; it returns the transfer id and its record.
func (a *api) startTransfer(body map[string]any, clk *fakeClock) (string, map[string]any) {
	a.t.Helper()
	tr := a.call("POST", "/imagetransfers", body, 201)
	id := tr["id"].(string)
	require.Equal(a.t, "initializing", tr["phase"])
	deadline := time.Now().Add(10 * time.Second)
	for {
		if clk != nil {
			clk.Advance(50 * time.Millisecond)
		}
		tr = a.call("GET", "/imagetransfers/"+id, nil, 200)
		if tr["phase"] == "transferring" {
			return id, tr
		}
		require.True(a.t, time.Now().Before(deadline), "transfer never started: %v", tr)
		time.Sleep(5 * time.Millisecond)
	}
}

// waitPhase polls until the transfer reaches phase.
func (a *api) waitPhase(id, phase string, clk *fakeClock) map[string]any {
	a.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if clk != nil {
			clk.Advance(50 * time.Millisecond)
		}
		tr := a.call("GET", "/imagetransfers/"+id, nil, 200)
		if tr["phase"] == phase {
			return tr
		}
		require.True(a.t, time.Now().Before(deadline), "phase %s never came: %v", phase, tr)
		time.Sleep(5 * time.Millisecond)
	}
}

// snapshotDisks maps disk id → image_id of a snapshot.
func (a *api) snapshotDisks(vm, snap string) map[string]string {
	a.t.Helper()
	out := map[string]string{}
	for _, d := range list(a.call("GET", "/vms/"+vm+"/snapshots/"+snap+"/disks", nil, 200), "disk") {
		out[d["id"].(string)] = d["image_id"].(string)
	}
	return out
}
