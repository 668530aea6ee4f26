package kubevirttest

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"time"
)

var (
	errNotFound = errors.New("not found")
	errExists   = errors.New("already exists")
	errInvalid  = errors.New("invalid")
)

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeStatus(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	switch {
	case errors.Is(err, errNotFound):
		code = http.StatusNotFound
	case errors.Is(err, errExists):
		code = http.StatusConflict
	case errors.Is(err, errInvalid):
		code = http.StatusBadRequest
	}
	writeJSON(w, code, map[string]any{"kind": "Status", "status": "Failure", "message": err.Error(), "code": code})
}

// serveAPI routes /api/v1/namespaces/NS/secrets[/name] and
// /apis/GROUP/VERSION/namespaces/NS/RESOURCE[/name].
func (s *Server) serveAPI(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+apiToken {
		writeJSON(w, http.StatusUnauthorized, map[string]any{"kind": "Status", "code": 401, "message": "Unauthorized"})
		return
	}
	parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	var group, version string
	switch {
	case len(parts) >= 5 && parts[0] == "api" && parts[1] == "v1" && parts[2] == "namespaces":
		group, version, parts = "", "v1", parts[3:]
	case len(parts) >= 6 && parts[0] == "apis" && parts[3] == "namespaces":
		group, version, parts = parts[1], parts[2], parts[4:]
	default:
		writeStatus(w, fmt.Errorf("path %s: %w", r.URL.Path, errNotFound))
		return
	}
	if parts[0] != s.opts.Namespace || len(parts) > 3 {
		writeStatus(w, fmt.Errorf("namespace: %w", errNotFound))
		return
	}
	resource, name := parts[1], ""
	if len(parts) == 3 {
		name = parts[2]
	}
	want := map[string]string{"secrets": "/v1", "virtualmachines": vmGroup + "/v1",
		"virtualmachinesnapshots": snapshotGroup + "/v1beta1", "virtualmachineexports": exportGroup + "/" + s.opts.ExportVersion,
		"virtualmachinebackups": backupGroup + "/v1alpha1", "virtualmachinebackuptrackers": backupGroup + "/v1alpha1"}
	if want[resource] != group+"/"+version || group == backupGroup && !s.opts.BackupAPI {
		writeStatus(w, fmt.Errorf("resource %s/%s %s: %w", group, version, resource, errNotFound))
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.expireBackups()
	var (
		out any
		err error
	)
	code := http.StatusOK
	switch r.Method {
	case http.MethodGet:
		out, err = s.get(resource, name)
	case http.MethodPost:
		if name != "" {
			err = errInvalid
			break
		}
		out, err = s.create(resource, r)
		code = http.StatusCreated
	case http.MethodDelete:
		err = s.delete(resource, name)
		out = map[string]any{"kind": "Status", "status": "Success"}
	default:
		err = errInvalid
	}
	if err != nil {
		writeStatus(w, err)
		return
	}
	writeJSON(w, code, out)
}

func (s *Server) snapView(sn *snapState) VirtualMachineSnapshot {
	out := sn.obj
	ready := time.Since(sn.created) >= s.opts.ReadyDelay
	phase := "InProgress"
	if ready {
		phase = "Succeeded"
	}
	out.Status = &struct {
		ReadyToUse bool   `json:"readyToUse"`
		Phase      string `json:"phase,omitempty"`
	}{ReadyToUse: ready, Phase: phase}
	return out
}

// getFrom is a GET of a resource kept in m: its list (apiVersion, kind)
// for name "", else the named object; each shown through view.
func getFrom[V, T any](m map[string]V, name, apiVersion, kind string, view func(V) T) (any, bool) {
	if name == "" {
		l := list[T]{APIVersion: apiVersion, Kind: kind, Items: []T{}}
		for _, k := range sortedKeys(m) {
			l.Items = append(l.Items, view(m[k]))
		}
		return l, true
	}
	if v, ok := m[name]; ok {
		return view(v), true
	}
	return nil, false
}

func (s *Server) get(resource, name string) (any, error) {
	var (
		out any
		ok  bool
	)
	switch resource {
	case "virtualmachines":
		out, ok = getFrom(s.vms, name, vmGroup+"/v1", "VirtualMachineList", func(vm *vmState) VirtualMachine { return vm.obj })
	case "virtualmachinesnapshots":
		out, ok = getFrom(s.snaps, name, snapshotGroup+"/v1beta1", "VirtualMachineSnapshotList", s.snapView)
	case "virtualmachineexports":
		out, ok = getFrom(s.exports, name, exportGroup+"/"+s.opts.ExportVersion, "VirtualMachineExportList", s.exportView)
	case "virtualmachinebackups":
		out, ok = getFrom(s.backups, name, backupGroup+"/v1alpha1", "VirtualMachineBackupList", func(b *backupState) VirtualMachineBackup { return b.obj })
	case "virtualmachinebackuptrackers":
		out, ok = getFrom(s.trackers, name, backupGroup+"/v1alpha1", "VirtualMachineBackupTrackerList", func(tr *VirtualMachineBackupTracker) VirtualMachineBackupTracker { return *tr })
	case "secrets":
		if sec, found := s.secrets[name]; found && name != "" {
			return sec, nil
		}
	}
	if ok {
		return out, nil
	}
	return nil, fmt.Errorf("%s %q: %w", resource, name, errNotFound)
}

func (s *Server) create(resource string, r *http.Request) (any, error) {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 1<<20))
	switch resource {
	case "virtualmachinesnapshots":
		var sn VirtualMachineSnapshot
		if err := dec.Decode(&sn); err != nil {
			return nil, fmt.Errorf("decode: %w", errInvalid)
		}
		st, err := s.addSnapshot(sn)
		if err != nil {
			return nil, err
		}
		return s.snapView(st), nil
	case "virtualmachineexports":
		var e VirtualMachineExport
		if err := dec.Decode(&e); err != nil {
			return nil, fmt.Errorf("decode: %w", errInvalid)
		}
		if e.Metadata.Name == "" || strings.ContainsAny(e.Metadata.Name, "/.") {
			return nil, fmt.Errorf("name: %w", errInvalid)
		}
		return s.createExport(e)
	case "virtualmachinebackuptrackers":
		var tr VirtualMachineBackupTracker
		if err := dec.Decode(&tr); err != nil {
			return nil, fmt.Errorf("decode: %w", errInvalid)
		}
		return s.addTracker(tr)
	case "virtualmachinebackups":
		var req backupRequest
		if err := dec.Decode(&req); err != nil {
			return nil, fmt.Errorf("decode: %w", errInvalid)
		}
		return s.addBackup(req)
	case "secrets":
		var sec Secret
		if err := dec.Decode(&sec); err != nil {
			return nil, fmt.Errorf("decode: %w", errInvalid)
		}
		if sec.Metadata.Name == "" {
			return nil, fmt.Errorf("name: %w", errInvalid)
		}
		if _, dup := s.secrets[sec.Metadata.Name]; dup {
			return nil, fmt.Errorf("secret: %w", errExists)
		}
		if sec.Data == nil {
			sec.Data = map[string][]byte{}
		}
		for k, v := range sec.StringData {
			sec.Data[k] = []byte(v)
		}
		sec.StringData = nil
		sec.APIVersion, sec.Kind = "v1", "Secret"
		sec.Metadata.Namespace, sec.Metadata.UID, sec.Metadata.CreationTimestamp = s.opts.Namespace, s.nextUID(), s.now()
		s.secrets[sec.Metadata.Name] = &sec
		return &sec, nil
	}
	return nil, errInvalid
}

// addSnapshot takes the snapshot sn asks for: an immutable copy of its VM's
// volumes. Caller holds mu.
func (s *Server) addSnapshot(sn VirtualMachineSnapshot) (*snapState, error) {
	name := sn.Metadata.Name
	if name == "" || strings.ContainsAny(name, "/.") {
		return nil, fmt.Errorf("name %q: %w", name, errInvalid)
	}
	if _, dup := s.snaps[name]; dup {
		return nil, fmt.Errorf("snapshot %q: %w", name, errExists)
	}
	vm, ok := s.vms[sn.Spec.Source.Name]
	if !ok || sn.Spec.Source.Kind != "VirtualMachine" {
		return nil, fmt.Errorf("source vm %q: %w", sn.Spec.Source.Name, errInvalid)
	}
	dir := filepath.Join(s.opts.Dir, "snaps", name)
	if err := s.takeSnapshot(vm, dir); err != nil {
		return nil, err
	}
	sn.APIVersion, sn.Kind = snapshotGroup+"/v1beta1", "VirtualMachineSnapshot"
	sn.Metadata.Namespace, sn.Metadata.UID, sn.Metadata.CreationTimestamp = s.opts.Namespace, s.nextUID(), s.now()
	st := &snapState{obj: sn, created: time.Now(), dir: dir}
	s.snaps[name] = st
	return st, nil
}

// delete removes an object and, like the garbage collector, whatever it owns.
func (s *Server) delete(resource, name string) error {
	var uid string
	switch resource {
	case "virtualmachinesnapshots":
		sn, ok := s.snaps[name]
		if !ok {
			return fmt.Errorf("snapshot %q: %w", name, errNotFound)
		}
		uid = sn.obj.Metadata.UID
		delete(s.snaps, name)
	case "virtualmachineexports":
		e, ok := s.exports[name]
		if !ok {
			return fmt.Errorf("export %q: %w", name, errNotFound)
		}
		uid = e.obj.Metadata.UID
		e.srv.close()
		delete(s.exports, name)
	case "virtualmachinebackups":
		b, ok := s.backups[name]
		if !ok {
			return fmt.Errorf("backup %q: %w", name, errNotFound)
		}
		uid = b.obj.Metadata.UID
		// Its checkpoint stays (checkpoints[name]): the tracker keeps it.
		delete(s.backups, name)
	case "secrets":
		sec, ok := s.secrets[name]
		if !ok {
			return fmt.Errorf("secret %q: %w", name, errNotFound)
		}
		uid = sec.Metadata.UID
		delete(s.secrets, name)
	default:
		return errInvalid
	}
	owned := func(refs []OwnerReference) bool {
		for _, o := range refs {
			if o.UID == uid {
				return true
			}
		}
		return false
	}
	for n, e := range s.exports {
		if owned(e.obj.Metadata.OwnerReferences) {
			_ = s.delete("virtualmachineexports", n)
		}
	}
	for n, sec := range s.secrets {
		if owned(sec.Metadata.OwnerReferences) {
			_ = s.delete("secrets", n)
		}
	}
	return nil
}
