package main

import (
	"encoding/binary"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// derivedHistory is a VM with four snapshots of a disk whose size is not a
// multiple of the 2 MiB VHD block: changes that cross block boundaries, a
// discard, and a snapshot with no change at all. The second snapshot is made
// with mkdir so deltas against it carry a chosen name. What each snapshot
// holds and what changed before it are kept as the test wrote them, so what
// a delta must hold is known without asking the mount.
type derivedHistory struct {
	p     simPlatform
	m     *mounted
	size  int64
	snaps []string // shown names, oldest first
	ids   []string // platform ids, same order

	// live is the data of the live disk as written; changed is what was
	// written, or discarded where it held data, since the last snapshot,
	// and touched what was written or discarded at all; all in whole
	// simulator granules. Each is kept at every snapshot.
	live, changed, touched extent.Map
	data, changes, touches []extent.Map
}

const derivedVM, derivedDisk = "vm-d", "xvda"

// simGranule is the unit in which every simulator stores a disk: a write
// allocates the whole granules it touches, a discard frees the granules it
// covers whole and rewrites the others.
const simGranule = 64 * kib

func newDerivedHistory(t *testing.T, p simPlatform) *derivedHistory {
	h := &derivedHistory{p: p, size: 21*mib + 192*kib + 512}
	p.AddVM(t, derivedVM, diskSpec{derivedDisk, h.size})
	h.write(t, 0, 3*mib)
	h.write(t, 10*mib+4*kib, 300*kib)
	h.write(t, h.size-64*kib-512, 64*kib+512) // the odd tail
	h.snapshot(p.Snapshot(t, derivedVM))
	// The platform may have rounded the disk up (XenServer: to 2 MiB).
	h.size = fileSize(t, p.Reference(t, derivedVM, h.snaps[0], derivedDisk))

	// Across the 2 MiB block boundary at 2 MiB and at 12 MiB; a discard.
	h.write(t, 2*mib-8*kib, 16*kib)
	h.write(t, 12*mib-1*mib, 3*mib)
	h.discard(t, 10*mib, 1*mib)
	// Snapshots taken behind the mount's back must show at once.
	h.m = mountSim(t, p, "--list-ttl", "1ms")
	tool(t, "mkdir", h.m.path("vms", derivedVM, "snapshots", "nightly"))
	h.snapshot("nightly")

	h.snapshot(p.Snapshot(t, derivedVM)) // no change

	h.write(t, 17*mib+100*kib, 5*kib)
	h.snapshot(p.Snapshot(t, derivedVM))
	h.ids = p.Snapshots(t, derivedVM)
	require.Len(t, h.ids, 4)
	return h
}

// granules is [off, off+n) widened to whole simulator granules (out), or
// narrowed to the granules it covers whole (in).
func granules(off, n int64, out bool) extent.Map {
	lo, hi := (off+simGranule-1)/simGranule*simGranule, (off+n)/simGranule*simGranule
	if out {
		lo, hi = off/simGranule*simGranule, (off+n+simGranule-1)/simGranule*simGranule
	}
	if hi <= lo {
		return extent.Map{}
	}
	m, _ := extent.Normalize([]extent.Extent{{Off: lo, Len: hi - lo}}, math.MaxInt64)
	return m
}

func (h *derivedHistory) write(t *testing.T, off, n int64) {
	h.p.Write(t, derivedVM, derivedDisk, off, n)
	g := granules(off, n, true)
	h.live, h.changed, h.touched = h.live.Union(g), h.changed.Union(g), h.touched.Union(g)
}

func (h *derivedHistory) discard(t *testing.T, off, n int64) {
	h.p.Discard(t, derivedVM, derivedDisk, off, n)
	g := granules(off, n, true)
	h.changed = h.changed.Union(intersect(h.live, g))
	h.touched = h.touched.Union(g)
	h.live = h.live.Subtract(granules(off, n, false))
}

func (h *derivedHistory) snapshot(name string) {
	h.snaps = append(h.snaps, name)
	h.data = append(h.data, h.live)
	h.changes, h.touches = append(h.changes, h.changed), append(h.touches, h.touched)
	h.changed, h.touched = extent.Map{}, extent.Map{}
}

// wantDelta is what the delta from base to target holds, as the test wrote
// it: at least must and at most may. Where the platform tracks changes,
// must is what changed after base up to target, and may adds the holes
// discarded (change block tracking counts a discard whatever it covers, a
// comparison of allocations does not) at the platform's map granularity
// (XenServer falls back to its 2 MiB block table when CBT cannot answer).
// Elsewhere both are everything either snapshot holds.
func (h *derivedHistory) wantDelta(base, target int) (must, may extent.Map) {
	if !h.p.Caps().exactChanges {
		u := roundOut(h.data[base].Union(h.data[target]), simGranule, h.size)
		return u, u
	}
	for i := base + 1; i <= target; i++ {
		must, may = must.Union(h.changes[i]), may.Union(h.touches[i])
	}
	return roundOut(must, simGranule, h.size), roundOut(may, max(simGranule, h.p.Caps().mapGranularity), h.size)
}

// intersect is every byte in both a and b.
func intersect(a, b extent.Map) extent.Map { return a.Subtract(a.Subtract(b)) }

func (h *derivedHistory) dir(i int) string {
	return h.m.path("vms", derivedVM, "snapshots", h.snaps[i])
}

func (h *derivedHistory) source(t *testing.T, i int) string {
	return h.p.Reference(t, derivedVM, h.ids[i], derivedDisk)
}

// TestGzipView: every snapshot's disk.img.gz is a valid gzip of disk.img,
// with an exact st_size, the same bytes on every read and at any offset, and
// an index a later mount finds, on every platform.
func TestGzipView(t *testing.T) {
	requireTools(t, "gzip", "zcat", "sha256sum", "dd", "stat")
	forEachPlatform(t, e2ePlatforms, func(t *testing.T, _ int, p simPlatform) {
		h := newDerivedHistory(t, p)
		for i := range h.snaps {
			gz := filepath.Join(h.dir(i), "disk.img.gz")
			want := sha256File(t, h.source(t, i))
			tool(t, "gzip", "-t", gz)
			assert.Equal(t, want+"  -\n", tool(t, "sh", "-c", `zcat "$1" | sha256sum`, "sh", gz), "zcat of %s", h.snaps[i])

			copied := filepath.Join(t.TempDir(), "copy.gz")
			tool(t, "cp", gz, copied)
			st, err := os.Stat(copied)
			require.NoError(t, err)
			assert.Equal(t, strings.TrimSpace(tool(t, "stat", "-c", "%s", gz)), strconv.FormatInt(st.Size(), 10), "st_size is exact")
			assert.Equal(t, sha256File(t, copied), sha256File(t, gz), "a second read returns the same bytes")

			// A read in the middle, as a resumed copy does, equals the same
			// range of the full copy.
			mid := st.Size() / 2
			part := tool(t, "dd", "if="+gz, "bs=4096", "iflag=skip_bytes,count_bytes", "skip="+strconv.FormatInt(mid, 10), "count=100000", "status=none")
			assert.Equal(t, sha256Range(t, copied, mid, int64(len(part))), sha256Bytes([]byte(part)))
		}

		// A later mount finds the index in the cache directory: its st_size
		// costs no disk read (without the index, the first stat compresses
		// all written data), and it serves the same bytes.
		gz := filepath.Join(h.dir(3), "disk.img.gz")
		before, size := sha256File(t, gz), fileSize(t, gz)
		h.m.stop(t)
		m := mountSim(t, p)
		gz = m.path("vms", derivedVM, "snapshots", h.snaps[3], "disk.img.gz")
		served := p.DiskBytes()
		assert.Equal(t, size, fileSize(t, gz))
		assert.Zero(t, p.DiskBytes()-served, "disk bytes read for the st_size of disk.img.gz on a later mount")
		assert.Equal(t, before, sha256File(t, gz))
	})
}

type qemuInfo struct {
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
}

// TestVHDViews: every snapshot's disk.vhd is the disk for qemu-img, every
// older snapshot is a delta base, and each delta is a differencing VHD whose
// chain with its base's disk.vhd is the target's disk, on every platform.
func TestVHDViews(t *testing.T) {
	requireTools(t, "qemu-img", "vhdiinfo", "vhdimount", "getfattr", "fusermount3")
	forEachPlatform(t, e2ePlatforms, func(t *testing.T, _ int, p simPlatform) {
		h := newDerivedHistory(t, p)
		vsize := (h.size + 511) / 512 * 512

		for i := range h.snaps {
			vhd := filepath.Join(h.dir(i), "disk.vhd")
			var info qemuInfo
			require.NoError(t, json.Unmarshal([]byte(tool(t, "qemu-img", "info", "--output=json", vhd)), &info))
			assert.Equal(t, qemuInfo{Format: "vpc", VirtualSize: vsize}, info)
			raw := filepath.Join(t.TempDir(), "raw")
			tool(t, "qemu-img", "convert", "-f", "vpc", "-O", "raw", vhd, raw)
			require.NoError(t, os.Truncate(raw, h.size)) // the VHD's last sector is padded
			assert.Equal(t, sha256File(t, h.source(t, i)), sha256File(t, raw), "qemu-img convert of %s/disk.vhd", h.snaps[i])
		}

		// Every older snapshot is a base, listed by its shown name.
		for i := range h.snaps {
			var want []string
			for _, b := range h.snaps[:i] {
				want = append(want, "delta-from-"+b+".vhd")
			}
			want = append(want, "disk.img", "disk.img.gz", "disk.vhd")
			assert.ElementsMatch(t, want, strings.Fields(tool(t, "ls", h.dir(i))), "listing of %s", h.snaps[i])
		}

		for target := 1; target < len(h.snaps); target++ {
			for base := 0; base < target; base++ {
				t.Run(h.snaps[base]+"→"+h.snaps[target], func(t *testing.T) {
					h.checkDelta(t, base, target)
				})
			}
		}

		// A base by id is found even though the listing shows its name, and a
		// newer snapshot is no base.
		_, err := os.Stat(filepath.Join(h.dir(3), "delta-from-"+h.ids[1]+".vhd"))
		assert.NoError(t, err)
		_, err = os.Stat(filepath.Join(h.dir(0), "delta-from-"+h.snaps[3]+".vhd"))
		assert.ErrorIs(t, err, os.ErrNotExist)
	})
}

// checkDelta copies base's disk.vhd and target's delta into one directory the
// way a user builds a chain, and checks it with the tools and the served
// bytes against what the test wrote (wantDelta), and the changed map where
// the platform tracks changes (user.vmexport.changed.<base>) against it too.
func (h *derivedHistory) checkDelta(t *testing.T, base, target int) {
	name := "delta-from-" + h.snaps[base] + ".vhd"
	chain := t.TempDir()
	parent := filepath.Join(chain, h.snaps[base]+".vhd")
	tool(t, "cp", filepath.Join(h.dir(base), "disk.vhd"), parent)

	// A fresh mount so the served-bytes count sees every fetch.
	m := mountSim(t, h.p)
	delta := m.path("vms", derivedVM, "snapshots", h.snaps[target], name)
	before := h.p.DiskBytes()
	tool(t, "cp", delta, filepath.Join(chain, name))
	served := h.p.DiskBytes() - before

	must, may := h.wantDelta(base, target)
	img := m.path("vms", derivedVM, "snapshots", h.snaps[target], "disk.img")
	if h.p.Caps().exactChanges {
		text := tool(t, "getfattr", "--only-values", "-n", "user.vmexport.changed."+h.snaps[base], img)
		changed, err := extent.Parse(text, h.size)
		require.NoError(t, err)
		assert.Empty(t, must.Subtract(changed).Format(), "changed since %s, missing from user.vmexport.changed.%[1]s", h.snaps[base])
		assert.Empty(t, changed.Subtract(may).Format(), "in user.vmexport.changed.%s, never written since", h.snaps[base])
	} else {
		assert.ErrorIs(t, getxattrErr(img, "user.vmexport.changed."+h.snaps[base]), syscall.ENODATA, "no changed map where the platform cannot tell")
	}
	// Only the target's data among what may have changed is read.
	fetchable := intersect(may, roundOut(h.data[target], max(simGranule, h.p.Caps().mapGranularity), h.size))
	assert.LessOrEqual(t, served, fetchable.Bytes(), "delta fetched only changed data")
	info := tool(t, "vhdiinfo", filepath.Join(chain, name))
	assert.Contains(t, info, "Differential")
	assert.Contains(t, info, "Parent filename\t\t: "+h.snaps[base]+".vhd")

	// The delta's present blocks are exactly the blocks what changed
	// touches (the history is such that may touches no other block).
	require.Equal(t, blocksOf(must), blocksOf(may), "the history's changes")
	assert.Equal(t, blocksOf(must), presentBlocks(t, filepath.Join(chain, name)))

	// vhdimount opens the chain; the applied image is the target's disk.
	vm := t.TempDir()
	tool(t, "vhdimount", filepath.Join(chain, name), vm)
	defer toolErr("fusermount3", "-u", vm)
	assert.Equal(t, sha256File(t, h.source(t, target)), sha256Range(t, filepath.Join(vm, "vhdi2"), 0, h.size))
}

// roundOut is m with every extent widened to unit, within the disk.
func roundOut(m extent.Map, unit, size int64) extent.Map {
	var exts []extent.Extent
	for _, e := range m.Extents() {
		lo := min(e.Off/unit*unit, size)
		hi := min((e.End()+unit-1)/unit*unit, size)
		exts = append(exts, extent.Extent{Off: lo, Len: hi - lo})
	}
	r, _ := extent.Normalize(exts, size)
	return r
}

// roundedBytes is the size of m with every extent widened to unit, the most
// a reader may fetch for it.
func roundedBytes(m extent.Map, unit, size int64) int64 {
	return roundOut(m, unit, size).Bytes()
}

const vhdBlock = 2 << 20

func blocksOf(m extent.Map) []uint32 {
	var out []uint32
	for _, e := range m.Extents() {
		for b := e.Off / vhdBlock; b <= (e.End()-1)/vhdBlock; b++ {
			if n := len(out); n == 0 || out[n-1] != uint32(b) {
				out = append(out, uint32(b))
			}
		}
	}
	return out
}

// presentBlocks reads a VHD's block allocation table (spec: dynamic header
// at 512, table offset at +16, entry count at +28; absent = 0xFFFFFFFF).
func presentBlocks(t *testing.T, path string) []uint32 {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Greater(t, len(b), 1536)
	hdr := b[512:1536]
	require.Equal(t, "cxsparse", string(hdr[:8]))
	table := binary.BigEndian.Uint64(hdr[16:24])
	entries := binary.BigEndian.Uint32(hdr[28:32])
	var out []uint32
	for i := uint32(0); i < entries; i++ {
		off := table + uint64(i)*4
		require.LessOrEqual(t, off+4, uint64(len(b)))
		if binary.BigEndian.Uint32(b[off:off+4]) != 0xFFFFFFFF {
			out = append(out, i)
		}
	}
	return out
}

// TestDeltaParentNameMultiDisk: with several disks the copies of each disk's
// disk.vhd need distinct names, so the parent name carries the device.
func TestDeltaParentNameMultiDisk(t *testing.T) {
	requireTools(t, "vhdiinfo", "vhdimount", "fusermount3")
	forEachPlatform(t, e2ePlatforms, func(t *testing.T, _ int, p simPlatform) {
		p.AddVM(t, "vm-m", diskSpec{"xvda", 4 * mib}, diskSpec{"xvdb", 6*mib + 512})
		p.Write(t, "vm-m", "xvdb", 0, 3*mib)
		base := p.Snapshot(t, "vm-m")
		p.Write(t, "vm-m", "xvdb", 2*mib-4*kib, 8*kib)
		target := p.Snapshot(t, "vm-m")
		m := mountSim(t, p)

		chain := t.TempDir()
		parentName := base + "-xvdb.vhd"
		tool(t, "cp", m.path("vms", "vm-m", "snapshots", base, "xvdb", "disk.vhd"), filepath.Join(chain, parentName))
		delta := filepath.Join(chain, "delta.vhd")
		tool(t, "cp", m.path("vms", "vm-m", "snapshots", target, "xvdb", "delta-from-"+base+".vhd"), delta)
		assert.Contains(t, tool(t, "vhdiinfo", delta), "Parent filename\t\t: "+parentName)
		dir := t.TempDir()
		tool(t, "vhdimount", delta, dir)
		defer toolErr("fusermount3", "-u", dir)
		ref := p.Reference(t, "vm-m", target, "xvdb")
		assert.Equal(t, sha256File(t, ref), sha256Range(t, filepath.Join(dir, "vhdi2"), 0, fileSize(t, ref)))
	})
}
