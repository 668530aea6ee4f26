package coriolistest

import (
	"net/http"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestOverrideChunks: an overridden chunk list is what every answer about the
// snapshot disk reports, unsquashed even when squashing is asked for; other
// snapshots and the data are untouched.
func TestOverrideChunks(t *testing.T) {
	h := newHarness(t)
	m := setupDisk(t, h, testDiskSize)
	var chunks []Chunk
	for i := range uint64(64) {
		// Adjacent pairs, so squashing would have merged them.
		chunks = append(chunks, Chunk{Start: i * 256, Length: 16, PhysicalStart: 1 << 30}, Chunk{Start: i*256 + 16, Length: 16, PhysicalStart: 1<<20 + i})
		h.write(m, int64(i*256), pattern(byte(i), 32))
	}
	sid, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	other, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	computed := h.snapshot("vm1", other, "").Disks[0].Chunks

	require.NoError(t, h.srv.OverrideChunks("vm1", sid, "d.img", chunks))
	want := slices.Clone(chunks)
	chunks[0].Start = 99 // the server keeps its own copy
	for _, q := range []string{"", "squashChunks=true", "squashChunks=false"} {
		assert.Equal(t, want, h.snapshot("vm1", sid, q).Disks[0].Chunks, q)
	}
	r := h.get("/api/v1/vms/vm1/snapshots")
	require.Equal(t, http.StatusOK, r.status)
	assert.Contains(t, string(r.body), `{"start":16,"length":16,"physical_start":1048576}`, "the list route reports it too")
	assert.Equal(t, computed, h.snapshot("vm1", other, "").Disks[0].Chunks, "other snapshots keep their map")
	requireChunksCover(t, h.snapshot("vm1", sid, "").Disks[0].Chunks, m.data)
	body := h.get(diskPath("vm1", sid, "d.img")).body
	assert.Equal(t, m.data, body, "the data is the written data")

	require.Error(t, h.srv.OverrideChunks("vm1", "no-such", "d.img", chunks))
	require.Error(t, h.srv.OverrideChunks("vm1", sid, "no-such", chunks))
}
