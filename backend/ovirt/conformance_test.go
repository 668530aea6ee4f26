package ovirt_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/backendtest"
	"github.com/vmexportfs/vmexportfs/backend/ovirt"
	"github.com/vmexportfs/vmexportfs/backend/ovirt/ovirttest"
	"github.com/vmexportfs/vmexportfs/backend/retry"
)

// cluster is the simulator's qcow2 cluster: the granularity of its extents
// and of the layers' allocation.
const cluster = 64 << 10

// TestConformance runs the backend contract suite against the simulator:
// through the imageio daemon and, where the daemon cannot be reached,
// through the proxy; with the engine's JSON as the runtime writes it and
// with strings and epoch dates as older engines do.
func TestConformance(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts ovirttest.Options
	}{
		{"daemon", ovirttest.Options{}},
		{"proxy-only", ovirttest.Options{NoTransferURL: true}},
		{"string-scalars", ovirttest.Options{StringScalars: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			backendtest.Run(t, backendtest.Harness{
				New:          func(t *testing.T) backendtest.Platform { return newPlatform(t, tc.opts) },
				Capabilities: backendtest.Capabilities{Granularity: cluster, Delta: true},
			})
		})
	}
}

type platform struct {
	sim *ovirttest.Server
	cfg ovirt.Config
	n   int
}

func testPolicy() retry.Policy {
	return retry.Policy{Attempts: 3, BaseDelay: time.Millisecond, MaxDelay: 5 * time.Millisecond, AttemptTimeout: 10 * time.Second}
}

func newPlatform(t *testing.T, opts ovirttest.Options) *platform {
	opts.Dir = t.TempDir()
	if opts.SnapshotDelay == 0 {
		opts.SnapshotDelay = 20 * time.Millisecond
	}
	if opts.TransferDelay == 0 {
		opts.TransferDelay = 5 * time.Millisecond
	}
	sim, err := ovirttest.Start(opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = sim.Close() })
	return &platform{sim: sim, cfg: ovirt.Config{
		URL: sim.URL(), Username: ovirttest.DefaultUser, Password: ovirttest.DefaultPassword,
		RootCAs: sim.CAPool(), Policy: testPolicy(), PollInterval: 5 * time.Millisecond,
	}}
}

func (p *platform) AddVM(t testing.TB, vm string, disks ...backendtest.DiskSpec) {
	spec := ovirttest.VMSpec{ID: vm, Name: vm}
	for _, d := range disks {
		spec.Disks = append(spec.Disks, ovirttest.DiskSpec{ID: d.Name, Name: d.Name, Size: d.Size})
	}
	_, err := p.sim.AddVM(spec)
	require.NoError(t, err)
}

func (p *platform) Write(t testing.TB, vm, disk string, off int64, data []byte) {
	require.NoError(t, p.sim.WriteDisk(vm, disk, off, data))
}

func (p *platform) Discard(t testing.TB, vm, disk string, off, n int64) {
	require.NoError(t, p.sim.DiscardDisk(vm, disk, off, n))
}

func (p *platform) Snapshot(t testing.TB, vm string) string {
	p.n++
	id, err := p.sim.TakeSnapshot(vm, fmt.Sprintf("backup-%03d", p.n))
	require.NoError(t, err)
	return id
}

func (p *platform) Source(t testing.TB) backend.Source {
	s, err := ovirt.New(context.Background(), p.cfg)
	require.NoError(t, err)
	return s
}

// OpenResources are the image transfers not finished: a Source closed with
// its disks leaves none (each holds a disk snapshot locked on the engine).
func (p *platform) OpenResources() int { return p.sim.Stats().OpenTransfers }
