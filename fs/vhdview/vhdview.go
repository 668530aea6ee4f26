// Package vhdview presents a raw disk as a VHD 1.0 dynamic or differencing
// image computed on the fly: the layout depends only on the size and the
// extent map, so the file size is known without I/O and every read maps to
// raw reads of the data parts it covers.
package vhdview

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"unicode/utf16"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// Reader reads the raw disk the view is built from.
type Reader interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
}

const (
	sectorSize  = 512
	blockSize   = 2 << 20
	bitmapSize  = sectorSize // blockSize/512 bits, already one sector
	blockStride = bitmapSize + blockSize
	footerSize  = 512
	headerOff   = 512
	headerSize  = 1024
	batOff      = headerOff + headerSize
	locatorSize = 512
	// ChangeUnit is the granularity libvhdi applies bitmaps at; marking
	// whole units keeps every reader's view of the delta identical.
	ChangeUnit = 4096
	// MaxSize is the VHD format's limit on the virtual size.
	MaxSize = 2040 << 30
	// timestamp is fixed so the bytes are deterministic and a parent's
	// footer always matches its deltas' parent timestamp field.
	timestamp            = 0
	absent               = 0xFFFFFFFF
	diskTypeDynamic      = 3
	diskTypeDifferencing = 4
)

// ErrInvalid reports parameters no valid VHD can be built from.
var ErrInvalid = errors.New("vhdview: invalid parameters")

// ID derives a deterministic unique id (SHA-256 based, RFC 4122 variant bits) from its parts.
func ID(parts ...string) [16]byte {
	h := sha256.New()
	var n [8]byte
	for _, p := range parts {
		// Length prefixes keep ("ab","c") and ("a","bc") distinct.
		binary.BigEndian.PutUint64(n[:], uint64(len(p)))
		h.Write(n[:])
		h.Write([]byte(p))
	}
	var id [16]byte
	copy(id[:], h.Sum(nil))
	id[6] = id[6]&0x0f | 0x50 // version 5: name-based, SHA
	id[8] = id[8]&0x3f | 0x80 // RFC 4122 variant
	return id
}

// Dynamic describes a full disk exposed as a dynamic VHD.
type Dynamic struct {
	Size int64      // virtual disk size in bytes
	Data extent.Map // allocated extents: blocks overlapping them are present
	ID   [16]byte
}

// Differencing describes the changes since a parent, exposed as a differencing VHD.
type Differencing struct {
	Size       int64
	Changed    extent.Map // changed extents since the parent
	ID         [16]byte
	ParentID   [16]byte // == the parent's Dynamic.ID
	ParentName string   // bare file name the user copies the parent to, e.g. "nightly.vhd"
	ParentPath string   // relative path for the W2ru/W2ku locators; "" = none
}

// View is a read-only VHD image computed from a raw disk.
type View struct {
	raw       Reader
	rawSize   int64      // bytes readable from raw; past it the padded sector is zeros
	vsize     int64      // virtual size, rounded up to a sector
	marked    extent.Map // virtual bytes served from raw (holes are zeros)
	diff      bool
	blocks    []uint32 // present block numbers, ascending
	footer    []byte
	header    []byte
	locators  []byte // differencing with ParentPath only
	batBytes  int64
	dataStart int64
	size      int64
}

// NewDynamic builds a dynamic VHD view of the whole disk.
func NewDynamic(raw Reader, d Dynamic) (*View, error) {
	v, err := newView(raw, d.Size, d.Data, false)
	if err != nil {
		return nil, fmt.Errorf("new dynamic vhd: %w", err)
	}
	v.build(d.ID, diskTypeDynamic, nil)
	return v, nil
}

// NewDifferencing builds a differencing VHD view holding the changed data.
func NewDifferencing(raw Reader, d Differencing) (*View, error) {
	if d.Size < 0 || d.Size > MaxSize {
		return nil, fmt.Errorf("new differencing vhd: %w: size %d", ErrInvalid, d.Size)
	}
	vsize := roundUp(d.Size, sectorSize)
	// Round out to whole 4 KiB units and clip to the (padded) disk.
	var rounded []extent.Extent
	for _, e := range d.Changed.Extents() {
		lo := e.Off / ChangeUnit * ChangeUnit
		hi := min(roundUp(e.End(), ChangeUnit), vsize)
		if hi > lo {
			rounded = append(rounded, extent.Extent{Off: lo, Len: hi - lo})
		}
	}
	marked, err := extent.Normalize(rounded, vsize)
	if err != nil {
		return nil, fmt.Errorf("new differencing vhd: %w", err)
	}
	nameUnits := utf16.Encode([]rune(d.ParentName))
	if d.ParentName == "" || len(nameUnits)*2 > 512 {
		return nil, fmt.Errorf("new differencing vhd: %w: parent name must be 1..256 UTF-16 units", ErrInvalid)
	}
	pathUnits := utf16.Encode([]rune(d.ParentPath))
	if len(pathUnits)*2 > locatorSize {
		return nil, fmt.Errorf("new differencing vhd: %w: parent path longer than %d bytes", ErrInvalid, locatorSize)
	}
	v, err := newView(raw, d.Size, marked, true)
	if err != nil {
		return nil, fmt.Errorf("new differencing vhd: %w", err)
	}
	v.build(d.ID, diskTypeDifferencing, &d)
	return v, nil
}

func roundUp(n, unit int64) int64 { return (n + unit - 1) / unit * unit }

func newView(raw Reader, size int64, marked extent.Map, diff bool) (*View, error) {
	if raw == nil {
		return nil, fmt.Errorf("%w: nil reader", ErrInvalid)
	}
	if size < 0 || size > MaxSize {
		return nil, fmt.Errorf("%w: size %d outside [0, %d]", ErrInvalid, size, int64(MaxSize))
	}
	vsize := roundUp(size, sectorSize)
	if n := marked.Extents(); len(n) > 0 && n[len(n)-1].End() > vsize {
		return nil, fmt.Errorf("%w: extent map runs past disk size %d", ErrInvalid, size)
	}
	v := &View{raw: raw, rawSize: size, vsize: vsize, marked: marked, diff: diff}
	for _, e := range marked.Extents() {
		first, last := uint32(e.Off/blockSize), uint32((e.End()-1)/blockSize)
		if n := len(v.blocks); n > 0 && v.blocks[n-1] >= first {
			first = v.blocks[n-1] + 1
		}
		for b := first; b <= last && b >= first; b++ {
			v.blocks = append(v.blocks, b)
		}
	}
	return v, nil
}

func (v *View) build(id [16]byte, diskType uint32, d *Differencing) {
	entries := (v.vsize + blockSize - 1) / blockSize
	v.batBytes = roundUp(entries*4, sectorSize)
	locStart := int64(batOff) + v.batBytes
	if d != nil && d.ParentPath != "" {
		v.locators = make([]byte, 2*locatorSize)
		putUTF16LE(v.locators[:locatorSize], d.ParentPath)
		putUTF16LE(v.locators[locatorSize:], d.ParentPath)
	}
	v.dataStart = locStart + int64(len(v.locators))
	v.size = v.dataStart + int64(len(v.blocks))*blockStride + footerSize

	f := make([]byte, footerSize)
	copy(f[0:], "conectix")
	binary.BigEndian.PutUint32(f[8:], 2)
	binary.BigEndian.PutUint32(f[12:], 0x00010000)
	binary.BigEndian.PutUint64(f[16:], headerOff)
	binary.BigEndian.PutUint32(f[24:], timestamp)
	copy(f[28:], "tap\x00")
	binary.BigEndian.PutUint32(f[32:], 0x00010003)
	copy(f[36:], "Wi2k")
	binary.BigEndian.PutUint64(f[40:], uint64(v.vsize))
	binary.BigEndian.PutUint64(f[48:], uint64(v.vsize))
	binary.BigEndian.PutUint32(f[56:], chs(v.vsize/sectorSize))
	binary.BigEndian.PutUint32(f[60:], diskType)
	copy(f[68:], id[:])
	binary.BigEndian.PutUint32(f[64:], checksum(f))
	v.footer = f

	h := make([]byte, headerSize)
	copy(h[0:], "cxsparse")
	binary.BigEndian.PutUint64(h[8:], ^uint64(0))
	binary.BigEndian.PutUint64(h[16:], batOff)
	binary.BigEndian.PutUint32(h[24:], 0x00010000)
	binary.BigEndian.PutUint32(h[28:], uint32(entries))
	binary.BigEndian.PutUint32(h[32:], blockSize)
	if d != nil {
		copy(h[40:], d.ParentID[:])
		binary.BigEndian.PutUint32(h[56:], timestamp)
		for i, u := range utf16.Encode([]rune(d.ParentName)) {
			binary.BigEndian.PutUint16(h[64+2*i:], u)
		}
		if v.locators != nil {
			// DiscUtils' slots: W2ru in 6, W2ku in 7; data W2ku first.
			putLocator(h[576+6*24:], "W2ru", d.ParentPath, locStart+locatorSize)
			putLocator(h[576+7*24:], "W2ku", d.ParentPath, locStart)
		}
	}
	binary.BigEndian.PutUint32(h[36:], checksum(h))
	v.header = h
}

func putUTF16LE(dst []byte, s string) int {
	units := utf16.Encode([]rune(s))
	for i, u := range units {
		binary.LittleEndian.PutUint16(dst[2*i:], u)
	}
	return 2 * len(units)
}

func putLocator(dst []byte, code, path string, off int64) {
	copy(dst[0:], code)
	// Data space in bytes as Hyper-V and DiscUtils write it; readers that
	// expect sectors treat values >= 512 as bytes.
	binary.BigEndian.PutUint32(dst[4:], locatorSize)
	binary.BigEndian.PutUint32(dst[8:], uint32(2*len(utf16.Encode([]rune(path)))))
	binary.BigEndian.PutUint64(dst[16:], uint64(off))
}

func checksum(b []byte) uint32 {
	var s uint32
	for _, c := range b {
		s += uint32(c)
	}
	return ^s
}

// chs implements the CHS algorithm of the VHD specification's appendix.
func chs(total int64) uint32 {
	total = min(total, 65535*16*255)
	var spt, heads, cth int64
	if total >= 65535*16*63 {
		spt, heads, cth = 255, 16, total/255
	} else {
		spt = 17
		cth = total / spt
		heads = max(4, (cth+1023)/1024)
		if cth >= heads*1024 || heads > 16 {
			spt, heads, cth = 31, 16, total/31
		}
		if cth >= heads*1024 {
			spt, heads, cth = 63, 16, total/63
		}
	}
	return uint32(cth/heads)<<16 | uint32(heads)<<8 | uint32(spt)
}

// Size is the exact file size of the image.
func (v *View) Size() int64 { return v.size }

// Blocks is the number of blocks present in the image.
func (v *View) Blocks() int { return len(v.blocks) }

// batEntry returns the BAT entry for block b: the sector of its bitmap.
func (v *View) batEntry(b uint32) uint32 {
	i := sort.Search(len(v.blocks), func(i int) bool { return v.blocks[i] >= b })
	if i == len(v.blocks) || v.blocks[i] != b {
		return absent
	}
	return uint32((v.dataStart + int64(i)*blockStride) / sectorSize)
}

// ReadAt fills p with the image bytes at off; off+len(p) must not pass Size.
func (v *View) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off < 0 || off > v.size || int64(len(p)) > v.size-off {
		return fmt.Errorf("vhd read at %d len %d: %w: image size %d", off, len(p), ErrInvalid, v.size)
	}
	for len(p) > 0 {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("vhd read at %d: %w", off, err)
		}
		n, err := v.readPart(ctx, p, off)
		if err != nil {
			return err
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// readPart fills a prefix of p that lies within one region of the layout.
func (v *View) readPart(ctx context.Context, p []byte, off int64) (int, error) {
	locStart := int64(batOff) + v.batBytes
	switch {
	case off < headerOff:
		return copy(p, v.footer[off:]), nil
	case off < batOff:
		return copy(p, v.header[off-headerOff:]), nil
	case off < locStart:
		rel := off - batOff
		n := int(min(int64(len(p)), locStart-off))
		for i := 0; i < n; {
			idx := (rel + int64(i)) / 4
			var e [4]byte
			if idx < (v.vsize+blockSize-1)/blockSize {
				binary.BigEndian.PutUint32(e[:], v.batEntry(uint32(idx)))
			}
			i += copy(p[i:n], e[(rel+int64(i))%4:])
		}
		return n, nil
	case off < v.dataStart:
		return copy(p, v.locators[off-locStart:]), nil
	case off >= v.size-footerSize:
		return copy(p, v.footer[off-(v.size-footerSize):]), nil
	}
	rel := off - v.dataStart
	i, in := rel/blockStride, rel%blockStride
	b := int64(v.blocks[i])
	if in < bitmapSize {
		n := int(min(int64(len(p)), bitmapSize-in))
		v.bitmap(p[:n], b, in)
		return n, nil
	}
	vlo := b*blockSize + in - bitmapSize
	n := int(min(int64(len(p)), blockStride-in))
	if err := v.readData(ctx, p[:n], vlo); err != nil {
		return 0, err
	}
	return n, nil
}

// bitmap fills p with bytes [in, in+len(p)) of block b's sector bitmap.
func (v *View) bitmap(p []byte, b, in int64) {
	if !v.diff {
		for i := range p {
			p[i] = 0xff
		}
		return
	}
	clear(p)
	// One bitmap byte covers 8 sectors = one 4 KiB change unit, and the
	// marked map is already rounded to those units.
	for _, e := range v.marked.Clip(b*blockSize+in*ChangeUnit, int64(len(p))*ChangeUnit) {
		for u := e.Off; u < e.End(); u += ChangeUnit {
			p[(u-b*blockSize)/ChangeUnit-in] = 0xff
		}
	}
}

// readData fills p with the virtual disk bytes at vlo: raw data for marked
// ranges, zeros elsewhere and past the raw end.
//
// Extents closer than readGap are read with one call and the holes between
// zeroed after, so a block of many small extents is a few reads, not one per
// extent (the block cache coalesces its fetches the same way).
func (v *View) readData(ctx context.Context, p []byte, vlo int64) error {
	clear(p)
	for _, e := range v.marked.Runs(vlo, int64(len(p)), readGap) {
		hi := min(e.End(), v.rawSize)
		if hi <= e.Off {
			continue
		}
		if err := v.raw.ReadAt(ctx, p[e.Off-vlo:hi-vlo], e.Off); err != nil {
			return fmt.Errorf("vhd read disk at %d len %d: %w", e.Off, hi-e.Off, err)
		}
	}
	v.marked.ZeroHoles(p, vlo)
	return nil
}

// readGap is the longest hole readData reads through.
const readGap = 64 << 10
