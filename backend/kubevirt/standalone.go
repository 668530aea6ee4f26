package kubevirt

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
	"github.com/vmexportfs/vmexportfs/backend/redact"
)

// StandaloneConfig configures a Source for one export, for users without API
// access. The token always comes from TokenFile (a status never holds it);
// the links and cert come from ExportStatusFile, or else are built from
// ExportURL, CAFile and Volumes.
type StandaloneConfig struct {
	ExportURL        string // https://…/virtualmachineexports/<export>
	TokenFile        string
	CAFile           string
	ExportStatusFile string   // kubectl get vmexport -o yaml|json, or just its status
	Volumes          []string // volume names, needed without ExportStatusFile
	Internal         bool
	// BackupConnectTimeout bounds the wait for a backup map's 503; 0 =
	// DefaultBackupConnectTimeout.
	BackupConnectTimeout time.Duration
	// TLSServerName, when set, is the name the export server's certificate
	// is verified against (kubectl port-forward to the pod).
	TLSServerName string
	Policy        httprange.Policy
	Logger        *slog.Logger
	Secrets       *redact.Secrets // the token is added to it
}

// Standalone is a read-only Source over one export: one VM (the export's VM,
// or the export's name) with one snapshot named after the export.
type Standalone struct {
	cfg    StandaloneConfig
	export string
	logger *slog.Logger

	mu   sync.Mutex
	conn *exportConn // one per mount, so it remembers that the server took the token
}

var _ backend.Source = (*Standalone)(nil)

// NewStandalone checks the configuration and reads the status once.
func NewStandalone(cfg StandaloneConfig) (*Standalone, error) {
	u, err := ParseSourceURL(cfg.ExportURL)
	if err != nil || !u.Standalone() {
		return nil, fmt.Errorf("kubevirt standalone: %w: export URL must end in /virtualmachineexports/NAME", backend.ErrInvalid)
	}
	cfg.ExportURL = u.ExportURL
	if cfg.TokenFile == "" {
		return nil, fmt.Errorf("kubevirt standalone: %w: a token file is required", backend.ErrInvalid)
	}
	if cfg.ExportStatusFile == "" && (cfg.CAFile == "" || len(cfg.Volumes) == 0) {
		return nil, fmt.Errorf("kubevirt standalone: %w: give an export status file, or a CA file and volume names", backend.ErrInvalid)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Secrets == nil {
		cfg.Secrets = &redact.Secrets{}
	}
	s := &Standalone{cfg: cfg, export: u.Export, logger: cfg.Logger}
	if _, err := s.status(context.Background()); err != nil {
		return nil, err
	}
	return s, nil
}

// status re-reads the files every time, so a refreshed status (new cert)
// is picked up without a remount.
func (s *Standalone) status(context.Context) (ExportStatus, error) {
	if s.cfg.ExportStatusFile != "" {
		data, err := os.ReadFile(s.cfg.ExportStatusFile)
		if err != nil {
			return ExportStatus{}, fmt.Errorf("read export status: %w", err)
		}
		return ParseExportStatus(data)
	}
	ca, err := os.ReadFile(s.cfg.CAFile)
	if err != nil {
		return ExportStatus{}, fmt.Errorf("read export CA: %w", err)
	}
	link := &exportLink{Cert: string(ca)}
	for _, v := range s.cfg.Volumes {
		vol := exportVolume{Name: v}
		vol.Formats = append(vol.Formats, struct {
			Format string `json:"format" yaml:"format"`
			URL    string `json:"url" yaml:"url"`
		}{Format: "raw", URL: strings.TrimRight(s.cfg.ExportURL, "/") + "/volumes/" + v + "/disk.img"})
		link.Volumes = append(link.Volumes, vol)
	}
	return ExportStatus{Phase: "Ready", Links: &exportLinks{External: link, Internal: link}}, nil
}

func (s *Standalone) token(context.Context) (string, error) {
	data, err := os.ReadFile(s.cfg.TokenFile)
	if err != nil {
		return "", fmt.Errorf("read token file: %w", err)
	}
	tok := strings.TrimSpace(string(data))
	if tok == "" {
		return "", fmt.Errorf("token file: %w: empty", backend.ErrPermission)
	}
	return tok, nil
}

func (s *Standalone) vmID(st ExportStatus) string {
	if st.VMName != "" {
		return st.VMName
	}
	return s.export
}

// VMs lists the export's one VM.
func (s *Standalone) VMs(ctx context.Context) ([]backend.VM, error) {
	st, err := s.status(ctx)
	if err != nil {
		return nil, err
	}
	disks, ok := disksOf(&st, s.cfg.Internal)
	if !ok {
		return nil, fmt.Errorf("export %s: %w", s.export, errNotReady)
	}
	return []backend.VM{{ID: s.vmID(st), Name: s.vmID(st), Disks: disks}}, nil
}

// Snapshots lists the export itself as the only snapshot.
func (s *Standalone) Snapshots(ctx context.Context, vmID string) ([]backend.Snapshot, error) {
	st, err := s.status(ctx)
	if err != nil {
		return nil, err
	}
	if vmID != s.vmID(st) {
		return nil, fmt.Errorf("snapshots of %s: %w", vmID, backend.ErrNotFound)
	}
	disks, ok := disksOf(&st, s.cfg.Internal)
	if !ok {
		return nil, fmt.Errorf("export %s: %w", s.export, errNotReady)
	}
	return []backend.Snapshot{{ID: s.export, Name: s.export, Disks: disks}}, nil
}

// OpenDisk opens one volume of the export.
func (s *Standalone) OpenDisk(ctx context.Context, ref backend.DiskRef) (backend.Disk, error) {
	st, err := s.status(ctx)
	if err != nil {
		return nil, fmt.Errorf("open disk: %w", err)
	}
	if ref.VM != s.vmID(st) || ref.Snapshot != s.export {
		return nil, fmt.Errorf("open disk %s/%s: %w", ref.VM, ref.Snapshot, backend.ErrNotFound)
	}
	conn, err := s.connection(ctx, st)
	if err != nil {
		return nil, fmt.Errorf("open disk: %w", err)
	}
	// The connection is the mount's: it outlives the disk.
	return openExportDisk(ctx, conn, st, ref.Disk, false)
}

// Close drops the export connection's kept-alive sockets.
func (s *Standalone) Close() error {
	s.mu.Lock()
	conn := s.conn
	s.mu.Unlock()
	if conn != nil {
		conn.closeIdle()
	}
	return nil
}

func (s *Standalone) connection(ctx context.Context, st ExportStatus) (*exportConn, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil {
		return s.conn, nil
	}
	conn := &exportConn{name: s.export, internal: s.cfg.Internal, status: s.status, token: s.token, logger: s.logger, policy: s.cfg.Policy, secrets: s.cfg.Secrets, connectWait: s.cfg.BackupConnectTimeout,
		serverName: s.cfg.TLSServerName, rootFallback: s.cfg.ExportStatusFile == "",
		trustAdvice: "pass --export-status or --ca-file with the export's certificate"}
	if err := newExportConn(ctx, conn, st); err != nil {
		return nil, err
	}
	s.conn = conn
	return conn, nil
}
