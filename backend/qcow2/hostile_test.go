package qcow2

import (
	"bytes"
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
)

func put32(img []byte, at int, v uint32) { binary.BigEndian.PutUint32(img[at:], v) }
func put64(img []byte, at int, v uint64) { binary.BigEndian.PutUint64(img[at:], v) }

// Images patched in memory: each is refused with a clear error, quickly,
// without a panic or a large allocation.
func TestHostile(t *testing.T) {
	isData := func(e uint64) bool { return e&entryCompressed == 0 && e&offsetMask != 0 && e&entryZero == 0 }
	isComp := func(e uint64) bool { return e&entryCompressed != 0 }
	cases := []struct {
		name    string
		fixture string
		patch   func(t *testing.T, img []byte) []byte
		want    error
		text    string
	}{
		{"bad magic", "v3-64k", func(_ *testing.T, b []byte) []byte { b[3] = 0xfa; return b }, ErrMalformed, "magic"},
		{"version 1", "v3-64k", func(_ *testing.T, b []byte) []byte { put32(b, 4, 1); return b }, backend.ErrUnsupported, "version"},
		{"version 4", "v3-64k", func(_ *testing.T, b []byte) []byte { put32(b, 4, 4); return b }, backend.ErrUnsupported, "version"},
		{"cluster_bits 8", "v3-64k", func(_ *testing.T, b []byte) []byte { put32(b, 20, 8); return b }, ErrMalformed, "cluster_bits"},
		{"cluster_bits 22", "v3-64k", func(_ *testing.T, b []byte) []byte { put32(b, 20, 22); return b }, ErrMalformed, "cluster_bits"},
		{"cluster_bits huge", "v3-64k", func(_ *testing.T, b []byte) []byte { put32(b, 20, 1<<31); return b }, ErrMalformed, "cluster_bits"},
		{"backing file", "v3-64k", func(_ *testing.T, b []byte) []byte { put64(b, 8, 0x200); put32(b, 16, 8); return b }, backend.ErrUnsupported, "backing"},
		{"encryption", "v3-64k", func(_ *testing.T, b []byte) []byte { put32(b, 32, 2); return b }, backend.ErrUnsupported, "encrypted"},
		{"external data file", "v3-64k", func(_ *testing.T, b []byte) []byte { b[79] |= incDataFile; return b }, backend.ErrUnsupported, "external data"},
		{"extended L2", "v3-64k", func(_ *testing.T, b []byte) []byte { b[79] |= incExtendedL2; return b }, backend.ErrUnsupported, "extended L2"},
		{"unknown incompatible", "v3-64k", func(_ *testing.T, b []byte) []byte { b[79] |= 1 << 6; return b }, backend.ErrUnsupported, "unknown incompatible"},
		{"corrupt", "v3-64k", func(_ *testing.T, b []byte) []byte { b[79] |= incCorrupt; return b }, ErrMalformed, "corrupt"},
		{"compression type without bit", "v3-4k-zstd", func(_ *testing.T, b []byte) []byte { b[79] &^= incCompType; return b }, ErrMalformed, "compression_type"},
		{"unknown compression type", "v3-4k-zstd", func(_ *testing.T, b []byte) []byte { b[104] = 7; return b }, backend.ErrUnsupported, "compression_type"},
		{"huge size", "v3-64k", func(_ *testing.T, b []byte) []byte { put64(b, 24, 1<<50); return b }, ErrMalformed, "virtual size"},
		{"size beyond L1", "v3-64k", func(_ *testing.T, b []byte) []byte { put64(b, 24, 60<<40); return b }, ErrMalformed, "does not cover"},
		{"huge L1 count", "v3-64k", func(_ *testing.T, b []byte) []byte { put32(b, 36, 1<<31); return b }, ErrMalformed, "L1 table of"},
		{"L1 past the end", "v3-64k", func(_ *testing.T, b []byte) []byte { put64(b, 40, 1<<40); return b }, ErrMalformed, "past the end"},
		{"L1 unaligned", "v3-64k", func(_ *testing.T, b []byte) []byte { put64(b, 40, uint64(l1OffsetOf(b))+8); return b }, ErrMalformed, "not cluster-aligned"},
		{"L1 in the header", "v3-64k", func(_ *testing.T, b []byte) []byte { put64(b, 40, 0); return b }, ErrMalformed, "header cluster"},
		{"L2 past the end", "v3-64k", func(_ *testing.T, b []byte) []byte { putL1(b, 0, uint64(len(b))+1<<16|entryCopied); return b }, ErrMalformed, "past the end"},
		{"L2 at the L1 table", "v3-64k", func(_ *testing.T, b []byte) []byte { putL1(b, 0, uint64(l1OffsetOf(b))); return b }, ErrMalformed, "overlaps the L1 table"},
		{"L2 at the refcount table", "v3-64k", func(_ *testing.T, b []byte) []byte { putL1(b, 0, binary.BigEndian.Uint64(b[48:])); return b }, ErrMalformed, "overlaps the refcount table"},
		{"L2 unaligned", "v3-64k", func(_ *testing.T, b []byte) []byte { putL1(b, 0, uint64(l1Entry(b, 0))+512); return b }, ErrMalformed, "not cluster-aligned"},
		{"L1 reserved bits", "v3-64k", func(_ *testing.T, b []byte) []byte { putL1(b, 0, uint64(l1Entry(b, 0))|1<<60); return b }, ErrMalformed, "reserved"},
		{"data cluster past the end", "v3-64k", func(t *testing.T, b []byte) []byte {
			put64(b, int(firstL2(t, b, isData)), uint64(len(b))+1<<16)
			return b
		}, ErrMalformed, "past the end"},
		{"data reserved bits", "v3-64k", func(t *testing.T, b []byte) []byte {
			at := int(firstL2(t, b, isData))
			put64(b, at, binary.BigEndian.Uint64(b[at:])|1<<57)
			return b
		}, ErrMalformed, "reserved"},
		{"data unaligned", "v3-64k", func(t *testing.T, b []byte) []byte {
			at := int(firstL2(t, b, isData))
			put64(b, at, binary.BigEndian.Uint64(b[at:])+4096)
			return b
		}, ErrMalformed, "not cluster-aligned"},
		{"compressed past the end", "v3-4k-zlib", func(t *testing.T, b []byte) []byte {
			at := int(firstL2(t, b, isComp))
			put64(b, at, entryCompressed|uint64(len(b))+100)
			return b
		}, ErrMalformed, "compressed data"},
		{"compressed runs past the end", "v3-4k-zlib", func(t *testing.T, b []byte) []byte {
			at := int(firstL2(t, b, isComp))
			put64(b, at, entryCompressed|7<<(62-4)|uint64(len(b))-1024)
			return b
		}, ErrMalformed, "compressed data"},
		{"compressed in the header", "v3-4k-zlib", func(t *testing.T, b []byte) []byte {
			put64(b, int(firstL2(t, b, isComp)), entryCompressed|100)
			return b
		}, ErrMalformed, "inside the header"},
		{"truncated", "v3-64k", func(_ *testing.T, b []byte) []byte { return b[:len(b)-1<<16] }, ErrMalformed, "past the end"},
		{"header only", "v3-64k", func(_ *testing.T, b []byte) []byte { return b[:100] }, ErrMalformed, "shorter than a v3 header"},
		{"empty", "v3-64k", func(_ *testing.T, b []byte) []byte { return nil }, ErrMalformed, "shorter than a header"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			img := c.patch(t, bytes.Clone(readFixture(t, c.fixture)))
			start := time.Now()
			_, err := Open(context.Background(), &memBlob{data: img}, Options{Name: "hostile"})
			require.Error(t, err)
			assert.ErrorIs(t, err, c.want)
			if c.want == ErrMalformed {
				assert.ErrorIs(t, err, backend.ErrUnavailable)
			}
			assert.Contains(t, err.Error(), c.text)
			assert.Contains(t, err.Error(), "qcow2 hostile: open")
			assert.Less(t, time.Since(start), 2*time.Second)
		})
	}
}

// A compressed cluster that does not decompress fails its read, not Open.
func TestBadCompressedData(t *testing.T) {
	img := bytes.Clone(readFixture(t, "v3-4k-zlib"))
	at := firstL2(t, img, func(e uint64) bool { return e&entryCompressed != 0 })
	e := binary.BigEndian.Uint64(img[at:])
	host := int64(e & (1<<(62-4) - 1))
	for i := range int64(64) {
		img[host+i] = 0xff
	}
	im, err := Open(context.Background(), &memBlob{data: img}, Options{})
	require.NoError(t, err)
	vc := (at - l1Entry(img, 0)) / 8
	err = im.ReadAt(context.Background(), make([]byte, 4096), vc*4096)
	require.ErrorIs(t, err, ErrMalformed)
	require.ErrorIs(t, err, backend.ErrUnavailable)
}

func TestDirtyAccepted(t *testing.T) {
	img := bytes.Clone(readFixture(t, "v3-64k"))
	img[79] |= incDirty
	im, err := Open(context.Background(), &memBlob{data: img}, Options{})
	require.NoError(t, err)
	require.NoError(t, im.ReadAt(context.Background(), make([]byte, 100), 0))
}

// Many L1 entries sharing one L2 table full of data: bounded work and map.
func TestSharedL2(t *testing.T) {
	img := bytes.Clone(readFixture(t, "v3-4k-zlib"))
	l2 := l1Entry(img, 0)
	put64(img, 24, 1<<40) // 1 TiB: 2^28 clusters, 2^19 L1 entries
	l1 := int64(len(img))
	img = append(img, make([]byte, 4<<20)...)
	put64(img, 40, uint64(l1))
	put32(img, 36, 1<<19)
	for i := range 1 << 19 {
		// The same table everywhere, alternating with none: every other
		// 2 MiB is data, 2^18 extents.
		if i%2 == 0 {
			put64(img, int(l1)+8*i, uint64(l2))
		}
	}
	start := time.Now()
	im, err := Open(context.Background(), &memBlob{data: img}, Options{})
	if err == nil {
		assert.LessOrEqual(t, im.Allocated().Len(), MaxExtents)
	}
	assert.Less(t, time.Since(start), 30*time.Second) // generous: -race is slow
}
