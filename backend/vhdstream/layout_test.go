package vhdstream

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"runtime"
	"slices"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

const mib = 1 << 20

// countingReader has only Read, so nothing can bypass the count (bytes.Reader
// has WriteTo), and records how far ReadLayout read.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// blocksOf is the map a set of writes must produce: every 2 MiB block they
// touch, clipped to size.
func blocksOf(t *testing.T, size int64, writes ...extent.Extent) extent.Map {
	var raw []extent.Extent
	for _, w := range writes {
		lo := w.Off / (2 * mib) * (2 * mib)
		hi := min((w.End()+2*mib-1)/(2*mib)*(2*mib), size)
		raw = append(raw, extent.Extent{Off: lo, Len: hi - lo})
	}
	m, err := extent.Normalize(raw, size)
	require.NoError(t, err)
	return m
}

func TestReadLayoutQemu(t *testing.T) {
	needQemu(t)
	for _, tc := range []struct {
		name     string
		size     string
		opts     string
		writes   []extent.Extent // in the order qemu-io does them
		wantSize int64           // 0: whatever qemu-img info says
	}{
		// qemu (creator "qemu") rounds 20 MiB up to a CHS geometry and
		// writes that as the footer's current size: 20994048.
		{"chs rounded", "20M", "", []extent.Extent{ext(1*mib, 64<<10), ext(9*mib, 4<<10)}, 20994048},
		{"force_size", "20M", "force_size=on", []extent.Extent{ext(1*mib, 64<<10)}, 20 * mib},
		// Written backwards: the file holds the blocks in the order they
		// were allocated, not by index.
		{"blocks out of index order", "100M", "", []extent.Extent{ext(90*mib, 4<<10), ext(50*mib, 8<<10), ext(3*mib, 4<<10), ext(0, 512)}, 0},
		{"write across a block boundary", "10M", "", []extent.Extent{ext(2*mib-4096, 8192)}, 0},
		{"empty", "6M", "", nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var cmds []string
			for i, w := range tc.writes {
				cmds = append(cmds, "write -P "+itoa(int64(0x41+i))+" "+itoa(w.Off)+" "+itoa(w.Len))
			}
			path := qemuImage(t, tc.size, tc.opts, cmds...)
			img := readFile(t, path)
			cr := &countingReader{r: bytes.NewReader(img)}
			l, err := ReadLayout(cr)
			require.NoError(t, err)

			vs := qemuVirtualSize(t, path)
			assert.Equal(t, vs, l.Size, "qemu-img info's virtual-size")
			assert.Equal(t, int64(binary.BigEndian.Uint64(img[48:])), l.Size, "the footer's current size")
			if tc.wantSize != 0 {
				assert.Equal(t, tc.wantSize, l.Size)
			}
			assert.Equal(t, int64(2*mib), l.BlockSize)
			assert.Equal(t, int64(512), l.BitmapSize)
			assert.EqualValues(t, DiskTypeDynamic, l.DiskType)
			assert.Contains(t, []string{"qemu", "qem2"}, l.Creator, "qem2 with force_size")
			assert.Equal(t, l.End, cr.n, "read no further than the end of the BAT")
			assert.Equal(t, int64(1536+4*len(l.BAT)), l.End)

			want := blocksOf(t, l.Size, tc.writes...)
			assert.Equal(t, want.Extents(), l.Allocated().Extents())

			// Order is by file offset, and it is what qemu made.
			offs := make([]int64, 0, len(l.Order()))
			for _, b := range l.Order() {
				offs = append(offs, l.BlockOffset(int(b)))
			}
			assert.True(t, slices.IsSorted(offs))
			if tc.name == "blocks out of index order" {
				assert.Equal(t, []uint32{45, 25, 1, 0}, l.Order())
			}
		})
	}
}

func ext(off, n int64) extent.Extent { return extent.Extent{Off: off, Len: n} }

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// TestReadLayoutSizeQuirk shows the case where qemu and the footer
// disagree: qemu 7.2 derives the size of a creator "qemu"/"vpc " (and, per
// the xapi notes, "caml") image from its CHS geometry, while ReadLayout
// always takes the footer's current size, which is what XAPI means.
func TestReadLayoutSizeQuirk(t *testing.T) {
	// A creator-"qemu" image carries the CHS geometry of 20994048 bytes;
	// give it the exact 20 MiB current size XAPI would write.
	path := qemuImage(t, "20M", "", "write -P 1 0 4k")
	img := readFile(t, path)
	binary.BigEndian.PutUint64(img[40:], 20*mib)
	binary.BigEndian.PutUint64(img[48:], 20*mib)
	fixChecksums(img)
	patched := path + ".patched.vhd"
	require.NoError(t, os.WriteFile(patched, img, 0o600))
	l, err := ReadLayout(bytes.NewReader(img))
	require.NoError(t, err)
	assert.Equal(t, int64(20*mib), l.Size)
	vs := qemuVirtualSize(t, patched)
	t.Logf("footer current size %d, qemu-img virtual-size %d (from CHS)", l.Size, vs)
	assert.Equal(t, int64(20994048), vs, "qemu 7.2 takes the size from CHS for creator qemu")
}

func TestReadLayoutHostile(t *testing.T) {
	needQemu(t)
	path := qemuImage(t, "20M", "", "write -P 0xab 1M 64k", "write -P 0xcd 9M 4k")
	good := readFile(t, path)
	_, err := ReadLayout(bytes.NewReader(good))
	require.NoError(t, err)
	b0, b4 := batEntry(good, 0), batEntry(good, 4)
	put32 := func(off int, v uint32) func([]byte) { return func(b []byte) { binary.BigEndian.PutUint32(b[off:], v) } }
	put64 := func(off int, v uint64) func([]byte) { return func(b []byte) { binary.BigEndian.PutUint64(b[off:], v) } }
	for _, tc := range []struct {
		name  string
		patch func([]byte)
		fix   bool // recompute checksums after patching
		want  string
	}{
		{"footer cookie", func(b []byte) { b[0] = 'C' }, true, "footer cookie"},
		{"footer checksum", func(b []byte) { b[40]++ }, false, "footer checksum"},
		{"header cookie", func(b []byte) { b[512] = 'X' }, true, "header cookie"},
		{"header checksum", func(b []byte) { b[512+33]++ }, false, "header checksum"},
		{"fixed disk", put32(60, DiskTypeFixed), true, "fixed VHD"},
		{"disk type 7", put32(60, 7), true, "disk type 7"},
		{"format version 2", put32(12, 0x00020000), true, "format version"},
		{"header version 2", put32(512+24, 0x00020000), true, "header version"},
		{"data offset 0", put64(16, 0), true, "data offset"},
		{"data offset inside the footer", put64(16, 100), true, "data offset"},
		{"data offset all ones (fixed disk's)", put64(16, ^uint64(0)), true, "data offset"},
		{"data offset far away", put64(16, 1<<40), true, "data offset"},
		{"size 2^63", put64(48, 1<<63), true, "current size"},
		{"size above 64 TiB", put64(48, 65<<40), true, "current size"},
		{"table offset 0", put64(512+16, 0), true, "BAT offset"},
		{"table offset inside the header", put64(512+16, 600), true, "BAT offset"},
		{"table offset far away", put64(512+16, 1<<40), true, "BAT offset"},
		{"table offset 2^64-1", put64(512+16, ^uint64(0)), true, "BAT offset"},
		{"block size 0", put32(512+32, 0), true, "block size"},
		{"block size not a power of two", put32(512+32, 2*mib+512), true, "block size"},
		{"block size too small", put32(512+32, 512), true, "block size"},
		{"block size 1 GiB", put32(512+32, 1<<30), true, "block size"},
		{"entries 2^32-1", put32(512+28, ^uint32(0)), true, "BAT entries"},
		{"entries above the bound", put32(512+28, MaxEntries+1), true, "BAT entries"},
		{"entries too few for the size", put32(512+28, 10), true, "less than the disk size"},
		{"block inside the footer copy", put32(1536+4*4, 0), true, "before the end of the BAT"},
		{"block inside the header", put32(1536+4*4, 2), true, "before the end of the BAT"},
		{"block inside the BAT", put32(1536+4*4, 3), true, "before the end of the BAT"},
		{"blocks overlapping", put32(1536+4*4, b0+1), true, "overlaps"},
		{"block overlapping the one before it", put32(1536+4*0, b4-1), true, "overlaps"},
		{"duplicate entries", put32(1536+4*4, b0), true, "overlaps"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := bytes.Clone(good)
			tc.patch(img)
			if tc.fix {
				fixChecksums(img)
			}
			var ms0, ms1 runtime.MemStats
			runtime.ReadMemStats(&ms0)
			l, err := ReadLayout(bytes.NewReader(img))
			runtime.ReadMemStats(&ms1)
			require.Error(t, err)
			assert.Nil(t, l)
			assert.ErrorIs(t, err, ErrMalformed)
			assert.ErrorIs(t, err, backend.ErrUnavailable)
			assert.Contains(t, err.Error(), tc.want)
			assert.Less(t, ms1.TotalAlloc-ms0.TotalAlloc, uint64(1<<20), "no large allocation")
		})
	}
}

// TestReadLayoutTruncated cuts the stream at every byte of the layout: a
// truncation is never taken for a malformed layout (it is retried).
func TestReadLayoutTruncated(t *testing.T) {
	needQemu(t)
	img := readFile(t, qemuImage(t, "100M", "", "write -P 1 0 4k"))
	l, err := ReadLayout(bytes.NewReader(img))
	require.NoError(t, err)
	for n := range l.End {
		_, err := ReadLayout(bytes.NewReader(img[:n]))
		require.ErrorIs(t, err, io.ErrUnexpectedEOF, "cut at %d", n)
		require.NotErrorIs(t, err, ErrMalformed)
		require.ErrorIs(t, err, backend.ErrUnavailable)
	}
	_, err = ReadLayout(bytes.NewReader(img[:l.End]))
	require.NoError(t, err, "the layout ends at the BAT, padding and blocks are not needed")
}

// TestReadLayoutHugeClaims: a stream may claim the largest BAT the bounds
// allow and then end; what it costs is what it sent.
func TestReadLayoutHugeClaims(t *testing.T) {
	b := layoutBytes(MaxSize, 2*mib, nil)
	binary.BigEndian.PutUint32(b[512+28:], MaxEntries)
	fixChecksums(b)
	b = append(b, bytes.Repeat([]byte{0xff}, 4096)...)
	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	_, err := ReadLayout(bytes.NewReader(b))
	runtime.ReadMemStats(&ms1)
	require.ErrorIs(t, err, io.ErrUnexpectedEOF)
	assert.Less(t, ms1.TotalAlloc-ms0.TotalAlloc, uint64(1<<20))

	// And a real one near that size is read.
	entries := 1 << 20
	bat := make([]uint32, entries)
	for i := range bat {
		bat[i] = Absent
	}
	bat[entries-1] = uint32((1536 + 4*entries) / 512)
	l, err := ReadLayout(bytes.NewReader(layoutBytes(uint64(entries)*2*mib, 2*mib, bat)))
	require.NoError(t, err)
	assert.Equal(t, []extent.Extent{{Off: int64(entries-1) * 2 * mib, Len: 2 * mib}}, l.Allocated().Extents())
}

func TestReadLayoutDifferencing(t *testing.T) {
	bat := []uint32{Absent, 4}
	b := layoutBytes(4*mib, 2*mib, bat)
	binary.BigEndian.PutUint32(b[60:], DiskTypeDifferencing)
	copy(b[512+40:], "0123456789abcdef")
	fixChecksums(b)
	l, err := ReadLayout(bytes.NewReader(b))
	require.NoError(t, err)
	assert.EqualValues(t, DiskTypeDifferencing, l.DiskType)
	assert.Equal(t, [16]byte([]byte("0123456789abcdef")), l.ParentUID)
	assert.Equal(t, []extent.Extent{{Off: 2 * mib, Len: 2 * mib}}, l.Allocated().Extents())
}

// TestReadLayoutBATPastSize: entries past the disk (a BAT larger than
// needed) are accepted and never show in Allocated.
func TestReadLayoutBATPastSize(t *testing.T) {
	b := layoutBytes(3*mib, 2*mib, []uint32{Absent, 4, 4 + 4097, Absent})
	l, err := ReadLayout(bytes.NewReader(b))
	require.NoError(t, err)
	assert.Equal(t, []extent.Extent{{Off: 2 * mib, Len: mib}}, l.Allocated().Extents(), "clipped to Size")
}

func TestReadLayoutReaderError(t *testing.T) {
	boom := errors.New("connection reset")
	_, err := ReadLayout(io.MultiReader(bytes.NewReader(make([]byte, 100)), errReader{boom}))
	require.ErrorIs(t, err, boom)
	require.ErrorIs(t, err, backend.ErrUnavailable)
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }
