package qcow2

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/testenv"
)

const fixtureDir = "../../testdata/qcow2"

// memBlob is a Blob over bytes that counts its reads.
type memBlob struct {
	data []byte

	mu    sync.Mutex
	reads int
	bytes int64
}

func (b *memBlob) Size() int64 { return int64(len(b.data)) }

func (b *memBlob) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if off < 0 || off > int64(len(b.data))-int64(len(p)) {
		return fmt.Errorf("memBlob: read %d at %d of %d", len(p), off, len(b.data))
	}
	copy(p, b.data[off:])
	b.mu.Lock()
	b.reads++
	b.bytes += int64(len(p))
	b.mu.Unlock()
	return nil
}

func (b *memBlob) counts() (int, int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.reads, b.bytes
}

func (b *memBlob) reset() {
	b.mu.Lock()
	b.reads, b.bytes = 0, 0
	b.mu.Unlock()
}

// fixtures lists the committed images with the sha256 of qemu's raw
// reading of each (SHA256SUMS, written by scripts/qcow2-fixtures.sh).
func fixtures(t testing.TB) map[string]string {
	t.Helper()
	f, err := os.Open(filepath.Join(fixtureDir, "SHA256SUMS"))
	require.NoError(t, err)
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		sum, file, ok := strings.Cut(sc.Text(), "  ")
		require.True(t, ok, sc.Text())
		out[strings.TrimSuffix(file, ".raw")] = sum
	}
	require.NoError(t, sc.Err())
	require.NotEmpty(t, out)
	return out
}

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(fixtureDir, name+".qcow2"))
	require.NoError(t, err)
	return b
}

// qemuMap is qemu-img map --output=json's data extents as a Map: qemu
// reports zero-flag clusters as zero:true data:false and compressed
// clusters as data, which is what Allocated means.
func qemuMap(t testing.TB, js []byte, size int64) extent.Map {
	t.Helper()
	var ents []struct {
		Start, Length int64
		Data          bool
	}
	require.NoError(t, json.Unmarshal(js, &ents))
	var raw []extent.Extent
	for _, e := range ents {
		if e.Data {
			raw = append(raw, extent.Extent{Off: e.Start, Len: e.Length})
		}
	}
	m, err := extent.Normalize(raw, size)
	require.NoError(t, err)
	return m
}

func needQemu(t testing.TB) {
	t.Helper()
	testenv.RequireTool(t, "qemu-img", "qemu-io")
}

func run(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	out, err := exec.Command(name, args...).Output()
	require.NoError(t, err, "%s %v: %s", name, args, out)
	return out
}

func qemuRaw(t testing.TB, path string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	run(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, out)
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	return b
}

// Fields of an image, for patching.
func clusterSizeOf(img []byte) int64 { return 1 << binary.BigEndian.Uint32(img[20:]) }
func l1OffsetOf(img []byte) int64    { return int64(binary.BigEndian.Uint64(img[40:])) }

// l1Entry returns the L2 table offset of L1 entry i.
func l1Entry(img []byte, i int) int64 {
	return int64(binary.BigEndian.Uint64(img[l1OffsetOf(img)+8*int64(i):]) & offsetMask)
}

func putL1(img []byte, i int, v uint64) {
	binary.BigEndian.PutUint64(img[l1OffsetOf(img)+8*int64(i):], v)
}

// firstL2 returns the offset of the first entry of the first L2 table
// whose entry matches ok.
func firstL2(t testing.TB, img []byte, ok func(uint64) bool) int64 {
	t.Helper()
	l2 := l1Entry(img, 0)
	require.NotZero(t, l2)
	for i := int64(0); i < clusterSizeOf(img)/8; i++ {
		if ok(binary.BigEndian.Uint64(img[l2+8*i:])) {
			return l2 + 8*i
		}
	}
	t.Fatal("no such L2 entry")
	return 0
}
