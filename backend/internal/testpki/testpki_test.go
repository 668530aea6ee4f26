package testpki

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestIssueVerifies(t *testing.T) {
	ca, err := NewCA("testpki CA")
	require.NoError(t, err)
	other, err := NewCA("other CA")
	require.NoError(t, err)
	fromPEM := x509.NewCertPool()
	require.True(t, fromPEM.AppendCertsFromPEM(ca.PEM()))

	const unknownCA, wrongName = "unknown", "name"
	tests := []struct {
		name       string
		leaf       Leaf
		roots      *x509.CertPool
		serverName string // "" verifies the dialled IP, 127.0.0.1
		wantErr    string
	}{
		{"loopback, IP", Loopback(), ca.Pool(), "", ""},
		{"loopback, localhost", Loopback(), ca.Pool(), "localhost", ""},
		{"CA from PEM", Loopback(), fromPEM, "", ""},
		{"DNS SAN", Leaf{DNSNames: []string{"virt-export.example"}}, ca.Pool(), "virt-export.example", ""},
		{"DNS SAN only, IP dialled", Leaf{DNSNames: []string{"virt-export.example"}}, ca.Pool(), "", wrongName},
		{"IP SAN only, name asked", Leaf{IPs: []net.IP{net.IPv4(127, 0, 0, 1)}}, ca.Pool(), "localhost", wrongName},
		{"other CA's pool", Loopback(), other.Pool(), "", unknownCA},
		{"system roots", Loopback(), nil, "", unknownCA},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cert, err := ca.Issue(tc.leaf)
			require.NoError(t, err)
			require.Len(t, cert.Certificate, 2, "chain carries the CA")
			srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
			srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
			srv.StartTLS()
			defer srv.Close()

			tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: tc.roots, ServerName: tc.serverName}}
			defer tr.CloseIdleConnections()
			resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get(srv.URL)
			switch tc.wantErr {
			case "":
				require.NoError(t, err)
				resp.Body.Close()
				assert.Equal(t, http.StatusOK, resp.StatusCode)
			case unknownCA:
				var uerr x509.UnknownAuthorityError
				require.True(t, errors.As(err, &uerr), "got %v", err)
			case wrongName:
				var herr x509.HostnameError
				require.True(t, errors.As(err, &herr), "got %v", err)
			}
		})
	}
}
