package coriolistest

import (
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/internal/testpki"
)

func TestTLSAndLifecycle(t *testing.T) {
	srv, err := Start(Options{Dir: t.TempDir()})
	require.NoError(t, err)
	u, err := url.Parse(srv.URL())
	require.NoError(t, err)
	assert.Equal(t, "https", u.Scheme)
	assert.Equal(t, "127.0.0.1", u.Hostname())

	pemBytes, err := os.ReadFile(srv.CAFile())
	require.NoError(t, err)
	pool := x509.NewCertPool()
	require.True(t, pool.AppendCertsFromPEM(pemBytes))

	tests := []struct {
		name    string
		roots   *x509.CertPool
		host    string
		wantErr bool
	}{
		{"CA file, IP", pool, u.Host, false},
		{"CAPool, localhost", srv.CAPool(), "localhost:" + u.Port(), false},
		{"system roots only", nil, u.Host, true},
		{"other server's CA", otherCA(t), u.Host, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: tc.roots}}
			defer tr.CloseIdleConnections()
			c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
			resp, err := c.Get("https://" + tc.host + "/api/v1/vms")
			if tc.wantErr {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			resp.Body.Close()
			assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)
		})
	}

	require.NoError(t, srv.Close())
	require.NoError(t, srv.Close(), "Close is idempotent")
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}, Timeout: 5 * time.Second}
	_, err = c.Get(srv.URL() + "/api/v1/vms")
	assert.Error(t, err, "closed server refuses connections")
}

func otherCA(t *testing.T) *x509.CertPool {
	t.Helper()
	ca, err := testpki.NewCA("other CA")
	require.NoError(t, err)
	return ca.Pool()
}

func TestStartValidation(t *testing.T) {
	_, err := Start(Options{})
	require.Error(t, err)
	_, err = Start(Options{Dir: t.TempDir(), Addr: "256.0.0.1:0"})
	require.Error(t, err)
}

func TestResponseEncoding(t *testing.T) {
	h := newHarness(t)
	require.NoError(t, h.srv.AddVM(VMSpec{ID: "vm1"}))
	r := h.do("POST", "/api/v1/auth/login", "", stringsReader(`{"username":"admin","password":"secret"}`), nil)
	assert.Equal(t, "application/json", r.header.Get("Content-Type"))
	r = h.get("/api/v1/vms/vm1")
	require.Equal(t, 200, r.status)
	assert.Equal(t, byte('\n'), r.body[len(r.body)-1], "json.Encoder output")
}
