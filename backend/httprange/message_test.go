package httprange

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/redact"
)

// TestStatusErrorSaysWhatTheServerSaid: a refusal's error carries the
// server's words as they read, from each platform's JSON shape, made safe
// for a terminal (no escape sequences, no secret however it was spelled)
// and cut.
func TestStatusErrorSaysWhatTheServerSaid(t *testing.T) {
	const secret = "hunter2-in-the-body"
	for _, tc := range []struct {
		name, body string
		want       string // after "status 401: "
		not        []string
	}{
		{"coriolis", `{"error":"Not Authorized","details":"failed to login: Response code: 401, Unauthorized"}`,
			"Not Authorized: failed to login: Response code: 401, Unauthorized", nil},
		{"ovirt sso", `{"error":"Cannot authenticate user 'admin@internal': The username or password is incorrect..","error_code":"access_denied"}`,
			"Cannot authenticate user 'admin@internal': The username or password is incorrect..", []string{"access_denied"}},
		{"oauth", `{"error":"invalid_grant","error_description":"The provided authorization grant is invalid"}`,
			"invalid_grant: The provided authorization grant is invalid", nil},
		{"kubernetes status", `{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}`,
			"Unauthorized", []string{"Unauthorized: Unauthorized", "Failure"}},
		{"jdcloud", `{"error":{"code":401,"message":"signature does not match","status":"UNAUTHENTICATED"},"requestId":"c0ffee"}`,
			"signature does not match", []string{"c0ffee"}},
		{"ovirt fault", `{"reason":"Operation Failed","detail":"[Cannot lock the VM]"}`, "Operation Failed: [Cannot lock the VM]", nil},
		{"plain text", "Not Authorized\n", "Not Authorized", nil},
		{"JSON saying nothing", `{"code":401}`, `{"code":401}`, nil},
		// Decoding undoes the escapes that hid these from the body's masking.
		{"hostile", `{"error":"\u001b[2J\u001b]0;owned\u0007 cleared","details":"\u0068unter2-in-the-body"}`,
			"?[2J?]0;owned? cleared: " + redact.Mask, []string{"\x1b", "\x07", secret}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				http.Error(w, tc.body, http.StatusUnauthorized)
			}))
			defer srv.Close()
			secrets := &redact.Secrets{}
			secrets.Add(secret)
			c := &Client{HTTP: srv.Client(), Policy: fastPolicy(), Secrets: secrets}
			_, err := c.Do(context.Background(), func(ctx context.Context) (*http.Request, error) {
				return http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/login", nil)
			})
			require.ErrorIs(t, err, backend.ErrPermission)
			assert.True(t, strings.HasSuffix(err.Error(), "status 401: "+tc.want), err.Error())
			assert.NotContains(t, err.Error(), `\"`)
			for _, not := range tc.not {
				assert.NotContains(t, err.Error(), not)
			}
		})
	}
}

// TestServerMessageCut: a server's message is cut to redact's limit.
func TestServerMessageCut(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, `{"error":"Not Authorized","details":"`+strings.Repeat("why ", 900)+`"}`, http.StatusForbidden)
	}))
	defer srv.Close()
	c := &Client{HTTP: srv.Client(), Policy: fastPolicy()}
	_, err := c.Do(context.Background(), func(ctx context.Context) (*http.Request, error) {
		return http.NewRequestWithContext(ctx, http.MethodGet, srv.URL, nil)
	})
	require.ErrorIs(t, err, backend.ErrPermission)
	assert.Contains(t, err.Error(), "status 403: Not Authorized: why why")
	assert.Less(t, len(err.Error()), redact.PeerLimit+len("permission denied: status 403: ")+len("GET "+srv.URL+": ")+8)
}
