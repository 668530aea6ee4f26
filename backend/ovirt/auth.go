package ovirt

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
	"github.com/vmexportfs/vmexportfs/backend/redact"
)

// ssoAuth gets the engine's SSO bearer tokens. The engine has no refresh:
// httprange's TokenAuth asks for a new token after a 401.
type ssoAuth struct {
	sso     *httprange.Client // no Auth: it makes the credentials
	url     string            // https://ENGINE/ovirt-engine/sso/oauth/token
	user    string
	pass    string
	logger  *slog.Logger
	secrets *redact.Secrets
}

// ssoAnswer is the token endpoint's answer: the token, or an error (400
// with error_code and error; older engines error_description).
type ssoAnswer struct {
	AccessToken      string `json:"access_token"`
	TokenType        string `json:"token_type"`
	Error            string `json:"error"`
	ErrorCode        string `json:"error_code"`
	ErrorDescription string `json:"error_description"`
}

// Login asks the SSO for a token.
func (a *ssoAuth) Login(ctx context.Context) (string, time.Time, error) {
	form := url.Values{"grant_type": {"password"}, "scope": {"ovirt-app-api"}, "username": {a.user}, "password": {a.pass}}.Encode()
	resp, err := a.sso.Do(ctx, func(ctx context.Context) (*http.Request, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, a.url, strings.NewReader(form))
		if err != nil {
			return nil, err
		}
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("Accept", "application/json") // exactly this, or the engine answers HTML
		req.Header.Set("Idempotency-Key", "sso")     // a second token is harmless
		return req, nil
	})
	if err != nil {
		var se *httprange.StatusError
		if errors.As(err, &se) && se.Code == http.StatusBadRequest {
			// The engine's SSO answers a wrong password with a 400.
			return "", time.Time{}, fmt.Errorf("ovirt: log in as %q: %w: %s", a.user, backend.ErrPermission, cmp.Or(se.Message, se.Text))
		}
		return "", time.Time{}, fmt.Errorf("ovirt: log in as %q: %w", a.user, err)
	}
	defer resp.Body.Close()
	var ans ssoAnswer
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&ans); err != nil {
		return "", time.Time{}, fmt.Errorf("ovirt: log in: %w: unreadable SSO answer", backend.ErrUnavailable)
	}
	a.secrets.AddRenewed(ans.AccessToken)
	if ans.AccessToken == "" {
		reason := ans.Error
		if ans.ErrorDescription != "" {
			reason = ans.ErrorDescription
		}
		return "", time.Time{}, fmt.Errorf("ovirt: log in as %q: %w: %s", a.user, backend.ErrPermission, a.secrets.Peer([]byte(reason)))
	}
	a.logger.Debug("ovirt: logged in", "user", a.user)
	return ans.AccessToken, time.Time{}, nil
}
