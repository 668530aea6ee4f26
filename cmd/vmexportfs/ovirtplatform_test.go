package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/faultproxy"
	"github.com/vmexportfs/vmexportfs/backend/ovirt/ovirttest"
)

// ovirtPlatform is the oVirt simulator: the engine's REST API and SSO, and
// an imageio daemon and proxy serving image transfers.
type ovirtPlatform struct {
	sim          *ovirttest.Server
	passwordFile string
	caFile       string
	stateDir     string
	cacheDir     string
	rng          *rand.ChaCha8
	n            int
	named        map[string]string // description → id of the snapshots Snapshot took
}

// ovirtDelay is how long the simulator's snapshots stay locked and its
// transfers initializing, so that mkdir, rmdir and reads wait as they do on
// an engine.
const ovirtDelay = 50 * time.Millisecond

func newOVirt(t *testing.T, opts ovirttest.Options) *ovirtPlatform {
	t.Helper()
	requireRoot(t)
	opts.Dir = t.TempDir()
	if opts.SnapshotDelay == 0 {
		opts.SnapshotDelay = ovirtDelay
	}
	if opts.TransferDelay == 0 {
		opts.TransferDelay = ovirtDelay / 5
	}
	sim, err := ovirttest.Start(opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = sim.Close() })
	dir := t.TempDir()
	pw := filepath.Join(dir, "password")
	require.NoError(t, os.WriteFile(pw, []byte(ovirttest.DefaultPassword+"\n"), 0o600))
	ca := filepath.Join(dir, "engine-ca.pem")
	require.NoError(t, os.WriteFile(ca, sim.CAPEM(), 0o600))
	var seed [32]byte
	copy(seed[:], t.Name())
	return &ovirtPlatform{sim: sim, passwordFile: pw, caFile: ca, stateDir: t.TempDir(), cacheDir: t.TempDir(),
		rng: rand.NewChaCha8(seed), named: map[string]string{}}
}

func (o *ovirtPlatform) Caps() caps {
	return caps{allocationMap: true, exactChanges: true, proxiedBases: true, faultCopies: 24, readsAsServed: true}
}

func (o *ovirtPlatform) AddVM(t *testing.T, vm string, disks ...diskSpec) {
	t.Helper()
	spec := ovirttest.VMSpec{ID: vm, Name: vm}
	for _, d := range disks {
		spec.Disks = append(spec.Disks, ovirttest.DiskSpec{ID: vm + "-" + d.name, Name: d.name, Size: d.size})
	}
	_, err := o.sim.AddVM(spec)
	require.NoError(t, err)
}

func (o *ovirtPlatform) Write(t *testing.T, vm, disk string, off, n int64) {
	t.Helper()
	buf := make([]byte, n)
	o.rng.Read(buf)
	require.NoError(t, o.sim.WriteDisk(vm, vm+"-"+disk, off, buf))
}

func (o *ovirtPlatform) Discard(t *testing.T, vm, disk string, off, n int64) {
	t.Helper()
	require.NoError(t, o.sim.DiscardDisk(vm, vm+"-"+disk, off, n))
}

// Snapshot takes a snapshot through the engine and returns its
// description, which is what a mount shows (its id also resolves).
func (o *ovirtPlatform) Snapshot(t *testing.T, vm string) string {
	t.Helper()
	o.n++
	name := fmt.Sprintf("backup-%03d", o.n)
	id, err := o.sim.TakeSnapshot(vm, name)
	require.NoError(t, err)
	o.named[name] = id
	return name
}

func (o *ovirtPlatform) Snapshots(t *testing.T, vm string) []string {
	t.Helper()
	ids, err := o.sim.Snapshots(vm)
	require.NoError(t, err)
	return ids
}

func (o *ovirtPlatform) Reference(t *testing.T, vm, snapshot, disk string) string {
	t.Helper()
	if id, ok := o.named[snapshot]; ok {
		snapshot = id
	}
	path, err := o.sim.SnapshotData(vm, snapshot, vm+"-"+disk)
	require.NoError(t, err)
	return path
}

func (o *ovirtPlatform) MountArgs() []string {
	return []string{"--username", ovirttest.DefaultUser, "--password-file", o.passwordFile, "--ca-file", o.caFile,
		"--state-dir", o.stateDir, "--cache-dir", o.cacheDir, "ovirt+" + o.sim.URL()}
}

func (o *ovirtPlatform) CacheDir() string { return o.cacheDir }

func (o *ovirtPlatform) DiskBytes() int64 { return o.sim.Stats().DataBytes }

// BehindProxy puts the imageio daemon behind the proxy, where the data
// travels: the engine names the proxy in its transfer URLs, and the mount
// trusts the engine CA and the proxy's.
func (o *ovirtPlatform) BehindProxy(t *testing.T, seed uint64, vm, snapshot string) *proxied {
	cacheDir := t.TempDir()
	p := newProxied(t, o.sim.DaemonURL(), o.sim.CAPool(), seed, func(proxy *faultproxy.Proxy, dir string) []string {
		return []string{"--username", ovirttest.DefaultUser, "--password-file", o.passwordFile, "--ca-file", o.bothCAs(t, proxy),
			"--state-dir", o.stateDir, "--cache-dir", cacheDir, "--read-timeout", "1s", "--retries", "4",
			"ovirt+" + o.sim.URL(), dir}
	})
	o.sim.AdvertiseDaemon(p.proxy.URL())
	p.disk = filepath.Join("vms", vm, "snapshots", snapshot, "disk.img")
	p.secrets["password"] = ovirttest.DefaultPassword
	return p
}

// bothCAs is one PEM file with the engine CA and the proxy's.
func (o *ovirtPlatform) bothCAs(t *testing.T, proxy *faultproxy.Proxy) string {
	proxyCA, err := os.ReadFile(proxy.CAFile())
	require.NoError(t, err)
	path := filepath.Join(filepath.Dir(proxy.CAFile()), "engine-and-proxy-ca.pem")
	require.NoError(t, os.WriteFile(path, append(append([]byte{}, o.sim.CAPEM()...), proxyCA...), 0o600))
	return path
}
