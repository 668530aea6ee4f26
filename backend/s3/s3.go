// Package s3 is the S3 transport: objects in a bucket (QCOW2 images exported
// by a cloud) read by Range GETs that are checked like every other HTTP read
// of this project (package httprange), so a caller never sees wrong bytes.
//
// Requests are signed with AWS SigV4 by minio-go, path-style. Reads are
// signed and sent here rather than through minio-go's GetObject, because its
// API hides the status code, and a 200 with the whole object (versitygw's
// answer to a malformed Range) must be told apart from a 206.
package s3

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/minio/minio-go/v7/pkg/s3utils"
	"github.com/minio/minio-go/v7/pkg/signer"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
	"github.com/vmexportfs/vmexportfs/backend/redact"
	"github.com/vmexportfs/vmexportfs/backend/retry"
)

// Config says where the store is and how to sign for it.
type Config struct {
	Endpoint string // https://HOST[:PORT]
	Region   string
	// AccessKey and SecretKey come from files or the environment, never
	// argv: the command reads them.
	AccessKey, SecretKey string
	RootCAs              *x509.CertPool // nil: the system pool
	InsecureSkipVerify   bool
	Policy               retry.Policy
	Logger               *slog.Logger
	// Secrets gets both keys: the secret key because it is one, the access
	// key because servers echo it in error bodies (<AWSAccessKeyId>,
	// <Owner><ID>) and it names an account. nil: a private set is used.
	Secrets *redact.Secrets
}

// Stats counts what the client did.
type Stats struct {
	Requests  int64 // HTTP requests sent, every operation and attempt
	Reads     int64 // Range answers accepted by ReadAt
	BytesRead int64 // bytes those answers delivered
}

// Client talks to one S3 endpoint. Safe for concurrent use.
type Client struct {
	base    *url.URL // scheme and host only
	region  string
	ak, sk  string
	http    *http.Client
	minio   *minio.Client
	policy  retry.Policy
	log     *slog.Logger
	secrets *redact.Secrets

	requests, reads, bytesRead atomic.Int64
}

// emptySHA256 is the payload hash of a request without a body: signing it,
// rather than UNSIGNED-PAYLOAD, costs nothing.
const emptySHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

// unsignedPayload is the payload hash of an upload: the body is protected by
// TLS, and streaming-chunked signing (minio-go's default for PUT) is what the
// spec says S3-compatible stores handle badly.
const unsignedPayload = "UNSIGNED-PAYLOAD"

// New makes a client. It sends no request: the first failure to authenticate
// shows up on the first operation.
func New(ctx context.Context, cfg Config) (*Client, error) {
	_ = ctx // reserved: a future region lookup would use it
	u, err := url.Parse(cfg.Endpoint)
	if err != nil {
		return nil, fmt.Errorf("s3: %w: endpoint: %w", backend.ErrInvalid, err)
	}
	if u.Scheme != "https" {
		// The keys sign every request, and UNSIGNED-PAYLOAD uploads rely
		// on TLS for integrity.
		return nil, fmt.Errorf("s3: %w: endpoint %q: only https is supported", backend.ErrInvalid, u.Redacted())
	}
	if u.Host == "" || u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("s3: %w: endpoint %q: want https://HOST[:PORT] and nothing else", backend.ErrInvalid, u.Redacted())
	}
	if cfg.Region == "" {
		return nil, fmt.Errorf("s3: %w: no region", backend.ErrInvalid)
	}
	if cfg.AccessKey == "" || cfg.SecretKey == "" {
		return nil, fmt.Errorf("s3: %w: access key and secret key are both required", backend.ErrInvalid)
	}
	secrets := cfg.Secrets
	if secrets == nil {
		secrets = &redact.Secrets{}
	}
	secrets.Add(cfg.SecretKey)
	secrets.Add(cfg.AccessKey)
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}

	tr := httprange.NewTransport(&tls.Config{
		RootCAs:            cfg.RootCAs,
		InsecureSkipVerify: cfg.InsecureSkipVerify, //nolint:gosec // the user asked for it
		MinVersion:         tls.VersionTLS12,
	}, cfg.Policy.Meter)
	c := &Client{
		base:    &url.URL{Scheme: u.Scheme, Host: u.Host},
		region:  cfg.Region,
		ak:      cfg.AccessKey,
		sk:      cfg.SecretKey,
		policy:  cfg.Policy,
		log:     log,
		secrets: secrets,
	}
	counted := countingTransport{next: tr, n: &c.requests}
	c.http = &http.Client{
		Transport: counted,
		// A signed request is for one host; a redirect is an error to
		// report, never a place to send our Authorization.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	c.minio, err = minio.New(u.Host, &minio.Options{
		Creds:        credentials.NewStaticV4(cfg.AccessKey, cfg.SecretKey, ""),
		Secure:       true,
		Transport:    counted,
		Region:       cfg.Region, // set, so minio-go never asks for a bucket's location
		BucketLookup: minio.BucketLookupPath,
		// One attempt: backend/retry owns retrying, with the project's
		// budget and logging.
		MaxRetries: 1,
	})
	if err != nil {
		return nil, fmt.Errorf("s3: %w: %s", backend.ErrInvalid, secrets.String(err.Error()))
	}
	return c, nil
}

// Stats returns the counters so far.
func (c *Client) Stats() Stats {
	return Stats{Requests: c.requests.Load(), Reads: c.reads.Load(), BytesRead: c.bytesRead.Load()}
}

type countingTransport struct {
	next http.RoundTripper
	n    *atomic.Int64
}

func (t countingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	t.n.Add(1)
	return t.next.RoundTrip(req)
}

func (c *Client) runner() retry.Runner {
	return retry.Runner{Policy: c.policy, Logger: c.log}
}

// run retries attempt and turns used-up attempts into ErrUnavailable.
func (c *Client) run(ctx context.Context, op string, attempt func(ctx context.Context) *retry.Fault) error {
	_, err := c.runner().Do(ctx, func() string { return op }, attempt)
	if err != nil && errors.Is(err, retry.ErrExhausted) {
		return fmt.Errorf("%w: %w", backend.ErrUnavailable, err)
	}
	return err
}

func checkNames(bucket, key string, needKey bool) error {
	if bucket == "" || strings.Contains(bucket, "/") {
		return fmt.Errorf("%w: bucket name %q", backend.ErrInvalid, bucket)
	}
	if needKey && key == "" {
		return fmt.Errorf("%w: empty object key", backend.ErrInvalid)
	}
	return nil
}

// newRequest builds a signed path-style request. body may be nil; extra
// header is set before signing, so all of it is signed.
func (c *Client) newRequest(ctx context.Context, method, bucket, key string, query url.Values, header http.Header, body io.Reader, size int64, payloadHash string) (*http.Request, error) {
	u := *c.base
	u.Path = "/" + bucket
	if key != "" {
		u.Path += "/" + key
	}
	// What is sent must be what is signed: minio-go's signer canonicalises
	// the path with EncodePath, so send exactly that.
	u.RawPath = s3utils.EncodePath(u.Path)
	if query != nil {
		u.RawQuery = strings.ReplaceAll(query.Encode(), "+", "%20")
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), body)
	if err != nil {
		return nil, fmt.Errorf("%w: build request: %w", backend.ErrInvalid, err)
	}
	if body != nil {
		req.ContentLength = size
	}
	for k, v := range header {
		req.Header[k] = v
	}
	req.Header.Set("X-Amz-Content-Sha256", payloadHash)
	return signer.SignV4(*req, c.ak, c.sk, "", c.region), nil
}

// errorBodyRead bounds how much of an error answer is read.
const errorBodyRead = 16 << 10

// s3Error is the part of an S3 error document worth keeping. StringToSign,
// CanonicalRequest and SignatureProvided, which a SignatureDoesNotMatch
// echoes, are deliberately not decoded.
type s3Error struct {
	Code      string `xml:"Code"`
	Message   string `xml:"Message"`
	RequestID string `xml:"RequestId"`
}

// StatusError is an S3 error answer: status, S3 error code, the backend
// sentinel it maps to, and the server's message made safe.
type StatusError struct {
	Op      string
	Status  int
	Code    string // S3 error code, "" when the answer had no body (HEAD)
	Message string // the server's <Message>, masked and cut
	Kind    error  // a backend sentinel
}

func (e *StatusError) Error() string {
	// Op is not printed: the retry runner prefixes every fault with it.
	s := fmt.Sprintf("%v: status %d", e.Kind, e.Status)
	if e.Code != "" {
		s += " " + e.Code
	}
	if e.Message != "" {
		// As the server said it: Message was made printable and cut.
		s += ": " + e.Message
	}
	return s
}

func (e *StatusError) Unwrap() error { return e.Kind }

// statusError reads an error answer (bounded) and maps it.
func (c *Client) statusError(op string, resp *http.Response) *StatusError {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, errorBodyRead))
	var doc s3Error
	msg := ""
	if len(b) > 0 {
		if xml.Unmarshal(b, &doc) == nil && doc.Code != "" {
			msg = doc.Message
		} else {
			// Not S3's XML (a proxy's page): keep an excerpt.
			msg = string(b)
		}
	}
	return c.mapError(op, resp.StatusCode, doc.Code, msg)
}

func (c *Client) mapError(op string, status int, code, msg string) *StatusError {
	return &StatusError{
		Op:      op,
		Status:  status,
		Code:    c.secrets.Peer([]byte(code)),
		Message: c.secrets.Peer([]byte(msg)),
		Kind:    sentinel(status, code),
	}
}

// sentinel maps an S3 answer to a backend error. The code decides before
// the status: versitygw answers an unknown access key with 404
// XAdminUserNotFound, which must be EACCES, never ENOENT.
func sentinel(status int, code string) error {
	switch code {
	case "XAdminUserNotFound", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
		"AuthorizationHeaderMalformed", "RequestTimeTooSkewed", "ExpiredToken", "InvalidToken":
		return backend.ErrPermission
	case "NoSuchKey", "NoSuchBucket":
		return backend.ErrNotFound
	case "InvalidRange":
		return backend.ErrInvalid
	}
	switch {
	case status == http.StatusNotFound && code == "":
		// No body to say why (HEAD): callers that must tell a missing
		// key from an unknown user ask again with a GET.
		return backend.ErrNotFound
	case status == http.StatusNotFound:
		// An unknown reason for a 404 is not evidence that the object
		// is missing.
		return backend.ErrUnavailable
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		return backend.ErrPermission
	case status == http.StatusConflict:
		return backend.ErrExists
	case status == http.StatusBadRequest:
		return backend.ErrInvalid
	}
	return backend.ErrUnavailable
}

// kindOf says whether an answer's status is worth retrying.
func kindOf(status int) retry.Kind {
	if status >= 500 || status == http.StatusTooManyRequests {
		return retry.Again
	}
	return retry.Stop
}

// transportFault is a failed round trip: retried, since every request we
// send is idempotent (GET, HEAD, PUT of the same bytes, DELETE), unless the
// server's certificate did not verify, which it would not the next time.
func (c *Client) transportFault(op string, err error) *retry.Fault {
	if ce := retry.Certificate(err, ""); ce != nil {
		return &retry.Fault{Kind: retry.Stop, Err: ce}
	}
	return &retry.Fault{Kind: retry.Again, Err: fmt.Errorf("%w: %s", backend.ErrUnavailable, c.secrets.String(err.Error()))}
}

// minioFault maps an error from minio-go.
func (c *Client) minioFault(op string, err error) *retry.Fault {
	var er minio.ErrorResponse
	if errors.As(err, &er) && er.StatusCode != 0 {
		return &retry.Fault{Kind: kindOf(er.StatusCode), Err: c.mapError(op, er.StatusCode, er.Code, er.Message)}
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return &retry.Fault{Kind: retry.Again, Err: fmt.Errorf("%w: %w", backend.ErrUnavailable, err)}
	}
	return c.transportFault(op, err)
}

// do sends one request built by build and returns the response, or a fault
// for an error answer (whose body it has read and closed). ok lists the
// statuses that are not errors.
func (c *Client) do(op string, req *http.Request, ok ...int) (*http.Response, *retry.Fault) {
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, c.transportFault(op, err)
	}
	for _, s := range ok {
		if resp.StatusCode == s {
			return resp, nil
		}
	}
	defer resp.Body.Close()
	se := c.statusError(op, resp)
	return nil, &retry.Fault{Kind: kindOf(resp.StatusCode), Err: se}
}
