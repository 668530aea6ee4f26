package httprange

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
)

// Stream GETs url for a long read of its whole body, as XenServer's
// export_raw_vdi must be read (no Content-Length, Range ignored, the body
// ends when the connection closes). It is retried like Do until the answer's
// headers arrive; after that the body has no total deadline, only an idle
// one: a Read that waits longer than the policy's AttemptTimeout fails, so a
// stalled server cannot hold a reader forever. A compressed or multipart
// body is refused (it would not be the resource's bytes). The caller closes
// the body and checks its length and framing itself.
func (c *Client) Stream(ctx context.Context, rawURL string) (io.ReadCloser, error) {
	pol := c.Policy.WithDefaults()
	var body io.ReadCloser
	op := "stream " + redactString(rawURL)
	err := c.retry(ctx, func() string { return op }, func(_ context.Context) *attemptError {
		sctx, cancel := context.WithCancel(ctx)
		idle := &idleBody{timeout: pol.AttemptTimeout, cancel: cancel}
		idle.timer = time.AfterFunc(pol.AttemptTimeout, cancel)
		req, err := http.NewRequestWithContext(sctx, http.MethodGet, rawURL, nil)
		if err != nil {
			idle.stop()
			return &attemptError{Kind: final, Err: fmt.Errorf("%w: build request: %w", backend.ErrInvalid, err)}
		}
		req.Header.Set("Accept-Encoding", "identity")
		resp, aerr := c.send(sctx, req)
		if aerr != nil {
			idle.stop()
			return aerr
		}
		if resp.StatusCode < 200 || resp.StatusCode > 299 {
			err := c.statusError(resp)
			resp.Body.Close()
			idle.stop()
			return &attemptError{Kind: classify(resp.StatusCode, true), Err: err}
		}
		if aerr := c.checkPlainBody(resp, "stream answer", "GET "+redactURL(req.URL)); aerr != nil {
			resp.Body.Close()
			idle.stop()
			return aerr
		}
		idle.ReadCloser = resp.Body
		body = idle
		return nil
	})
	if err != nil {
		return nil, err
	}
	return body, nil
}

// idleBody fails a Read that makes no progress within timeout, by
// cancelling the request's context.
type idleBody struct {
	io.ReadCloser
	timeout time.Duration
	cancel  context.CancelFunc
	timer   *time.Timer
	once    sync.Once
}

func (b *idleBody) Read(p []byte) (int, error) {
	b.timer.Reset(b.timeout)
	n, err := b.ReadCloser.Read(p)
	b.timer.Reset(b.timeout)
	return n, err
}

func (b *idleBody) Close() error {
	var err error
	if b.ReadCloser != nil {
		err = b.ReadCloser.Close()
	}
	b.stop()
	return err
}

func (b *idleBody) stop() {
	b.once.Do(func() {
		b.timer.Stop()
		b.cancel()
	})
}
