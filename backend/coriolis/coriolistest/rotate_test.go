package coriolistest

import (
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestRotateSecret: after a rotation every token issued before is refused
// with 401, counted in Unauthorized, and a new login's token works.
func TestRotateSecret(t *testing.T) {
	h := newHarness(t)
	require.NoError(t, h.srv.AddVM(VMSpec{ID: "vm1"}))
	other := h.login("admin", "secret")
	require.Equal(t, http.StatusOK, h.get("/api/v1/vms/vm1").status)
	h.srv.ResetStats()

	require.NoError(t, h.srv.RotateSecret())
	for _, token := range []string{h.token, other} {
		r := h.do(http.MethodGet, "/api/v1/vms/vm1", token, nil, nil)
		require.Equal(t, http.StatusUnauthorized, r.status, string(r.body))
		assert.Equal(t, apiError{Error: "Authentication failed", Details: "Invalid authentication token"}, decodeAPIError(t, r.body))
	}
	assert.Equal(t, Stats{Unauthorized: 2}, h.srv.Stats())

	h.token = h.login("admin", "secret")
	assert.Equal(t, http.StatusOK, h.get("/api/v1/vms/vm1").status)
	assert.Equal(t, Stats{Unauthorized: 2, Logins: 1, APIRequests: 1, VMGets: 1}, h.srv.Stats())
}
