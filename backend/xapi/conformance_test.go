package xapi_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/backendtest"
	"github.com/vmexportfs/vmexportfs/backend/retry"
	"github.com/vmexportfs/vmexportfs/backend/vhdstream"
	"github.com/vmexportfs/vmexportfs/backend/xapi"
	"github.com/vmexportfs/vmexportfs/backend/xapi/xapitest"
)

// vhdBlock is the granularity of what the pool says without block status:
// the VHD block table's 2 MiB blocks.
const vhdBlock = 2 << 20

// TestConformance runs the backend contract suite against the simulator:
// data over NBD (TLS and not), deltas from CBT and from the VHD delta's
// block table (CBT off, and a pool without CBT at all), and a pool without
// an NBD network, whose disks are spilled.
func TestConformance(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts xapitest.Options
		cbt  bool
	}{
		{"nbd-tls/cbt", xapitest.Options{}, true},
		{"nbd-tls/no-cbt", xapitest.Options{}, false},
		{"insecure-nbd/cbt", xapitest.Options{NBD: xapitest.NBDInsecure}, true},
		{"xenserver-7.1", xapitest.Options{NoCBT: true}, true},
		{"no-nbd/spill", xapitest.Options{NBD: xapitest.NBDNone}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			backendtest.Run(t, backendtest.Harness{
				New: func(t *testing.T) backendtest.Platform { return newPlatform(t, tc.opts, tc.cbt) },
				Capabilities: backendtest.Capabilities{
					Granularity: vhdBlock, Delta: true, SizeUnit: vhdBlock, ListedDisk: listedDisk,
				},
			})
		})
	}
}

// userdevice is the position the suite's disk takes: d0 and e0 first, d1
// second.
func userdevice(name string) string {
	n, err := strconv.Atoi(strings.TrimLeft(name, "abcdefghijklmnopqrstuvwxyz"))
	if err != nil {
		panic("suite disk name without a number: " + name)
	}
	return strconv.Itoa(n)
}

// listedDisk is how the Source names the disk at that position.
func listedDisk(name string) string { return userdevice(name) }

type platform struct {
	sim *xapitest.Server
	cfg xapi.Config
	cbt bool
	n   int
}

func testPolicy() retry.Policy {
	return retry.Policy{Attempts: 3, BaseDelay: time.Millisecond, MaxDelay: 5 * time.Millisecond, AttemptTimeout: 10 * time.Second}
}

func newPlatform(t *testing.T, opts xapitest.Options, cbt bool) *platform {
	opts.Dir = t.TempDir()
	sim, err := xapitest.Start(opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = sim.Close() })
	return &platform{sim: sim, cbt: cbt, cfg: xapi.Config{
		URL: sim.URL(), Username: xapitest.DefaultUser, Password: xapitest.DefaultPassword,
		RootCAs: sim.CAPool(), EnableCBT: cbt, Policy: testPolicy(),
		SpillDir: t.TempDir(), SpillBudget: vhdstream.NewBudget(1 << 30),
	}}
}

func (p *platform) AddVM(t testing.TB, vm string, disks ...backendtest.DiskSpec) {
	spec := xapitest.VMSpec{UUID: vm, Name: vm}
	for _, d := range disks {
		spec.Disks = append(spec.Disks, xapitest.DiskSpec{Userdevice: userdevice(d.Name), Size: d.Size})
	}
	_, err := p.sim.AddVM(spec)
	require.NoError(t, err)
	if p.cbt {
		require.NoError(t, p.sim.EnableCBT(vm))
	}
}

func (p *platform) Write(t testing.TB, vm, disk string, off int64, data []byte) {
	require.NoError(t, p.sim.WriteDisk(vm, userdevice(disk), off, data))
}

func (p *platform) Discard(t testing.TB, vm, disk string, off, n int64) {
	require.NoError(t, p.sim.DiscardDisk(vm, userdevice(disk), off, n))
}

func (p *platform) Snapshot(t testing.TB, vm string) string {
	p.n++
	id, err := p.sim.TakeSnapshot(vm, fmt.Sprintf("snap-%03d", p.n))
	require.NoError(t, err)
	return id
}

func (p *platform) Source(t testing.TB) backend.Source {
	s, err := xapi.New(context.Background(), p.cfg)
	require.NoError(t, err)
	return s
}

// OpenResources are the NBD connections (each a disk plugged into dom0)
// and the sessions: a Source closed with its disks leaves neither.
func (p *platform) OpenResources() int {
	st := p.sim.Stats()
	return st.NBDConns + st.Sessions
}

func backendDisk(name string, size int64) backendtest.DiskSpec {
	return backendtest.DiskSpec{Name: name, Size: size}
}
