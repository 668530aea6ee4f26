// Package redact is the one place where text that a peer controls is made fit
// to print. A server's error body, a decoder's message quoting its input, a
// name from a listing: any of it may reach an error, stderr or the log, and a
// hostile server can put our own password or token into it. Secrets holds
// every secret the process knows (passwords, tokens, JWTs, session ids,
// access keys), and each path to the outside world (the log handler, the
// command's error line, the excerpt of a server's answer) passes through it.
package redact

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"log/slog"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"unicode"
	"unicode/utf8"
)

// Mask replaces every secret found.
const Mask = "[redacted]"

// PeerLimit bounds, in bytes, the excerpt of a peer's text kept for a message.
const PeerLimit = 512

// maxRecent bounds the renewed secrets kept: a long mount logs in again every
// token lifetime, and an old token is expired, so the newest are what matter.
const maxRecent = 64

// jwtPattern matches any JWT, known or not: a server may echo a token it
// issued to someone else, or one we never saw.
var jwtPattern = regexp.MustCompile(`eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*`)

// Secrets is the set of secrets to keep out of text; the zero value is ready
// and a nil *Secrets still masks JWTs and strips control characters. Safe for
// concurrent use.
type Secrets struct {
	mu     sync.RWMutex
	pinned []string // given at start (passwords): kept for the process's life
	recent []string // learned later (tokens): the newest maxRecent
	masks  []string // pinned and recent, longest first
}

// Add registers a secret given at start, such as a password.
func (s *Secrets) Add(secret string) { s.add(secret, true) }

// AddRenewed registers a secret learned while running, such as a token from a
// login; only the newest ones are kept.
func (s *Secrets) AddRenewed(secret string) { s.add(secret, false) }

func (s *Secrets) add(secret string, pinned bool) {
	if s == nil || secret == "" {
		return
	}
	forms := spellings(secret)
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range forms {
		if contains(s.pinned, f) || contains(s.recent, f) {
			continue
		}
		if pinned {
			s.pinned = append(s.pinned, f)
			continue
		}
		s.recent = append(s.recent, f)
		if len(s.recent) > maxRecent*3 {
			s.recent = append([]string(nil), s.recent[len(s.recent)-maxRecent*3:]...)
		}
	}
	s.masks = append(append(s.masks[:0], s.pinned...), s.recent...)
	// Longest first, so that a secret containing another is masked whole.
	slices.SortStableFunc(s.masks, func(a, b string) int { return cmp.Compare(len(b), len(a)) })
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// spellings are the forms a secret takes when a server echoes it back: as
// sent, escaped inside JSON, and escaped in a URL.
func spellings(secret string) []string {
	forms := []string{secret}
	for _, html := range []bool{true, false} {
		var b bytes.Buffer
		enc := json.NewEncoder(&b)
		enc.SetEscapeHTML(html)
		if enc.Encode(secret) == nil {
			quoted := strings.TrimSuffix(b.String(), "\n")
			forms = append(forms, quoted[1:len(quoted)-1])
		}
	}
	forms = append(forms, url.QueryEscape(secret), url.PathEscape(secret))
	out := forms[:0]
	for _, f := range forms {
		if f != "" && !contains(out, f) {
			out = append(out, f)
		}
	}
	return out
}

// String returns text with every known secret, and anything shaped like a
// JWT, replaced by Mask.
func (s *Secrets) String(text string) string {
	if s != nil {
		s.mu.RLock()
		for _, sec := range s.masks {
			if strings.Contains(text, sec) {
				text = strings.ReplaceAll(text, sec, Mask)
			}
		}
		s.mu.RUnlock()
	}
	if strings.Contains(text, "eyJ") {
		text = jwtPattern.ReplaceAllString(text, Mask)
	}
	return text
}

// Peer makes a peer's bytes fit for a message: valid UTF-8, no control or
// bidirectional-override characters (they could forge log lines or hide
// text), secrets masked, and at most PeerLimit bytes.
func (s *Secrets) Peer(b []byte) string {
	text := s.String(strings.ToValidUTF8(string(b), "?"))
	// Masking before the control characters go catches a secret that holds
	// one; masking again catches one that a peer split with a control
	// character that became a space.
	text = strings.TrimSpace(s.String(strings.Map(printable, text)))
	return Cut(text, PeerLimit)
}

func printable(r rune) rune {
	switch {
	case r == '\n' || r == '\r' || r == '\t':
		return ' '
	case unicode.IsControl(r), unicode.Is(unicode.Bidi_Control, r), r == utf8.RuneError:
		return '?'
	}
	return r
}

// Cut shortens text to at most limit bytes on a rune boundary, marking the cut.
func Cut(text string, limit int) string {
	if len(text) <= limit {
		return text
	}
	const more = "…"
	end := max(limit-len(more), 0)
	for end > 0 && !utf8.RuneStart(text[end]) {
		end--
	}
	return text[:end] + more
}

// Handler wraps a log handler so that no record it writes carries a secret:
// the message, string values, errors and anything else printed are masked.
func (s *Secrets) Handler(next slog.Handler) slog.Handler {
	return &handler{next: next, s: s}
}

type handler struct {
	next slog.Handler
	s    *Secrets
}

func (h *handler) Enabled(ctx context.Context, level slog.Level) bool {
	return h.next.Enabled(ctx, level)
}

func (h *handler) Handle(ctx context.Context, r slog.Record) error {
	out := slog.NewRecord(r.Time, r.Level, h.s.String(r.Message), r.PC)
	r.Attrs(func(a slog.Attr) bool {
		out.AddAttrs(h.attr(a))
		return true
	})
	return h.next.Handle(ctx, out)
}

func (h *handler) WithAttrs(attrs []slog.Attr) slog.Handler {
	masked := make([]slog.Attr, len(attrs))
	for i, a := range attrs {
		masked[i] = h.attr(a)
	}
	return &handler{next: h.next.WithAttrs(masked), s: h.s}
}

func (h *handler) WithGroup(name string) slog.Handler {
	return &handler{next: h.next.WithGroup(h.s.String(name)), s: h.s}
}

func (h *handler) attr(a slog.Attr) slog.Attr {
	key := h.s.String(a.Key)
	v := a.Value.Resolve()
	switch v.Kind() {
	case slog.KindString:
		return slog.String(key, h.s.String(v.String()))
	case slog.KindGroup:
		group := v.Group()
		masked := make([]slog.Attr, len(group))
		for i, g := range group {
			masked[i] = h.attr(g)
		}
		return slog.Attr{Key: key, Value: slog.GroupValue(masked...)}
	case slog.KindAny:
		if b, ok := v.Any().([]byte); ok {
			// Printed as numbers, a secret would pass unseen.
			return slog.String(key, h.s.String(string(b)))
		}
		// Errors, Stringers, structs: whatever the handler would print
		// is what gets masked.
		return slog.String(key, h.s.String(v.String()))
	}
	return slog.Attr{Key: key, Value: v}
}
