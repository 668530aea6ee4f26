package kubevirt

import (
	"bytes"
	"context"
	"crypto/rand"
	"log/slog"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
	"github.com/vmexportfs/vmexportfs/backend/kubevirt/kubevirttest"
)

const (
	rootSize = 2 << 20
	dataSize = 1 << 20
)

// syncBuffer collects log output from concurrent goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type env struct {
	sim  *kubevirttest.Server
	src  *Source
	cfg  Config // what src was made from, to open a second, fresh source
	logs *syncBuffer
	root []byte // VM root volume content written before the first snapshot
}

func newEnv(t *testing.T, opts kubevirttest.Options, cfg Config) *env {
	t.Helper()
	opts.Dir = t.TempDir()
	sim, err := kubevirttest.Start(opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = sim.Close() })
	require.NoError(t, sim.AddVM("vm1", []kubevirttest.VolumeSpec{{Name: "root", Size: rootSize}, {Name: "data", Size: dataSize}}))
	require.NoError(t, sim.AddVM("vm2", []kubevirttest.VolumeSpec{{Name: "disk0", Size: dataSize}}))
	root := make([]byte, rootSize)
	// Data at 0..128K and 1M..1M+100K; the rest stays a hole.
	_, _ = rand.Read(root[:128<<10])
	_, _ = rand.Read(root[1<<20 : 1<<20+100<<10])
	require.NoError(t, sim.WriteDisk("vm1", "root", 0, root))

	cred, err := ParseKubeconfig(sim.Kubeconfig(), t.TempDir())
	require.NoError(t, err)
	logs := &syncBuffer{}
	cfg.Credentials = &cred
	cfg.Namespace = sim.Namespace()
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg.Policy = httprange.Policy{Attempts: 2, BaseDelay: time.Millisecond, MaxDelay: 5 * time.Millisecond, AttemptTimeout: 5 * time.Second}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = 10 * time.Millisecond
	}
	src, err := New(cfg)
	require.NoError(t, err)
	return &env{sim: sim, src: src, cfg: cfg, logs: logs, root: root}
}

func TestListAndReadSnapshot(t *testing.T) {
	for _, tc := range []struct {
		name     string
		version  string
		internal bool
		backup   bool
	}{
		{name: "external v1beta1", version: "v1beta1"},
		{name: "internal", version: "v1beta1", internal: true},
		{name: "v1alpha1 fallback", version: "v1alpha1"},
		{name: "backup map", version: "v1beta1", backup: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			e := newEnv(t, kubevirttest.Options{ExportVersion: tc.version}, Config{Internal: tc.internal})
			e.sim.SetBackupRoutes(tc.backup)

			vms, err := e.src.VMs(ctx)
			require.NoError(t, err)
			require.Len(t, vms, 2)
			assert.Equal(t, "vm1", vms[0].ID)
			assert.Equal(t, []backend.DiskInfo{{ID: "root", Device: "root"}, {ID: "data", Device: "data"}}, vms[0].Disks)

			snaps, err := e.src.Snapshots(ctx, "vm1")
			require.NoError(t, err)
			assert.Empty(t, snaps)

			_, err = e.src.CreateSnapshot(ctx, "vm1", "s1")
			require.NoError(t, err)
			// Writes after the snapshot must not show in it.
			require.NoError(t, e.sim.WriteDisk("vm1", "root", 0, bytes.Repeat([]byte{0xAA}, 4096)))
			require.NoError(t, e.sim.CreateLiveExport("vm1-live", "vm1", "", ""))

			snaps, err = e.src.Snapshots(ctx, "vm1")
			require.NoError(t, err)
			require.Len(t, snaps, 2)
			assert.Equal(t, "s1", snaps[0].ID)
			assert.Equal(t, LiveSnapshot, snaps[1].ID)
			assert.ElementsMatch(t, []backend.DiskInfo{{ID: "root", Device: "root"}, {ID: "data", Device: "data"}}, snaps[0].Disks)

			d, err := e.src.OpenDisk(ctx, backend.DiskRef{VM: "vm1", Snapshot: "s1", Disk: "root"})
			require.NoError(t, err)
			require.Equal(t, int64(rootSize), d.Size())
			if tc.backup {
				want, err := extent.Normalize([]extent.Extent{{Off: 0, Len: 128 << 10}, {Off: 1 << 20, Len: 128 << 10}}, rootSize)
				require.NoError(t, err)
				assert.Equal(t, want.Format(), d.Allocated().Format())
			} else {
				assert.Equal(t, extent.Full(rootSize).Format(), d.Allocated().Format())
			}
			for _, r := range []struct{ off, n int64 }{{0, 1}, {0, 4096}, {100, 200000}, {1<<20 - 7, 300}, {rootSize - 512, 512}, {0, rootSize}} {
				p := make([]byte, r.n)
				require.NoError(t, d.ReadAt(ctx, p, r.off))
				require.True(t, bytes.Equal(e.root[r.off:r.off+r.n], p), "range %d+%d", r.off, r.n)
			}
			assert.ErrorIs(t, d.ReadAt(ctx, make([]byte, 2), rootSize-1), backend.ErrInvalid)

			if tc.backup {
				before := e.sim.Stats().DiskBytes
				p := bytes.Repeat([]byte{1}, 64<<10)
				require.NoError(t, d.ReadAt(ctx, p, 512<<10)) // inside a hole
				assert.Equal(t, make([]byte, 64<<10), p)
				assert.Equal(t, before, e.sim.Stats().DiskBytes, "hole must not be fetched")
			}

			live, err := e.src.OpenDisk(ctx, backend.DiskRef{VM: "vm1", Snapshot: LiveSnapshot, Disk: "root"})
			require.NoError(t, err)
			p := make([]byte, 4096)
			require.NoError(t, live.ReadAt(ctx, p, 0))
			assert.Equal(t, bytes.Repeat([]byte{0xAA}, 4096), p)

			_, err = e.src.OpenDisk(ctx, backend.DiskRef{VM: "vm1", Snapshot: "nope", Disk: "root"})
			assert.ErrorIs(t, err, backend.ErrNotFound)
			_, err = e.src.OpenDisk(ctx, backend.DiskRef{VM: "vm1", Snapshot: "s1", Disk: "nope"})
			assert.ErrorIs(t, err, backend.ErrNotFound)
		})
	}
}

func TestMapPaging(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, kubevirttest.Options{MapPageLimit: 3}, Config{})
	e.sim.SetBackupRoutes(true)
	var raw []extent.Extent
	// Every other 64 KiB chunk of the data volume: 8 data extents, 16 in all.
	for off := int64(0); off < dataSize; off += 128 << 10 {
		require.NoError(t, e.sim.WriteDisk("vm1", "data", off+10, []byte{1, 2, 3}))
		raw = append(raw, extent.Extent{Off: off, Len: 64 << 10})
	}
	_, err := e.src.CreateSnapshot(ctx, "vm1", "s1")
	require.NoError(t, err)
	before := e.sim.Stats().MapQueries
	d, err := e.src.OpenDisk(ctx, backend.DiskRef{VM: "vm1", Snapshot: "s1", Disk: "data"})
	require.NoError(t, err)
	want, err := extent.Normalize(raw, dataSize)
	require.NoError(t, err)
	assert.Equal(t, want.Format(), d.Allocated().Format())
	assert.GreaterOrEqual(t, e.sim.Stats().MapQueries-before, int64(5), "map must be paged")
}

func TestWrongTokenIsPermissionAndNotLogged(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, kubevirttest.Options{}, Config{})
	_, err := e.src.CreateSnapshot(ctx, "vm1", "s1")
	require.NoError(t, err)
	good, err := e.sim.ExportToken("s1")
	require.NoError(t, err)
	d, err := e.src.OpenDisk(ctx, backend.DiskRef{VM: "vm1", Snapshot: "s1", Disk: "root"})
	require.NoError(t, err)

	// A rotated secret is re-read after the 401 and the read succeeds.
	e.sim.SetSecretToken("s1-export-token", "rotatedTokenValue1234")
	p := make([]byte, 4096)
	require.NoError(t, d.ReadAt(ctx, p, 0))
	assert.Equal(t, e.root[:4096], p)

	// A server that stops accepting a token it took before is treated as an
	// outage (a 401 storm looks the same from here): retried, then EIO.
	e.sim.ForceExportToken("s1", "serverOnlyToken98765")
	err = d.ReadAt(ctx, p, 0)
	require.ErrorIs(t, err, backend.ErrUnavailable)
	assert.Contains(t, err.Error(), "credentials that worked before refused")

	// A token refused from the start is a permission error.
	fresh, err := New(e.cfg)
	require.NoError(t, err)
	_, err = fresh.OpenDisk(ctx, backend.DiskRef{VM: "vm1", Snapshot: "s1", Disk: "root"})
	require.ErrorIs(t, err, backend.ErrPermission)
	logs := e.logs.String()
	assert.Contains(t, logs, "export=s1")
	for _, secret := range []string{good, "rotatedTokenValue1234", "serverOnlyToken98765", e.sim.Token()} {
		assert.NotContains(t, logs, secret)
		assert.NotContains(t, err.Error(), secret)
	}
}

func TestCertRotation(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, kubevirttest.Options{}, Config{})
	_, err := e.src.CreateSnapshot(ctx, "vm1", "s1")
	require.NoError(t, err)
	d, err := e.src.OpenDisk(ctx, backend.DiskRef{VM: "vm1", Snapshot: "s1", Disk: "root"})
	require.NoError(t, err)
	p := make([]byte, 1000)
	require.NoError(t, d.ReadAt(ctx, p, 50))
	for range 2 {
		require.NoError(t, e.sim.RotateCert("s1"))
		require.NoError(t, d.ReadAt(ctx, p, 50))
		assert.Equal(t, e.root[50:1050], p)
	}
	assert.Contains(t, e.logs.String(), "certificate rotated")
}

func TestCreateDeleteSnapshot(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, kubevirttest.Options{ReadyDelay: 50 * time.Millisecond}, Config{})
	snap, err := e.src.CreateSnapshot(ctx, "vm2", "backup-1")
	require.NoError(t, err)
	assert.Equal(t, "backup-1", snap.ID)
	assert.Equal(t, []backend.DiskInfo{{ID: "disk0", Device: "disk0"}}, snap.Disks)

	_, err = e.src.CreateSnapshot(ctx, "vm2", "backup-1")
	assert.ErrorIs(t, err, backend.ErrExists)
	for _, bad := range []string{"live", "Upper", "a/b", "", "-x"} {
		_, err = e.src.CreateSnapshot(ctx, "vm2", bad)
		assert.ErrorIs(t, err, backend.ErrInvalid, bad)
	}
	_, err = e.sim.ExportToken("backup-1")
	require.NoError(t, err)

	assert.ErrorIs(t, e.src.DeleteSnapshot(ctx, "vm1", "backup-1"), backend.ErrNotFound)
	require.NoError(t, e.src.DeleteSnapshot(ctx, "vm2", "backup-1"))
	snaps, err := e.src.Snapshots(ctx, "vm2")
	require.NoError(t, err)
	assert.Empty(t, snaps)
	_, err = e.sim.ExportStatus("backup-1")
	assert.Error(t, err)
	assert.ErrorIs(t, e.src.DeleteSnapshot(ctx, "vm2", "backup-1"), backend.ErrNotFound)
}

func TestReadyTimeout(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, kubevirttest.Options{ReadyDelay: time.Hour}, Config{ReadyTimeout: 150 * time.Millisecond})
	start := time.Now()
	_, err := e.src.CreateSnapshot(ctx, "vm1", "slow")
	require.ErrorIs(t, err, backend.ErrUnavailable)
	assert.Contains(t, err.Error(), "not ready within")
	assert.Less(t, time.Since(start), 5*time.Second)
	// The half-made snapshot was removed, so the name can be used again.
	assert.ErrorIs(t, e.src.DeleteSnapshot(ctx, "vm1", "slow"), backend.ErrNotFound)
}

// postSnapshot makes a VirtualMachineSnapshot the way a scheduler would: no
// export, nothing of ours.
func postSnapshot(t *testing.T, e *env, vm, name string) {
	t.Helper()
	obj := map[string]any{
		"kind":     "VirtualMachineSnapshot",
		"metadata": map[string]any{"name": name},
		"spec":     map[string]any{"source": map[string]any{"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": vm}},
	}
	require.NoError(t, e.src.kube(context.Background(), http.MethodPost, "snapshot.kubevirt.io", "virtualmachinesnapshots", "", obj, nil))
}

func TestAdoptExistingSnapshot(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, kubevirttest.Options{}, Config{})
	postSnapshot(t, e, "vm1", "scheduled")
	snaps, err := e.src.Snapshots(ctx, "vm1")
	require.NoError(t, err)
	assert.Empty(t, snaps, "a snapshot without an export is not shown")

	_, err = e.src.CreateSnapshot(ctx, "vm2", "scheduled")
	require.ErrorIs(t, err, backend.ErrExists, "another VM's snapshot is not adopted")
	snap, err := e.src.CreateSnapshot(ctx, "vm1", "scheduled")
	require.NoError(t, err)
	assert.Equal(t, "scheduled", snap.ID)
	assert.Contains(t, e.logs.String(), "exporting an existing snapshot")
	d, err := e.src.OpenDisk(ctx, backend.DiskRef{VM: "vm1", Snapshot: "scheduled", Disk: "root"})
	require.NoError(t, err)
	p := make([]byte, 8192)
	require.NoError(t, d.ReadAt(ctx, p, 0))
	assert.Equal(t, e.root[:8192], p)
	_, err = e.src.CreateSnapshot(ctx, "vm1", "scheduled")
	require.ErrorIs(t, err, backend.ErrExists, "once exported, the name is taken")
	require.NoError(t, e.src.DeleteSnapshot(ctx, "vm1", "scheduled"))
}

func TestFailedAdoptionKeepsTheSnapshot(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, kubevirttest.Options{ReadyDelay: time.Hour}, Config{ReadyTimeout: 150 * time.Millisecond})
	postSnapshot(t, e, "vm1", "scheduled")
	_, err := e.src.CreateSnapshot(ctx, "vm1", "scheduled")
	require.ErrorIs(t, err, backend.ErrUnavailable)
	require.NoError(t, e.src.kube(ctx, http.MethodGet, "snapshot.kubevirt.io", "virtualmachinesnapshots", "scheduled", nil, nil),
		"the user's snapshot survives")
	err = e.src.kube(ctx, http.MethodGet, "export.kubevirt.io", "virtualmachineexports", "scheduled", nil, nil)
	assert.ErrorIs(t, err, backend.ErrNotFound, "no export left behind")
}
