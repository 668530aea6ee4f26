package coriolistest

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Wire shapes, with the field names the real server encodes.
type (
	apiDisk struct {
		Name               string `json:"name"`
		Path               string `json:"path"`
		DeviceName         string `json:"device_name"`
		SnapshotCompatible bool   `json:"snapshot_compatible"`
		Mode               string `json:"mode"`
	}
	apiVM struct {
		FriendlyName       string    `json:"friendly_name"`
		Name               string    `json:"name"`
		UUID               string    `json:"uuid"`
		Disks              []apiDisk `json:"disks"`
		SnapshotCompatible bool      `json:"snapshot_compatible"`
		Snapshots          []string  `json:"snapshots"`
	}
	apiDiskSnapshot struct {
		ParentPath     string  `json:"parent_path"`
		Path           string  `json:"path"`
		SnapshotID     string  `json:"snapshot_id"`
		Chunks         []Chunk `json:"chunks"`
		Name           string  `json:"name"`
		RepoMountpoint string  `json:"repo_mountpoint"`
	}
	apiSnapshot struct {
		ID    string            `json:"id"`
		VMID  string            `json:"vm_id"`
		Disks []apiDiskSnapshot `json:"disks"`
	}
	apiError struct {
		Error   string `json:"error"`
		Details string `json:"details"`
	}
	loginRequest struct {
		Username string `json:"username"`
		Password string `json:"password"`
	}
	loginResponse struct {
		Token string `json:"token"`
	}
)

// route is a parsed request path below /api/v1.
type route struct {
	kind                 routeKind
	vmID, snapID, diskID string
}

type routeKind int

const (
	routeUnknown routeKind = iota
	routeLogin
	routeVMs
	routeVM
	routeSnapshots
	routeSnapshot
	routeDisk
)

// parseRoute matches the server's routes, each registered with and without
// one trailing slash.
func parseRoute(p string) route {
	rest, ok := strings.CutPrefix(p, "/api/v1/")
	if !ok {
		return route{}
	}
	rest = strings.TrimSuffix(rest, "/")
	segs := strings.Split(rest, "/")
	for _, s := range segs {
		if s == "" {
			return route{}
		}
	}
	switch {
	case len(segs) == 2 && segs[0] == "auth" && segs[1] == "login":
		return route{kind: routeLogin}
	case segs[0] != "vms":
		return route{}
	case len(segs) == 1:
		return route{kind: routeVMs}
	case len(segs) == 2:
		return route{kind: routeVM, vmID: segs[1]}
	case segs[2] != "snapshots":
		return route{}
	case len(segs) == 3:
		return route{kind: routeSnapshots, vmID: segs[1]}
	case len(segs) == 4:
		return route{kind: routeSnapshot, vmID: segs[1], snapID: segs[3]}
	case len(segs) == 6 && segs[4] == "disks":
		return route{kind: routeDisk, vmID: segs[1], snapID: segs[3], diskID: segs[5]}
	}
	return route{}
}

var routeMethods = map[routeKind][]string{
	routeLogin:     {http.MethodPost},
	routeVMs:       {http.MethodGet},
	routeVM:        {http.MethodGet},
	routeSnapshots: {http.MethodGet, http.MethodPost, http.MethodDelete},
	routeSnapshot:  {http.MethodGet, http.MethodDelete},
	routeDisk:      {http.MethodGet, http.MethodHead},
}

// routes mirrors the real server's gorilla/mux tree: paths are cleaned with a
// 301 first; anything outside /api/v1/ gets mux's plain 404; under /api/v1/
// everything but login sits behind the JWT middleware, and an unmatched path
// or method reaches the JSON not-found handler only after authentication.
func (s *Server) routes() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.log.Debug("coriolis simulator request", "method", r.Method, "path", r.URL.Path, "range", r.Header.Get("Range"))
		if clean := cleanPath(r.URL.Path); clean != r.URL.Path {
			u := *r.URL
			u.Path = clean
			w.Header().Set("Location", u.String())
			w.WriteHeader(http.StatusMovedPermanently)
			return
		}
		if !strings.HasPrefix(r.URL.Path, "/api/v1/") {
			http.NotFound(w, r)
			return
		}
		rt := parseRoute(r.URL.Path)
		if !slices.Contains(routeMethods[rt.kind], r.Method) {
			rt = route{}
		}
		if rt.kind == routeLogin {
			s.login(w, r)
			return
		}
		if err := s.authenticate(r); err != nil {
			s.log.Debug("coriolis simulator auth refused", "reason", err)
			s.unauthorized.Add(1)
			w.WriteHeader(http.StatusUnauthorized)
			encode(w, apiError{Error: "Authentication failed", Details: "Invalid authentication token"})
			return
		}
		switch {
		case rt.kind == routeUnknown:
			w.WriteHeader(http.StatusNotFound)
			encode(w, apiError{Error: "Not found", Details: "Resource not found"})
			return
		case rt.kind == routeDisk:
			s.serveDisk(w, r, rt)
			return
		}
		s.apiRequests.Add(1)
		switch {
		case rt.kind == routeVMs:
			s.vmListings.Add(1)
			s.getVMs(w, r)
		case rt.kind == routeVM:
			s.vmGets.Add(1)
			s.getVM(w, r, rt.vmID)
		case rt.kind == routeSnapshots && r.Method == http.MethodGet:
			s.snapshotLists.Add(1)
			s.listSnapshots(w, r, rt.vmID)
		case rt.kind == routeSnapshots && r.Method == http.MethodPost:
			if !s.waitScan(r, 1) {
				return
			}
			s.createSnapshot(w, rt.vmID)
		case rt.kind == routeSnapshots && r.Method == http.MethodDelete:
			s.deleteAndReply(w, rt.vmID, "")
		case rt.kind == routeSnapshot && r.Method == http.MethodGet:
			s.snapshotGets.Add(1)
			s.getSnapshot(w, r, rt)
		case rt.kind == routeSnapshot && r.Method == http.MethodDelete:
			s.deleteAndReply(w, rt.vmID, rt.snapID)
		}
	})
}

// cleanPath is gorilla/mux's: path.Clean that keeps one trailing slash.
func cleanPath(p string) string {
	if p == "" {
		return "/"
	}
	if p[0] != '/' {
		p = "/" + p
	}
	np := path.Clean(p)
	if p[len(p)-1] == '/' && np != "/" {
		np += "/"
	}
	return np
}

type claims struct {
	User string `json:"user"`
	jwt.RegisteredClaims
}

const issuer = "gopherbin"

func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	var req loginRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&req); err != nil {
		writeErr(w, fmt.Errorf("%w: invalid request", errInvalid))
		return
	}
	userOK := subtle.ConstantTimeCompare([]byte(req.Username), []byte(s.opts.Username)) == 1
	passOK := subtle.ConstantTimeCompare([]byte(req.Password), []byte(s.opts.Password)) == 1
	if !userOK || !passOK {
		s.log.Info("coriolis simulator login refused", "user", req.Username)
		w.Header().Add("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		// The observed exporter passes on the OVM manager's refusal.
		encode(w, apiError{Error: "Not Authorized", Details: "failed to login: Response code: 401, Unauthorized"})
		return
	}
	ttl := time.Duration(s.tokenTTL.Load())
	tok := jwt.NewWithClaims(jwt.SigningMethodHS256, claims{
		User: req.Username,
		RegisteredClaims: jwt.RegisteredClaims{
			ExpiresAt: jwt.NewNumericDate(time.Now().Add(ttl)),
			Issuer:    issuer,
		},
	})
	signed, err := tok.SignedString(s.secret())
	if err != nil {
		writeErr(w, fmt.Errorf("sign token: %w", err))
		return
	}
	s.logins.Add(1)
	w.Header().Set("Content-Type", "application/json")
	encode(w, loginResponse{Token: signed})
}

// authenticate checks the bearer token. Error texts never include the token.
func (s *Server) authenticate(r *http.Request) error {
	h := r.Header.Get("Authorization")
	raw, ok := strings.CutPrefix(h, "Bearer ")
	if !ok || raw == "" {
		return errors.New("missing bearer token")
	}
	var c claims
	secret := s.secret()
	_, err := jwt.ParseWithClaims(raw, &c, func(*jwt.Token) (any, error) { return secret, nil },
		jwt.WithValidMethods([]string{jwt.SigningMethodHS256.Alg()}),
		jwt.WithExpirationRequired(),
		jwt.WithIssuer(issuer),
	)
	switch {
	case errors.Is(err, jwt.ErrTokenExpired):
		return errors.New("token expired")
	case err != nil:
		return errors.New("invalid token")
	case c.User == "":
		return errors.New("invalid token")
	}
	return nil
}

// encode writes v like the server's json.NewEncoder(w).Encode: a trailing
// newline and, unless set before, a sniffed Content-Type.
func encode(w http.ResponseWriter, v any) {
	if err := json.NewEncoder(w).Encode(v); err != nil {
		// Headers are gone by now; the client sees a truncated body.
		return
	}
}

// writeErr is the server's handleError: an APIError with a JSON content type.
// As observed on the real server, unknown things are not 404 but 500: an
// unknown VM has details "could not find VM with ID <id>", an unknown
// snapshot (or compareTo, or the disk route of an unknown snapshot) "not
// found".
func writeErr(w http.ResponseWriter, err error) {
	status, title := http.StatusInternalServerError, "Server error"
	details := err.Error()
	var nv vmNotFound
	switch {
	case errors.As(err, &nv):
		details = nv.Error()
	case errors.Is(err, errNotFound):
		details = "not found"
	case errors.Is(err, errNoReflink):
		status, title, details = http.StatusBadRequest, "Bad Request", "VM does not support reflink cloning"
	case errors.Is(err, errInvalid):
		status, title = http.StatusBadRequest, "Bad Request"
	case errors.Is(err, errConflict), errors.Is(err, errExists):
		status, title = http.StatusConflict, "Conflict"
	}
	w.Header().Add("Content-Type", "application/json")
	w.WriteHeader(status)
	encode(w, apiError{Error: title, Details: details})
}

func (v *vm) repoMount() string { return "/OVS/Repositories/" + v.repo }

func (v *vm) diskPath(name string) string { return path.Join(v.repoMount(), "VirtualDisks", name) }

func (v *vm) toAPI() apiVM {
	out := apiVM{
		FriendlyName:       v.spec.FriendlyName,
		Name:               v.spec.ID,
		UUID:               v.uuid,
		Disks:              []apiDisk{},
		SnapshotCompatible: true,
		Snapshots:          []string{},
	}
	for _, d := range v.disks {
		if d.spec.ISOTyped {
			out.SnapshotCompatible = false
		}
	}
	for _, d := range v.disks {
		mode, p := "w", v.diskPath(d.spec.Name)
		if d.spec.CDROM {
			mode, p = "r", path.Join(v.repoMount(), "ISOs", d.spec.Name)
		}
		out.Disks = append(out.Disks, apiDisk{
			Name: d.spec.Name, Path: p, DeviceName: d.spec.Device,
			SnapshotCompatible: !d.spec.ISOTyped, Mode: mode,
		})
	}
	for _, snap := range v.snapshots {
		out.Snapshots = append(out.Snapshots, snap.id)
	}
	return out
}

func (v *vm) snapshotPath(snapID, disk string) string {
	return path.Join(v.repoMount(), ".coriolis_snapshots", snapID, disk)
}

// snapshotAPI renders snap. With base, chunks are those not present
// identically in base (unsquashed comparison, then squashing), as the server
// does; squash merges logically contiguous chunks.
func (v *vm) snapshotAPI(snap, base *snapshot, squash bool) apiSnapshot {
	out := apiSnapshot{ID: snap.id, VMID: v.spec.ID, Disks: []apiDiskSnapshot{}}
	for _, d := range snap.disks {
		chunks := slices.Clone(d.chunks)
		if base != nil {
			if bd := base.disk(d.spec.Name); bd != nil {
				chunks = diffChunks(d.chunks, bd.chunks)
			}
		}
		if squash && !d.verbatim {
			chunks = squashChunks(chunks)
		}
		out.Disks = append(out.Disks, apiDiskSnapshot{
			ParentPath:     v.diskPath(d.spec.Name),
			Path:           v.snapshotPath(snap.id, d.spec.Name),
			SnapshotID:     snap.id,
			Chunks:         chunks,
			Name:           d.spec.Name,
			RepoMountpoint: v.repoMount(),
		})
	}
	return out
}

// lookupSnapshot is the server's getSnapshot: it finds the id among all VMs
// (not checking that vmID exists) and reports a snapshot of another VM as a
// conflict.
func (s *Server) lookupSnapshot(vmID, snapID string) (*vm, *snapshot, error) {
	if v := s.owners[snapID]; v != nil {
		if snap := v.snapshot(snapID); snap != nil {
			if v.spec.ID != vmID {
				return nil, nil, fmt.Errorf("%w: VM id missmatch", errConflict)
			}
			return v, snap, nil
		}
	}
	return nil, nil, fmt.Errorf("snapshot %q: %w", snapID, errNotFound)
}

// wait holds a request for d, as the real exporter takes that long to
// answer it; false: the client went away meanwhile.
func wait(r *http.Request, d time.Duration) bool {
	if d <= 0 {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-r.Context().Done():
		return false
	}
}

// waitScan holds a request that scans every VM and snapshot record scans
// times (Options.ScanCost).
func (s *Server) waitScan(r *http.Request, scans int) bool {
	if s.opts.ScanCost <= 0 {
		return true
	}
	s.mu.RLock()
	records := len(s.vms) + len(s.owners)
	vms := len(s.vms)
	s.mu.RUnlock()
	if scans < 0 { // the VM listing: every vm.cfg once, then a scan per VM
		records = vms + vms*len(s.owners)
	} else {
		records *= scans
	}
	return wait(r, time.Duration(records)*s.opts.ScanCost)
}

// waitChunks holds a request that decodes snaps' chunk lists
// (Options.ChunkListCost).
func (s *Server) waitChunks(r *http.Request, snaps ...*snapshot) bool {
	if s.opts.ChunkListCost <= 0 {
		return true
	}
	s.mu.RLock()
	chunks := 0
	for _, snap := range snaps {
		if snap != nil {
			for _, d := range snap.disks {
				chunks += len(d.chunks)
			}
		}
	}
	s.mu.RUnlock()
	return wait(r, time.Duration(chunks)*s.opts.ChunkListCost)
}

func (s *Server) getVMs(w http.ResponseWriter, r *http.Request) {
	if !s.waitScan(r, -1) {
		return
	}
	s.mu.RLock()
	out := make([]apiVM, 0, len(s.vms))
	for _, v := range s.vms {
		out = append(out, v.toAPI())
	}
	s.mu.RUnlock()
	encode(w, out)
}

func (s *Server) getVM(w http.ResponseWriter, r *http.Request, vmID string) {
	if !s.waitScan(r, 1) {
		return
	}
	s.mu.RLock()
	v := s.findVM(vmID)
	var out apiVM
	if v != nil {
		out = v.toAPI()
	}
	s.mu.RUnlock()
	if v == nil {
		writeErr(w, vmNotFound{vmID})
		return
	}
	encode(w, out)
}

// listSnapshots is the server's ListSnapshots: the VM (a scan), then each
// of its snapshots read as GET snapshot reads it.
func (s *Server) listSnapshots(w http.ResponseWriter, r *http.Request, vmID string) {
	if !s.waitScan(r, 1) {
		return
	}
	s.mu.RLock()
	v := s.findVM(vmID)
	var snaps []*snapshot
	if v != nil {
		snaps = slices.Clone(v.snapshots)
	}
	s.mu.RUnlock()
	if v == nil {
		writeErr(w, vmNotFound{vmID})
		return
	}
	if !s.waitChunks(r, snaps...) {
		return
	}
	s.mu.RLock()
	out := make([]apiSnapshot, 0, len(snaps))
	for _, snap := range v.snapshots {
		out = append(out, v.snapshotAPI(snap, nil, true))
	}
	s.mu.RUnlock()
	encode(w, out)
}

// createSnapshot answers with the chunks as recorded (unsquashed), which is
// what the server stores and returns on creation.
func (s *Server) createSnapshot(w http.ResponseWriter, vmID string) {
	snap, err := s.takeSnapshot(vmID)
	if err != nil {
		writeErr(w, err)
		return
	}
	s.mu.RLock()
	out := s.findVM(vmID).snapshotAPI(snap, nil, false)
	s.mu.RUnlock()
	encode(w, out)
}

func (s *Server) deleteAndReply(w http.ResponseWriter, vmID, snapID string) {
	if err := s.deleteSnapshots(vmID, snapID); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (s *Server) getSnapshot(w http.ResponseWriter, r *http.Request, rt route) {
	q := r.URL.Query()
	// Like the server: absent means true, unparsable means false.
	squash := true
	if raw := q.Get("squashChunks"); raw != "" {
		squash, _ = strconv.ParseBool(raw)
	}
	s.mu.RLock()
	_, snap, _ := s.lookupSnapshot(rt.vmID, rt.snapID)
	_, base, _ := s.lookupSnapshot(rt.vmID, q.Get("compareTo"))
	s.mu.RUnlock()
	if !s.waitChunks(r, snap, base) {
		return
	}
	out, err := s.renderSnapshot(rt.vmID, rt.snapID, q.Get("compareTo"), squash)
	if err != nil {
		writeErr(w, err)
		return
	}
	encode(w, out)
}

// renderSnapshot answers GET snapshot. An unknown snapshot or compareTo is
// 404, one of another VM 409, a compareTo not older than the snapshot 400.
func (s *Server) renderSnapshot(vmID, snapID, compareTo string, squash bool) (apiSnapshot, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	v, snap, err := s.lookupSnapshot(vmID, snapID)
	if err != nil {
		return apiSnapshot{}, err
	}
	var base *snapshot
	if compareTo != "" {
		if _, base, err = s.lookupSnapshot(vmID, compareTo); err != nil {
			return apiSnapshot{}, err
		}
		if base.seq >= snap.seq {
			return apiSnapshot{}, fmt.Errorf("%w: compareTo snapshot must be older than this snapshot", errInvalid)
		}
	}
	return v.snapshotAPI(snap, base, squash), nil
}

// countingWriter counts body bytes that reached the connection.
type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

// Write counts p before writing it, then takes back what was not written:
// a large Write reaches the client before it returns, and a client that
// reads its stats as soon as it has the body must find the bytes counted.
func (c countingWriter) Write(p []byte) (int, error) {
	c.n.Add(int64(len(p)))
	n, err := c.ResponseWriter.Write(p)
	c.n.Add(int64(n - len(p)))
	return n, err
}

func (c countingWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

func (s *Server) serveDisk(w http.ResponseWriter, r *http.Request, rt route) {
	s.diskRequests.Add(1)
	if r.Method == http.MethodHead {
		s.diskHeads.Add(1)
	}
	if !s.waitHold(r) {
		return
	}
	s.mu.RLock()
	v, snap, err := s.lookupSnapshot(rt.vmID, rt.snapID)
	var sd *snapDisk
	if err == nil {
		sd = snap.disk(rt.diskID)
	}
	var f *os.File
	var name string
	var chunks int
	if snap != nil {
		for _, d := range snap.disks {
			chunks += len(d.chunks)
		}
	}
	if sd != nil {
		name = v.snapshotPath(snap.id, sd.spec.Name)
		// Opened under the lock so a concurrent delete cannot race the open.
		f, err = os.Open(sd.path)
	}
	s.mu.RUnlock()
	switch {
	case err != nil && sd == nil:
		writeErr(w, err)
		return
	case sd == nil:
		// The server answers an unknown disk with a bare 404.
		w.WriteHeader(http.StatusNotFound)
		return
	case err != nil:
		s.log.Error("coriolis simulator open snapshot disk", "err", err)
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	defer f.Close()
	if !wait(r, time.Duration(chunks)*s.opts.ChunkListCost) {
		return
	}
	http.ServeContent(countingWriter{ResponseWriter: w, n: &s.diskBytes}, r, name, time.Time{}, f)
}
