package fs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/backendtest"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/testenv"
	"github.com/vmexportfs/vmexportfs/cache"
)

// recordingStorer keeps what a pageFiller stored, as the page cache would.
type recordingStorer struct {
	mu     sync.Mutex
	pages  map[int64][]byte // by offset
	stores [][2]int64
}

func (r *recordingStorer) WriteCache(off int64, data []byte) syscall.Errno {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pages[off] = bytes.Clone(data)
	r.stores = append(r.stores, [2]int64{off, off + int64(len(data))})
	return 0
}

func (r *recordingStorer) snapshot() [][2]int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][2]int64(nil), r.stores...)
}

// sparseDisk is a backendtest disk of n extents of length every stride.
func sparseDisk(t *testing.T, size int64, n int, stride, length int64) *backendtest.Disk {
	t.Helper()
	exts := make([]extent.Extent, n)
	for i := range exts {
		exts[i] = extent.Extent{Off: int64(i) * stride, Len: length}
	}
	return mustDisk(t, "d", "xvda", size, 7, exts...)
}

func TestPageFillerStores(t *testing.T) {
	far := func(t *testing.T) *backendtest.Disk { return sparseDisk(t, 4*mib, 64, 64<<10, 4096) }
	tests := []struct {
		name   string
		disk   func(t *testing.T) *backendtest.Disk
		events func(pf *pageFiller)
		// from is where the data must all end up stored; -1: none may.
		from int64
		// holes: holes may be stored (as zeros) between extents.
		holes     bool
		maxStores int
		// short: only the extents under fillMaxExtent must be stored.
		short bool
	}{
		{
			name:      "extents far apart: one store each, no hole stored",
			disk:      far,
			events:    func(pf *pageFiller) { pf.sought(0); pf.read(4096) },
			from:      4096,
			maxStores: 63,
		},
		{
			name:      "extents close together: holes stored as zeros, few stores",
			disk:      func(t *testing.T) *backendtest.Disk { return sparseDisk(t, 4*mib, 512, 8192, 4096) },
			events:    func(pf *pageFiller) { pf.sought(0); pf.read(4096) },
			from:      4096,
			holes:     true,
			maxStores: 4,
		},
		{
			name: "long extents are left to the kernel's readahead, the short ones between them stored",
			disk: func(t *testing.T) *backendtest.Disk {
				var exts []extent.Extent
				for i := int64(0); i < 8; i++ {
					exts = append(exts, extent.Extent{Off: i * 512 << 10, Len: 256 << 10}, extent.Extent{Off: i*512<<10 + 384<<10, Len: 4096})
				}
				return mustDisk(t, "d", "xvda", 4*mib, 5, exts...)
			},
			events:    func(pf *pageFiller) { pf.sought(0); pf.read(128 << 10) },
			from:      128 << 10,
			maxStores: 8,
			short:     true,
		},
		{
			name: "seeks alone (qemu-img map): nothing stored",
			disk: far,
			events: func(pf *pageFiller) {
				for off := int64(0); off < 4*mib; off += 64 << 10 {
					pf.sought(off)
					pf.sought(off + 4096)
				}
			},
			from: -1,
		},
		{
			name: "reads alone (dd, rsync): nothing stored, the kernel reads ahead",
			disk: far,
			events: func(pf *pageFiller) {
				for off := int64(128 << 10); off <= 4*mib; off += 128 << 10 {
					pf.read(off)
				}
			},
			from: -1,
		},
		{
			name:   "a read of the last extent: nothing after it to store",
			disk:   far,
			events: func(pf *pageFiller) { pf.sought(63 * 64 << 10); pf.read(63*64<<10 + 4096) },
			from:   -1,
		},
		{
			name:      "a jump: stored from where the reader went",
			disk:      far,
			events:    func(pf *pageFiller) { pf.sought(40 * 64 << 10); pf.read(40*64<<10 + 4096) },
			from:      40*64<<10 + 4096,
			maxStores: 23,
		},
		{
			name: "the last page of a disk whose size is not a page multiple",
			disk: func(t *testing.T) *backendtest.Disk {
				return mustDisk(t, "d", "xvda", mib+1000, 9, extent.Extent{Off: 0, Len: 4096}, extent.Extent{Off: mib, Len: 1000})
			},
			events:    func(pf *pageFiller) { pf.sought(0); pf.read(4096) },
			from:      4096,
			maxStores: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := tt.disk(t)
			src := backendtest.New(&backendtest.VM{ID: "vm", Snapshots: []*backendtest.Snapshot{{Snapshot: backend.Snapshot{ID: "s"}, Disks: []*backendtest.Disk{d}}}})
			disk, err := src.OpenDisk(context.Background(), backend.DiskRef{VM: "vm", Snapshot: "s", Disk: "d"})
			require.NoError(t, err)
			defer disk.Close()
			size := disk.Size()
			data, err := alignOut(disk.Allocated(), size, dataAlign)
			require.NoError(t, err)
			c := cache.New(cache.Options{Capacity: 8 * mib, BlockSize: 256 << 10})
			defer c.Close()
			open := func(context.Context) (stream, error) { return c.Open("d", size, disk.Allocated(), disk), nil }
			rec := &recordingStorer{pages: map[int64][]byte{}}
			var stored atomic.Int64
			pf := newPageFiller(context.Background(), rec, open, data, size, &stored, slog.New(slog.DiscardHandler))
			tt.events(pf)
			// covered: the data after from is all in the stores.
			covered := func() bool {
				if tt.from < 0 {
					return true
				}
				var got []extent.Extent
				for _, s := range rec.snapshot() {
					got = append(got, extent.Extent{Off: s[0], Len: s[1] - s[0]})
				}
				m, err := extent.Normalize(got, size)
				require.NoError(t, err)
				for _, e := range data.Clip(tt.from, size-tt.from) {
					if tt.short && e.Len >= fillMaxExtent {
						continue
					}
					if !m.Contains(e.Off, e.Len) {
						return false
					}
				}
				return true
			}
			if tt.from >= 0 {
				require.Eventually(t, covered, 10*time.Second, time.Millisecond, "the data after %d, stored", tt.from)
			} else {
				time.Sleep(50 * time.Millisecond)
			}
			pf.stop()
			stores := rec.snapshot()
			if tt.from < 0 {
				assert.Empty(t, stores)
				assert.Zero(t, stored.Load())
				return
			}
			assert.LessOrEqual(t, len(stores), tt.maxStores, "stores")
			want := data.DataIn(tt.from, size-tt.from)
			if tt.short {
				want = 0
				for _, e := range data.Clip(tt.from, size-tt.from) {
					if e.Len < fillMaxExtent {
						want += e.Len
					}
				}
			}
			if tt.holes {
				assert.LessOrEqual(t, stored.Load(), size-tt.from, "bytes stored")
			} else {
				assert.Equal(t, want, stored.Load(), "bytes stored: the data, no hole")
			}
			// What the page cache holds must be the disk's bytes, and
			// every store starts and ends on data.
			for _, s := range stores {
				assert.Equal(t, d.Data[s[0]:s[1]], rec.pages[s[0]], "bytes stored at %d", s[0])
				assert.True(t, data.Contains(s[0], 1) && data.Contains(s[1]-1, 1), "store [%d, %d) begins and ends on data", s[0], s[1])
				assert.Zero(t, s[0]%4096, "store at %d: page aligned", s[0])
			}
		})
	}
}

// TestPageCacheFill: cp --sparse over a disk of small extents far apart. The
// kernel asks SEEK_DATA and SEEK_HOLE before each extent; the data is in its
// page cache by the time cp reads it, so almost no READ reaches the mount,
// and the copy is still the disk's bytes.
func TestPageCacheFill(t *testing.T) {
	// Holes of 92 KiB: longer than minSeekHole, so cp seeks over each.
	const n, stride, length = 1000, 96 << 10, 4096
	d := sparseDisk(t, n*stride, n, stride, length)
	mountDisk := func(t *testing.T, d *backendtest.Disk) (*Root, string) {
		src := backendtest.New(&backendtest.VM{ID: "vm", Snapshots: []*backendtest.Snapshot{{Snapshot: backend.Snapshot{ID: "s"}, Disks: []*backendtest.Disk{d}}}})
		c := cache.New(cache.Options{Capacity: 16 * mib})
		t.Cleanup(c.Close)
		root, err := NewRoot(src, Options{Cache: c})
		require.NoError(t, err)
		mnt := mountRoot(t, root)
		return root, filepath.Join(mnt, "vms/vm/snapshots/s/disk.img")
	}
	// copySparse copies in with cp --sparse=always, checks the copy holds
	// d's bytes and returns its path.
	copySparse := func(t *testing.T, in string, d *backendtest.Disk) string {
		out := filepath.Join(t.TempDir(), "out.img")
		mustRun(t, "cp", "--sparse=always", in, out)
		want := sha256.Sum256(d.Data)
		assert.Equal(t, hex.EncodeToString(want[:]), sha(t, out), "sha256 of the copy")
		return out
	}
	t.Run("cp --sparse", func(t *testing.T) {
		root, in := mountDisk(t, d)
		copySparse(t, in, d)
		doc := root.Document()
		t.Logf("%d extents: %d READs reached the mount, %d bytes stored in the page cache", n, doc.Reads.ReadRequests, doc.Reads.PageCacheBytes)
		// One READ an extent without the filler; with it, the few that
		// overtake it: 1 on a quiet machine, 129 with the CPUs busy.
		assert.LessOrEqual(t, doc.Reads.ReadRequests, int64(n/2), "READs")
		// Every extent but those cp read itself went in the page cache.
		assert.GreaterOrEqual(t, doc.Reads.PageCacheBytes, d.Allocated.Bytes()-doc.Reads.ReadRequests*length, "bytes stored ahead of cp")
	})
	t.Run("cp --sparse of long extents: the kernel reads ahead, nothing stored", func(t *testing.T) {
		long := sparseDisk(t, 16*mib, 4, 4*mib, mib)
		root, in := mountDisk(t, long)
		copySparse(t, in, long)
		assert.Zero(t, root.Document().Reads.PageCacheBytes, "bytes stored: the kernel's readahead has them")
	})
	t.Run("cp --sparse of long extents far apart: the kernel reads ahead little of the holes", func(t *testing.T) {
		const extents, stride, length = 8, 24 * mib, 8 * mib
		far := sparseDisk(t, extents*stride, extents, stride, length)
		root, in := mountDisk(t, far)
		copySparse(t, in, far)
		// What the kernel reads past an extent's end before cp seeks on
		// is a hole answered with zeros, each page allocated and copied:
		// with 4 MiB of read_ahead_kb that was 16 MiB an extent, twice
		// the data (scripts/bench.sh: 1 GiB of holes for 512 MiB of
		// data, cp 1.3x curl); with 1 MiB, 4 MiB an extent.
		holes := root.Document().Reads.HoleBytes
		t.Logf("%d extents of %d MiB: %d MiB of holes read", extents, length/mib, holes/mib)
		assert.LessOrEqual(t, holes, int64(extents*length), "hole bytes the kernel read ahead: no more than the data")
	})
	t.Run("cp --sparse of extents closer than minSeekHole: one sequential read, a sparse copy", func(t *testing.T) {
		// 4 KiB extents 4 KiB apart, then a long hole and one more.
		const n, stride, length = 2048, 8 << 10, 4096
		exts := make([]extent.Extent, 0, n+1)
		for i := range n {
			exts = append(exts, extent.Extent{Off: int64(i) * stride, Len: length})
		}
		exts = append(exts, extent.Extent{Off: 48 * mib, Len: length})
		close := mustDisk(t, "d", "xvda", 64*mib, 7, exts...)
		root, in := mountDisk(t, close)

		// lseek shows the close extents as one, the long hole as a hole;
		// st_blocks counts only the data.
		assert.Equal(t, []extent.Extent{{Off: 0, Len: (n-1)*stride + length}, {Off: 48 * mib, Len: length}}, testenv.SeekMap(t, in))
		blocks := strconv.Itoa((n + 1) * length / 512)
		assert.Equal(t, blocks, strings.TrimSpace(mustRun(t, "stat", "-c", "%b", in)))

		out := copySparse(t, in, close)
		// cp found the zeros it read and left them holes.
		assert.Equal(t, blocks, strings.TrimSpace(mustRun(t, "stat", "-c", "%b", out)), "blocks of the copy")
		doc := root.Document()
		assert.LessOrEqual(t, doc.Reads.ReadRequests, int64(64), "READs: 16 MiB read in 1 MiB READs, not one an extent")
		assert.LessOrEqual(t, doc.Reads.PageCacheBytes, int64(length), "bytes stored: the lone extent at most, the kernel's readahead has the rest")
		assert.LessOrEqual(t, doc.Fetches.Bytes, int64(n+1)*length*2, "bytes fetched: the data, never the holes")
	})
	t.Run("qemu-img map reads nothing", func(t *testing.T) {
		root, in := mountDisk(t, d)
		mustRun(t, "qemu-img", "map", "-f", "raw", in)
		doc := root.Document()
		assert.Zero(t, doc.Reads.PageCacheBytes, "bytes stored for a walk of the map")
		assert.Zero(t, doc.Fetches.Bytes, "bytes fetched for a walk of the map")
	})
}
