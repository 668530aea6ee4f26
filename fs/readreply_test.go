package fs

import (
	"crypto/sha256"
	"encoding/hex"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/backendtest"
	"github.com/vmexportfs/vmexportfs/cache"
)

// READ replies are written from the cache's blocks (pinnedResult): the
// bytes must be the disk's whatever the read size and alignment, and every
// pin must be let go once the reply is out, or the cache could never evict
// those blocks again. The disk is three times the cache.
func TestReadRepliesFromCacheBlocks(t *testing.T) {
	const capacity = 16 * mib
	d := sparseDisk(t, 48*mib+12345, 12, 4*mib, 3*mib+777)
	src := backendtest.New(&backendtest.VM{ID: "vm", Snapshots: []*backendtest.Snapshot{{Snapshot: backend.Snapshot{ID: "s"}, Disks: []*backendtest.Disk{d}}}})
	c := cache.New(cache.Options{Capacity: capacity})
	t.Cleanup(c.Close)
	in := filepath.Join(mountWith(t, src, Options{Cache: c}), "vms/vm/snapshots/s/disk.img")
	tests := []struct {
		name string
		args []string
		skip int // bytes of the disk the copy leaves out
	}{
		{"dd O_DIRECT, 1 MiB reads", []string{"iflag=direct", "bs=1M"}, 0},
		{"dd O_DIRECT, 1 MiB reads across blocks", []string{"iflag=direct,skip_bytes", "bs=1M", "skip=4096"}, 4096},
		{"dd O_DIRECT, 12 KiB reads", []string{"iflag=direct", "bs=12k"}, 0},
		{"dd through the page cache, 64 KiB reads", []string{"bs=64k"}, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "out.img")
			mustRun(t, "dd", append(tc.args, "if="+in, "of="+out, "status=none")...)
			want := sha256.Sum256(d.Data[tc.skip:])
			assert.Equal(t, hex.EncodeToString(want[:]), sha(t, out))
			// go-fuse lets the pins go right after the reply's write,
			// which may come a moment after dd has its bytes.
			assert.Eventually(t, func() bool { return c.Stats().Pinned == 0 }, 5*time.Second, 10*time.Millisecond,
				"pins left after the reads: %d", c.Stats().Pinned)
		})
	}
	st := c.Stats()
	assert.Positive(t, st.Evictions, "a disk three times the cache evicts")
	require.Eventually(t, func() bool { return c.Stats().ResidentBytes <= capacity }, 5*time.Second, 10*time.Millisecond,
		"resident %d bytes of a %d-byte cache", c.Stats().ResidentBytes, capacity)
}
