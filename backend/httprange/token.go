package httprange

import (
	"context"
	"net/http"
	"sync"
	"time"
)

// RenewDebounce: Renew, which is not told the token a refused request
// carried, takes a 401 this soon after a login for one sent with the old
// token. The retries of a Client say which token was refused (RenewStale).
const RenewDebounce = time.Second

// TokenAuth is an Authorizer of bearer tokens that a platform's Login
// makes (a JWT login, an SSO token): one login at a time, shared by every
// request; a new one when the token is due, and after a 401 unless one has
// just happened.
type TokenAuth struct {
	// Login returns a fresh token and when to log in again (zero: only
	// after a 401). It registers the token with the secrets first.
	Login func(ctx context.Context) (token string, renewAt time.Time, err error)

	mu       sync.Mutex
	token    string
	renewAt  time.Time
	loggedIn time.Time
}

// Authorize adds the bearer token, logging in first when there is none or
// it is due.
func (a *TokenAuth) Authorize(ctx context.Context, req *http.Request) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.token == "" || (!a.renewAt.IsZero() && !time.Now().Before(a.renewAt)) {
		if err := a.loginLocked(ctx); err != nil {
			return err
		}
	}
	req.Header.Set("Authorization", "Bearer "+a.token)
	return nil
}

// Renew logs in again, unless another request just did.
func (a *TokenAuth) Renew(ctx context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.token != "" && time.Since(a.loggedIn) < RenewDebounce {
		return nil
	}
	return a.loginLocked(ctx)
}

// RenewStale logs in again after a request sent with Authorization header
// used was refused, unless the token has been replaced since: many requests
// refused together make one login, and a token revoked a moment after a
// login is still replaced.
func (a *TokenAuth) RenewStale(ctx context.Context, used string) error {
	if used == "" { // not noted: tell by the time instead
		return a.Renew(ctx)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.token != "" && used != "Bearer "+a.token {
		return nil
	}
	return a.loginLocked(ctx)
}

func (a *TokenAuth) loginLocked(ctx context.Context) error {
	token, renewAt, err := a.Login(ctx)
	if err != nil {
		return err
	}
	a.token, a.renewAt, a.loggedIn = token, renewAt, time.Now()
	return nil
}
