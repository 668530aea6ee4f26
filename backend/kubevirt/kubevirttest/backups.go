package kubevirttest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

const backupGroup = "backup.kubevirt.io"

// VirtualMachineBackup is the part of a backup.kubevirt.io object the
// backend reads.
type VirtualMachineBackup struct {
	APIVersion string     `json:"apiVersion"`
	Kind       string     `json:"kind"`
	Metadata   ObjectMeta `json:"metadata"`
	Spec       struct {
		Source TypedRef `json:"source"`
	} `json:"spec"`
	Status *struct {
		Type           string `json:"type,omitempty"` // Full or Incremental
		CheckpointName string `json:"checkpointName,omitempty"`
		Phase          string `json:"phase,omitempty"`
	} `json:"status,omitempty"`
}

// backupState is one backup: an immutable copy of the VM's volumes and, for
// an incremental one, which chunks changed since the previous backup's
// checkpoint.
type backupState struct {
	obj       VirtualMachineBackup
	vm        string
	dir       string
	previous  string            // the previous backup (incremental only)
	dirty     map[string][]bool // volume -> per-chunk changed (incremental only)
	ttl       time.Duration     // its export is deleted this long after creation; 0 = never
	createdAt time.Time
}

// CreateBackupExport takes a VirtualMachineBackup of vm, full or incremental
// from the VM's last backup (its checkpoint), and a VirtualMachineExport of
// it named export. Like the real controller, the export's links hold only
// backups[{name: volume, endpoints: map, data}], never volumes.
func (s *Server) CreateBackupExport(backup, export, vm string, incremental bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.createBackup(backup, export, vm, incremental, "")
}

// createBackup is CreateBackupExport with the export's token secret ("" =
// a generated one). Caller holds mu.
func (s *Server) createBackup(backup, export, vm string, incremental bool, tokenSecret string) error {
	v, ok := s.vms[vm]
	if !ok {
		return fmt.Errorf("backup: vm %q: %w", vm, errNotFound)
	}
	if _, dup := s.backups[backup]; dup {
		return fmt.Errorf("backup %q: %w", backup, errExists)
	}
	prev := s.lastBackup[vm]
	if incremental && prev == "" {
		return fmt.Errorf("backup %q: incremental without a checkpoint: %w", backup, errInvalid)
	}
	dir := filepath.Join(s.opts.Dir, "backups", backup)
	if err := s.takeSnapshot(v, dir); err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	st := &backupState{vm: vm, dir: dir, createdAt: time.Now()}
	st.obj.APIVersion, st.obj.Kind = backupGroup+"/v1alpha1", "VirtualMachineBackup"
	st.obj.Metadata = ObjectMeta{Name: backup, Namespace: s.opts.Namespace, UID: s.nextUID(), CreationTimestamp: s.now()}
	st.obj.Spec.Source = TypedRef{APIGroup: vmGroup, Kind: "VirtualMachine", Name: vm}
	st.obj.Status = &struct {
		Type           string `json:"type,omitempty"`
		CheckpointName string `json:"checkpointName,omitempty"`
		Phase          string `json:"phase,omitempty"`
	}{Type: "Full", CheckpointName: backup + "-checkpoint", Phase: "Done"}
	if incremental {
		st.obj.Status.Type = "Incremental"
		st.previous = prev
		st.dirty = map[string][]bool{}
		for _, vol := range v.volumes {
			d, err := changedChunks(filepath.Join(s.checkpoints[prev].dir, vol.Name+".img"), filepath.Join(dir, vol.Name+".img"), vol.Size)
			if err != nil {
				return fmt.Errorf("backup: %w", err)
			}
			st.dirty[vol.Name] = d
		}
	}
	s.backups[backup] = st
	s.checkpoints[backup] = st
	s.lastBackup[vm] = backup
	return s.exportSource(export, TypedRef{APIGroup: backupGroup, Kind: "VirtualMachineBackup", Name: backup}, tokenSecret)
}

// BackupPrevious is the backup an incremental backup's checkpoint came from.
func (s *Server) BackupPrevious(backup string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b, ok := s.checkpoints[backup]; ok {
		return b.previous
	}
	return ""
}

// BackupFile is the immutable copy of one volume in a backup (the reference
// a test compares a mount with).
func (s *Server) BackupFile(backup, vol string) string {
	return filepath.Join(s.opts.Dir, "backups", backup, vol+".img")
}

// changedChunks compares two copies chunk by chunk.
func changedChunks(a, b string, size int64) ([]bool, error) {
	fa, err := os.Open(a)
	if err != nil {
		return nil, err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return nil, err
	}
	defer fb.Close()
	out := make([]bool, (size+chunk-1)/chunk)
	ba, bb := make([]byte, chunk), make([]byte, chunk)
	for i := range out {
		off := int64(i) * chunk
		if dataFrom(fa, off, size) >= off+chunk && dataFrom(fb, off, size) >= off+chunk {
			continue
		}
		na, err := fa.ReadAt(ba, off)
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		nb, err := fb.ReadAt(bb, off)
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		out[i] = !bytes.Equal(ba[:na], bb[:nb])
	}
	return out, nil
}

// launcherConnected is false (503) until LauncherDelay after the export's
// creation: virt-launcher has not connected its tunnel yet.
func (e *exportServer) launcherConnected(w http.ResponseWriter) bool {
	if time.Since(e.created) >= e.sim.opts.LauncherDelay {
		return true
	}
	http.Error(w, "Backup source (virt-launcher) not connected via tunnel", http.StatusServiceUnavailable)
	return false
}

// openBackup is openSized once the launcher is connected (503 before).
func (e *exportServer) openBackup(w http.ResponseWriter, file string) (*os.File, int64, bool) {
	if !e.launcherConnected(w) {
		return nil, 0, false
	}
	return openSized(w, file)
}

// serveBackupMap answers as the real server does: extents from allocation,
// "data"/"hole,zero" for a full backup, "clean"/"dirty"/"zero"/"dirty,zero"
// for an incremental one; 405 on anything but GET, 400 on a bad offset, 500
// at offset = size.
func (e *exportServer) serveBackupMap(w http.ResponseWriter, r *http.Request, vol, file string) {
	e.sim.mapQueries.Add(1)
	if r.Method != http.MethodGet {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	f, size, ok := e.openBackup(w, file)
	if !ok {
		return
	}
	defer f.Close()
	q := r.URL.Query()
	parse := func(key string, def uint64) (uint64, bool) {
		v := q.Get(key)
		if v == "" {
			return def, true
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			http.Error(w, fmt.Sprintf("invalid %s %q: %v", key, v, err), http.StatusBadRequest)
			return 0, false
		}
		return n, true
	}
	off64, ok := parse("offset", 0)
	if !ok {
		return
	}
	length64, ok := parse("length", uint64(size))
	if !ok {
		return
	}
	pageSize, ok := parse("page_size", 512)
	if !ok {
		return
	}
	if lim := uint64(e.sim.opts.MapPageLimit); lim > 0 && pageSize > lim {
		pageSize = lim
	}
	if off64 >= uint64(size) || pageSize == 0 {
		http.Error(w, "Failed to collect map extents for export: "+vol, http.StatusInternalServerError)
		return
	}
	off := int64(off64)
	end := size
	if length64 < uint64(size-off) {
		end = off + int64(length64)
	}
	dirty := e.backup.dirty[vol]
	page := mapPage{Extents: []mapExtent{}}
	for pos := off; pos < end; {
		n := min(chunk-pos%chunk, end-pos)
		alloc := dataFrom(f, pos, size) < pos+n
		var desc string
		var typ uint64
		switch {
		case dirty == nil && alloc:
			desc, typ = "data", 0
		case dirty == nil:
			desc, typ = "hole,zero", 3
		case dirty[pos/chunk] && alloc:
			desc, typ = "dirty", 1
		case dirty[pos/chunk]:
			desc, typ = "dirty,zero", 3
		case alloc:
			desc, typ = "clean", 0
		default:
			desc, typ = "zero", 2
		}
		if !page.add(pos, n, typ, desc, pageSize) {
			break
		}
		pos += n
	}
	var buf bytes.Buffer
	_ = json.NewEncoder(&buf).Encode(page) // with the encoder's newline, as the real server
	body := buf.Bytes()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	_, _ = w.Write(body)
}

// serveBackupData streams ?offset=&length= (the whole rest without length):
// Range ignored, 200 application/octet-stream with no Content-Length.
func (e *exportServer) serveBackupData(w http.ResponseWriter, r *http.Request, file string) {
	e.sim.dataQueries.Add(1)
	f, size, ok := e.openBackup(w, file)
	if !ok {
		return
	}
	defer f.Close()
	q := r.URL.Query()
	off, err1 := strconv.ParseUint(q.Get("offset"), 10, 64)
	length := uint64(size)
	var err2 error
	if v := q.Get("length"); v != "" {
		length, err2 = strconv.ParseUint(v, 10, 64)
	}
	if err1 != nil || err2 != nil || off > uint64(size) {
		http.Error(w, "invalid offset or length", http.StatusBadRequest)
		return
	}
	n := min(length, uint64(size)-off)
	w.Header().Set("Content-Type", "application/octet-stream")
	w.WriteHeader(http.StatusOK)
	if fl, ok := w.(http.Flusher); ok {
		fl.Flush()
	}
	_, _ = io.Copy(countingWriter{w, e.sim}, io.NewSectionReader(f, int64(off), int64(n)))
}

// exportURL is an export server's base URL (internal, root paths).
func (s *Server) exportURL(export string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.exports[export]; ok {
		return e.srv.url()
	}
	return ""
}

// VirtualMachineBackupTracker keeps a VM's latest checkpoint: a backup whose
// source is a tracker is incremental from it (full when there is none yet),
// and moves it on.
type VirtualMachineBackupTracker struct {
	APIVersion string     `json:"apiVersion"`
	Kind       string     `json:"kind"`
	Metadata   ObjectMeta `json:"metadata"`
	Spec       struct {
		Source TypedRef `json:"source"`
	} `json:"spec"`
	Status *struct {
		LatestCheckpoint *struct {
			Name         string `json:"name,omitempty"`
			CreationTime string `json:"creationTime,omitempty"`
		} `json:"latestCheckpoint,omitempty"`
	} `json:"status,omitempty"`
}

// backupRequest is what a client POSTs: source VM (full) or tracker
// (incremental from its checkpoint), Pull mode, token secret, TTL.
type backupRequest struct {
	Metadata ObjectMeta `json:"metadata"`
	Spec     struct {
		Source         TypedRef `json:"source"`
		Mode           string   `json:"mode"`
		TokenSecretRef string   `json:"tokenSecretRef"`
		TTLDuration    string   `json:"ttlDuration"`
	} `json:"spec"`
}

// addTracker stores a tracker. Caller holds mu.
func (s *Server) addTracker(tr VirtualMachineBackupTracker) (any, error) {
	name := tr.Metadata.Name
	if name == "" || strings.ContainsAny(name, "/.") || tr.Spec.Source.Kind != "VirtualMachine" {
		return nil, fmt.Errorf("tracker: %w", errInvalid)
	}
	if _, dup := s.trackers[name]; dup {
		return nil, fmt.Errorf("tracker %q: %w", name, errExists)
	}
	if _, ok := s.vms[tr.Spec.Source.Name]; !ok {
		return nil, fmt.Errorf("tracker source: %w", errInvalid)
	}
	tr.APIVersion, tr.Kind = backupGroup+"/v1alpha1", "VirtualMachineBackupTracker"
	tr.Metadata.Namespace, tr.Metadata.UID, tr.Metadata.CreationTimestamp = s.opts.Namespace, s.nextUID(), s.now()
	s.trackers[name] = &tr
	return tr, nil
}

// addBackup takes a Pull-mode backup: from a tracker's checkpoint when it
// has one, and exports it (an export named after the backup, owned by it,
// deleted when the TTL ends). Caller holds mu.
func (s *Server) addBackup(req backupRequest) (any, error) {
	name := req.Metadata.Name
	if name == "" || strings.ContainsAny(name, "/.") {
		return nil, fmt.Errorf("backup name: %w", errInvalid)
	}
	if req.Spec.Mode != "Pull" || req.Spec.TokenSecretRef == "" {
		return nil, fmt.Errorf("tokenSecretRef is required when mode is Pull: %w", errInvalid)
	}
	vm, incremental := "", false
	var tr *VirtualMachineBackupTracker
	switch req.Spec.Source.Kind {
	case "VirtualMachine":
		vm = req.Spec.Source.Name
	case "VirtualMachineBackupTracker":
		var ok bool
		if tr, ok = s.trackers[req.Spec.Source.Name]; !ok {
			return nil, fmt.Errorf("tracker %q: %w", req.Spec.Source.Name, errInvalid)
		}
		vm = tr.Spec.Source.Name
		incremental = tr.Status != nil && tr.Status.LatestCheckpoint != nil && s.lastBackup[vm] != ""
	default:
		return nil, fmt.Errorf("backup source: %w", errInvalid)
	}
	ttl := 2 * time.Hour
	if req.Spec.TTLDuration != "" {
		d, err := time.ParseDuration(req.Spec.TTLDuration)
		if err != nil {
			return nil, fmt.Errorf("ttlDuration: %w", errInvalid)
		}
		ttl = d
	}
	if err := s.createBackup(name, name, vm, incremental, req.Spec.TokenSecretRef); err != nil {
		return nil, err
	}
	b := s.backups[name]
	b.obj.Metadata.Annotations = req.Metadata.Annotations
	b.ttl = ttl
	e := s.exports[name]
	e.obj.Metadata.OwnerReferences = []OwnerReference{{APIVersion: backupGroup + "/v1alpha1", Kind: "VirtualMachineBackup", Name: name, UID: b.obj.Metadata.UID}}
	if tr != nil {
		tr.Status = &struct {
			LatestCheckpoint *struct {
				Name         string `json:"name,omitempty"`
				CreationTime string `json:"creationTime,omitempty"`
			} `json:"latestCheckpoint,omitempty"`
		}{LatestCheckpoint: &struct {
			Name         string `json:"name,omitempty"`
			CreationTime string `json:"creationTime,omitempty"`
		}{Name: b.obj.Status.CheckpointName, CreationTime: s.now()}}
	}
	return b.obj, nil
}

// expireBackups deletes the exports of backups whose TTL has passed, as the
// controller does. Caller holds mu.
func (s *Server) expireBackups() {
	for name, b := range s.backups {
		if b.ttl > 0 && time.Since(b.createdAt) >= b.ttl {
			if _, ok := s.exports[name]; ok {
				_ = s.delete("virtualmachineexports", name)
			}
		}
	}
}
