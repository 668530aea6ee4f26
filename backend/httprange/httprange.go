// Package httprange is the HTTP transport of every HTTP platform and the one
// place where HTTP reads are made safe: every answer to a Range request is
// checked against what was asked, redirects never carry credentials to
// another origin, and faults are retried through package retry, so callers
// never see wrong bytes.
package httprange

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/meter"
	"github.com/vmexportfs/vmexportfs/backend/redact"
	"github.com/vmexportfs/vmexportfs/backend/retry"
)

// Policy bounds the retries of one operation.
type Policy = retry.Policy

// Authorizer adds credentials to a request, and renews them after a 401.
type Authorizer interface {
	Authorize(ctx context.Context, req *http.Request) error
	Renew(ctx context.Context) error
}

// staleRenewer is an Authorizer that can be told the Authorization header a
// refused request carried, so it renews only credentials still in use.
type staleRenewer interface {
	RenewStale(ctx context.Context, used string) error
}

// usedAuthKey carries, through one retried operation's context, where send
// notes the Authorization header of the latest attempt.
type usedAuthKey struct{}

// Client makes checked, retried HTTP requests.
type Client struct {
	HTTP   *http.Client
	Auth   Authorizer // nil: no auth
	Policy Policy
	Logger *slog.Logger
	// Secrets masks what a server echoes back in the error text we keep.
	Secrets *redact.Secrets
	// TrustRedirect says whether a redirect from one origin to another may
	// be followed (with the request's credentials: the header, the query, a
	// login body). nil follows same-origin redirects only. https to http is
	// refused whatever it says.
	TrustRedirect func(from, to *url.URL) bool
	// TrustAdvice says, in the error of a certificate signed by an unknown
	// authority, where the trusted CA comes from; "" is the common
	// --ca-file (retry.DefaultAdvice).
	TrustAdvice string

	// accepted records that the server has taken our credentials at least
	// once: 401s that outlast the retries after that are an outage (EIO),
	// before it a refusal (EACCES).
	accepted atomic.Bool
}

// CredentialsAccepted tells the client that its credentials are known good
// (a login with them succeeded), as a successful request would.
func (c *Client) CredentialsAccepted() { c.accepted.Store(true) }

// errorBodyRead bounds how much of a server's error answer is read; what goes
// into an error is cut further by redact.Peer.
const errorBodyRead = 4 << 10

// ErrRedirectRefused marks a redirect that would have sent credentials where
// they must not go.
var ErrRedirectRefused = errors.New("redirect refused")

// An attempt's failure is a retry.Fault: these are its kinds, in HTTP terms.
const (
	retryable    = retry.Again // transient: back off and try again
	unauthorized = retry.Renew // 401: renew credentials once, then retry
	final        = retry.Stop  // no point retrying
)

type attemptError = retry.Fault

func fault(kind retry.Kind, format string, args ...any) *attemptError {
	return retry.Faultf(kind, format, args...)
}

func (c *Client) logger() *slog.Logger {
	if c.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return c.Logger
}

func (c *Client) httpClient() *http.Client {
	if c.HTTP == nil {
		return http.DefaultClient
	}
	return c.HTTP
}

// retry runs attempt through the one retry runner. A 401 renews the
// credentials once for free; one that outlasts the retries after the server
// has taken our credentials is an outage (EIO), before that a refusal.
func (c *Client) retry(ctx context.Context, opName func() string, attempt func(ctx context.Context) *attemptError) error {
	r := retry.Runner{Policy: c.Policy, Logger: c.logger()}
	if c.Auth != nil {
		r.Renew = c.Auth.Renew
		if sr, ok := c.Auth.(staleRenewer); ok {
			// The attempts run one after another: send notes the
			// credentials each carried, the renewal after a 401 reads them.
			used := new(string)
			ctx = context.WithValue(ctx, usedAuthKey{}, used)
			r.Renew = func(ctx context.Context) error { return sr.RenewStale(ctx, *used) }
		}
	}
	last, err := r.Do(ctx, opName, attempt)
	if err == nil || !errors.Is(err, retry.ErrExhausted) {
		return err
	}
	attempts := c.Policy.WithDefaults().Attempts
	if last.Kind == unauthorized && c.accepted.Load() {
		return fmt.Errorf("%s: %w after %d attempts: credentials that worked before refused (401 storm): %v", opName(), backend.ErrUnavailable, attempts, last)
	}
	if last.Kind == unauthorized {
		// Never taken: a refusal, whose reason is the server's, not an outage.
		return fmt.Errorf("%s: credentials refused (%d attempts): %w", opName(), attempts, last)
	}
	return fmt.Errorf("%s: %w after %d attempts: %w", opName(), backend.ErrUnavailable, attempts, last)
}

// send makes one request, with credentials. Transport errors are retryable
// only when resending cannot repeat a side effect.
func (c *Client) send(ctx context.Context, req *http.Request) (*http.Response, *attemptError) {
	if c.Auth != nil {
		if err := c.Auth.Authorize(ctx, req); err != nil {
			return nil, &attemptError{Kind: final, Err: fmt.Errorf("authorize: %w", err)}
		}
		if used, ok := ctx.Value(usedAuthKey{}).(*string); ok {
			*used = req.Header.Get("Authorization")
		}
	}
	hc := *c.httpClient()
	hc.CheckRedirect = c.checkRedirect
	resp, err := hc.Do(req)
	if err != nil {
		if ce := retry.Certificate(err, c.TrustAdvice); ce != nil {
			return nil, &attemptError{Kind: final, Err: ce}
		}
		if errors.Is(err, ErrRedirectRefused) {
			// url.Error would quote the Location, query and all.
			var ue *url.Error
			if errors.As(err, &ue) {
				err = ue.Err
			}
			c.logger().Warn("httprange: redirect refused", "op", req.Method+" "+redactURL(req.URL), "reason", err.Error())
			return nil, &attemptError{Kind: final, Err: fmt.Errorf("%w: %w", backend.ErrUnavailable, err)}
		}
		kind := final
		if idempotent(req) {
			kind = retryable
		}
		return nil, &attemptError{Kind: kind, Err: fmt.Errorf("%w: %w", backend.ErrUnavailable, err)}
	}
	if c.Auth != nil && resp.StatusCode != http.StatusUnauthorized && resp.StatusCode != http.StatusForbidden {
		c.accepted.Store(true)
	}
	return resp, nil
}

// maxRedirects is net/http's own limit.
const maxRedirects = 10

// checkRedirect keeps credentials with the origin they were meant for. The
// transport would copy every header (tokens in custom headers included) to
// any host, and Authorization to any port of the same host, and resend a
// login body on 307: a hostile or hijacked server could collect them all, in
// cleartext if it redirects to http.
func (c *Client) checkRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= maxRedirects {
		return fmt.Errorf("%w: more than %d redirects", ErrRedirectRefused, maxRedirects)
	}
	from, prev, to := via[0].URL, via[len(via)-1].URL, req.URL
	if (from.Scheme == "https" || prev.Scheme == "https") && to.Scheme != "https" {
		return fmt.Errorf("%w: from %s to %s: https to %s", ErrRedirectRefused, origin(prev), origin(to), to.Scheme)
	}
	if origin(from) == origin(to) {
		return nil
	}
	if c.TrustRedirect != nil && c.TrustRedirect(from, to) {
		return nil
	}
	return fmt.Errorf("%w: from %s to another origin, %s", ErrRedirectRefused, origin(from), origin(to))
}

// origin is scheme://host:port with the default port made explicit, the unit
// a credential belongs to.
func origin(u *url.URL) string {
	port := u.Port()
	if port == "" {
		switch strings.ToLower(u.Scheme) {
		case "https":
			port = "443"
		case "http":
			port = "80"
		}
	}
	return strings.ToLower(u.Scheme) + "://" + net.JoinHostPort(strings.ToLower(u.Hostname()), port)
}

// idempotent follows net/http's rule: safe methods, plus any request carrying
// an Idempotency-Key header (the caller vouches that resending is harmless).
func idempotent(req *http.Request) bool {
	switch req.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return req.Header.Get("Idempotency-Key") != "" || req.Header.Get("X-Idempotency-Key") != ""
}

// statusError turns a non-2xx answer into an error wrapping the matching
// backend sentinel, with a bounded, printable, secret-free excerpt of the
// server's body.
func (c *Client) statusError(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, errorBodyRead))
	var sentinel error
	switch resp.StatusCode {
	case http.StatusNotFound:
		sentinel = backend.ErrNotFound
	case http.StatusUnauthorized, http.StatusForbidden:
		sentinel = backend.ErrPermission
	case http.StatusBadRequest, http.StatusRequestedRangeNotSatisfiable:
		sentinel = backend.ErrInvalid
	case http.StatusConflict:
		sentinel = backend.ErrExists
	default:
		sentinel = backend.ErrUnavailable
	}
	return &StatusError{Code: resp.StatusCode, Kind: sentinel, Text: c.Secrets.Peer(b), Message: c.Secrets.Peer([]byte(serverMessage(b)))}
}

// StatusError is a non-2xx answer: its status code, the backend sentinel it
// maps to, and the server's text made safe. Callers that must tell one
// status from another (a 503 that means "not ready yet") use errors.As.
type StatusError struct {
	Code int
	Kind error  // a backend sentinel
	Text string // the server's answer, cut, stripped and with secrets masked
	// Message is what a JSON answer says went wrong, in words ("Not
	// Authorized: failed to login: ..."), made safe as Text; "" when the
	// answer is not one, and Text is shown.
	Message string
}

// Error shows the server's words as they are, not quoted: they were made
// printable and cut, and a JSON body quoted again is unreadable.
func (e *StatusError) Error() string {
	msg := cmp.Or(e.Message, e.Text)
	if msg == "" {
		return fmt.Sprintf("%v: status %d", e.Kind, e.Code)
	}
	return fmt.Sprintf("%v: status %d: %s", e.Kind, e.Code, msg)
}

func (e *StatusError) Unwrap() error { return e.Kind }

// FaultKind classifies the answer for the meter.
func (e *StatusError) FaultKind() string {
	if e.Code == http.StatusUnauthorized || e.Code == http.StatusForbidden {
		return meter.FaultAuth
	}
	return meter.FaultStatus
}

func classify(status int, idem bool) retry.Kind {
	switch {
	case status == http.StatusUnauthorized:
		return unauthorized
	case idem && (status >= 500 || status == http.StatusTooManyRequests):
		return retryable
	}
	return final
}

// cancelBody ends the attempt's deadline when the caller closes the body.
type cancelBody struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (b cancelBody) Close() error {
	err := b.ReadCloser.Close()
	b.cancel()
	return err
}

// Do sends a request built by newReq (called once per attempt), retrying network errors and
// 5xx for idempotent methods (and 401 once after Renew). The caller closes the body. Non-2xx
// final answers become errors wrapping backend sentinels (404 ErrNotFound, 401/403
// ErrPermission, 400 ErrInvalid, 409 ErrExists, else ErrUnavailable), with the server's error
// body (truncated, 512 bytes) in the message. The attempt deadline covers reading the body.
func (c *Client) Do(ctx context.Context, newReq func(ctx context.Context) (*http.Request, error)) (*http.Response, error) {
	pol := c.Policy.WithDefaults()
	var out *http.Response
	op := "http request"
	err := c.retry(ctx, func() string { return op }, func(rctx context.Context) *attemptError {
		// The attempt context must outlive this function: the caller reads
		// the body after Do returns, so its cancel travels with the body.
		// It keeps where send notes the credentials used.
		actx, cancel := context.WithTimeout(ctx, pol.AttemptTimeout)
		if used := rctx.Value(usedAuthKey{}); used != nil {
			actx = context.WithValue(actx, usedAuthKey{}, used)
		}
		req, err := newReq(actx)
		if err != nil {
			cancel()
			return &attemptError{Kind: final, Err: fmt.Errorf("build request: %w", err)}
		}
		op = req.Method + " " + redactURL(req.URL)
		resp, aerr := c.send(actx, req)
		if aerr != nil {
			cancel()
			return aerr
		}
		if resp.StatusCode < 200 || resp.StatusCode > 299 {
			err := c.statusError(resp)
			resp.Body.Close()
			cancel()
			return &attemptError{Kind: classify(resp.StatusCode, idempotent(req)), Err: err}
		}
		resp.Body = cancelBody{resp.Body, cancel}
		out = resp
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// Size is the Content-Length of HEAD url.
func (c *Client) Size(ctx context.Context, rawURL string) (int64, error) {
	resp, err := c.Do(ctx, func(ctx context.Context) (*http.Request, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodHead, rawURL, nil)
		if err == nil {
			req.Header.Set("Accept-Encoding", "identity")
		}
		return req, err
	})
	if err != nil {
		return 0, fmt.Errorf("size: %w", err)
	}
	resp.Body.Close()
	if ce := resp.Header.Get("Content-Encoding"); !identityEncoding(ce) {
		return 0, fmt.Errorf("size of %s: %w: Content-Encoding %q: the length is not the disk's", redactString(rawURL), backend.ErrUnavailable, c.Secrets.Peer([]byte(ce)))
	}
	if resp.ContentLength < 0 {
		return 0, fmt.Errorf("size of %s: %w: no Content-Length", redactString(rawURL), backend.ErrUnavailable)
	}
	return resp.ContentLength, nil
}

// ReadRange fills p with bytes [off, off+len(p)) of url, a resource of size
// bytes, or returns an error. p's contents are unspecified after an error.
func (c *Client) ReadRange(ctx context.Context, rawURL string, size int64, p []byte, off int64) error {
	return c.ReadRangeVec(ctx, rawURL, size, [][]byte{p}, off)
}

// ReadRangeVec is ReadRange into bufs laid end to end from off: one request
// fills several cache blocks.
func (c *Client) ReadRangeVec(ctx context.Context, rawURL string, size int64, bufs [][]byte, off int64) error {
	n := backend.VecLen(bufs)
	if off < 0 || size < 0 || off > size || n > size-off {
		return fmt.Errorf("read range: %w: offset %d length %d of a %d-byte resource", backend.ErrInvalid, off, n, size)
	}
	if n == 0 {
		return nil
	}
	op := fmt.Sprintf("read %s bytes %d-%d", redactString(rawURL), off, off+n-1)
	return c.retry(ctx, func() string { return op }, func(actx context.Context) *attemptError {
		req, err := http.NewRequestWithContext(actx, http.MethodGet, rawURL, nil)
		if err != nil {
			return &attemptError{Kind: final, Err: fmt.Errorf("%w: build request: %w", backend.ErrInvalid, err)}
		}
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
		// A transparently decompressed body would not match the range.
		req.Header.Set("Accept-Encoding", "identity")
		resp, aerr := c.send(actx, req)
		if aerr != nil {
			return aerr
		}
		defer resp.Body.Close()
		return c.checkRange(resp, size, bufs, off)
	})
}

// checkRange reads a Range answer into bufs, detecting every way it can
// differ from what was asked: nothing unchecked reaches the caller (and so
// the cache). Every failure is a fault to retry: the range is inside the
// resource, so no answer but the right bytes is legitimate.
func (c *Client) checkRange(resp *http.Response, size int64, bufs [][]byte, off int64) *attemptError {
	n := backend.VecLen(bufs)
	switch resp.StatusCode {
	case http.StatusPartialContent:
	case http.StatusOK:
		return fault(retryable, "server ignored Range: status 200")
	case http.StatusRequestedRangeNotSatisfiable:
		// Not ErrInvalid: our range is valid, the answer is the fault.
		return &attemptError{Kind: retryable, Err: fmt.Errorf("range %d-%d inside the %d-byte disk refused: %v", off, off+n-1, size, c.statusError(resp))}
	default:
		return &attemptError{Kind: classify(resp.StatusCode, true), Err: c.statusError(resp)}
	}
	if f := c.checkPlainBody(resp, "a Range answer", "a single-range request"); f != nil {
		return f
	}
	cr := resp.Header.Get("Content-Range")
	first, last, total, err := ParseContentRange(cr)
	if err != nil {
		return fault(retryable, "bad Content-Range %q: %w", c.Secrets.Peer([]byte(cr)), err)
	}
	if total != size {
		return fault(retryable, "Content-Range total mismatch: %s, disk size %d", totalText(total), size)
	}
	if first != off || last != off+n-1 {
		return fault(retryable, "Content-Range mismatch: got %d-%d, asked %d-%d", first, last, off, off+n-1)
	}
	return readExactly(resp, bufs...)
}

// checkPlainBody refuses a body that is not the bytes themselves: one the
// server encoded (Go's transport leaves it alone because we asked for
// identity) or framed as multipart. answer and request name the exchange in
// the fault.
func (c *Client) checkPlainBody(resp *http.Response, answer, request string) *attemptError {
	if ce := resp.Header.Get("Content-Encoding"); !identityEncoding(ce) || resp.Uncompressed {
		return fault(retryable, "Content-Encoding %q on %s", c.Secrets.Peer([]byte(ce)), answer)
	}
	if ct := resp.Header.Get("Content-Type"); isMultipart(ct) {
		return fault(retryable, "multipart answer (Content-Type %q) to %s", c.Secrets.Peer([]byte(ct)), request)
	}
	return nil
}

// readExactly fills bufs, end to end, from the body, which must hold
// exactly their total length.
func readExactly(resp *http.Response, bufs ...[]byte) *attemptError {
	n := backend.VecLen(bufs)
	if resp.ContentLength >= 0 && resp.ContentLength != n {
		return fault(retryable, "Content-Length mismatch: got %d, asked %d", resp.ContentLength, n)
	}
	var got int64
	for _, p := range bufs {
		m, err := io.ReadFull(resp.Body, p)
		got += int64(m)
		if err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
				return fault(retryable, "short body: got %d of %d bytes", got, n)
			}
			return fault(retryable, "read body after %d of %d bytes: %w", got, n, err)
		}
	}
	var extra [1]byte
	if m, _ := io.ReadFull(resp.Body, extra[:]); m > 0 {
		return fault(retryable, "long body: more than %d bytes", n)
	}
	return nil
}

// identityEncoding reports whether a Content-Encoding leaves the body as is.
func identityEncoding(ce string) bool {
	for _, coding := range strings.Split(ce, ",") {
		if c := strings.TrimSpace(coding); c != "" && !strings.EqualFold(c, "identity") {
			return false
		}
	}
	return true
}

// isMultipart reports a multipart/* media type: a multipart/byteranges body
// carries framing between the bytes asked for.
func isMultipart(ct string) bool {
	return strings.HasPrefix(strings.ToLower(strings.TrimSpace(ct)), "multipart/")
}

func totalText(total int64) string {
	if total < 0 {
		return "total unknown (*)"
	}
	return strconv.FormatInt(total, 10)
}

// ParseContentRange parses "bytes first-last/total" (total may be "*",
// returned as -1). It rejects anything else, including first > last.
func ParseContentRange(s string) (first, last, total int64, err error) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(s), "bytes ")
	if !ok {
		return 0, 0, 0, errors.New("not a bytes range")
	}
	rng, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, 0, errors.New("missing total")
	}
	a, b, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, 0, errors.New("missing '-'")
	}
	if first, err = parseNonNeg(a); err != nil {
		return 0, 0, 0, fmt.Errorf("first byte: %w", err)
	}
	if last, err = parseNonNeg(b); err != nil {
		return 0, 0, 0, fmt.Errorf("last byte: %w", err)
	}
	if first > last {
		return 0, 0, 0, fmt.Errorf("first byte %d after last %d", first, last)
	}
	total = -1
	if tot != "*" {
		if total, err = parseNonNeg(tot); err != nil {
			return 0, 0, 0, fmt.Errorf("total: %w", err)
		}
		if last >= total {
			return 0, 0, 0, fmt.Errorf("last byte %d not below total %d", last, total)
		}
	}
	return first, last, total, nil
}

func parseNonNeg(s string) (int64, error) {
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("not a decimal number: %q", s)
	}
	return strconv.ParseInt(s, 10, 64)
}

// redact drops userinfo and query from a URL before it goes into a message,
// since either may carry a credential.
func redactURL(u *url.URL) string {
	if u == nil {
		return ""
	}
	v := *u
	v.User = nil
	if v.RawQuery != "" {
		v.RawQuery = "…"
	}
	v.Fragment = ""
	return v.String()
}

func redactString(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "(unparseable URL)"
	}
	return redactURL(u)
}
