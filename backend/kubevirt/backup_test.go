package kubevirt

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/kubevirt/kubevirttest"
)

// readAll reads a disk in 64 KiB pieces, as the fs would.
func readAll(t *testing.T, d backend.Disk) []byte {
	t.Helper()
	out := make([]byte, d.Size())
	for off := int64(0); off < d.Size(); off += 64 << 10 {
		n := min(64<<10, d.Size()-off)
		require.NoError(t, d.ReadAt(context.Background(), out[off:off+n], off))
	}
	return out
}

// standaloneFor writes an export's status and token to files and opens a
// Standalone over it, as a user with `kubectl get vmexport -o yaml` would.
func standaloneFor(t *testing.T, e *env, export string, cfg StandaloneConfig) *Standalone {
	t.Helper()
	statusJSON, err := e.sim.ExportStatus(export)
	require.NoError(t, err)
	tok, err := e.sim.ExportToken(export)
	require.NoError(t, err)
	dir := t.TempDir()
	if cfg.TokenFile == "" {
		cfg.TokenFile = filepath.Join(dir, "token")
		require.NoError(t, os.WriteFile(cfg.TokenFile, []byte(tok), 0o600))
	}
	if cfg.ExportStatusFile == "" && cfg.CAFile == "" {
		cfg.ExportStatusFile = filepath.Join(dir, "status.json")
		require.NoError(t, os.WriteFile(cfg.ExportStatusFile, statusJSON, 0o600))
	}
	if cfg.ExportURL == "" {
		cfg.ExportURL = "https://proxy.invalid/api/export.kubevirt.io/v1beta1/namespaces/" + e.sim.Namespace() + "/virtualmachineexports/" + export
	}
	cfg.Policy = e.cfg.Policy
	cfg.Logger = e.cfg.Logger
	s, err := NewStandalone(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// TestBackupExport reads VirtualMachineBackup exports, full then
// incremental, as the real server serves them: backups[{map, data}] links
// only, a data route that ignores Range, clean extents that hold data.
func TestBackupExport(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, kubevirttest.Options{BackupAPI: true}, Config{})
	require.NoError(t, e.sim.CreateBackupExport("full", "full-export", "vm1", false))
	// Change 64 KiB inside the first data run and zero 64 KiB of the second.
	fresh := make([]byte, 64<<10)
	_, _ = rand.Read(fresh)
	require.NoError(t, e.sim.WriteDisk("vm1", "root", 64<<10, fresh))
	require.NoError(t, e.sim.DiscardDisk("vm1", "root", 1<<20, 64<<10))
	require.NoError(t, e.sim.CreateBackupExport("incr", "incr-export", "vm1", true))

	for _, mode := range []string{"standalone", "api"} {
		t.Run(mode, func(t *testing.T) {
			var src backend.Source = e.src
			snap := func(backup, export string) string { return backup }
			vm := "vm1"
			if mode == "standalone" {
				snap = func(backup, export string) string { return export }
				vm = "" // the export's name
			}
			for _, b := range []struct{ backup, export string }{{"full", "full-export"}, {"incr", "incr-export"}} {
				if mode == "standalone" {
					src = standaloneFor(t, e, b.export, StandaloneConfig{})
					vm = b.export
				}
				vms, err := src.VMs(ctx)
				require.NoError(t, err)
				if mode == "standalone" {
					require.Len(t, vms, 1)
					ids := []string{}
					for _, d := range vms[0].Disks {
						ids = append(ids, d.ID)
					}
					assert.Equal(t, []string{"data", "root"}, ids, "disks come from backups")
				} else {
					snaps, err := src.Snapshots(ctx, vm)
					require.NoError(t, err)
					var names []string
					for _, s := range snaps {
						names = append(names, s.ID)
					}
					assert.Contains(t, names, b.backup)
				}
				before := e.sim.Stats()
				d, err := src.OpenDisk(ctx, backend.DiskRef{VM: vm, Snapshot: snap(b.backup, b.export), Disk: "root"})
				require.NoError(t, err)
				want, err := os.ReadFile(e.sim.BackupFile(b.backup, "root"))
				require.NoError(t, err)
				require.Equal(t, int64(len(want)), d.Size())
				got := readAll(t, d)
				require.True(t, bytes.Equal(want, got), "%s: bytes differ", b.backup)
				after := e.sim.Stats()
				alloc := d.Allocated().Bytes()
				assert.LessOrEqual(t, float64(after.DiskBytes-before.DiskBytes), 1.02*float64(alloc), "holes not fetched")
				assert.Positive(t, after.DataQueries-before.DataQueries, "reads go through the data route")
				if b.backup == "incr" {
					// The first 64 KiB is clean: unchanged data, not zeros.
					assert.Equal(t, e.root[:64<<10], got[:64<<10], "clean extent read right")
					bd, ok := d.(*backupDisk)
					require.True(t, ok)
					assert.Equal(t, "65536 65536\n1048576 65536\n", bd.dirty.Format(), "dirty = the changed extents")
				}
				require.NoError(t, d.Close())
			}
		})
	}
}

// TestBackupExportWrongToken: a backup export's disk checks the token at
// open (the mount fails), it does not mount with no disks.
func TestBackupExportWrongToken(t *testing.T) {
	e := newEnv(t, kubevirttest.Options{}, Config{})
	require.NoError(t, e.sim.CreateBackupExport("full", "full-export", "vm1", false))
	tf := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(tf, []byte("wrong"), 0o600))
	s := standaloneFor(t, e, "full-export", StandaloneConfig{TokenFile: tf})
	_, err := s.OpenDisk(context.Background(), backend.DiskRef{VM: "full-export", Snapshot: "full-export", Disk: "root"})
	require.ErrorIs(t, err, backend.ErrPermission)
}

// TestBackupMapWaitsForLauncher: the map answers 503 until virt-launcher
// connects; opening waits (logging progress) within the bound, fails after.
func TestBackupMapWaitsForLauncher(t *testing.T) {
	e := newEnv(t, kubevirttest.Options{LauncherDelay: 2500 * time.Millisecond}, Config{})
	require.NoError(t, e.sim.CreateBackupExport("full", "full-export", "vm1", false))
	ref := backend.DiskRef{VM: "full-export", Snapshot: "full-export", Disk: "root"}

	short := standaloneFor(t, e, "full-export", StandaloneConfig{BackupConnectTimeout: 500 * time.Millisecond})
	_, err := short.OpenDisk(context.Background(), ref)
	require.ErrorIs(t, err, backend.ErrUnavailable)
	assert.Contains(t, err.Error(), "virt-launcher not connected")

	s := standaloneFor(t, e, "full-export", StandaloneConfig{})
	start := time.Now()
	d, err := s.OpenDisk(context.Background(), ref)
	require.NoError(t, err)
	defer d.Close()
	assert.GreaterOrEqual(t, time.Since(start), time.Second)
	assert.Contains(t, e.logs.String(), "waiting for the backup source (virt-launcher) to connect")
	want, err := os.ReadFile(e.sim.BackupFile("full", "root"))
	require.NoError(t, err)
	assert.True(t, bytes.Equal(want, readAll(t, d)))
}

// TestPortForward: --ca-file mode against the export pod itself (root
// paths only, a certificate with service DNS names only), as through
// kubectl port-forward: verified with TLSServerName, not skipped.
func TestPortForward(t *testing.T) {
	e := newEnv(t, kubevirttest.Options{PodOnly: true}, Config{})
	require.NoError(t, e.sim.CreateLiveExport("live", "vm1", "", ""))
	statusJSON, err := e.sim.ExportStatus("live")
	require.NoError(t, err)
	st, err := ParseExportStatus(statusJSON)
	require.NoError(t, err)
	raw := st.Links.Internal.rawURL("root")
	host := raw[:strings.Index(raw, "/volumes/")]
	ca := filepath.Join(t.TempDir(), "ca.pem")
	require.NoError(t, os.WriteFile(ca, []byte(st.Links.Internal.Cert), 0o600))
	url := host + "/api/export.kubevirt.io/v1beta1/namespaces/" + e.sim.Namespace() + "/virtualmachineexports/live"
	ref := backend.DiskRef{VM: "live", Snapshot: "live", Disk: "root"}

	s := standaloneFor(t, e, "live", StandaloneConfig{ExportURL: url, CAFile: ca, Volumes: []string{"root"}})
	_, err = s.OpenDisk(context.Background(), ref)
	require.Error(t, err, "127.0.0.1 is not in the pod certificate")

	s = standaloneFor(t, e, "live", StandaloneConfig{ExportURL: url, CAFile: ca, Volumes: []string{"root"},
		TLSServerName: "virt-export-live." + e.sim.Namespace() + ".svc"})
	d, err := s.OpenDisk(context.Background(), ref)
	require.NoError(t, err)
	defer d.Close()
	assert.True(t, bytes.Equal(e.root, readAll(t, d)))
}

var _ = extent.Full

// TestBackupMkdirAndDelta: where the cluster has VirtualMachineBackup,
// CreateSnapshot makes a Pull-mode backup through the VM's tracker, full
// first, then incremental from the last checkpoint; OpenDelta gives the
// incremental's dirty extents against that base only.
func TestBackupMkdirAndDelta(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, kubevirttest.Options{BackupAPI: true}, Config{})
	_, err := e.src.CreateSnapshot(ctx, "vm1", "b1")
	require.NoError(t, err)
	fresh := make([]byte, 64<<10)
	_, _ = rand.Read(fresh)
	require.NoError(t, e.sim.WriteDisk("vm1", "root", 128<<10, fresh))
	_, err = e.src.CreateSnapshot(ctx, "vm1", "b2")
	require.NoError(t, err)
	assert.Equal(t, "b1", e.sim.BackupPrevious("b2"), "incremental from b1's checkpoint")
	assert.Empty(t, e.sim.BackupPrevious("b1"), "the first is full")

	snaps, err := e.src.Snapshots(ctx, "vm1")
	require.NoError(t, err)
	var ids []string
	for _, s := range snaps {
		ids = append(ids, s.ID)
	}
	assert.Equal(t, []string{"b1", "b2"}, ids)

	ref := func(s string) backend.DiskRef { return backend.DiskRef{VM: "vm1", Snapshot: s, Disk: "root"} }
	d, changed, err := e.src.OpenDelta(ctx, ref("b2"), ref("b1"))
	require.NoError(t, err)
	assert.Equal(t, "131072 65536\n", changed.Format(), "changed = the dirty extents")
	want, err := os.ReadFile(e.sim.BackupFile("b2", "root"))
	require.NoError(t, err)
	assert.True(t, bytes.Equal(want, readAll(t, d)))
	require.NoError(t, d.Close())

	_, _, err = e.src.OpenDelta(ctx, ref("b1"), ref("b2"))
	require.ErrorIs(t, err, backend.ErrUnsupported)
	_, _, err = e.src.OpenDelta(ctx, ref("b2"), ref("gone"))
	require.ErrorIs(t, err, backend.ErrNotFound)

	require.NoError(t, e.src.DeleteSnapshot(ctx, "vm1", "b2"))
	snaps, err = e.src.Snapshots(ctx, "vm1")
	require.NoError(t, err)
	require.Len(t, snaps, 1)
	// The tracker keeps b2's checkpoint: the next backup is incremental from it.
	_, err = e.src.CreateSnapshot(ctx, "vm1", "b3")
	require.NoError(t, err)
	assert.Equal(t, "b2", e.sim.BackupPrevious("b3"))
}
