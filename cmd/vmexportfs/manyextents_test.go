package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
)

// The many-extents tests model an exporter on a badly fragmented filesystem:
// the simulator reports a chunk list of a million tiny extents
// (OverrideChunks) for a disk whose data is exactly those extents. Set
// VMEXPORTFS_MANY_EXTENTS (chunks of TestManyExtentsCopy, default 1,000,000)
// and VMEXPORTFS_ADJACENT_EXTENTS (chunks of TestManyAdjacentExtentsMemory,
// default 1,024,391) to run other sizes.
const manyExtentsDiskSize = 256 * mib

// peakRSSMiB is the high-water mark of a mount's resident memory.
func peakRSSMiB(t *testing.T, m *mounted) int64 {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", m.cmd.Process.Pid))
	require.NoError(t, err)
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kib, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			require.NoError(t, err)
			return kib >> 10
		}
	}
	t.Fatal("no VmHWM in /proc/<pid>/status")
	return 0
}

// writeChunks writes the data of chunks (sorted, inside the disk) into a
// live disk, zeros everywhere else up to the last chunk, 4 MiB per write.
func (f *fixture) writeChunks(vm, disk string, chunks []coriolistest.Chunk) {
	f.t.Helper()
	const piece = 4 * mib
	buf := make([]byte, piece)
	end := int64(chunks[len(chunks)-1].Start + chunks[len(chunks)-1].Length)
	i := 0
	for off := int64(0); off < end; off += piece {
		n := min(piece, end-off)
		p := buf[:n]
		clear(p)
		for ; i < len(chunks) && int64(chunks[i].Start) < off+n; i++ {
			c := chunks[i]
			lo, hi := max(int64(c.Start), off), min(int64(c.Start+c.Length), off+n)
			f.rng.Read(p[lo-off : hi-off])
			if int64(c.Start+c.Length) > off+n {
				break // continues in the next piece
			}
		}
		require.NoError(f.t, f.sim.WriteDisk(vm, disk, off, p))
	}
}

// fragmented adds a VM whose one disk holds exactly chunks of data and takes
// a snapshot of it that the simulator reports with that chunk list, as an
// exporter on a fragmented filesystem would. It returns the snapshot id.
func (f *fixture) fragmented(vm string, size int64, chunks []coriolistest.Chunk) string {
	f.t.Helper()
	f.addVM(vm, vm, coriolistest.DiskSpec{Name: "disk.img", Device: "xvda", Size: size})
	f.writeChunks(vm, "disk.img", chunks)
	sid := f.snapshot(vm)
	require.NoError(f.t, f.sim.OverrideChunks(vm, sid, "disk.img", chunks))
	return sid
}

// stepStats is what one step of a test cost the simulator.
type stepStats struct {
	name            string
	elapsed         time.Duration
	requests, bytes int64
}

// step runs one step with fresh simulator counters and logs what it cost.
func (f *fixture) step(name string, run func()) stepStats {
	f.t.Helper()
	f.sim.ResetStats()
	start := time.Now()
	run()
	st := f.sim.Stats()
	s := stepStats{name: name, elapsed: time.Since(start), requests: st.DiskRequests, bytes: st.DiskBytes}
	f.t.Logf("%-22s %6.1f s, %6d disk requests, %5d MiB served, %d API requests", name, s.elapsed.Seconds(), s.requests, s.bytes>>20, st.APIRequests)
	return s
}

// TestManyExtentsCopy: a 256 MiB disk whose chunk map is 1,000,000 chunks of
// 16 bytes, 256 bytes apart. Reads coalesce the chunks (holes of up to
// 64 KiB are read through and zeroed), so cp fetches each 1 MiB cache block
// once instead of making a request per chunk, and the copy is byte-exact.
// Then ls -lR stats disk.img.gz, which compresses all the data once for the
// index, and gzip -t reads it back.
func TestManyExtentsCopy(t *testing.T) {
	requireTools(t, "cp", "ls", "gzip")
	const stride, length = 256, 16
	n := envInt(t, "VMEXPORTFS_MANY_EXTENTS", 1_000_000)
	require.LessOrEqual(t, int64(n)*stride, manyExtentsDiskSize, "the chunks must fit the disk")
	f := newFixture(t, coriolistest.Options{})
	chunks := make([]coriolistest.Chunk, n)
	for i := range chunks {
		// Physically scattered, as on a fragmented filesystem.
		chunks[i] = coriolistest.Chunk{Start: uint64(i) * stride, Length: length, PhysicalStart: 1<<40 + uint64(n-i)*4096}
	}
	sid := f.fragmented("vm-frag", manyExtentsDiskSize, chunks)
	source := f.source("vm-frag", sid, "disk.img")
	want := sha256File(t, source)
	allocated := int64(n) * length
	// Every cache block that holds data is one request; a request per chunk
	// would be n.
	dataBlocks := (int64(n-1)*stride + length + mib - 1) / mib

	const cacheMiB = 64 // the default --cache-size
	m := f.mount()
	dir := m.path("vms", "vm-frag", "snapshots", sid)
	dst := filepath.Join(t.TempDir(), "disk.img")
	cp := f.step("cp --sparse=always", func() { tool(t, "cp", "--sparse=always", filepath.Join(dir, "disk.img"), dst) })
	assert.Equal(t, want, sha256File(t, dst), "sha256 of the copy: wrong bytes")
	cpRSS := peakRSSMiB(t, m)
	ls := f.step("ls -lR", func() { tool(t, "ls", "-lR", m.dir) })
	gz := f.step("gzip -t disk.img.gz", func() { tool(t, "gzip", "-t", filepath.Join(dir, "disk.img.gz")) })
	rss := peakRSSMiB(t, m)
	t.Logf("%d chunks of %d bytes every %d bytes (%d bytes allocated, %d MiB blocks hold data); cp: %.1f s, %d requests, %d bytes served (%.1f× allocated, %.3f× the data blocks); peak RSS %d MiB after cp, %d MiB after ls -lR and gzip -t (cache %d MiB)",
		n, length, stride, allocated, dataBlocks, cp.elapsed.Seconds(), cp.requests, cp.bytes, float64(cp.bytes)/float64(allocated),
		float64(cp.bytes)/float64(dataBlocks*mib), cpRSS, rss, cacheMiB)

	// One request per cache block holding data (and a HEAD), not one per
	// chunk; nothing beyond those blocks. gzip -t may compress a member
	// twice (its read-ahead races the reads) and the cache is smaller than
	// the data, so it is allowed each block twice.
	for _, s := range []struct {
		stepStats
		times int64
	}{{cp, 1}, {ls, 1}, {gz, 2}} {
		assert.LessOrEqual(t, s.requests, s.times*dataBlocks+4, "%s: disk requests", s.name)
		assert.LessOrEqual(t, s.bytes, s.times*dataBlocks*mib, "%s: bytes served", s.name)
	}
	// The copy holds the map (16 bytes per extent) and the cache. Building
	// the gzip index afterwards runs the Go heap up to its soft limit
	// (cache + 96 MiB) with or without many extents; RSS adds the binary's
	// text and stacks to that.
	assert.LessOrEqual(t, cpRSS, int64(cacheMiB+128), "peak RSS MiB of the copy: cache + 128 MiB")
	assert.LessOrEqual(t, rss, int64(cacheMiB+128), "peak RSS MiB after building the gzip index: cache + 128 MiB")
	assert.NotContains(t, m.logs.String(), "chunk map normalized", "a sorted, disjoint map is not repaired")
}

// TestHugeMapXattr: a map whose text is over the 64 KiB an xattr can hold
// (4 KiB of data every 8 KiB of a 64 MiB disk: 8,192 extents) is E2BIG as an
// attribute, without being formatted whole, and `vmexportfs extents` prints
// it whole through the paged attributes.
func TestHugeMapXattr(t *testing.T) {
	requireTools(t, "getfattr")
	const size, stride, length = 64 * mib, 8 * kib, 4 * kib
	f := newFixture(t, coriolistest.Options{})
	chunks := make([]coriolistest.Chunk, size/stride)
	for i := range chunks {
		chunks[i] = coriolistest.Chunk{Start: uint64(int64(i) * stride), Length: uint64(length), PhysicalStart: 1<<40 + uint64(int64(i)*stride)}
	}
	sid := f.fragmented("vm-map", size, chunks)
	m := f.mount()
	disk := m.path("vms", "vm-map", "snapshots", sid, "disk.img")
	_, err := toolErr("getfattr", "--only-values", "-n", "user.vmexport.extents", disk)
	assert.ErrorContains(t, err, "Argument list too long")
	assert.Contains(t, m.logs.String(), "extent map too large for one xattr")
	lines := strings.Split(strings.TrimSuffix(vmexportfs(t, "extents", disk), "\n"), "\n")
	require.Len(t, lines, len(chunks), "vmexportfs extents prints every extent")
	assert.Equal(t, fmt.Sprintf("%d %d", size-stride, length), lines[len(lines)-1])
}

// TestManyAdjacentExtentsMemory: a chunk map of 1,024,391 adjacent chunks
// (about 63 MiB of JSON, as an exporter that does not squash sends it)
// merges into one extent; decoding it must keep the daemon under its memory
// budget, the cache size + 128 MiB.
func TestManyAdjacentExtentsMemory(t *testing.T) {
	requireTools(t, "cp", "getfattr")
	const length = 256
	n := envInt(t, "VMEXPORTFS_ADJACENT_EXTENTS", 1_024_391)
	require.LessOrEqual(t, int64(n)*length, manyExtentsDiskSize, "the chunks must fit the disk")
	f := newFixture(t, coriolistest.Options{})
	chunks := make([]coriolistest.Chunk, n)
	for i := range chunks {
		chunks[i] = coriolistest.Chunk{Start: uint64(i) * length, Length: length, PhysicalStart: 1<<40 + uint64(n-i)*4096}
	}
	sid := f.fragmented("vm-adj", manyExtentsDiskSize, chunks)
	answer, err := json.Marshal(chunks)
	require.NoError(t, err)
	want := sha256File(t, f.source("vm-adj", sid, "disk.img"))

	const cacheMiB = 64
	m := f.mount("--cache-size", strconv.Itoa(cacheMiB)+"M")
	disk := m.path("vms", "vm-adj", "snapshots", sid, "disk.img")
	dst := filepath.Join(t.TempDir(), "disk.img")
	cp := f.step("cp --sparse=always", func() { tool(t, "cp", "--sparse=always", disk, dst) })
	assert.Equal(t, want, sha256File(t, dst), "sha256 of the copy: wrong bytes")
	rss := peakRSSMiB(t, m)
	t.Logf("%d adjacent chunks of %d bytes (chunk list %d MiB of JSON); cp: %.1f s, %d requests, %d MiB served; peak RSS %d MiB (cache %d MiB)",
		n, length, len(answer)>>20, cp.elapsed.Seconds(), cp.requests, cp.bytes>>20, rss, cacheMiB)
	end := min((int64(n)*length+4095)/4096*4096, manyExtentsDiskSize) // data is reported in 4 KiB units
	assert.Equal(t, fmt.Sprintf("0 %d\n", end), tool(t, "getfattr", "--only-values", "-n", "user.vmexport.extents", disk), "one extent")
	assert.LessOrEqual(t, rss, int64(cacheMiB+128), "peak RSS MiB: cache + 128 MiB")
	assert.LessOrEqual(t, cp.bytes, int64(n)*length, "bytes served")
}
