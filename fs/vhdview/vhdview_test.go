package vhdview

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf16"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/testenv"
)

// memDisk is a raw disk in memory that records every read.
type memDisk struct {
	data  []byte
	mu    sync.Mutex
	reads []extent.Extent
}

func (m *memDisk) ReadAt(_ context.Context, p []byte, off int64) error {
	if off < 0 || off+int64(len(p)) > int64(len(m.data)) {
		return fmt.Errorf("read past raw end: %d+%d > %d", off, len(p), len(m.data))
	}
	m.mu.Lock()
	m.reads = append(m.reads, extent.Extent{Off: off, Len: int64(len(p))})
	m.mu.Unlock()
	copy(p, m.data[off:])
	return nil
}

// readUnion returns the union of recorded reads, failing on overlaps so a
// byte fetched twice by a full sequential copy is caught.
func (m *memDisk) readUnion(t *testing.T) extent.Map {
	t.Helper()
	var total int64
	for _, r := range m.reads {
		total += r.Len
	}
	u, err := extent.Normalize(m.reads, int64(len(m.data)))
	require.NoError(t, err)
	assert.Equal(t, u.Bytes(), total, "a raw byte was read twice")
	return u
}

// diskWith builds a raw disk holding random bytes in the given extents and zeros elsewhere.
func diskWith(rng *rand.Rand, size int64, m extent.Map) []byte {
	b := make([]byte, size)
	for _, e := range m.Extents() {
		for i := e.Off; i < e.End(); i++ {
			b[i] = byte(rng.Uint32()) | 1
		}
	}
	return b
}

func mustMap(t testing.TB, size int64, exts ...extent.Extent) extent.Map {
	m, err := extent.Normalize(exts, size)
	require.NoError(t, err)
	return m
}

// writeView copies the view to path in random-size pieces.
func writeView(t *testing.T, rng *rand.Rand, v *View, path string) []byte {
	t.Helper()
	out := make([]byte, v.Size())
	for off := int64(0); off < v.Size(); {
		n := min(v.Size()-off, 1+rng.Int64N(3<<20))
		require.NoError(t, v.ReadAt(context.Background(), out[off:off+n], off))
		off += n
	}
	require.NoError(t, os.WriteFile(path, out, 0o644))
	return out
}

func padSector(b []byte) []byte {
	return append(bytes.Clone(b), make([]byte, roundUp(int64(len(b)), 512)-int64(len(b)))...)
}

func sha(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	require.NoError(t, err, "%s %v: %s", name, args, out)
	return string(out)
}

// parsed is what the test's tiny VHD reader extracts from an image.
type parsed struct {
	footer   footer
	parentID [16]byte
	parent   string
	bat      []uint32
	bitmaps  map[uint32][]byte
}

type footer struct {
	DataOffset uint64
	Timestamp  uint32
	Creator    string
	Size       uint64
	Geometry   uint32
	DiskType   uint32
	ID         [16]byte
}

func parseFooter(b []byte) (footer, error) {
	if len(b) != 512 || string(b[:8]) != "conectix" {
		return footer{}, errors.New("bad footer cookie")
	}
	c := bytes.Clone(b)
	want := binary.BigEndian.Uint32(c[64:])
	clear(c[64:68])
	if checksum(c) != want {
		return footer{}, errors.New("bad footer checksum")
	}
	f := footer{
		DataOffset: binary.BigEndian.Uint64(b[16:]),
		Timestamp:  binary.BigEndian.Uint32(b[24:]),
		Creator:    string(b[28:32]),
		Size:       binary.BigEndian.Uint64(b[48:]),
		Geometry:   binary.BigEndian.Uint32(b[56:]),
		DiskType:   binary.BigEndian.Uint32(b[60:]),
	}
	copy(f.ID[:], b[68:84])
	return f, nil
}

// parseImage checks the structure the spec requires and returns its contents.
func parseImage(img []byte) (parsed, error) {
	var p parsed
	if len(img) < 1536+512 {
		return p, errors.New("image too short")
	}
	f, err := parseFooter(img[:512])
	if err != nil {
		return p, err
	}
	if !bytes.Equal(img[:512], img[len(img)-512:]) {
		return p, errors.New("footer copy differs from footer")
	}
	p.footer = f
	h := bytes.Clone(img[512:1536])
	if string(h[:8]) != "cxsparse" {
		return p, errors.New("bad header cookie")
	}
	want := binary.BigEndian.Uint32(h[36:])
	clear(h[36:40])
	if checksum(h) != want {
		return p, errors.New("bad header checksum")
	}
	batOff := binary.BigEndian.Uint64(h[16:])
	entries := binary.BigEndian.Uint32(h[28:])
	if binary.BigEndian.Uint32(h[32:]) != blockSize || uint64(entries) != (f.Size+blockSize-1)/blockSize {
		return p, errors.New("bad block size or entry count")
	}
	copy(p.parentID[:], h[40:56])
	var units []uint16
	for i := 64; i < 576; i += 2 {
		u := binary.BigEndian.Uint16(h[i:])
		if u == 0 {
			break
		}
		units = append(units, u)
	}
	p.parent = string(utf16.Decode(units))
	if batOff+uint64(entries)*4 > uint64(len(img)) {
		return p, errors.New("BAT past end")
	}
	p.bitmaps = map[uint32][]byte{}
	next := uint64(0)
	for i := uint32(0); i < entries; i++ {
		e := binary.BigEndian.Uint32(img[batOff+uint64(i)*4:])
		p.bat = append(p.bat, e)
		if e == absent {
			continue
		}
		o := uint64(e) * 512
		if o < next || o+blockStride > uint64(len(img))-512 {
			return p, fmt.Errorf("block %d at %d out of order or past end", i, o)
		}
		next = o + blockStride
		p.bitmaps[i] = img[o : o+512]
	}
	if next != 0 && next != uint64(len(img))-512 {
		return p, errors.New("gap before footer")
	}
	return p, nil
}

type info struct {
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
}

func TestDynamicTools(t *testing.T) {
	testenv.RequireTool(t, "qemu-img")
	const MiB = 1 << 20
	tests := []struct {
		name string
		size int64
		data []extent.Extent
	}{
		{"10MiB+1536 sparse", 10*MiB + 1536, exts([2]int64{0, 4096}, [2]int64{3 * MiB, 100}, [2]int64{10 * MiB, 1536})},
		{"odd size not sector multiple", 5*MiB + 777, exts([2]int64{2*MiB - 10, 20}, [2]int64{5 * MiB, 777})},
		{"full 4MiB", 4 * MiB, exts([2]int64{0, 4 * MiB})},
		{"empty 7MiB", 7 * MiB, nil},
		{"one block crossing", 6*MiB + 512, exts([2]int64{MiB, 3 * MiB})},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(i), 1))
			m := mustMap(t, tc.size, tc.data...)
			disk := &memDisk{data: diskWith(rng, tc.size, m)}
			v, err := NewDynamic(disk, Dynamic{Size: tc.size, Data: m, ID: ID("vm", "s1", "disk0")})
			require.NoError(t, err)
			dir := t.TempDir()
			path := filepath.Join(dir, "disk.vhd")
			img := writeView(t, rng, v, path)
			assert.Equal(t, m, disk.readUnion(t), "raw reads must be exactly the data extents")

			p, err := parseImage(img)
			require.NoError(t, err)
			assert.Equal(t, uint32(3), p.footer.DiskType)
			assert.Equal(t, "tap\x00", p.footer.Creator)
			assert.Len(t, p.bitmaps, v.Blocks())
			for _, bm := range p.bitmaps {
				assert.Equal(t, bytes.Repeat([]byte{0xff}, 512), bm)
			}

			var inf info
			require.NoError(t, json.Unmarshal([]byte(run(t, "qemu-img", "info", "--output=json", path)), &inf))
			assert.Equal(t, "vpc", inf.Format)
			assert.Equal(t, roundUp(tc.size, 512), inf.VirtualSize)
			// qemu's vpc driver has no check routine (exit 63); anything
			// else but success means qemu found the image broken.
			if out, err := exec.Command("qemu-img", "check", path).CombinedOutput(); err != nil {
				assert.Contains(t, string(out), "does not support checks")
			}
			rawPath := filepath.Join(dir, "out.raw")
			run(t, "qemu-img", "convert", "-O", "raw", path, rawPath)
			got, err := os.ReadFile(rawPath)
			require.NoError(t, err)
			assert.Equal(t, sha(padSector(disk.data)), sha(got))
		})
	}
}

func TestDifferencingTools(t *testing.T) {
	testenv.RequireRoot(t) // vhdimount mounts the chain
	testenv.RequireTool(t, "vhdiinfo", "vhdimount", "fusermount3")
	const MiB = 1 << 20
	tests := []struct {
		name    string
		size    int64
		changed []extent.Extent
	}{
		{"crossing block boundaries", 8 * MiB, exts([2]int64{2*MiB - 8192, 16384}, [2]int64{4*MiB - 1, 2*MiB + 2})},
		{"no changes", 4 * MiB, nil},
		{"unaligned changes", 6*MiB + 1536, exts([2]int64{1, 1}, [2]int64{5000, 3}, [2]int64{3*MiB + 4095, 2}, [2]int64{6*MiB + 1000, 536})},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(i), 2))
			base := diskWith(rng, tc.size, extent.Full(tc.size))
			changed := mustMap(t, tc.size, tc.changed...)
			target := bytes.Clone(base)
			for _, e := range changed.Extents() {
				for j := e.Off; j < e.End(); j++ {
					target[j] = ^target[j]
				}
			}
			parentID := ID("vm", "s1", "disk0")
			dir := t.TempDir()
			pv, err := NewDynamic(&memDisk{data: base}, Dynamic{Size: tc.size, Data: extent.Full(tc.size), ID: parentID})
			require.NoError(t, err)
			writeView(t, rng, pv, filepath.Join(dir, "s1.vhd"))

			disk := &memDisk{data: target}
			v, err := NewDifferencing(disk, Differencing{Size: tc.size, Changed: changed, ID: ID("vm", "s2", "s1", "disk0"),
				ParentID: parentID, ParentName: "s1.vhd", ParentPath: `..\s1\disk.vhd`})
			require.NoError(t, err)
			deltaPath := filepath.Join(dir, "delta-from-s1.vhd")
			img := writeView(t, rng, v, deltaPath)

			p, err := parseImage(img)
			require.NoError(t, err)
			assert.Equal(t, uint32(4), p.footer.DiskType)
			assert.Equal(t, parentID, p.parentID)
			assert.Equal(t, "s1.vhd", p.parent)
			assert.Len(t, p.bitmaps, v.Blocks())
			// Every changed byte's sector is marked; bytes served = marked sectors only.
			var served int64
			for b, bm := range p.bitmaps {
				for s := int64(0); s < blockSize/512; s++ {
					if bm[s/8]&(0x80>>(s%8)) != 0 {
						served += 512
					}
				}
				_ = b
			}
			for _, e := range changed.Extents() {
				for s := e.Off / 512; s <= (e.End()-1)/512; s++ {
					bm := p.bitmaps[uint32(s*512/blockSize)]
					require.NotNil(t, bm)
					k := s % (blockSize / 512)
					assert.NotZero(t, bm[k/8]&(0x80>>(k%8)), "sector %d not marked", s)
				}
			}
			rounded := int64(0)
			for _, e := range v.marked.Extents() {
				rounded += e.Len
			}
			assert.LessOrEqual(t, served, roundUp(rounded, 4096))
			if changed.Len() == 0 {
				assert.Zero(t, v.Blocks())
			}
			assert.Equal(t, mustMap(t, tc.size, clipTo(v.marked, tc.size)...), disk.readUnion(t))

			out := run(t, "vhdiinfo", deltaPath)
			assert.Contains(t, out, "Differential")
			assert.Contains(t, out, "s1.vhd")
			assert.Contains(t, strings.ToLower(out), uuidString(parentID))

			mnt := filepath.Join(dir, "mnt")
			require.NoError(t, os.Mkdir(mnt, 0o755))
			run(t, "vhdimount", deltaPath, mnt)
			defer func() { _ = exec.Command("fusermount3", "-u", mnt).Run() }()
			got, err := os.ReadFile(filepath.Join(mnt, "vhdi2"))
			require.NoError(t, err)
			assert.Equal(t, sha(padSector(target)), sha(got))
		})
	}
}

func clipTo(m extent.Map, size int64) []extent.Extent { return m.Clip(0, size) }

func uuidString(id [16]byte) string {
	h := hex.EncodeToString(id[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

func TestErrors(t *testing.T) {
	disk := &memDisk{data: make([]byte, 1024)}
	tests := []struct {
		name string
		mk   func() (*View, error)
	}{
		{"negative size", func() (*View, error) { return NewDynamic(disk, Dynamic{Size: -1}) }},
		{"too big", func() (*View, error) { return NewDynamic(disk, Dynamic{Size: MaxSize + 1}) }},
		{"nil reader", func() (*View, error) { return NewDynamic(nil, Dynamic{Size: 1024}) }},
		{"no parent name", func() (*View, error) { return NewDifferencing(disk, Differencing{Size: 1024}) }},
		{"long parent name", func() (*View, error) {
			return NewDifferencing(disk, Differencing{Size: 1024, ParentName: strings.Repeat("x", 257)})
		}},
		{"long parent path", func() (*View, error) {
			return NewDifferencing(disk, Differencing{Size: 1024, ParentName: "p.vhd", ParentPath: strings.Repeat("x", 257)})
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.mk()
			assert.ErrorIs(t, err, ErrInvalid)
		})
	}
	v, err := NewDynamic(disk, Dynamic{Size: 1024, Data: extent.Full(1024)})
	require.NoError(t, err)
	assert.Error(t, v.ReadAt(context.Background(), make([]byte, 2), v.Size()-1))
	assert.Error(t, v.ReadAt(context.Background(), make([]byte, 1), -1))
}

func TestMaxSize(t *testing.T) {
	v, err := NewDynamic(&memDisk{}, Dynamic{Size: MaxSize})
	require.NoError(t, err)
	assert.Equal(t, int64(1536+4*(MaxSize/blockSize)+512), v.Size())
	f := make([]byte, 512)
	require.NoError(t, v.ReadAt(context.Background(), f, 0))
	got, err := parseFooter(f)
	require.NoError(t, err)
	assert.Equal(t, uint64(MaxSize), got.Size)
}

func TestID(t *testing.T) {
	assert.Equal(t, ID("a", "b"), ID("a", "b"))
	assert.NotEqual(t, ID("ab", "c"), ID("a", "bc"))
	id := ID("x")
	assert.Equal(t, byte(0x80), id[8]&0xc0)
}

func FuzzFooter(f *testing.F) {
	f.Add(int64(10<<20+1536), byte(3), []byte("seed"))
	f.Add(int64(0), byte(4), []byte{})
	f.Add(int64(MaxSize), byte(3), []byte("x"))
	f.Fuzz(func(t *testing.T, size int64, kind byte, idSeed []byte) {
		if size < 0 || size > MaxSize {
			return
		}
		var v *View
		var err error
		id := ID(string(idSeed))
		if kind%2 == 0 {
			v, err = NewDynamic(&memDisk{}, Dynamic{Size: size, ID: id})
		} else {
			v, err = NewDifferencing(&memDisk{}, Differencing{Size: size, ID: id, ParentName: "p.vhd"})
		}
		require.NoError(t, err)
		b := make([]byte, 512)
		require.NoError(t, v.ReadAt(context.Background(), b, 0))
		got, err := parseFooter(b)
		require.NoError(t, err)
		assert.Equal(t, uint64(roundUp(size, 512)), got.Size)
		assert.Equal(t, id, got.ID)
		b[100] ^= 1
		_, err = parseFooter(b)
		assert.Error(t, err, "corruption must break the checksum")
	})
}

func FuzzLayout(f *testing.F) {
	f.Add(int64(10<<20+1536), []byte{0, 10, 200, 3}, uint64(1), false)
	f.Add(int64(5<<20+7), []byte{255, 255, 1, 1, 9}, uint64(2), true)
	f.Add(int64(0), []byte{}, uint64(3), true)
	f.Fuzz(func(t *testing.T, size int64, ext []byte, seed uint64, diff bool) {
		if size < 0 || size > 12<<20 {
			return
		}
		rng := rand.New(rand.NewPCG(seed, 3))
		var raw []extent.Extent
		for i := 0; i+1 < len(ext) && size > 0; i += 2 {
			off := int64(ext[i]) * size / 256
			raw = append(raw, extent.Extent{Off: off, Len: min(int64(ext[i+1])*4099, size-off)})
		}
		m := mustMap(t, size, raw...)
		disk := &memDisk{data: diskWith(rng, size, extent.Full(size))}
		var v *View
		var err error
		if diff {
			v, err = NewDifferencing(disk, Differencing{Size: size, Changed: m, ParentName: "p.vhd", ParentPath: "p"})
		} else {
			v, err = NewDynamic(disk, Dynamic{Size: size, Data: m})
		}
		require.NoError(t, err)
		entries := (roundUp(size, 512) + blockSize - 1) / blockSize
		loc := int64(0)
		if diff {
			loc = 1024
		}
		assert.Equal(t, 1536+roundUp(4*entries, 512)+loc+int64(v.Blocks())*blockStride+512, v.Size())
		full := make([]byte, v.Size())
		require.NoError(t, v.ReadAt(context.Background(), full, 0))
		_, err = parseImage(full)
		require.NoError(t, err)
		for range 20 {
			off := rng.Int64N(v.Size())
			n := rng.Int64N(v.Size() - off + 1)
			part := make([]byte, n)
			require.NoError(t, v.ReadAt(context.Background(), part, off))
			require.Equal(t, full[off:off+n], part)
		}
	})
}

func BenchmarkDeltaRead(b *testing.B) {
	const size = 32 << 20
	rng := rand.New(rand.NewPCG(1, 1))
	var raw []extent.Extent
	for range 200 {
		raw = append(raw, extent.Extent{Off: rng.Int64N(size - 65536), Len: 1 + rng.Int64N(65536)})
	}
	m := mustMap(b, size, raw...)
	v, err := NewDifferencing(&memDisk{data: make([]byte, size)}, Differencing{Size: size, Changed: m, ParentName: "p.vhd"})
	require.NoError(b, err)
	buf := make([]byte, 1<<20)
	b.SetBytes(v.Size())
	for b.Loop() {
		for off := int64(0); off < v.Size(); off += int64(len(buf)) {
			n := min(int64(len(buf)), v.Size()-off)
			if err := v.ReadAt(context.Background(), buf[:n], off); err != nil {
				b.Fatal(err)
			}
		}
	}
}

func exts(pairs ...[2]int64) []extent.Extent {
	out := make([]extent.Extent, len(pairs))
	for i, p := range pairs {
		out[i] = extent.Extent{Off: p[0], Len: p[1]}
	}
	return out
}
