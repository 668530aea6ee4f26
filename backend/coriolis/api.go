package coriolis

import (
	"fmt"
	"math"
	"slices"
	"strings"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// apiVM is VirtualMachine as the server encodes it.
type apiVM struct {
	FriendlyName string    `json:"friendly_name"`
	Name         string    `json:"name"`
	UUID         string    `json:"uuid"`
	Disks        []apiDisk `json:"disks"`
	Snapshots    []string  `json:"snapshots"`
}

type apiDisk struct {
	Name       string `json:"name"`
	Path       string `json:"path"`
	DeviceName string `json:"device_name"`
	Mode       string `json:"mode"`
}

// apiSnapshot is VMSnapshot; the README's camelCase spellings are accepted
// too (see UnmarshalJSON).
type apiSnapshot struct {
	ID    string            `json:"id"`
	VMID  string            `json:"vm_id"`
	Disks []apiDiskSnapshot `json:"disks"`
}

type apiDiskSnapshot struct {
	Name       string    `json:"name"`
	Path       string    `json:"path"`
	SnapshotID string    `json:"snapshot_id"`
	Chunks     chunkList `json:"chunks"`
}

// UnmarshalJSON decodes a snapshot with the streaming decoder (decode.go),
// which also takes the README's vmID spelling.
func (s *apiSnapshot) UnmarshalJSON(b []byte) error {
	return decodeSnapshot(b, s)
}

// UnmarshalJSON decodes a snapshot disk with the streaming decoder, which
// also takes the README's snapshotID spelling.
func (d *apiDiskSnapshot) UnmarshalJSON(b []byte) error {
	return decodeDiskSnapshot(b, d)
}

// snapshottable reports whether a VM disk is part of snapshots: CD-ROMs and
// read-only images are not.
func (d apiDisk) snapshottable() bool {
	return !strings.HasSuffix(d.DeviceName, ":cdrom") && d.Mode != "r"
}

// ordering is v with only what a snapshot listing takes from it (the
// snapshot order, the disks' names, devices and modes): the VM listing is
// kept for that, and 100,000 VMs' paths and uuids need not stay with it.
func (v apiVM) ordering() apiVM {
	disks := make([]apiDisk, len(v.Disks))
	for i, d := range v.Disks {
		disks[i] = apiDisk{Name: d.Name, DeviceName: d.DeviceName, Mode: d.Mode}
	}
	return apiVM{Name: v.Name, Disks: disks, Snapshots: v.Snapshots}
}

func (v apiVM) toBackend() backend.VM {
	out := backend.VM{ID: v.Name, Name: v.FriendlyName}
	for _, d := range v.Disks {
		if d.snapshottable() {
			out.Disks = append(out.Disks, backend.DiskInfo{ID: d.Name, Device: d.DeviceName})
		}
	}
	return out
}

func (s apiSnapshot) toBackend(v apiVM) backend.Snapshot {
	devices := make(map[string]string, len(v.Disks))
	for _, d := range v.Disks {
		if _, dup := devices[d.Name]; !dup && d.DeviceName != "" {
			devices[d.Name] = d.DeviceName
		}
	}
	skip := make(map[string]bool, len(v.Disks))
	for _, d := range v.Disks {
		if !d.snapshottable() {
			skip[d.Name] = true
		}
	}
	out := backend.Snapshot{ID: s.ID}
	for _, d := range s.Disks {
		// The exporter reflinks an untyped ISO into the snapshot and lists
		// it as a snapshot disk: filter snapshot disks as VM disks are.
		if skip[d.Name] {
			continue
		}
		dev, ok := devices[d.Name]
		if !ok {
			dev = d.Name
		}
		out.Disks = append(out.Disks, backend.DiskInfo{ID: d.Name, Device: dev})
	}
	return out
}

func (s apiSnapshot) disk(name string) (apiDiskSnapshot, bool) {
	for _, d := range s.Disks {
		if d.Name == name {
			return d, true
		}
	}
	return apiDiskSnapshot{}, false
}

// chunkMap turns chunks into a normalized map, or says why it cannot.
func chunkMap(chunks chunkList, size int64) (extent.Map, error) {
	m, _, err := chunkMapReport(chunks, size)
	return m, err
}

// chunkMapReport is chunkMap that also says what normalizing repaired.
func chunkMapReport(chunks chunkList, size int64) (extent.Map, extent.Repairs, error) {
	m, rep, _, err := chunkMapClipped(chunks, size)
	return m, rep, err
}

// chunkMapClipped is chunkMapReport that also counts the extents clipped to
// the disk's size. The exporter's chunks come from FIEMAP in whole
// filesystem blocks, so the last chunk of a disk whose size is not a block
// multiple ends past the end of the file: that is routine, not a reason to
// distrust the map (reading the whole disk instead). Only an incoherent map
// (negative, overflowing, not numbers) is refused.
func chunkMapClipped(chunks chunkList, size int64) (extent.Map, extent.Repairs, int, error) {
	if chunks.bad != nil {
		return extent.Map{}, extent.Repairs{}, 0, chunks.bad
	}
	exts, clipped := clipExtents(chunks.extents(), size)
	m, rep, err := extent.NormalizeShared(exts, size)
	if err != nil {
		return extent.Map{}, rep, clipped, fmt.Errorf("%w: %w", errHostile, err)
	}
	return m, rep, clipped, nil
}

// clipExtents cuts extents to [0, size), dropping those wholly past it; raw
// is shared, not copied, when nothing needs cutting. Extents that are no
// byte range at all are left for Normalize to refuse.
func clipExtents(raw []extent.Extent, size int64) ([]extent.Extent, int) {
	past := func(e extent.Extent) bool {
		return e.Off >= 0 && e.Len > 0 && e.Off <= math.MaxInt64-e.Len && e.End() > size
	}
	if size < 0 || !slices.ContainsFunc(raw, past) {
		return raw, 0
	}
	out := make([]extent.Extent, 0, len(raw))
	n := 0
	for _, e := range raw {
		if past(e) {
			n++
			if e.Off >= size {
				continue
			}
			e.Len = size - e.Off
		}
		out = append(out, e)
	}
	return out, n
}

type loginRequest struct {
	Username string `json:"username"`
	Password string `json:"password"`
}

type loginAnswer struct {
	Token string `json:"token"`
}
