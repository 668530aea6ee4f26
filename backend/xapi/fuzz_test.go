package xapi

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/vmexportfs/vmexportfs/backend/redact"
)

// FuzzDecodeAnswer feeds the JSON-RPC decoder what a hostile server could
// send: it must never panic, and a failure must never be a success.
func FuzzDecodeAnswer(f *testing.F) {
	for _, seed := range []string{
		`{"jsonrpc":"2.0","result":"OpaqueRef:1","id":1}`,
		`{"jsonrpc":"2.0","result":{"OpaqueRef:a":{"uuid":"u","virtual_size":"4194304","VBDs":["OpaqueRef:b"],"x":-Infinity}},"id":1}`,
		`{"jsonrpc":"2.0","error":{"code":1,"message":"SESSION_INVALID","data":["OpaqueRef:x"]},"id":1}`,
		`{"jsonrpc":"2.0","result":"\"NaN\\","id":1}`,
		`{"result":NaN,"id":1}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		clean := sanitizeNonFinite(raw)
		if json.Valid(raw) && !bytes.Equal(clean, raw) && !bytes.Contains(raw, []byte("NaN")) && !bytes.Contains(raw, []byte("Infinity")) {
			t.Fatalf("valid JSON without non-finite literals was changed")
		}
		var vms map[string]vmRecord
		err := decodeAnswer(raw, 1, &vms, &redact.Secrets{})
		if err == nil && !json.Valid(clean) {
			t.Fatalf("accepted an answer that is not JSON even after sanitizing: %q", raw)
		}
		var s string
		_ = decodeAnswer(raw, 1, &s, nil)
	})
}
