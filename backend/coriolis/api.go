package coriolis

import (
	"encoding/json"
	"fmt"
	"strconv"
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
	Name       string     `json:"name"`
	Path       string     `json:"path"`
	SnapshotID string     `json:"snapshot_id"`
	Chunks     []apiChunk `json:"chunks"`
}

// apiChunk keeps numbers as text: the server's uint64 may not fit an int64,
// and a bad number must degrade the map, not fail the whole answer.
type apiChunk struct {
	Start  json.Number `json:"start"`
	Length json.Number `json:"length"`
}

func (s *apiSnapshot) UnmarshalJSON(b []byte) error {
	var raw struct {
		ID      string            `json:"id"`
		VMID    string            `json:"vm_id"`
		VMIDAlt string            `json:"vmID"`
		Disks   []apiDiskSnapshot `json:"disks"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return err
	}
	*s = apiSnapshot{ID: raw.ID, VMID: raw.VMID, Disks: raw.Disks}
	if s.VMID == "" {
		s.VMID = raw.VMIDAlt
	}
	return nil
}

func (d *apiDiskSnapshot) UnmarshalJSON(b []byte) error {
	var raw struct {
		Name          string     `json:"name"`
		Path          string     `json:"path"`
		SnapshotID    string     `json:"snapshot_id"`
		SnapshotIDAlt string     `json:"snapshotID"`
		Chunks        []apiChunk `json:"chunks"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return err
	}
	*d = apiDiskSnapshot{Name: raw.Name, Path: raw.Path, SnapshotID: raw.SnapshotID, Chunks: raw.Chunks}
	if d.SnapshotID == "" {
		d.SnapshotID = raw.SnapshotIDAlt
	}
	return nil
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
func chunkMap(chunks []apiChunk, size int64) (extent.Map, error) {
	raw := make([]extent.Extent, 0, len(chunks))
	for i, c := range chunks {
		start, err := chunkNumber(c.Start)
		if err != nil {
			return extent.Map{}, fmt.Errorf("%w %d: start: %w", errHostile, i, err)
		}
		length, err := chunkNumber(c.Length)
		if err != nil {
			return extent.Map{}, fmt.Errorf("%w %d: length: %w", errHostile, i, err)
		}
		raw = append(raw, extent.Extent{Off: start, Len: length})
	}
	m, err := extent.Normalize(raw, size)
	if err != nil {
		return extent.Map{}, fmt.Errorf("%w: %w", errHostile, err)
	}
	return m, nil
}

func chunkNumber(n json.Number) (int64, error) {
	if n == "" {
		return 0, fmt.Errorf("missing")
	}
	v, err := strconv.ParseInt(string(n), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("not an offset: %.40q", string(n))
	}
	if v < 0 {
		return 0, fmt.Errorf("negative: %d", v)
	}
	return v, nil
}

type loginRequest struct {
	Username string `json:"username"`
	Password string `json:"password"`
}

type loginAnswer struct {
	Token string `json:"token"`
}
