package kubevirt

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
	"github.com/vmexportfs/vmexportfs/backend/redact"
)

const tokenHeader = "x-kubevirt-export-token"

// exportConn is the client side of one export server: its token and a TLS
// client trusting the status cert, both re-read when the server rejects them.
type exportConn struct {
	name     string
	internal bool
	status   func(ctx context.Context) (ExportStatus, error) // re-reads the status
	token    func(ctx context.Context) (string, error)       // re-reads the token
	logger   *slog.Logger
	policy   httprange.Policy
	secrets  *redact.Secrets
	// connectWait bounds the wait for a backup map's 503 (virt-launcher
	// not connected) to end; 0 = DefaultBackupConnectTimeout.
	connectWait time.Duration
	serverName  string // TLS name to verify instead of the URL's host
	// rootFallback: the raw URL was built from the export URL; at the
	// export pod itself (port-forward) only root paths exist.
	rootFallback bool
	// trustAdvice says where the export's CA comes from, for the error of
	// a certificate it does not sign.
	trustAdvice string

	mu       sync.Mutex
	tok      string
	cert     string
	tr       *httprange.Transport
	rotating sync.Mutex // one status re-read per failure burst

	httpOnce sync.Once
	http     *httprange.Client
}

func newExportConn(ctx context.Context, c *exportConn, st ExportStatus) error {
	link, err := st.link(c.internal)
	if err != nil {
		return fmt.Errorf("export %s: %w", c.name, err)
	}
	if err := c.setCert(link.Cert); err != nil {
		return fmt.Errorf("export %s: %w", c.name, err)
	}
	return c.Renew(ctx)
}

func (c *exportConn) setCert(pemCert string) error {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(pemCert)) {
		return fmt.Errorf("status cert: %w: no PEM certificate", backend.ErrInvalid)
	}
	tr := httprange.NewTransport(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12, ServerName: c.serverName}, c.policy.Meter)
	c.mu.Lock()
	old := c.tr
	c.tr, c.cert = tr, pemCert
	c.mu.Unlock()
	if old != nil {
		old.CloseIdleConnections()
	}
	return nil
}

// Authorize implements httprange.Authorizer.
func (c *exportConn) Authorize(_ context.Context, req *http.Request) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	req.Header.Set(tokenHeader, c.tok)
	return nil
}

// Renew re-reads the token (the secret may have been rotated).
func (c *exportConn) Renew(ctx context.Context) error {
	tok, err := c.token(ctx)
	if err != nil {
		return fmt.Errorf("export %s: read token: %w", c.name, err)
	}
	c.secrets.AddRenewed(tok)
	c.mu.Lock()
	c.tok = tok
	c.mu.Unlock()
	return nil
}

// RoundTrip sends through the current TLS transport; a certificate that no
// longer verifies makes it re-read the status cert once and resend.
func (c *exportConn) RoundTrip(req *http.Request) (*http.Response, error) {
	c.mu.Lock()
	tr, cert := c.tr, c.cert
	c.mu.Unlock()
	resp, err := tr.RoundTrip(req)
	if err == nil || !isCertError(err) || req.Body != nil && req.Body != http.NoBody {
		return resp, err
	}
	c.rotating.Lock()
	defer c.rotating.Unlock()
	c.mu.Lock()
	changed := c.cert != cert
	c.mu.Unlock()
	if !changed { // nobody refreshed during this burst yet
		st, serr := c.status(req.Context())
		if serr != nil {
			return nil, fmt.Errorf("%w (re-reading export status: %w)", err, serr)
		}
		link, lerr := st.link(c.internal)
		if lerr != nil {
			return nil, fmt.Errorf("%w (re-reading export status: %w)", err, lerr)
		}
		if link.Cert == cert {
			return nil, err
		}
		if serr := c.setCert(link.Cert); serr != nil {
			return nil, fmt.Errorf("%w (new status cert: %w)", err, serr)
		}
		c.logger.Info("kubevirt: export certificate rotated, using the new status cert", "export", c.name)
	}
	c.mu.Lock()
	tr = c.tr
	c.mu.Unlock()
	return tr.RoundTrip(req)
}

func isCertError(err error) bool {
	var verr *tls.CertificateVerificationError
	var uerr x509.UnknownAuthorityError
	var herr x509.HostnameError
	return errors.As(err, &verr) || errors.As(err, &uerr) || errors.As(err, &herr)
}

// client is one for the connection's life, so that it remembers whether the
// server ever accepted the token (a 401 storm after that is an outage).
func (c *exportConn) client() *httprange.Client {
	c.httpOnce.Do(func() {
		c.http = &httprange.Client{HTTP: &http.Client{Transport: c}, Auth: c, Policy: c.policy, Logger: c.logger, Secrets: c.secrets,
			TrustAdvice: cmp.Or(c.trustAdvice, "the export status's cert does not sign the export server's (is a proxy in front of it?)")}
	})
	return c.http
}

// closeIdle drops the connection's kept-alive sockets.
func (c *exportConn) closeIdle() {
	c.mu.Lock()
	tr := c.tr
	c.mu.Unlock()
	if tr != nil {
		tr.CloseIdleConnections()
	}
}

// openExportDisk opens one volume of an export; with owned, closing the disk
// closes the connection's sockets too (it is the disk's alone).
func openExportDisk(ctx context.Context, conn *exportConn, st ExportStatus, vol string, owned bool) (backend.Disk, error) {
	link, err := st.link(conn.internal)
	if err != nil {
		return nil, fmt.Errorf("open disk %s/%s: %w", conn.name, vol, err)
	}
	raw := link.rawURL(vol)
	if raw == "" {
		// A VirtualMachineBackup export: backups[{map, data}], no volumes.
		if mapURL, dataURL := link.backupURL(vol, "map"), link.backupURL(vol, "data"); mapURL != "" && dataURL != "" {
			return openBackupDisk(ctx, conn, vol, mapURL, dataURL, owned)
		}
		return nil, fmt.Errorf("open disk %s/%s: %w: no raw link", conn.name, vol, backend.ErrNotFound)
	}
	size, err := conn.client().Size(ctx, raw)
	if errors.Is(err, backend.ErrNotFound) && conn.rootFallback {
		// <export-url>/volumes/<vol>/disk.img works through the proxy; the
		// pod itself serves root paths only.
		if alt := rootURL(raw, vol); alt != "" && alt != raw {
			if asize, aerr := conn.client().Size(ctx, alt); aerr == nil {
				conn.logger.Info("kubevirt: export server serves root paths (the export pod itself)", "export", conn.name, "volume", vol)
				raw, size, err = alt, asize, nil
			}
		}
	}
	if err != nil {
		return nil, conn.explain(fmt.Errorf("open disk %s/%s: %w", conn.name, vol, err))
	}
	alloc := extent.Full(size)
	if mapURL := link.mapURL(vol); mapURL != "" {
		bm, err := conn.readBackupMap(ctx, mapURL, vol, size)
		m := bm.alloc
		switch {
		case errors.Is(err, backend.ErrInvalid):
			// A hostile map must not hide data: read everything instead.
			conn.logger.Warn("kubevirt: backup map rejected, treating the disk as fully allocated", "export", conn.name, "err", err)
		case err != nil:
			return nil, conn.explain(fmt.Errorf("open disk %s/%s: %w", conn.name, vol, err))
		default:
			alloc = m
		}
	}
	opts := httprange.DiskOptions{Name: "kubevirt: export " + conn.name, Explain: conn.explain, MultipleRanges: true}
	if owned {
		opts.OnClose = conn.closeIdle
	}
	return conn.client().Disk(raw, size, alloc, opts), nil
}

// explain logs a rejected token by export name (never the token itself).
func (c *exportConn) explain(err error) error {
	if errors.Is(err, backend.ErrPermission) {
		c.logger.Warn("kubevirt: export server rejected the token", "export", c.name)
	}
	return err
}

const (
	mapPageSize = 512
	maxMapPages = 1 << 16
	maxMapBody  = 8 << 20
)
