// Package qcow2 reads a QCOW2 image (version 2 or 3) through ranged reads of
// a backend.Blob, such as an object in an S3 bucket, and serves it as a raw
// sparse backend.Disk.
//
// The image comes from a bucket we do not trust to hold what qemu would
// write, so Open checks the header, the L1 table and every L2 table before
// serving a byte: every offset that decides what is read is checked against
// the blob's size, and every count that decides what is allocated is checked
// against a fixed bound and the blob's size first. Where qemu would read
// zeros (an L2 table or data cluster past the end of the file) we refuse:
// an object cut short must not become a disk of zeros.
//
// Memory: the allocation map (extent.Map, 16 bytes per extent, at most
// MaxExtents) and the active L1 table are kept for the Image's life; L2
// tables are kept in an LRU cache bounded by Options.L2CacheBytes and read
// again from the blob (and checked again) when evicted.
package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/vmexportfs/vmexportfs/backend"
)

// Bounds on what an image may declare. They are far above what qemu writes
// for any disk we export and low enough that a hostile header cannot make
// us allocate or iterate without end.
const (
	MaxSize        = 64 << 40 // virtual size
	MinClusterBits = 9        // 512 B, as qemu
	MaxClusterBits = 21       // 2 MiB, as qemu
	// MaxL1Entries is qemu's QCOW_MAX_L1_SIZE (32 MiB of L1 table).
	MaxL1Entries = 32 << 20 / 8
	// MaxExtents bounds the allocation map (16 bytes each: 64 MiB). A real
	// image reaches it only if its data alternates with holes cluster by
	// cluster over millions of clusters; a hostile one could reach far
	// more by pointing many L1 entries at one L2 table.
	MaxExtents = 4 << 20

	headerV2Len = 72
	headerV3Len = 104
	// headerRead is what Open reads first: the fields of every version
	// (112 bytes) with room to spare, in one ranged read.
	headerRead = 512
)

// Incompatible feature bits (v3).
const (
	incDirty      = 1 << 0
	incCorrupt    = 1 << 1
	incDataFile   = 1 << 2
	incCompType   = 1 << 3
	incExtendedL2 = 1 << 4
	incKnown      = incDirty | incCorrupt | incDataFile | incCompType | incExtendedL2
)

// Compression types of the v3 header's compression_type field.
const (
	compZlib = 0
	compZstd = 1
)

var magic = [4]byte{'Q', 'F', 'I', 0xfb}

// ErrMalformed marks an image that is not a QCOW2 image we can trust:
// fields out of bounds, tables pointing past the end of the object or into
// other metadata, clusters that do not decompress. It is always wrapped
// together with backend.ErrUnavailable (EIO): re-reading will not help.
var ErrMalformed = errors.New("malformed QCOW2 image")

// Probe says whether the first bytes of an object are a QCOW2 header (magic
// QFI\xfb).
func Probe(first []byte) bool {
	return len(first) >= 4 && [4]byte(first[:4]) == magic
}

// header is what Open uses of the image header.
type header struct {
	version       uint32
	clusterBits   uint32
	size          int64
	l1Size        uint32
	l1Offset      int64
	refcountOff   int64
	refcountClus  uint32
	snapshotsOff  int64
	nbSnapshots   uint32
	incompatible  uint64
	headerLength  uint32
	compression   uint8
	dirty         bool
	backingOffset uint64
}

// parseHeader checks b, the first bytes of an image of blobSize bytes.
func parseHeader(b []byte, blobSize int64) (*header, error) {
	if len(b) < headerV2Len {
		return nil, malformed("image of %d bytes is shorter than a header", blobSize)
	}
	if !Probe(b) {
		return nil, malformed("bad magic %x", b[:4])
	}
	h := &header{
		version:       be32(b[4:]),
		backingOffset: be64(b[8:]),
		clusterBits:   be32(b[20:]),
		l1Size:        be32(b[36:]),
		refcountClus:  be32(b[56:]),
		nbSnapshots:   be32(b[60:]),
	}
	if h.version != 2 && h.version != 3 {
		return nil, fmt.Errorf("%w: version %d", backend.ErrUnsupported, h.version)
	}
	if h.backingOffset != 0 {
		return nil, fmt.Errorf("%w: image has a backing file", backend.ErrUnsupported)
	}
	if c := be32(b[32:]); c != 0 {
		return nil, fmt.Errorf("%w: encrypted image (crypt_method %d)", backend.ErrUnsupported, c)
	}
	if h.clusterBits < MinClusterBits || h.clusterBits > MaxClusterBits {
		return nil, malformed("cluster_bits %d out of %d..%d", h.clusterBits, MinClusterBits, MaxClusterBits)
	}
	size := be64(b[24:])
	if size > MaxSize {
		return nil, malformed("virtual size %d above %d", size, int64(MaxSize))
	}
	h.size = int64(size)
	var err error
	if h.l1Offset, err = offset(be64(b[40:]), "L1 table"); err != nil {
		return nil, err
	}
	if h.refcountOff, err = offset(be64(b[48:]), "refcount table"); err != nil {
		return nil, err
	}
	if h.snapshotsOff, err = offset(be64(b[64:]), "snapshot table"); err != nil {
		return nil, err
	}
	h.headerLength = headerV2Len
	if h.version == 3 {
		if len(b) < headerV3Len {
			return nil, malformed("v3 image of %d bytes is shorter than a v3 header", blobSize)
		}
		h.incompatible = be64(b[72:])
		h.headerLength = be32(b[100:])
		if h.headerLength < headerV3Len || h.headerLength > 1<<h.clusterBits {
			return nil, malformed("header_length %d", h.headerLength)
		}
		if h.headerLength > headerV3Len {
			if len(b) <= headerV3Len {
				return nil, malformed("image of %d bytes ends in its header", blobSize)
			}
			h.compression = b[104]
		}
	}
	inc := h.incompatible
	switch {
	case inc&^incKnown != 0:
		return nil, fmt.Errorf("%w: unknown incompatible features %#x", backend.ErrUnsupported, inc&^incKnown)
	case inc&incDataFile != 0:
		return nil, fmt.Errorf("%w: image has an external data file", backend.ErrUnsupported)
	case inc&incExtendedL2 != 0:
		return nil, fmt.Errorf("%w: extended L2 entries (subclusters)", backend.ErrUnsupported)
	case inc&incCorrupt != 0:
		// qemu sets this bit when it found its own metadata inconsistent;
		// reading on would serve what it could not trust.
		return nil, malformed("image is marked corrupt")
	}
	// The dirty bit (lazy refcounts) says only the refcounts may be stale:
	// L1 and L2 tables are always written before it is cleared, so a
	// read-only reader that never reads refcounts can ignore it.
	h.dirty = inc&incDirty != 0
	switch {
	case inc&incCompType == 0 && h.compression != compZlib:
		return nil, malformed("compression_type %d without its incompatible bit", h.compression)
	case inc&incCompType != 0 && h.compression == compZlib:
		return nil, malformed("compression type bit set with compression_type zlib")
	case h.compression > compZstd:
		return nil, fmt.Errorf("%w: compression_type %d", backend.ErrUnsupported, h.compression)
	}
	return h, nil
}

// offset converts a header offset, refusing values no blob can reach.
func offset(v uint64, what string) (int64, error) {
	if v > 1<<62 {
		return 0, malformed("%s offset %#x", what, v)
	}
	return int64(v), nil
}

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %w: "+format, append([]any{backend.ErrUnavailable, ErrMalformed}, args...)...)
}

func be32(b []byte) uint32 { return binary.BigEndian.Uint32(b) }
func be64(b []byte) uint64 { return binary.BigEndian.Uint64(b) }
