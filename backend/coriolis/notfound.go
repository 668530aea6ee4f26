package coriolis

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/vmexportfs/vmexportfs/backend"
)

// notFoundTransport maps the real exporter's answer for an unknown VM,
// snapshot or compareTo base, a 500 whose details are "not found" or "could
// not find VM with ID <id>", to the 404 it means, so it is ErrNotFound at
// once (ENOENT) instead of a server fault retried --retries times and then
// EIO. Only those exact details (case-insensitive) are mapped: any other 500
// stays a retried fault.
type notFoundTransport struct{ base http.RoundTripper }

// notFoundBodyRead bounds what is read of a 500 answer (httprange reads no
// more of an error body either).
const notFoundBodyRead = 4 << 10

func (t notFoundTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(req)
	if err != nil || resp.StatusCode != http.StatusInternalServerError {
		return resp, err
	}
	b, rerr := io.ReadAll(io.LimitReader(resp.Body, notFoundBodyRead))
	resp.Body.Close()
	if rerr != nil {
		return nil, rerr
	}
	resp.Body = io.NopCloser(bytes.NewReader(b))
	resp.ContentLength = int64(len(b))
	if notFoundDetails(b) {
		resp.StatusCode, resp.Status = http.StatusNotFound, "404 Not Found (exporter: 500 not found)"
	}
	return resp, nil
}

// CloseIdleConnections lets http.Client.CloseIdleConnections reach the
// wrapped transport.
func (t notFoundTransport) CloseIdleConnections() {
	if c, ok := t.base.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

// notFoundDetails reports an APIError body whose details say the thing asked
// for does not exist.
func notFoundDetails(b []byte) bool {
	var e struct {
		Details string `json:"details"`
	}
	if json.Unmarshal(b, &e) != nil {
		return false
	}
	d := strings.ToLower(strings.TrimSpace(e.Details))
	return d == "not found" || strings.HasPrefix(d, "could not find vm with id")
}

// withNotFound is hc with its transport wrapped by notFoundTransport.
func withNotFound(hc *http.Client) *http.Client {
	out := *hc
	base := hc.Transport
	if base == nil {
		base = http.DefaultTransport
	}
	out.Transport = notFoundTransport{base: base}
	return &out
}

// notThisVM maps the exporter's answer for a snapshot id that exists under
// another VM (409, "VM id missmatch", which httprange reports as ErrExists)
// to ErrNotFound: the VM asked about has no such snapshot, and an open or a
// delete of it must not look like EEXIST.
func notThisVM(err error) error {
	if errors.Is(err, backend.ErrExists) {
		return fmt.Errorf("%w: the snapshot belongs to another VM (%v)", backend.ErrNotFound, err)
	}
	return err
}
