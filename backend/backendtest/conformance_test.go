package backendtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// memPlatform is a simulator for the in-memory Source: it keeps live disks
// and turns them into Snapshots (data, exact allocation and change maps).
type memPlatform struct {
	src  *Source
	live map[string]map[string]*memLive // vm -> disk -> live state
	vms  map[string]*VM
	// wrap, when set, turns the client into a mutant.
	wrap func(*memSource) backend.Source
}

type memLive struct {
	data  []byte
	alloc extent.Map
	// touched is what changed since each of the VM's snapshots, by id.
	touched map[string]extent.Map
}

func newMemPlatform() *memPlatform {
	return &memPlatform{src: New(), live: map[string]map[string]*memLive{}, vms: map[string]*VM{}}
}

func (p *memPlatform) AddVM(t testing.TB, vm string, disks ...DiskSpec) {
	v := &VM{ID: vm}
	p.vms[vm] = v
	p.live[vm] = map[string]*memLive{}
	for _, d := range disks {
		p.live[vm][d.Name] = &memLive{data: make([]byte, d.Size), touched: map[string]extent.Map{}}
	}
	p.src.AddVM(v)
}

func (p *memPlatform) disk(t testing.TB, vm, disk string) *memLive {
	l, ok := p.live[vm][disk]
	require.True(t, ok, "no disk %s/%s", vm, disk)
	return l
}

func (p *memPlatform) change(l *memLive, off, n int64) {
	e := extent.Map{}
	if n > 0 {
		e, _ = extent.Normalize([]extent.Extent{{Off: off, Len: n}}, int64(len(l.data)))
	}
	for id, m := range l.touched {
		l.touched[id] = m.Union(e)
	}
}

func (p *memPlatform) Write(t testing.TB, vm, disk string, off int64, data []byte) {
	l := p.disk(t, vm, disk)
	copy(l.data[off:], data)
	m, err := extent.Normalize([]extent.Extent{{Off: off, Len: int64(len(data))}}, int64(len(l.data)))
	require.NoError(t, err)
	l.alloc = l.alloc.Union(m)
	p.change(l, off, int64(len(data)))
}

func (p *memPlatform) Discard(t testing.TB, vm, disk string, off, n int64) {
	l := p.disk(t, vm, disk)
	clear(l.data[off : off+n])
	m, err := extent.Normalize([]extent.Extent{{Off: off, Len: n}}, int64(len(l.data)))
	require.NoError(t, err)
	l.alloc = l.alloc.Subtract(m)
	p.change(l, off, n)
}

func (p *memPlatform) Snapshot(t testing.TB, vm string) string {
	sn, err := p.take(vm)
	require.NoError(t, err)
	return sn.ID
}

// take makes a snapshot of the live disks, holding the Source's lock.
func (p *memPlatform) take(vm string) (backend.Snapshot, error) {
	v, ok := p.vms[vm]
	if !ok {
		return backend.Snapshot{}, fmt.Errorf("snapshot of %q: %w", vm, backend.ErrNotFound)
	}
	p.src.mu.Lock()
	defer p.src.mu.Unlock()
	p.src.nextID++
	sn := &Snapshot{Snapshot: backend.Snapshot{ID: fmt.Sprintf("mem-%d", p.src.nextID), Created: p.src.Created.Add(time.Duration(p.src.nextID) * time.Second)}}
	names := make([]string, 0, len(p.live[vm]))
	for name := range p.live[vm] {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		l := p.live[vm][name]
		d := &Disk{Info: backend.DiskInfo{ID: name, Device: name}, Data: slices.Clone(l.data), Allocated: l.alloc, Changed: map[string]extent.Map{}}
		for id, m := range l.touched {
			d.Changed[id] = m
		}
		l.touched[sn.ID] = extent.Map{}
		sn.Disks = append(sn.Disks, d)
	}
	v.Snapshots = append(v.Snapshots, sn)
	out := sn.Snapshot
	for _, d := range sn.Disks {
		out.Disks = append(out.Disks, d.Info)
	}
	return out, nil
}

func (p *memPlatform) Source(testing.TB) backend.Source {
	ms := &memSource{Source: p.src, p: p}
	if p.wrap != nil {
		return p.wrap(ms)
	}
	return ms
}

func (p *memPlatform) OpenResources() int { return int(p.src.OpenNow()) }

// memSource is the in-memory Source whose CreateSnapshot snapshots the live
// disks (Source's own shares the latest snapshot's: it has no live disks).
type memSource struct {
	*Source
	p *memPlatform
}

func (m *memSource) CreateSnapshot(_ context.Context, vm, _ string) (backend.Snapshot, error) {
	m.Calls.Creates.Add(1)
	return m.p.take(vm)
}

func memHarness(wrap func(*memSource) backend.Source) Harness {
	return Harness{
		New: func(t *testing.T) Platform {
			p := newMemPlatform()
			p.wrap = wrap
			return p
		},
		Capabilities: Capabilities{Granularity: 1, Delta: true, Settle: 100 * time.Millisecond},
	}
}

// TestConformance is the self-check: the in-memory Source passes its own
// suite. TestSuiteCatchesMutants reruns it in a child process with a mutant
// named by mutantEnv, where it must fail: a failing suite fails its test.
func TestConformance(t *testing.T) {
	kind := os.Getenv(mutantEnv)
	if kind == "" {
		Run(t, memHarness(nil))
		return
	}
	if _, ok := mutants[kind]; !ok {
		t.Fatalf("%s=%s: no such mutant", mutantEnv, kind)
	}
	Run(t, memHarness(func(m *memSource) backend.Source { return mutant{m, kind} }))
}

// TestConformanceNoChangeTracking: a DeltaOpener that cannot compare
// (ErrUnsupported) passes when the harness does not claim deltas.
func TestConformanceNoChangeTracking(t *testing.T) {
	h := memHarness(func(m *memSource) backend.Source {
		m.NoChangeTracking = true
		return m
	})
	h.Delta = false
	Run(t, h)
}

// Mutants: the in-memory Source with one contract violation each, and the
// subtest of the suite that must catch it.
var mutants = map[string]string{
	"size":     "Size",         // the last partial sector is lost
	"byte":     "ReadAt",       // the disk's last byte is wrong
	"hole":     "ReadAt",       // holes read as garbage
	"alloc":    "Allocated",    // the last data extent is missing from the map
	"order":    "Listing",      // snapshots newest first
	"notfound": "NotFound",     // errors lose ErrNotFound
	"range":    "OutOfRange",   // reads past the end succeed
	"delta":    "Delta",        // the changed map misses an extent
	"closed":   "Close",        // Disk.Close does nothing
	"delete":   "CreateDelete", // DeleteSnapshot does nothing
}

type mutant struct {
	*memSource
	kind string
}

func (m mutant) Snapshots(ctx context.Context, vm string) ([]backend.Snapshot, error) {
	s, err := m.memSource.Snapshots(ctx, vm)
	if m.kind == "order" {
		slices.Reverse(s)
	}
	return s, err
}

func (m mutant) OpenDisk(ctx context.Context, r backend.DiskRef) (backend.Disk, error) {
	d, err := m.memSource.OpenDisk(ctx, r)
	if err != nil {
		if m.kind == "notfound" {
			err = errors.New(err.Error())
		}
		return nil, err
	}
	return mutantDisk{d, m.kind}, nil
}

func (m mutant) OpenDelta(ctx context.Context, r, base backend.DiskRef) (backend.Disk, extent.Map, error) {
	d, changed, err := m.memSource.OpenDelta(ctx, r, base)
	if err != nil {
		return nil, changed, err
	}
	if n := changed.Len(); m.kind == "delta" && n > 0 {
		last, _ := extent.Normalize(changed.Extents()[n-1:], d.Size())
		changed = changed.Subtract(last)
	}
	return mutantDisk{d, m.kind}, changed, nil
}

func (m mutant) DeleteSnapshot(ctx context.Context, vm, id string) error {
	if m.kind == "delete" {
		return nil
	}
	return m.memSource.DeleteSnapshot(ctx, vm, id)
}

type mutantDisk struct {
	backend.Disk
	kind string
}

func (d mutantDisk) Size() int64 {
	if d.kind == "size" {
		return d.Disk.Size() &^ 511
	}
	return d.Disk.Size()
}

func (d mutantDisk) Allocated() extent.Map {
	m := d.Disk.Allocated()
	if n := m.Len(); d.kind == "alloc" && n > 0 {
		last, _ := extent.Normalize(m.Extents()[n-1:], d.Disk.Size())
		return m.Subtract(last)
	}
	return m
}

func (d mutantDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	size := d.Disk.Size()
	if d.kind == "range" && off >= 0 && off+int64(len(p)) > size {
		clear(p)
		if off < size {
			return d.Disk.ReadAt(ctx, p[:size-off], off)
		}
		return nil
	}
	if err := d.Disk.ReadAt(ctx, p, off); err != nil {
		return err
	}
	switch {
	case d.kind == "byte" && off+int64(len(p)) == size && len(p) > 0:
		p[len(p)-1] ^= 0x40
	case d.kind == "hole":
		alloc := d.Disk.Allocated()
		for i := range p {
			if !alloc.Contains(off+int64(i), 1) {
				p[i] = 0xEE
			}
		}
	}
	return nil
}

func (d mutantDisk) Close() error {
	if d.kind == "closed" {
		return nil
	}
	return d.Disk.Close()
}

const mutantEnv = "BACKENDTEST_CONFORMANCE_MUTANT"

// TestSuiteCatchesMutants proves the suite can fail: each mutant must fail
// the suite, in the subtest meant to catch it.
func TestSuiteCatchesMutants(t *testing.T) {
	exe, err := os.Executable()
	require.NoError(t, err)
	for kind, subtest := range mutants {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			cmd := exec.Command(exe, "-test.run=^TestConformance$", "-test.v", "-test.count=1")
			cmd.Env = append(os.Environ(), mutantEnv+"="+kind)
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			require.ErrorAs(t, err, &exit, "the suite passed a mutant that %s breaks:\n%s", subtest, out)
			assert.Contains(t, string(out), "--- FAIL: TestConformance/"+subtest, "the mutant was not caught by %s:\n%s", subtest, out)
		})
	}
}
