package vhdview

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// TestReadDataCoalesces: a block of 16-byte extents 256 bytes apart is read
// from raw in one call per read, not one per extent, and the holes read as
// zeros even when raw returns garbage for them.
func TestReadDataCoalesces(t *testing.T) {
	const size = blockSize
	var raw []extent.Extent
	for i := range int64(size / 256) {
		raw = append(raw, extent.Extent{Off: i * 256, Len: 16})
	}
	m := mustMap(t, size, raw...)
	want := make([]byte, size)
	for _, e := range m.Extents() {
		for i := e.Off; i < e.End(); i++ {
			want[i] = byte(i) | 1
		}
	}
	garbage := bytes.Repeat([]byte{0xEE}, size)
	for _, e := range m.Extents() {
		copy(garbage[e.Off:e.End()], want[e.Off:])
	}
	d := &memDisk{data: garbage}
	v, err := NewDynamic(d, Dynamic{Size: size, Data: m})
	require.NoError(t, err)
	got := make([]byte, size)
	// One read of the block's data area, in 128 KiB pieces like FUSE.
	start := v.dataStart + bitmapSize
	for off := int64(0); off < size; off += 128 << 10 {
		require.NoError(t, v.ReadAt(context.Background(), got[off:off+128<<10], start+off))
	}
	assert.Equal(t, want, got)
	assert.Len(t, d.reads, size/(128<<10), "one raw read per 128 KiB read")
}
