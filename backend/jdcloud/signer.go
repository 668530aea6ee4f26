// Package jdcloud holds the pieces of the JD Cloud OpenAPI that the jdcloud
// backend needs: the JDCLOUD2-HMAC-SHA256 request signer (JD Cloud's Go SDK
// is not served by the module proxy, so it is written here from
// jdcloud-sdk-go core/Signer.go and the public signature document) and the
// JSON shapes of the vm service's image and image-task answers.
package jdcloud

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"
)

// Algorithm names the signing scheme in Authorization and the string to sign.
const Algorithm = "JDCLOUD2-HMAC-SHA256"

// The headers the signer sets.
const (
	HeaderDate          = "X-Jdcloud-Date"
	HeaderNonce         = "X-Jdcloud-Nonce"
	HeaderSecurityToken = "X-Jdcloud-Security-Token"
	HeaderRequestID     = "X-Jdcloud-Request-Id"
)

const (
	// TimeFormat is x-jdcloud-date: ISO 8601 basic, UTC.
	TimeFormat = "20060102T150405Z"
	dateFormat = "20060102"
	terminator = "jdcloud2_request"
	// DefaultSkew is how far a request's x-jdcloud-date may be from the
	// verifier's clock when Verify is given no skew: AWS SigV4's 15 minutes,
	// which JDCLOUD2 derives from (JD Cloud documents no figure).
	DefaultSkew = 15 * time.Minute
)

// unsignedHeaders are left out of the signature exactly as the SDK leaves
// them out: proxies and transports rewrite User-Agent, and Authorization
// carries the signature itself. Canonical header keys.
var unsignedHeaders = []string{"Authorization", "User-Agent", HeaderRequestID}

// Errors Verify wraps, so a server can tell a missing signature from a wrong
// one without matching message text.
var (
	ErrNoSignature       = errors.New("jdcloud: request is not signed")
	ErrMalformedAuth     = errors.New("jdcloud: malformed JDCLOUD2 authorization")
	ErrUnknownAccessKey  = errors.New("jdcloud: unknown access key")
	ErrSignatureMismatch = errors.New("jdcloud: signature does not match")
	ErrRequestTime       = errors.New("jdcloud: request time too skewed")
)

// Credentials are an access key pair, with the STS session token when the
// pair is temporary.
type Credentials struct {
	AccessKey    string
	SecretKey    string
	SessionToken string
}

// String keeps the secret and the token out of logs and %v.
func (c Credentials) String() string {
	return fmt.Sprintf("jdcloud.Credentials{AccessKey: %q, SecretKey: <redacted>, SessionToken: <%d bytes>}", c.AccessKey, len(c.SessionToken))
}

// GoString keeps the secret out of %#v too.
func (c Credentials) GoString() string { return c.String() }

// Sign sets x-jdcloud-date (now, in UTC), x-jdcloud-nonce, the security token
// when cred has one, and Authorization on req, for a body of exactly body
// (nil for none). It signs host and every header already on req except
// Authorization, User-Agent and X-Jdcloud-Request-Id, so headers meant to be
// signed (Content-Type) must be set before. req.URL's path is rewritten to
// its canonical escaping (':' as %3A, as the SDK sends it) so that the path
// on the wire is the one signed; the query is signed as the raw string that
// is sent, so callers send it sorted (EncodeQuery) as the SDK does.
func Sign(req *http.Request, body []byte, cred Credentials, region, service string, now time.Time, nonce string) error {
	switch {
	case req == nil || req.URL == nil:
		return errors.New("jdcloud sign: no request URL")
	case cred.AccessKey == "" || cred.SecretKey == "":
		return errors.New("jdcloud sign: access key and secret key are required")
	case region == "" || service == "":
		return errors.New("jdcloud sign: region and service are required")
	case nonce == "":
		return errors.New("jdcloud sign: nonce is required")
	case strings.ContainsAny(cred.AccessKey, "/, \t\r\n"):
		// The access key is a field of the Credential scope.
		return errors.New("jdcloud sign: access key has a separator character")
	}
	if req.Header == nil {
		req.Header = make(http.Header)
	}
	req.Header.Del("Authorization")
	stamp := now.UTC().Format(TimeFormat)
	req.Header.Set(HeaderDate, stamp)
	req.Header.Set(HeaderNonce, nonce)
	if cred.SessionToken != "" {
		req.Header.Set(HeaderSecurityToken, cred.SessionToken)
	} else {
		req.Header.Del(HeaderSecurityToken)
	}
	path := EscapePath(req.URL.Path)
	req.URL.RawPath = path
	if req.URL.Path == "" {
		path = "/"
	}

	names := []string{}
	if host := requestHost(req); host != "" {
		names = append(names, "host")
	}
	for k := range req.Header {
		if slices.Contains(unsignedHeaders, http.CanonicalHeaderKey(k)) {
			continue
		}
		lk := strings.ToLower(k)
		if !slices.Contains(names, lk) {
			names = append(names, lk)
		}
	}
	slices.Sort(names)
	canonHeaders := canonicalHeaders(req, names)
	scope := strings.Join([]string{stamp[:8], region, service, terminator}, "/")
	cr := canonicalRequest(req.Method, path, req.URL.RawQuery, canonHeaders, strings.Join(names, ";"), payloadHash(body))
	sig := signature(signingKey(cred.SecretKey, stamp[:8], region, service), stringToSign(stamp, scope, cr))
	req.Header.Set("Authorization", Algorithm+" Credential="+cred.AccessKey+"/"+scope+
		", SignedHeaders="+strings.Join(names, ";")+", Signature="+sig)
	return nil
}

// Verify checks req's JDCLOUD2 signature over body, as the API gateway does:
// the headers listed in SignedHeaders (which must include x-jdcloud-date,
// x-jdcloud-nonce and, when sent, the security token), the path, the raw
// query and the payload hash, with the secret lookup returns for the access
// key. The date must be within skew of now (DefaultSkew when skew ≤ 0).
// Errors wrap the Err* values above and never carry the secret.
func Verify(req *http.Request, body []byte, lookup func(accessKey string) (secret string, ok bool), now time.Time, skew time.Duration) error {
	if req == nil || req.URL == nil {
		return fmt.Errorf("jdcloud verify: %w", ErrNoSignature)
	}
	if skew <= 0 {
		skew = DefaultSkew
	}
	auth := req.Header.Get("Authorization")
	if auth == "" {
		return fmt.Errorf("jdcloud verify: %w", ErrNoSignature)
	}
	a, err := parseAuthorization(auth)
	if err != nil {
		return fmt.Errorf("jdcloud verify: %w", err)
	}
	stamp := req.Header.Get(HeaderDate)
	t, err := time.Parse(TimeFormat, stamp)
	if err != nil {
		return fmt.Errorf("jdcloud verify: x-jdcloud-date %q: %w", stamp, ErrMalformedAuth)
	}
	if a.date != stamp[:8] {
		return fmt.Errorf("jdcloud verify: credential date %s is not the request date %s: %w", a.date, stamp[:8], ErrSignatureMismatch)
	}
	if d := now.Sub(t); d > skew || d < -skew {
		return fmt.Errorf("jdcloud verify: request time %s is %s from now: %w", stamp, d.Round(time.Second), ErrRequestTime)
	}
	for _, must := range []string{"x-jdcloud-date", "x-jdcloud-nonce"} {
		if !slices.Contains(a.signed, must) {
			return fmt.Errorf("jdcloud verify: %s is not signed: %w", must, ErrMalformedAuth)
		}
	}
	if req.Header.Get(HeaderNonce) == "" {
		return fmt.Errorf("jdcloud verify: no x-jdcloud-nonce: %w", ErrMalformedAuth)
	}
	if req.Header.Get(HeaderSecurityToken) != "" && !slices.Contains(a.signed, "x-jdcloud-security-token") {
		return fmt.Errorf("jdcloud verify: x-jdcloud-security-token is not signed: %w", ErrMalformedAuth)
	}
	for _, h := range a.signed {
		if h != "host" && len(req.Header.Values(h)) == 0 {
			return fmt.Errorf("jdcloud verify: signed header %s is absent: %w", h, ErrSignatureMismatch)
		}
	}
	secret, ok := lookup(a.accessKey)
	if !ok {
		return fmt.Errorf("jdcloud verify: access key %q: %w", a.accessKey, ErrUnknownAccessKey)
	}
	path := EscapePath(req.URL.Path)
	if path == "" {
		path = "/"
	}
	scope := strings.Join([]string{a.date, a.region, a.service, terminator}, "/")
	cr := canonicalRequest(req.Method, path, req.URL.RawQuery, canonicalHeaders(req, a.signed), strings.Join(a.signed, ";"), payloadHash(body))
	want := signature(signingKey(secret, a.date, a.region, a.service), stringToSign(stamp, scope, cr))
	if !hmac.Equal([]byte(want), []byte(a.signature)) {
		return fmt.Errorf("jdcloud verify: access key %q: %w", a.accessKey, ErrSignatureMismatch)
	}
	return nil
}

// Scope returns the region and service of a JDCLOUD2 Authorization value,
// so a server can check that a request was signed for it.
func Scope(authorization string) (region, service string, err error) {
	a, err := parseAuthorization(authorization)
	if err != nil {
		return "", "", err
	}
	return a.region, a.service, nil
}

type authorization struct {
	accessKey, date, region, service string
	signed                           []string
	signature                        string
}

// parseAuthorization reads "JDCLOUD2-HMAC-SHA256 Credential=AK/date/region/
// service/jdcloud2_request, SignedHeaders=a;b, Signature=hex".
func parseAuthorization(s string) (authorization, error) {
	var a authorization
	rest, ok := strings.CutPrefix(s, Algorithm+" ")
	if !ok {
		return a, ErrMalformedAuth
	}
	var cred, signed string
	for part := range strings.SplitSeq(rest, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return a, ErrMalformedAuth
		}
		switch k {
		case "Credential":
			cred = v
		case "SignedHeaders":
			signed = v
		case "Signature":
			a.signature = v
		default:
			return a, ErrMalformedAuth
		}
	}
	f := strings.Split(cred, "/")
	if len(f) != 5 || f[0] == "" || f[4] != terminator || f[2] == "" || f[3] == "" {
		return a, ErrMalformedAuth
	}
	if _, err := time.Parse(dateFormat, f[1]); err != nil {
		return a, ErrMalformedAuth
	}
	a.accessKey, a.date, a.region, a.service = f[0], f[1], f[2], f[3]
	if len(a.signature) != 2*sha256.Size {
		return a, ErrMalformedAuth
	}
	if _, err := hex.DecodeString(a.signature); err != nil {
		return a, ErrMalformedAuth
	}
	if signed == "" {
		return a, ErrMalformedAuth
	}
	a.signed = strings.Split(signed, ";")
	// Sorted, lower case and without repeats, as a signer writes them: any
	// other order would name the same headers yet hash differently.
	for i, h := range a.signed {
		if h == "" || h != strings.ToLower(h) || (i > 0 && a.signed[i-1] >= h) {
			return a, ErrMalformedAuth
		}
	}
	return a, nil
}

func requestHost(req *http.Request) string {
	if req.Host != "" {
		return req.Host
	}
	return req.URL.Host
}

// canonicalHeaders is "name:value" per name, in the given (sorted) order,
// joined by newlines. Values are trimmed and inner runs of spaces squeezed,
// repeated headers joined by commas, as the SDK's stripExcessSpaces does;
// the trimming is per value because a Go server has already trimmed each
// value it received, and the public example expects " blank" as "blank".
func canonicalHeaders(req *http.Request, names []string) string {
	lines := make([]string, len(names))
	for i, n := range names {
		var v string
		if n == "host" {
			v = squeeze(requestHost(req))
		} else {
			vals := req.Header.Values(n)
			sq := make([]string, len(vals))
			for j, x := range vals {
				sq[j] = squeeze(x)
			}
			v = strings.Join(sq, ",")
		}
		lines[i] = n + ":" + v
	}
	return strings.Join(lines, "\n")
}

func squeeze(s string) string {
	s = strings.Trim(s, " \t")
	for strings.Contains(s, "  ") {
		s = strings.ReplaceAll(s, "  ", " ")
	}
	return s
}

func canonicalRequest(method, path, query, headers, signed, bodyHash string) string {
	return strings.Join([]string{method, path, query, headers + "\n", signed, bodyHash}, "\n")
}

func stringToSign(stamp, scope, canonical string) string {
	h := sha256.Sum256([]byte(canonical))
	return strings.Join([]string{Algorithm, stamp, scope, hex.EncodeToString(h[:])}, "\n")
}

func signingKey(secret, date, region, service string) []byte {
	k := hmacSHA256([]byte("JDCLOUD2"+secret), date)
	k = hmacSHA256(k, region)
	k = hmacSHA256(k, service)
	return hmacSHA256(k, terminator)
}

func signature(key []byte, sts string) string { return hex.EncodeToString(hmacSHA256(key, sts)) }

func hmacSHA256(key []byte, data string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(data))
	return m.Sum(nil)
}

func payloadHash(body []byte) string {
	h := sha256.Sum256(body)
	return hex.EncodeToString(h[:])
}

// EscapePath escapes a path as the SDK's EscapePath(path, false) does:
// every byte but the RFC 3986 unreserved characters and '/' as %XX, so the
// ':' of "images/img-x:exportImage" goes out as %3A.
func EscapePath(p string) string { return escape(p, true) }

// EncodeQuery is the query string the SDK sends: parameters sorted by name
// and then value, names and values escaped as in EscapePath (a space as
// %20, never '+'), so the raw query signed is also canonical.
func EncodeQuery(v url.Values) string {
	keys := make([]string, 0, len(v))
	for k := range v {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for _, k := range keys {
		vals := slices.Clone(v[k])
		slices.Sort(vals)
		for _, x := range vals {
			if b.Len() > 0 {
				b.WriteByte('&')
			}
			b.WriteString(escape(k, false))
			b.WriteByte('=')
			b.WriteString(escape(x, false))
		}
	}
	return b.String()
}

func escape(s string, keepSlash bool) string {
	const hexDigits = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if unreserved(c) || (c == '/' && keepSlash) {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hexDigits[c>>4])
		b.WriteByte(hexDigits[c&15])
	}
	return b.String()
}

func unreserved(c byte) bool {
	return 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~'
}
