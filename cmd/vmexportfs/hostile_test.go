package main

import (
	"crypto/x509"
	"fmt"
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

// proxied is one snapshot disk of a platform simulator served through a
// fault proxy, with what a test needs to mount it and judge the result.
type proxied struct {
	proxy   *faultproxy.Proxy
	mount   func(extra ...string) *mounted // -f, through the proxy, short deadlines
	args    func(dir string) []string      // the same mount's command line
	disk    string                         // the snapshot directory's disk.img, relative to the mount
	want    string                         // sha256 of the disk
	secrets map[string]string              // what must never be printed, by name
}

func (p *proxied) path(m *mounted, view string) string {
	return filepath.Join(m.dir, filepath.Dir(p.disk), view)
}

func newProxied(t *testing.T, upstream string, pool *x509.CertPool, seed uint64, args func(proxy *faultproxy.Proxy, dir string) []string) *proxied {
	proxy, err := faultproxy.Start(faultproxy.Options{Upstream: upstream, UpstreamCA: pool, Dir: t.TempDir(), Seed: seed})
	require.NoError(t, err)
	t.Cleanup(func() { proxy.Close() })
	p := &proxied{proxy: proxy, secrets: map[string]string{}}
	p.args = func(dir string) []string { return args(proxy, dir) }
	p.mount = func(extra ...string) *mounted {
		dir := filepath.Join(t.TempDir(), "mnt")
		require.NoError(t, os.Mkdir(dir, 0o755))
		a := p.args(dir)
		m := startCommand(t, append(append([]string{"-f"}, extra...), a...)...)
		m.dir = dir
		return m
	}
	return p
}

// coriolisBehindProxy is a Coriolis simulator with one VM of two snapshots
// behind a fault proxy; disk is the newer snapshot's, base the older's id.
func coriolisBehindProxy(t *testing.T, seed uint64) (p *proxied, f *fixture, base string) {
	f = newFixture(t, coriolistest.Options{})
	f.addVM("vm-f", "faults", coriolistest.DiskSpec{Name: "f.img", Device: "xvda", Size: 9*mib + 64*kib})
	f.write("vm-f", "f.img", 0, 2*mib)
	f.write("vm-f", "f.img", 5*mib, 3*mib)
	base = f.snapshot("vm-f")
	f.write("vm-f", "f.img", 1*mib, 3*mib)
	target := f.snapshot("vm-f")
	cacheDir := t.TempDir()
	p = newProxied(t, f.sim.URL(), f.sim.CAPool(), seed, func(proxy *faultproxy.Proxy, dir string) []string {
		return []string{"--username", "admin", "--password-file", f.passwordFile, "--ca-file", proxy.CAFile(),
			"--state-dir", f.stateDir, "--cache-dir", cacheDir, "--read-timeout", "1s", "--retries", "4",
			"coriolis+" + proxy.URL(), dir}
	})
	p.disk = filepath.Join("vms", "vm-f", "snapshots", target, "disk.img")
	p.want = sha256File(t, f.source("vm-f", target, "f.img"))
	p.secrets["password"] = simPassword
	return p, f, base
}

// kubevirtBehindProxy is a KubeVirt snapshot export behind a fault proxy,
// mounted in standalone mode as the export proxy's users do.
func kubevirtBehindProxy(t *testing.T, seed uint64) *proxied {
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
	tokenFile := f.tokenFile("s1")
	token, err := os.ReadFile(tokenFile)
	require.NoError(t, err)
	p := newProxied(t, export.Scheme+"://"+export.Host, pool, seed, func(proxy *faultproxy.Proxy, dir string) []string {
		return []string{"--token-file", tokenFile, "--ca-file", proxy.CAFile(), "--kubevirt-volume", "rootdisk",
			"--state-dir", f.stateDir, "--cache-dir", t.TempDir(), "--read-timeout", "1s", "--retries", "4",
			"kubevirt+" + proxy.URL() + export.Path, dir}
	})
	// The path comes from a clean mount: walking a faulted one would stat
	// disk.img.gz, whose first stat reads the whole disk.
	clean := p.mount()
	found := findAll(t, clean.dir, "disk.img")
	require.Len(t, found, 1)
	p.disk = strings.TrimPrefix(found[0], clean.dir+"/")
	clean.stop(t)
	p.want = sha256File(t, source)
	p.secrets["export token"] = strings.TrimSpace(string(token))
	return p
}

// TestHostileServer puts a server that answers every data request with one
// hostile trick in front of each platform: the copy fails with EIO and the
// log names the trick, no credential reaches another origin, no secret the
// server echoes is printed anywhere, and once the server behaves the same
// mount copies exactly (nothing hostile was cached).
func TestHostileServer(t *testing.T) {
	platforms := map[string]func(t *testing.T) *proxied{
		"coriolis": func(t *testing.T) *proxied { p, _, _ := coriolisBehindProxy(t, 3); return p },
		"kubevirt": func(t *testing.T) *proxied { return kubevirtBehindProxy(t, 5) },
	}
	for name, setup := range platforms {
		t.Run(name, func(t *testing.T) {
			p := setup(t)
			for _, fault := range faultproxy.Hostile {
				t.Run(fault.String(), func(t *testing.T) {
					m := p.mount()
					src := filepath.Join(m.dir, p.disk)
					dst := filepath.Join(t.TempDir(), "copy")
					p.proxy.Set(fault, 1)
					out, cpErr := toolErr("cp", src, dst)
					p.proxy.Set(faultproxy.None, 0)
					require.Error(t, cpErr, "every data answer was hostile, yet the copy succeeded (sha256 %s)", sha256File(t, dst))
					assert.Contains(t, cpErr.Error(), "Input/output error")
					assert.True(t, m.logged(faultWords[fault]...), "the log does not name %s:\n%s", fault, m.logs.String())

					tool(t, "cp", src, dst)
					assert.Equal(t, p.want, sha256File(t, dst), "after recovery")

					xattrs := tool(t, "getfattr", "-d", "-m", "-", src)
					cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", m.cmd.Process.Pid))
					require.NoError(t, err)
					m.stop(t)
					requireNoSecrets(t, p.secrets, map[string]string{
						"logs": m.logs.String(), "cp's error": out + cpErr.Error(), "xattrs": xattrs, "cmdline": string(cmdline),
					})
					assert.Empty(t, p.proxy.Caught(), "credentials followed a redirect to another origin")
				})
			}
		})
	}
}

// TestHostileLoginRedirect: a login answered with 307 to plain HTTP would
// resend the password in cleartext. The mount fails, saying why, and nothing
// reaches the other port.
func TestHostileLoginRedirect(t *testing.T) {
	p, _, _ := coriolisBehindProxy(t, 9)
	p.proxy.Set(faultproxy.RedirectLogin, 1)
	out, err := runTool(os.Args[0], append([]string{"-f"}, p.args(t.TempDir())...), asCommandEnv+"=1")
	p.proxy.Set(faultproxy.None, 0)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "redirect refused")
	assert.Empty(t, p.proxy.Caught(), "the login body followed the redirect")
	requireNoSecrets(t, p.secrets, map[string]string{"stderr": out + err.Error()})
	// The same command mounts once the server stops redirecting.
	m := p.mount()
	assert.Equal(t, p.want, sha256File(t, filepath.Join(m.dir, p.disk)))
}

// requireNoSecrets fails when any text holds a secret or anything shaped
// like a JWT (base64 of `{"` starts every one).
func requireNoSecrets(t *testing.T, secrets, texts map[string]string) {
	t.Helper()
	for where, text := range texts {
		for name, secret := range secrets {
			assert.NotContains(t, text, secret, "%s in %s", name, where)
		}
		assert.NotContains(t, text, "eyJ", "a JWT in %s", where)
	}
}
