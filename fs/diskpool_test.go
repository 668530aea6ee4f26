package fs

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/testenv"
)

// TestDisksClosedWhenIdle: copies open the disks they read (a delta through
// the platform's opening against its base), no more than the idle bound stay
// open between copies, all are closed once idle, a later read reopens, and
// closing the tree closes what is left.
func TestDisksClosedWhenIdle(t *testing.T) {
	testenv.RequireRoot(t)
	src := fixture(t)
	root, err := NewRoot(src, Options{DiskIdle: 200 * time.Millisecond, MaxIdleDisks: 1})
	require.NoError(t, err)
	mnt := t.TempDir()
	srv, err := Mount(mnt, root, MountOptions{})
	require.NoError(t, err)
	unmounted := false
	t.Cleanup(func() {
		if !unmounted {
			_ = srv.Unmount()
		}
	})

	files := []string{
		"vms/vm-a/snapshots/s1/disk.img",
		"vms/vm-a/snapshots/s2/disk.img",
		"vms/vm-a/snapshots/s2/delta-from-s1.vhd",
		"vms/vm-b/snapshots/m1/xvda/disk.img",
		"vms/vm-b/snapshots/m1/xvdb/disk.img",
	}
	sums := map[string]string{}
	for _, f := range files {
		sums[f] = mustRun(t, "sha256sum", filepath.Join(mnt, f))
		assert.LessOrEqual(t, src.OpenNow(), int64(1), "after copying %s: idle disks beyond the bound are closed", f)
	}
	assert.Positive(t, src.Calls.OpenDelta.Load(), "the delta reads through an opening against its base")
	require.Eventually(t, func() bool { return src.OpenNow() == 0 && root.OpenDisks() == 0 }, 3*time.Second, 20*time.Millisecond,
		"open disks return to 0 once idle (now %d)", src.OpenNow())

	opens := src.Calls.OpenDisk.Load()
	f := files[1]
	// From the backend, not the page cache.
	require.NoError(t, os.WriteFile("/proc/sys/vm/drop_caches", []byte("1"), 0o200))
	assert.Equal(t, sums[f], mustRun(t, "sha256sum", filepath.Join(mnt, f)), "a closed disk reopens with the same bytes")
	assert.Greater(t, src.Calls.OpenDisk.Load(), opens)

	// A file held open keeps nothing open while it is not read; the tree's
	// Close at unmount closes what is left.
	h, err := os.Open(filepath.Join(mnt, files[0]))
	require.NoError(t, err)
	buf := make([]byte, 4096)
	_, err = h.Read(buf)
	require.NoError(t, err)
	require.NoError(t, h.Close())
	require.NoError(t, srv.Unmount())
	unmounted = true
	root.Close()
	assert.Zero(t, src.OpenNow(), "Close closes every disk")
	assert.Zero(t, root.OpenDisks())
}
