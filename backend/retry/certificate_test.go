package retry

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
)

// TestCertificateNotRetried: an attempt that meets a certificate that does
// not verify is not tried again, even when its transport calls the fault
// transient, and the error says what x509 said and what to do.
func TestCertificateNotRetried(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.NotFoundHandler())
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the refused handshakes
	srv.StartTLS()
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "https://")
	trusting := x509.NewCertPool()
	trusting.AddCert(srv.Certificate())
	handshake := func(cfg *tls.Config) func(ctx context.Context) error {
		return func(ctx context.Context) error {
			c, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", addr)
			if err == nil {
				c.Close()
			}
			return err
		}
	}
	for _, tc := range []struct {
		name    string
		attempt func(ctx context.Context) error
		want    []string
	}{
		{"unknown authority", handshake(&tls.Config{RootCAs: x509.NewCertPool()}),
			[]string{"TLS: x509: certificate signed by unknown authority", "; " + DefaultAdvice}},
		{"name mismatch", handshake(&tls.Config{RootCAs: trusting, ServerName: "other.test"}),
			[]string{"x509: certificate is valid for", "not other.test", "reach the server by a name its certificate is valid for"}},
		// A clock far off is not something a test can set up for a TLS
		// server: the error is the one crypto/x509 returns.
		{"expired", func(context.Context) error {
			return &tls.CertificateVerificationError{Err: x509.CertificateInvalidError{Reason: x509.Expired, Detail: "current time is after the end"}}
		}, []string{"x509: certificate has expired", "this machine's clock"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := 0
			_, err := Runner{Policy: fast()}.Do(context.Background(), func() string { return "op" }, func(ctx context.Context) *Fault {
				calls++
				return &Fault{Kind: Again, Err: tc.attempt(ctx)}
			})
			assert.Equal(t, 1, calls, "the same certificate would come back")
			require.ErrorIs(t, err, backend.ErrPermission)
			assert.NotErrorIs(t, err, ErrExhausted)
			for _, want := range tc.want {
				assert.Contains(t, err.Error(), want)
			}
		})
	}
}

// TestCertificate: only verification failures are certificate errors; a
// transport's own is not, and a dial error is not.
func TestCertificate(t *testing.T) {
	assert.Nil(t, Certificate(nil, ""))
	assert.Nil(t, Certificate(errors.New("connection refused"), ""))
	assert.Nil(t, Certificate(context.DeadlineExceeded, ""))
	ce := Certificate(&tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}, "use the kubeconfig")
	require.NotNil(t, ce)
	assert.True(t, strings.HasSuffix(ce.Error(), "; use the kubeconfig"), ce.Error())
	assert.Same(t, ce, Certificate(errors.Join(errors.New("wrapped"), ce), "other"), "an explained certificate keeps its advice")
}
