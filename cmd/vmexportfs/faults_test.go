package main

import (
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"strconv"
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

// faultRate is the chance that a data request starts the random fault.
const faultRate = 0.3

// firstFaults are injected into the first tries-1 attempts of every data
// request in the deterministic copies: one of each way an answer fails (cut
// connection, error status, short body, wrong bytes, a hostile encoding).
var firstFaults = []faultproxy.Fault{faultproxy.Reset, faultproxy.ServerError, faultproxy.ShortBody, faultproxy.WrongRange, faultproxy.GzipEncoding}

// TestFaultMatrix copies every view through a proxy injecting faults, on a
// fresh mount each time, on every platform. The views are disk.img,
// disk.img.gz and, where the proxied mount sees the older snapshot, the
// delta from it (disk.vhd's reads are disk.img's). For each view:
//
//   - deterministic: every data request fails its first tries-1 attempts
//     (one fault kind per copy): each copy is byte-identical, with no EIO,
//     and exactly tries-1 faults per data request of a clean copy were
//     injected and counted by the mount;
//   - random: each fault kind in turn hits data requests at faultRate: a
//     copy is byte-identical, or fails with EIO, the log names the fault
//     and once the backend recovers the same mount reads correctly. An EIO
//     under a fault that every platform retries needs a data request that
//     failed all its tries at the proxy, and the EIO copies are no more
//     than the chance of that allows (eioLimit).
//
// A wrong byte fails the test. So does a mount that does not make its
// tries: the deterministic copies fail, and so do the random copies' EIOs
// that no request failing all its tries explains. The bound alone would
// not show it: a failed block is fetched again when read (and the kernel
// reads again a page its readahead missed), so even one try a request
// fails fewer copies than the bound allows.
func TestFaultMatrix(t *testing.T) {
	forEachPlatform(t, faultPlatforms, func(t *testing.T, i int, sim proxyPlatform) {
		copies := envInt(t, faultCopiesEnv, sim.Caps().faultCopies)
		p, base := behindProxy(t, sim, 7+4*uint64(i))
		tries := mountTries(t, p.args(t.TempDir()))
		require.Greater(t, tries, 1, "the matrix judges retries")
		views := []string{"disk.img", "disk.img.gz"}
		if sim.Caps().proxiedBases {
			views = append(views, "delta-from-"+base+".vhd")
		}
		// The expected bytes, and the data requests a clean copy makes, on
		// a fresh mount as every faulted copy is: disk.img is the source;
		// the derived views come from a clean copy (their own tests check
		// them against the source).
		want, requests := map[string]string{}, map[string]int64{}
		for _, v := range views {
			clean := p.mount()
			before := p.proxy.DataRequests()
			want[v] = sha256File(t, p.path(clean, v))
			requests[v] = p.proxy.DataRequests() - before
			clean.stop(t)
			require.Positive(t, requests[v], "%s: a clean copy reads through the proxy", v)
		}
		require.Equal(t, p.want, want["disk.img"])

		for _, view := range views {
			t.Run(view, func(t *testing.T) {
				mount := func() *mounted { return p.mount() }
				path := func(m *mounted) string { return p.path(m, view) }
				t.Run("first attempts", func(t *testing.T) {
					firstAttemptCopies(t, p.proxy, tries, requests[view], want[view], mount, path)
				})
				t.Run("random", func(t *testing.T) {
					faultedCopies(t, p.proxy, copies, tries, requests[view], view, want[view], mount, path)
				})
			})
		}
	})
}

// mountTries is the --retries of a mount's command line (the command's
// default, 5, without one).
func mountTries(t *testing.T, args []string) int {
	t.Helper()
	i := slices.Index(args, "--retries")
	if i < 0 || i+1 == len(args) {
		return 5
	}
	n, err := strconv.Atoi(args[i+1])
	require.NoError(t, err)
	return n
}

// firstAttemptCopies copies one view once per fault of firstFaults, each
// on a fresh mount, with every data request failing its first tries-1
// attempts: a mount that makes its tries reads everything.
func firstAttemptCopies(t *testing.T, proxy *faultproxy.Proxy, tries int, requests int64, want string, mount func() *mounted, path func(*mounted) string) {
	k := tries - 1
	for _, fault := range firstFaults {
		m := mount()
		dst := filepath.Join(t.TempDir(), "copy")
		before, attemptsBefore := proxy.Injected(), proxy.DataRequests()
		proxy.SetFirst(fault, k)
		out, err := toolErr("cp", path(m), dst)
		proxy.Set(faultproxy.None, 0)
		injected := proxy.Injected() - before
		distinct := proxy.DataRequests() - attemptsBefore - injected
		doc := mountStats(t, m)
		m.stop(t)
		if assert.NoError(t, err, "%s on the first %d of %d tries: %s", fault, k, tries, out) {
			assert.Equal(t, want, sha256File(t, dst), "%s: the copy's bytes", fault)
		}
		assert.Zero(t, doc.Errors["EIO"], "%s: EIOs in the mount's stats", fault)
		// Each distinct data request fails k times and then passes: the
		// attempts are k+1 per request. Which requests a copy makes is the
		// cache's plan, which follows what requests cost (retried ones
		// look dearer), so their number is the copy's own, near a clean
		// copy's.
		assert.Equal(t, int64(k)*distinct, injected, "%s: %d faults for each of the %d data requests (a clean copy makes %d)", fault, k, distinct, requests)
		assert.Positive(t, distinct, "%s: data requests", fault)
		var counted int64
		for _, n := range doc.Faults {
			counted += n
		}
		assert.Equal(t, injected, counted, "%s: the mount's stats count every failed attempt", fault)
	}
}

// allTriesFail bounds the chance that every try of one data request fails
// when fault hits data requests at faultRate, for a mount that makes tries
// tries:
//
//   - most faults are drawn afresh for each request, so the tries of one
//     request fail together with faultRate^tries (0.3^4 = 0.0081);
//   - ServerError and Unauthorized fail a burst of BurstLen requests once
//     drawn: the tries of one request, which follow each other, meet at
//     least ceil(tries/BurstLen) draws, faultRate^2 = 0.09 at 4 tries and
//     bursts of 3 (another request's burst covering ours started with a
//     draw too);
//   - a refused redirect is never retried, nor is EchoSecrets' 401 where
//     there is nothing to renew (a KubeVirt token file): faultRate;
//   - Restart drops everything for a second, longer than all the backoffs
//     of 4 tries (at most 0.1+0.2+0.4 s): every request then fails: 1, no
//     bound (with more tries, only the jitter's luck would outlast it).
//
// A block whose fetch failed is fetched again when read (the kernel reads
// again a page its readahead could not get): more tries, fewer failures.
func allTriesFail(fault faultproxy.Fault, tries int) float64 {
	switch fault {
	case faultproxy.Restart:
		return 1
	case faultproxy.RedirectHTTP, faultproxy.RedirectOrigin, faultproxy.EchoSecrets:
		return faultRate
	case faultproxy.ServerError, faultproxy.Unauthorized:
		draws := (tries + faultproxy.DefaultBurstLen - 1) / faultproxy.DefaultBurstLen
		return math.Pow(faultRate, float64(draws))
	}
	return math.Pow(faultRate, float64(tries))
}

// retriedData says whether fault hits data requests only and every
// platform retries it: then a copy can fail only after a data request
// failed all its tries, which the proxy sees as that many faulted attempts
// in a row (LongestRun). Restart and Unauthorized hit the other requests
// too; see allTriesFail for the rest.
func retriedData(fault faultproxy.Fault) bool {
	switch fault {
	case faultproxy.Restart, faultproxy.Unauthorized, faultproxy.RedirectHTTP, faultproxy.RedirectOrigin, faultproxy.EchoSecrets:
		return false
	}
	return true
}

// eioFalseAlarm is the chance, per view and platform, that a mount whose
// retries work as allTriesFail says still fails the random copies' bound.
const eioFalseAlarm = 1e-4

// eioLimit is the most EIO copies accepted among copies whose chances of
// an EIO add up to mean: the largest n with P(X >= n) > eioFalseAlarm by
// Chernoff's bound for a sum X of independent trials, P(X >= n) <=
// e^-mean (e·mean/n)^n for n > mean. A copy of requests data requests
// fails only if all the tries of one of them do: at most requests ×
// allTriesFail, by the union bound; a copy with no bound below 1 is not
// counted (not in mean, nor its EIO).
//
// At 50 copies of disk.img on Coriolis (7 data requests at 4 tries: 0.06 a
// copy for most faults, 0.63 for bursts) mean is 6.2 and the limit 19 of
// the 38 copies counted; 0 to 3 fail. A mount that tries once failed 6 to
// 19 of them: the bound catches only the worst of that (see TestFaultMatrix
// for what catches the rest).
func eioLimit(mean float64) int {
	n := int(math.Ceil(mean))
	for ; ; n++ {
		if n > 0 && float64(n) > mean && -mean+float64(n)*math.Log(math.E*mean/float64(n)) <= math.Log(eioFalseAlarm) {
			return n - 1
		}
	}
}

// faultedCopies copies one view copies times, each on a fresh mount with the
// next fault injected at faultRate (see copyTally.faultedCopy), and bounds
// the EIO copies by eioLimit.
func faultedCopies(t *testing.T, proxy *faultproxy.Proxy, copies, tries int, requests int64, label, want string, mount func() *mounted, path func(*mounted) string) {
	t.Helper()
	var tally copyTally
	var mean float64
	counted, countedEIO := 0, 0
	before := proxy.Injected()
	for i := range copies {
		fault := faultproxy.Faults[i%len(faultproxy.Faults)]
		m := mount()
		eio, longest := tally.eio, 0
		label := fmt.Sprintf("copy %d (%s)", i, fault)
		tally.faultedCopy(t, m, path(m), want, label, faultWords[fault],
			func() { proxy.Set(fault, faultRate) }, func() { longest = proxy.LongestRun(); proxy.Set(faultproxy.None, 0) })
		m.stop(t)
		if tally.eio > eio && retriedData(fault) {
			assert.GreaterOrEqual(t, longest, tries, "%s: EIO, yet no data request failed all %d tries at the proxy (at most %d in a row)", label, tries, longest)
		}
		if chance := float64(requests) * allTriesFail(fault, tries); chance < 1 {
			mean += chance
			counted++
			countedEIO += tally.eio - eio
		}
	}
	injected := proxy.Injected() - before
	limit := eioLimit(mean)
	t.Logf("%s: %d faulted copies: %s (%d faults injected); %d EIO of the %d copies the retries should save, expected %.1f, at most %d",
		label, copies, tally, injected, countedEIO, counted, mean, limit)
	assert.Zero(t, tally.wrong)
	assert.Positive(t, injected, "faults were injected")
	assert.Positive(t, tally.faults, "the mounts' stats counted the faults")
	assert.LessOrEqual(t, countedEIO, limit, "EIO copies among the %d that %d tries of each of %d data requests should save (expected %.1f)",
		counted, tries, requests, mean)
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
