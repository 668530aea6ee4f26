package main

import (
	"crypto/x509"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
	"github.com/vmexportfs/vmexportfs/backend/faultproxy"
	"github.com/vmexportfs/vmexportfs/backend/kubevirt/kubevirttest"
	"github.com/vmexportfs/vmexportfs/backend/ovirt/ovirttest"
	"github.com/vmexportfs/vmexportfs/backend/xapi/xapitest"
)

// simPlatform is one platform's simulator as the end-to-end tests drive it:
// the same few verbs on every platform, so that the copy-tool matrix, the
// derived files, mkdir/rmdir and the fault matrix are one table over
// platforms. What a platform cannot do the same way is in its Caps, never in
// an if on its name.
type simPlatform interface {
	Caps() caps
	// AddVM creates a VM whose disks are all zeros.
	AddVM(t *testing.T, vm string, disks ...diskSpec)
	// Write puts n fresh pseudo-random bytes at [off, off+n) of a live disk.
	Write(t *testing.T, vm, disk string, off, n int64)
	// Discard makes [off, off+n) of a live disk read as zeros, as a
	// guest's TRIM does.
	Discard(t *testing.T, vm, disk string, off, n int64)
	// Snapshot takes a snapshot through the platform's API, behind any
	// mount's back (as a scheduler does), and returns its id once a mount
	// can see it.
	Snapshot(t *testing.T, vm string) string
	// Snapshots are the ids of the VM's snapshots on the platform, oldest
	// first (those taken with mkdir included).
	Snapshots(t *testing.T, vm string) []string
	// Reference is the simulator's own file of a snapshot's disk: what
	// every copy is checked against.
	Reference(t *testing.T, vm, snapshot, disk string) string
	// MountArgs are the flags of a mount of the simulator, ending with the
	// source: `vmexportfs -f [extra...] MountArgs... MOUNTPOINT`.
	MountArgs() []string
	// CacheDir is the mounts' --cache-dir.
	CacheDir() string
	// DiskBytes counts the disk bytes the simulator has served so far.
	DiskBytes() int64
}

// proxyPlatform is a platform whose disk data is HTTP that a fault proxy can
// stand in front of.
type proxyPlatform interface {
	simPlatform
	// BehindProxy serves one snapshot of a VM with a single disk through a
	// fault proxy, the way the platform's users reach it through one.
	BehindProxy(t *testing.T, seed uint64, vm, snapshot string) *proxied
}

// diskSpec is one disk of a simulated VM. name is the disk's device name,
// its directory in a VM with several disks, and how Write, Discard and
// Reference name it.
type diskSpec struct {
	name string
	size int64
}

// caps are the differences between platforms that the common tests judge by.
type caps struct {
	// allocationMap: the platform says which extents are written, so holes
	// are never fetched; without one the whole disk is data (copies are
	// exact, not sparse-aware).
	allocationMap bool
	// mapGranularity is the block of the allocation map (XenServer's VHD
	// block table: 2 MiB); what is fetched is bounded by the written
	// extents rounded out to it. 0: as fine as the tests write.
	mapGranularity int64
	// exactChanges: the platform says which extents changed between two
	// snapshots (user.vmexport.changed.<base>, a delta of only those);
	// without it a delta holds everything written in either snapshot.
	exactChanges bool
	// invalidNames are names mkdir refuses with EINVAL on this platform,
	// beyond those every platform refuses.
	invalidNames []string
	// proxiedBases: BehindProxy's mount lists the VM's older snapshots too,
	// so a delta view can be faulted (KubeVirt's standalone mode, how its
	// export proxy is reached, shows one export).
	proxiedBases bool
	// oneSnapshot: the platform keeps one snapshot per VM (an image in a
	// bucket is replaced, not versioned), so there is no delta to take.
	oneSnapshot bool
	// readsAsServed: each disk read is answered by the simulator with
	// those bytes and no others (no decoding, spilling or widening in
	// between), so the simulator's byte count is the disk's.
	readsAsServed bool
	// faultCopies is the fault matrix's default number of faulted copies
	// per view (VMEXPORTFS_FAULT_COPIES overrides it).
	faultCopies int
}

// tableRow is a row of a platform table: how to start the simulator.
type tableRow[P simPlatform] struct {
	name  string
	start func(t *testing.T) P
}

// platformCase is a row of a table of platforms any common test can drive.
type platformCase = tableRow[simPlatform]

// e2ePlatforms is the table every common end-to-end test runs over.
var e2ePlatforms = []platformCase{
	{"coriolis", func(t *testing.T) simPlatform { return newCoriolis(t) }},
	{"kubevirt", func(t *testing.T) simPlatform { return newKubeVirt(t, true) }},
	{"xapi", func(t *testing.T) simPlatform { return newXapi(t, xapitest.Options{}) }},
	{"ovirt", func(t *testing.T) simPlatform { return newOVirt(t, ovirttest.Options{}) }},
}

// faultPlatforms is the table of the tests that fault the data on its way
// (TestFaultMatrix, TestHostileServer). The platforms not in it have their
// faults injected elsewhere:
//   - xapi: XenServer's data travels over NBD, which the HTTP fault proxy
//     cannot fault; TestXapiNBDFaults faults the NBD stream.
//   - s3, jdcloud: SigV4 signs the host, so the proxy would have to re-sign
//     each request; the S3 blob's checks have their own tests in backend/s3.
var faultPlatforms = []tableRow[proxyPlatform]{
	{"coriolis", func(t *testing.T) proxyPlatform { return newCoriolis(t) }},
	{"kubevirt", func(t *testing.T) proxyPlatform { return newKubeVirt(t, true) }},
	{"ovirt", func(t *testing.T) proxyPlatform { return newOVirt(t, ovirttest.Options{}) }},
}

// forEachPlatform runs test once per platform of table, each on a fresh
// simulator; i is the row's index (for per-row seeds).
func forEachPlatform[P simPlatform](t *testing.T, table []tableRow[P], test func(t *testing.T, i int, p P)) {
	for i, pc := range table {
		t.Run(pc.name, func(t *testing.T) { test(t, i, pc.start(t)) })
	}
}

// mountSim runs the command in the foreground on a fresh mountpoint with the
// platform's mount arguments; the test's cleanup unmounts it.
func mountSim(t *testing.T, p simPlatform, extra ...string) *mounted {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "mnt")
	require.NoError(t, os.Mkdir(dir, 0o755))
	args := append(append(append([]string{"-f"}, extra...), p.MountArgs()...), dir)
	m := startCommand(t, args...)
	m.dir = dir
	return m
}

// coriolisPlatform is the Coriolis simulator through the fixture.
type coriolisPlatform struct{ *fixture }

func newCoriolis(t *testing.T) *coriolisPlatform {
	return &coriolisPlatform{newFixture(t, coriolistest.Options{})}
}

func (c *coriolisPlatform) Caps() caps {
	return caps{allocationMap: true, exactChanges: true, proxiedBases: true, faultCopies: 50, readsAsServed: true}
}

// coriolisDisk is the simulator's name of a disk, whose device is spec's name.
func coriolisDisk(name string) string { return name + ".img" }

func (c *coriolisPlatform) AddVM(t *testing.T, vm string, disks ...diskSpec) {
	t.Helper()
	spec := coriolistest.VMSpec{ID: vm, FriendlyName: strings.TrimPrefix(vm, "vm-")}
	for _, d := range disks {
		spec.Disks = append(spec.Disks, coriolistest.DiskSpec{Name: coriolisDisk(d.name), Device: d.name, Size: d.size})
	}
	require.NoError(t, c.sim.AddVM(spec))
}

func (c *coriolisPlatform) Write(t *testing.T, vm, disk string, off, n int64) {
	t.Helper()
	buf := make([]byte, n)
	c.rng.Read(buf)
	require.NoError(t, c.sim.WriteDisk(vm, coriolisDisk(disk), off, buf))
}

func (c *coriolisPlatform) Discard(t *testing.T, vm, disk string, off, n int64) {
	t.Helper()
	require.NoError(t, c.sim.DiscardDisk(vm, coriolisDisk(disk), off, n))
}

func (c *coriolisPlatform) Snapshot(t *testing.T, vm string) string {
	t.Helper()
	sid, err := c.sim.TakeSnapshot(vm)
	require.NoError(t, err)
	return sid
}

func (c *coriolisPlatform) Snapshots(t *testing.T, vm string) []string {
	t.Helper()
	ids, err := c.sim.Snapshots(vm)
	require.NoError(t, err)
	return ids
}

func (c *coriolisPlatform) Reference(t *testing.T, vm, snapshot, disk string) string {
	t.Helper()
	path, err := c.sim.SnapshotData(vm, snapshot, coriolisDisk(disk))
	require.NoError(t, err)
	return path
}

func (c *coriolisPlatform) MountArgs() []string {
	return append(c.mountArgs(), "coriolis+"+c.sim.URL())
}

func (c *coriolisPlatform) CacheDir() string { return c.cacheDir }

func (c *coriolisPlatform) DiskBytes() int64 { return c.sim.Stats().DiskBytes }

// BehindProxy puts the whole exporter behind the proxy: login, listings and
// data, as a reverse proxy in front of an OVM exporter does.
func (c *coriolisPlatform) BehindProxy(t *testing.T, seed uint64, vm, snapshot string) *proxied {
	cacheDir := t.TempDir()
	p := newProxied(t, c.sim.URL(), c.sim.CAPool(), seed, func(proxy *faultproxy.Proxy, dir string) []string {
		return []string{"--username", "admin", "--password-file", c.passwordFile, "--ca-file", proxy.CAFile(),
			"--state-dir", c.stateDir, "--cache-dir", cacheDir, "--read-timeout", "1s", "--retries", "4",
			"coriolis+" + proxy.URL(), dir}
	})
	p.disk = filepath.Join("vms", vm, "snapshots", snapshot, "disk.img")
	p.secrets["password"] = simPassword
	return p
}

// kubevirtPlatform is the KubeVirt simulator (API server and export servers)
// through kvFixture, in API mode. Snapshots taken with Snapshot are checked
// against kvFixture's own reference of every volume, so the simulator's
// snapshot files, which Reference returns, are known to hold what was
// written.
type kubevirtPlatform struct {
	*kvFixture
	withMap bool
	n       int // snapshots taken with Snapshot
}

// kvReadyDelay is how long the simulator's snapshots and exports stay not
// Ready, so that mkdir waits as it does on a cluster.
const kvReadyDelay = 300 * time.Millisecond

// newKubeVirt starts the KubeVirt simulator; withMap offers the backup map
// route (allocated extents), without it the whole disk is data.
func newKubeVirt(t *testing.T, withMap bool) *kubevirtPlatform {
	f := newKVFixture(t)
	f.sim.SetBackupRoutes(withMap)
	return &kubevirtPlatform{kvFixture: f, withMap: withMap}
}

func (k *kubevirtPlatform) Caps() caps {
	// Object names are DNS labels.
	return caps{allocationMap: k.withMap, exactChanges: false, invalidNames: []string{"Not_A_Label"}, faultCopies: 24, readsAsServed: true}
}

func (k *kubevirtPlatform) AddVM(t *testing.T, vm string, disks ...diskSpec) {
	t.Helper()
	var vols []kubevirttest.VolumeSpec
	for _, d := range disks {
		vols = append(vols, kubevirttest.VolumeSpec{Name: d.name, Size: d.size})
	}
	k.addVM(t, vm, vols...)
}

func (k *kubevirtPlatform) Write(t *testing.T, vm, disk string, off, n int64) {
	t.Helper()
	k.write(t, vm, disk, off, n)
}

func (k *kubevirtPlatform) Discard(t *testing.T, vm, disk string, off, n int64) {
	t.Helper()
	k.discard(t, vm, disk, off, n)
}

func (k *kubevirtPlatform) Snapshot(t *testing.T, vm string) string {
	t.Helper()
	k.n++
	name := fmt.Sprintf("snap-%d", k.n)
	require.NoError(t, k.sim.TakeSnapshot(vm, name))
	for _, vol := range k.vols[vm] {
		data, err := k.sim.SnapshotData(name, vol)
		require.NoError(t, err)
		require.Equal(t, contentDigest(t, k.ref(vm, vol)), contentDigest(t, data), "the simulator's snapshot %s of %s/%s holds what was written", name, vm, vol)
	}
	time.Sleep(kvReadyDelay) // Ready: a mount lists it
	return name
}

func (k *kubevirtPlatform) Snapshots(t *testing.T, vm string) []string {
	t.Helper()
	names, err := k.sim.Snapshots(vm)
	require.NoError(t, err)
	return names
}

func (k *kubevirtPlatform) Reference(t *testing.T, vm, snapshot, disk string) string {
	t.Helper()
	path, err := k.sim.SnapshotData(snapshot, disk)
	require.NoError(t, err)
	return path
}

func (k *kubevirtPlatform) MountArgs() []string { return k.mountArgs() }

func (k *kubevirtPlatform) CacheDir() string { return k.cacheDir }

func (k *kubevirtPlatform) DiskBytes() int64 { return k.sim.Stats().DiskBytes }

// BehindProxy puts the snapshot's export server behind the proxy, where
// the export proxy stands, and mounts it in standalone mode (export URL,
// token file, the proxy's CA) as the export proxy's users do.
func (k *kubevirtPlatform) BehindProxy(t *testing.T, seed uint64, vm, snapshot string) *proxied {
	_, exportURL, cert := k.externalExport(t, snapshot)
	export, err := url.Parse(exportURL)
	require.NoError(t, err)
	pool := x509.NewCertPool()
	require.True(t, pool.AppendCertsFromPEM([]byte(cert)))
	tokenFile := k.tokenFile(t, snapshot)
	token, err := os.ReadFile(tokenFile)
	require.NoError(t, err)
	vols := k.vols[vm]
	require.Len(t, vols, 1)
	p := newProxied(t, export.Scheme+"://"+export.Host, pool, seed, func(proxy *faultproxy.Proxy, dir string) []string {
		return []string{"--token-file", tokenFile, "--ca-file", proxy.CAFile(), "--kubevirt-volume", vols[0],
			"--state-dir", k.stateDir, "--cache-dir", t.TempDir(), "--read-timeout", "1s", "--retries", "4",
			"kubevirt+" + proxy.URL() + export.Path, dir}
	})
	// The path comes from a clean mount: walking a faulted one would stat
	// disk.img.gz, whose first stat reads the whole disk.
	clean := p.mount()
	found := findAll(t, clean.dir, "disk.img")
	require.Len(t, found, 1)
	p.disk = strings.TrimPrefix(found[0], clean.dir+"/")
	clean.stop(t)
	p.secrets["export token"] = strings.TrimSpace(string(token))
	return p
}

// steppingClock never gives the same second twice: the simulator stamps
// creationTimestamp to the second, and the tests take several snapshots of
// a VM within one, which must still list oldest first.
func steppingClock() func() time.Time {
	var mu sync.Mutex
	var last time.Time
	return func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		now := time.Now().Truncate(time.Second)
		if !now.After(last) {
			now = last.Add(time.Second)
		}
		last = now
		return now
	}
}
