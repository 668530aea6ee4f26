// Package kubevirt is a backend for KubeVirt: VirtualMachineSnapshots exposed
// through VirtualMachineExports, read with Range GETs on the export server.
package kubevirt

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
	"github.com/vmexportfs/vmexportfs/backend/redact"
)

// LiveSnapshot is the snapshot id of an export of the VM itself.
const LiveSnapshot = "live"

// Config configures a Source that uses the Kubernetes API.
type Config struct {
	APIServer string // from the source URL; overrides the kubeconfig's server when set
	Namespace string
	// Kubeconfig is a path ("" = $KUBECONFIG, then ~/.kube/config); ignored
	// when Credentials is set.
	Kubeconfig   string
	Credentials  *Credentials
	Internal     bool          // use the export's internal links
	ReadyTimeout time.Duration // mkdir's wait for Ready; default 2 min
	PollInterval time.Duration // default 1 s
	// BackupConnectTimeout bounds the wait for a backup export's map to stop
	// answering 503 (virt-launcher not connected); default
	// DefaultBackupConnectTimeout.
	BackupConnectTimeout time.Duration
	// TLSServerName, when set, is the name export servers' certificates are
	// verified against (a port-forwarded pod has service DNS names only).
	TLSServerName string
	Policy        httprange.Policy
	Logger        *slog.Logger
	HTTP          *http.Client    // API server client override
	Secrets       *redact.Secrets // API and export tokens are added to it
}

// Source implements backend.Source, SnapshotCreator and SnapshotDeleter.
type Source struct {
	cfg    Config
	api    *httprange.Client
	server string
	logger *slog.Logger

	mu       sync.Mutex
	versions map[string]string // group -> version that answered
}

var (
	_ backend.Source          = (*Source)(nil)
	_ backend.SnapshotCreator = (*Source)(nil)
	_ backend.SnapshotDeleter = (*Source)(nil)
)

// bearer sends the API token; one from an exec credential plugin is
// fetched again by running the plugin when the API server refuses it
// (expired).
type bearer struct {
	mu      sync.Mutex
	token   string
	cred    *Credentials
	secrets *redact.Secrets
}

func (b *bearer) Authorize(_ context.Context, r *http.Request) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.token != "" {
		r.Header.Set("Authorization", "Bearer "+b.token)
	}
	return nil
}

func (b *bearer) Renew(ctx context.Context) error {
	if b.cred == nil || b.cred.exec == nil {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.cred.runExec(ctx); err != nil {
		return err
	}
	b.secrets.AddRenewed(b.cred.Token)
	b.token = b.cred.Token
	return nil
}

// New builds a Source; it does not contact the API server.
func New(cfg Config) (*Source, error) {
	if cfg.Namespace == "" {
		return nil, fmt.Errorf("kubevirt: %w: namespace is required", backend.ErrInvalid)
	}
	cred := cfg.Credentials
	if cred == nil {
		c, err := LoadKubeconfig(cfg.Kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("kubevirt: %w", err)
		}
		cred = &c
	}
	server := cfg.APIServer
	if server == "" {
		server = cred.Server
	}
	server = strings.TrimRight(server, "/")
	if cfg.ReadyTimeout <= 0 {
		cfg.ReadyTimeout = 2 * time.Minute
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = time.Second
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	cfg.Logger = logger
	if cfg.Secrets == nil {
		cfg.Secrets = &redact.Secrets{}
	}
	cfg.Secrets.Add(cred.Token)
	hc := cfg.HTTP
	if hc == nil {
		tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: cred.Insecure} //nolint:gosec // the user's kubeconfig asked for it
		if len(cred.CAPEM) > 0 {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(cred.CAPEM) {
				return nil, fmt.Errorf("kubevirt: %w: kubeconfig CA holds no PEM certificate", backend.ErrInvalid)
			}
			tlsCfg.RootCAs = pool
		}
		if len(cred.CertPEM) > 0 {
			cert, err := tls.X509KeyPair(cred.CertPEM, cred.KeyPEM)
			if err != nil {
				return nil, fmt.Errorf("kubevirt: client certificate: %w", err)
			}
			tlsCfg.Certificates = []tls.Certificate{cert}
		}
		hc = &http.Client{Transport: httprange.NewTransport(tlsCfg, cfg.Policy.Meter)}
	}
	return &Source{
		cfg:    cfg,
		server: server,
		logger: logger,
		api: &httprange.Client{HTTP: hc, Auth: &bearer{token: cred.Token, cred: cred, secrets: cfg.Secrets}, Policy: cfg.Policy, Logger: logger, Secrets: cfg.Secrets,
			TrustAdvice: "the kubeconfig's certificate-authority must be the API server's CA"},
		versions: map[string]string{},
	}, nil
}

// preferred versions first; v1alpha1 is the fallback for older clusters.
var groupVersions = map[string][]string{
	"kubevirt.io":          {"v1"},
	"snapshot.kubevirt.io": {"v1beta1", "v1alpha1"},
	"export.kubevirt.io":   {"v1beta1", "v1", "v1alpha1"},
	"backup.kubevirt.io":   {"v1alpha1", "v1beta1", "v1"},
}

func (s *Source) resourcePath(group, version, resource, name string) string {
	p := fmt.Sprintf("%s/apis/%s/%s/namespaces/%s/%s", s.server, group, version, s.cfg.Namespace, resource)
	if group == "" {
		p = fmt.Sprintf("%s/api/v1/namespaces/%s/%s", s.server, s.cfg.Namespace, resource)
	}
	if name != "" {
		p += "/" + name
	}
	return p
}

func (s *Source) call(ctx context.Context, method, url string, in, out any) error {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return fmt.Errorf("encode: %w", err)
		}
	}
	resp, err := s.api.Do(ctx, func(ctx context.Context) (*http.Request, error) {
		req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
		if err != nil {
			return nil, err
		}
		req.Header.Set("Accept", "application/json")
		if in != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		return req, nil
	})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(out); err != nil {
		return fmt.Errorf("%s %s: decode: %w: %w", method, url, backend.ErrUnavailable, err)
	}
	return nil
}

// kube calls a namespaced resource, finding (once) which version of its group
// the cluster serves.
func (s *Source) kube(ctx context.Context, method, group, resource, name string, in, out any) error {
	if group == "" {
		return s.call(ctx, method, s.resourcePath("", "v1", resource, name), in, out)
	}
	s.mu.Lock()
	known := s.versions[group]
	s.mu.Unlock()
	if known != "" {
		return s.call(ctx, method, s.resourcePath(group, known, resource, name), withAPIVersion(in, group, known), out)
	}
	var err error
	for _, v := range groupVersions[group] {
		// Probe with a list: a 404 there means the version is not served,
		// not that an object is missing.
		err = s.call(ctx, http.MethodGet, s.resourcePath(group, v, resource, ""), nil, nil)
		if errors.Is(err, backend.ErrNotFound) {
			continue
		}
		if err != nil {
			return err
		}
		s.mu.Lock()
		s.versions[group] = v
		s.mu.Unlock()
		if v != groupVersions[group][0] {
			s.logger.Info("kubevirt: using fallback API version", "group", group, "version", v)
		}
		return s.call(ctx, method, s.resourcePath(group, v, resource, name), withAPIVersion(in, group, v), out)
	}
	return fmt.Errorf("%s %s: no served version: %w", group, resource, err)
}

func withAPIVersion(in any, group, version string) any {
	if m, ok := in.(map[string]any); ok {
		m["apiVersion"] = group + "/" + version
	}
	return in
}

type objectMeta struct {
	Name              string    `json:"name"`
	UID               string    `json:"uid"`
	CreationTimestamp time.Time `json:"creationTimestamp"`
}

type typedRef struct {
	APIGroup string `json:"apiGroup"`
	Kind     string `json:"kind"`
	Name     string `json:"name"`
}

type vmObject struct {
	Metadata objectMeta `json:"metadata"`
	Spec     struct {
		Template struct {
			Spec struct {
				Volumes []struct {
					Name string `json:"name"`
				} `json:"volumes"`
			} `json:"spec"`
		} `json:"template"`
	} `json:"spec"`
}

type snapshotObject struct {
	Metadata objectMeta `json:"metadata"`
	Spec     struct {
		Source typedRef `json:"source"`
	} `json:"spec"`
	Status *struct {
		ReadyToUse bool `json:"readyToUse"`
	} `json:"status"`
}

type exportObject struct {
	Metadata objectMeta `json:"metadata"`
	Spec     struct {
		Source         typedRef `json:"source"`
		TokenSecretRef string   `json:"tokenSecretRef"`
	} `json:"spec"`
	Status *ExportStatus `json:"status"`
}

type secretObject struct {
	Data map[string][]byte `json:"data"`
}

// VMs lists the namespace's VirtualMachines.
func (s *Source) VMs(ctx context.Context) ([]backend.VM, error) {
	var l struct{ Items []vmObject }
	if err := s.kube(ctx, http.MethodGet, "kubevirt.io", "virtualmachines", "", nil, &l); err != nil {
		return nil, fmt.Errorf("list vms: %w", err)
	}
	vms := make([]backend.VM, 0, len(l.Items))
	for _, it := range l.Items {
		vm := backend.VM{ID: it.Metadata.Name, Name: it.Metadata.Name}
		for _, v := range it.Spec.Template.Spec.Volumes {
			vm.Disks = append(vm.Disks, backend.DiskInfo{ID: v.Name, Device: v.Name})
		}
		vms = append(vms, vm)
	}
	return vms, nil
}

func (s *Source) listExports(ctx context.Context) ([]exportObject, error) {
	var l struct{ Items []exportObject }
	if err := s.kube(ctx, http.MethodGet, "export.kubevirt.io", "virtualmachineexports", "", nil, &l); err != nil {
		return nil, fmt.Errorf("list exports: %w", err)
	}
	return l.Items, nil
}

func disksOf(st *ExportStatus, internal bool) ([]backend.DiskInfo, bool) {
	if st == nil {
		return nil, false
	}
	link, err := st.link(internal)
	if err != nil {
		return nil, false
	}
	var disks []backend.DiskInfo
	for _, n := range link.volumeNames() {
		disks = append(disks, backend.DiskInfo{ID: n, Device: n})
	}
	return disks, true
}

// Snapshots lists the VM's snapshots that have a Ready export, oldest first,
// then "live" when the VM itself is exported.
func (s *Source) Snapshots(ctx context.Context, vmID string) ([]backend.Snapshot, error) {
	if err := s.vmExists(ctx, vmID); err != nil {
		return nil, fmt.Errorf("list snapshots of %s: %w", vmID, err)
	}
	var l struct{ Items []snapshotObject }
	if err := s.kube(ctx, http.MethodGet, "snapshot.kubevirt.io", "virtualmachinesnapshots", "", nil, &l); err != nil {
		return nil, fmt.Errorf("list snapshots of %s: %w", vmID, err)
	}
	exports, err := s.listExports(ctx)
	if err != nil {
		return nil, fmt.Errorf("list snapshots of %s: %w", vmID, err)
	}
	var out []backend.Snapshot
	for _, sn := range l.Items {
		if sn.Spec.Source.Kind != "VirtualMachine" || sn.Spec.Source.Name != vmID {
			continue
		}
		for _, e := range exports {
			if e.Spec.Source.Kind == "VirtualMachineSnapshot" && e.Spec.Source.Name == sn.Metadata.Name {
				if disks, ok := disksOf(e.Status, s.cfg.Internal); ok {
					out = append(out, backend.Snapshot{ID: sn.Metadata.Name, Name: sn.Metadata.Name, Created: sn.Metadata.CreationTimestamp, Disks: disks})
					break
				}
			}
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		if !out[i].Created.Equal(out[j].Created) {
			return out[i].Created.Before(out[j].Created)
		}
		return out[i].ID < out[j].ID
	})
	out = append(out, s.backupSnapshots(ctx, vmID, exports)...)
	sort.SliceStable(out, func(i, j int) bool {
		if !out[i].Created.Equal(out[j].Created) {
			return out[i].Created.Before(out[j].Created)
		}
		return out[i].ID < out[j].ID
	})
	for _, e := range exports {
		if e.Spec.Source.Kind == "VirtualMachine" && e.Spec.Source.Name == vmID {
			if disks, ok := disksOf(e.Status, s.cfg.Internal); ok {
				out = append(out, backend.Snapshot{ID: LiveSnapshot, Name: LiveSnapshot, Disks: disks})
				break
			}
		}
	}
	return out, nil
}

// findExport is the Ready export serving a snapshot (or the VM for "live").
func (s *Source) findExport(ctx context.Context, vmID, snapshotID string) (exportObject, error) {
	isBackup := false
	if err := s.snapshotOf(ctx, vmID, snapshotID); err != nil {
		if !errors.Is(err, backend.ErrNotFound) || s.backupOf(ctx, vmID, snapshotID) != nil {
			return exportObject{}, err
		}
		isBackup = true
	}
	exports, err := s.listExports(ctx)
	if err != nil {
		return exportObject{}, err
	}
	for _, e := range exports {
		src := e.Spec.Source
		live := snapshotID == LiveSnapshot && src.Kind == "VirtualMachine" && src.Name == vmID
		snap := !isBackup && src.Kind == "VirtualMachineSnapshot" && src.Name == snapshotID
		bak := isBackup && src.Kind == "VirtualMachineBackup" && src.Name == snapshotID
		if (live || snap || bak) && e.Status != nil {
			if _, ok := disksOf(e.Status, s.cfg.Internal); ok {
				return e, nil
			}
		}
	}
	return exportObject{}, fmt.Errorf("export of %s/%s: %w", vmID, snapshotID, backend.ErrNotFound)
}

// OpenDisk opens one volume of the snapshot's export.
func (s *Source) OpenDisk(ctx context.Context, ref backend.DiskRef) (backend.Disk, error) {
	e, err := s.findExport(ctx, ref.VM, ref.Snapshot)
	if err != nil {
		return nil, fmt.Errorf("open disk: %w", err)
	}
	name := e.Metadata.Name
	conn := &exportConn{
		name: name, internal: s.cfg.Internal, logger: s.logger, policy: s.cfg.Policy, secrets: s.cfg.Secrets,
		connectWait: s.cfg.BackupConnectTimeout, serverName: s.cfg.TLSServerName,
		status: func(ctx context.Context) (ExportStatus, error) {
			var cur exportObject
			if err := s.kube(ctx, http.MethodGet, "export.kubevirt.io", "virtualmachineexports", name, nil, &cur); err != nil {
				return ExportStatus{}, err
			}
			if cur.Status == nil {
				return ExportStatus{}, fmt.Errorf("export %s has no status: %w", name, errNotReady)
			}
			return *cur.Status, nil
		},
		token: func(ctx context.Context) (string, error) {
			secret := e.Status.TokenSecretRef
			if secret == "" {
				secret = e.Spec.TokenSecretRef
			}
			var sec secretObject
			if err := s.kube(ctx, http.MethodGet, "", "secrets", secret, nil, &sec); err != nil {
				return "", err
			}
			tok := sec.Data["token"]
			if len(tok) == 0 {
				return "", fmt.Errorf("secret %s: %w: no token key", secret, backend.ErrPermission)
			}
			return string(tok), nil
		},
	}
	if err := newExportConn(ctx, conn, *e.Status); err != nil {
		return nil, fmt.Errorf("open disk: %w", err)
	}
	d, err := openExportDisk(ctx, conn, *e.Status, ref.Disk, true)
	if err != nil {
		conn.closeIdle()
		return nil, err
	}
	return d, nil
}

// Close drops the API client's kept-alive connections; each disk closes its
// export's.
func (s *Source) Close() error {
	if s.api.HTTP != nil {
		s.api.HTTP.CloseIdleConnections()
	}
	return nil
}
