package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMemTotal(t *testing.T) {
	for _, tc := range []struct {
		name, meminfo string
		want          int64 // 0: an error
	}{
		{"linux", "MemTotal:       24684084 kB\nMemFree:         1234 kB\n", 24684084 << 10},
		{"not first", "Foo: 1 kB\nMemTotal: 2048 kB\n", 2 << 20},
		{"missing", "MemFree: 1 kB\n", 0},
		{"no unit", "MemTotal: 2048\n", 0},
		{"other unit", "MemTotal: 2048 MB\n", 0},
		{"not a number", "MemTotal: lots kB\n", 0},
		{"negative", "MemTotal: -1 kB\n", 0},
		{"overflows", "MemTotal: 99999999999999999 kB\n", 0},
		{"empty", "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := memTotal(strings.NewReader(tc.meminfo))
			if tc.want == 0 {
				assert.Error(t, err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

// machineMemory is this machine's MemTotal, in bytes.
func machineMemory(t *testing.T) int64 {
	t.Helper()
	f, err := os.Open(meminfoPath)
	require.NoError(t, err)
	defer f.Close()
	total, err := memTotal(f)
	require.NoError(t, err)
	return total
}

// TestCacheSizeAboveMemory: a --cache-size (or -o cache_size=) beyond the
// machine's memory, whose soft memory limit would be no limit at all, is a
// bad invocation, in the demo too; up to the memory it is taken.
func TestCacheSizeAboveMemory(t *testing.T) {
	total := machineMemory(t)
	pw := filepath.Join(t.TempDir(), "password")
	require.NoError(t, os.WriteFile(pw, []byte("pw\n"), 0o600))
	// Were the size taken, the mount would fail later (exit 1): nothing
	// listens at port 1.
	common := []string{"-f", "--username", "admin", "--password-file", pw, "--retries", "1", "--state-dir", t.TempDir(), "--cache-dir", t.TempDir()}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"100T", append(append([]string{}, common...), "--cache-size", "100T"), "--cache-size: 100.0 TiB is more than this machine's memory"},
		{"one byte more", append(append([]string{}, common...), "--cache-size", strconv.FormatInt(total+1, 10)), strconv.FormatInt(total+1, 10) + " bytes is more than this machine's memory (" + strconv.FormatInt(total, 10) + " bytes, MemTotal in /proc/meminfo)"},
		{"-o", append(append([]string{}, common...), "-o", "cache_size=100T"), "is more than this machine's memory"},
		// demo.go words its own message; the mountpoint does not exist, so
		// a size taken would fail there (exit 1).
		{"demo", []string{"demo", "--cache-size", "100T"}, "--cache-size"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mnt := t.TempDir()
			if tc.name == "demo" {
				mnt = filepath.Join(mnt, "missing")
			} else {
				tc.args = append(tc.args, "coriolis+https://127.0.0.1:1")
			}
			code, out := runVmexportfs(t, append(tc.args, mnt)...)
			assert.Equal(t, 2, code, out)
			t.Logf("the user reads: %s", lastLine(out))
			assert.Contains(t, lastLine(out), tc.want)
		})
	}
	for _, size := range []int64{4 << 20, total / 2, total} {
		_, err := parseMountArgs([]string{"--cache-size", strconv.FormatInt(size, 10), "coriolis+https://ovm:5544", "/mnt"}, platforms())
		assert.NoError(t, err, "--cache-size %d of %d", size, total)
	}
}
