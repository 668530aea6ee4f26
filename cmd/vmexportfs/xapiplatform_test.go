package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/xapi/xapitest"
)

// xapiPlatform is the XenServer simulator: JSON-RPC on the pool master,
// data over its xapi-nbd stand-in, CBT for changed blocks.
type xapiPlatform struct {
	sim          *xapitest.Server
	opts         xapitest.Options
	passwordFile string
	caFile       string
	stateDir     string
	cacheDir     string
	extra        []string
	rng          *rand.ChaCha8
	n            int
	named        map[string]string // name_label → uuid of the snapshots Snapshot took
}

// xapiBlock is the granularity of what the pool says about holes without
// NBD block status: the VHD block table's 2 MiB blocks.
const xapiBlock = 2 * mib

func newXapi(t *testing.T, opts xapitest.Options, extra ...string) *xapiPlatform {
	t.Helper()
	requireRoot(t)
	opts.Dir = t.TempDir()
	sim, err := xapitest.Start(opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = sim.Close() })
	dir := t.TempDir()
	pw := filepath.Join(dir, "password")
	require.NoError(t, os.WriteFile(pw, []byte(xapitest.DefaultPassword+"\n"), 0o600))
	ca := filepath.Join(dir, "ca.pem")
	require.NoError(t, os.WriteFile(ca, sim.CAPEM(), 0o600))
	var seed [32]byte
	copy(seed[:], t.Name())
	return &xapiPlatform{sim: sim, opts: opts, passwordFile: pw, caFile: ca, stateDir: t.TempDir(), cacheDir: t.TempDir(),
		extra: extra, rng: rand.NewChaCha8(seed), named: map[string]string{}}
}

// xapiUserdevice is the VBD position of the tests' disk names: xvda is 0.
func xapiUserdevice(t testing.TB, disk string) string {
	if len(disk) != 4 || disk[:3] != "xvd" || disk[3] < 'a' || disk[3] > 'z' {
		t.Fatalf("xapi tests name disks xvda..xvdz, not %q", disk)
	}
	return strconv.Itoa(int(disk[3] - 'a'))
}

func (x *xapiPlatform) Caps() caps {
	// Without NBD a disk is read from its spilled VHD stream.
	return caps{allocationMap: true, mapGranularity: xapiBlock, exactChanges: !x.opts.NoCBT, proxiedBases: true, readsAsServed: x.opts.NBD != xapitest.NBDNone}
}

func (x *xapiPlatform) AddVM(t *testing.T, vm string, disks ...diskSpec) {
	t.Helper()
	spec := xapitest.VMSpec{UUID: vm, Name: vm}
	for _, d := range disks {
		spec.Disks = append(spec.Disks, xapitest.DiskSpec{Userdevice: xapiUserdevice(t, d.name), Size: d.size})
	}
	_, err := x.sim.AddVM(spec)
	require.NoError(t, err)
}

func (x *xapiPlatform) Write(t *testing.T, vm, disk string, off, n int64) {
	t.Helper()
	buf := make([]byte, n)
	x.rng.Read(buf)
	require.NoError(t, x.sim.WriteDisk(vm, xapiUserdevice(t, disk), off, buf))
}

func (x *xapiPlatform) Discard(t *testing.T, vm, disk string, off, n int64) {
	t.Helper()
	require.NoError(t, x.sim.DiscardDisk(vm, xapiUserdevice(t, disk), off, n))
}

// Snapshot enables CBT first, as the pool's backup jobs do, then snapshots
// through the API. It returns the snapshot's name, which is what a mount
// shows (its uuid also resolves).
func (x *xapiPlatform) Snapshot(t *testing.T, vm string) string {
	t.Helper()
	if !x.opts.NoCBT {
		require.NoError(t, x.sim.EnableCBT(vm))
	}
	x.n++
	name := fmt.Sprintf("sched-%03d", x.n)
	id, err := x.sim.TakeSnapshot(vm, name)
	require.NoError(t, err)
	x.named[name] = id
	return name
}

func (x *xapiPlatform) Snapshots(t *testing.T, vm string) []string {
	t.Helper()
	ids, err := x.sim.Snapshots(vm)
	require.NoError(t, err)
	return ids
}

func (x *xapiPlatform) Reference(t *testing.T, vm, snapshot, disk string) string {
	t.Helper()
	if id, ok := x.named[snapshot]; ok {
		snapshot = id
	}
	path, err := x.sim.SnapshotData(snapshot, xapiUserdevice(t, disk))
	require.NoError(t, err)
	return path
}

func (x *xapiPlatform) MountArgs() []string {
	return append(append([]string{
		"--username", xapitest.DefaultUser, "--password-file", x.passwordFile, "--ca-file", x.caFile,
		"--state-dir", x.stateDir, "--cache-dir", x.cacheDir,
	}, x.extra...), "xapi+"+x.sim.URL())
}

func (x *xapiPlatform) CacheDir() string { return x.cacheDir }

// DiskBytes are the bytes served over NBD, or through export_raw_vdi on a
// pool without NBD (where every byte comes from the stream).
func (x *xapiPlatform) DiskBytes() int64 {
	st := x.sim.Stats()
	if x.opts.NBD == xapitest.NBDNone {
		return st.ExportBytes
	}
	return st.NBDBytes
}
