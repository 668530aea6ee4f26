package httprange

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strconv"

	"github.com/vmexportfs/vmexportfs/backend"
)

// ReadQuery fills p with bytes [off, off+len(p)) of a resource of size bytes
// served by a "?offset=&length=" route (such as KubeVirt's backup data
// route), which ignores Range and answers 200 with or without a
// Content-Length. The answer is checked as strictly as ReadRange's: exactly
// len(p) bytes, no more, no Content-Encoding, no multipart; every fault is
// retried. p's contents are unspecified after an error.
func (c *Client) ReadQuery(ctx context.Context, rawURL string, size int64, p []byte, off int64) error {
	n := int64(len(p))
	if off < 0 || size < 0 || off > size || n > size-off {
		return fmt.Errorf("read query: %w: offset %d length %d of a %d-byte resource", backend.ErrInvalid, off, n, size)
	}
	if n == 0 {
		return nil
	}
	u, err := url.Parse(rawURL)
	if err != nil {
		return fmt.Errorf("read query: %w: bad url", backend.ErrInvalid)
	}
	q := u.Query()
	q.Set("offset", strconv.FormatInt(off, 10))
	q.Set("length", strconv.FormatInt(n, 10))
	u.RawQuery = q.Encode()
	target := u.String()
	op := fmt.Sprintf("read %s offset %d length %d", redactString(rawURL), off, n)
	return c.retry(ctx, func() string { return op }, func(actx context.Context) *attemptError {
		req, err := http.NewRequestWithContext(actx, http.MethodGet, target, nil)
		if err != nil {
			return &attemptError{Kind: final, Err: fmt.Errorf("%w: build request: %w", backend.ErrInvalid, err)}
		}
		// A transparently decompressed body would not be the disk's bytes.
		req.Header.Set("Accept-Encoding", "identity")
		resp, aerr := c.send(actx, req)
		if aerr != nil {
			return aerr
		}
		defer resp.Body.Close()
		return c.checkQuery(resp, p)
	})
}

// checkQuery reads an offset/length answer into p: a plain 200 of exactly
// len(p) bytes (the route ignores Range and may omit Content-Length).
func (c *Client) checkQuery(resp *http.Response, p []byte) *attemptError {
	if resp.StatusCode != http.StatusOK {
		if resp.StatusCode >= 200 && resp.StatusCode <= 299 {
			return fault(retryable, "unexpected status %d to an offset/length read", resp.StatusCode)
		}
		return &attemptError{Kind: classify(resp.StatusCode, true), Err: c.statusError(resp)}
	}
	if f := c.checkPlainBody(resp, "an offset/length answer", "an offset/length read"); f != nil {
		return f
	}
	return readExactly(resp, p)
}

// QueryDisk is Disk for a "?offset=&length=" data route: reads go through
// ReadQuery instead of Range requests.
func (c *Client) QueryDisk(url string, size int64, alloc extentMap, opts DiskOptions) *Disk {
	d := c.Disk(url, size, alloc, opts)
	d.read = c.ReadQuery
	return d
}
