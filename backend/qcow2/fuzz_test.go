package qcow2

import (
	"context"
	"testing"
)

// FuzzOpen: no input panics or hangs; an accepted image's map lies within
// its size and reads anywhere return data or an error, zeros in the holes. Seeds are the
// fixtures' first clusters: Go's minimizer is quadratic in an input's
// length, so whole images would use up the fuzzing time.
func FuzzOpen(f *testing.F) {
	f.Add(readFixture(f, "v3-512")[:8<<10])
	// None of the cut fixtures opens (their tables lie past the cut), so
	// without one whole image the seeds never read: the smallest, 16 KiB.
	f.Add(readFixture(f, "v3-512"))
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
		type span struct{ off, n int64 }
		var reads []span
		for _, off := range offs {
			reads = append(reads, span{off, min(im.Size()-off, 3*im.ClusterSize()+100, 1<<20)})
		}
		if im.Size() <= 2<<20 {
			reads = append(reads, span{0, im.Size()}) // every hole of a small image
		}
		alloc := im.Allocated()
		for _, r := range reads {
			off, n := r.off, r.n
			p := make([]byte, n)
			for i := range p {
				p[i] = 0xa5 // a hole must be written as zeros, not left
			}
			if im.ReadAt(ctx, p, off) != nil {
				continue
			}
			// Holes (unallocated and zero clusters) read as zeros.
			for i, b := range p {
				if b != 0 && !alloc.Contains(off+int64(i), 1) {
					t.Fatalf("byte %d of a hole reads %#x", off+int64(i), b)
				}
			}
		}
	})
}
