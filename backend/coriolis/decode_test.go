package coriolis

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// refSnapshot is the decoding the streaming decoder replaced (whole body,
// encoding/json, json.Number chunks): the reference it must agree with.
type refSnapshot struct {
	ID      string    `json:"id"`
	VMID    string    `json:"vm_id"`
	VMIDAlt string    `json:"vmID"`
	Disks   []refDisk `json:"disks"`
}

type refDisk struct {
	Name          string     `json:"name"`
	Path          string     `json:"path"`
	SnapshotID    string     `json:"snapshot_id"`
	SnapshotIDAlt string     `json:"snapshotID"`
	Chunks        []refChunk `json:"chunks"`
}

type refChunk struct {
	Start  json.Number `json:"start"`
	Length json.Number `json:"length"`
}

func refNumber(n json.Number) (int64, error) {
	if n == "" {
		return 0, errors.New("missing")
	}
	v, err := strconv.ParseInt(string(n), 10, 64)
	if err != nil || v < 0 {
		return 0, errors.New("bad")
	}
	return v, nil
}

// refDecode decodes like the old decodeJSON; disks' chunks come back as raw
// extents, or nil with ok=false when a chunk value was bad.
func refDecode(s string) (snap refSnapshot, chunks [][]extent.Extent, ok []bool, err error) {
	if err = json.Unmarshal([]byte(s), &snap); err != nil {
		return
	}
	if snap.VMID == "" {
		snap.VMID = snap.VMIDAlt
	}
	for i, d := range snap.Disks {
		if d.SnapshotID == "" {
			snap.Disks[i].SnapshotID = d.SnapshotIDAlt
		}
		var raw []extent.Extent
		good := true
		for _, c := range d.Chunks {
			start, err1 := refNumber(c.Start)
			length, err2 := refNumber(c.Length)
			if err1 != nil || err2 != nil {
				good, raw = false, nil
				break
			}
			raw = append(raw, extent.Extent{Off: start, Len: length})
		}
		chunks, ok = append(chunks, raw), append(ok, good)
	}
	return
}

// checkAgainstReference fails t when the streaming decoder rejects what the
// old decoder accepted, or reads it differently.
func checkAgainstReference(t *testing.T, s string) {
	ref, refChunks, refOK, refErr := refDecode(s)
	var got apiSnapshot
	err := decodeJSON(strings.NewReader(s), &got)
	if refErr != nil {
		return // the new decoder may be more lenient about chunk values
	}
	require.NoError(t, err, "accepted before: %.200q", s)
	require.Equal(t, ref.ID, got.ID)
	require.Equal(t, ref.VMID, got.VMID)
	require.Len(t, got.Disks, len(ref.Disks))
	for i, d := range got.Disks {
		require.Equal(t, ref.Disks[i].Name, d.Name)
		require.Equal(t, ref.Disks[i].Path, d.Path)
		require.Equal(t, ref.Disks[i].SnapshotID, d.SnapshotID)
		if !refOK[i] {
			require.ErrorIs(t, d.Chunks.bad, errHostile, "disk %d: a bad chunk marks the map hostile", i)
			continue
		}
		require.NoError(t, d.Chunks.bad, "disk %d", i)
		require.Equal(t, len(refChunks[i]), len(d.Chunks.extents()), "disk %d", i)
		if len(refChunks[i]) > 0 {
			require.Equal(t, refChunks[i], d.Chunks.extents(), "disk %d", i)
		}
	}
}

func TestDecodeSnapshotStream(t *testing.T) {
	for _, tc := range []struct {
		name, json string
		want       apiSnapshot       // without chunks
		chunks     [][]extent.Extent // per disk
		hostile    bool
		err        bool
	}{
		{"server spelling", `{"id":"s","vm_id":"v","disks":[{"name":"d","path":"/p","snapshot_id":"s","parent_path":"/x","repo_mountpoint":"/r","chunks":[{"start":0,"length":4096,"physical_start":7},{"start":8192,"length":512,"physical_start":9}]}]}`,
			apiSnapshot{ID: "s", VMID: "v", Disks: []apiDiskSnapshot{{Name: "d", Path: "/p", SnapshotID: "s"}}}, [][]extent.Extent{{{Off: 0, Len: 4096}, {Off: 8192, Len: 512}}}, false, false},
		{"README spelling", `{"id":"s","vmID":"v","disks":[{"name":"d","snapshotID":"s","chunks":[]}]}`,
			apiSnapshot{ID: "s", VMID: "v", Disks: []apiDiskSnapshot{{Name: "d", SnapshotID: "s"}}}, [][]extent.Extent{nil}, false, false},
		{"keys in any case, later key wins", `{"ID":"a","Id":"s","VM_ID":"v","disks":[{"NAME":"d","Chunks":[{"START":1,"Length":2,"start":5}]}]}`,
			apiSnapshot{ID: "s", VMID: "v", Disks: []apiDiskSnapshot{{Name: "d"}}}, [][]extent.Extent{{{Off: 5, Len: 2}}}, false, false},
		{"nulls", `{"id":null,"disks":[null,{"name":"d","chunks":null}]}`,
			apiSnapshot{Disks: []apiDiskSnapshot{{}, {Name: "d"}}}, [][]extent.Extent{nil, nil}, false, false},
		{"numbers as strings", `{"disks":[{"chunks":[{"start":"10","length":"\u0035"}]}]}`,
			apiSnapshot{Disks: []apiDiskSnapshot{{}}}, [][]extent.Extent{{{Off: 10, Len: 5}}}, false, false},
		{"unknown fields of every kind", `{"x":{"a":[1,{"b":"}"}]},"disks":[{"chunks":[{"physical_start":[1,2],"start":0,"q":"\"","length":1}]}]}`,
			apiSnapshot{Disks: []apiDiskSnapshot{{}}}, [][]extent.Extent{{{Off: 0, Len: 1}}}, false, false},
		{"negative", `{"disks":[{"chunks":[{"start":-1,"length":1}]}]}`, apiSnapshot{}, nil, true, false},
		{"fraction", `{"disks":[{"chunks":[{"start":1.0,"length":1}]}]}`, apiSnapshot{}, nil, true, false},
		{"uint64", `{"disks":[{"chunks":[{"start":18446744073709551615,"length":1}]}]}`, apiSnapshot{}, nil, true, false},
		{"missing", `{"disks":[{"chunks":[{"length":1}]}]}`, apiSnapshot{}, nil, true, false},
		{"not a number: hostile, not fatal", `{"disks":[{"chunks":[{"start":true,"length":1}]}]}`, apiSnapshot{}, nil, true, false},
		{"not an object: hostile, not fatal", `{"disks":[{"chunks":[7]}]}`, apiSnapshot{}, nil, true, false},
		{"bad string number", `{"disks":[{"chunks":[{"start":"007","length":1}]}]}`, apiSnapshot{}, nil, true, false},
		{"malformed", `{"disks":[{"chunks":[{"start":1,"length":1}]`, apiSnapshot{}, nil, false, true},
		{"trailing data", `{"id":"s"} {}`, apiSnapshot{}, nil, false, true},
		{"id not a string", `{"id":5}`, apiSnapshot{}, nil, false, true},
		{"disks not an array", `{"disks":{}}`, apiSnapshot{}, nil, false, true},
		{"not an object", `[]`, apiSnapshot{}, nil, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got apiSnapshot
			err := decodeJSON(strings.NewReader(tc.json), &got)
			if tc.err {
				require.ErrorIs(t, err, backend.ErrUnavailable)
				return
			}
			require.NoError(t, err)
			if tc.hostile {
				require.Len(t, got.Disks, 1)
				assert.ErrorIs(t, got.Disks[0].Chunks.bad, errHostile)
				_, err := chunkMap(got.Disks[0].Chunks, 100)
				assert.ErrorIs(t, err, errHostile)
				return
			}
			var chunks [][]extent.Extent
			for i := range got.Disks {
				require.NoError(t, got.Disks[i].Chunks.bad)
				chunks = append(chunks, got.Disks[i].Chunks.extents())
				got.Disks[i].Chunks = chunkList{}
			}
			assert.Equal(t, tc.want, got)
			assert.Equal(t, tc.chunks, chunks)
			checkAgainstReference(t, tc.json)
		})
	}
}

// TestDecodeSnapshotList: the list route decodes as a stream too, keeping
// short chunk lists as a snapshot GET would (hostile ones included, which
// make the map untrusted) and dropping long ones, and otherwise as
// json.Unmarshal (through UnmarshalJSON) does.
func TestDecodeSnapshotList(t *testing.T) {
	body := `[{"id":"a","vm_id":"v","disks":[{"name":"d","chunks":[{"start":0,"length":1}]}]},null,{"id":"b","vmID":"v","disks":[{"name":"e","chunks":[{"start":-1}]}]}]`
	var streamed, unmarshaled []apiSnapshot
	require.NoError(t, decodeJSON(strings.NewReader(body), &streamed))
	require.NoError(t, json.Unmarshal([]byte(body), &unmarshaled))
	require.Len(t, streamed, 3)
	assert.Equal(t, []extent.Extent{{Off: 0, Len: 1}}, unmarshaled[0].Disks[0].Chunks.extents())
	require.ErrorIs(t, unmarshaled[2].Disks[0].Chunks.bad, errHostile)
	assert.Equal(t, unmarshaled, streamed)
	assert.Equal(t, "b", streamed[2].ID)
	assert.Equal(t, "v", streamed[2].VMID)
	assert.False(t, streamed[0].Disks[0].Chunks.dropped)

	var long strings.Builder
	long.WriteString(`[{"id":"c","disks":[{"name":"d","chunks":[`)
	for i := range keptChunks + 1 {
		if i > 0 {
			long.WriteByte(',')
		}
		fmt.Fprintf(&long, `{"start":%d,"length":1}`, 2*i)
	}
	long.WriteString(`]},{"name":"e","chunks":[{"start":0,"length":1}]}]}]`)
	require.NoError(t, decodeJSON(strings.NewReader(long.String()), &streamed))
	require.Len(t, streamed, 1)
	assert.True(t, streamed[0].Disks[0].Chunks.dropped)
	assert.Nil(t, streamed[0].Disks[0].Chunks.extents(), "a dropped list says nothing")
	assert.False(t, streamed[0].Disks[1].Chunks.dropped, "the short list is kept: that disk's opening needs no GET")
	assert.Equal(t, []extent.Extent{{Off: 0, Len: 1}}, streamed[0].Disks[1].Chunks.extents())
}

// millionChunks is a snapshot answer of n chunks of 16 bytes 256 apart, as
// the server encodes them (with physical_start).
func millionChunks(n int) []byte {
	var b bytes.Buffer
	b.WriteString(`{"id":"s","vm_id":"v","disks":[{"parent_path":"/p","path":"/x","snapshot_id":"s","chunks":[`)
	for i := range n {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"start":%d,"length":16,"physical_start":%d}`, i*256, 1<<40+i*4096)
	}
	b.WriteString(`],"name":"d","repo_mountpoint":"/r"}]}` + "\n")
	return b.Bytes()
}

// TestDecodeMillionChunksCompact: a 1,000,000-chunk answer (about 55 MB of
// JSON) is decoded holding about 16 bytes per chunk, without holding the
// body: the heap after decoding is the extents, and the peak stays far below
// one copy of the body.
func TestDecodeMillionChunksCompact(t *testing.T) {
	const n = 1_000_000
	body := millionChunks(n)
	t.Logf("answer: %d bytes for %d chunks", len(body), n)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	var s apiSnapshot
	require.NoError(t, decodeJSON(bytes.NewReader(body), &s))
	runtime.GC()
	runtime.ReadMemStats(&after)
	require.Len(t, s.Disks, 1)
	require.NoError(t, s.Disks[0].Chunks.bad)
	require.Len(t, s.Disks[0].Chunks.extents(), n)
	assert.Equal(t, extent.Extent{Off: (n - 1) * 256, Len: 16}, s.Disks[0].Chunks.extents()[n-1])
	held := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	allocated := after.TotalAlloc - before.TotalAlloc
	t.Logf("held after decoding: %.1f bytes per chunk (%d MB); allocated while decoding: %d MB",
		float64(held)/n, held>>20, allocated>>20)
	assert.LessOrEqual(t, held, int64(n*24), "at most 16 bytes per chunk plus append slack")
	assert.Less(t, allocated, uint64(len(body)), "decoding allocates less than one copy of the body")

	m, err := chunkMap(s.Disks[0].Chunks, n*256)
	require.NoError(t, err)
	assert.Equal(t, n, m.Len())

	// The list route carries the same chunks; listing skips them one at a
	// time, holding none and never the list.
	list := append(append([]byte("["), bytes.TrimSpace(body)...), ']')
	runtime.GC()
	runtime.ReadMemStats(&before)
	var snaps []apiSnapshot
	require.NoError(t, decodeJSON(bytes.NewReader(list), &snaps))
	runtime.ReadMemStats(&after)
	require.Len(t, snaps, 1)
	allocated = after.TotalAlloc - before.TotalAlloc
	t.Logf("list of one such snapshot: allocated %d KB while decoding", allocated>>10)
	assert.Less(t, allocated, uint64(1<<20), "skipped chunks are never held")
	runtime.KeepAlive(body)
}

// TestChunkMapNormalizedLog: OpenDisk logs one line per map it had to repair
// (unsorted or overlapping chunks), and none for adjacent chunks, which
// FIEMAP produces routinely.
func TestChunkMapNormalizedLog(t *testing.T) {
	for _, tc := range []struct {
		name, chunks string
		line         string
		want         []extent.Extent
	}{
		{"unsorted and overlapping", `[{"start":8192,"length":4096},{"start":0,"length":4096},{"start":8192,"length":100},{"start":1024,"length":10}]`,
			"chunk map normalized: 4 unsorted/overlapping extents", []extent.Extent{{Off: 0, Len: 4096}, {Off: 8192, Len: 4096}}},
		{"adjacent", `[{"start":0,"length":4096},{"start":4096,"length":4096},{"start":8192,"length":4096}]`,
			"", []extent.Extent{{Off: 0, Len: 12288}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t)
			f.chunks = tc.chunks
			_, cfg := startFake(t, f)
			var logs bytes.Buffer
			cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
			c, err := New(context.Background(), cfg)
			require.NoError(t, err)
			d, err := c.OpenDisk(context.Background(), backend.DiskRef{VM: "vm1", Snapshot: "s-new", Disk: "disk0.img"})
			require.NoError(t, err)
			assert.Equal(t, tc.want, d.Allocated().Extents())
			if tc.line == "" {
				assert.NotContains(t, logs.String(), "normalized")
				return
			}
			assert.Equal(t, 1, strings.Count(logs.String(), tc.line), logs.String())
			assert.Contains(t, logs.String(), "vm=vm1 snapshot=s-new disk=disk0.img")
		})
	}
}

func FuzzDecodeSnapshotStream(f *testing.F) {
	f.Add(`{"id":"s","vm_id":"v","disks":[{"name":"d","snapshot_id":"s","chunks":[{"start":0,"length":10,"physical_start":3}]}]}`)
	f.Add(`{"ID":"s","vmID":"v","disks":[null,{"Name":"d","snapshotID":"s","chunks":[{"start":"1","length":2},{"start":-1,"length":1e3}]}]}`)
	f.Add(`{"disks":[{"chunks":[{"st\u0061rt":1,"length":2,"x":{"y":["}"]}}]}],"other":[1,2]}`)
	f.Add(`{"disks":[{"chunks":[{"ſtart":1,"length":2}]}]}`)
	f.Add(`{"disks":[{"chunks":null,"chunks":[{}]}]} `)
	f.Add(`{"id":"s","disks":[{"chunks":[{"start":0,"length":1,"physical_start":4096}]}]} }`)
	f.Fuzz(func(t *testing.T, s string) {
		checkAgainstReference(t, s)
		checkListAgainstReference(t, s)
		var keep apiSnapshot
		err := decodeJSON(strings.NewReader(s), &keep)
		requireRefusedUnlessJSON(t, s, err)
		if err != nil {
			return
		}
		for _, d := range keep.Disks {
			requireByteRanges(t, d.Chunks.extents())
		}
		// Decoded for a delta, the chunks are the same, with a
		// non-negative physical start for each or none at all.
		var phys unsquashedSnapshot
		require.NoError(t, decodeJSON(strings.NewReader(s), &phys))
		require.Len(t, phys.Disks, len(keep.Disks))
		for i, d := range phys.Disks {
			require.Equal(t, keep.Disks[i].Chunks.extents(), d.Chunks.extents())
			require.Equal(t, keep.Disks[i].Chunks.bad, d.Chunks.bad)
			if d.Chunks.phys != nil {
				require.Len(t, d.Chunks.phys, len(d.Chunks.extents()))
				for _, p := range d.Chunks.phys {
					require.GreaterOrEqual(t, p, int64(0))
				}
			}
		}
	})
}

// requireRefusedUnlessJSON fails t when decodeJSON accepted s though it is
// not one JSON value (encoding/json refuses it).
func requireRefusedUnlessJSON(t *testing.T, s string, err error) {
	t.Helper()
	if !json.Valid([]byte(s)) {
		require.Error(t, err, "accepted what is not JSON: %.200q", s)
	}
}

// requireByteRanges fails t unless every extent is a byte range of an
// int64 offset space: non-negative, and ending where an int64 can say.
func requireByteRanges(t *testing.T, exts []extent.Extent) {
	t.Helper()
	for _, e := range exts {
		require.True(t, e.Off >= 0 && e.Len >= 0 && e.Off <= math.MaxInt64-e.Len, "chunk %+v is no byte range", e)
	}
}

// checkListAgainstReference is checkAgainstReference for the list route,
// of a list holding the one snapshot one: ids and disk names must agree,
// and a kept chunk list must be what the snapshot's own decode gives.
func checkListAgainstReference(t *testing.T, one string) {
	s := "[" + one + "]"
	var ref []refSnapshot
	if json.Unmarshal([]byte(s), &ref) != nil {
		return
	}
	var got []apiSnapshot
	require.NoError(t, decodeJSON(strings.NewReader(s), &got), "accepted before: %.200q", s)
	require.Len(t, got, len(ref))
	for i := range ref {
		vmID := ref[i].VMID
		if vmID == "" {
			vmID = ref[i].VMIDAlt
		}
		require.Equal(t, ref[i].ID, got[i].ID)
		require.Equal(t, vmID, got[i].VMID)
		require.Len(t, got[i].Disks, len(ref[i].Disks))
		var alone apiSnapshot
		require.NoError(t, decodeJSON(strings.NewReader(one), &alone))
		for j, d := range got[i].Disks {
			require.Equal(t, ref[i].Disks[j].Name, d.Name)
			if !d.Chunks.dropped {
				require.Equal(t, alone.Disks[j].Chunks, d.Chunks)
			}
		}
	}
}
