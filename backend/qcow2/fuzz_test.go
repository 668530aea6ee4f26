package qcow2

import (
	"context"
	"testing"
)

// FuzzOpen: no input panics or hangs; an accepted image's map lies within
// its size and reads anywhere return data or an error. Seeds are the
// fixtures' first clusters: Go's minimizer is quadratic in an input's
// length, so whole images would use up the fuzzing time.
func FuzzOpen(f *testing.F) {
	f.Add(readFixture(f, "v3-512")[:8<<10])
	f.Add(readFixture(f, "v3-512-zlib")[:8<<10])
	for _, name := range []string{"v2-4k", "v3-4k-zstd", "v3-64k"} {
		f.Add(readFixture(f, name)[:4096])
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ctx := context.Background()
		im, err := Open(ctx, &memBlob{data: data}, Options{L2CacheBytes: 4096, Parallel: 2})
		if err != nil {
			return
		}
		defer im.Close()
		if im.Size() < 0 || im.Size() > MaxSize {
			t.Fatalf("size %d", im.Size())
		}
		for _, e := range im.Allocated().Extents() {
			if e.Off < 0 || e.Len <= 0 || e.End() > im.Size() {
				t.Fatalf("extent %v outside size %d", e, im.Size())
			}
		}
		if im.MetadataBytes() > int64(len(data)) {
			t.Fatalf("metadata %d of %d bytes", im.MetadataBytes(), len(data))
		}
		// Reads at the start, around the allocated extents and at the end.
		offs := []int64{0, im.Size() / 2, max(0, im.Size()-3000)}
		for i, e := range im.Allocated().Extents() {
			if i == 8 {
				break
			}
			offs = append(offs, e.Off, max(0, e.Off-100))
		}
		for _, off := range offs {
			n := min(im.Size()-off, 3*im.ClusterSize()+100, 1<<20)
			_ = im.ReadAt(ctx, make([]byte, n), off)
		}
	})
}
