package fs

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/testenv"
)

// TestDeltaWithoutChangeTracking: a platform that cannot say what changed
// still gets deltas, holding everything written in either snapshot, and a
// chain of base disk.vhd + delta opens as the target's disk. The changed
// xattr stays absent: the fs does not claim to know what changed.
func TestDeltaWithoutChangeTracking(t *testing.T) {
	testenv.RequireTool(t, "vhdimount", "fusermount3", "getfattr")
	src := fixture(t)
	src.NoChangeTracking = true
	mnt := mountTest(t, src)
	snaps := filepath.Join(mnt, "vms/vm-a/snapshots")
	assert.Contains(t, lines(mustRun(t, "ls", filepath.Join(snaps, "s2"))), "delta-from-first.vhd")

	out, err := run(t, "getfattr", "-n", "user.vmexport.changed.s1", filepath.Join(snaps, "s2/disk.img"))
	require.Error(t, err)
	assert.Contains(t, out, "No such attribute")

	chain := t.TempDir()
	mustRun(t, "cp", filepath.Join(snaps, "first/disk.vhd"), filepath.Join(chain, "first.vhd"))
	mustRun(t, "cp", filepath.Join(snaps, "s2/delta-from-first.vhd"), filepath.Join(chain, "delta.vhd"))
	applied := t.TempDir()
	mustRun(t, "vhdimount", filepath.Join(chain, "delta.vhd"), applied)
	t.Cleanup(func() { _, _ = run(t, "fusermount3", "-u", applied) })
	target := mustRun(t, "sh", "-c", `sha256sum < "$1"`, "sh", filepath.Join(snaps, "s2/disk.img"))
	got := mustRun(t, "sh", "-c", `head -c 4194304 "$1" | sha256sum`, "sh", filepath.Join(applied, "vhdi2"))
	assert.Equal(t, target, got)
	base := mustRun(t, "sh", "-c", `sha256sum < "$1"`, "sh", filepath.Join(snaps, "first/disk.img"))
	assert.NotEqual(t, base, target, "the snapshots differ, so the delta is not empty")
}
