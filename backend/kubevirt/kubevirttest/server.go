// Package kubevirttest simulates the part of the Kubernetes API that the
// kubevirt backend uses (VirtualMachines, VirtualMachineSnapshots,
// VirtualMachineExports, Secrets) and one KubeVirt export server per export,
// each over TLS with its own rotatable CA.
package kubevirttest

import (
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

const (
	exportGroup   = "export.kubevirt.io"
	snapshotGroup = "snapshot.kubevirt.io"
	vmGroup       = "kubevirt.io"
	apiToken      = "sim-api-token-0123456789"
)

// Options configure a simulator.
type Options struct {
	Dir        string        // where disk files live; required
	Namespace  string        // default "default"
	ReadyDelay time.Duration // how long snapshots and exports stay not ready
	// ExportVersion is the export.kubevirt.io version served ("v1beta1" default);
	// set "v1alpha1" to test the fallback.
	ExportVersion string
	// MapPageLimit caps extents per map page below the client's page_size,
	// to exercise paging with small disks; 0 = no cap.
	MapPageLimit int
	// Clock stamps the objects' creationTimestamp (default time.Now). The
	// API has seconds there, so snapshots taken within one second list by
	// name; a test that takes several in a second and needs them oldest
	// first gives a clock that never repeats a second.
	Clock func() time.Time
	// LauncherDelay is how long a backup export's map and data routes
	// answer 503 "Backup source (virt-launcher) not connected via tunnel"
	// after the export is created.
	LauncherDelay time.Duration
	// PodOnly makes each export server behave as the export pod itself
	// reached through kubectl port-forward: root paths only (no proxy
	// prefix is stripped) and a certificate for the service DNS names only
	// (virt-export-NAME.NS.svc…), no IP SANs.
	PodOnly bool
	// BackupAPI serves backup.kubevirt.io (VirtualMachineBackup and
	// VirtualMachineBackupTracker, KubeVirt v1.8+); off, those resources
	// are 404 as on an older cluster.
	BackupAPI bool
}

// VolumeSpec declares one disk of a VM.
type VolumeSpec struct {
	Name string
	Size int64
}

// Stats counts what the export servers served.
type Stats struct {
	Requests    int64 // export server requests, any route
	DiskBytes   int64 // raw and data-route bytes written
	MapQueries  int64
	DataQueries int64 // backup data-route requests
}

type vmState struct {
	obj     VirtualMachine
	volumes []VolumeSpec
}

type snapState struct {
	obj     VirtualMachineSnapshot
	created time.Time
	dir     string // immutable copies of the VM's volumes
}

type exportState struct {
	obj     VirtualMachineExport
	created time.Time
	srv     *exportServer
}

// Server is a running simulator.
type Server struct {
	opts        Options
	ln          net.Listener
	http        *http.Server
	caPEM       []byte
	mu          sync.Mutex
	vms         map[string]*vmState
	snaps       map[string]*snapState
	exports     map[string]*exportState
	secrets     map[string]*Secret
	backup      bool
	forced      map[string]string // export -> token the server expects instead of its secret's
	seq         int
	backups     map[string]*backupState
	lastBackup  map[string]string // vm -> its last backup (the checkpoint's)
	trackers    map[string]*VirtualMachineBackupTracker
	checkpoints map[string]*backupState // backup -> its data, kept after the backup is deleted

	requests, diskBytes, mapQueries, dataQueries atomic.Int64
}

// Start runs a simulator on loopback.
func Start(opts Options) (*Server, error) {
	if opts.Dir == "" {
		return nil, errors.New("kubevirttest: Options.Dir is required")
	}
	if opts.Namespace == "" {
		opts.Namespace = "default"
	}
	if opts.ExportVersion == "" {
		opts.ExportVersion = "v1beta1"
	}
	cert, caPEM, err := newCert("kube-apiserver CA")
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	s := &Server{opts: opts, ln: ln, caPEM: caPEM,
		vms: map[string]*vmState{}, snaps: map[string]*snapState{},
		exports: map[string]*exportState{}, secrets: map[string]*Secret{}, forced: map[string]string{},
		backups: map[string]*backupState{}, lastBackup: map[string]string{}, trackers: map[string]*VirtualMachineBackupTracker{}, checkpoints: map[string]*backupState{}}
	s.http = &http.Server{Handler: http.HandlerFunc(s.serveAPI), ErrorLog: log.New(io.Discard, "", 0), TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}
	go s.http.ServeTLS(ln, "", "") //nolint:errcheck // ends with Close
	return s, nil
}

// Close stops the API server and every export server.
func (s *Server) Close() error {
	s.mu.Lock()
	for _, e := range s.exports {
		e.srv.close()
	}
	s.mu.Unlock()
	return s.http.Close()
}

// URL is the API server's base URL.
func (s *Server) URL() string { return "https://" + s.ln.Addr().String() }

// Namespace is the simulated namespace.
func (s *Server) Namespace() string { return s.opts.Namespace }

// CAPEM is the API server's CA.
func (s *Server) CAPEM() []byte { return s.caPEM }

// Token is the API bearer token.
func (s *Server) Token() string { return apiToken }

// Kubeconfig is a kubeconfig for the API server with a bearer token and CA.
func (s *Server) Kubeconfig() []byte {
	return fmt.Appendf(s.ClusterKubeconfig("sim"), `users:
- name: sim
  user:
    token: %s
`, apiToken)
}

// ClusterKubeconfig is the cluster-and-context part of a kubeconfig for the
// API server: its CA, and a current context "sim" in the simulated
// namespace for user, whose credentials (a token, an exec plugin) the
// caller adds or keeps in another file of $KUBECONFIG.
func (s *Server) ClusterKubeconfig(user string) []byte {
	return fmt.Appendf(nil, `apiVersion: v1
kind: Config
current-context: sim
clusters:
- name: sim
  cluster:
    server: %s
    certificate-authority-data: %s
contexts:
- name: sim
  context:
    cluster: sim
    user: %s
    namespace: %s
`, s.URL(), base64.StdEncoding.EncodeToString(s.caPEM), user, s.opts.Namespace)
}

// SetBackupRoutes turns the backup map/data routes on or off for exports.
func (s *Server) SetBackupRoutes(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.backup = on
}

// Stats reports export server counters.
func (s *Server) Stats() Stats {
	return Stats{Requests: s.requests.Load(), DiskBytes: s.diskBytes.Load(), MapQueries: s.mapQueries.Load(), DataQueries: s.dataQueries.Load()}
}

func (s *Server) nextUID() string {
	s.seq++
	return fmt.Sprintf("uid-%06d", s.seq)
}

// now is a creationTimestamp: Options.Clock's time, to the second as the
// API server has it.
func (s *Server) now() string {
	clock := s.opts.Clock
	if clock == nil {
		clock = time.Now
	}
	return clock().UTC().Format(time.RFC3339)
}

func (s *Server) vmPath(vm, vol string) string {
	return filepath.Join(s.opts.Dir, "vms", vm, vol+".img")
}

// AddVM creates a VM with sparse zero volumes.
func (s *Server) AddVM(name string, volumes []VolumeSpec) error {
	if err := os.MkdirAll(filepath.Join(s.opts.Dir, "vms", name), 0o755); err != nil {
		return fmt.Errorf("add vm: %w", err)
	}
	vm := VirtualMachine{APIVersion: vmGroup + "/v1", Kind: "VirtualMachine"}
	for _, v := range volumes {
		f, err := os.Create(s.vmPath(name, v.Name))
		if err != nil {
			return fmt.Errorf("add vm: %w", err)
		}
		err = f.Truncate(v.Size)
		f.Close()
		if err != nil {
			return fmt.Errorf("add vm: %w", err)
		}
		vm.Spec.Template.Spec.Volumes = append(vm.Spec.Template.Spec.Volumes, VolumeRef{Name: v.Name})
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	vm.Metadata = ObjectMeta{Name: name, Namespace: s.opts.Namespace, UID: s.nextUID(), CreationTimestamp: s.now()}
	s.vms[name] = &vmState{obj: vm, volumes: volumes}
	return nil
}

// WriteDisk writes p into a VM's live volume at off (the argument order of
// every simulator's WriteDisk: where, then what).
func (s *Server) WriteDisk(vm, vol string, off int64, p []byte) error {
	f, err := os.OpenFile(s.vmPath(vm, vol), os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("write disk: %w", err)
	}
	defer f.Close()
	if _, err := f.WriteAt(p, off); err != nil {
		return fmt.Errorf("write disk: %w", err)
	}
	return nil
}

// SetSecretToken replaces the token in a Secret (token rotation).
func (s *Server) SetSecretToken(secret, token string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sec, ok := s.secrets[secret]; ok {
		sec.Data = map[string][]byte{"token": []byte(token)}
	}
}

// ForceExportToken makes an export server expect token regardless of its
// secret, so clients holding the secret's token are rejected.
func (s *Server) ForceExportToken(export, token string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.forced[export] = token
}

// RotateCert gives an export server a new certificate and CA; the status
// cert changes accordingly.
func (s *Server) RotateCert(export string) error {
	s.mu.Lock()
	e, ok := s.exports[export]
	s.mu.Unlock()
	if !ok || e.srv == nil {
		return fmt.Errorf("rotate cert: export %q not found", export)
	}
	return e.srv.rotate()
}

// CreateLiveExport creates a VirtualMachineExport of the VM itself.
func (s *Server) CreateLiveExport(name, vm, tokenSecret, token string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if tokenSecret != "" {
		s.secrets[tokenSecret] = &Secret{APIVersion: "v1", Kind: "Secret",
			Metadata: ObjectMeta{Name: tokenSecret, Namespace: s.opts.Namespace, UID: s.nextUID()},
			Data:     map[string][]byte{"token": []byte(token)}}
	}
	return s.exportSource(name, TypedRef{APIGroup: vmGroup, Kind: "VirtualMachine", Name: vm}, tokenSecret)
}

// exportSource creates a VirtualMachineExport named name of source, with
// the token secret tokenSecret ("" = a generated one). Caller holds mu.
func (s *Server) exportSource(name string, source TypedRef, tokenSecret string) error {
	var e VirtualMachineExport
	e.Metadata.Name = name
	e.Spec.Source = source
	e.Spec.TokenSecretRef = tokenSecret
	_, err := s.createExport(e)
	return err
}

// ExportToken returns the token of an export, for standalone-mode tests.
func (s *Server) ExportToken(export string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.exports[export]
	if !ok {
		return "", fmt.Errorf("export %q not found", export)
	}
	sec, ok := s.secrets[e.obj.Status.TokenSecretRef]
	if !ok {
		return "", fmt.Errorf("secret of export %q not found", export)
	}
	return string(sec.Data["token"]), nil
}

// ExportStatus returns the current status of an export as JSON.
func (s *Server) ExportStatus(export string) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.exports[export]
	if !ok {
		return nil, fmt.Errorf("export %q not found", export)
	}
	return json.Marshal(s.exportView(e).Status)
}

// createExport registers an export and starts its server. Caller holds mu.
func (s *Server) createExport(e VirtualMachineExport) (VirtualMachineExport, error) {
	name := e.Metadata.Name
	if _, dup := s.exports[name]; dup {
		return e, errExists
	}
	var files map[string]string
	var backup *backupState
	switch e.Spec.Source.Kind {
	case "VirtualMachine":
		vm, ok := s.vms[e.Spec.Source.Name]
		if !ok {
			return e, errNotFound
		}
		files = map[string]string{}
		for _, v := range vm.volumes {
			files[v.Name] = s.vmPath(vm.obj.Metadata.Name, v.Name)
		}
	case "VirtualMachineSnapshot":
		sn, ok := s.snaps[e.Spec.Source.Name]
		if !ok {
			return e, errNotFound
		}
		vm, ok := s.vms[sn.obj.Spec.Source.Name]
		if !ok {
			return e, errNotFound
		}
		files = map[string]string{}
		for _, v := range vm.volumes {
			files[v.Name] = filepath.Join(sn.dir, v.Name+".img")
		}
	case "VirtualMachineBackup":
		b, ok := s.backups[e.Spec.Source.Name]
		if !ok {
			return e, errNotFound
		}
		vm, ok := s.vms[b.vm]
		if !ok {
			return e, errNotFound
		}
		files = map[string]string{}
		for _, v := range vm.volumes {
			files[v.Name] = filepath.Join(b.dir, v.Name+".img")
		}
		backup = b
	default:
		return e, errInvalid
	}
	secret := e.Spec.TokenSecretRef
	if secret == "" {
		secret = "export-token-" + name
		s.secrets[secret] = &Secret{APIVersion: "v1", Kind: "Secret",
			Metadata: ObjectMeta{Name: secret, Namespace: s.opts.Namespace, UID: s.nextUID()},
			Data:     map[string][]byte{"token": []byte(randomToken())}}
	}
	srv, err := startExportServer(s, name, files, func() (string, bool) {
		s.mu.Lock()
		defer s.mu.Unlock()
		if tok, ok := s.forced[name]; ok {
			return tok, true
		}
		sec, ok := s.secrets[secret]
		if !ok {
			return "", false
		}
		return string(sec.Data["token"]), true
	})
	if err != nil {
		return e, err
	}
	srv.backup = backup
	e.APIVersion = exportGroup + "/" + s.opts.ExportVersion
	e.Kind = "VirtualMachineExport"
	e.Metadata.Namespace = s.opts.Namespace
	e.Metadata.UID = s.nextUID()
	e.Metadata.CreationTimestamp = s.now()
	e.Status = &ExportStatus{TokenSecretRef: secret, ServiceName: "virt-export-" + name}
	st := &exportState{obj: e, created: time.Now(), srv: srv}
	s.exports[name] = st
	return s.exportView(st), nil
}

func randomToken() string {
	const alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	b := make([]byte, 20)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = alnum[int(b[i])%len(alnum)]
	}
	return string(b)
}

// exportView is the export as a client sees it now: Ready with links once
// ReadyDelay has passed. Caller holds mu.
func (s *Server) exportView(e *exportState) VirtualMachineExport {
	out := e.obj
	st := *e.obj.Status
	out.Status = &st
	if time.Since(e.created) < s.opts.ReadyDelay {
		st.Phase = "Pending"
		return out
	}
	st.Phase = "Ready"
	cert := string(e.srv.certPEM())
	base := e.srv.url()
	external := fmt.Sprintf("%s/api/%s/%s/namespaces/%s/virtualmachineexports/%s", base, exportGroup, s.opts.ExportVersion, s.opts.Namespace, e.obj.Metadata.Name)
	mk := func(prefix string) *ExportLink {
		l := &ExportLink{Cert: cert}
		for _, name := range e.srv.volumeNames() {
			if e.srv.backup != nil {
				// A backup export: backups only, named after the VM's volumes.
				l.Backups = append(l.Backups, Backup{Name: name, Endpoints: []Endpoint{
					{Endpoint: "map", URL: prefix + "/exports/" + name + "/map"},
					{Endpoint: "data", URL: prefix + "/exports/" + name + "/data"},
				}})
				continue
			}
			l.Volumes = append(l.Volumes, Volume{Name: name, Formats: []Format{
				{Format: "raw", URL: prefix + "/volumes/" + name + "/disk.img"},
				{Format: "gzip", URL: prefix + "/volumes/" + name + "/disk.img.gz"},
			}})
			if s.backup {
				l.Backups = append(l.Backups, Backup{Name: name, Endpoints: []Endpoint{
					{Endpoint: "map", URL: prefix + "/exports/" + name + "/map"},
					{Endpoint: "data", URL: prefix + "/exports/" + name + "/data"},
				}})
			}
		}
		return l
	}
	st.Links = &struct {
		Internal *ExportLink `json:"internal,omitempty"`
		External *ExportLink `json:"external,omitempty"`
	}{Internal: mk(base), External: mk(external)}
	return out
}

// takeSnapshot copies the VM's volumes sparsely so the snapshot is immutable.
func (s *Server) takeSnapshot(vm *vmState, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, v := range vm.volumes {
		if err := sparseCopy(s.vmPath(vm.obj.Metadata.Name, v.Name), filepath.Join(dir, v.Name+".img")); err != nil {
			return err
		}
	}
	return nil
}

func sparseCopy(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(fi.Size()); err != nil {
		return err
	}
	buf := make([]byte, chunk)
	for off := int64(0); off < fi.Size(); off += chunk {
		if data := dataFrom(in, off, fi.Size()); data >= off+chunk {
			// Chunks wholly in a hole read as zeros: skip them unread.
			off = data/chunk*chunk - chunk
			continue
		}
		n, err := in.ReadAt(buf, off)
		if err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		if !allZero(buf[:n]) {
			if _, err := out.WriteAt(buf[:n], off); err != nil {
				return err
			}
		}
	}
	return nil
}

const chunk = 64 << 10

// dataFrom is where the file's data starts at or after off (size when only
// a hole follows), so the holes of a sparse volume are skipped without being
// read; off itself when the file system cannot tell.
func dataFrom(f *os.File, off, size int64) int64 {
	data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO):
		return size
	case err != nil:
		return off
	}
	return data
}

func allZero(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func tokenEqual(a, b string) bool { return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1 }
