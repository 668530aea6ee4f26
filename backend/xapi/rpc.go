package xapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/redact"
	"github.com/vmexportfs/vmexportfs/backend/retry"
)

// maxAnswer bounds one JSON-RPC answer. The largest are the get_all_records
// of a big pool (tens of MB); an answer beyond this is a hostile or broken
// server, not a pool.
const maxAnswer = 256 << 20

// nullRef is XenAPI's null reference: an empty CD drive's VDI, a VM that is
// nobody's snapshot.
const nullRef = "OpaqueRef:NULL"

// APIError is a XenAPI failure: its code (SESSION_INVALID, HANDLE_INVALID,
// ...) and parameters, made safe to print.
type APIError struct {
	Code   string
	Params []string
}

func (e *APIError) Error() string {
	if len(e.Params) == 0 {
		return "xapi: " + e.Code
	}
	return fmt.Sprintf("xapi: %s %q", e.Code, e.Params)
}

// Unwrap maps the code to the backend sentinel the filesystem turns into an
// errno.
func (e *APIError) Unwrap() error {
	switch e.Code {
	case "HANDLE_INVALID", "UUID_INVALID":
		return backend.ErrNotFound
	case "SESSION_AUTHENTICATION_FAILED", "RBAC_PERMISSION_DENIED", "PERMISSION_DENIED", "SESSION_NOT_REGISTERED":
		return backend.ErrPermission
	case "MESSAGE_METHOD_UNKNOWN", "VDI_NO_CBT_METADATA", "VDI_CBT_ENABLED", "SR_OPERATION_NOT_SUPPORTED":
		return backend.ErrUnsupported
	case "OPERATION_NOT_ALLOWED", "VM_BAD_POWER_STATE", "VDI_INCOMPATIBLE_TYPE", "VDI_NOT_IN_MAP":
		return backend.ErrInvalid
	}
	return backend.ErrUnavailable
}

// busy says whether the failure is one that passes: a disk in use by another
// operation, the host busy. Those are retried, then EIO.
func (e *APIError) busy() bool {
	switch e.Code {
	case "VDI_IN_USE", "OTHER_OPERATION_IN_PROGRESS", "HOST_IS_SLAVE_BUSY", "TOO_BUSY", "SR_BACKEND_FAILURE_46", "VDI_IS_A_PHYSICAL_DEVICE_BUSY", "HOST_STILL_BOOTING":
		return true
	}
	return false
}

// rpcClient speaks XenAPI JSON-RPC to one pool master and keeps its session:
// logged in with an originator, logged in again once when the server says
// SESSION_INVALID (xapi restarted, or our session was the oldest of too
// many), logged out at Close.
type rpcClient struct {
	url        string // https://MASTER/jsonrpc
	http       *http.Client
	username   string
	password   string
	originator string
	policy     retry.Policy
	logger     *slog.Logger
	secrets    *redact.Secrets

	nextID atomic.Uint64
	mu     sync.Mutex
	ref    string // the session; "" before login and after logout
}

// request is a JSON-RPC 2.0 call.
type request struct {
	JSONRPC string `json:"jsonrpc"`
	Method  string `json:"method"`
	Params  []any  `json:"params"`
	ID      uint64 `json:"id"`
}

// answer is a JSON-RPC answer: result or error, never both.
type answer struct {
	Result json.RawMessage `json:"result"`
	Error  *struct {
		Code    json.RawMessage   `json:"code"`
		Message string            `json:"message"`
		Data    []json.RawMessage `json:"data"`
	} `json:"error"`
	ID json.RawMessage `json:"id"`
}

// session returns the session ref, logging in when there is none.
func (c *rpcClient) session(ctx context.Context) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ref != "" {
		return c.ref, nil
	}
	if err := c.loginLocked(ctx); err != nil {
		return "", err
	}
	return c.ref, nil
}

// login logs in anew unless someone already did after stale was found
// invalid.
func (c *rpcClient) relogin(ctx context.Context, stale string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ref != stale && c.ref != "" {
		return nil
	}
	c.logger.Warn("xapi: session invalid, logging in again")
	return c.loginLocked(ctx)
}

func (c *rpcClient) loginLocked(ctx context.Context) error {
	var ref string
	err := c.roundTrip(ctx, "session.login_with_password", []any{c.username, c.password, apiVersion, c.originator}, &ref, true)
	var apiErr *APIError
	if errors.As(err, &apiErr) && apiErr.Code == "SESSION_AUTHENTICATION_FAILED" && len(apiErr.Params) > 0 {
		// [user, reason]: the pool's own words, then the code to look up.
		return fmt.Errorf("xapi: log in as %q: %w: %s (%s)", c.username, backend.ErrPermission, apiErr.Params[len(apiErr.Params)-1], apiErr.Code)
	}
	if err != nil {
		return fmt.Errorf("xapi: log in as %q: %w", c.username, err)
	}
	if ref == "" || ref == nullRef {
		return fmt.Errorf("xapi: log in as %q: %w: empty session reference", c.username, backend.ErrUnavailable)
	}
	c.secrets.AddRenewed(ref) // a session ref is a bearer credential
	c.ref = ref
	return nil
}

// logout ends the session; xapi limits live sessions per user, and a
// client that leaves its own behind pushes other tools' out.
func (c *rpcClient) logout(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ref == "" {
		return nil
	}
	ref := c.ref
	c.ref = ""
	var ignored json.RawMessage
	if err := c.roundTrip(ctx, "session.logout", []any{ref}, &ignored, true); err != nil {
		return fmt.Errorf("xapi: log out: %w", err)
	}
	return nil
}

// callKind says how a call may be repeated.
type callKind int

const (
	// query changes nothing on the server: a lost answer is asked again,
	// a busy one retried.
	query callKind = iota
	// action changes the platform (a snapshot, a destroy): sent again only
	// when the server answered with a failure, so a lost answer never
	// makes two snapshots.
	action
	// probe is a query whose busy answer is an answer: the caller has
	// another way (list_changed_blocks of a disk someone reads).
	probe
)

// call runs method with the session ref as first parameter and decodes the
// result into out.
func (c *rpcClient) call(ctx context.Context, method string, kind callKind, out any, params ...any) error {
	safe := kind != action
	r := retry.Runner{Policy: c.policy, Logger: c.logger}
	var used string
	r.Renew = func(ctx context.Context) error { return c.relogin(ctx, used) }
	_, err := r.Do(ctx, func() string { return "xapi: " + method }, func(ctx context.Context) *retry.Fault {
		ref, err := c.session(ctx)
		if err != nil {
			return &retry.Fault{Kind: retry.Stop, Err: err}
		}
		used = ref
		err = c.roundTrip(ctx, method, append([]any{ref}, params...), out, safe)
		var apiErr *APIError
		switch {
		case err == nil:
			return nil
		case errors.As(err, &apiErr) && apiErr.Code == "SESSION_INVALID":
			return &retry.Fault{Kind: retry.Renew, Err: err}
		case errors.As(err, &apiErr) && apiErr.busy() && kind != probe:
			return &retry.Fault{Kind: retry.Again, Err: err}
		case errors.As(err, &apiErr):
			return &retry.Fault{Kind: retry.Stop, Err: err}
		case errors.Is(err, errTransport) && safe:
			return &retry.Fault{Kind: retry.Again, Err: err}
		}
		return &retry.Fault{Kind: retry.Stop, Err: err}
	})
	if err != nil && errors.Is(err, retry.ErrExhausted) {
		return fmt.Errorf("%w: %w", backend.ErrUnavailable, err)
	}
	return err
}

// errTransport marks a failure to exchange the call (network, HTTP status,
// unreadable answer), as opposed to the server's XenAPI failure.
var errTransport = errors.New("transport")

// roundTrip sends one call and decodes its answer. Its errors are an
// *APIError (the server answered with a failure) or wrap errTransport.
func (c *rpcClient) roundTrip(ctx context.Context, method string, params []any, out any, safe bool) error {
	id := c.nextID.Add(1)
	body, err := json.Marshal(request{JSONRPC: "2.0", Method: method, Params: params, ID: id})
	if err != nil {
		return fmt.Errorf("xapi: encode %s: %w", method, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("xapi: %s: %w", method, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept-Encoding", "identity")
	resp, err := c.http.Do(req)
	if ce := retry.Certificate(err, ""); ce != nil {
		// Not errTransport: the same certificate would fail again.
		return fmt.Errorf("xapi: %s: %w", method, ce)
	}
	if err != nil {
		return fmt.Errorf("xapi: %s: %w: %w: %s", method, errTransport, backend.ErrUnavailable, c.secrets.String(err.Error()))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		return fmt.Errorf("xapi: %s: %w: %w: status %d: %q", method, errTransport, backend.ErrUnavailable, resp.StatusCode, c.secrets.Peer(b))
	}
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer+1))
	if err != nil {
		return fmt.Errorf("xapi: %s: %w: %w: reading the answer: %s", method, errTransport, backend.ErrUnavailable, c.secrets.String(err.Error()))
	}
	if len(raw) > maxAnswer {
		return fmt.Errorf("xapi: %s: %w: %w: answer over %d bytes", method, errTransport, backend.ErrUnavailable, maxAnswer)
	}
	return decodeAnswer(raw, id, out, c.secrets)
}

// decodeAnswer checks a JSON-RPC answer against the call it answers and
// decodes its result into out.
func decodeAnswer(raw []byte, id uint64, out any, secrets *redact.Secrets) error {
	var a answer
	if err := json.Unmarshal(sanitizeNonFinite(raw), &a); err != nil {
		return fmt.Errorf("xapi: %w: %w: malformed JSON-RPC answer: %s", errTransport, backend.ErrUnavailable, secrets.String(err.Error()))
	}
	if gotID := strings.TrimSpace(string(a.ID)); gotID != strconv.FormatUint(id, 10) {
		return fmt.Errorf("xapi: %w: %w: answer to call %d has id %q", errTransport, backend.ErrUnavailable, id, secrets.Peer([]byte(gotID)))
	}
	if a.Error != nil {
		e := &APIError{Code: secrets.Peer([]byte(a.Error.Message))}
		if e.Code == "" {
			e.Code = "UNKNOWN_ERROR"
		}
		for i, d := range a.Error.Data {
			if i == maxErrorParams {
				break
			}
			var s string
			if json.Unmarshal(d, &s) != nil {
				s = string(d)
			}
			e.Params = append(e.Params, secrets.Peer([]byte(s)))
		}
		return e
	}
	if len(a.Result) == 0 {
		return fmt.Errorf("xapi: %w: %w: answer with neither result nor error", errTransport, backend.ErrUnavailable)
	}
	if err := json.Unmarshal(a.Result, out); err != nil {
		return fmt.Errorf("xapi: %w: %w: unexpected result: %s", errTransport, backend.ErrUnavailable, secrets.String(err.Error()))
	}
	return nil
}

// maxErrorParams bounds what of a failure's parameters goes into an error.
const maxErrorParams = 8

// sanitizeNonFinite replaces the bare literals NaN, Infinity and -Infinity
// (which xapi writes for some float fields, and which are not JSON) with
// null, leaving strings alone. Input without them is returned as is.
func sanitizeNonFinite(b []byte) []byte {
	if !bytes.Contains(b, []byte("NaN")) && !bytes.Contains(b, []byte("Infinity")) {
		return b
	}
	out := make([]byte, 0, len(b))
	inString, escaped := false, false
	for i := 0; i < len(b); i++ {
		ch := b[i]
		if inString {
			out = append(out, ch)
			switch {
			case escaped:
				escaped = false
			case ch == '\\':
				escaped = true
			case ch == '"':
				inString = false
			}
			continue
		}
		switch {
		case ch == '"':
			inString = true
			out = append(out, ch)
		case bytes.HasPrefix(b[i:], []byte("-Infinity")):
			out = append(out, "null"...)
			i += len("-Infinity") - 1
		case bytes.HasPrefix(b[i:], []byte("Infinity")):
			out = append(out, "null"...)
			i += len("Infinity") - 1
		case bytes.HasPrefix(b[i:], []byte("NaN")):
			out = append(out, "null"...)
			i += len("NaN") - 1
		default:
			out = append(out, ch)
		}
	}
	return out
}
