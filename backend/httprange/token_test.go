package httprange

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestRenewStale: a 401 to the token in use logs in again even right after
// a login (the token was revoked); a 401 to a token already replaced, as
// every request refused together but the first sees, does not.
func TestRenewStale(t *testing.T) {
	logins := 0
	a := &TokenAuth{Login: func(context.Context) (string, time.Time, error) {
		logins++
		return fmt.Sprint("token-", logins), time.Time{}, nil
	}}
	ctx := context.Background()
	header := func() string {
		req, err := http.NewRequest(http.MethodGet, "https://example.invalid/", nil)
		require.NoError(t, err)
		require.NoError(t, a.Authorize(ctx, req))
		return req.Header.Get("Authorization")
	}
	first := header()
	require.Equal(t, 1, logins)
	require.NoError(t, a.RenewStale(ctx, first))
	assert.Equal(t, 2, logins, "the token in use was refused: a login, however recent the last")
	require.NoError(t, a.RenewStale(ctx, first))
	assert.Equal(t, 2, logins, "a refusal of the replaced token: no login")
	assert.Equal(t, "Bearer token-2", header())
}
