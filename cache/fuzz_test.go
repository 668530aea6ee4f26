package cache

import (
	"context"
	"encoding/binary"
	"testing"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// FuzzReadAt drives arbitrary extent maps, block sizes and read sequences
// through a small cache and checks every byte against the reference.
func FuzzReadAt(f *testing.F) {
	f.Add(uint16(1000), uint8(3), []byte{0, 10, 0, 100, 1, 200, 0, 50, 0, 0, 0, 255, 3, 0, 1, 0})
	f.Add(uint16(4096), uint8(0), []byte{})
	f.Add(uint16(1), uint8(7), []byte{0, 0, 0, 1, 0, 0, 0, 1})
	f.Fuzz(fuzzBody)
}

func fuzzBody(t *testing.T, size16 uint16, bsShift uint8, ops []byte) {
	if len(ops) > 256 {
		ops = ops[:256]
	}
	size := int64(size16)
	// Blocks of at least 256 bytes keep one execution fast enough to fuzz.
	bs := int64(1) << (bsShift%7 + 8)
	// The first half of ops makes extents, the second half reads.
	half := len(ops) / 2
	var raw []extent.Extent
	for i := 0; i+4 <= half; i += 4 {
		off := int64(binary.LittleEndian.Uint16(ops[i:]))
		n := int64(binary.LittleEndian.Uint16(ops[i+2:]))
		if size == 0 {
			break
		}
		off %= size
		raw = append(raw, extent.Extent{Off: off, Len: min(n, size-off)})
	}
	m, err := extent.Normalize(raw, size)
	if err != nil {
		t.Fatalf("normalize of clamped extents: %v", err)
	}
	ref := make([]byte, size)
	for _, e := range m.Extents() {
		for i := e.Off; i < e.End(); i++ {
			ref[i] = byte(i%251) | 1
		}
	}
	src := &memSource{t: t, ref: ref, data: m}
	c := New(Options{BlockSize: bs, Capacity: 4 * bs, Parallel: 2, MaxReadahead: 4 * bs})
	defer c.Close()
	r := c.Open("f", size, m, src)
	defer r.Close()
	for i := half; i+4 <= len(ops); i += 4 {
		off := int64(binary.LittleEndian.Uint16(ops[i:]))
		n := int64(binary.LittleEndian.Uint16(ops[i+2:]) & 0x1fff) // short reads keep executions fast
		p := make([]byte, n)
		err := r.ReadAt(context.Background(), p, off)
		if off+n > size {
			if err == nil {
				t.Fatalf("read [%d,+%d) past size %d succeeded", off, n, size)
			}
			continue
		}
		if err != nil {
			t.Fatalf("read [%d,+%d): %v", off, n, err)
		}
		for j := range p {
			if p[j] != ref[off+int64(j)] {
				t.Fatalf("byte %d differs: got %d want %d", off+int64(j), p[j], ref[off+int64(j)])
			}
		}
	}
}
