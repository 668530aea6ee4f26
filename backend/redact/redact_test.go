package redact

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const (
	password = `pa"ss w\ord/&?`
	jwtToken = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZG1pbiJ9.c2lnbmF0dXJl"
)

func newSecrets() *Secrets {
	s := &Secrets{}
	s.Add(password)
	s.AddRenewed("session-0123456789abcdef")
	return s
}

func TestString(t *testing.T) {
	s := newSecrets()
	for _, tc := range []struct{ name, in string }{
		{"raw", "login failed for " + password},
		{"json escaped", `{"password":"pa\"ss w\\ord/&?"}`},
		{"query escaped", "u?p=pa%22ss+w%5Cord%2F%26%3F"},
		{"path escaped", "/x/pa%22ss%20w%5Cord%2F&%3F"},
		{"renewed", "token session-0123456789abcdef expired"},
		{"unknown jwt", "Bearer " + jwtToken},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := s.String(tc.in)
			assert.Contains(t, out, Mask)
			assert.NotContains(t, out, "ss w")
			assert.NotContains(t, out, "session-0123")
			assert.NotContains(t, out, "eyJhbGci")
		})
	}
	assert.Equal(t, "nothing secret", s.String("nothing secret"))
}

func TestNilSecretsStillMasksJWTs(t *testing.T) {
	var s *Secrets
	s.Add("ignored")
	assert.Equal(t, "tok "+Mask, s.String("tok "+jwtToken))
}

func TestLongestFirst(t *testing.T) {
	s := &Secrets{}
	s.Add("abc")
	s.Add("abcdef")
	assert.Equal(t, Mask+" "+Mask, s.String("abcdef abc"))
}

func TestRenewedAreBounded(t *testing.T) {
	s := &Secrets{}
	s.Add("the-password")
	for i := range 1000 {
		s.AddRenewed(fmt.Sprintf("token-%04d", i))
	}
	assert.LessOrEqual(t, len(s.masks), maxRecent*3+3)
	assert.Equal(t, Mask, s.String("the-password"), "pinned secrets stay")
	assert.Equal(t, Mask, s.String("token-0999"), "the newest token is kept")
}

func TestPeer(t *testing.T) {
	s := newSecrets()
	body := []byte("error:\r\nfake log line level=ERROR\x1b[31m \u202eevil " + password + "\xff" + strings.Repeat("x", 2000))
	out := s.Peer(body)
	assert.LessOrEqual(t, len(out), PeerLimit)
	assert.NotContains(t, out, "\n")
	assert.NotContains(t, out, "\x1b")
	assert.NotContains(t, out, "\u202e")
	assert.NotContains(t, out, "ss w")
	assert.Contains(t, out, Mask)
	assert.True(t, strings.HasSuffix(out, "…"))

	// A secret split by a control character is still masked once the
	// character becomes a space.
	s2 := &Secrets{}
	s2.Add("two words")
	assert.Equal(t, Mask, s2.Peer([]byte("two\twords")))
}

func TestCutKeepsRunes(t *testing.T) {
	out := Cut(strings.Repeat("é", 300), 11)
	assert.LessOrEqual(t, len(out), 11)
	assert.True(t, strings.HasSuffix(out, "…"))
	assert.True(t, strings.HasPrefix(out, "éééé"))
	assert.Equal(t, "short", Cut("short", 11))
}

type stringer struct{}

func (stringer) String() string { return "stringer " + password }

func TestHandler(t *testing.T) {
	s := newSecrets()
	var buf bytes.Buffer
	log := slog.New(s.Handler(slog.NewTextHandler(&buf, nil)))
	log = log.With("preset", "with "+password).WithGroup("g")
	log.Error("message "+password,
		"err", fmt.Errorf("wrapped: %w", errors.New("login as admin with "+password)),
		"str", jwtToken,
		"any", stringer{},
		"bytes", []byte(password),
		slog.Group("inner", "x", "session-0123456789abcdef"),
		"n", 42)
	out := buf.String()
	require.NotEmpty(t, out)
	assert.NotContains(t, out, "ss w")
	assert.NotContains(t, out, "eyJhbGci")
	assert.NotContains(t, out, "session-0123")
	assert.Contains(t, out, "n=42")
	assert.Equal(t, 7, strings.Count(out, Mask), out)
}

func FuzzPeer(f *testing.F) {
	f.Add([]byte("ok"), "secret")
	f.Add([]byte("a\x00secret\nb"), "secret")
	f.Add([]byte("\xffsec\u202eret"), "sec")
	f.Fuzz(func(t *testing.T, body []byte, secret string) {
		s := &Secrets{}
		s.Add(secret)
		out := s.Peer(body)
		if len(out) > PeerLimit {
			t.Fatalf("%d bytes", len(out))
		}
		if len(secret) >= 4 && strings.Contains(out, secret) && !strings.Contains(Mask, secret) {
			t.Fatalf("secret %q in %q", secret, out)
		}
		for _, r := range out {
			if r < 0x20 || r == 0x7f {
				t.Fatalf("control character in %q", out)
			}
		}
	})
}
