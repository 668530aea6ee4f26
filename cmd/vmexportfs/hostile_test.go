package main

import (
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/faultproxy"
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

// behindProxy builds the fault tests' VM on a platform, one disk and two
// snapshots, and serves the newer through a fault proxy; base is the older
// one's id (a delta view's base, where the proxied mount shows one).
func behindProxy(t *testing.T, p proxyPlatform, seed uint64) (px *proxied, base string) {
	const vm, disk = "vm-f", "xvda"
	p.AddVM(t, vm, diskSpec{disk, 9*mib + 64*kib})
	p.Write(t, vm, disk, 0, 2*mib)
	p.Write(t, vm, disk, 5*mib, 3*mib)
	base = p.Snapshot(t, vm)
	p.Write(t, vm, disk, 1*mib, 3*mib)
	target := p.Snapshot(t, vm)
	px = p.BehindProxy(t, seed, vm, target)
	px.want = sha256File(t, p.Reference(t, vm, target, disk))
	return px, base
}

// TestHostileServer puts a server that answers every data request with one
// hostile trick in front of each platform: the copy fails with EIO and the
// log names the trick, no credential reaches another origin, no secret the
// server echoes is printed anywhere, and once the server behaves the same
// mount copies exactly (nothing hostile was cached).
func TestHostileServer(t *testing.T) {
	forEachPlatform(t, faultPlatforms, func(t *testing.T, i int, sim proxyPlatform) {
		p, _ := behindProxy(t, sim, 3+2*uint64(i))
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

// TestHostileLoginRedirect: a login answered with 307 to plain HTTP would
// resend the password in cleartext. The mount fails, saying why, and nothing
// reaches the other port.
func TestHostileLoginRedirect(t *testing.T) {
	p, _ := behindProxy(t, newCoriolis(t), 9)
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
