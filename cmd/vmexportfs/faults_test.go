package main

import (
	"crypto/x509"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
	"github.com/vmexportfs/vmexportfs/backend/faultproxy"
	"github.com/vmexportfs/vmexportfs/backend/kubevirt/kubevirttest"
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
}

// TestFaultMatrix copies every view through a proxy injecting each fault in
// turn, on a fresh mount each time: the copy is byte-identical, or it fails
// with EIO, the log names the fault, and once the backend recovers the same
// mount reads correctly. A wrong byte fails the test.
func TestFaultMatrix(t *testing.T) {
	copies := envInt(t, faultCopiesEnv, 50)
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-f", "faults", coriolistest.DiskSpec{Name: "f.img", Device: "xvda", Size: 9*mib + 64*kib})
	f.write("vm-f", "f.img", 0, 2*mib)
	f.write("vm-f", "f.img", 5*mib, 3*mib)
	base := f.snapshot("vm-f")
	f.write("vm-f", "f.img", 1*mib, 3*mib)
	target := f.snapshot("vm-f")

	proxy, err := faultproxy.Start(faultproxy.Options{Upstream: f.sim.URL(), UpstreamCA: f.sim.CAPool(), Dir: t.TempDir(), Seed: 7})
	require.NoError(t, err)
	t.Cleanup(func() { proxy.Close() })
	mount := func() *mounted {
		dir := filepath.Join(t.TempDir(), "mnt")
		require.NoError(t, os.Mkdir(dir, 0o755))
		m := startCommand(t, "-f", "--username", "admin", "--password-file", f.passwordFile, "--ca-file", proxy.CAFile(),
			"--state-dir", f.stateDir, "--cache-dir", t.TempDir(), "--read-timeout", "1s", "--retries", "4",
			"coriolis+"+proxy.URL(), dir)
		m.dir = dir
		return m
	}

	views := []string{"disk.img", "disk.img.gz", "delta-from-" + base + ".vhd"}
	// The expected bytes: disk.img is the source; the derived views come
	// from a clean copy (their own tests check them against the source).
	want := map[string]string{}
	clean := mount()
	for _, v := range views {
		want[v] = sha256File(t, clean.path("vms", "vm-f", "snapshots", target, v))
	}
	require.Equal(t, sha256File(t, f.source("vm-f", target, "f.img")), want["disk.img"])
	clean.stop(t)

	for _, view := range views {
		t.Run(view, func(t *testing.T) {
			faultedCopies(t, proxy, copies, view, want[view], mount, func(m *mounted) string {
				return m.path("vms", "vm-f", "snapshots", target, view)
			})
		})
	}
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
			logs := m.logs.String()
			assert.True(t, containsAny(logs, faultWords[fault]), "copy %d (%s) failed with EIO but the log does not name the fault:\n%s", i, fault, logs)
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

// TestFaultMatrixKubeVirt runs the matrix against a KubeVirt export server:
// the proxy stands where the export proxy would, and the mount uses the
// standalone mode (export URL, token file, the proxy's CA).
func TestFaultMatrixKubeVirt(t *testing.T) {
	copies := envInt(t, faultCopiesEnv, 24)
	f := newKVFixture(t)
	f.addVM("vm-kf", kubevirttest.VolumeSpec{Name: "rootdisk", Size: 9*mib + 64*kib})
	f.write("vm-kf", "rootdisk", 0, 2*mib)
	f.write("vm-kf", "rootdisk", 5*mib, 3*mib)
	setup := f.mount()
	tool(t, "mkdir", setup.path("vms", "vm-kf", "snapshots", "s1"))
	source := f.freeze("vm-kf", "rootdisk")
	setup.stop(t)

	_, exportURL, cert := f.externalExport("s1")
	export, err := url.Parse(exportURL)
	require.NoError(t, err)
	pool := x509.NewCertPool()
	require.True(t, pool.AppendCertsFromPEM([]byte(cert)))
	proxy, err := faultproxy.Start(faultproxy.Options{Upstream: export.Scheme + "://" + export.Host, UpstreamCA: pool, Dir: t.TempDir(), Seed: 11})
	require.NoError(t, err)
	t.Cleanup(func() { proxy.Close() })
	tokenFile := f.tokenFile("s1")
	mount := func() *mounted {
		dir := filepath.Join(t.TempDir(), "mnt")
		require.NoError(t, os.Mkdir(dir, 0o755))
		m := startCommand(t, "-f", "--token-file", tokenFile, "--ca-file", proxy.CAFile(), "--kubevirt-volume", "rootdisk",
			"--state-dir", f.stateDir, "--cache-dir", t.TempDir(), "--read-timeout", "1s", "--retries", "4",
			"kubevirt+"+proxy.URL()+export.Path, dir)
		m.dir = dir
		return m
	}
	// Paths come from a clean mount: walking a faulted mount would stat
	// disk.img.gz, whose first stat reads the whole disk before the fault.
	views := []string{"disk.img", "disk.img.gz"}
	want := map[string]string{"disk.img": sha256File(t, source)}
	rel := map[string]string{}
	clean := mount()
	for _, view := range views {
		found := findAll(t, clean.dir, view)
		require.Len(t, found, 1, view)
		p := found[0]
		rel[view] = strings.TrimPrefix(p, clean.dir)
		want[view] = sha256File(t, p)
	}
	require.Equal(t, sha256File(t, source), want["disk.img"])
	clean.stop(t)

	for _, view := range views {
		t.Run(view, func(t *testing.T) {
			faultedCopies(t, proxy, copies, "kubevirt "+view, want[view], mount, func(m *mounted) string { return m.dir + rel[view] })
			assert.Positive(t, proxy.Injected())
		})
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
