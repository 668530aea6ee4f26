package gzipview

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// garbageDisk answers hole bytes with garbage, the way a reader that reads
// through short holes might, and counts its calls.
type garbageDisk struct {
	b     []byte
	data  extent.Map
	calls atomic.Int64
}

func (d *garbageDisk) ReadAt(_ context.Context, p []byte, off int64) error {
	d.calls.Add(1)
	copy(p, d.b[off:])
	for i := range p {
		if !d.data.Contains(off+int64(i), 1) {
			p[i] = 0xEE
		}
	}
	return nil
}

// TestCompressChunkCoalescesReads: a member made of 16-byte extents 256 bytes
// apart is read in one call, not one per extent, and the holes compress as
// zeros whatever the reader returned for them; extents far apart are read
// apart.
func TestCompressChunkCoalescesReads(t *testing.T) {
	const chunk = 1 << 20
	for _, tc := range []struct {
		name  string
		raw   []extent.Extent
		calls int64
	}{
		{"4096 small extents", func() (out []extent.Extent) {
			for i := range int64(4096) {
				out = append(out, extent.Extent{Off: i * 256, Len: 16})
			}
			return out
		}(), 1},
		{"far apart", exts(0, 4096, 512<<10, 4096), 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := extent.Normalize(tc.raw, chunk)
			require.NoError(t, err)
			d := &garbageDisk{b: make([]byte, chunk), data: m}
			for _, e := range m.Extents() {
				for i := e.Off; i < e.End(); i++ {
					d.b[i] = byte(i) | 1
				}
			}
			v := New(d, chunk, m, Options{ChunkSize: chunk, Workers: 1})
			defer v.Close()
			assert.Equal(t, d.b, gunzip(t, readAll(t, v)))
			assert.Equal(t, tc.calls, d.calls.Load(), "raw reads for the one member")
		})
	}
}
