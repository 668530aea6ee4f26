package httprange

import (
	"context"
	"net/http"
	"sync"
	"time"
)

// RenewDebounce: a 401 that arrives this soon after a login was almost
// certainly sent with the old token, so it does not need another login.
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

func (a *TokenAuth) loginLocked(ctx context.Context) error {
	token, renewAt, err := a.Login(ctx)
	if err != nil {
		return err
	}
	a.token, a.renewAt, a.loggedIn = token, renewAt, time.Now()
	return nil
}
