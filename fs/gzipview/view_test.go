package gzipview

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	kgzip "github.com/klauspost/compress/gzip"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/testenv"
)

// memDisk is a raw disk that refuses any read touching a hole, proving holes
// are never fetched, and counts the bytes it served.
type memDisk struct {
	b     []byte
	data  extent.Map
	reads atomic.Int64
}

func (d *memDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if off < 0 || off+int64(len(p)) > int64(len(d.b)) {
		return fmt.Errorf("read [%d,+%d) past end %d", off, len(p), len(d.b))
	}
	if !d.data.Contains(off, int64(len(p))) {
		return fmt.Errorf("read [%d,+%d) touches a hole", off, len(p))
	}
	d.reads.Add(int64(len(p)))
	copy(p, d.b[off:])
	return nil
}

// makeDisk builds a random disk: the given extents hold random bytes, the
// rest is zero.
func makeDisk(t testing.TB, rng *rand.Rand, size int64, raw []extent.Extent) *memDisk {
	m, err := extent.Normalize(raw, size)
	require.NoError(t, err)
	b := make([]byte, size)
	for _, e := range m.Extents() {
		for i := e.Off; i < e.End(); i++ {
			// Low entropy so compression actually shrinks the data.
			b[i] = byte(rng.IntN(4))
		}
	}
	return &memDisk{b: b, data: m}
}

// exts turns offset/length pairs into extents.
func exts(pairs ...int64) []extent.Extent {
	out := make([]extent.Extent, 0, len(pairs)/2)
	for i := 0; i+1 < len(pairs); i += 2 {
		out = append(out, extent.Extent{Off: pairs[i], Len: pairs[i+1]})
	}
	return out
}

func readAll(t testing.TB, v *View) []byte {
	ctx := context.Background()
	n, err := v.Size(ctx)
	require.NoError(t, err)
	out := make([]byte, n)
	require.NoError(t, v.ReadAt(ctx, out, 0))
	return out
}

func gunzip(t testing.TB, gz []byte) []byte {
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	require.NoError(t, err)
	zr.Multistream(true)
	out, err := io.ReadAll(zr)
	require.NoError(t, err)
	return out
}

type diskCase struct {
	name  string
	size  int64
	chunk int64
	exts  []extent.Extent
}

func diskCases() []diskCase {
	return []diskCase{
		{"empty", 0, 4096, nil},
		{"one byte data", 1, 4096, exts(0, 1)},
		{"one byte hole", 1, 4096, nil},
		{"all hole", 5*4096 + 17, 4096, nil},
		{"all data", 5*4096 + 17, 4096, exts(0, 5*4096+17)},
		{"mixed not multiple", 9*4096 + 1234, 4096, exts(100, 3000, 4096*2, 4096, 4096*4+5, 9000, 9*4096+1000, 234)},
		{"exact multiple", 8 * 4096, 4096, exts(4096, 10, 7*4096-1, 2)},
		{"data in last partial", 3*4096 + 7, 4096, exts(3*4096, 7)},
		{"chunk bigger than disk", 1000, 1 << 20, exts(10, 20)},
	}
}

func TestViewRoundTrip(t *testing.T) {
	for _, tc := range diskCases() {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(tc.size), 7))
			d := makeDisk(t, rng, tc.size, tc.exts)
			v := New(d, tc.size, d.data, Options{ChunkSize: tc.chunk, Workers: 2})
			defer v.Close()
			gz := readAll(t, v)
			assert.Equal(t, d.b, gunzip(t, gz), "Go multistream decompression")
			// Reproducible headers: no name/flags, mtime 0, in every member.
			offs, err := v.index(context.Background())
			require.NoError(t, err)
			require.Len(t, offs, int(max((tc.size+tc.chunk-1)/tc.chunk, 1))+1)
			for _, o := range offs[:len(offs)-1] {
				assert.Equal(t, []byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0}, gz[o:o+8], "member header at %d", o)
			}

			// Determinism: an independent View yields identical bytes.
			d2 := &memDisk{b: d.b, data: d.data}
			v2 := New(d2, tc.size, d.data, Options{ChunkSize: tc.chunk, Workers: 1})
			defer v2.Close()
			assert.Equal(t, gz, readAll(t, v2))

			testenv.RequireTool(t, "gzip")
			path := filepath.Join(t.TempDir(), "disk.img.gz")
			require.NoError(t, os.WriteFile(path, gz, 0o600))
			out, err := exec.Command("gzip", "-t", path).CombinedOutput()
			require.NoError(t, err, "gzip -t: %s", out)
			var stdout bytes.Buffer
			cmd := exec.Command("gzip", "-dc", path)
			cmd.Stdout = &stdout
			require.NoError(t, cmd.Run())
			assert.Equal(t, d.b, stdout.Bytes(), "zcat output")
		})
	}
}

func TestRandomReadAt(t *testing.T) {
	for _, tc := range diskCases() {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(tc.size), 9))
			d := makeDisk(t, rng, tc.size, tc.exts)
			full := readAll(t, New(d, tc.size, d.data, Options{ChunkSize: tc.chunk}))
			v := New(d, tc.size, d.data, Options{ChunkSize: tc.chunk, Workers: 2})
			defer v.Close()
			ctx := context.Background()
			for range 50 {
				off := rng.Int64N(int64(len(full)) + 1)
				n := rng.Int64N(int64(len(full)) - off + 1)
				p := make([]byte, n)
				require.NoError(t, v.ReadAt(ctx, p, off))
				require.Equal(t, full[off:off+n], p, "off %d len %d", off, n)
			}
			err := v.ReadAt(ctx, make([]byte, 2), int64(len(full))-1)
			assert.ErrorIs(t, err, ErrOutOfRange)
			assert.ErrorIs(t, v.ReadAt(ctx, make([]byte, 1), -1), ErrOutOfRange)
		})
	}
}

func TestHolesNotRead(t *testing.T) {
	const size = 64 * 4096
	rng := rand.New(rand.NewPCG(1, 2))
	d := makeDisk(t, rng, size, exts(4096*3+5, 100, 4096*40, 3*4096))
	v := New(d, size, d.data, Options{ChunkSize: 4096})
	defer v.Close()
	gz := readAll(t, v)
	assert.Equal(t, d.b, gunzip(t, gz))
	// Only data bytes may ever be fetched, each at most a few times (LRU
	// eviction may recompress), never hole bytes (memDisk would fail).
	assert.LessOrEqual(t, d.reads.Load(), 3*d.data.Bytes())
}

func TestPersistedIndex(t *testing.T) {
	const size = 20*4096 + 3
	rng := rand.New(rand.NewPCG(3, 4))
	d := makeDisk(t, rng, size, exts(0, 5000, 4096*10, 20000))
	path := filepath.Join(t.TempDir(), "idx")
	ctx := context.Background()

	v1 := New(d, size, d.data, Options{ChunkSize: 4096, IndexPath: path})
	want := readAll(t, v1)
	v1.Close()
	st, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())

	t.Run("reused", func(t *testing.T) {
		d2 := &memDisk{b: d.b, data: d.data}
		v := New(d2, size, d.data, Options{ChunkSize: 4096, IndexPath: path})
		defer v.Close()
		n, err := v.Size(ctx)
		require.NoError(t, err)
		assert.Equal(t, int64(len(want)), n)
		assert.Zero(t, d2.reads.Load(), "Size must come from the persisted index")
		assert.Equal(t, want, readAll(t, v))
	})

	good, err := os.ReadFile(path)
	require.NoError(t, err)
	other, err := extent.Normalize(exts(0, 5000), size)
	require.NoError(t, err)
	cases := []struct {
		name   string
		file   []byte
		data   extent.Map
		level  int
		chunk  int64
		absent bool
	}{
		{"truncated", good[:len(good)-5], d.data, 1, 4096, false},
		{"bit flip", flip(good, 40), d.data, 1, 4096, false},
		{"garbage", []byte("not an index"), d.data, 1, 4096, false},
		{"other extents", good, other, 1, 4096, false},
		{"other level", good, d.data, 6, 4096, false},
		{"other chunk", good, d.data, 1, 8192, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "idx")
			require.NoError(t, os.WriteFile(p, tc.file, 0o600))
			raw := make([]byte, size)
			copy(raw, d.b)
			dd := &memDisk{b: raw, data: tc.data}
			// Zero bytes outside tc.data so the reference matches.
			for i := range raw {
				if !tc.data.Contains(int64(i), 1) {
					raw[i] = 0
				}
			}
			v := New(dd, size, tc.data, Options{ChunkSize: tc.chunk, Level: tc.level, IndexPath: p})
			defer v.Close()
			gz := readAll(t, v)
			assert.Positive(t, dd.reads.Load(), "index must be rebuilt, not trusted")
			assert.Equal(t, raw, gunzip(t, gz))
			rebuilt, err := os.ReadFile(p)
			require.NoError(t, err)
			assert.NotEqual(t, tc.file, rebuilt)
		})
	}
}

func flip(b []byte, i int) []byte {
	out := bytes.Clone(b)
	out[i] ^= 1
	return out
}

// changedDisk returns different bytes than the index was built from, under
// the same identity; the view must fail rather than serve mixed data.
func TestIndexDisagreementIsError(t *testing.T) {
	const size = 4 * 4096
	rng := rand.New(rand.NewPCG(5, 6))
	d := makeDisk(t, rng, size, exts(0, size))
	path := filepath.Join(t.TempDir(), "idx")
	v1 := New(d, size, d.data, Options{ChunkSize: 4096, IndexPath: path})
	_ = readAll(t, v1)
	v1.Close()

	changed := &memDisk{b: make([]byte, size), data: d.data} // all zeros now
	v := New(changed, size, d.data, Options{ChunkSize: 4096, IndexPath: path})
	defer v.Close()
	n, err := v.Size(context.Background())
	require.NoError(t, err)
	assert.Error(t, v.ReadAt(context.Background(), make([]byte, n), 0))
}

func TestConcurrentReads(t *testing.T) {
	const size = 40*4096 + 11
	rng := rand.New(rand.NewPCG(7, 8))
	d := makeDisk(t, rng, size, exts(0, 10*4096, 20*4096, 15*4096))
	full := readAll(t, New(d, size, d.data, Options{ChunkSize: 4096}))
	v := New(d, size, d.data, Options{ChunkSize: 4096, Workers: 2})
	defer v.Close()
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for range 40 {
				off := r.Int64N(int64(len(full)))
				n := r.Int64N(min(int64(len(full))-off, 20000) + 1)
				p := make([]byte, n)
				if assert.NoError(t, v.ReadAt(context.Background(), p, off)) {
					assert.Equal(t, full[off:off+n], p)
				}
			}
		}()
	}
	wg.Wait()
}

// blockingDisk blocks every read until its context ends.
type blockingDisk struct{}

func (blockingDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	<-ctx.Done()
	return ctx.Err()
}

func TestContextCancelled(t *testing.T) {
	data := extent.Full(10 * 4096)
	v := New(blockingDisk{}, 10*4096, data, Options{ChunkSize: 4096})
	defer v.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := v.Size(ctx)
	assert.ErrorIs(t, err, context.Canceled)
}

func TestRawErrorPropagates(t *testing.T) {
	errBoom := errors.New("boom")
	data := extent.Full(3 * 4096)
	v := New(failDisk{errBoom}, 3*4096, data, Options{ChunkSize: 4096})
	defer v.Close()
	_, err := v.Size(context.Background())
	assert.ErrorIs(t, err, errBoom)
}

type failDisk struct{ err error }

func (f failDisk) ReadAt(context.Context, []byte, int64) error { return f.err }

func TestIndexCodec(t *testing.T) {
	id := identity{compressVersion: "v", level: 1, chunkSize: 4096, rawSize: 10000}
	good := encodeIndex(id, []int64{100, 200, 30})
	lengths, err := decodeIndex(good, id, 3)
	require.NoError(t, err)
	assert.Equal(t, []int64{100, 200, 30}, lengths)
	_, err = decodeIndex(good, id, 4)
	assert.ErrorIs(t, err, errBadIndex)
	id2 := id
	id2.compressVersion = "w"
	_, err = decodeIndex(good, id2, 3)
	assert.ErrorIs(t, err, errBadIndex)
	for i := range good {
		_, err := decodeIndex(flip(good, i), id, 3)
		assert.ErrorIs(t, err, errBadIndex, "flip at %d", i)
	}
}

func FuzzIndexDecode(f *testing.F) {
	id := identity{compressVersion: "v1", level: 1, chunkSize: 4096, rawSize: 3 * 4096}
	f.Add(encodeIndex(id, []int64{100, 200, 300}))
	f.Add([]byte{})
	f.Add([]byte(indexMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		lengths, err := decodeIndex(b, id, 3)
		if err != nil {
			require.Nil(t, lengths)
			return
		}
		// Accepted only if it is exactly what we would have written.
		require.Equal(t, encodeIndex(id, lengths), b)
	})
}

func FuzzView(f *testing.F) {
	f.Add(uint16(5000), uint16(512), uint16(100), uint16(300), uint16(2000), uint16(700), uint16(10), uint16(4000))
	f.Add(uint16(0), uint16(1), uint16(0), uint16(0), uint16(0), uint16(0), uint16(0), uint16(0))
	f.Add(uint16(1), uint16(64), uint16(0), uint16(1), uint16(0), uint16(0), uint16(0), uint16(1))
	f.Fuzz(func(t *testing.T, size16, chunk16, o1, l1, o2, l2, roff, rlen uint16) {
		size := int64(size16 % 20000)
		chunk := int64(chunk16%4096) + 1
		if size/chunk > 200 {
			chunk = size/200 + 1
		}
		var raw []extent.Extent
		for _, e := range [][2]int64{{int64(o1), int64(l1)}, {int64(o2), int64(l2)}} {
			if size == 0 {
				break
			}
			off := e[0] % size
			raw = append(raw, extent.Extent{Off: off, Len: min(e[1], size-off)})
		}
		rng := rand.New(rand.NewPCG(uint64(size), uint64(chunk)))
		d := makeDisk(t, rng, size, raw)
		whole := New(d, size, d.data, Options{ChunkSize: chunk, Workers: 1})
		full := readAll(t, whole)
		whole.Close() // stop its read-ahead before the next input
		require.Equal(t, d.b, gunzip(t, full))
		v := New(d, size, d.data, Options{ChunkSize: chunk, Workers: 2})
		defer v.Close()
		off := int64(roff) % (int64(len(full)) + 1)
		n := min(int64(rlen), int64(len(full))-off)
		p := make([]byte, n)
		require.NoError(t, v.ReadAt(context.Background(), p, off))
		require.Equal(t, full[off:off+n], p)
	})
}

const benchSize = 64 << 20

func benchDisk(b *testing.B) *memDisk {
	rng := rand.New(rand.NewPCG(11, 12))
	var dataExts []extent.Extent
	// Half data: alternate 1 MiB data / 1 MiB hole.
	for off := int64(0); off < benchSize; off += 2 << 20 {
		dataExts = append(dataExts, extent.Extent{Off: off, Len: 1 << 20})
	}
	return makeDisk(b, rng, benchSize, dataExts)
}

// BenchmarkSequential streams the whole view like `cp`: "cold" includes the
// index build of a first stat, "indexed" starts from a persisted index.
func BenchmarkSequential(b *testing.B) {
	d := benchDisk(b)
	ctx := context.Background()
	idx := filepath.Join(b.TempDir(), "idx")
	warm := New(d, benchSize, d.data, Options{IndexPath: idx})
	_, err := warm.Size(ctx)
	require.NoError(b, err)
	warm.Close()
	for _, bc := range []struct {
		name string
		path string
	}{{"cold", ""}, {"indexed", idx}} {
		b.Run(bc.name, func(b *testing.B) {
			buf := make([]byte, 128<<10)
			b.SetBytes(benchSize)
			for range b.N {
				v := New(d, benchSize, d.data, Options{IndexPath: bc.path})
				n, err := v.Size(ctx)
				require.NoError(b, err)
				for off := int64(0); off < n; off += int64(len(buf)) {
					p := buf[:min(int64(len(buf)), n-off)]
					require.NoError(b, v.ReadAt(ctx, p, off))
				}
				v.Close()
			}
		})
	}
}

func BenchmarkGzipReference(b *testing.B) {
	d := benchDisk(b)
	b.SetBytes(benchSize)
	b.ResetTimer()
	for range b.N {
		zw, err := kgzip.NewWriterLevel(io.Discard, kgzip.BestSpeed)
		require.NoError(b, err)
		_, err = zw.Write(d.b)
		require.NoError(b, err)
		require.NoError(b, zw.Close())
	}
}
