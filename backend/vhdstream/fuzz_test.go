package vhdstream

import (
	"bytes"
	"encoding/binary"
	"math/bits"
	"testing"
)

// The fields of footer and header that mean anything: the rest is zero
// (or, in a header, parent names and locators ReadLayout never reads).
const (
	footerFields = 85
	headerFields = 64
)

// compact is the fuzz input of a VHD: footer fields, header fields, then
// what follows the header (the BAT). Fuzzing raw files would hand the
// fuzzer 1.5 KiB of mostly zeros per input, and Go's minimizer is
// quadratic in the input's length: a single minimization would use up the
// fuzzing time.
func compact(img []byte) []byte {
	out := append([]byte(nil), img[:footerFields]...)
	out = append(out, img[512:512+headerFields]...)
	return append(out, img[1536:]...)
}

// expand undoes compact, zero-filling what a short input lacks.
func expand(data []byte) []byte {
	out := make([]byte, 1536, 1536+len(data))
	n := copy(out[:footerFields], data)
	data = data[n:]
	n = copy(out[512:512+headerFields], data)
	return append(out, data[n:]...)
}

// FuzzReadLayout: no input panics, and any layout accepted satisfies what
// Spill and the XenServer backend rely on. Each input is read three ways:
// as raw bytes (short garbage, truncations), and expanded with the
// checksums as given and fixed (which lets the fuzzer past the checksums to
// the fields behind them).
func FuzzReadLayout(f *testing.F) {
	for _, c := range []struct {
		size string
		cmds []string
	}{
		{"37M", []string{"write -P 0xab 1M 64k", "write -P 0xcd 9M 4k"}},
		{"20M", []string{"write -P 1 16M 3M", "write -P 2 0 4k"}},
		{"6M", nil},
	} {
		img := readFile(f, qemuImage(f, c.size, "", c.cmds...))
		l, err := ReadLayout(bytes.NewReader(img))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(compact(img[:l.End]))
	}
	f.Add(compact(layoutBytes(4*mib, 2*mib, []uint32{Absent, 4})))
	f.Add(compact(layoutBytes(3*mib, 4096, []uint32{4, 13, Absent, 30})))
	diff := layoutBytes(2*mib, 2*mib, []uint32{4})
	binary.BigEndian.PutUint32(diff[60:], DiskTypeDifferencing)
	fixChecksums(diff)
	f.Add(compact(diff))

	f.Fuzz(func(t *testing.T, data []byte) {
		for variant := range 3 {
			in := bytes.Clone(data)
			if variant > 0 {
				in = expand(data)
			}
			if variant == 2 {
				fixChecksums(in)
			}
			cr := &countingReader{r: bytes.NewReader(in)}
			l, err := ReadLayout(cr)
			if err != nil {
				continue
			}
			checkInvariants(t, l, cr.n)
		}
	})
}

func checkInvariants(t *testing.T, l *Layout, consumed int64) {
	t.Helper()
	if l.DiskType != DiskTypeDynamic && l.DiskType != DiskTypeDifferencing {
		t.Fatalf("disk type %d", l.DiskType)
	}
	if l.Size < 0 || l.Size > MaxSize {
		t.Fatalf("size %d", l.Size)
	}
	if l.BlockSize < MinBlockSize || l.BlockSize > MaxBlockSize || bits.OnesCount64(uint64(l.BlockSize)) != 1 {
		t.Fatalf("block size %d", l.BlockSize)
	}
	if l.BitmapSize%SectorSize != 0 || l.BitmapSize*8*SectorSize < l.BlockSize {
		t.Fatalf("bitmap size %d for block size %d", l.BitmapSize, l.BlockSize)
	}
	if len(l.BAT) > MaxEntries || int64(len(l.BAT))*l.BlockSize < l.Size {
		t.Fatalf("%d entries of %d for size %d", len(l.BAT), l.BlockSize, l.Size)
	}
	if l.DataOffset < FooterSize || l.TableOffset < l.DataOffset+HeaderSize || l.End != l.TableOffset+4*int64(len(l.BAT)) {
		t.Fatalf("offsets %d %d %d", l.DataOffset, l.TableOffset, l.End)
	}
	if consumed != l.End {
		t.Fatalf("read %d bytes, layout ends at %d", consumed, l.End)
	}
	present := 0
	for _, v := range l.BAT {
		if v != Absent {
			present++
		}
	}
	if len(l.Order()) != present {
		t.Fatalf("order lists %d blocks, %d present", len(l.Order()), present)
	}
	prevEnd := l.End
	for _, b := range l.Order() {
		off := l.BlockOffset(int(b))
		if off < prevEnd {
			t.Fatalf("block %d at %d before %d", b, off, prevEnd)
		}
		prevEnd = off + l.Stride()
	}
	m := l.Allocated()
	var prev int64 = -1
	for _, e := range m.Extents() {
		if e.Off <= prev || e.Len <= 0 || e.End() > l.Size || e.Off%l.BlockSize != 0 {
			t.Fatalf("extent %+v of size %d", e, l.Size)
		}
		for b := e.Off / l.BlockSize; b*l.BlockSize < e.End(); b++ {
			if l.BAT[b] == Absent {
				t.Fatalf("extent %+v covers absent block %d", e, b)
			}
		}
		prev = e.End()
	}
}
