package fs

import (
	"crypto/sha256"
	"encoding/hex"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/backendtest"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

func TestRecentVMs(t *testing.T) {
	r := newRecentVMs(2)
	for _, tc := range []struct {
		touch, evicted string
	}{
		{"a", ""}, {"b", ""}, {"a", ""}, // a is now the most recent
		{"c", "b"}, {"d", "a"}, {"d", ""}, {"a", "c"},
	} {
		got, ok := r.touch(tc.touch)
		assert.Equal(t, tc.evicted != "", ok, "touch %s", tc.touch)
		assert.Equal(t, tc.evicted, got, "touch %s", tc.touch)
	}
	assert.Len(t, r.at, 2)
}

// TestWalkForgetsOldVMs: a walk of more VMs than the tree keeps finds every
// one, keeps listings and handles of the last few only, and has the kernel
// drop the others' nodes; a VM forgotten reads right when visited again.
func TestWalkForgetsOldVMs(t *testing.T) {
	// More kept than listed ahead of the walk, as in a mount: a VM listed
	// ahead is not pushed out before the walk gets to it.
	const vms, keep = 300, walkAheadMax + 16
	all := oneSnapshotVMs(t, vms, "vm-%03d", extent.Extent{Off: 4096, Len: 8192})
	first := all[0].Snapshots[0].Disks[0]
	root, err := NewRoot(backendtest.New(all...), Options{ListTTL: time.Hour})
	require.NoError(t, err)
	root.st.recent = newRecentVMs(keep)
	mnt := mountRoot(t, root)

	// ls -l stats every file, so every disk is opened and every node made.
	out, err := exec.Command("find", filepath.Join(mnt, "vms"), "-name", "disk.img", "-ls").CombinedOutput()
	require.NoError(t, err, string(out))
	assert.Len(t, strings.Split(strings.TrimSpace(string(out)), "\n"), vms, "every disk found")

	st := root.st
	st.mu.Lock()
	snaps, handles := len(st.snaps), len(st.handles)
	st.mu.Unlock()
	assert.LessOrEqual(t, snaps, keep, "snapshot listings kept")
	assert.LessOrEqual(t, handles, keep, "VMs with disk handles kept")
	// A VM dropped while the walk was inside it can stay behind (a busy
	// machine shows one in a few runs) until a sweep forgets it deeper.
	require.Eventually(t, func() bool { return len(st.vmsDir.Children()) <= keep+vms/30 },
		5*time.Second, 10*time.Millisecond, "the kernel forgot the VMs pushed out")
	st.sweepForgotten()
	require.Eventually(t, func() bool { return len(st.vmsDir.Children()) <= keep },
		5*time.Second, 10*time.Millisecond, "and the stragglers after a sweep")

	sum := sha256.Sum256(first.Data)
	assert.Equal(t, hex.EncodeToString(sum[:]), sha(t, filepath.Join(mnt, "vms/vm-000/snapshots/s1/disk.img")), "a forgotten VM read again")
}
