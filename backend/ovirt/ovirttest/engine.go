package ovirttest

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net/http"
	"path"
	"strconv"
	"strings"
	"time"
)

const (
	apiPrefix = "/ovirt-engine/api"
	ssoPath   = "/ovirt-engine/sso/oauth/token"
	pkiPath   = "/ovirt-engine/services/pki-resource"
	// unauthorizedBody is what the engine's servlet container answers a
	// request without a valid token with, whatever the Accept header says.
	unauthorizedBody = "<html><head><title>Error</title></head><body>Unauthorized</body></html>"
)

// obj is one JSON object of the engine's answers. Values are Go scalars,
// time.Time, obj and []obj; writeJSON renders them as the configured
// engine does.
type obj = map[string]any

// fault is the engine's error answer: {"reason", "detail"} with a status.
type fault struct {
	status         int
	reason, detail string
}

func (f *fault) Error() string { return fmt.Sprintf("%d %s: %s", f.status, f.reason, f.detail) }

func badRequest(detail string) *fault {
	return &fault{status: http.StatusBadRequest, reason: "Bad Request", detail: detail}
}

func notFound(what, id string) *fault {
	return &fault{status: http.StatusNotFound, reason: "Not Found", detail: fmt.Sprintf("Entity not found: %s %s", what, id)}
}

func conflict(detail string) *fault {
	return &fault{status: http.StatusConflict, reason: "Operation Failed", detail: detail}
}

// flexBool and flexInt accept the JSON scalar or its string form, as the
// engine's JSON reader does.
type flexBool bool

func (b *flexBool) UnmarshalJSON(p []byte) error {
	s := strings.Trim(string(p), `"`)
	switch s {
	case "true":
		*b = true
	case "false", "null", "":
		*b = false
	default:
		return fmt.Errorf("not a boolean: %s", p)
	}
	return nil
}

type flexInt struct {
	v   int64
	set bool
}

func (n *flexInt) UnmarshalJSON(p []byte) error {
	s := strings.Trim(string(p), `"`)
	if s == "null" || s == "" {
		return nil
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return fmt.Errorf("not an integer: %s: %w", p, err)
	}
	n.v, n.set = v, true
	return nil
}

// render converts values for the JSON writer: with StringScalars numbers
// and booleans become strings and dates epoch milliseconds (a bare number,
// as older engines wrote dates); otherwise dates are ISO 8601 with
// milliseconds, as the current runtime writer does.
func (s *Server) render(v any) any {
	switch x := v.(type) {
	case obj:
		out := make(obj, len(x))
		for k, e := range x {
			out[k] = s.render(e)
		}
		return out
	case []obj:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = s.render(e)
		}
		return out
	case time.Time:
		if s.opts.StringScalars {
			return x.UnixMilli()
		}
		return x.UTC().Format("2006-01-02T15:04:05.000-07:00")
	case bool:
		if s.opts.StringScalars {
			return strconv.FormatBool(x)
		}
		return x
	case int:
		if s.opts.StringScalars {
			return strconv.Itoa(x)
		}
		return x
	case int64:
		if s.opts.StringScalars {
			return strconv.FormatInt(x, 10)
		}
		return x
	}
	return v
}

func (s *Server) writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(s.render(v))
	if err != nil {
		s.log.Error("engine json", "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func (s *Server) writeFault(w http.ResponseWriter, f *fault) {
	s.writeJSON(w, f.status, obj{"reason": f.reason, "detail": f.detail})
}

func (s *Server) engineHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+ssoPath, s.serveSSO)
	mux.HandleFunc("GET "+pkiPath, s.servePKI)
	api := http.NewServeMux()
	route := func(pattern string, h func(http.ResponseWriter, *http.Request) *fault) {
		method, p, _ := strings.Cut(pattern, " ")
		api.HandleFunc(method+" "+apiPrefix+p, func(w http.ResponseWriter, r *http.Request) {
			s.mu.Lock()
			s.tick()
			s.mu.Unlock()
			if f := h(w, r); f != nil {
				s.writeFault(w, f)
			}
		})
	}
	route("GET ", s.apiRoot)
	route("GET /{$}", s.apiRoot)
	route("GET /vms", s.listVMs)
	route("GET /vms/{vm}", s.getVM)
	route("GET /vms/{vm}/diskattachments", s.listAttachments)
	route("GET /vms/{vm}/diskattachments/{att}", s.getAttachment)
	route("GET /disks/{disk}", s.getDisk)
	route("GET /vms/{vm}/snapshots", s.listSnapshots)
	route("POST /vms/{vm}/snapshots", s.addSnapshot)
	route("GET /vms/{vm}/snapshots/{snap}", s.getSnapshot)
	route("DELETE /vms/{vm}/snapshots/{snap}", s.deleteSnapshot)
	route("GET /vms/{vm}/snapshots/{snap}/disks", s.listSnapshotDisks)
	route("GET /imagetransfers", s.listTransfers)
	route("POST /imagetransfers", s.addTransfer)
	route("GET /imagetransfers/{id}", s.getTransfer)
	route("POST /imagetransfers/{id}/finalize", s.transferAction("finalize"))
	route("POST /imagetransfers/{id}/cancel", s.transferAction("cancel"))
	api.HandleFunc(apiPrefix+"/", func(w http.ResponseWriter, r *http.Request) {
		s.writeFault(w, &fault{status: http.StatusNotFound, reason: "Not Found", detail: "no such resource: " + r.Method + " " + r.URL.Path})
	})
	mux.Handle(apiPrefix, s.authorized(api))
	mux.Handle(apiPrefix+"/", s.authorized(api))
	return mux
}

// servePKI is the engine's CA download; no authentication, as on the
// real engine (clients fetch it to trust the rest).
func (s *Server) servePKI(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if q.Get("resource") != "ca-certificate" {
		http.Error(w, "unknown resource", http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/x-x509-ca-cert")
	_, _ = w.Write(s.ca.PEM())
}

// serveSSO is POST /ovirt-engine/sso/oauth/token with the password grant.
// With scope ovirt-app-api the engine's errors are HTTP 400
// {"error_code", "error"}.
func (s *Server) serveSSO(w http.ResponseWriter, r *http.Request) {
	ssoErr := func(code, msg string) {
		s.writeJSON(w, http.StatusBadRequest, obj{"error_code": code, "error": msg})
	}
	if r.Header.Get("Accept") != "application/json" {
		ssoErr("invalid_request", "The Accept header must be application/json.")
		return
	}
	if err := r.ParseForm(); err != nil {
		ssoErr("invalid_request", "Unable to parse the request: "+err.Error())
		return
	}
	f := r.PostForm
	if gt := f.Get("grant_type"); gt != "password" {
		if gt == "" {
			ssoErr("invalid_request", "No value found for parameter: grant_type.")
		} else {
			ssoErr("unsupported_grant_type", "The authorization grant type is not supported: "+gt+".")
		}
		return
	}
	if f.Get("scope") == "" {
		ssoErr("invalid_scope", "The requested scope is invalid, unknown, or malformed.")
		return
	}
	user, pass := f.Get("username"), f.Get("password")
	if user == "" || pass == "" {
		ssoErr("invalid_request", "No value found for parameter: username or password.")
		return
	}
	if want, ok := s.opts.Users[user]; !ok || want != pass {
		ssoErr("access_denied", fmt.Sprintf("Cannot authenticate user '%s': The username or password is incorrect..", user))
		return
	}
	var b [48]byte
	_, _ = rand.Read(b[:])
	tok := base64.RawURLEncoding.EncodeToString(b[:])
	s.mu.Lock()
	exp := s.opts.Clock().Add(s.opts.TokenTTL)
	s.tokens[tok] = &token{user: user, expires: exp}
	s.stats.Logins++
	s.mu.Unlock()
	// exp is always a string of milliseconds, whatever StringScalars says.
	body, _ := json.Marshal(map[string]string{
		"access_token": tok, "scope": f.Get("scope"), "exp": strconv.FormatInt(exp.UnixMilli(), 10), "token_type": "bearer",
	})
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(body)
}

// authorized lets API requests through with a live bearer token and an
// Accept the simulator can answer. The engine defaults to XML; this
// simulator speaks JSON only and answers any other Accept with 406 rather
// than JSON a client did not ask for. A missing Version header is taken as
// 4, as the engine does; Version 3 is gone from 4.4 engines: 400.
func (s *Server) authorized(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		auth := r.Header.Get("Authorization")
		tok, ok := strings.CutPrefix(auth, "Bearer ")
		s.mu.Lock()
		t := s.tokens[strings.TrimSpace(tok)]
		live := ok && t != nil && s.opts.Clock().Before(t.expires)
		s.mu.Unlock()
		if !live {
			w.Header().Set("WWW-Authenticate", `Bearer realm="RESTAPI"`)
			w.Header().Set("Content-Type", "text/html;charset=UTF-8")
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, unauthorizedBody)
			return
		}
		if v := r.Header.Get("Version"); v != "" && v != "4" {
			s.writeFault(w, badRequest("Version "+v+" of the API is not supported"))
			return
		}
		if !acceptsJSON(r.Header.Get("Accept")) {
			s.writeFault(w, &fault{status: http.StatusNotAcceptable, reason: "Not Acceptable", detail: "the simulator answers Accept: application/json only"})
			return
		}
		next.ServeHTTP(w, r)
	})
}

func acceptsJSON(accept string) bool {
	for _, part := range strings.Split(accept, ",") {
		mt, _, err := mime.ParseMediaType(strings.TrimSpace(part))
		if err == nil && mt == "application/json" {
			return true
		}
	}
	return false
}

// decodeBody reads a JSON request body into v.
func decodeBody(r *http.Request, v any) *fault {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		if mt, _, _ := mime.ParseMediaType(ct); mt != "application/json" {
			return &fault{status: http.StatusUnsupportedMediaType, reason: "Unsupported Media Type", detail: "the simulator reads application/json bodies only, not " + ct}
		}
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		return badRequest("reading the body: " + err.Error())
	}
	if len(bytes.TrimSpace(body)) == 0 {
		body = []byte("{}")
	}
	if err := json.Unmarshal(body, v); err != nil {
		return badRequest("malformed JSON: " + err.Error())
	}
	return nil
}

func (s *Server) apiRoot(w http.ResponseWriter, _ *http.Request) *fault {
	s.writeJSON(w, http.StatusOK, obj{
		"product_info": obj{"name": "oVirt Engine", "vendor": "ovirt.org", "version": obj{"major": 4, "minor": 5, "build": 7, "revision": 0, "full_version": "4.5.7-1.el9"}},
		"link": []obj{
			{"href": apiPrefix + "/vms", "rel": "vms"}, {"href": apiPrefix + "/disks", "rel": "disks"},
			{"href": apiPrefix + "/imagetransfers", "rel": "imagetransfers"},
		},
	})
	return nil
}

func vmHref(v *vm) string { return apiPrefix + "/vms/" + v.id }

func (s *Server) vmRecord(v *vm) obj {
	return obj{
		"id": v.id, "name": v.name, "href": vmHref(v), "status": "up", "type": "server",
		"creation_time": v.created, "memory": int64(4 << 30),
		"link": []obj{
			{"href": vmHref(v) + "/diskattachments", "rel": "diskattachments"},
			{"href": vmHref(v) + "/snapshots", "rel": "snapshots"},
		},
	}
}

// listVMs is GET /vms; search supports name= and id= (with * wildcards),
// which is what clients look VMs up by.
func (s *Server) listVMs(w http.ResponseWriter, r *http.Request) *fault {
	match := func(*vm) bool { return true }
	if q := strings.TrimSpace(r.URL.Query().Get("search")); q != "" {
		k, val, ok := strings.Cut(q, "=")
		k, val = strings.TrimSpace(k), strings.Trim(strings.TrimSpace(val), `"`)
		if !ok || (k != "name" && k != "id") || strings.ContainsAny(val, " ") {
			return badRequest("the simulator searches name=… or id=… only, not " + q)
		}
		match = func(v *vm) bool {
			field := v.name
			if k == "id" {
				field = v.id
			}
			m, _ := path.Match(val, field)
			return m
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	out := []obj{}
	for _, v := range s.vms {
		if match(v) {
			out = append(out, s.vmRecord(v))
		}
	}
	s.writeJSON(w, http.StatusOK, obj{"vm": out})
	return nil
}

func (s *Server) pathVM(r *http.Request) (*vm, *fault) {
	v := s.vmByID(r.PathValue("vm"))
	if v == nil {
		return nil, notFound("vm", r.PathValue("vm"))
	}
	return v, nil
}

func (s *Server) getVM(w http.ResponseWriter, r *http.Request) *fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, f := s.pathVM(r)
	if f != nil {
		return f
	}
	s.writeJSON(w, http.StatusOK, s.vmRecord(v))
	return nil
}

func (s *Server) attachmentRecord(v *vm, i int, d *disk) obj {
	return obj{
		"id": d.id, "href": vmHref(v) + "/diskattachments/" + d.id,
		"active": true, "bootable": i == 0, "interface": "virtio_scsi", "read_only": false,
		"pass_discard": false, "uses_scsi_reservation": false,
		"logical_name": "/dev/sd" + string(rune('a'+i%26)),
		"disk":         obj{"id": d.id, "href": apiPrefix + "/disks/" + d.id},
		"vm":           obj{"id": v.id, "href": vmHref(v)},
	}
}

func (s *Server) listAttachments(w http.ResponseWriter, r *http.Request) *fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, f := s.pathVM(r)
	if f != nil {
		return f
	}
	out := []obj{}
	for i, d := range v.disks {
		out = append(out, s.attachmentRecord(v, i, d))
	}
	s.writeJSON(w, http.StatusOK, obj{"disk_attachment": out})
	return nil
}

func (s *Server) getAttachment(w http.ResponseWriter, r *http.Request) *fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, f := s.pathVM(r)
	if f != nil {
		return f
	}
	for i, d := range v.disks {
		if d.id == r.PathValue("att") {
			s.writeJSON(w, http.StatusOK, s.attachmentRecord(v, i, d))
			return nil
		}
	}
	return notFound("disk attachment", r.PathValue("att"))
}

// diskStatus is "locked" while a transfer or a snapshot operation holds
// the disk, as the engine shows it.
func (s *Server) diskStatus(d *disk) string {
	now := s.opts.Clock()
	if s.transferring(d) {
		return "locked"
	}
	for _, sn := range d.vm.snaps {
		if sn.locked(now) {
			return "locked"
		}
	}
	return "ok"
}

func (s *Server) diskRecord(d *disk, l *layer) obj {
	actual := d.allocated()
	return obj{
		"id": d.id, "href": apiPrefix + "/disks/" + d.id, "name": d.name, "alias": d.name,
		"provisioned_size": d.size, "actual_size": actual, "total_size": actual,
		"format": "cow", "qcow_version": "qcow2_v3", "sparse": true, "shareable": false, "wipe_after_delete": false,
		"propagate_errors": false, "storage_type": "image", "content_type": "data", "backup": "none",
		"status": s.diskStatus(d), "image_id": l.imageID,
		"storage_domains": obj{"storage_domain": []obj{{"id": storageDomainID, "href": apiPrefix + "/storagedomains/" + storageDomainID}}},
	}
}

// storageDomainID is the one data domain every disk lives on.
const storageDomainID = "5e5a5c3e-0d6b-4c8e-9a36-0b9e7d0c4a11"

func (s *Server) getDisk(w http.ResponseWriter, r *http.Request) *fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.diskByID(r.PathValue("disk"))
	if d == nil {
		return notFound("disk", r.PathValue("disk"))
	}
	d.mu.RLock()
	act := d.active()
	d.mu.RUnlock()
	s.writeJSON(w, http.StatusOK, s.diskRecord(d, act))
	return nil
}

func (s *Server) snapshotRecord(v *vm, sn *snapshot) obj {
	status := "ok"
	if sn.locked(s.opts.Clock()) {
		status = "locked"
	}
	return obj{
		"id": sn.id, "href": vmHref(v) + "/snapshots/" + sn.id, "description": sn.description,
		"date": sn.date, "snapshot_type": "regular", "snapshot_status": status,
		"persist_memorystate": sn.persistMemory, "vm": obj{"id": v.id, "href": vmHref(v)},
	}
}

// activeRecord is the "Active VM" snapshot the engine lists with the
// regular ones: the disks as they are now.
func (s *Server) activeRecord(v *vm) obj {
	return obj{
		"id": v.activeSnap, "href": vmHref(v) + "/snapshots/" + v.activeSnap, "description": "Active VM",
		"date": v.created, "snapshot_type": "active", "snapshot_status": "ok",
		"persist_memorystate": false, "vm": obj{"id": v.id, "href": vmHref(v)},
	}
}

// listSnapshots lists the regular snapshots oldest first, then the active
// one, which the engine creates anew at each snapshot.
func (s *Server) listSnapshots(w http.ResponseWriter, r *http.Request) *fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, f := s.pathVM(r)
	if f != nil {
		return f
	}
	out := []obj{}
	for _, sn := range v.snaps {
		out = append(out, s.snapshotRecord(v, sn))
	}
	out = append(out, s.activeRecord(v))
	s.writeJSON(w, http.StatusOK, obj{"snapshot": out})
	return nil
}

func (s *Server) getSnapshot(w http.ResponseWriter, r *http.Request) *fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, f := s.pathVM(r)
	if f != nil {
		return f
	}
	id := r.PathValue("snap")
	if id == v.activeSnap {
		s.writeJSON(w, http.StatusOK, s.activeRecord(v))
		return nil
	}
	sn := v.snapByID(id)
	if sn == nil {
		return notFound("snapshot", id)
	}
	s.writeJSON(w, http.StatusOK, s.snapshotRecord(v, sn))
	return nil
}

// addSnapshot is POST /vms/{id}/snapshots. The engine runs it as an async
// task: 202 Accepted with the snapshot, locked until SnapshotDelay passed.
func (s *Server) addSnapshot(w http.ResponseWriter, r *http.Request) *fault {
	var req struct {
		Description        *string  `json:"description"`
		PersistMemorystate flexBool `json:"persist_memorystate"`
	}
	req.PersistMemorystate = true // the API's default
	if f := decodeBody(r, &req); f != nil {
		return f
	}
	if req.Description == nil || *req.Description == "" {
		return &fault{status: http.StatusBadRequest, reason: "Incomplete parameters", detail: "Snapshot [description] required for add"}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	v, f := s.pathVM(r)
	if f != nil {
		return f
	}
	for _, d := range v.disks {
		if s.transferring(d) {
			return conflict(fmt.Sprintf("[Cannot create Snapshot. The following disks are locked: %s. Please try again in a few minutes.]", d.name))
		}
	}
	sn, err := s.snapshotVM(v, *req.Description, bool(req.PersistMemorystate))
	if err != nil {
		if f, ok := err.(*fault); ok {
			return f
		}
		return &fault{status: http.StatusInternalServerError, reason: "Operation Failed", detail: err.Error()}
	}
	s.stats.Snapshots++
	w.Header().Set("Location", s.URL()+vmHref(v)+"/snapshots/"+sn.id)
	s.writeJSON(w, http.StatusAccepted, s.snapshotRecord(v, sn))
	return nil
}

// deleteSnapshot is DELETE /vms/{id}/snapshots/{sid}: the snapshot stays,
// locked, for SnapshotDelay while its layers merge, then it is gone.
func (s *Server) deleteSnapshot(w http.ResponseWriter, r *http.Request) *fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, f := s.pathVM(r)
	if f != nil {
		return f
	}
	id := r.PathValue("snap")
	if id == v.activeSnap {
		return conflict("[Cannot remove Snapshot. The active VM snapshot cannot be removed.]")
	}
	sn := v.snapByID(id)
	if sn == nil {
		return notFound("snapshot", id)
	}
	now := s.opts.Clock()
	if sn.locked(now) {
		return conflict("[Cannot remove Snapshot: Snapshot is currently being created or removed for VM " + v.name + ".]")
	}
	for _, d := range v.disks {
		if s.transferring(d) {
			return conflict(fmt.Sprintf("[Cannot remove Snapshot. The following disks are locked: %s. Please try again in a few minutes.]", d.name))
		}
	}
	sn.deleting, sn.goneAt = true, now.Add(s.opts.SnapshotDelay)
	w.WriteHeader(http.StatusOK)
	return nil
}

// listSnapshotDisks is GET /vms/{id}/snapshots/{sid}/disks: disk ids with
// the disk snapshot's image_id, which is what an image transfer takes.
func (s *Server) listSnapshotDisks(w http.ResponseWriter, r *http.Request) *fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, f := s.pathVM(r)
	if f != nil {
		return f
	}
	id := r.PathValue("snap")
	sn := v.snapByID(id)
	if sn == nil && id != v.activeSnap {
		return notFound("snapshot", id)
	}
	out := []obj{}
	for _, d := range v.disks {
		var l *layer
		if sn != nil {
			l = sn.layers[d]
		} else {
			d.mu.RLock()
			l = d.active()
			d.mu.RUnlock()
		}
		rec := s.diskRecord(d, l)
		delete(rec, "href") // disk snapshots are not addressable here
		rec["snapshot"] = obj{"id": id, "href": vmHref(v) + "/snapshots/" + id}
		out = append(out, rec)
	}
	s.writeJSON(w, http.StatusOK, obj{"disk": out})
	return nil
}

func (s *Server) listTransfers(w http.ResponseWriter, _ *http.Request) *fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := []obj{}
	for _, tr := range s.tOrder {
		out = append(out, s.transferRecord(tr))
	}
	s.writeJSON(w, http.StatusOK, obj{"image_transfer": out})
	return nil
}

func (s *Server) addTransfer(w http.ResponseWriter, r *http.Request) *fault {
	var req transferRequest
	if f := decodeBody(r, &req); f != nil {
		return f
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	tr, f := s.createTransfer(req)
	if f != nil {
		return f
	}
	w.Header().Set("Location", s.URL()+apiPrefix+"/imagetransfers/"+tr.id)
	s.writeJSON(w, http.StatusCreated, s.transferRecord(tr))
	return nil
}

func (s *Server) getTransfer(w http.ResponseWriter, r *http.Request) *fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	tr := s.transfers[r.PathValue("id")]
	if tr == nil {
		return notFound("image transfer", r.PathValue("id"))
	}
	s.writeJSON(w, http.StatusOK, s.transferRecord(tr))
	return nil
}

// transferAction is POST /imagetransfers/{id}/finalize|cancel; the answer
// is the action, {"status": "complete"}.
func (s *Server) transferAction(which string) func(http.ResponseWriter, *http.Request) *fault {
	return func(w http.ResponseWriter, r *http.Request) *fault {
		var req map[string]any
		if f := decodeBody(r, &req); f != nil {
			return f
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		tr := s.transfers[r.PathValue("id")]
		if tr == nil {
			return notFound("image transfer", r.PathValue("id"))
		}
		var f *fault
		if which == "finalize" {
			f = s.finalize(tr)
		} else {
			f = s.cancel(tr)
		}
		if f != nil {
			return f
		}
		s.writeJSON(w, http.StatusOK, obj{"status": "complete"})
		return nil
	}
}
