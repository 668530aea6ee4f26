package qcow2

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// readAll reads the whole disk in reads of random, odd lengths.
func readAll(t testing.TB, im *Image, r *rand.Rand) []byte {
	t.Helper()
	out := make([]byte, im.Size())
	for off := int64(0); off < im.Size(); {
		n := min(im.Size()-off, 1+r.Int64N(3*im.ClusterSize()+777))
		require.NoError(t, im.ReadAt(context.Background(), out[off:off+n], off))
		off += n
	}
	return out
}

// checkImage compares the reader with qemu's raw reading (want) and map.
func checkImage(t *testing.T, im *Image, blob *memBlob, want []byte, mapJSON []byte) {
	t.Helper()
	r := rand.New(rand.NewPCG(1, uint64(len(want))))
	require.Equal(t, int64(len(want)), im.Size())
	got := readAll(t, im, r)
	require.True(t, bytes.Equal(want, got), "content differs from qemu-img convert")
	for range 200 {
		off := r.Int64N(im.Size())
		n := 1 + r.Int64N(min(im.Size()-off, 5*im.ClusterSize()))
		p := make([]byte, n)
		require.NoError(t, im.ReadAt(context.Background(), p, off))
		require.True(t, bytes.Equal(want[off:off+n], p), "read %d at %d", n, off)
	}
	assert.Equal(t, qemuMap(t, mapJSON, im.Size()).Extents(), im.Allocated().Extents())
	// Everything outside the map reads as zeros.
	holes := extent.Full(im.Size()).Subtract(im.Allocated())
	for _, e := range holes.Extents() {
		require.True(t, isZero(want[e.Off:e.End()]), "hole %v holds data", e)
	}
	// Object bytes read by Open and a whole-disk read, with the default
	// cache: within 2% of the allocated clusters' bytes plus metadata.
	fresh := &memBlob{data: blob.data}
	im2, err := Open(context.Background(), fresh, Options{})
	require.NoError(t, err)
	defer im2.Close()
	require.NoError(t, im2.ReadAt(context.Background(), make([]byte, im.Size()), 0))
	_, n := fresh.counts()
	hostData := int64(len(blob.data)) - im2.MetadataBytes() // at most: refcounts are in there too
	assert.LessOrEqual(t, float64(n), 1.02*float64(hostData)+float64(im2.MetadataBytes()), "bytes read for the whole disk")
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func TestFixtures(t *testing.T) {
	for name, sum := range fixtures(t) {
		t.Run(name, func(t *testing.T) {
			img := readFixture(t, name)
			blob := &memBlob{data: img}
			im, err := Open(context.Background(), blob, Options{Name: name, L2CacheBytes: 1})
			require.NoError(t, err)
			defer im.Close()
			require.LessOrEqual(t, im.MetadataBytes(), int64(len(img)))
			raw := make([]byte, im.Size())
			require.NoError(t, im.ReadAt(context.Background(), raw, 0))
			h := sha256.Sum256(raw)
			require.Equal(t, sum, hex.EncodeToString(h[:]), "sha256 of the raw reading")
			js, err := os.ReadFile(filepath.Join(fixtureDir, name+".map.json"))
			require.NoError(t, err)
			checkImage(t, im, blob, raw, js)
			needQemu(t)
			path := filepath.Join(fixtureDir, name+".qcow2")
			require.True(t, bytes.Equal(qemuRaw(t, path), raw), "live qemu-img convert")
			assert.Equal(t, qemuMap(t, run(t, "qemu-img", "map", "-f", "qcow2", "--output=json", path), im.Size()).Extents(),
				im.Allocated().Extents(), "live qemu-img map")
		})
	}
}

func TestFixtureFeatures(t *testing.T) {
	ctx := context.Background()
	cases := map[string]int64{"v2-4k": 4096, "v3-512": 512, "v3-64k": 65536, "v3-4k-zstd": 4096, "v3-512-zlib": 512}
	for name, cs := range cases {
		im, err := Open(ctx, &memBlob{data: readFixture(t, name)}, Options{})
		require.NoError(t, err, name)
		assert.Equal(t, cs, im.ClusterSize(), name)
		if cs > 512 { // qemu rounds sizes up to 512 bytes
			assert.NotZero(t, im.Size()%cs, "%s: size should not be a multiple of the cluster", name)
		}
		assert.Equal(t, name == "v3-4k-zstd", im.zstd, name)
		require.NoError(t, im.Close())
		require.NoError(t, im.Close())
		require.ErrorIs(t, im.ReadAt(ctx, make([]byte, 1), 0), backend.ErrInvalid, "read after close")
	}
}

// qemuImage makes an image with qemu-img/qemu-io in a temp dir.
func qemuImage(t *testing.T, opts, size string, cmds ...string) string {
	t.Helper()
	needQemu(t)
	path := filepath.Join(t.TempDir(), "disk.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, size)
	if len(cmds) > 0 {
		args := []string{"-f", "qcow2"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		run(t, "qemu-io", append(args, path)...)
	}
	return path
}

func checkQemuPath(t *testing.T, path string) {
	t.Helper()
	img, err := os.ReadFile(path)
	require.NoError(t, err)
	blob := &memBlob{data: img}
	im, err := Open(context.Background(), blob, Options{})
	require.NoError(t, err)
	defer im.Close()
	checkImage(t, im, blob, qemuRaw(t, path), run(t, "qemu-img", "map", "-f", "qcow2", "--output=json", path))
}

// Images too large to commit, made when qemu is installed.
func TestQemuLive(t *testing.T) {
	t.Run("2MiB clusters", func(t *testing.T) {
		checkQemuPath(t, qemuImage(t, "cluster_size=2M", "9437000",
			"write -P 0x51 0 100k", "write -P 0x52 3M 2M", "write -z 5M 2M", "write -P 0x53 9436000 1000"))
	})
	t.Run("2MiB clusters v2", func(t *testing.T) {
		checkQemuPath(t, qemuImage(t, "cluster_size=2M,compat=0.10", "6M", "write -P 0x54 1M 3M"))
	})
	for _, ct := range []string{"zlib", "zstd"} {
		t.Run("64KiB compressed "+ct, func(t *testing.T) {
			src := qemuImage(t, "cluster_size=64k", "3000000",
				"write -P 0x61 0 300k", "write -P 0x62 1M 64k", "write -P 0x63 2999000 1000")
			dst := filepath.Join(t.TempDir(), "c.qcow2")
			run(t, "qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o", "compression_type="+ct, src, dst)
			checkQemuPath(t, dst)
		})
	}
	t.Run("2MiB clusters compressed", func(t *testing.T) {
		src := qemuImage(t, "cluster_size=64k", "5M", "write -P 0x71 1M 2M", "write -P 0x72 4100k 3k")
		dst := filepath.Join(t.TempDir(), "c.qcow2")
		run(t, "qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o", "cluster_size=2M,compression_type=zstd", src, dst)
		checkQemuPath(t, dst)
	})
}

// A 2 GiB image with 512 MiB in scattered extents: the map equals qemu's
// and reads match qemu's, with a cache of one of its four L2 tables. It
// runs in every mode, -short too: it takes seconds, and only its size
// makes the L2 cache evict.
func TestLarge(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 7))
	var cmds []string
	// 256 extents of 2 MiB at random (unaligned) places: about 512 MiB
	// with overlaps.
	for i := range 256 {
		off := r.Int64N(2<<30-2<<20) &^ 511
		cmds = append(cmds, fmt.Sprintf("write -P %d %d 2M", i%255+1, off))
	}
	path := qemuImage(t, "cluster_size=64k", "2G", cmds...)
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	st, err := f.Stat()
	require.NoError(t, err)
	blob := &fileBlob{f: f, size: st.Size()}
	im, err := Open(context.Background(), blob, Options{L2CacheBytes: 64 << 10})
	require.NoError(t, err)
	defer im.Close()
	want := qemuMap(t, run(t, "qemu-img", "map", "-f", "qcow2", "--output=json", path), im.Size())
	require.Equal(t, want.Extents(), im.Allocated().Extents())
	require.Greater(t, im.Allocated().Bytes(), int64(400<<20))
	raw := filepath.Join(t.TempDir(), "out.raw")
	run(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, raw)
	rf, err := os.Open(raw)
	require.NoError(t, err)
	defer rf.Close()
	for range 64 {
		off := r.Int64N(im.Size() - 4<<20)
		n := 1 + r.Int64N(4<<20)
		got := make([]byte, n)
		require.NoError(t, im.ReadAt(context.Background(), got, off))
		exp := make([]byte, n)
		_, err := rf.ReadAt(exp, off)
		require.NoError(t, err)
		require.True(t, bytes.Equal(exp, got), "read %d at %d", n, off)
	}
}

type fileBlob struct {
	f    *os.File
	size int64
}

func (b *fileBlob) Size() int64 { return b.size }
func (b *fileBlob) ReadAt(_ context.Context, p []byte, off int64) error {
	_, err := b.f.ReadAt(p, off)
	return err
}

func TestReadsMerged(t *testing.T) {
	img := readFixture(t, "v2-4k")
	blob := &memBlob{data: img}
	im, err := Open(context.Background(), blob, Options{})
	require.NoError(t, err)
	// 0 .. 8 KiB: two data clusters qemu allocated back to back.
	require.True(t, im.Allocated().Contains(0, 8<<10))
	blob.reset()
	p := make([]byte, 8<<10-600)
	require.NoError(t, im.ReadAt(context.Background(), p, 500))
	reads, n := blob.counts()
	assert.Equal(t, 1, reads, "one blob read for consecutive host clusters")
	assert.Equal(t, int64(len(p)), n)

	// Compressed clusters packed back to back: one read too.
	img = readFixture(t, "v3-4k-zlib")
	blob = &memBlob{data: img}
	im, err = Open(context.Background(), blob, Options{})
	require.NoError(t, err)
	var ext extent.Extent
	for _, e := range im.Allocated().Extents() {
		if e.Len >= 3*4096 {
			ext = e
			break
		}
	}
	require.NotZero(t, ext.Len)
	blob.reset()
	require.NoError(t, im.ReadAt(context.Background(), make([]byte, 3*4096), ext.Off))
	reads, _ = blob.counts()
	assert.Equal(t, 1, reads, "one blob read for adjacent compressed clusters")
}

func TestL2CacheBounded(t *testing.T) {
	img := readFixture(t, "v3-512")
	blob := &memBlob{data: img}
	im, err := Open(context.Background(), blob, Options{L2CacheBytes: 1024})
	require.NoError(t, err)
	assert.Equal(t, 2, im.cache.max)
	raw := readAll(t, im, rand.New(rand.NewPCG(3, 3)))
	assert.LessOrEqual(t, im.cache.len(), 2)
	im2, err := Open(context.Background(), &memBlob{data: img}, Options{})
	require.NoError(t, err)
	assert.Equal(t, readAll(t, im2, rand.New(rand.NewPCG(4, 4))), raw)
}

func TestReadArgs(t *testing.T) {
	im, err := Open(context.Background(), &memBlob{data: readFixture(t, "v3-512")}, Options{})
	require.NoError(t, err)
	require.ErrorIs(t, im.ReadAt(context.Background(), make([]byte, 2), im.Size()-1), backend.ErrInvalid)
	require.ErrorIs(t, im.ReadAt(context.Background(), make([]byte, 1), -1), backend.ErrInvalid)
	require.NoError(t, im.ReadAt(context.Background(), nil, im.Size()))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.ErrorIs(t, im.ReadAt(ctx, make([]byte, 512), 0), context.Canceled)
}

func TestProbe(t *testing.T) {
	assert.True(t, Probe(readFixture(t, "v2-4k")))
	assert.False(t, Probe([]byte("QFI")))
	assert.False(t, Probe([]byte("conectix")))
}
