package fs

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/backendtest"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// oneSnapshotVMs is n VMs named by format, each with one snapshot "s1" of
// one 1 MiB disk written at ext (VM i's bytes seeded with i+1).
func oneSnapshotVMs(t *testing.T, n int, format string, ext extent.Extent) []*backendtest.VM {
	t.Helper()
	var all []*backendtest.VM
	for i := range n {
		d := mustDisk(t, "d", "xvda", mib, byte(i+1), ext)
		all = append(all, &backendtest.VM{ID: fmt.Sprintf(format, i), Snapshots: []*backendtest.Snapshot{
			{Snapshot: backend.Snapshot{ID: "s1"}, Disks: []*backendtest.Disk{d}},
		}})
	}
	return all
}

// slowListings is a platform whose snapshot listing takes a round trip,
// counting how many run at once.
type slowListings struct {
	*backendtest.Source
	inFlight, most atomic.Int32
}

func (s *slowListings) Snapshots(ctx context.Context, vm string) ([]backend.Snapshot, error) {
	n := s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	for {
		m := s.most.Load()
		if n <= m || s.most.CompareAndSwap(m, n) {
			break
		}
	}
	time.Sleep(5 * time.Millisecond)
	return s.Source.Snapshots(ctx, vm)
}

// TestWalkAhead: a find over many VMs lists their snapshots ahead of it, in
// parallel, each VM once; the tree it finds is the whole tree. A listing
// read out of order (ls of one VM) lists nothing ahead.
func TestWalkAhead(t *testing.T) {
	const vms = 64
	all := oneSnapshotVMs(t, vms, "vm-%02d", extent.Extent{Off: 0, Len: 4096})
	src := &slowListings{Source: backendtest.New(all...)}
	mnt := mountWith(t, src, Options{ListTTL: time.Hour})

	out, err := exec.Command("ls", filepath.Join(mnt, "vms", "vm-40", "snapshots")).CombinedOutput()
	require.NoError(t, err, string(out))
	assert.Equal(t, int64(1), src.Calls.Snapshots.Load(), "one VM read alone lists no other")

	out, err = exec.Command("find", filepath.Join(mnt, "vms"), "-name", "disk.img").CombinedOutput()
	require.NoError(t, err, string(out))
	assert.Len(t, strings.Fields(string(out)), vms, "every disk found")
	assert.Equal(t, int64(vms), src.Calls.Snapshots.Load(), "each VM listed once: the walk used what was listed ahead")
	assert.Greater(t, src.most.Load(), int32(1), "listings ahead of the walk ran in parallel")
	assert.LessOrEqual(t, src.most.Load(), int32(walkAheadParallel+1), "within the bound (and the walk's own)")
}
