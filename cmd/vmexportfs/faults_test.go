package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/faultproxy"
)

// faultCopiesEnv sets the faulted copies per view (default 50).
const faultCopiesEnv = "VMEXPORTFS_FAULT_COPIES"

// faultWords are what the log must say when a fault made a read fail.
var faultWords = map[faultproxy.Fault][]string{
	faultproxy.Reset:        {"connection reset", "short body", "EOF"},
	faultproxy.Stall:        {"deadline exceeded", "timeout"},
	faultproxy.ServerError:  {"503"},
	faultproxy.ShortBody:    {"short body", "EOF"},
	faultproxy.IgnoreRange:  {"ignored Range"},
	faultproxy.WrongRange:   {"Content-Range mismatch"},
	faultproxy.Unauthorized: {"401"},
	faultproxy.Restart:      {"connection reset", "EOF", "refused"},
	// A hostile server's tricks.
	faultproxy.GzipEncoding:   {"on a Range answer"}, // Content-Encoding "gzip" on a Range answer
	faultproxy.Multipart:      {"multipart answer"},
	faultproxy.WrongTotal:     {"Content-Range total mismatch"},
	faultproxy.Unsatisfiable:  {"status 416"},
	faultproxy.RedirectHTTP:   {"redirect refused"},
	faultproxy.RedirectOrigin: {"redirect refused"},
	faultproxy.EchoSecrets:    {"status 401", "status 500", "status 502", "401 storm"},
}

// TestFaultMatrix copies every view through a proxy injecting each fault in
// turn, on a fresh mount each time, on every platform: the copy is
// byte-identical, or it fails with EIO, the log names the fault, and once the
// backend recovers the same mount reads correctly. A wrong byte fails the
// test. The views are disk.img, disk.img.gz and, where the proxied mount
// sees the older snapshot, the delta from it (disk.vhd's reads are
// disk.img's).
func TestFaultMatrix(t *testing.T) {
	forEachPlatform(t, e2ePlatforms, func(t *testing.T, i int, sim simPlatform) {
		copies := envInt(t, faultCopiesEnv, sim.Caps().faultCopies)
		p, base := behindProxy(t, sim, 7+4*uint64(i))
		// The expected bytes: disk.img is the source; the derived views come
		// from a clean copy (their own tests check them against the source).
		want := map[string]string{}
		clean := p.mount()
		views := []string{"disk.img", "disk.img.gz"}
		if sim.Caps().proxiedBases {
			views = append(views, "delta-from-"+base+".vhd")
		}
		for _, v := range views {
			want[v] = sha256File(t, p.path(clean, v))
		}
		require.Equal(t, p.want, want["disk.img"])
		clean.stop(t)

		for _, view := range views {
			t.Run(view, func(t *testing.T) {
				faultedCopies(t, p.proxy, copies, view, want[view], func() *mounted { return p.mount() }, func(m *mounted) string {
					return p.path(m, view)
				})
				assert.Positive(t, p.proxy.Injected())
			})
		}
	})
}

// faultedCopies copies one view copies times, each on a fresh mount with the
// next fault injected: the copy is byte-identical to want, or it fails with
// EIO, the log names the fault, and once the backend is back the same mount
// copies correctly. A wrong byte fails the test.
func faultedCopies(t *testing.T, proxy *faultproxy.Proxy, copies int, label, want string, mount func() *mounted, path func(*mounted) string) {
	t.Helper()
	var identical, eio, wrong int
	for i := range copies {
		fault := faultproxy.Faults[i%len(faultproxy.Faults)]
		m := mount()
		src := path(m)
		dst := filepath.Join(t.TempDir(), "copy")
		proxy.Set(fault, 0.3)
		_, err := toolErr("cp", src, dst)
		proxy.Set(faultproxy.None, 0)
		switch {
		case err == nil && sha256File(t, dst) == want:
			identical++
		case err == nil:
			wrong++
			t.Errorf("copy %d (%s): WRONG BYTES", i, fault)
		case strings.Contains(err.Error(), "Input/output error"):
			eio++
			assert.True(t, m.logged(faultWords[fault]...), "copy %d (%s) failed with EIO but the log does not name the fault:\n%s", i, fault, m.logs.String())
			// The backend is back: the same mount reads correctly.
			out, err := toolErr("cp", src, dst)
			assert.NoError(t, err, "copy %d (%s) after recovery: %s", i, fault, out)
			assert.Equal(t, want, sha256File(t, dst), "copy %d (%s) after recovery", i, fault)
		default:
			t.Errorf("copy %d (%s): failed without EIO: %v", i, fault, err)
		}
		m.stop(t)
	}
	t.Logf("%s: %d faulted copies: %d byte-identical, %d EIO, %d wrong (%d faults injected so far)",
		label, copies, identical, eio, wrong, proxy.Injected())
	assert.Zero(t, wrong)
}

func containsAny(s string, words []string) bool {
	for _, w := range words {
		if strings.Contains(s, w) {
			return true
		}
	}
	return false
}
