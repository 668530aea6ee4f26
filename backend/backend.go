// Package backend is the contract between the filesystem and a virtualization
// platform. A platform package (coriolis, kubevirt, ...) implements Source; the
// filesystem uses nothing else. Platforms differ in what they can do, and that
// is expressed by optional interfaces (SnapshotCreator, SnapshotDeleter,
// DeltaOpener), never by platform names in the filesystem.
//
// Lifetimes: a Source lives as long as its mount and is closed once. A Disk
// may hold server resources (an image transfer, an NBD connection, a backup
// export), so the filesystem opens disks when it needs them, closes them when
// idle and keeps their number bounded; a platform may not assume a disk stays
// open, nor that it is opened only once.
package backend

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// Errors a backend wraps (with %w) so the filesystem can map them to errnos.
var (
	ErrNotFound    = errors.New("not found")           // ENOENT
	ErrPermission  = errors.New("permission denied")   // EACCES: bad credentials or token
	ErrInvalid     = errors.New("invalid argument")    // EINVAL
	ErrExists      = errors.New("already exists")      // EEXIST
	ErrUnsupported = errors.New("not supported")       // ENOTSUP
	ErrUnavailable = errors.New("backend unavailable") // EIO, after retries
)

// VM is a virtual machine as listed by a platform.
type VM struct {
	ID    string // stable id, used in paths: /vms/<ID>
	Name  string // friendly name, "" when the platform has none
	Disks []DiskInfo
}

// DiskInfo names one disk of a VM or snapshot.
type DiskInfo struct {
	ID     string // the platform's id for reads (DiskRef.Disk)
	Device string // short device name such as "xvda"; directory name when a VM has several disks
	// Key is the disk's identity across the snapshots of its VM: two
	// snapshots' disks with the same Key are the same virtual disk at two
	// times, so one is the other's delta base. Platforms that keep a disk's
	// id across snapshots leave it empty (the ID is the identity); those
	// that give each snapshot's copy a new id (XenServer VDIs) set it, from
	// something that stays (the VBD's device position).
	Key string
}

// Identity is Key, or ID when the platform keeps ids across snapshots.
func (d DiskInfo) Identity() string {
	if d.Key != "" {
		return d.Key
	}
	return d.ID
}

// Snapshot is an immutable point-in-time view of a VM's disks.
type Snapshot struct {
	ID      string
	Name    string    // the platform's own name, "" when it only has ids
	Created time.Time // zero when the platform does not say
	Disks   []DiskInfo
	// Pending, when set, says the snapshot is still being made and what the
	// platform is doing ("exporting 43%"): it is shown, with no disk and
	// with that state, and is no delta base, until a listing has it ready.
	// A platform whose snapshots take minutes returns such a snapshot from
	// CreateSnapshot rather than keep mkdir waiting.
	Pending string
}

// DiskRef addresses one disk of one snapshot.
type DiskRef struct {
	VM, Snapshot, Disk string
}

// Source is a platform's read side. Snapshots returns a VM's snapshots oldest
// first: the filesystem derives "older than" (delta bases) from that order.
type Source interface {
	VMs(ctx context.Context) ([]VM, error)
	Snapshots(ctx context.Context, vmID string) ([]Snapshot, error)
	OpenDisk(ctx context.Context, ref DiskRef) (Disk, error)
	// Close ends the source's sessions and connections. Disks still open
	// are not closed by it; the filesystem closes them first.
	Close() error
}

// Blob is an immutable run of bytes that can be read anywhere: a platform's
// disk, or an object (a QCOW2 image in a bucket) that a format decoder turns
// into a Disk.
type Blob interface {
	Size() int64
	// ReadAt fills p entirely from offset off, or returns an error; it never
	// returns partial data. off+len(p) <= Size().
	ReadAt(ctx context.Context, p []byte, off int64) error
}

// Disk is one snapshot disk, opened. Snapshot data is immutable, so Size and
// Allocated never change for the life of a Disk, nor between two openings.
type Disk interface {
	Blob
	// Allocated is the map of extents that may hold data; everything else
	// reads as zeros. A platform that cannot tell returns extent.Full(Size()).
	Allocated() extent.Map
	// Close releases what the disk holds on the platform (connections,
	// transfers, attachments); reads after Close fail.
	Close() error
}

// VecReader is implemented by a Disk that can fill several buffers, laid
// end to end from off, with one request to its platform: where a request
// costs far more than the bytes it carries, the cache reads many blocks at
// once. Its contract is ReadAt's.
type VecReader interface {
	ReadVecAt(ctx context.Context, bufs [][]byte, off int64) error
}

// ReadVec fills bufs, laid end to end from off, from d: in one request when
// d is a VecReader, else one ReadAt per buffer.
func ReadVec(ctx context.Context, d Blob, bufs [][]byte, off int64) error {
	if v, ok := d.(VecReader); ok {
		return v.ReadVecAt(ctx, bufs, off)
	}
	return ReadEach(ctx, d.ReadAt, bufs, off)
}

// Piece is a buffer to fill with a disk's bytes from Off.
type Piece struct {
	Off int64
	Buf []byte
}

// RangesReader is implemented by a Disk that can fill pieces at several
// places with one request to its platform (HTTP multipart/byteranges):
// where a request costs far more than the bytes it carries and the written
// extents are small and far apart, a fetch then carries only the extents,
// not the holes between them nor a request each. Pieces are in increasing
// order of Off, do not overlap and are not empty; touching pieces are one
// range. Its contract is ReadAt's.
type RangesReader interface {
	// MultipleRanges reports whether ReadRanges fills pieces apart with
	// one request. It may turn false once the platform has refused a
	// request of several ranges; ReadRanges then still works, with a
	// request per run of touching pieces.
	MultipleRanges() bool
	ReadRanges(ctx context.Context, pieces []Piece) error
}

// MultipleRanges reports whether d fills pieces apart with one request.
func MultipleRanges(d Blob) bool {
	v, ok := d.(RangesReader)
	return ok && v.MultipleRanges()
}

// ReadRanges fills pieces from d: with as few requests as d can when it is
// a RangesReader, else with ReadVec of each run of touching pieces.
func ReadRanges(ctx context.Context, d Blob, pieces []Piece) error {
	if v, ok := d.(RangesReader); ok {
		return v.ReadRanges(ctx, pieces)
	}
	return ReadRuns(ctx, func(ctx context.Context, bufs [][]byte, off int64) error {
		return ReadVec(ctx, d, bufs, off)
	}, pieces)
}

// ReadRuns fills pieces with one vectored read per run of touching pieces:
// what a read of several ranges comes to where one request cannot carry
// them all. Pieces out of order or overlapping are refused before anything
// is read.
func ReadRuns(ctx context.Context, readVec func(ctx context.Context, bufs [][]byte, off int64) error, pieces []Piece) error {
	if err := CheckPieces(pieces); err != nil {
		return fmt.Errorf("read ranges: %w", err)
	}
	for _, r := range PieceRuns(pieces) {
		bufs := make([][]byte, len(r.Pieces))
		for i, p := range r.Pieces {
			bufs[i] = p.Buf
		}
		if err := readVec(ctx, bufs, r.Off); err != nil {
			return err
		}
	}
	return nil
}

// CheckPieces refuses pieces out of order or overlapping (ErrInvalid).
func CheckPieces(pieces []Piece) error {
	end := int64(0)
	for i, p := range pieces {
		if p.Off < end {
			return fmt.Errorf("%w: piece %d at %d overlaps or precedes the one before it", ErrInvalid, i, p.Off)
		}
		end = p.Off + int64(len(p.Buf))
	}
	return nil
}

// PieceRun is a range of a disk and the touching pieces that fill it.
type PieceRun struct {
	extent.Extent
	Pieces []Piece
}

// PieceRuns groups pieces that passed CheckPieces into runs of touching
// pieces; empty pieces need no bytes and are left out.
func PieceRuns(pieces []Piece) []PieceRun {
	var runs []PieceRun
	for i := 0; i < len(pieces); {
		if len(pieces[i].Buf) == 0 {
			i++
			continue
		}
		r := PieceRun{Extent: extent.Extent{Off: pieces[i].Off}}
		j := i
		for ; j < len(pieces) && pieces[j].Off == r.End(); j++ {
			r.Len += int64(len(pieces[j].Buf))
		}
		r.Pieces = pieces[i:j]
		runs = append(runs, r)
		i = j
	}
	return runs
}

// VecLen is the bytes of bufs together.
func VecLen(bufs [][]byte) int64 {
	var n int64
	for _, p := range bufs {
		n += int64(len(p))
	}
	return n
}

// ReadEach fills bufs, laid end to end from off, with one read per buffer:
// what a vectored read comes to where one request cannot carry them all.
func ReadEach(ctx context.Context, read func(ctx context.Context, p []byte, off int64) error, bufs [][]byte, off int64) error {
	for _, p := range bufs {
		if err := read(ctx, p, off); err != nil {
			return err
		}
		off += int64(len(p))
	}
	return nil
}

// DeltaOpener is implemented by a Source whose platform can say which extents
// of a disk changed between two snapshots. Platforms fix that set when the
// pair is opened, not later: a backup from a checkpoint, a changed-block
// list that must be read before the target is attached, a compare query.
type DeltaOpener interface {
	// OpenDelta opens the disk ref together with the extents changed since
	// base, the same disk (same DiskInfo.Identity) in an older snapshot of
	// the VM; rewritten and discarded ranges both count. It wraps
	// ErrUnsupported when this pair cannot be compared (the filesystem then
	// makes a larger, still exact, delta) and ErrNotFound when base is gone.
	OpenDelta(ctx context.Context, ref, base DiskRef) (Disk, extent.Map, error)
}

// SnapshotCreator is implemented by a Source that can take snapshots. name is
// the user's name for it; a platform that has only generated ids ignores it.
type SnapshotCreator interface {
	CreateSnapshot(ctx context.Context, vmID, name string) (Snapshot, error)
}

// CheapOpener is implemented by a Source that can say whether OpenDisk
// costs the platform next to nothing (a HEAD for the size, no transfer,
// attachment or connection held). The filesystem then opens disks ahead of
// a walk of the tree, as it lists their snapshots ahead.
type CheapOpener interface {
	CheapOpen() bool
}

// SnapshotDeleter is implemented by a Source that can delete snapshots.
type SnapshotDeleter interface {
	DeleteSnapshot(ctx context.Context, vmID, snapshotID string) error
}
