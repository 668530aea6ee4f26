// Package backendtest is an in-memory backend.Source for filesystem tests:
// disks are byte slices with an allocated-extent map, and every call is
// counted so tests can prove what the filesystem asked for.
package backendtest

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// Disk is one in-memory disk: Data is the content, Allocated the extents
// that may hold data (bytes outside it must be zero in Data for the test to
// be honest).
type Disk struct {
	Info      backend.DiskInfo
	Data      []byte
	Allocated extent.Map
	// Changed maps a base snapshot id to the extents changed since it.
	Changed map[string]extent.Map
}

// Snapshot is a snapshot with its disks.
type Snapshot struct {
	backend.Snapshot
	Disks []*Disk
}

// VM is a VM with its snapshots, oldest first.
type VM struct {
	ID, Name  string
	Snapshots []*Snapshot
}

// Counters are what the filesystem asked for.
type Counters struct {
	VMs, Snapshots, OpenDisk, OpenDelta, CloseDisk, Reads, BytesRead, Creates, Deletes atomic.Int64
}

// Source is an in-memory backend.Source; it also implements the
// SnapshotCreator, SnapshotDeleter and DeltaOpener capabilities (ReadOnly
// hides the first two, NoChangeTracking disables the third).
type Source struct {
	mu  sync.Mutex
	vms []*VM

	Calls Counters
	// readErr, when set, is returned by every disk read (SetReadErr).
	readErr error
	// ListErr, when set, is returned by VMs and Snapshots.
	ListErr error
	// NoChangeTracking makes OpenDelta say it cannot compare snapshots.
	NoChangeTracking bool
	// Closed is set by Close.
	Closed atomic.Bool
	// open counts the disks opened (plain or as a delta) and not closed.
	open atomic.Int64
	// Created is the Created time given to new snapshots.
	Created time.Time
	nextID  int
}

// New returns a Source holding vms.
func New(vms ...*VM) *Source { return &Source{vms: vms, Created: time.Unix(1_700_000_000, 0)} }

// NewDisk builds a disk of size bytes whose data extents hold a
// deterministic pattern seeded by seed; the rest is zeros.
func NewDisk(id, device string, size int64, seed byte, data ...extent.Extent) (*Disk, error) {
	m, err := extent.Normalize(data, size)
	if err != nil {
		return nil, fmt.Errorf("new disk %s: %w", id, err)
	}
	buf := make([]byte, size)
	for _, e := range m.Extents() {
		for i := e.Off; i < e.End(); i++ {
			buf[i] = byte(i/7) ^ seed | 1
		}
	}
	return &Disk{Info: backend.DiskInfo{ID: id, Device: device}, Data: buf, Allocated: m}, nil
}

// AddVM appends a VM.
func (s *Source) AddVM(vm *VM) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.vms = append(s.vms, vm)
}

func (s *Source) findVM(id string) *VM {
	for _, vm := range s.vms {
		if vm.ID == id {
			return vm
		}
	}
	return nil
}

// VMs implements backend.Source.
func (s *Source) VMs(ctx context.Context) ([]backend.VM, error) {
	s.Calls.VMs.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ListErr != nil {
		return nil, s.ListErr
	}
	out := make([]backend.VM, 0, len(s.vms))
	for _, vm := range s.vms {
		out = append(out, backend.VM{ID: vm.ID, Name: vm.Name})
	}
	return out, nil
}

// Snapshots implements backend.Source.
func (s *Source) Snapshots(ctx context.Context, vmID string) ([]backend.Snapshot, error) {
	s.Calls.Snapshots.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ListErr != nil {
		return nil, s.ListErr
	}
	vm := s.findVM(vmID)
	if vm == nil {
		return nil, fmt.Errorf("snapshots of %q: %w", vmID, backend.ErrNotFound)
	}
	out := make([]backend.Snapshot, 0, len(vm.Snapshots))
	for _, sn := range vm.Snapshots {
		b := sn.Snapshot
		b.Disks = nil
		for _, d := range sn.Disks {
			b.Disks = append(b.Disks, d.Info)
		}
		out = append(out, b)
	}
	return out, nil
}

// OpenDisk implements backend.Source.
func (s *Source) OpenDisk(ctx context.Context, ref backend.DiskRef) (backend.Disk, error) {
	s.Calls.OpenDisk.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	d, err := s.findDisk(ref)
	if err != nil {
		return nil, fmt.Errorf("open disk: %w", err)
	}
	s.open.Add(1)
	return &openDisk{src: s, d: d}, nil
}

// OpenNow is how many disks are open: opened, plain or as a delta, and not
// closed yet.
func (s *Source) OpenNow() int64 { return s.open.Load() }

// OpenDelta implements backend.DeltaOpener from the disk's Changed maps.
func (s *Source) OpenDelta(ctx context.Context, ref, base backend.DiskRef) (backend.Disk, extent.Map, error) {
	s.Calls.OpenDelta.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.NoChangeTracking {
		return nil, extent.Map{}, fmt.Errorf("open delta: %w", backend.ErrUnsupported)
	}
	d, err := s.findDisk(ref)
	if err != nil {
		return nil, extent.Map{}, fmt.Errorf("open delta: %w", err)
	}
	m, ok := d.Changed[base.Snapshot]
	if !ok {
		return nil, extent.Map{}, fmt.Errorf("open delta since %q: %w", base.Snapshot, backend.ErrNotFound)
	}
	s.open.Add(1)
	return &openDisk{src: s, d: d}, m, nil
}

func (s *Source) findDisk(ref backend.DiskRef) (*Disk, error) {
	vm := s.findVM(ref.VM)
	if vm == nil {
		return nil, fmt.Errorf("%v: vm: %w", ref, backend.ErrNotFound)
	}
	for _, sn := range vm.Snapshots {
		if sn.ID != ref.Snapshot {
			continue
		}
		for _, d := range sn.Disks {
			if d.Info.ID == ref.Disk {
				return d, nil
			}
		}
	}
	return nil, fmt.Errorf("%v: %w", ref, backend.ErrNotFound)
}

// Close implements backend.Source.
func (s *Source) Close() error {
	s.Closed.Store(true)
	return nil
}

// CreateSnapshot implements backend.SnapshotCreator: the new snapshot shares
// the latest snapshot's disks.
func (s *Source) CreateSnapshot(ctx context.Context, vmID, name string) (backend.Snapshot, error) {
	s.Calls.Creates.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	vm := s.findVM(vmID)
	if vm == nil {
		return backend.Snapshot{}, fmt.Errorf("create snapshot of %q: %w", vmID, backend.ErrNotFound)
	}
	s.nextID++
	sn := &Snapshot{Snapshot: backend.Snapshot{ID: fmt.Sprintf("snap-new-%d", s.nextID), Created: s.Created}}
	if n := len(vm.Snapshots); n > 0 {
		sn.Disks = vm.Snapshots[n-1].Disks
	}
	vm.Snapshots = append(vm.Snapshots, sn)
	out := sn.Snapshot
	for _, d := range sn.Disks {
		out.Disks = append(out.Disks, d.Info)
	}
	return out, nil
}

// DeleteSnapshot implements backend.SnapshotDeleter.
func (s *Source) DeleteSnapshot(ctx context.Context, vmID, snapshotID string) error {
	s.Calls.Deletes.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	vm := s.findVM(vmID)
	if vm == nil {
		return fmt.Errorf("delete snapshot of %q: %w", vmID, backend.ErrNotFound)
	}
	i := slices.IndexFunc(vm.Snapshots, func(sn *Snapshot) bool { return sn.ID == snapshotID })
	if i < 0 {
		return fmt.Errorf("delete snapshot %q: %w", snapshotID, backend.ErrNotFound)
	}
	vm.Snapshots = slices.Delete(vm.Snapshots, i, i+1)
	return nil
}

type openDisk struct {
	src    *Source
	d      *Disk
	closed atomic.Bool
}

func (o *openDisk) Close() error {
	if o.closed.Swap(true) {
		return fmt.Errorf("close disk %s: already closed", o.d.Info.ID)
	}
	o.src.Calls.CloseDisk.Add(1)
	o.src.open.Add(-1)
	return nil
}

func (o *openDisk) Size() int64           { return int64(len(o.d.Data)) }
func (o *openDisk) Allocated() extent.Map { return o.d.Allocated }

func (o *openDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	o.src.Calls.Reads.Add(1)
	o.src.Calls.BytesRead.Add(int64(len(p)))
	o.src.mu.Lock()
	err := o.src.readErr
	o.src.mu.Unlock()
	if err != nil {
		return err
	}
	if o.closed.Load() {
		return fmt.Errorf("read %s: disk closed: %w", o.d.Info.ID, backend.ErrInvalid)
	}
	if off < 0 || off+int64(len(p)) > int64(len(o.d.Data)) {
		return fmt.Errorf("read %d@%d: %w", len(p), off, backend.ErrInvalid)
	}
	copy(p, o.d.Data[off:])
	return nil
}

// SetReadErr sets the error returned by every read (nil clears it).
func (s *Source) SetReadErr(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.readErr = err
}

// ReadOnly wraps a Source hiding the snapshot capabilities.
type ReadOnly struct{ S *Source }

func (r ReadOnly) VMs(ctx context.Context) ([]backend.VM, error) { return r.S.VMs(ctx) }
func (r ReadOnly) Snapshots(ctx context.Context, vm string) ([]backend.Snapshot, error) {
	return r.S.Snapshots(ctx, vm)
}
func (r ReadOnly) OpenDisk(ctx context.Context, ref backend.DiskRef) (backend.Disk, error) {
	return r.S.OpenDisk(ctx, ref)
}
func (r ReadOnly) OpenDelta(ctx context.Context, ref, base backend.DiskRef) (backend.Disk, extent.Map, error) {
	return r.S.OpenDelta(ctx, ref, base)
}
func (r ReadOnly) Close() error { return r.S.Close() }
