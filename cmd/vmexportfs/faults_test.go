package main

import (
	"fmt"
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
	forEachPlatform(t, faultPlatforms, func(t *testing.T, i int, sim proxyPlatform) {
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
// next fault injected (see copyTally.faultedCopy).
func faultedCopies(t *testing.T, proxy *faultproxy.Proxy, copies int, label, want string, mount func() *mounted, path func(*mounted) string) {
	t.Helper()
	var tally copyTally
	for i := range copies {
		fault := faultproxy.Faults[i%len(faultproxy.Faults)]
		m := mount()
		tally.faultedCopy(t, m, path(m), want, fmt.Sprintf("copy %d (%s)", i, fault), faultWords[fault],
			func() { proxy.Set(fault, 0.3) }, func() { proxy.Set(faultproxy.None, 0) })
		m.stop(t)
	}
	t.Logf("%s: %d faulted copies: %s (%d faults injected so far)", label, copies, tally, proxy.Injected())
	assert.Zero(t, tally.wrong)
	if proxy.Injected() > 0 {
		assert.Positive(t, tally.faults, "the mounts' stats counted the faults")
	}
}

// copyTally counts what faulted copies came to, and the faults the mounts'
// stats counted.
type copyTally struct {
	identical, eio, wrong int
	faults                int64
}

func (c copyTally) String() string {
	return fmt.Sprintf("%d byte-identical, %d EIO, %d wrong", c.identical, c.eio, c.wrong)
}

// faultedCopy copies src with a fault on (start and stop bracket the copy):
// the copy is byte-identical to want, or it fails with EIO, the log names
// the fault (one of words), and with the fault off the same mount copies
// correctly. A wrong byte fails the test.
func (c *copyTally) faultedCopy(t *testing.T, m *mounted, src, want, label string, words []string, start, stop func()) {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "copy")
	start()
	_, err := toolErr("cp", src, dst)
	stop()
	doc := mountStats(t, m)
	for _, n := range doc.Faults {
		c.faults += n
	}
	switch {
	case err == nil && sha256File(t, dst) == want:
		c.identical++
	case err == nil:
		c.wrong++
		t.Errorf("%s: WRONG BYTES", label)
	case strings.Contains(err.Error(), "Input/output error"):
		c.eio++
		assert.True(t, m.logged(words...), "%s failed with EIO but the log does not name the fault:\n%s", label, m.logs.String())
		assert.Positive(t, doc.Errors["EIO"], "%s: the stats count the EIO", label)
		out, err := toolErr("cp", src, dst)
		if assert.NoError(t, err, "%s after recovery: %s", label, out) {
			assert.Equal(t, want, sha256File(t, dst), "%s after recovery", label)
		}
	default:
		t.Errorf("%s: failed without EIO: %v", label, err)
	}
}

func containsAny(s string, words []string) bool {
	for _, w := range words {
		if strings.Contains(s, w) {
			return true
		}
	}
	return false
}
