package httprange

import (
	"encoding/json"
	"slices"
	"strings"
)

// messageFields are where the platforms' JSON error answers say what went
// wrong, in the order a person reads them: Coriolis {"error", "details"},
// an SSO or OAuth token endpoint (oVirt) {"error", "error_description"}, a
// Kubernetes Status {"message", "reason"}, an oVirt engine fault {"reason",
// "detail"}, and JD Cloud's {"error": {"message"}} one level down.
var messageFields = []string{"error", "message", "reason", "error_description", "details", "detail"}

// serverMessage is what a JSON error answer says, its fields joined with
// ": ", or "" when the body is not a JSON object that says anything. The
// caller makes it safe (redact's Peer): decoding undoes the escapes that
// kept control characters, and a secret spelled with \u escapes, out of
// sight.
func serverMessage(body []byte) string {
	var doc map[string]any
	if json.Unmarshal(body, &doc) != nil {
		return ""
	}
	return strings.Join(messageWords(doc, nil, true), ": ")
}

func messageWords(doc map[string]any, words []string, top bool) []string {
	for _, key := range messageFields {
		switch v := doc[key].(type) {
		case string:
			if v = strings.TrimSpace(v); v != "" && !slices.Contains(words, v) {
				words = append(words, v)
			}
		case map[string]any:
			if top {
				words = messageWords(v, words, false)
			}
		}
	}
	return words
}
