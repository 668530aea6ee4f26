package kubevirt_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/backendtest"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
	"github.com/vmexportfs/vmexportfs/backend/kubevirt"
	"github.com/vmexportfs/vmexportfs/backend/kubevirt/kubevirttest"
)

// mapChunk is the simulator's backup map granularity: it reports data or
// hole per 64 KiB of content.
const mapChunk = 64 << 10

// TestConformance runs the backend contract suite against the simulator, in
// API mode with and without the backup map routes, and in standalone mode
// (one export, no API access), and on a cluster with VirtualMachineBackup.
// Only an incremental backup against the backup before it compares exactly;
// every other pair is ErrUnsupported, which the Delta check accepts there.
func TestConformance(t *testing.T) {
	for _, tc := range []struct {
		name       string
		maps       bool
		standalone bool
		caps       backendtest.Capabilities
	}{
		{"api/backup-map", true, false, backendtest.Capabilities{Granularity: mapChunk}},
		{"api/no-map", false, false, backendtest.Capabilities{NoAllocationMap: true}},
		{"standalone", true, true, backendtest.Capabilities{Granularity: mapChunk, OneSnapshot: true}},
		// A cluster with VirtualMachineBackup: snapshots are backups (full,
		// then incremental), read through the data route; consecutive ones
		// compare exactly.
		{"api/backups", false, false, backendtest.Capabilities{Granularity: mapChunk, Delta: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			backendtest.Run(t, backendtest.Harness{
				New: func(t *testing.T) backendtest.Platform {
					if tc.name == "api/backups" {
						return newPlatformWith(t, kubevirttest.Options{BackupAPI: true}, false, false)
					}
					return newPlatform(t, tc.maps, tc.standalone)
				},
				Capabilities: tc.caps,
			})
		})
	}
}

// platform is the simulator in the suite's words. Snapshots are taken the
// way KubeVirt users take them, through the API (a VirtualMachineSnapshot
// and its export), by an admin client that is not the Source under test.
type platform struct {
	sim        *kubevirttest.Server
	cfg        kubevirt.Config
	admin      *kubevirt.Source
	standalone bool
	dir        string
	n          int
	lastVM     string // the VM and snapshot of the last Snapshot, the export a standalone Source reads
	lastSnap   string
}

func newPlatform(t *testing.T, maps, standalone bool) *platform {
	return newPlatformWith(t, kubevirttest.Options{}, maps, standalone)
}

func newPlatformWith(t *testing.T, opts kubevirttest.Options, maps, standalone bool) *platform {
	opts.Dir = t.TempDir()
	sim, err := kubevirttest.Start(opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = sim.Close() })
	sim.SetBackupRoutes(maps)
	cred, err := kubevirt.ParseKubeconfig(sim.Kubeconfig(), t.TempDir())
	require.NoError(t, err)
	cfg := kubevirt.Config{
		Credentials:  &cred,
		Namespace:    sim.Namespace(),
		PollInterval: 5 * time.Millisecond,
		ReadyTimeout: 30 * time.Second,
		Policy:       httprange.Policy{Attempts: 2, BaseDelay: time.Millisecond, MaxDelay: 5 * time.Millisecond, AttemptTimeout: 10 * time.Second},
	}
	admin, err := kubevirt.New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = admin.Close() })
	return &platform{sim: sim, cfg: cfg, admin: admin, standalone: standalone, dir: t.TempDir()}
}

func (p *platform) AddVM(t testing.TB, vm string, disks ...backendtest.DiskSpec) {
	var vols []kubevirttest.VolumeSpec
	for _, d := range disks {
		vols = append(vols, kubevirttest.VolumeSpec{Name: d.Name, Size: d.Size})
	}
	require.NoError(t, p.sim.AddVM(vm, vols))
}

func (p *platform) Write(t testing.TB, vm, disk string, off int64, data []byte) {
	require.NoError(t, p.sim.WriteDisk(vm, disk, off, data))
}

// Discard writes zeros: the simulator's snapshots and backup maps go by
// content (an all-zero 64 KiB chunk is a hole), so to a client a discarded
// range and a zeroed one are the same.
func (p *platform) Discard(t testing.TB, vm, disk string, off, n int64) {
	require.NoError(t, p.sim.WriteDisk(vm, disk, off, make([]byte, n)))
}

func (p *platform) Snapshot(t testing.TB, vm string) string {
	p.n++
	// Zero-padded, so snapshots made within one second (creationTimestamp
	// has seconds) still list oldest first: the tie is broken by name.
	name := fmt.Sprintf("snap-%03d", p.n)
	sn, err := p.admin.CreateSnapshot(context.Background(), vm, name)
	require.NoError(t, err)
	p.lastVM, p.lastSnap = vm, sn.ID
	return sn.ID
}

func (p *platform) Source(t testing.TB) backend.Source {
	if !p.standalone {
		s, err := kubevirt.New(p.cfg)
		require.NoError(t, err)
		return s
	}
	// Standalone: what a user without API access is given, the export's
	// token and its status (kubectl get vmexport -o json), which names the
	// VM as a real export's status does.
	require.NotEmpty(t, p.lastSnap, "standalone needs a snapshot")
	raw, err := p.sim.ExportStatus(p.lastSnap)
	require.NoError(t, err)
	var status map[string]any
	require.NoError(t, json.Unmarshal(raw, &status))
	status["virtualMachineName"] = p.lastVM
	withVM, err := json.Marshal(status)
	require.NoError(t, err)
	var st kubevirttest.ExportStatus
	require.NoError(t, json.Unmarshal(raw, &st))
	require.NotNil(t, st.Links)
	require.NotEmpty(t, st.Links.External.Volumes)
	link := st.Links.External.Volumes[0].Formats[0].URL
	exportURL := link[:strings.Index(link, "/volumes/")]
	tok, err := p.sim.ExportToken(p.lastSnap)
	require.NoError(t, err)
	p.n++
	statusFile := filepath.Join(p.dir, fmt.Sprintf("status-%d.json", p.n))
	tokenFile := filepath.Join(p.dir, fmt.Sprintf("token-%d", p.n))
	require.NoError(t, os.WriteFile(statusFile, withVM, 0o600))
	require.NoError(t, os.WriteFile(tokenFile, []byte(tok+"\n"), 0o600))
	s, err := kubevirt.NewStandalone(kubevirt.StandaloneConfig{
		ExportURL: "kubevirt+" + exportURL, TokenFile: tokenFile, ExportStatusFile: statusFile, Policy: p.cfg.Policy,
	})
	require.NoError(t, err)
	return s
}

func (p *platform) OpenResources() int { return p.sim.ExportConns() }
