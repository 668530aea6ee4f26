// Package backend is the contract between the filesystem and a virtualization
// platform. A platform package (coriolis, kubevirt, ...) implements Source; the
// filesystem uses nothing else. Platforms differ in what they can do, and that
// is expressed by optional interfaces (SnapshotCreator, SnapshotDeleter,
// ChangeTracker), never by platform names in the filesystem.
package backend

import (
	"context"
	"errors"
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
}

// Snapshot is an immutable point-in-time view of a VM's disks.
type Snapshot struct {
	ID      string
	Name    string    // the platform's own name, "" when it only has ids
	Created time.Time // zero when the platform does not say
	Disks   []DiskInfo
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
}

// Disk is one snapshot disk, opened. Snapshot data is immutable, so Size and
// Allocated never change for the life of a Disk.
type Disk interface {
	Size() int64
	// Allocated is the map of extents that may hold data; everything else
	// reads as zeros. A platform that cannot tell returns extent.Full(Size()).
	Allocated() extent.Map
	// ReadAt fills p entirely from offset off, or returns an error; it never
	// returns partial data. off+len(p) <= Size().
	ReadAt(ctx context.Context, p []byte, off int64) error
}

// ChangeTracker is implemented by a Disk whose platform reports the extents
// changed since an older snapshot of the same VM.
type ChangeTracker interface {
	ChangedSince(ctx context.Context, baseSnapshotID string) (extent.Map, error)
}

// SnapshotCreator is implemented by a Source that can take snapshots. name is
// the user's name for it; a platform that has only generated ids ignores it.
type SnapshotCreator interface {
	CreateSnapshot(ctx context.Context, vmID, name string) (Snapshot, error)
}

// SnapshotDeleter is implemented by a Source that can delete snapshots.
type SnapshotDeleter interface {
	DeleteSnapshot(ctx context.Context, vmID, snapshotID string) error
}
