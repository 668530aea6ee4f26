package main

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/meter"
	"github.com/vmexportfs/vmexportfs/backend/testenv"
	"github.com/vmexportfs/vmexportfs/backend/xapi/xapitest"
	"github.com/vmexportfs/vmexportfs/fs"
)

const (
	kib = int64(1) << 10
	// copyDiskSize is not a multiple of the cache block or of 2 MiB.
	copyDiskSize = 100*mib + 12*kib
)

// copyWrites are the written extents of the copy tests' disk: aligned to
// the simulator's 64 KiB granule so its chunk map and the sparse file agree
// exactly, crossing cache blocks and 2 MiB boundaries, and reaching the
// unaligned end of the disk.
var copyWrites = []extent.Extent{
	{Off: 0, Len: 1 * mib},
	{Off: 5*mib + 64*kib, Len: 3 * mib},
	{Off: 40*mib - 128*kib, Len: 256 * kib},
	{Off: 70 * mib, Len: 8 * mib},
	{Off: copyDiskSize - 76*kib, Len: 76 * kib},
}

func allocatedBytes(es []extent.Extent) int64 {
	var n int64
	for _, e := range es {
		n += e.Len
	}
	return n
}

// The copy tests' VM: one sparse disk, copyWrites written.
const copyVM, copyDisk = "vm-copy", "xvda"

// newCopyDisk makes the copy tests' VM on a platform and a snapshot of it,
// then writes to the live disk again, which the snapshot must not see. The
// simulator's file of the snapshot holds exactly copyWrites.
func newCopyDisk(t *testing.T, p simPlatform) (sid, source string) {
	p.AddVM(t, copyVM, diskSpec{copyDisk, copyDiskSize})
	for _, e := range copyWrites {
		p.Write(t, copyVM, copyDisk, e.Off, e.Len)
	}
	sid = p.Snapshot(t, copyVM)
	p.Write(t, copyVM, copyDisk, 0, 2*mib) // the snapshot must not see this
	source = p.Reference(t, copyVM, sid, copyDisk)
	// Simulators store in 64 KiB chunks; where the platform rounded the
	// disk up, the last write's chunk is whole.
	size := fileSize(t, source)
	var want []extent.Extent
	for _, e := range copyWrites {
		want = append(want, extent.Extent{Off: e.Off, Len: min((e.End()+64*kib-1)/(64*kib)*64*kib, size) - e.Off})
	}
	require.Equal(t, formatExtents(want), formatExtents(testenv.SeekMap(t, source)), "the simulator's snapshot file")
	return sid, source
}

// copyFixture is the copy tests' VM on Coriolis, for the command's own tests.
func copyFixture(t *testing.T) (f *fixture, sid, source string) {
	c := newCoriolis(t)
	sid, source = newCopyDisk(t, c)
	return c.fixture, sid, source
}

// copyPlatforms are the platforms, and KubeVirt without the backup map
// route: its copies must be exact too, though the whole disk is data.
var copyPlatforms = append(append([]platformCase{}, e2ePlatforms...),
	platformCase{"kubevirt-without-map", func(t *testing.T) simPlatform { return newKubeVirt(t, false) }},
	// A pool without an NBD network: every disk is spilled from its VHD
	// stream, and must copy exactly the same.
	platformCase{"xapi-spill", func(t *testing.T) simPlatform { return newXapi(t, xapitest.Options{NBD: xapitest.NBDNone}) }},
	platformCase{"xapi-insecure-nbd", func(t *testing.T) simPlatform { return newXapi(t, xapitest.Options{NBD: xapitest.NBDInsecure}) }},
	// A bucket of QCOW2 images in a real S3 server, and JD Cloud's exports
	// into one.
	platformCase{"s3", func(t *testing.T) simPlatform { return newS3Platform(t) }},
	platformCase{"jdcloud", func(t *testing.T) simPlatform { return newJDCloud(t) }})

// copyTool is one way users copy a disk image; copy returns the raw copy.
type copyTool struct {
	name string
	copy func(t *testing.T, disk, out string) string
}

// copyTools are the copies every platform's disk.img must survive.
var copyTools = []copyTool{
	{"cp --sparse=always", func(t *testing.T, disk, out string) string {
		dst := filepath.Join(out, "disk.img")
		tool(t, "cp", "--sparse=always", disk, dst)
		return dst
	}},
	{"tar -S", func(t *testing.T, disk, out string) string {
		archive := filepath.Join(out, "disk.tar")
		tool(t, "tar", "-S", "-cf", archive, "-C", filepath.Dir(disk), "disk.img")
		extracted := filepath.Join(out, "x")
		require.NoError(t, os.Mkdir(extracted, 0o755))
		tool(t, "tar", "-xf", archive, "-C", extracted)
		return filepath.Join(extracted, "disk.img")
	}},
	{"qemu-img convert -O qcow2", func(t *testing.T, disk, out string) string {
		qcow := filepath.Join(out, "disk.qcow2")
		tool(t, "qemu-img", "convert", "-O", "qcow2", disk, qcow)
		tool(t, "qemu-img", "check", qcow)
		raw := filepath.Join(out, "disk.raw")
		tool(t, "qemu-img", "convert", "-O", "raw", qcow, raw)
		return raw
	}},
	{"rsync --sparse", func(t *testing.T, disk, out string) string {
		tool(t, "rsync", "--sparse", disk, out+"/")
		return filepath.Join(out, "disk.img")
	}},
	{"dd bs=1M", func(t *testing.T, disk, out string) string {
		dst := filepath.Join(out, "disk.img")
		tool(t, "dd", "if="+disk, "of="+dst, "bs=1M", "status=none")
		return dst
	}},
}

// TestCopyTools copies a sparse snapshot with the tools backup people use,
// each on a cold mount, on every platform, and checks the bytes and what
// crossed the wire: no more than the written data (1.02 × allocated), or the
// disk's size on a platform without an allocation map. Where there is one,
// the snapshot's derived files are checked too: disk.img.gz and disk.vhd
// hold the same bytes, and its disk.vhd with the next snapshot's delta from
// it applies to that snapshot exactly (a platform that cannot say what
// changed puts in the delta everything either snapshot wrote).
func TestCopyTools(t *testing.T) {
	requireTools(t, "cp", "tar", "rsync", "dd", "qemu-img", "gzip", "zcat", "vhdiinfo", "vhdimount", "fusermount3")
	forEachPlatform(t, copyPlatforms, func(t *testing.T, _ int, p simPlatform) {
		sid, source := newCopyDisk(t, p)
		want := sha256File(t, source)
		size := fileSize(t, source) // the platform may have rounded it up
		allocated := allocatedBytes(copyWrites)
		if g := p.Caps().mapGranularity; g > 0 {
			written, err := extent.Normalize(copyWrites, size)
			require.NoError(t, err)
			allocated = roundedBytes(written, g, size)
		}
		fetchLimit, limit := allocated*102/100, "bytes served ≤ 1.02 × allocated"
		if !p.Caps().allocationMap {
			fetchLimit, limit = size, "bytes served ≤ the disk's size"
		}

		for _, tc := range copyTools {
			t.Run(tc.name, func(t *testing.T) {
				m := mountSim(t, p) // cold: nothing cached in the daemon or the page cache
				before := p.DiskBytes()
				got := tc.copy(t, m.path("vms", copyVM, "snapshots", sid, "disk.img"), t.TempDir())
				assert.Equal(t, want, sha256File(t, got), "sha256 of the copy")
				served := p.DiskBytes() - before
				t.Logf("%s: served %d bytes for %d allocated (%.3f×)", tc.name, served, allocated, float64(served)/float64(allocated))
				assert.LessOrEqual(t, served, fetchLimit, limit)
				assert.Positive(t, served)
			})
		}
		if !p.Caps().allocationMap {
			return
		}

		m := mountSim(t, p, "--list-ttl", "1ms") // sees the next snapshot at once
		dir := m.path("vms", copyVM, "snapshots", sid)
		tool(t, "gzip", "-t", filepath.Join(dir, "disk.img.gz"))
		assert.Equal(t, want+"  -\n", tool(t, "sh", "-c", `zcat "$1" | sha256sum`, "sh", filepath.Join(dir, "disk.img.gz")))
		raw := filepath.Join(t.TempDir(), "raw")
		tool(t, "qemu-img", "convert", "-f", "vpc", "-O", "raw", filepath.Join(dir, "disk.vhd"), raw)
		require.NoError(t, os.Truncate(raw, size))
		assert.Equal(t, want, sha256File(t, raw), "disk.vhd")

		if p.Caps().oneSnapshot {
			return
		}
		p.Write(t, copyVM, copyDisk, 7*mib, 3*mib)
		next := p.Snapshot(t, copyVM)
		chain := t.TempDir()
		tool(t, "cp", filepath.Join(dir, "disk.vhd"), filepath.Join(chain, sid+".vhd"))
		tool(t, "cp", m.path("vms", copyVM, "snapshots", next, "delta-from-"+sid+".vhd"), filepath.Join(chain, "delta.vhd"))
		assert.Contains(t, tool(t, "vhdiinfo", filepath.Join(chain, "delta.vhd")), "Parent filename\t\t: "+sid+".vhd")
		applied := t.TempDir()
		tool(t, "vhdimount", filepath.Join(chain, "delta.vhd"), applied)
		defer toolErr("fusermount3", "-u", applied)
		assert.Equal(t, sha256File(t, p.Reference(t, copyVM, next, copyDisk)), sha256Range(t, filepath.Join(applied, "vhdi2"), 0, size),
			"%s disk.vhd + delta", sid)
	})
}

// TestConcurrentRandomReaders runs 8 readers at random offsets at once
// through a cache far smaller than the data, so blocks are evicted and
// fetched concurrently.
func TestConcurrentRandomReaders(t *testing.T) {
	requireTools(t, "dd")
	forEachPlatform(t, e2ePlatforms, func(t *testing.T, _ int, p simPlatform) {
		sid, source := newCopyDisk(t, p)
		m := mountSim(t, p, "--cache-size", "4M")
		concurrentReaders(t, m.path("vms", copyVM, "snapshots", sid, "disk.img"), source, copyWrites, copyDiskSize)
	})
}

// concurrentReaders runs 8 dd readers at random offsets of disk at once and
// checks every range against source.
func concurrentReaders(t *testing.T, disk, source string, writes []extent.Extent, size int64) {
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for reader := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(reader), 42))
			for range 6 {
				// Mostly inside written extents, sometimes across holes.
				e := writes[rng.IntN(len(writes))]
				off := e.Off + rng.Int64N(e.Len) - rng.Int64N(64*kib)
				off = max(0, min(off, size-1))
				n := min(1+rng.Int64N(3*mib), size-off)
				out, err := toolErr("dd", "if="+disk, "bs=64K", "iflag=skip_bytes,count_bytes",
					fmt.Sprintf("skip=%d", off), fmt.Sprintf("count=%d", n), "status=none")
				if err != nil {
					errs <- fmt.Errorf("reader %d at %d+%d: %w", reader, off, n, err)
					return
				}
				if int64(len(out)) != n || sha256String(out) != sha256Range(t, source, off, n) {
					errs <- fmt.Errorf("reader %d at %d+%d: wrong bytes (got %d bytes)", reader, off, n, len(out))
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestXattrMaps reads the chunk maps the way a backup script does.
func TestXattrMaps(t *testing.T) {
	requireTools(t, "getfattr")
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-x", "x", coriolistest.DiskSpec{Name: "x.img", Device: "xvda", Size: 64 * mib})
	f.write("vm-x", "x.img", 0, 4*mib)
	f.write("vm-x", "x.img", 30*mib, 2*mib)
	base := f.snapshot("vm-x")
	changes := []extent.Extent{{Off: 1*mib + 64*kib, Len: 192 * kib}, {Off: 31 * mib, Len: 2 * mib}, {Off: 50 * mib, Len: 64 * kib}}
	for _, e := range changes {
		f.write("vm-x", "x.img", e.Off, e.Len)
	}
	require.NoError(t, f.sim.DiscardDisk("vm-x", "x.img", 3*mib, 1*mib))
	target := f.snapshot("vm-x")
	m := f.mount()
	disk := m.path("vms", "vm-x", "snapshots", target, "disk.img")

	dump := tool(t, "getfattr", "-d", "-m", "-", "--absolute-names", disk)
	assert.Contains(t, dump, `user.vmexport.vm="vm-x"`)
	assert.Contains(t, dump, `user.vmexport.snapshot="`+target+`"`)
	assert.Contains(t, dump, "user.vmexport.extents=")
	assert.Contains(t, dump, "user.vmexport.changed."+base+"=", "the previous snapshot's map is listed")

	allocated := tool(t, "getfattr", "--only-values", "-n", "user.vmexport.extents", disk)
	assert.Equal(t, formatExtents(testenv.SeekMap(t, f.source("vm-x", target, "x.img"))), allocated)

	// What changed: the rewritten extents, and the discarded megabyte, which a
	// delta must carry as zeros.
	want := []extent.Extent{
		{Off: 1*mib + 64*kib, Len: 192 * kib},
		{Off: 3 * mib, Len: 1 * mib},
		{Off: 31 * mib, Len: 2 * mib},
		{Off: 50 * mib, Len: 64 * kib},
	}
	changed := tool(t, "getfattr", "--only-values", "-n", "user.vmexport.changed."+base, disk)
	assert.Equal(t, formatExtents(want), changed)
	full := vmexportfs(t, "extents", "--since", base, disk)
	assert.Equal(t, changed, full, "vmexportfs extents prints the same map")

	none := tool(t, "getfattr", "--only-values", "-n", "user.vmexport.changed."+target, disk)
	assert.Empty(t, none, "nothing changed since itself")
	// No such base is no such attribute, as getxattr(2) says it.
	assert.ErrorIs(t, getxattrErr(disk, "user.vmexport.changed.no-such-snapshot"), syscall.ENODATA)
}

// getxattrErr is getxattr(2)'s error for path's attribute name, nil when it
// has a value.
func getxattrErr(path, name string) error {
	_, err := unix.Getxattr(path, name, make([]byte, 64<<10))
	return err
}

func sha256String(s string) string {
	return sha256Bytes([]byte(s))
}

// TestSnapshotsByDirectory creates and deletes snapshots with mkdir/rmdir
// on every platform and checks the names survive a remount. What the
// platform's own objects look like is its own test's
// (TestKubeVirtSnapshotObjects).
func TestSnapshotsByDirectory(t *testing.T) {
	forEachPlatform(t, e2ePlatforms, func(t *testing.T, _ int, p simPlatform) {
		p.AddVM(t, "vm-s", diskSpec{"xvda", 8 * mib})
		p.Write(t, "vm-s", "xvda", 0, 1*mib)

		m := mountSim(t, p)
		dir := m.path("vms", "vm-s", "snapshots")
		tool(t, "mkdir", filepath.Join(dir, "nightly"))
		ids := p.Snapshots(t, "vm-s")
		require.Len(t, ids, 1)
		assert.Contains(t, tool(t, "ls", dir), "nightly")
		img := filepath.Join(dir, "nightly", "disk.img")
		assert.Equal(t, sha256Range(t, p.Reference(t, "vm-s", ids[0], "xvda"), 0, 8*mib), sha256String(tool(t, "cat", img)))

		bad := []struct{ name, errno string }{
			{"bad name", "Invalid argument"},
			{".hidden", "Invalid argument"},
			{strings.Repeat("a", 200), "Invalid argument"},
			{"nightly", "File exists"},
		}
		for _, name := range p.Caps().invalidNames {
			bad = append(bad, struct{ name, errno string }{name, "Invalid argument"})
		}
		for _, bad := range bad {
			_, err := toolErr("mkdir", filepath.Join(dir, bad.name))
			require.Error(t, err, bad.name)
			assert.Contains(t, err.Error(), bad.errno, bad.name)
		}
		_, err := toolErr("mkdir", m.path("vms", "no-such-vm", "snapshots", "x"))
		require.Error(t, err)
		assert.Contains(t, err.Error(), "No such file or directory")
		assert.Len(t, p.Snapshots(t, "vm-s"), 1, "failed mkdirs create nothing")
		m.stop(t)

		m = mountSim(t, p)
		dir = m.path("vms", "vm-s", "snapshots")
		assert.Contains(t, tool(t, "ls", dir), "nightly", "the name survives a remount")
		tool(t, "rmdir", filepath.Join(dir, "nightly"))
		assert.Empty(t, p.Snapshots(t, "vm-s"))
		assert.NotContains(t, tool(t, "ls", dir), "nightly")
	})
}

// TestTokenExpiresMidCopy pauses one copy half-way until the JWT has
// expired; the copy must finish intact on a renewed token. The renewal may
// be proactive (before the token's exp) or answer a 401: the 401 path is
// TestTokenRevokedMidCopy's.
func TestTokenExpiresMidCopy(t *testing.T) {
	f := newFixture(t, coriolistest.Options{TokenTTL: 2 * time.Second})
	f.addVM("vm-j", "j", coriolistest.DiskSpec{Name: "j.img", Device: "xvda", Size: 32 * mib})
	f.write("vm-j", "j.img", 0, 32*mib)
	sid := f.snapshot("vm-j")
	m := f.mount("--cache-size", "4M")
	f.sim.ResetStats()
	disk := m.path("vms", "vm-j", "snapshots", sid, "disk.img")
	out := filepath.Join(t.TempDir(), "copy")
	// One open file, read in two halves with a pause between them.
	script := `exec 3<"$1"; dd bs=1M count=8 <&3 >"$2" 2>/dev/null; sleep 3; dd bs=1M <&3 >>"$2" 2>/dev/null`
	tool(t, "sh", "-c", script, "sh", disk, out)
	assert.Equal(t, sha256File(t, f.source("vm-j", sid, "j.img")), sha256File(t, out))
	assert.GreaterOrEqual(t, f.sim.Stats().Logins, int64(1), "logged in again after expiry")
	assert.NotContains(t, m.logs.String(), "s3cr3t-pa55word")
	assert.NotContains(t, m.logs.String(), "eyJ", "no JWT in the logs")
}

// TestTokenRevokedMidCopy: the exporter refuses the mount's token half-way
// through one copy (restarted with a new JWT secret), an hour before the
// token expires, so no proactive renewal is due: the next request gets a
// 401, the mount logs in again and the copy finishes intact. Readahead
// counts only blocks with data, and a 4 MiB cache gives it two: once the
// first 4 MiB are read, the first two blocks of the data at 40 MiB are
// fetched ahead (waited for, before the rotation), and the third is the one
// request that meets the refusal.
func TestTokenRevokedMidCopy(t *testing.T) {
	f := newFixture(t, coriolistest.Options{TokenTTL: time.Hour})
	f.addVM("vm-r", "r", coriolistest.DiskSpec{Name: "r.img", Device: "xvda", Size: 16 * mib})
	f.write("vm-r", "r.img", 0, mib)
	f.write("vm-r", "r.img", 8*mib, 4*mib)
	sid := f.snapshot("vm-r")
	m := f.mount()
	file, err := os.Open(m.path("vms", "vm-r", "snapshots", sid, "disk.img"))
	require.NoError(t, err)
	defer file.Close()

	// The copy resumes at the last extent (as rsync --append or dd skip=
	// would): readahead only ever runs forward, so nothing it does can
	// fetch the first extent, and the read of it after the revocation is
	// the one request the mount has to make. The cache holds all five
	// blocks: none is fetched twice.
	f.sim.ResetStats()
	tail := make([]byte, 4*mib)
	_, err = file.ReadAt(tail, 8*mib)
	require.NoError(t, err)
	require.Equal(t, int64(4*mib), f.sim.Stats().DiskBytes, "the last extent, read once")

	// Revoked right after the mount's login: the renewal must still
	// replace it (a 401 is matched to the token it was sent with, not
	// taken for a stale one because a login just happened).
	f.sim.ResetStats()
	require.NoError(t, f.sim.RotateSecret())
	head := make([]byte, mib)
	_, err = file.ReadAt(head, 0)
	require.NoError(t, err)

	st := f.sim.Stats()
	assert.Equal(t, int64(1), st.Unauthorized, "one request refused")
	assert.Equal(t, int64(1), st.Logins, "one login again")
	assert.Equal(t, int64(1), st.DiskRequests, "the refused read, served on the new token")
	assert.Equal(t, int64(mib), st.DiskBytes)
	whole, err := os.ReadFile(m.path("vms", "vm-r", "snapshots", sid, "disk.img"))
	require.NoError(t, err)
	assert.Equal(t, sha256File(t, f.source("vm-r", sid, "r.img")), sha256Bytes(whole))
	assert.Equal(t, head, whole[:mib])
	assert.Equal(t, tail, whole[8*mib:12*mib])
	var doc fs.Document
	require.NoError(t, json.Unmarshal([]byte(tool(t, "getfattr", "--only-values", "-n", "user.vmexport.stats", m.dir)), &doc))
	assert.Equal(t, int64(1), doc.Faults[meter.FaultAuth], "the mount saw the 401")
	assert.Zero(t, doc.GaveUp)
	assert.NotContains(t, m.logs.String(), "eyJ", "no JWT in the logs")
}
