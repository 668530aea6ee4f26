package main

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/kubevirt/kubevirttest"
	"github.com/vmexportfs/vmexportfs/backend/testenv"
)

// newKVFixtureWith is newKVFixture with simulator options of its own.
func newKVFixtureWith(t *testing.T, opts kubevirttest.Options) *kvFixture {
	t.Helper()
	requireRoot(t)
	opts.Dir, opts.Namespace, opts.Clock = t.TempDir(), "backups", steppingClock()
	if opts.ReadyDelay == 0 {
		opts.ReadyDelay = kvReadyDelay
	}
	sim, err := kubevirttest.Start(opts)
	require.NoError(t, err)
	t.Cleanup(func() { sim.Close() })
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	require.NoError(t, os.WriteFile(kc, sim.Kubeconfig(), 0o600))
	var seed [32]byte
	copy(seed[:], t.Name())
	return &kvFixture{sim: sim, kubeconfig: kc, stateDir: t.TempDir(), cacheDir: t.TempDir(), refDir: t.TempDir(),
		vols: map[string][]string{}, rng: rand.NewChaCha8(seed)}
}

// backupStatusFile writes a backup export's status for a standalone mount.
func (f *kvFixture) backupStatusFile(t *testing.T, export string) string {
	t.Helper()
	status, err := f.sim.ExportStatus(export)
	require.NoError(t, err)
	assert.NotContains(t, string(status), `"volumes"`, "a backup export has backups links only")
	p := filepath.Join(t.TempDir(), "status.json")
	require.NoError(t, os.WriteFile(p, status, 0o600))
	return p
}

// TestKubeVirtBackupCopyTools mounts VirtualMachineBackup exports, a full
// backup then an incremental one, as the real controller publishes them
// (backups[{map, data}] links, no volumes): every copy tool gets the
// backup's exact bytes, holes are never fetched, and the incremental's clean
// extents (unchanged data) read as data, not zeros.
func TestKubeVirtBackupCopyTools(t *testing.T) {
	requireTools(t, "cp", "tar", "rsync", "dd", "qemu-img")
	f := newKVFixtureWith(t, kubevirttest.Options{BackupAPI: true})
	f.addVM(t, copyVM, kubevirttest.VolumeSpec{Name: copyDisk, Size: copyDiskSize})
	for _, e := range copyWrites {
		f.write(t, copyVM, copyDisk, e.Off, e.Len)
	}
	require.NoError(t, f.sim.CreateBackupExport("full", "full-export", copyVM, false))
	f.write(t, copyVM, copyDisk, 7*mib, 3*mib) // dirty; 0..1 MiB and the rest stay clean
	f.discard(t, copyVM, copyDisk, 70*mib, 1*mib)
	require.NoError(t, f.sim.CreateBackupExport("incr", "incr-export", copyVM, true))
	time.Sleep(kvReadyDelay)

	for _, backup := range []string{"full", "incr"} {
		t.Run(backup, func(t *testing.T) {
			ref := f.sim.BackupFile(backup, copyDisk)
			want := sha256File(t, ref)
			allocated := allocatedBytes(testenv.SeekMap(t, ref))
			for _, tc := range copyTools {
				t.Run(tc.name, func(t *testing.T) {
					m := f.mount(t) // cold
					disk := m.path("vms", copyVM, "snapshots", backup, "disk.img")
					before := f.sim.Stats()
					got := tc.copy(t, disk, t.TempDir())
					assert.Equal(t, want, sha256File(t, got), "sha256 of the copy")
					after := f.sim.Stats()
					served := after.DiskBytes - before.DiskBytes
					t.Logf("%s: served %d bytes for %d allocated (%.3f×)", tc.name, served, allocated, float64(served)/float64(allocated))
					assert.LessOrEqual(t, served, allocated*102/100, "holes not fetched: ≤ 1.02 × allocated")
					assert.Positive(t, after.DataQueries-before.DataQueries, "read through the data route")
				})
			}
			if backup == "incr" {
				m := f.mount(t)
				disk := m.path("vms", copyVM, "snapshots", backup, "disk.img")
				assert.Equal(t, sha256Range(t, ref, 0, mib), sha256Range(t, disk, 0, mib), "clean extent read as data")
				assert.NotEqual(t, sha256Bytes(make([]byte, mib)), sha256Range(t, disk, 0, mib))
			}
		})
	}

	// The standalone form: the export's status file, disks from backups;
	// a wrong token fails the mount instead of mounting no disks.
	statusFile := f.backupStatusFile(t, "incr-export")
	exportURL := f.backupExportURL(t, "incr-export")
	bad := filepath.Join(t.TempDir(), "bad")
	require.NoError(t, os.WriteFile(bad, []byte("refusedToken31337"), 0o600))
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"-f", "--token-file", bad, "--export-status", statusFile,
		"--state-dir", t.TempDir(), "kubevirt+" + exportURL, t.TempDir()}, &stdout, &stderr)
	assert.Equal(t, 1, code)
	assert.Contains(t, stderr.String(), "permission denied")

	mnt := filepath.Join(t.TempDir(), "mnt")
	require.NoError(t, os.Mkdir(mnt, 0o755))
	m := startCommand(t, "-f", "--token-file", f.tokenFile(t, "incr-export"), "--export-status", statusFile,
		"--state-dir", t.TempDir(), "--cache-dir", t.TempDir(), "kubevirt+"+exportURL, mnt)
	m.dir = mnt
	found := findAll(t, mnt, "disk.img")
	require.Len(t, found, 1, "the backup's disk")
	copied := filepath.Join(t.TempDir(), "disk.img")
	tool(t, "cp", "--sparse=always", found[0], copied)
	assert.Equal(t, sha256File(t, f.sim.BackupFile("incr", copyDisk)), sha256File(t, copied))
}

// backupExportURL is a backup export's external base URL
// (…/virtualmachineexports/<name>), from its map link.
func (f *kvFixture) backupExportURL(t *testing.T, export string) string {
	t.Helper()
	status, err := f.sim.ExportStatus(export)
	require.NoError(t, err)
	s := string(status)
	i := strings.Index(s, "/virtualmachineexports/"+export+"/exports/")
	require.Positive(t, i)
	j := strings.LastIndex(s[:i], `"https://`)
	require.Positive(t, j)
	return s[j+1:i] + "/virtualmachineexports/" + export
}
