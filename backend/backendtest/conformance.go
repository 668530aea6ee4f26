package backendtest

// The conformance suite: one set of checks of the backend contract that
// every platform's tests run against its simulator. The suite drives the
// simulator through Platform (add VMs, write and discard bytes of their live
// disks, take snapshots), keeps its own model of what every snapshot must
// hold, and then checks a Source, a client of that simulator, against the
// model: listing, sizes, allocation maps, reads, errors, changed maps,
// snapshot creation and deletion, and what Close releases.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// DiskSpec is a disk the suite asks a platform to create: all holes, Size
// bytes. The platform's DiskInfo for it has Name as its ID, Key or Device.
type DiskSpec struct {
	Name string
	Size int64
}

// Platform is the simulator side of a harness, in the suite's words. Methods
// fail t (require) when the simulator refuses.
type Platform interface {
	// AddVM creates a VM with id vm (the Source lists it as VM.ID) and
	// empty disks.
	AddVM(t testing.TB, vm string, disks ...DiskSpec)
	// Write writes data into the VM's live disk at off.
	Write(t testing.TB, vm, disk string, off int64, data []byte)
	// Snapshot takes a snapshot of the VM's live disks the way the platform
	// does, outside the Source under test, and returns its id as the
	// Source lists it.
	Snapshot(t testing.TB, vm string) string
	// Source returns a new client of the simulator. The suite closes it.
	Source(t testing.TB) backend.Source
}

// Discarder is implemented by a Platform that can discard (punch holes in)
// a live disk: the range then reads as zeros. Without it the suite makes no
// discards.
type Discarder interface {
	Discard(t testing.TB, vm, disk string, off, n int64)
}

// ResourceCounter is implemented by a Platform that can count what clients
// hold open on (or towards) the simulator: connections, transfers, exports.
// The Close check then requires the count to come back to what it was
// before the Source was made, once its disks and itself are closed.
type ResourceCounter interface {
	OpenResources() int
}

// Capabilities say which optional parts of the contract the platform
// offers, so the suite checks them exactly rather than guessing.
type Capabilities struct {
	// Granularity is the block size of the platform's allocation and change
	// maps, in bytes: every extent they report lies inside the ranges
	// written or discarded, each rounded out to multiples of Granularity.
	// 1 is byte-exact; 0 checks the maps only for covering the data (a
	// superset of any size passes).
	Granularity int64
	// NoAllocationMap: the platform cannot tell data from holes, so
	// Allocated must be extent.Full(Size()).
	NoAllocationMap bool
	// Delta: the Source implements backend.DeltaOpener and compares the
	// suite's snapshots (two snapshots of one VM, same disk); ErrUnsupported
	// then fails. Without it, a DeltaOpener may answer ErrUnsupported.
	Delta bool
	// OneSnapshot: the Source shows a single VM with a single snapshot (a
	// standalone export). The suite then makes one VM ("conf-a") with one
	// snapshot, and skips what needs more.
	OneSnapshot bool
	// OneDisk: the platform's VMs have one disk each (an image in a
	// bucket): conf-a gets only d0.
	OneDisk bool
	// SizeUnit: the platform rounds a new disk's size up to a multiple of
	// this (XenServer's VHD storage: 2 MiB), so the suite expects the
	// rounded size. 0 or 1: sizes are kept to the byte.
	SizeUnit int64
	// ListedDisk, when set, maps the suite's name of a disk (d0, d1, e0) to
	// the ID, Key or Device the Source lists it by, for platforms that
	// name disks by position (XenServer: by userdevice, xvda for the
	// first). The Platform's AddVM makes the same mapping.
	ListedDisk func(name string) string
	// Settle bounds how long the Close check waits for ResourceCounter to
	// come back (servers see a closed connection a little later); default
	// 5 s.
	Settle time.Duration
}

// Harness is what a platform's test gives the suite.
type Harness struct {
	// New starts a simulator (t.Cleanup stops it) with nothing in it. It is
	// called once for the read-only checks and once per check that changes
	// the platform.
	New func(t *testing.T) Platform
	Capabilities
}

// Names the suite gives to what it creates.
const (
	vmA         = "conf-a" // two disks, two snapshots
	vmB         = "conf-b" // one disk, no snapshot
	createdName = "conf-created"
	unknown     = "conf-no-such"
	mib         = int64(1) << 20
	// oddSize is a multiple of neither 512 nor 4096, so the last block is
	// partial whatever a platform's block size.
	oddSize  = 3*mib + 12345
	evenSize = 1 * mib
)

// Run runs the suite. Every check is a subtest: Listing, Size, Allocated,
// ReadAt, OutOfRange, NotFound, Delta, CreateDelete, Close. Delta exists only
// for a source that compares snapshots (or a harness that claims it does)
// and shows two, CreateDelete only for one that creates or deletes them:
// where a check does not apply there is no subtest, not a skipped one.
func Run(t *testing.T, h Harness) {
	t.Helper()
	require.NotNil(t, h.New, "Harness.New")
	require.GreaterOrEqual(t, h.Granularity, int64(0), "Capabilities.Granularity")
	if h.Settle <= 0 {
		h.Settle = 5 * time.Second
	}
	f := build(t, h)
	src := f.p.Source(t)
	t.Cleanup(func() { _ = src.Close() })

	t.Run("Listing", func(t *testing.T) { checkListing(t, f, src) })
	t.Run("Size", func(t *testing.T) { checkSize(t, f, src) })
	t.Run("Allocated", func(t *testing.T) { checkAllocated(t, f, src) })
	t.Run("ReadAt", func(t *testing.T) { checkReadAt(t, f, src) })
	t.Run("OutOfRange", func(t *testing.T) { checkOutOfRange(t, f, src) })
	t.Run("NotFound", func(t *testing.T) { checkNotFound(t, f, src) })
	_, compares := src.(backend.DeltaOpener)
	if (compares || h.Delta) && len(f.vm(vmA).snaps) >= 2 {
		t.Run("Delta", func(t *testing.T) { checkDelta(t, f, src) })
	}
	_, creates := src.(backend.SnapshotCreator)
	_, deletes := src.(backend.SnapshotDeleter)
	if creates || deletes {
		t.Run("CreateDelete", func(t *testing.T) { checkCreateDelete(t, h) })
	}
	t.Run("Close", func(t *testing.T) { checkClose(t, h) })
}

// The model: what the suite did to the live disks, and what each snapshot
// must hold.

type touch struct {
	ext   extent.Extent
	epoch int // snapshots of the VM taken before this write or discard
}

type modelDisk struct {
	spec    DiskSpec
	live    []byte
	touches []touch
}

type modelSnap struct {
	id    string
	epoch int // 1 for the VM's first snapshot
	data  map[string][]byte
}

type modelVM struct {
	id    string
	disks []*modelDisk
	snaps []*modelSnap
}

func (v *modelVM) disk(name string) *modelDisk {
	for _, d := range v.disks {
		if d.spec.Name == name {
			return d
		}
	}
	panic("backendtest: no model disk " + name)
}

// touched is every range written or discarded between the snapshots of
// epochs from (inclusive, 0 = the start) and to (exclusive).
func (d *modelDisk) touched(from, to int) extent.Map {
	var raw []extent.Extent
	for _, tc := range d.touches {
		if tc.epoch >= from && tc.epoch < to {
			raw = append(raw, tc.ext)
		}
	}
	m, err := extent.Normalize(raw, d.spec.Size)
	if err != nil {
		panic(err)
	}
	return m
}

type fixture struct {
	p    Platform
	caps Capabilities
	vms  []*modelVM
}

func (f *fixture) vm(id string) *modelVM {
	for _, v := range f.vms {
		if v.id == id {
			return v
		}
	}
	panic("backendtest: no model VM " + id)
}

// pattern is never zero, so a written byte is always data, and differs from
// one seed to the next, so a rewrite is seen.
func pattern(seed byte, off int64, n int64) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte((off+int64(i))*131+int64(seed)*17) | 1
	}
	return p
}

func (f *fixture) addVM(t testing.TB, id string, disks ...DiskSpec) *modelVM {
	f.p.AddVM(t, id, disks...)
	v := &modelVM{id: id}
	for _, d := range disks {
		if u := f.caps.SizeUnit; u > 1 {
			d.Size = (d.Size + u - 1) / u * u
		}
		v.disks = append(v.disks, &modelDisk{spec: d, live: make([]byte, d.Size)})
	}
	f.vms = append(f.vms, v)
	return v
}

func (f *fixture) write(t testing.TB, v *modelVM, disk string, off, n int64, seed byte) {
	d := v.disk(disk)
	data := pattern(seed, off, n)
	f.p.Write(t, v.id, disk, off, data)
	copy(d.live[off:], data)
	d.touches = append(d.touches, touch{extent.Extent{Off: off, Len: n}, len(v.snaps)})
}

func (f *fixture) discard(t testing.TB, v *modelVM, disk string, off, n int64) bool {
	dp, ok := f.p.(Discarder)
	if !ok {
		return false
	}
	d := v.disk(disk)
	dp.Discard(t, v.id, disk, off, n)
	clear(d.live[off : off+n])
	d.touches = append(d.touches, touch{extent.Extent{Off: off, Len: n}, len(v.snaps)})
	return true
}

func (f *fixture) snapshot(t testing.TB, v *modelVM) *modelSnap {
	id := f.p.Snapshot(t, v.id)
	require.NotEmpty(t, id, "Platform.Snapshot of %s returned no id", v.id)
	return f.recordSnapshot(v, id)
}

func (f *fixture) recordSnapshot(v *modelVM, id string) *modelSnap {
	s := &modelSnap{id: id, epoch: len(v.snaps) + 1, data: map[string][]byte{}}
	for _, d := range v.disks {
		s.data[d.spec.Name] = slices.Clone(d.live)
	}
	v.snaps = append(v.snaps, s)
	return s
}

// build makes the suite's platform state:
//
//	conf-a  d0 (oddSize): data at the start, across 1 MiB, at the very end
//	        d1 (1 MiB):   one aligned 4 KiB block
//	        snapshot 1
//	        d0: a rewrite inside data, new data in a hole, a discard
//	        snapshot 2
//	        d0, d1: writes that no snapshot may show
//	conf-b  e0 (1 MiB), never snapshotted
func build(t *testing.T, h Harness) *fixture {
	t.Helper()
	f := &fixture{p: h.New(t), caps: h.Capabilities}
	disks := []DiskSpec{{"d0", oddSize}, {"d1", evenSize}}
	if h.OneDisk {
		disks = disks[:1]
	}
	a := f.addVM(t, vmA, disks...)
	if !h.OneSnapshot {
		f.addVM(t, vmB, DiskSpec{"e0", evenSize})
	}
	f.write(t, a, "d0", 0, 5000, 1)
	f.write(t, a, "d0", mib-100, 70000, 2)
	f.write(t, a, "d0", oddSize-3000, 3000, 3)
	if !h.OneDisk {
		f.write(t, a, "d1", 4096, 4096, 4)
	}
	f.snapshot(t, a)
	if !h.OneSnapshot {
		f.write(t, a, "d0", mib+10, 20, 5)
		f.write(t, a, "d0", 2*mib+12289, 777, 6)
		f.discard(t, a, "d0", 0, 5000)
		f.snapshot(t, a)
	}
	f.write(t, a, "d0", 100, 100, 7)
	if !h.OneDisk {
		f.write(t, a, "d1", 0, 10, 8)
	}
	return f
}

// Lookups in what the Source lists.

// ctxFor is the context of the suite's calls: the test's, ended when it
// ends (go test's -timeout bounds a platform that hangs).
func ctxFor(t testing.TB) context.Context { return t.Context() }

// findDisk is the listed disk the suite calls name (or the platform lists
// as, see Capabilities.ListedDisk): by ID, else Key, else Device.
func (f *fixture) findDisk(infos []backend.DiskInfo, name string) (backend.DiskInfo, bool) {
	if f.caps.ListedDisk != nil {
		name = f.caps.ListedDisk(name)
	}
	for _, match := range []func(backend.DiskInfo) bool{
		func(d backend.DiskInfo) bool { return d.ID == name },
		func(d backend.DiskInfo) bool { return d.Key == name },
		func(d backend.DiskInfo) bool { return d.Device == name },
	} {
		if i := slices.IndexFunc(infos, match); i >= 0 {
			return infos[i], true
		}
	}
	return backend.DiskInfo{}, false
}

func listed(t testing.TB, src backend.Source, vm, snapID string) backend.Snapshot {
	t.Helper()
	snaps, err := src.Snapshots(ctxFor(t), vm)
	require.NoError(t, err, "Snapshots(%s)", vm)
	i := slices.IndexFunc(snaps, func(s backend.Snapshot) bool { return s.ID == snapID })
	require.GreaterOrEqual(t, i, 0, "Snapshots(%s) does not list %s", vm, snapID)
	return snaps[i]
}

func (f *fixture) ref(t testing.TB, src backend.Source, vm, snapID, disk string) backend.DiskRef {
	t.Helper()
	sn := listed(t, src, vm, snapID)
	info, ok := f.findDisk(sn.Disks, disk)
	require.True(t, ok, "snapshot %s/%s lists no disk %s: %+v", vm, snapID, disk, sn.Disks)
	return backend.DiskRef{VM: vm, Snapshot: snapID, Disk: info.ID}
}

func open(t testing.TB, src backend.Source, r backend.DiskRef) backend.Disk {
	t.Helper()
	d, err := src.OpenDisk(ctxFor(t), r)
	require.NoError(t, err, "OpenDisk(%+v)", r)
	t.Cleanup(func() { _ = d.Close() })
	return d
}

// each runs check on every disk of every snapshot of the model, as a subtest
// named vm/snapshot#/disk.
func (f *fixture) each(t *testing.T, check func(t *testing.T, v *modelVM, s *modelSnap, d *modelDisk)) {
	for _, v := range f.vms {
		for i, s := range v.snaps {
			for _, d := range v.disks {
				t.Run(fmt.Sprintf("%s/snap%d/%s", v.id, i+1, d.spec.Name), func(t *testing.T) { check(t, v, s, d) })
			}
		}
	}
}

// Map helpers.

// nonZero is where data holds non-zero bytes: what an allocation map must
// cover.
func nonZero(data []byte) extent.Map {
	var raw []extent.Extent
	for i := 0; i < len(data); {
		if data[i] == 0 {
			i++
			continue
		}
		j := i
		for j < len(data) && data[j] != 0 {
			j++
		}
		raw = append(raw, extent.Extent{Off: int64(i), Len: int64(j - i)})
		i = j
	}
	m, _ := extent.Normalize(raw, int64(len(data)))
	return m
}

// roundOut widens every extent to multiples of g, within size.
func roundOut(m extent.Map, g, size int64) extent.Map {
	var raw []extent.Extent
	for _, e := range m.Extents() {
		lo := e.Off / g * g
		hi := min((e.End()+g-1)/g*g, size)
		raw = append(raw, extent.Extent{Off: lo, Len: hi - lo})
	}
	out, err := extent.Normalize(raw, size)
	if err != nil {
		panic(err)
	}
	return out
}

// missing is the part of want that m does not cover.
func missing(want, m extent.Map) extent.Map { return want.Subtract(m) }

func within(t testing.TB, m extent.Map, size int64, what string) {
	t.Helper()
	if n := m.Len(); n > 0 {
		last := m.Extents()[n-1]
		assert.LessOrEqual(t, last.End(), size, "%s runs past the disk's %d bytes: last extent %+v", what, size, last)
	}
}

func short(m extent.Map) string {
	s := m.Format()
	if len(s) > 400 {
		s = s[:400] + "…"
	}
	return s
}

// The checks.

func checkListing(t *testing.T, f *fixture, src backend.Source) {
	ctx := ctxFor(t)
	vms, err := src.VMs(ctx)
	require.NoError(t, err, "VMs")
	ids := map[string]bool{}
	for _, v := range vms {
		assert.False(t, ids[v.ID], "VMs lists %q twice", v.ID)
		ids[v.ID] = true
	}
	for _, mv := range f.vms {
		i := slices.IndexFunc(vms, func(v backend.VM) bool { return v.ID == mv.id })
		if !assert.GreaterOrEqual(t, i, 0, "VMs does not list %s: %+v", mv.id, vms) {
			continue
		}
		// VM.Disks is optional (the filesystem reads snapshots' disks), but
		// what is listed must be the VM's.
		if got := vms[i].Disks; len(got) > 0 {
			for _, d := range mv.disks {
				_, ok := f.findDisk(got, d.spec.Name)
				assert.True(t, ok, "VM %s lists disks %+v, without %s", mv.id, got, d.spec.Name)
			}
		}
	}

	for _, mv := range f.vms {
		snaps, err := src.Snapshots(ctx, mv.id)
		if !assert.NoError(t, err, "Snapshots(%s)", mv.id) {
			continue
		}
		var got, want []string
		for _, s := range snaps {
			got = append(got, s.ID)
		}
		for _, s := range mv.snaps {
			want = append(want, s.id)
		}
		assert.Equal(t, want, got, "Snapshots(%s): ids, oldest first", mv.id)
		identity := map[string]string{} // model disk -> identity, across snapshots
		for i, s := range snaps {
			if i > 0 && !s.Created.IsZero() && !snaps[i-1].Created.IsZero() {
				assert.False(t, s.Created.Before(snaps[i-1].Created), "Snapshots(%s): %s (created %v) listed after the newer %s (%v)",
					mv.id, s.ID, s.Created, snaps[i-1].ID, snaps[i-1].Created)
			}
			seenID, seenIdentity := map[string]bool{}, map[string]bool{}
			for _, d := range s.Disks {
				assert.NotEmpty(t, d.ID, "snapshot %s: a disk without an id: %+v", s.ID, d)
				assert.NotEmpty(t, d.Identity(), "snapshot %s: a disk without an identity: %+v", s.ID, d)
				assert.False(t, seenID[d.ID], "snapshot %s lists disk id %q twice", s.ID, d.ID)
				assert.False(t, seenIdentity[d.Identity()], "snapshot %s: two disks share the identity %q", s.ID, d.Identity())
				seenID[d.ID], seenIdentity[d.Identity()] = true, true
			}
			for _, md := range mv.disks {
				d, ok := f.findDisk(s.Disks, md.spec.Name)
				if !assert.True(t, ok, "snapshot %s/%s does not list disk %s: %+v", mv.id, s.ID, md.spec.Name, s.Disks) {
					continue
				}
				if prev, ok := identity[md.spec.Name]; ok {
					assert.Equal(t, prev, d.Identity(), "disk %s of %s: identity changes between snapshots, so no snapshot is the other's delta base", md.spec.Name, mv.id)
				}
				identity[md.spec.Name] = d.Identity()
			}
		}
	}
}

func checkSize(t *testing.T, f *fixture, src backend.Source) {
	f.each(t, func(t *testing.T, v *modelVM, s *modelSnap, md *modelDisk) {
		r := f.ref(t, src, v.id, s.id, md.spec.Name)
		d := open(t, src, r)
		assert.Equal(t, md.spec.Size, d.Size(), "Size of %+v", r)
		again := open(t, src, r)
		assert.Equal(t, d.Size(), again.Size(), "Size differs between two openings of %+v", r)
	})
}

func checkAllocated(t *testing.T, f *fixture, src backend.Source) {
	f.each(t, func(t *testing.T, v *modelVM, s *modelSnap, md *modelDisk) {
		r := f.ref(t, src, v.id, s.id, md.spec.Name)
		d := open(t, src, r)
		size := md.spec.Size
		alloc := d.Allocated()
		within(t, alloc, size, "Allocated")
		data := nonZero(s.data[md.spec.Name])
		if lost := missing(data, alloc); lost.Len() > 0 {
			t.Errorf("Allocated of %+v misses data (those bytes would read as zeros):\n%s\nAllocated:\n%s", r, short(lost), short(alloc))
		}
		switch {
		case f.caps.NoAllocationMap:
			assert.Equal(t, extent.Full(size).Format(), alloc.Format(), "a platform without maps reports the whole disk")
		case f.caps.Granularity > 0:
			bound := roundOut(md.touched(0, s.epoch), f.caps.Granularity, size)
			if extra := alloc.Subtract(bound); extra.Len() > 0 {
				t.Errorf("Allocated of %+v reports data where nothing was ever written, even at %d-byte granularity:\n%s", r, f.caps.Granularity, short(extra))
			}
		}
		t.Logf("Allocated %d bytes in %d extents; %d bytes hold data", alloc.Bytes(), alloc.Len(), data.Bytes())
		again := open(t, src, r)
		assert.Equal(t, alloc.Format(), again.Allocated().Format(), "Allocated differs between two openings of %+v", r)
	})
}

// readCases are the ranges read from a disk of size bytes whose writes were
// touches: all of it, its edges, the last partial blocks, the exact edges of
// every write (data against hole) and a sweep across block boundaries.
func readCases(size int64, touches extent.Map) []extent.Extent {
	var cs []extent.Extent
	add := func(off, end int64) {
		off, end = max(off, 0), min(end, size)
		if end > off && !slices.Contains(cs, extent.Extent{Off: off, Len: end - off}) {
			cs = append(cs, extent.Extent{Off: off, Len: end - off})
		}
	}
	add(0, size)
	add(0, 1)
	add(size-1, size)
	add(0, 512)
	add(0, 4096)
	for _, block := range []int64{512, 4096, 64 << 10} {
		tail := size % block
		if tail == 0 {
			tail = block
		}
		add(size-tail, size)       // the last (partial) block
		add(size-tail-block, size) // with the full block before it
		add(size-tail-1, size-tail+1)
	}
	for _, e := range touches.Extents() {
		add(e.Off, e.End())
		add(e.Off-1, e.End()+1)
		add(e.Off-4096, e.Off+1)
		add(e.End()-1, e.End()+65536)
	}
	for off := int64(0); off < size; off += 200_003 {
		add(off, off+70_001)
	}
	return cs
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// readEqual reads [e.Off, e.End()) into a buffer full of garbage (so a hole
// not zeroed shows) and compares it with want.
func readEqual(t testing.TB, d backend.Disk, r backend.DiskRef, want []byte, e extent.Extent) bool {
	t.Helper()
	p := bytes.Repeat([]byte{0xEE}, int(e.Len))
	if err := d.ReadAt(ctxFor(t), p, e.Off); err != nil {
		t.Errorf("ReadAt(%+v, %d bytes at %d): %v", r, e.Len, e.Off, err)
		return false
	}
	exp := want[e.Off:e.End()]
	if !bytes.Equal(exp, p) {
		i := firstDiff(exp, p)
		t.Errorf("ReadAt(%+v, %d bytes at %d): byte %d (disk offset %d) is %#x, want %#x",
			r, e.Len, e.Off, i, e.Off+int64(i), p[i], exp[i])
		return false
	}
	return true
}

func checkReadAt(t *testing.T, f *fixture, src backend.Source) {
	f.each(t, func(t *testing.T, v *modelVM, s *modelSnap, md *modelDisk) {
		r := f.ref(t, src, v.id, s.id, md.spec.Name)
		d := open(t, src, r)
		want := s.data[md.spec.Name]
		cases := readCases(md.spec.Size, md.touched(0, 1<<30))
		bad := 0
		for _, e := range cases {
			if !readEqual(t, d, r, want, e) {
				if bad++; bad == 5 {
					t.Errorf("giving up after 5 wrong reads of %d", len(cases))
					return
				}
			}
		}
		for _, off := range []int64{0, md.spec.Size} {
			assert.NoError(t, d.ReadAt(ctxFor(t), []byte{}, off), "a 0-byte read at %d of %+v is inside the disk", off, r)
		}
	})
}

func checkOutOfRange(t *testing.T, f *fixture, src backend.Source) {
	f.each(t, func(t *testing.T, v *modelVM, s *modelSnap, md *modelDisk) {
		r := f.ref(t, src, v.id, s.id, md.spec.Name)
		d := open(t, src, r)
		size := md.spec.Size
		for _, c := range []struct{ off, n int64 }{{size - 1, 2}, {size, 1}, {size + 4096, 512}, {-1, 1}, {-4096, 8192}, {0, size + 1}} {
			err := d.ReadAt(ctxFor(t), make([]byte, c.n), c.off)
			assert.ErrorIs(t, err, backend.ErrInvalid, "ReadAt(%+v, %d bytes at %d) is outside the %d-byte disk", r, c.n, c.off, size)
		}
	})
}

func checkNotFound(t *testing.T, f *fixture, src backend.Source) {
	ctx := ctxFor(t)
	a := f.vm(vmA)
	snap := a.snaps[0]
	good := f.ref(t, src, a.id, snap.id, "d0")

	_, err := src.Snapshots(ctx, unknown)
	assert.ErrorIs(t, err, backend.ErrNotFound, "Snapshots of an unknown VM")
	refs := map[string]backend.DiskRef{
		"unknown VM":       {VM: unknown, Snapshot: snap.id, Disk: good.Disk},
		"unknown snapshot": {VM: a.id, Snapshot: unknown, Disk: good.Disk},
		"unknown disk":     {VM: a.id, Snapshot: snap.id, Disk: unknown},
	}
	if !f.caps.OneSnapshot {
		refs["another VM's snapshot"] = backend.DiskRef{VM: vmB, Snapshot: snap.id, Disk: good.Disk}
	}
	for what, r := range refs {
		d, err := src.OpenDisk(ctx, r)
		if !assert.ErrorIs(t, err, backend.ErrNotFound, "OpenDisk, %s: %+v", what, r) && d != nil {
			_ = d.Close()
		}
	}
	do, ok := src.(backend.DeltaOpener)
	if !ok || len(a.snaps) < 2 {
		return
	}
	newer := f.ref(t, src, a.id, a.snaps[1].id, "d0")
	for what, c := range map[string][2]backend.DiskRef{
		"unknown base":     {newer, {VM: a.id, Snapshot: unknown, Disk: good.Disk}},
		"unknown snapshot": {{VM: a.id, Snapshot: unknown, Disk: newer.Disk}, good},
		"unknown disk":     {{VM: a.id, Snapshot: newer.Snapshot, Disk: unknown}, {VM: a.id, Snapshot: good.Snapshot, Disk: unknown}},
	} {
		d, _, err := do.OpenDelta(ctx, c[0], c[1])
		if d != nil {
			_ = d.Close()
		}
		if !f.caps.Delta && errors.Is(err, backend.ErrUnsupported) {
			continue
		}
		assert.ErrorIs(t, err, backend.ErrNotFound, "OpenDelta, %s: %+v since %+v", what, c[0], c[1])
	}
}

func checkDelta(t *testing.T, f *fixture, src backend.Source) {
	do, ok := src.(backend.DeltaOpener)
	if !ok {
		t.Fatalf("Capabilities.Delta, but %T does not implement backend.DeltaOpener", src)
	}
	a := f.vm(vmA)
	base, cur := a.snaps[0], a.snaps[1]
	for _, md := range a.disks {
		t.Run(md.spec.Name, func(t *testing.T) {
			r := f.ref(t, src, a.id, cur.id, md.spec.Name)
			b := f.ref(t, src, a.id, base.id, md.spec.Name)
			d, changed, err := do.OpenDelta(ctxFor(t), r, b)
			if !f.caps.Delta && errors.Is(err, backend.ErrUnsupported) {
				// Allowed without the capability: the filesystem then
				// makes a delta of everything written.
				t.Logf("the platform cannot compare these snapshots: %v", err)
				return
			}
			require.NoError(t, err, "OpenDelta(%+v since %+v)", r, b)
			t.Cleanup(func() { _ = d.Close() })
			size := md.spec.Size
			assert.Equal(t, size, d.Size(), "Size of the delta's disk")
			plain := open(t, src, r)
			assert.Equal(t, plain.Allocated().Format(), d.Allocated().Format(), "Allocated of the delta's disk and of OpenDisk differ")
			readEqual(t, d, r, cur.data[md.spec.Name], extent.Extent{Off: 0, Len: size})
			within(t, changed, size, "the changed map")

			since := md.touched(base.epoch, cur.epoch)
			if lost := missing(since, changed); lost.Len() > 0 {
				t.Errorf("the changed map of %+v since %s misses ranges written or discarded since (a delta would keep stale data):\n%s\nchanged:\n%s", r, b.Snapshot, short(lost), short(changed))
			}
			if g := f.caps.Granularity; g > 0 {
				bound := roundOut(since, g, size)
				if extra := changed.Subtract(bound); extra.Len() > 0 {
					t.Errorf("the changed map of %+v reports ranges nothing touched since %s, even at %d-byte granularity:\n%s", r, b.Snapshot, g, short(extra))
				}
			}
			// A superset is allowed (the filesystem copies a little more);
			// say how much more.
			t.Logf("changed map: %d bytes in %d extents for %d bytes written or discarded (a superset is allowed)", changed.Bytes(), changed.Len(), since.Bytes())

			require.NoError(t, d.Close(), "Close of the delta's disk")
			assert.Error(t, d.ReadAt(ctxFor(t), make([]byte, 1), 0), "ReadAt after Close of the delta's disk")
		})
	}
}

func checkCreateDelete(t *testing.T, h Harness) {
	f := build(t, h)
	src := f.p.Source(t)
	t.Cleanup(func() { _ = src.Close() })
	creator, canCreate := src.(backend.SnapshotCreator)
	deleter, canDelete := src.(backend.SnapshotDeleter)
	ctx := ctxFor(t)
	a := f.vm(vmA)
	ids := func() []string {
		t.Helper()
		snaps, err := src.Snapshots(ctx, a.id)
		require.NoError(t, err, "Snapshots(%s)", a.id)
		var out []string
		for _, s := range snaps {
			out = append(out, s.ID)
		}
		return out
	}
	before := ids()
	target := a.snaps[len(a.snaps)-1].id // what to delete, without a creator
	if canCreate {
		sn, err := creator.CreateSnapshot(ctx, a.id, createdName)
		require.NoError(t, err, "CreateSnapshot(%s)", a.id)
		require.NotEmpty(t, sn.ID, "CreateSnapshot returned no id")
		if sn.Pending != "" {
			sn = waitReady(t, src, a.id, sn)
		}
		assert.NotContains(t, before, sn.ID, "CreateSnapshot returned an existing snapshot's id")
		for _, md := range a.disks {
			_, ok := f.findDisk(sn.Disks, md.spec.Name)
			assert.True(t, ok, "the created snapshot's disks %+v lack %s", sn.Disks, md.spec.Name)
		}
		created := f.recordSnapshot(a, sn.ID)
		after := ids()
		require.Contains(t, after, sn.ID, "Snapshots after CreateSnapshot")
		assert.Equal(t, before, slices.DeleteFunc(slices.Clone(after), func(id string) bool { return id == sn.ID }), "the other snapshots, in their order")
		if after[len(after)-1] != sn.ID {
			// Oldest first: the new one is last, unless the platform's
			// clock cannot tell it from an older one.
			newest := listed(t, src, a.id, sn.ID)
			tie := false
			for _, id := range after {
				if o := listed(t, src, a.id, id); id != sn.ID && !newest.Created.IsZero() && o.Created.Equal(newest.Created) {
					tie = true
				}
			}
			if tie {
				t.Logf("NOTE: the created snapshot is not listed last, but its Created (%v) equals an older one's: the platform cannot order them", newest.Created)
			} else {
				t.Errorf("Snapshots after CreateSnapshot lists %s, not last (oldest first): %v", sn.ID, after)
			}
		}
		for _, md := range a.disks {
			r := f.ref(t, src, a.id, sn.ID, md.spec.Name)
			d := open(t, src, r)
			assert.Equal(t, md.spec.Size, d.Size(), "Size of %+v", r)
			readEqual(t, d, r, created.data[md.spec.Name], extent.Extent{Off: 0, Len: md.spec.Size})
		}
		target = sn.ID
	}
	if !canDelete {
		return
	}
	r := f.ref(t, src, a.id, target, "d0")
	require.NoError(t, deleter.DeleteSnapshot(ctx, a.id, target), "DeleteSnapshot(%s, %s)", a.id, target)
	assert.NotContains(t, ids(), target, "Snapshots after DeleteSnapshot")
	d, err := src.OpenDisk(ctx, r)
	if !assert.ErrorIs(t, err, backend.ErrNotFound, "OpenDisk of a deleted snapshot") && d != nil {
		_ = d.Close()
	}
	assert.ErrorIs(t, deleter.DeleteSnapshot(ctx, a.id, target), backend.ErrNotFound, "deleting a deleted snapshot")
	assert.ErrorIs(t, deleter.DeleteSnapshot(ctx, a.id, unknown), backend.ErrNotFound, "deleting an unknown snapshot")
	assert.ErrorIs(t, deleter.DeleteSnapshot(ctx, unknown, unknown), backend.ErrNotFound, "deleting a snapshot of an unknown VM")
	if len(a.snaps) > 1 && !h.OneSnapshot {
		// Another VM's snapshot is not this VM's to delete.
		other := a.snaps[0].id
		assert.Error(t, deleter.DeleteSnapshot(ctx, vmB, other), "deleting %s's snapshot %s through %s", a.id, other, vmB)
		assert.Contains(t, ids(), other, "a snapshot deleted through another VM is gone")
	}
}

// waitReady waits until a snapshot CreateSnapshot returned pending is
// listed ready: still listed (with its id) all the while, and not to be
// opened before.
func waitReady(t *testing.T, src backend.Source, vm string, sn backend.Snapshot) backend.Snapshot {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		got := listed(t, src, vm, sn.ID)
		if got.Pending == "" {
			return got
		}
		require.True(t, time.Now().Before(deadline), "snapshot %s still pending after a minute: %q", sn.ID, got.Pending)
		time.Sleep(10 * time.Millisecond)
	}
}

// mustNotPanic runs f and fails t if it panics.
func mustNotPanic(t testing.TB, what string, f func()) {
	t.Helper()
	defer func() {
		if r := recover(); r != nil {
			t.Errorf("%s panicked: %v", what, r)
		}
	}()
	f()
}

func checkClose(t *testing.T, h Harness) {
	f := build(t, h)
	rc, counted := f.p.(ResourceCounter)
	baseline := 0
	if counted {
		baseline = rc.OpenResources()
	}
	src := f.p.Source(t)
	ctx := ctxFor(t)
	var disks []backend.Disk
	var refs []backend.DiskRef
	for _, v := range f.vms {
		for _, s := range v.snaps {
			for _, md := range v.disks {
				r := f.ref(t, src, v.id, s.id, md.spec.Name)
				d, err := src.OpenDisk(ctx, r)
				require.NoError(t, err, "OpenDisk(%+v)", r)
				require.NoError(t, d.ReadAt(ctx, make([]byte, 4096), 0), "ReadAt(%+v)", r)
				disks, refs = append(disks, d), append(refs, r)
			}
		}
	}
	if do, ok := src.(backend.DeltaOpener); ok && !h.OneSnapshot {
		a := f.vm(vmA)
		r, b := f.ref(t, src, a.id, a.snaps[1].id, "d0"), f.ref(t, src, a.id, a.snaps[0].id, "d0")
		d, _, err := do.OpenDelta(ctx, r, b)
		if err == nil {
			require.NoError(t, d.ReadAt(ctx, make([]byte, 4096), 0), "ReadAt of a delta's disk")
			disks, refs = append(disks, d), append(refs, r)
		} else if h.Delta || !errors.Is(err, backend.ErrUnsupported) {
			t.Errorf("OpenDelta(%+v since %+v): %v", r, b, err)
		}
	}
	if counted {
		t.Logf("open resources: %d before the source, %d with %d disks open", baseline, rc.OpenResources(), len(disks))
	}
	for i, d := range disks {
		assert.NoError(t, d.Close(), "Close of %+v", refs[i])
		assert.Error(t, d.ReadAt(ctx, make([]byte, 1), 0), "ReadAt after Close of %+v", refs[i])
		mustNotPanic(t, "a second Disk.Close", func() { _ = d.Close() })
	}
	assert.NoError(t, src.Close(), "Source.Close")
	mustNotPanic(t, "a second Source.Close", func() { _ = src.Close() })
	if !counted {
		return
	}
	deadline := time.Now().Add(h.Settle)
	for rc.OpenResources() > baseline && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	assert.LessOrEqual(t, rc.OpenResources(), baseline, "resources still open on the platform after every disk and the source were closed (baseline %d)", baseline)
}
