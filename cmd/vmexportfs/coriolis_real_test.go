package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
)

// Tests of the mount against the simulator behaving as the real Coriolis
// exporter was observed to (specs/coriolis.md, "Observed on the real
// server").

// TestCoriolisRealTailBlock: FIEMAP's last chunk of a 64 MiB + 1536 B disk
// runs past the end of the file. The map must be clipped, not distrusted: a
// sparse copy fetches about what is allocated (9,728 B), not 64 MiB.
func TestCoriolisRealTailBlock(t *testing.T) {
	f := newFixture(t, coriolistest.Options{})
	const size = 64<<20 + 1536
	f.addVM("vm-t", "tail", coriolistest.DiskSpec{Name: "disk.img", Size: size})
	f.write("vm-t", "disk.img", 0, 4096)
	f.write("vm-t", "disk.img", 32<<20, 4096)
	f.write("vm-t", "disk.img", 64<<20, 1536)
	sid := f.snapshot("vm-t")
	// What the exporter on a 4 KiB-block XFS answers: whole blocks.
	require.NoError(t, f.sim.OverrideChunks("vm-t", sid, "disk.img", []coriolistest.Chunk{
		{Start: 0, Length: 4096, PhysicalStart: 1 << 30},
		{Start: 32 << 20, Length: 4096, PhysicalStart: 2 << 30},
		{Start: 64 << 20, Length: 4096, PhysicalStart: 3 << 30},
	}))
	m := f.mount()
	img := m.path("vms", "vm-t", "snapshots", sid, "disk.img")
	var st syscall.Stat_t
	require.NoError(t, syscall.Stat(img, &st))
	const allocated = 4096 + 4096 + 1536
	assert.EqualValues(t, size, st.Size)
	assert.EqualValues(t, (allocated+511)/512, st.Blocks, "st_blocks from the clipped map")
	f.sim.ResetStats()
	dst := filepath.Join(t.TempDir(), "copy.img")
	tool(t, "cp", "--sparse=always", img, dst)
	served := f.sim.Stats().DiskBytes
	t.Logf("cp of a %d-byte disk with %d bytes allocated: %d bytes served, st_blocks %d", size, allocated, served, st.Blocks)
	assert.LessOrEqual(t, float64(served), 1.02*allocated)
	assert.Equal(t, sha256File(t, f.source("vm-t", sid, "disk.img")), sha256File(t, dst))
	assert.True(t, m.logged("clipped"), "the clipping is logged")
	assert.Equal(t, 1, strings.Count(m.logs.String(), "clipped"), "logged once")
}

// TestCoriolisRealExactDelta: 64 KiB written inside a 3 MiB extent. The
// exporter's compareTo reports all 3 MiB; the changed map and the delta must
// hold only the 64 KiB.
func TestCoriolisRealExactDelta(t *testing.T) {
	requireTools(t, "getfattr")
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-d", "delta", coriolistest.DiskSpec{Name: "disk.img", Size: 8 << 20})
	f.write("vm-d", "disk.img", 1<<20, 3<<20) // one physically contiguous extent
	s1 := f.snapshot("vm-d")
	f.write("vm-d", "disk.img", 2<<20, 64<<10)
	s2 := f.snapshot("vm-d")
	m := f.mount()
	img := m.path("vms", "vm-d", "snapshots", s2, "disk.img")
	changed := tool(t, "getfattr", "--only-values", "-n", "user.vmexport.changed."+s1, img)
	t.Logf("changed map: %q", changed)
	assert.Equal(t, "2097152 65536\n", changed)
	f.sim.ResetStats()
	dst := filepath.Join(t.TempDir(), "delta.vhd")
	tool(t, "cp", m.path("vms", "vm-d", "snapshots", s2, "delta-from-"+s1+".vhd"), dst)
	served := f.sim.Stats().DiskBytes
	t.Logf("delta copy: %d bytes of disk data served", served)
	assert.LessOrEqual(t, served, int64(64<<10))
	assert.Positive(t, served)
}

// TestCoriolisRealCDROM: the exporter reflinks an untyped ISO into the
// snapshot and lists it as a snapshot disk; the snapshot still shows one
// disk, as the VM does.
func TestCoriolisRealCDROM(t *testing.T) {
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-c", "cd", coriolistest.DiskSpec{Name: "root.img", Size: 1 << 20},
		coriolistest.DiskSpec{Name: "boot.iso", Device: "xvdc", Size: 1 << 20, CDROM: true})
	f.write("vm-c", "root.img", 0, 4096)
	sid := f.snapshot("vm-c")
	m := f.mount()
	ents, err := os.ReadDir(m.path("vms", "vm-c", "snapshots", sid))
	require.NoError(t, err)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	t.Logf("snapshot shows %v", names)
	assert.Contains(t, names, "disk.img")
	assert.NotContains(t, names, "xvda")
	assert.NotContains(t, names, "xvdc:cdrom")
}

// TestCoriolisRealUnknown: the exporter answers unknown snapshots, VMs and
// bases with 500: ENOENT (ENODATA for an xattr) at once, not EIO after the
// retries.
func TestCoriolisRealUnknown(t *testing.T) {
	requireTools(t, "getfattr")
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-u", "unknown", coriolistest.DiskSpec{Name: "disk.img", Size: 1 << 20})
	f.write("vm-u", "disk.img", 0, 4096)
	sid := f.snapshot("vm-u")
	m := f.mount()
	const unknown = "00000000-0000-4000-8000-000000000000"
	dir := m.path("vms", "vm-u", "snapshots", sid)
	start := time.Now()
	_, err := os.Stat(filepath.Join(dir, "delta-from-"+unknown+".vhd"))
	took := time.Since(start)
	require.ErrorIs(t, err, syscall.ENOENT)
	assert.Less(t, took, time.Second)
	t.Logf("stat delta-from-<unknown>.vhd: ENOENT in %v", took)

	start = time.Now()
	_, xerr := syscall.Getxattr(filepath.Join(dir, "disk.img"), "user.vmexport.changed."+unknown, make([]byte, 4096))
	took = time.Since(start)
	require.True(t, errors.Is(xerr, syscall.ENODATA), "%v", xerr)
	assert.Less(t, took, time.Second)
	t.Logf("getxattr changed.<unknown>: ENODATA in %v", took)

	start = time.Now()
	_, err = os.Stat(m.path("vms", "vm-u", "snapshots", unknown))
	require.ErrorIs(t, err, syscall.ENOENT)
	assert.Less(t, time.Since(start), time.Second)
	assert.False(t, strings.Contains(m.logs.String(), "after 5 attempts"), "no retries")
}

// TestCoriolisRealMkdirRefused: a VM whose ISO the repository types as not a
// virtual disk cannot be snapshotted (400 "VM does not support reflink
// cloning"): mkdir fails with ENOTSUP ("Operation not supported"), and the
// server's reason is logged.
func TestCoriolisRealMkdirRefused(t *testing.T) {
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-r", "refused", coriolistest.DiskSpec{Name: "root.img", Size: 1 << 20},
		coriolistest.DiskSpec{Name: "boot.iso", Size: 1 << 20, CDROM: true, ISOTyped: true})
	m := f.mount()
	err := os.Mkdir(m.path("vms", "vm-r", "snapshots", "nightly"), 0o755)
	require.ErrorIs(t, err, syscall.ENOTSUP)
	assert.True(t, m.logged("VM does not support reflink cloning"), "reason logged:\n%s", m.logs.String())
}

// TestCoriolisRealTreeChanges: st_mtime is real (the creation time of a
// mkdir, else when the mount first saw the snapshot, both kept across
// remounts); getfattr -d lists the changed map under the base's shown name;
// after rmdir, or a deletion behind the mount's back, the deltas from the
// deleted snapshot disappear at once or within the listing TTL, not after an
// hour.
func TestCoriolisRealTreeChanges(t *testing.T) {
	requireTools(t, "getfattr")
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-m", "tree", coriolistest.DiskSpec{Name: "disk.img", Size: 4 << 20})
	f.write("vm-m", "disk.img", 0, 64<<10)
	outside := f.snapshot("vm-m") // taken without vmexportfs
	m := f.mount("--list-ttl", "1s")
	snaps := m.path("vms", "vm-m", "snapshots")

	before := time.Now().Add(-time.Second)
	require.NoError(t, os.Mkdir(filepath.Join(snaps, "s1"), 0o755))
	f.write("vm-m", "disk.img", 1<<20, 64<<10)
	require.NoError(t, os.Mkdir(filepath.Join(snaps, "s2"), 0o755))
	// Three snapshots made within a second show three seconds (rsync -a
	// tells them apart): s1 and s2 may each be a second later than made.
	after := time.Now().Add(3 * time.Second)

	mtimes := map[string]time.Time{}
	for _, p := range []string{"s1", "s2", "s2/disk.img", "s2/delta-from-s1.vhd", outside, outside + "/disk.img"} {
		fi, err := os.Stat(filepath.Join(snaps, p))
		require.NoError(t, err, p)
		mtimes[p] = fi.ModTime()
		t.Logf("mtime %s: %v", p, fi.ModTime().UTC())
	}
	for _, p := range []string{"s1", "s2", "s2/disk.img"} {
		assert.True(t, mtimes[p].After(before) && mtimes[p].Before(after), "%s: mtime %v is the creation time", p, mtimes[p])
	}
	assert.True(t, mtimes[outside].After(before.Add(-time.Minute)), "first seen, not 1970: %v", mtimes[outside])
	assert.True(t, mtimes["s1"].Before(mtimes["s2"]))

	dump := tool(t, "getfattr", "-d", "-m", "-", filepath.Join(snaps, "s2", "disk.img"))
	assert.Contains(t, dump, "user.vmexport.changed.s1=", "the base's shown name")

	// rmdir: the delta from s1 is gone at once.
	_, err := os.Stat(filepath.Join(snaps, "s2", "delta-from-s1.vhd"))
	require.NoError(t, err)
	require.NoError(t, syscall.Rmdir(filepath.Join(snaps, "s1")))
	start := time.Now()
	for {
		_, err = os.Stat(filepath.Join(snaps, "s2", "delta-from-s1.vhd"))
		if err != nil || time.Since(start) > 3*time.Second {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	require.ErrorIs(t, err, syscall.ENOENT)
	t.Logf("delta-from-s1.vhd gone %v after rmdir", time.Since(start))
	assert.Less(t, time.Since(start), 500*time.Millisecond)

	// Deleted behind the mount's back: gone within the listing TTL (1 s).
	_, err = os.Stat(filepath.Join(snaps, "s2", "delta-from-"+outside+".vhd"))
	require.NoError(t, err)
	require.NoError(t, f.sim.DeleteSnapshot("vm-m", outside))
	start = time.Now()
	for {
		_, err = os.Stat(filepath.Join(snaps, "s2", "delta-from-"+outside+".vhd"))
		if err != nil || time.Since(start) > 5*time.Second {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	require.ErrorIs(t, err, syscall.ENOENT)
	t.Logf("delta from a snapshot deleted outside gone %v later", time.Since(start))
	assert.Less(t, time.Since(start), 2500*time.Millisecond)

	// The times are kept across remounts.
	m.stop(t)
	m2 := f.mount()
	fi, err := os.Stat(m2.path("vms", "vm-m", "snapshots", "s2"))
	require.NoError(t, err)
	assert.True(t, fi.ModTime().Equal(mtimes["s2"]), "%v != %v", fi.ModTime(), mtimes["s2"])
}
