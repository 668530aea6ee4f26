package jdcloud_test

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/backendtest"
	"github.com/vmexportfs/vmexportfs/backend/qemutest"
	"github.com/vmexportfs/vmexportfs/backend/testenv"
)

// TestConformance runs the backend contract suite against the simulator
// and a real S3 server: a VM is an instance, a snapshot an export of an
// image of it, made by qemu-img from the suite's writes. Instances are
// listed through their exports, so the suite's VM without a snapshot could
// not be: it runs with one VM and one snapshot.
func TestConformance(t *testing.T) {
	testenv.RequireTool(t, "qemu-img")
	backendtest.Run(t, backendtest.Harness{
		New: func(t *testing.T) backendtest.Platform { return newConformancePlatform(t) },
		Capabilities: backendtest.Capabilities{
			OneSnapshot: true, OneDisk: true, Granularity: 64 << 10, SizeUnit: 512,
			ListedDisk: func(string) string { return "disk" },
		},
	})
}

type conformancePlatform struct {
	*cloud
	live map[string][]byte
	dir  string
	n    int // snapshots taken
}

// newConformancePlatform exports an instance's disk as it is when the
// simulator asks for it: qemu-img converts the live bytes.
func newConformancePlatform(t *testing.T) *conformancePlatform {
	p := &conformancePlatform{live: map[string][]byte{}, dir: t.TempDir()}
	p.cloud = newCloudWith(t, p.image)
	return p
}

func (p *conformancePlatform) image(instance string) (string, error) {
	return qemutest.QCOW2(p.dir, p.live[instance])
}

func (p *conformancePlatform) AddVM(t testing.TB, vm string, disks ...backendtest.DiskSpec) {
	require.Len(t, disks, 1, "an export is the system disk")
	require.NoError(t, p.sim.AddInstance(vm, vm))
	p.live[vm] = make([]byte, (disks[0].Size+511)/512*512)
}

func (p *conformancePlatform) Write(t testing.TB, vm, _ string, off int64, data []byte) {
	copy(p.live[vm][off:], data)
}

func (p *conformancePlatform) Snapshot(t testing.TB, vm string) string {
	p.n++
	p.export(t.(*testing.T), vm, fmt.Sprintf("%s-%03d", vm, p.n))
	src := p.source(t.(*testing.T))
	snaps, err := src.Snapshots(t.(*testing.T).Context(), vm)
	require.NoError(t, err)
	return snaps[len(snaps)-1].ID
}

func (p *conformancePlatform) Source(t testing.TB) backend.Source { return p.source(t.(*testing.T)) }
