package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestLogFormatJSON: with --log-format json every line the daemon logs is
// one JSON object with a time, a level and a message, and none holds the
// password or a token, through a mount, a copy and an unmount.
func TestLogFormatJSON(t *testing.T) {
	requireTools(t, "cp")
	f, sid, source := copyFixture(t)
	m := f.mount("--log-format", "json", "--log-level", "debug")
	out := filepath.Join(t.TempDir(), "copy")
	tool(t, "cp", "--sparse=always", m.path("vms", copyVM, "snapshots", sid, "disk.img"), out)
	assert.Equal(t, sha256File(t, source), sha256File(t, out))
	m.stop(t)
	lines := strings.Split(strings.TrimSpace(m.logs.String()), "\n")
	require.Greater(t, len(lines), 3, "the daemon logged")
	for _, line := range lines {
		var rec map[string]any
		require.NoError(t, json.Unmarshal([]byte(line), &rec), "not one JSON object: %q", line)
		for _, key := range []string{"time", "level", "msg"} {
			assert.Contains(t, rec, key, "%q", line)
		}
		assert.NotContains(t, line, simPassword)
		assert.NotContains(t, line, "eyJ", "a JWT in the log")
	}
}
