package xapi

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/redact"
)

func TestSanitizeNonFinite(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`{"a":1}`, `{"a":1}`},
		{`{"a":NaN,"b":Infinity,"c":-Infinity}`, `{"a":null,"b":null,"c":null}`},
		{`{"s":"NaN Infinity -Infinity","t":[NaN]}`, `{"s":"NaN Infinity -Infinity","t":[null]}`},
		{`{"s":"a \"NaN\" b","x":Infinity}`, `{"s":"a \"NaN\" b","x":null}`},
		{`{"s":"ends with backslash \\","x":NaN}`, `{"s":"ends with backslash \\","x":null}`},
	} {
		assert.Equal(t, tc.want, string(sanitizeNonFinite([]byte(tc.in))), tc.in)
	}
}

func TestDecodeAnswer(t *testing.T) {
	secrets := &redact.Secrets{}
	secrets.Add("hunter2-password")
	for _, tc := range []struct {
		name     string
		raw      string
		want     any
		code     string
		sentinel error
	}{
		{"result", `{"jsonrpc":"2.0","result":"OpaqueRef:1","id":7}`, "OpaqueRef:1", "", nil},
		{"records with non-finite floats", `{"jsonrpc":"2.0","result":{"OpaqueRef:a":{"uuid":"u","memory_ratio":Infinity,"cpu":NaN}},"id":7}`, map[string]any{"OpaqueRef:a": map[string]any{"uuid": "u", "memory_ratio": nil, "cpu": nil}}, "", nil},
		{"session invalid", `{"jsonrpc":"2.0","error":{"code":1,"message":"SESSION_INVALID","data":["OpaqueRef:x"]},"id":7}`, nil, "SESSION_INVALID", backend.ErrUnavailable},
		{"handle invalid", `{"jsonrpc":"2.0","error":{"code":1,"message":"HANDLE_INVALID","data":["VDI","OpaqueRef:x"]},"id":7}`, nil, "HANDLE_INVALID", backend.ErrNotFound},
		{"auth failed echoing the password", `{"jsonrpc":"2.0","error":{"code":1,"message":"SESSION_AUTHENTICATION_FAILED","data":["root","hunter2-password"]},"id":7}`, nil, "SESSION_AUTHENTICATION_FAILED", backend.ErrPermission},
		{"method unknown", `{"jsonrpc":"2.0","error":{"code":1,"message":"MESSAGE_METHOD_UNKNOWN","data":["VDI.enable_cbt"]},"id":7}`, nil, "MESSAGE_METHOD_UNKNOWN", backend.ErrUnsupported},
		{"wrong id", `{"jsonrpc":"2.0","result":"x","id":8}`, nil, "", backend.ErrUnavailable},
		{"string id", `{"jsonrpc":"2.0","result":"x","id":"7"}`, nil, "", backend.ErrUnavailable},
		{"neither", `{"jsonrpc":"2.0","id":7}`, nil, "", backend.ErrUnavailable},
		{"not json", `<html>502</html>`, nil, "", backend.ErrUnavailable},
		{"result of the wrong type", `{"jsonrpc":"2.0","result":{"a":1},"id":7}`, nil, "", backend.ErrUnavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out any
			if s, ok := tc.want.(string); ok {
				var str string
				require.NoError(t, decodeAnswer([]byte(tc.raw), 7, &str, secrets))
				assert.Equal(t, s, str)
				return
			}
			if tc.want != nil {
				require.NoError(t, decodeAnswer([]byte(tc.raw), 7, &out, secrets))
				assert.Equal(t, tc.want, out)
				return
			}
			var str string
			err := decodeAnswer([]byte(tc.raw), 7, &str, secrets)
			require.Error(t, err)
			assert.ErrorIs(t, err, tc.sentinel)
			assert.NotContains(t, err.Error(), "hunter2-password")
			var apiErr *APIError
			if tc.code != "" {
				require.True(t, errors.As(err, &apiErr))
				assert.Equal(t, tc.code, apiErr.Code)
			} else {
				assert.False(t, errors.As(err, &apiErr), "a transport failure is not the server's XenAPI failure")
			}
		})
	}
}

func TestDecodeBitmap(t *testing.T) {
	const blk = cbtBlock
	size := int64(20*blk + 100) // 21 blocks, the last partial: 3 bytes
	bits := []byte{0b1000_0001, 0b0000_0000, 0b0000_1000}
	m, err := decodeBitmap(base64.StdEncoding.EncodeToString(bits), size)
	require.NoError(t, err)
	want, err := extent.Normalize([]extent.Extent{{Off: 0, Len: blk}, {Off: 7 * blk, Len: blk}, {Off: 20 * blk, Len: 100}}, size)
	require.NoError(t, err)
	assert.Equal(t, want.Format(), m.Format())

	run, err := decodeBitmap(base64.StdEncoding.EncodeToString([]byte{0xff, 0xff, 0xf8}), size)
	require.NoError(t, err)
	assert.Equal(t, extent.Full(size).Format(), run.Format(), "neighbouring blocks are one extent")

	for name, enc := range map[string]string{
		"short":    base64.StdEncoding.EncodeToString([]byte{0xff}),
		"not b64":  "!!!!",
		"too long": base64.StdEncoding.EncodeToString(make([]byte, 3+8192)),
	} {
		_, err := decodeBitmap(enc, size)
		assert.ErrorIs(t, err, backend.ErrUnavailable, name)
	}
}

func TestDeviceName(t *testing.T) {
	for in, want := range map[string]string{"0": "xvda", "1": "xvdb", "25": "xvdz", "26": "xvdaa", "27": "xvdab", "x": "disk-x"} {
		assert.Equal(t, want, deviceName(in), in)
	}
}

func TestRecordsDecode(t *testing.T) {
	var vdis map[string]vdiRecord
	raw := `{"OpaqueRef:1":{"uuid":"u1","virtual_size":"4194304","snapshot_time":"20261201T13:48:15Z","cbt_enabled":true},
	         "OpaqueRef:2":{"uuid":"u2","virtual_size":2097152,"snapshot_time":"19700101T00:00:00Z"}}`
	require.NoError(t, json.Unmarshal([]byte(raw), &vdis))
	assert.EqualValues(t, 4194304, vdis["OpaqueRef:1"].VirtualSize)
	assert.EqualValues(t, 2097152, vdis["OpaqueRef:2"].VirtualSize)
	assert.Equal(t, "2026-12-01T13:48:15Z", vdis["OpaqueRef:1"].SnapshotTime.Format("2006-01-02T15:04:05Z07:00"))
	assert.True(t, vdis["OpaqueRef:2"].SnapshotTime.IsZero(), "the epoch is no date")
	assert.Error(t, json.Unmarshal([]byte(`{"a":{"virtual_size":"12x"}}`), &vdis))
	assert.True(t, strings.HasPrefix(deviceName("3"), "xvd"))
}
