// Package vhdstream reads a dynamic VHD as it arrives on a forward-only
// stream: XenServer's GET /export_raw_vdi?format=vhd, which has no
// Content-Length, ignores Range and ends when the connection closes.
// ReadLayout parses the start of such a stream (footer copy, dynamic header,
// BAT); Spill turns one pass over the whole stream into a backend.Disk by
// storing the blocks it passes in a sparse local file.
//
// The stream comes from a server we do not trust to be correct, so every
// field that decides how much is read, allocated or where data lands is
// checked before it is used. This package is independent of fs/vhdview (our
// VHD writer) on purpose: a misreading of the format shared by both would
// make their round-trip tests pass while real images fail.
package vhdstream

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"slices"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// Disk types of the footer.
const (
	DiskTypeFixed        = 2
	DiskTypeDynamic      = 3
	DiskTypeDifferencing = 4
)

// Bounds on what a stream may declare. They are far above anything XenServer
// writes (2 MiB blocks, at most 2040 GiB) and low enough that a hostile
// footer cannot make us allocate or read without end.
const (
	MaxSize      = 64 << 40  // virtual size
	MaxEntries   = 32 << 20  // BAT entries: 128 MiB of BAT, 64 TiB at 2 MiB blocks
	MinBlockSize = 4 << 10   // smaller blocks only make the BAT huge
	MaxBlockSize = 256 << 20 // larger than any writer uses; bounds one block's bitmap to 64 KiB
	// MaxDataOffset bounds where the dynamic header may start: every writer
	// puts it right after the footer copy (512); the slack only tolerates
	// odd writers without letting a stream make us discard gigabytes.
	MaxDataOffset = 1 << 20
	// MaxTableGap bounds the bytes between the end of the dynamic header
	// and the BAT, where some writers put parent locator data.
	MaxTableGap = 16 << 20

	SectorSize = 512
	FooterSize = 512
	HeaderSize = 1024
	// Absent is the BAT entry of a block not present in the file.
	Absent = 0xFFFFFFFF
)

// ErrMalformed marks a stream whose layout is not a VHD we can read: wrong
// cookies or checksums, a fixed disk, fields out of bounds or contradicting
// each other. Retrying such a stream is pointless; a truncated stream is
// not malformed (it wraps io.ErrUnexpectedEOF instead).
var ErrMalformed = errors.New("malformed VHD")

// Layout is what the start of a VHD stream says: footer, dynamic header and
// block allocation table.
type Layout struct {
	Size      int64    // the footer's current size: the virtual disk size
	BlockSize int64    // from the dynamic header (2 MiB on XenServer)
	DiskType  uint32   // 3 dynamic, 4 differencing
	ParentUID [16]byte // differencing only
	BAT       []uint32 // sector offset of each block, 0xFFFFFFFF absent

	UniqueID    [16]byte // the footer's unique id
	Creator     string   // the footer's creator application, 4 bytes ("tap\x00" for XAPI, "caml" for its deltas, "qemu")
	DataOffset  int64    // where the dynamic header starts (512 for every writer seen)
	TableOffset int64    // where the BAT starts
	BitmapSize  int64    // bytes of sector bitmap before each block's data: ceil(BlockSize/512/8) rounded up to 512
	End         int64    // the stream offset right after the BAT: where ReadLayout stopped reading

	footer [FooterSize]byte // the footer copy, to compare with the trailing footer
	order  []uint32         // indices of the present blocks, by increasing file offset
}

// Stride is the bytes a present block occupies in the file: bitmap and data.
func (l *Layout) Stride() int64 { return l.BitmapSize + l.BlockSize }

// BlockOffset is the byte offset in the file of block i's bitmap, or -1
// when the block is absent.
func (l *Layout) BlockOffset(i int) int64 {
	if l.BAT[i] == Absent {
		return -1
	}
	return int64(l.BAT[i]) * SectorSize
}

// Order returns the indices of the present blocks by increasing file
// offset: the order a forward-only reader meets them in. The slice must not
// be modified.
func (l *Layout) Order() []uint32 { return l.order }

// Allocated is the map of the blocks present in the BAT, clipped to Size:
// which blocks may hold data (for a differencing VHD from xapi with base=:
// which blocks changed).
func (l *Layout) Allocated() extent.Map {
	var raw []extent.Extent
	for i, v := range l.BAT {
		off := int64(i) * l.BlockSize
		if off >= l.Size {
			break // entries past the disk (a BAT larger than needed) hold nothing readable
		}
		if v == Absent {
			continue
		}
		n := min(l.BlockSize, l.Size-off)
		// Merge as we go: a fully allocated 64 TiB disk is one extent,
		// not 32 M of them.
		if k := len(raw); k > 0 && raw[k-1].End() == off {
			raw[k-1].Len += n
			continue
		}
		raw = append(raw, extent.Extent{Off: off, Len: n})
	}
	m, _, err := extent.NormalizeShared(raw, l.Size)
	if err != nil {
		// Cannot happen (the extents are built sorted within Size); if it
		// did, claiming everything may hold data is the safe answer.
		return extent.Full(l.Size)
	}
	return m
}

// ReadLayout reads the footer copy (512 bytes), the dynamic header (1024
// bytes at the footer's data offset) and the BAT from r, which is
// positioned at byte 0 of the VHD, reading no further than the end of the
// BAT (Layout.End). Bytes between the structures are discarded.
//
// Errors wrap backend.ErrUnavailable (the disk cannot be read: EIO) and
// either ErrMalformed (the contents are wrong) or io.ErrUnexpectedEOF (the
// stream ended early) or the reader's own error.
func ReadLayout(r io.Reader) (*Layout, error) {
	l, err := readLayout(r)
	if err != nil {
		return nil, fmt.Errorf("vhdstream: read layout: %w: %w", backend.ErrUnavailable, err)
	}
	return l, nil
}

func readLayout(r io.Reader) (*Layout, error) {
	l := &Layout{}
	if err := readFull(r, l.footer[:], "footer"); err != nil {
		return nil, err
	}
	if err := l.parseFooter(l.footer[:]); err != nil {
		return nil, err
	}
	if err := discard(r, l.DataOffset-FooterSize, "bytes before the dynamic header"); err != nil {
		return nil, err
	}
	var hdr [HeaderSize]byte
	if err := readFull(r, hdr[:], "dynamic header"); err != nil {
		return nil, err
	}
	entries, err := l.parseHeader(hdr[:])
	if err != nil {
		return nil, err
	}
	if err := discard(r, l.TableOffset-(l.DataOffset+HeaderSize), "bytes before the BAT"); err != nil {
		return nil, err
	}
	if err := l.readBAT(r, entries); err != nil {
		return nil, err
	}
	if err := l.checkBAT(); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *Layout) parseFooter(f []byte) error {
	if !bytes.Equal(f[0:8], []byte("conectix")) {
		return malformed("footer cookie %q, want \"conectix\"", f[0:8])
	}
	if got, want := be32(f[64:]), checksum(f, 64); got != want {
		return malformed("footer checksum %#08x, computed %#08x", got, want)
	}
	if v := be32(f[12:]); v>>16 != 1 {
		return malformed("footer format version %#08x, want major version 1", v)
	}
	l.DiskType = be32(f[60:])
	switch l.DiskType {
	case DiskTypeDynamic, DiskTypeDifferencing:
	case DiskTypeFixed:
		return malformed("fixed VHD (disk type 2): it has no BAT, only a dynamic or differencing VHD can be streamed")
	default:
		return malformed("disk type %d, want 3 (dynamic) or 4 (differencing)", l.DiskType)
	}
	// Compare as unsigned before converting: a hostile 2^63 must not turn
	// into a negative int64 that passes an upper bound.
	dataOff := be64(f[16:])
	if dataOff < FooterSize || dataOff > MaxDataOffset {
		return malformed("footer data offset %d, want the dynamic header between %d and %d", dataOff, FooterSize, MaxDataOffset)
	}
	l.DataOffset = int64(dataOff)
	size := be64(f[48:])
	if size > MaxSize {
		return malformed("current size %d bytes exceeds %d", size, int64(MaxSize))
	}
	l.Size = int64(size)
	l.Creator = string(f[28:32])
	copy(l.UniqueID[:], f[68:84])
	return nil
}

// parseHeader checks the dynamic header and returns the BAT's entry count.
func (l *Layout) parseHeader(h []byte) (int, error) {
	if !bytes.Equal(h[0:8], []byte("cxsparse")) {
		return 0, malformed("dynamic header cookie %q, want \"cxsparse\"", h[0:8])
	}
	if got, want := be32(h[36:]), checksum(h, 36); got != want {
		return 0, malformed("dynamic header checksum %#08x, computed %#08x", got, want)
	}
	if v := be32(h[24:]); v>>16 != 1 {
		return 0, malformed("dynamic header version %#08x, want major version 1", v)
	}
	// The header's own data offset ("next structure", all ones) is unused
	// by every reader and never decides what we read, so it is not checked.
	hdrEnd := uint64(l.DataOffset) + HeaderSize
	tableOff := be64(h[16:])
	if tableOff < hdrEnd || tableOff > hdrEnd+MaxTableGap {
		return 0, malformed("BAT offset %d, want after the dynamic header (%d) by at most %d bytes", tableOff, hdrEnd, MaxTableGap)
	}
	l.TableOffset = int64(tableOff)
	bs := be32(h[32:])
	if bs < MinBlockSize || bs > MaxBlockSize || bits.OnesCount32(bs) != 1 {
		return 0, malformed("block size %d, want a power of two from %d to %d", bs, MinBlockSize, MaxBlockSize)
	}
	l.BlockSize = int64(bs)
	// One bit per sector, padded to a sector.
	l.BitmapSize = (l.BlockSize/SectorSize/8 + SectorSize - 1) / SectorSize * SectorSize
	entries := be32(h[28:])
	if entries > MaxEntries {
		return 0, malformed("%d BAT entries exceed %d", entries, MaxEntries)
	}
	if int64(entries)*l.BlockSize < l.Size {
		return 0, malformed("%d BAT entries of %d bytes cover %d bytes, less than the disk size %d", entries, l.BlockSize, int64(entries)*l.BlockSize, l.Size)
	}
	if l.DiskType == DiskTypeDifferencing {
		copy(l.ParentUID[:], h[40:56])
	}
	l.End = l.TableOffset + 4*int64(entries)
	return int(entries), nil
}

// readBAT reads the entries in pieces, growing the slice as they arrive, so
// a stream that claims 32 M entries and then ends costs what it sent, not
// 128 MiB up front.
func (l *Layout) readBAT(r io.Reader, entries int) error {
	const piece = 16 << 10 // entries per read: 64 KiB
	l.BAT = make([]uint32, 0, min(entries, piece))
	buf := make([]byte, 4*min(entries, piece))
	for len(l.BAT) < entries {
		n := min(piece, entries-len(l.BAT))
		if err := readFull(r, buf[:4*n], "BAT"); err != nil {
			return err
		}
		for i := range n {
			l.BAT = append(l.BAT, be32(buf[4*i:]))
		}
	}
	return nil
}

// checkBAT makes sure every present block lies after the BAT and that no
// two share bytes: a reader that writes each block where the BAT says can
// then neither be made to read the header as data nor to store one stretch
// of the file as two blocks.
func (l *Layout) checkBAT() error {
	n := 0
	for _, v := range l.BAT {
		if v != Absent {
			n++
		}
	}
	l.order = make([]uint32, 0, n)
	for i, v := range l.BAT {
		if v != Absent {
			l.order = append(l.order, uint32(i))
		}
	}
	slices.SortFunc(l.order, func(a, b uint32) int {
		switch x, y := l.BAT[a], l.BAT[b]; {
		case x < y:
			return -1
		case x > y:
			return 1
		}
		return 0
	})
	prevEnd, prev := l.End, -1
	for _, i := range l.order {
		off := int64(l.BAT[i]) * SectorSize
		if off < prevEnd {
			if prev < 0 {
				return malformed("block %d at byte %d lies before the end of the BAT (%d)", i, off, l.End)
			}
			return malformed("block %d at byte %d overlaps block %d (bytes %d to %d)", i, off, prev, prevEnd-l.Stride(), prevEnd)
		}
		prevEnd, prev = off+l.Stride(), int(i)
	}
	return nil
}

// checksum is the VHD checksum: the one's complement of the byte sum with
// the 4-byte checksum field at skip counted as zero.
func checksum(b []byte, skip int) uint32 {
	var sum uint32
	for i, c := range b {
		if i >= skip && i < skip+4 {
			continue
		}
		sum += uint32(c)
	}
	return ^sum
}

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrMalformed}, args...)...)
}

// readFull is io.ReadFull that calls any early end a truncation: the
// structure was promised, so even zero bytes of it is an unexpected EOF.
func readFull(r io.Reader, p []byte, what string) error {
	if _, err := io.ReadFull(r, p); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// discard skips n bytes of r, reading no further.
func discard(r io.Reader, n int64, what string) error {
	if n <= 0 {
		return nil
	}
	got, err := io.CopyN(io.Discard, r, n)
	if got < n {
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

func be32(b []byte) uint32 { return binary.BigEndian.Uint32(b) }
func be64(b []byte) uint64 { return binary.BigEndian.Uint64(b) }
