package s3

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
	"github.com/vmexportfs/vmexportfs/backend/retry"
)

// ErrChanged marks an object that was replaced or removed after it was
// opened: its bytes are no longer the ones the Object stands for. It wraps
// backend.ErrUnavailable (EIO): retrying cannot bring the old bytes back.
var ErrChanged = fmt.Errorf("%w: object changed since it was opened", backend.ErrUnavailable)

// Object is one object as it was when HEAD saw it: a backend.Blob pinned to
// that size and ETag. Reads send If-Match and compare the answer's ETag, so
// an object replaced under us fails rather than mixing two versions' bytes.
type Object struct {
	c            *Client
	bucket, key  string
	size         int64
	etag         string // as the server sent it, quotes included
	lastModified time.Time
}

var _ backend.Blob = (*Object)(nil)

func (o *Object) Size() int64 { return o.size }

// ETag is without its quotes, as in ObjectInfo.
func (o *Object) ETag() string            { return strings.Trim(o.etag, `"`) }
func (o *Object) LastModified() time.Time { return o.lastModified }
func (o *Object) Key() string             { return o.key }
func (o *Object) Bucket() string          { return o.bucket }

// Object HEADs bucket/key and returns it pinned to what HEAD said.
func (c *Client) Object(ctx context.Context, bucket, key string) (*Object, error) {
	if err := checkNames(bucket, key, true); err != nil {
		return nil, fmt.Errorf("s3: head: %w", err)
	}
	op := fmt.Sprintf("s3: HEAD %s/%s", bucket, c.secrets.Peer([]byte(key)))
	var obj *Object
	err := c.run(ctx, op, func(actx context.Context) *retry.Fault {
		req, err := c.newRequest(actx, http.MethodHead, bucket, key, nil, nil, nil, 0, emptySHA256)
		if err != nil {
			return &retry.Fault{Kind: retry.Stop, Err: err}
		}
		resp, f := c.do(op, req, http.StatusOK)
		if f != nil {
			var se *StatusError
			if errors.As(f.Err, &se) && se.Code == "" && (se.Status == http.StatusNotFound || se.Status == http.StatusForbidden) {
				return c.explainHead(actx, op, bucket, key, se)
			}
			return f
		}
		resp.Body.Close()
		o, err := c.objectFromHead(bucket, key, resp)
		if err != nil {
			return &retry.Fault{Kind: retry.Stop, Err: err}
		}
		obj = o
		return nil
	})
	if err != nil {
		return nil, err
	}
	return obj, nil
}

// explainHead asks again with a GET of one byte when a HEAD was refused,
// since a HEAD answer has no body to say why: versitygw's 404 is the same
// for a missing key and for an unknown access key, and only the second must
// be EACCES.
func (c *Client) explainHead(ctx context.Context, op, bucket, key string, head *StatusError) *retry.Fault {
	h := http.Header{"Range": {"bytes=0-0"}, "Accept-Encoding": {"identity"}}
	req, err := c.newRequest(ctx, http.MethodGet, bucket, key, nil, h, nil, 0, emptySHA256)
	if err != nil {
		return &retry.Fault{Kind: retry.Stop, Err: err}
	}
	resp, f := c.do(op, req, http.StatusOK, http.StatusPartialContent, http.StatusRequestedRangeNotSatisfiable)
	if f != nil {
		var se *StatusError
		if errors.As(f.Err, &se) && se.Code != "" {
			se.Op = op
			return &retry.Fault{Kind: kindOf(se.Status), Err: se}
		}
		return &retry.Fault{Kind: retry.Stop, Err: head}
	}
	resp.Body.Close()
	// The object is readable now: it appeared between the two requests.
	return &retry.Fault{Kind: retry.Again, Err: fmt.Errorf("%w (but a GET of it succeeded just after)", head)}
}

func (c *Client) objectFromHead(bucket, key string, resp *http.Response) (*Object, error) {
	if ce := resp.Header.Get("Content-Encoding"); !identity(ce) {
		// Reads refuse encoded answers, so refuse the object now, with a
		// clearer message than every read failing.
		return nil, fmt.Errorf("%w: Content-Encoding %q: the stored bytes are not the object's", backend.ErrUnsupported, c.secrets.Peer([]byte(ce)))
	}
	cl := resp.Header.Get("Content-Length")
	size, err := strconv.ParseInt(cl, 10, 64)
	if err != nil || size < 0 {
		return nil, fmt.Errorf("%w: bad Content-Length %q", backend.ErrUnavailable, c.secrets.Peer([]byte(cl)))
	}
	etag := resp.Header.Get("ETag")
	if etag == "" {
		// Without an ETag nothing ties one read to the next.
		return nil, fmt.Errorf("%w: no ETag: reads could not be pinned to one version", backend.ErrUnavailable)
	}
	var lm time.Time
	if v := resp.Header.Get("Last-Modified"); v != "" {
		lm, _ = http.ParseTime(v) // informational: a bad date is not worth failing for
	}
	return &Object{c: c, bucket: bucket, key: key, size: size, etag: etag, lastModified: lm}, nil
}

// ReadAt fills p with bytes [off, off+len(p)) of the object, or returns an
// error; p's contents are unspecified after an error.
func (o *Object) ReadAt(ctx context.Context, p []byte, off int64) error {
	n := int64(len(p))
	if off < 0 || off > o.size || n > o.size-off {
		return fmt.Errorf("s3: read: %w: offset %d length %d of a %d-byte object", backend.ErrInvalid, off, n, o.size)
	}
	if n == 0 {
		return nil
	}
	c := o.c
	op := fmt.Sprintf("s3: read %s/%s bytes %d-%d", o.bucket, c.secrets.Peer([]byte(o.key)), off, off+n-1)
	return c.run(ctx, op, func(actx context.Context) *retry.Fault {
		h := http.Header{
			"Range": {fmt.Sprintf("bytes=%d-%d", off, off+n-1)},
			// A transparently decompressed body would not match the range.
			"Accept-Encoding": {"identity"},
			// The server refuses (412) once the object is replaced; the
			// answer's ETag is compared too, for servers that ignore it.
			"If-Match": {o.etag},
		}
		req, err := c.newRequest(actx, http.MethodGet, o.bucket, o.key, nil, h, nil, 0, emptySHA256)
		if err != nil {
			return &retry.Fault{Kind: retry.Stop, Err: err}
		}
		resp, err := c.http.Do(req)
		if err != nil {
			return c.transportFault(op, err)
		}
		defer resp.Body.Close()
		return o.checkRange(op, resp, p, off)
	})
}

// checkRange reads a Range answer into p, refusing every way it can differ
// from what was asked (as httprange does, plus the ETag). The range is inside
// the object, so no answer but the right bytes is legitimate.
func (o *Object) checkRange(op string, resp *http.Response, p []byte, off int64) *retry.Fault {
	c := o.c
	n := int64(len(p))
	switch resp.StatusCode {
	case http.StatusPartialContent:
	case http.StatusOK:
		// versitygw's answer to a malformed, backwards or multi-range
		// request: the whole object. Never read it.
		return retry.Faultf(retry.Again, "server ignored Range: status 200")
	case http.StatusPreconditionFailed:
		return &retry.Fault{Kind: retry.Stop, Err: fmt.Errorf("%w: If-Match %s refused: %w", ErrChanged, o.etag, c.statusError(op, resp))}
	case http.StatusRequestedRangeNotSatisfiable:
		// Not ErrInvalid: our range is inside the object, so the answer
		// is the fault (or the object shrank: then retries end in EIO).
		return &retry.Fault{Kind: retry.Again, Err: fmt.Errorf("range inside the %d-byte object refused: %w", o.size, c.statusError(op, resp))}
	default:
		se := c.statusError(op, resp)
		if se.Code == "NoSuchKey" {
			return &retry.Fault{Kind: retry.Stop, Err: fmt.Errorf("%w: %w", ErrChanged, se)}
		}
		return &retry.Fault{Kind: kindOf(resp.StatusCode), Err: se}
	}
	if ce := resp.Header.Get("Content-Encoding"); !identity(ce) || resp.Uncompressed {
		return retry.Faultf(retry.Again, "Content-Encoding %q on a Range answer", c.secrets.Peer([]byte(ce)))
	}
	if ct := resp.Header.Get("Content-Type"); strings.HasPrefix(strings.ToLower(strings.TrimSpace(ct)), "multipart/") {
		return retry.Faultf(retry.Again, "multipart answer (Content-Type %q) to a single-range request", c.secrets.Peer([]byte(ct)))
	}
	if et := resp.Header.Get("ETag"); et != o.etag {
		// The server ignored If-Match, or a cache answered: either way
		// these are not the pinned version's bytes.
		return &retry.Fault{Kind: retry.Stop, Err: fmt.Errorf("%w: ETag %q, opened as %q", ErrChanged, c.secrets.Peer([]byte(et)), o.etag)}
	}
	cr := resp.Header.Get("Content-Range")
	first, last, total, err := httprange.ParseContentRange(cr)
	if err != nil {
		return retry.Faultf(retry.Again, "bad Content-Range %q: %w", c.secrets.Peer([]byte(cr)), err)
	}
	if total != o.size {
		return retry.Faultf(retry.Again, "Content-Range total %d, object size %d", total, o.size)
	}
	if first != off || last != off+n-1 {
		return retry.Faultf(retry.Again, "Content-Range mismatch: got %d-%d, asked %d-%d", first, last, off, off+n-1)
	}
	if resp.ContentLength != n {
		// -1 (chunked, no length) is refused too: a 206 of a known range
		// has no reason to hide its length.
		return retry.Faultf(retry.Again, "Content-Length %d, asked %d", resp.ContentLength, n)
	}
	got, err := io.ReadFull(resp.Body, p)
	if err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return retry.Faultf(retry.Again, "short body: got %d of %d bytes", got, n)
		}
		return c.transportFault(op, fmt.Errorf("read body after %d of %d bytes: %w", got, n, err))
	}
	var extra [1]byte
	if m, _ := io.ReadFull(resp.Body, extra[:]); m > 0 {
		return retry.Faultf(retry.Again, "long body: more than %d bytes", n)
	}
	c.reads.Add(1)
	c.bytesRead.Add(n)
	return nil
}

// identity reports whether a Content-Encoding leaves the body as is.
func identity(ce string) bool {
	for _, coding := range strings.Split(ce, ",") {
		if c := strings.TrimSpace(coding); c != "" && !strings.EqualFold(c, "identity") {
			return false
		}
	}
	return true
}

// Put uploads size bytes from r as bucket/key in one PUT (no multipart, no
// streaming-chunked signing). It is for simulators and tests. It is retried
// only when r can be rewound (an io.Seeker).
func (c *Client) Put(ctx context.Context, bucket, key string, r io.Reader, size int64) error {
	if err := checkNames(bucket, key, true); err != nil {
		return fmt.Errorf("s3: put: %w", err)
	}
	if size < 0 {
		return fmt.Errorf("s3: put: %w: size %d", backend.ErrInvalid, size)
	}
	op := fmt.Sprintf("s3: PUT %s/%s", bucket, c.secrets.Peer([]byte(key)))
	seeker, rewindable := r.(io.Seeker)
	var start int64
	if rewindable {
		var err error
		if start, err = seeker.Seek(0, io.SeekCurrent); err != nil {
			rewindable = false
		}
	}
	tries := 0
	return c.run(ctx, op, func(actx context.Context) *retry.Fault {
		tries++
		if tries > 1 {
			if !rewindable {
				return retry.Faultf(retry.Stop, "cannot resend: the body cannot be rewound")
			}
			if _, err := seeker.Seek(start, io.SeekStart); err != nil {
				return retry.Faultf(retry.Stop, "rewind body: %w", err)
			}
		}
		// The transport sends exactly ContentLength bytes and fails on a
		// short body; NoBody keeps a zero-length PUT a plain one.
		var body io.Reader = io.NopCloser(io.LimitReader(r, size))
		if size == 0 {
			body = http.NoBody
		}
		req, err := c.newRequest(actx, http.MethodPut, bucket, key, nil, nil, body, size, unsignedPayload)
		if err != nil {
			return &retry.Fault{Kind: retry.Stop, Err: err}
		}
		resp, f := c.do(op, req, http.StatusOK)
		if f != nil {
			return f
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, errorBodyRead))
		resp.Body.Close()
		return nil
	})
}

// Remove deletes bucket/key. Removing a missing key succeeds, as in S3.
func (c *Client) Remove(ctx context.Context, bucket, key string) error {
	if err := checkNames(bucket, key, true); err != nil {
		return fmt.Errorf("s3: remove: %w", err)
	}
	op := fmt.Sprintf("s3: DELETE %s/%s", bucket, c.secrets.Peer([]byte(key)))
	return c.run(ctx, op, func(actx context.Context) *retry.Fault {
		req, err := c.newRequest(actx, http.MethodDelete, bucket, key, nil, nil, nil, 0, emptySHA256)
		if err != nil {
			return &retry.Fault{Kind: retry.Stop, Err: err}
		}
		resp, f := c.do(op, req, http.StatusNoContent, http.StatusOK)
		if f != nil {
			return f
		}
		resp.Body.Close()
		return nil
	})
}
