package main

import (
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

// The Coriolis-at-scale tests (issue 19) run the exporter's simulator made
// to cost what the real one does: every disk request and snapshot GET
// re-reads the snapshot's chunk list (ObservedChunkListCost per chunk), and
// every per-VM request re-reads every vm.cfg and scans every snapshot record
// (ObservedScanCost per record). Their sizes come from the environment, with
// small defaults so that CI takes seconds:
//
//	VMEXPORTFS_FIND_VMS, VMEXPORTFS_FIND_SNAPSHOTS   TestColdFindAtScale's estate (60 × 5; the 200 × 5)
//	VMEXPORTFS_FIND_CHUNKS                           chunks per snapshot disk (5,000)
//	VMEXPORTFS_SCALE_EXTENTS                         TestSnapshotsOfFragmentedDisk's extents (20,000; the 1,000,000)
//	VMEXPORTFS_SCALE_COPIES                          how many of its 3 snapshots are copied (3)
//	VMEXPORTFS_SCALE_COST=0                          the simulator answers at once (the real one's costs otherwise)

// observedCosts are the simulator's options of an exporter that costs what
// the real one does.
func observedCosts() coriolistest.Options {
	if os.Getenv("VMEXPORTFS_SCALE_COST") == "0" {
		return coriolistest.Options{}
	}
	return coriolistest.Options{ChunkListCost: coriolistest.ObservedChunkListCost, ScanCost: coriolistest.ObservedScanCost}
}

// sparseChunks is n chunks of length bytes, one every stride bytes from 0,
// physically scattered as on a fragmented filesystem.
func sparseChunks(n int, stride, length int64) []coriolistest.Chunk {
	chunks := make([]coriolistest.Chunk, n)
	for i := range chunks {
		chunks[i] = coriolistest.Chunk{Start: uint64(int64(i) * stride), Length: uint64(length), PhysicalStart: 1<<40 + uint64(n-i)*4096}
	}
	return chunks
}

// TestColdFindAtScale: a cold `find -name disk.img` over VMs × snapshots
// whose disks have more chunks than a listing used to keep (4,096), against
// an exporter with the real one's costs. The snapshot list carries every
// snapshot's chunks, so the disks opened next need no snapshot GET: what a
// snapshot costs is its HEAD (the size, which the snapshot directory's names
// depend on) and a share of its VM's list, 1.2 requests at 5 snapshots a VM
// (the measurement: 2.4, a snapshot GET and a HEAD each plus a VM GET
// and a list per VM). The estate's one VM listing is counted apart.
func TestColdFindAtScale(t *testing.T) {
	vms := envInt(t, "VMEXPORTFS_FIND_VMS", 60)
	snaps := envInt(t, "VMEXPORTFS_FIND_SNAPSHOTS", 5)
	chunks := envInt(t, "VMEXPORTFS_FIND_CHUNKS", 5000)
	const stride, length = 8 * kib, 4 * kib
	size := int64(chunks)*stride + mib
	f := newFixture(t, observedCosts())
	list := sparseChunks(chunks, stride, length)
	for i := range vms {
		vm := fmt.Sprintf("vm-%03d", i)
		f.addVM(vm, "", coriolistest.DiskSpec{Name: vm + ".img", Size: size})
		for range snaps {
			// The map is all a find needs: the data stays a hole.
			sid := f.snapshot(vm)
			require.NoError(t, f.sim.OverrideChunks(vm, sid, vm+".img", list))
		}
	}
	m := f.mount()
	f.sim.ResetStats()
	start := time.Now()
	found := strings.Fields(tool(t, "find", m.path("vms"), "-name", "disk.img"))
	took := time.Since(start)
	snapshots := vms * snaps
	require.Len(t, found, snapshots)
	st := f.sim.Stats()
	perSnapshot := float64(st.APIRequests-st.VMListings+st.DiskRequests) / float64(snapshots)
	t.Logf("cold find of %d VMs × %d snapshots (%d chunks each): %.2f s; %.3f requests per snapshot (%d VM listing, %d VM GETs, %d snapshot lists, %d snapshot GETs, %d HEADs, %d other disk requests; %.3f with the VM listing)",
		vms, snaps, chunks, took.Seconds(), perSnapshot, st.VMListings, st.VMGets, st.SnapshotLists, st.SnapshotGets, st.DiskHeads, st.DiskRequests-st.DiskHeads,
		float64(st.APIRequests+st.DiskRequests)/float64(snapshots))
	assert.LessOrEqual(t, perSnapshot, 1.0+1.0/float64(snaps)+1e-9, "requests per snapshot: a HEAD each, a list per VM")
	assert.Zero(t, st.SnapshotGets, "the list carried the chunks")
	assert.Zero(t, st.VMGets, "the VM listing carried the snapshot order")
	assert.Equal(t, st.DiskHeads, st.DiskRequests, "no data read")

	f.sim.ResetStats()
	start = time.Now()
	require.Len(t, strings.Fields(tool(t, "find", m.path("vms"), "-name", "disk.img")), snapshots)
	t.Logf("warm find: %.2f s, %d requests", time.Since(start).Seconds(), f.sim.Stats().APIRequests+f.sim.Stats().DiskRequests)
	assert.Zero(t, f.sim.Stats().DiskHeads, "sizes are kept for the mount")
}

// routes logs which API requests the last step made.
func (f *fixture) routes() {
	st := f.sim.Stats()
	f.t.Logf("%22s VM listings %d, VM GETs %d, snapshot lists %d, snapshot GETs %d, HEADs %d", "", st.VMListings, st.VMGets, st.SnapshotLists, st.SnapshotGets, st.DiskHeads)
}

// writeSparseChunks writes the data of chunks (sorted, disjoint) into a
// live disk chunk by chunk, leaving the holes between them unwritten, so the
// live disk and its snapshots take the space of the data only.
func (f *fixture) writeSparseChunks(vm, disk string, chunks []coriolistest.Chunk) {
	f.t.Helper()
	const batch = 4 * mib
	buf := make([]byte, batch)
	for i := 0; i < len(chunks); {
		// Chunks that touch are one write; so are those a batch holds
		// when they are packed: one write per chunk otherwise.
		start := int64(chunks[i].Start)
		end := start
		j := i
		for ; j < len(chunks) && int64(chunks[j].Start) == end && end-start+int64(chunks[j].Length) <= batch; j++ {
			end += int64(chunks[j].Length)
		}
		if j == i { // one chunk larger than a batch
			end, j = start+int64(chunks[i].Length), i+1
			if end-start > int64(len(buf)) {
				buf = make([]byte, end-start)
			}
		}
		p := buf[:end-start]
		f.rng.Read(p)
		require.NoError(f.t, f.sim.WriteDisk(vm, disk, start, p))
		i = j
	}
}

// TestSnapshotsOfFragmentedDisk: a VM with 3 snapshots of a disk of 4 KiB
// extents one every 8 KiB (VMEXPORTFS_SCALE_EXTENTS of them: a 1,000,000-
// extent disk is 8 GiB, its chunk list 66 MB of JSON, the snapshot list
// three times that) lists, stats and copies through the mount, byte-exact,
// while the mount's peak RSS stays within the cache size + 128 MiB.
func TestSnapshotsOfFragmentedDisk(t *testing.T) {
	requireTools(t, "cp", "ls", "stat")
	n := envInt(t, "VMEXPORTFS_SCALE_EXTENTS", 20_000)
	copies := envInt(t, "VMEXPORTFS_SCALE_COPIES", 3)
	const stride, length, snapshots = 8 * kib, 4 * kib, 3
	size := int64(n) * stride
	f := newFixture(t, observedCosts())
	chunks := sparseChunks(n, stride, length)
	f.addVM("vm-frag", "frag", coriolistest.DiskSpec{Name: "disk.img", Device: "xvda", Size: size})
	setup := time.Now()
	f.writeSparseChunks("vm-frag", "disk.img", chunks)
	var sids, sums []string
	for range snapshots {
		sid := f.snapshot("vm-frag")
		require.NoError(t, f.sim.OverrideChunks("vm-frag", sid, "disk.img", chunks))
		sids = append(sids, sid)
	}
	for _, sid := range sids[:copies] {
		sums = append(sums, sha256File(t, f.source("vm-frag", sid, "disk.img")))
	}
	t.Logf("setup: %d extents of %d bytes every %d bytes, a %d MiB disk, %d snapshots: %.1f s", n, length, stride, size/mib, snapshots, time.Since(setup).Seconds())

	const cacheMiB = 64 // the default --cache-size
	m := f.mount()
	snapDir := m.path("vms", "vm-frag", "snapshots")
	ls := f.step("ls snapshots/", func() {
		names := strings.Fields(tool(t, "ls", snapDir))
		for _, sid := range sids {
			assert.Contains(t, names, sid)
		}
	})
	f.routes()
	listRSS := peakRSSMiB(t, m)
	st := f.step("stat disk.img ×3", func() {
		for _, sid := range sids {
			assert.Equal(t, strconv.FormatInt(size, 10), strings.TrimSpace(tool(t, "stat", "-c", "%s", filepath.Join(snapDir, sid, "disk.img"))))
		}
	})
	f.routes()
	statRSS := peakRSSMiB(t, m)
	for i, sid := range sids[:copies] {
		dst := filepath.Join(t.TempDir(), "disk.img")
		cp := f.step("cp --sparse=always", func() { tool(t, "cp", "--sparse=always", filepath.Join(snapDir, sid, "disk.img"), dst) })
		f.routes()
		assert.Equal(t, sums[i], sha256File(t, dst), "sha256 of the copy of snapshot %d: wrong bytes", i+1)
		t.Logf("copy %d: %.1f s, %d requests, %d MiB served (%.2f× the data)", i+1, cp.elapsed.Seconds(), cp.requests, cp.bytes>>20, float64(cp.bytes)/float64(int64(n)*length))
		require.NoError(t, os.Remove(dst))
	}
	rss := peakRSSMiB(t, m)
	t.Logf("%d extents × %d snapshots: ls %.1f s, stat ×3 %.1f s; peak RSS %d MiB after ls, %d MiB after stat, %d MiB after %d copies (cache %d MiB)",
		n, snapshots, ls.elapsed.Seconds(), st.elapsed.Seconds(), listRSS, statRSS, rss, copies, cacheMiB)
	assert.LessOrEqual(t, rss, int64(cacheMiB+128), "peak RSS MiB: cache + 128 MiB")
	assert.NotContains(t, m.logs.String(), "answer cut off", "no answer cut off")
}
