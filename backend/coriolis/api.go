package coriolis

import (
	"bytes"
	"encoding/json"
	"fmt"
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
	return decodeSnapshot(json.NewDecoder(bytes.NewReader(b)), s)
}

// UnmarshalJSON decodes a snapshot disk with the streaming decoder, which
// also takes the README's snapshotID spelling.
func (d *apiDiskSnapshot) UnmarshalJSON(b []byte) error {
	return decodeDiskSnapshot(json.NewDecoder(bytes.NewReader(b)), d)
}

// snapshottable reports whether a VM disk is part of snapshots: CD-ROMs and
// read-only images are not.
func (d apiDisk) snapshottable() bool {
	return !strings.HasSuffix(d.DeviceName, ":cdrom") && d.Mode != "r"
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
	out := backend.Snapshot{ID: s.ID}
	for _, d := range s.Disks {
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
	if chunks.bad != nil {
		return extent.Map{}, extent.Repairs{}, chunks.bad
	}
	m, rep, err := extent.NormalizeShared(chunks.extents(), size)
	if err != nil {
		return extent.Map{}, rep, fmt.Errorf("%w: %w", errHostile, err)
	}
	return m, rep, nil
}

type loginRequest struct {
	Username string `json:"username"`
	Password string `json:"password"`
}

type loginAnswer struct {
	Token string `json:"token"`
}
