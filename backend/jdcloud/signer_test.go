package jdcloud

import (
	"encoding/hex"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The public test vector of JD Cloud's signature document ("签名算法",
// section 签名步骤示例, docs.jdcloud.com/cn/common-declaration/api/
// authorization-rules; the same text is in jdcloud-sdk-signer's tests):
// AK TESTAK, SK TESTSK, 20190214T104514Z, region cn-north-1, service test,
// POST http://test.jdcloud-api.com/v1/resource:action?p1=p1&p0=p0&o=%&u=u,
// body "body data", signed headers x-jdcloud-date, x-jdcloud-nonce
// (testnonce), x-my-header (test) and x-my-header_blank (" blank") — and not
// host, which this example leaves out. Every intermediate value below is the
// document's.
const (
	vecCanonical = "POST\n/v1/resource%3Aaction\no=%25&p0=p0&p1=p1&u=u\n" +
		"x-jdcloud-date:20190214T104514Z\nx-jdcloud-nonce:testnonce\nx-my-header:test\nx-my-header_blank:blank\n\n" +
		"x-jdcloud-date;x-jdcloud-nonce;x-my-header;x-my-header_blank\n" +
		"e51832a118eeff7ad976d635b7d04538e362e4c21bd0f6253580b0a83a209074"
	vecStringToSign = "JDCLOUD2-HMAC-SHA256\n20190214T104514Z\n20190214/cn-north-1/test/jdcloud2_request\n" +
		"fb2e317056269590681d091f8eb22272967c0b922b2deda887312215ea4eed4c"
	vecKSigning      = "a4e50bcb6001be0008696b173c30172b5ce22a77db00d21c6a9d69de2ba33b7d"
	vecSignature     = "2a98f83c074e7bee260bfc8ef64f009c07595bd93f7f0c3f4e156bf6479ed9bf"
	vecAuthorization = "JDCLOUD2-HMAC-SHA256 Credential=TESTAK/20190214/cn-north-1/test/jdcloud2_request, " +
		"SignedHeaders=x-jdcloud-date;x-jdcloud-nonce;x-my-header;x-my-header_blank, Signature=" + vecSignature
)

var vecTime = time.Date(2019, 2, 14, 10, 45, 14, 0, time.UTC)

func TestSignatureStepsMatchTheDocumentedVector(t *testing.T) {
	assert.Equal(t, "o=%25&p0=p0&p1=p1&u=u", EncodeQuery(url.Values{"p1": {"p1"}, "p0": {"p0"}, "o": {"%"}, "u": {"u"}}))
	assert.Equal(t, "/v1/resource%3Aaction", EscapePath("/v1/resource:action"))
	assert.Equal(t, "e51832a118eeff7ad976d635b7d04538e362e4c21bd0f6253580b0a83a209074", payloadHash([]byte("body data")))

	// The document's step 3 shows each key of the chain.
	k := hmacSHA256([]byte("JDCLOUD2TESTSK"), "20190214")
	assert.Equal(t, "dbbdee87f18afeedd6456923587f5323b90c3a77fbc6e381b243c90c672d5daf", hex.EncodeToString(k))
	k = hmacSHA256(k, "cn-north-1")
	assert.Equal(t, "78e1da51757851329da8e31a6bad9f509c4816cacb8d5b2b9d171e49498ce4b6", hex.EncodeToString(k))
	k = hmacSHA256(k, "test")
	assert.Equal(t, "44050ec21c8e839f36ff5b2d44ec4a5876f4ffd6ef9a7a692a3eba40396bdb68", hex.EncodeToString(k))
	assert.Equal(t, vecKSigning, hex.EncodeToString(signingKey("TESTSK", "20190214", "cn-north-1", "test")))

	assert.Equal(t, vecStringToSign, stringToSign("20190214T104514Z", "20190214/cn-north-1/test/jdcloud2_request", vecCanonical))
	assert.Equal(t, vecSignature, signature(signingKey("TESTSK", "20190214", "cn-north-1", "test"), vecStringToSign))
}

// vectorRequest is the document's request as a Go client holds it before
// signing: no host (the example signs none), the query already sorted.
func vectorRequest() *http.Request {
	req := &http.Request{Method: http.MethodPost, Header: http.Header{},
		URL: &url.URL{Path: "/v1/resource:action", RawQuery: EncodeQuery(url.Values{"p1": {"p1"}, "p0": {"p0"}, "o": {"%"}, "u": {"u"}})}}
	req.Header.Set("x-my-header", "test")
	req.Header.Set("x-my-header_blank", " blank")
	return req
}

func TestSignProducesTheDocumentedAuthorization(t *testing.T) {
	req := vectorRequest()
	require.NoError(t, Sign(req, []byte("body data"), Credentials{AccessKey: "TESTAK", SecretKey: "TESTSK"}, "cn-north-1", "test", vecTime, "testnonce"))
	assert.Equal(t, vecAuthorization, req.Header.Get("Authorization"))
	assert.Equal(t, "20190214T104514Z", req.Header.Get(HeaderDate))
	assert.Equal(t, "testnonce", req.Header.Get(HeaderNonce))
	assert.Equal(t, "/v1/resource%3Aaction", req.URL.EscapedPath(), "the path on the wire is the one signed")

	// And the verifier accepts the document's request as it arrives.
	lookup := func(ak string) (string, bool) { return "TESTSK", ak == "TESTAK" }
	require.NoError(t, Verify(req, []byte("body data"), lookup, vecTime.Add(time.Minute), 0))
}

func TestSignSignsHostAndEveryHeaderButTheIgnoredOnes(t *testing.T) {
	req, err := http.NewRequest(http.MethodGet, "https://vm.jdcloud-api.com/v1/regions/cn-north-1/imageTasks?taskAction=ExportImage", nil)
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "vmexportfs")
	req.Header.Set(HeaderRequestID, "r-1")
	require.NoError(t, Sign(req, nil, Credentials{AccessKey: "AK", SecretKey: "SK", SessionToken: "tok"}, "cn-north-1", "vm", vecTime, "n-1"))
	auth := req.Header.Get("Authorization")
	assert.Contains(t, auth, "Credential=AK/20190214/cn-north-1/vm/jdcloud2_request, ")
	assert.Contains(t, auth, "SignedHeaders=content-type;host;x-jdcloud-date;x-jdcloud-nonce;x-jdcloud-security-token, ")
	assert.Equal(t, "tok", req.Header.Get(HeaderSecurityToken))

	// The same steps by hand: the empty body's hash, the raw query as sent.
	cr := "GET\n/v1/regions/cn-north-1/imageTasks\ntaskAction=ExportImage\n" +
		"content-type:application/json\nhost:vm.jdcloud-api.com\nx-jdcloud-date:20190214T104514Z\nx-jdcloud-nonce:n-1\nx-jdcloud-security-token:tok\n\n" +
		"content-type;host;x-jdcloud-date;x-jdcloud-nonce;x-jdcloud-security-token\n" +
		"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
	want := signature(signingKey("SK", "20190214", "cn-north-1", "vm"), stringToSign("20190214T104514Z", "20190214/cn-north-1/vm/jdcloud2_request", cr))
	assert.True(t, strings.HasSuffix(auth, "Signature="+want), auth)
}

func TestSignRefusesIncompleteInput(t *testing.T) {
	cred := Credentials{AccessKey: "AK", SecretKey: "super-secret-value"}
	for name, f := range map[string]func() error{
		"no secret": func() error { return Sign(vectorRequest(), nil, Credentials{AccessKey: "AK"}, "r", "s", vecTime, "n") },
		"no region": func() error { return Sign(vectorRequest(), nil, cred, "", "s", vecTime, "n") },
		"no nonce":  func() error { return Sign(vectorRequest(), nil, cred, "r", "s", vecTime, "") },
		"slash AK": func() error {
			return Sign(vectorRequest(), nil, Credentials{AccessKey: "A/K", SecretKey: "x"}, "r", "s", vecTime, "n")
		},
		"no request": func() error { return Sign(&http.Request{}, nil, cred, "r", "s", vecTime, "n") },
	} {
		err := f()
		require.Error(t, err, name)
		assert.NotContains(t, err.Error(), "super-secret-value")
	}
	assert.NotContains(t, cred.String(), "super-secret-value")
	assert.NotContains(t, cred.GoString(), "super-secret-value")
}

func signed(t *testing.T, body string) *http.Request {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, "https://127.0.0.1:8443/v1/regions/cn-east-2/images/img-1:exportImage?b=2&a=1", strings.NewReader(body))
	require.NoError(t, err)
	req.URL.RawQuery = EncodeQuery(req.URL.Query())
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Extra", "  two  spaces  ")
	require.NoError(t, Sign(req, []byte(body), Credentials{AccessKey: "AK1", SecretKey: "secret-one"}, "cn-east-2", "vm", vecTime, "nonce-1"))
	return req
}

func lookupAK1(ak string) (string, bool) { return "secret-one", ak == "AK1" }

func TestVerifyRoundTrip(t *testing.T) {
	req := signed(t, `{"roleName":"r"}`)
	require.NoError(t, Verify(req, []byte(`{"roleName":"r"}`), lookupAK1, vecTime, time.Minute))
	region, service, err := Scope(req.Header.Get("Authorization"))
	require.NoError(t, err)
	assert.Equal(t, []string{"cn-east-2", "vm"}, []string{region, service})

	// A header the signer did not see (the transport's Accept-Encoding) does
	// not matter; a User-Agent rewritten by a proxy does not either.
	req.Header.Set("Accept-Encoding", "gzip")
	req.Header.Set("User-Agent", "proxy/1")
	require.NoError(t, Verify(req, []byte(`{"roleName":"r"}`), lookupAK1, vecTime, time.Minute))
}

func TestVerifyRejectsTampering(t *testing.T) {
	body := `{"roleName":"r"}`
	for name, tc := range map[string]struct {
		mutate func(*http.Request)
		body   string
		now    time.Time
		want   error
	}{
		"method": {mutate: func(r *http.Request) { r.Method = http.MethodPut }, want: ErrSignatureMismatch},
		"path": {mutate: func(r *http.Request) {
			r.URL.Path = "/v1/regions/cn-east-2/images/img-2:exportImage"
			r.URL.RawPath = ""
		}, want: ErrSignatureMismatch},
		"query":                 {mutate: func(r *http.Request) { r.URL.RawQuery = "a=1&b=3" }, want: ErrSignatureMismatch},
		"query order":           {mutate: func(r *http.Request) { r.URL.RawQuery = "b=2&a=1" }, want: ErrSignatureMismatch},
		"header":                {mutate: func(r *http.Request) { r.Header.Set("Content-Type", "text/plain") }, want: ErrSignatureMismatch},
		"host":                  {mutate: func(r *http.Request) { r.Host = "evil.example:8443" }, want: ErrSignatureMismatch},
		"dropped signed header": {mutate: func(r *http.Request) { r.Header.Del("X-Extra") }, want: ErrSignatureMismatch},
		"body":                  {body: `{"roleName":"s"}`, want: ErrSignatureMismatch},
		"date":                  {mutate: func(r *http.Request) { r.Header.Set(HeaderDate, "20190214T104515Z") }, want: ErrSignatureMismatch},
		"nonce":                 {mutate: func(r *http.Request) { r.Header.Set(HeaderNonce, "nonce-2") }, want: ErrSignatureMismatch},
		"stale":                 {now: vecTime.Add(time.Hour), want: ErrRequestTime},
		"future":                {now: vecTime.Add(-time.Hour), want: ErrRequestTime},
		"unsigned":              {mutate: func(r *http.Request) { r.Header.Del("Authorization") }, want: ErrNoSignature},
		"other scheme": {mutate: func(r *http.Request) {
			r.Header.Set("Authorization", strings.Replace(r.Header.Get("Authorization"), "JDCLOUD2", "AWS4", 1))
		}, want: ErrMalformedAuth},
		"unknown key": {mutate: func(r *http.Request) {
			r.Header.Set("Authorization", strings.Replace(r.Header.Get("Authorization"), "Credential=AK1/", "Credential=AK2/", 1))
		}, want: ErrUnknownAccessKey},
		"other region": {mutate: func(r *http.Request) {
			r.Header.Set("Authorization", strings.Replace(r.Header.Get("Authorization"), "/cn-east-2/", "/cn-north-1/", 1))
		}, want: ErrSignatureMismatch},
		"nonce unsigned": {mutate: func(r *http.Request) {
			r.Header.Set("Authorization", strings.Replace(r.Header.Get("Authorization"), ";x-jdcloud-nonce", "", 1))
		}, want: ErrMalformedAuth},
		"unsorted signed headers": {mutate: func(r *http.Request) {
			r.Header.Set("Authorization", strings.Replace(r.Header.Get("Authorization"), "content-type;host", "host;content-type", 1))
		}, want: ErrMalformedAuth},
		"short signature": {mutate: func(r *http.Request) {
			a := r.Header.Get("Authorization")
			r.Header.Set("Authorization", a[:len(a)-2])
		}, want: ErrMalformedAuth},
	} {
		t.Run(name, func(t *testing.T) {
			req := signed(t, body)
			if tc.mutate != nil {
				tc.mutate(req)
			}
			b, now := body, vecTime
			if tc.body != "" {
				b = tc.body
			}
			if !tc.now.IsZero() {
				now = tc.now
			}
			err := Verify(req, []byte(b), lookupAK1, now, time.Minute)
			require.ErrorIs(t, err, tc.want)
			assert.NotContains(t, err.Error(), "secret-one")
		})
	}
}

func TestVerifyAcceptsAnUnescapedColon(t *testing.T) {
	// A client that sends ':' bare signed the canonical %3A all the same, so
	// the verifier re-escapes what it received.
	req := signed(t, "")
	req.URL.RawPath = ""
	require.NoError(t, Verify(req, nil, lookupAK1, vecTime, time.Minute))
}
