package coriolis

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
	"github.com/vmexportfs/vmexportfs/backend/redact"
)

// authorizer logs in to the exporter for its JWT, which httprange's
// TokenAuth renews before it expires or after a 401.
type authorizer struct {
	login   *httprange.Client // no Auth: login is how credentials are made
	url     string
	user    string
	pass    string
	logger  *slog.Logger
	secrets *redact.Secrets
}

// Login logs in and returns the token and when to log in again.
func (a *authorizer) Login(ctx context.Context) (string, time.Time, error) {
	body, err := json.Marshal(loginRequest{Username: a.user, Password: a.pass})
	if err != nil {
		return "", time.Time{}, fmt.Errorf("coriolis: login: %w", err)
	}
	resp, err := a.login.Do(ctx, func(ctx context.Context) (*http.Request, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, a.url, bytes.NewReader(body))
		if err != nil {
			return nil, err
		}
		req.Header.Set("Content-Type", "application/json")
		// Logging in twice is harmless, so network faults may be retried.
		req.Header.Set("Idempotency-Key", "login")
		return req, nil
	})
	if err != nil {
		return "", time.Time{}, fmt.Errorf("coriolis: login as %q: %w", a.user, err)
	}
	defer resp.Body.Close()
	var ans loginAnswer
	if err := decodeJSON(resp.Body, &ans); err != nil {
		return "", time.Time{}, fmt.Errorf("coriolis: login: %w", err)
	}
	// Known before anything can quote it, even an error about it.
	a.secrets.AddRenewed(ans.Token)
	renewAt, err := tokenRenewal(ans.Token, time.Now())
	if err != nil {
		return "", time.Time{}, fmt.Errorf("coriolis: login: %w", err)
	}
	a.logger.Debug("coriolis: logged in", "user", a.user, "renew_at", renewAt)
	return ans.Token, renewAt, nil
}

// tokenRenewal reads the token's exp without verifying it (only the server
// holds the secret) and returns when to log in again: min(60s, TTL/5) early.
func tokenRenewal(token string, now time.Time) (time.Time, error) {
	if token == "" {
		return time.Time{}, fmt.Errorf("%w: answer has no token", backend.ErrUnavailable)
	}
	var claims jwt.RegisteredClaims
	if _, _, err := jwt.NewParser().ParseUnverified(token, &claims); err != nil {
		// The error text of a JWT parser may quote the token; do not wrap it.
		return time.Time{}, fmt.Errorf("%w: answer token is not a JWT", backend.ErrUnavailable)
	}
	if claims.ExpiresAt == nil {
		// No expiry: rely on the 401 path.
		return now.Add(100 * 365 * 24 * time.Hour), nil
	}
	ttl := claims.ExpiresAt.Sub(now)
	if ttl <= 0 {
		return time.Time{}, fmt.Errorf("%w: server issued an already expired token (clock skew?)", backend.ErrUnavailable)
	}
	return claims.ExpiresAt.Add(-min(60*time.Second, ttl/5)), nil
}
