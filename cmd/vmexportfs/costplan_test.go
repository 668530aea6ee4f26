package main

import (
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
)

// TestCostPlannedReads: an exporter whose every disk request costs as much
// as the real one's on a fragmented disk (it re-reads the snapshot's whole
// chunk list: ObservedChunkListCost per chunk) and a disk of 4 KiB extents
// spread evenly over it. Reads are planned by what requests cost: the cache
// measures the fixed part, reads through the holes that cost less than a
// request and fetches several blocks per request, so the copy costs a few
// requests per 4 MiB instead of one per extent or per 1 MiB block.
// The exporter answers several ranges with one multipart answer, so only
// the extents travel.
//
// VMEXPORTFS_COST_EXTENTS (default 20,000), VMEXPORTFS_COST_DISK_MIB
// (default 256) and VMEXPORTFS_COST_CACHE_MIB (--cache-size, default 64)
// set the size; the rows are 100,000 extents of a 4,096 MiB disk
// and 1,000,000 of an 8,192 MiB one.
func TestCostPlannedReads(t *testing.T) {
	requireTools(t, "cp")
	n := envInt(t, "VMEXPORTFS_COST_EXTENTS", 20_000)
	size := int64(envInt(t, "VMEXPORTFS_COST_DISK_MIB", 256)) * mib
	const length = 4 * kib
	stride := size / int64(n) / (4 * kib) * (4 * kib)
	require.Greater(t, stride, int64(length), "the extents must have holes between them")
	f := newFixture(t, coriolistest.Options{ChunkListCost: coriolistest.ObservedChunkListCost})
	sid := f.fragmented("vm-cost", size, sparseChunks(n, stride, length))
	want := sha256File(t, f.source("vm-cost", sid, "disk.img"))

	cacheMiB := int64(envInt(t, "VMEXPORTFS_COST_CACHE_MIB", 64))
	m := f.mount("--cache-size", fmt.Sprintf("%dM", cacheMiB))
	disk := m.path("vms", "vm-cost", "snapshots", sid, "disk.img")
	dst := filepath.Join(t.TempDir(), "disk.img")
	cp := f.step("cp --sparse=always", func() { tool(t, "cp", "--sparse=always", disk, dst) })
	assert.Equal(t, want, sha256File(t, dst), "sha256 of the copy: wrong bytes")
	blocks := size / mib
	rss := peakRSSMiB(t, m)
	data := int64(n) * length
	doc := mountStats(t, m)
	t.Logf("%d extents of %d bytes every %d bytes, %d MiB disk, chunk list cost %s per request, %d MiB cache: cp %.1f s, %d disk requests (%d 1 MiB blocks), %d MiB served (%.3f× the data), peak RSS %d MiB; %d READs reached the mount, %d MiB stored in the page cache ahead of cp",
		n, length, stride, size/mib, (time.Duration(n) * coriolistest.ObservedChunkListCost).String(), cacheMiB, cp.elapsed.Seconds(), cp.requests, blocks, cp.bytes/mib,
		float64(cp.bytes)/float64(data), rss, doc.Reads.ReadRequests, doc.Reads.PageCacheBytes/mib)
	// Per block (or per extent) would be ≥ blocks requests. A fetch carries
	// up to 4 MiB with the default cache (in flight: half of it), so the
	// copy needs about a quarter as many; some demand reads and the HEAD
	// come on top.
	assert.LessOrEqual(t, cp.requests, blocks/2, "disk requests")
	// No hole is read: each 4 KiB extent comes in a multipart part whose
	// boundary and header lines are about 200 bytes.
	assert.LessOrEqual(t, cp.bytes, data+int64(n)*256, "bytes served: the extents and the multipart framing")
	assert.LessOrEqual(t, rss, cacheMiB+128, "peak RSS (MiB): the cache and 128 MiB")
	// Holes under 64 KiB are not reported to lseek (fs.minSeekHole): cp
	// reads such a disk in 1 MiB READs and finds the zeros itself; one
	// with longer holes has the extents in the page cache before cp reads
	// them. Either way, not a READ an extent.
	assert.Less(t, doc.Reads.ReadRequests, int64(n/4), "READs that reached the mount")
}
