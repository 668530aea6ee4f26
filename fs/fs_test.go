package fs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/backendtest"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/testenv"
	"github.com/vmexportfs/vmexportfs/cache"
)

const mib = 1 << 20

func mustDisk(t *testing.T, id, dev string, size int64, seed byte, exts ...extent.Extent) *backendtest.Disk {
	t.Helper()
	d, err := backendtest.NewDisk(id, dev, size, seed, exts...)
	require.NoError(t, err)
	return d
}

// fixture is two good VMs plus hostile ones that must be skipped.
func fixture(t *testing.T) *backendtest.Source {
	t.Helper()
	d1 := mustDisk(t, "d2", "xvda", 4*mib, 1, extent.Extent{Off: 0, Len: 64 << 10}, extent.Extent{Off: mib + 4096, Len: 300 << 10}, extent.Extent{Off: 3*mib + 12345, Len: 1000})
	d2 := mustDisk(t, "d2", "xvda", 4*mib, 2, extent.Extent{Off: 0, Len: 64 << 10}, extent.Extent{Off: 2 * mib, Len: 128 << 10})
	changed, err := extent.Normalize([]extent.Extent{{Off: 2 * mib, Len: 128 << 10}}, 4*mib)
	require.NoError(t, err)
	d2.Changed = map[string]extent.Map{"s1": changed}
	bA := mustDisk(t, "db-a", "xvda", mib, 3, extent.Extent{Off: 4096, Len: 8192})
	bB := mustDisk(t, "db-b", "xvdb", mib, 4, extent.Extent{Off: 0, Len: mib})
	return backendtest.New(
		&backendtest.VM{ID: "vm-a", Name: "alpha", Snapshots: []*backendtest.Snapshot{
			{Snapshot: backend.Snapshot{ID: "s1", Name: "first"}, Disks: []*backendtest.Disk{d1}},
			{Snapshot: backend.Snapshot{ID: "s2"}, Disks: []*backendtest.Disk{d2}},
			{Snapshot: backend.Snapshot{ID: "s3", Name: "first"}, Disks: []*backendtest.Disk{d2}}, // duplicate name
			{Snapshot: backend.Snapshot{ID: "bad/snap"}, Disks: []*backendtest.Disk{d2}},
		}},
		&backendtest.VM{ID: "vm-b", Name: "beta", Snapshots: []*backendtest.Snapshot{
			{Snapshot: backend.Snapshot{ID: "m1"}, Disks: []*backendtest.Disk{bA, bB}},
		}},
		&backendtest.VM{ID: "bad/id", Name: "gamma"},
		&backendtest.VM{ID: ".."},
		&backendtest.VM{ID: "nul\x00id"},
		&backendtest.VM{ID: strings.Repeat("L", 4096)},
		&backendtest.VM{ID: "vm-a", Name: "dup"},
		&backendtest.VM{ID: "vm-c", Name: "x/y"},
	)
}

func mountWith(t *testing.T, src backend.Source, opts Options) string {
	t.Helper()
	root, err := NewRoot(src, opts)
	require.NoError(t, err)
	return mountRoot(t, root)
}

// mountRoot mounts a tree the test has set up; the cleanup unmounts it.
func mountRoot(t *testing.T, root *Root) string {
	t.Helper()
	testenv.RequireRoot(t)
	mnt := t.TempDir()
	srv, err := Mount(mnt, root, MountOptions{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = srv.Unmount() })
	return mnt
}

func mountTest(t *testing.T, src backend.Source) string { return mountWith(t, src, Options{}) }

// run runs a tool as a child (the serving process must not use its own mount).
func run(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String() + errb.String(), err
	}
	return out.String(), nil
}

func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := run(t, name, args...)
	require.NoError(t, err, "%s %v: %s", name, args, out)
	return out
}

func lines(s string) []string {
	f := strings.Fields(s)
	sort.Strings(f)
	return f
}

func TestTree(t *testing.T) {
	src := fixture(t)
	mnt := mountTest(t, src)
	tests := []struct {
		dir  string
		want []string
	}{
		{"vms", []string{"vm-a", "vm-b", "vm-c"}},
		{"vms/vm-a/snapshots", []string{"first", "s2"}},
		{"vms/vm-a/snapshots/first", []string{"disk.img", "disk.img.gz", "disk.vhd"}},
		{"vms/vm-a/snapshots/s1", []string{"disk.img", "disk.img.gz", "disk.vhd"}}, // raw id
		{"vms/vm-a/snapshots/s2", []string{"delta-from-first.vhd", "disk.img", "disk.img.gz", "disk.vhd"}},
		{"vms/vm-b/snapshots/m1", []string{"xvda", "xvdb"}},
		{"vms/vm-b/snapshots/m1/xvdb", []string{"disk.img", "disk.img.gz", "disk.vhd"}},
		{"by-name", []string{"alpha", "beta"}},
		{"by-name/alpha/snapshots", []string{"first", "s2"}},
	}
	for _, tc := range tests {
		t.Run(tc.dir, func(t *testing.T) {
			assert.Equal(t, tc.want, lines(mustRun(t, "ls", "-1", filepath.Join(mnt, tc.dir))))
		})
	}
	assert.Equal(t, "4096 255\n", mustRun(t, "stat", "-f", "-c", "%S %l", filepath.Join(mnt, "vms/vm-a/snapshots/first/disk.img")))
	assert.Equal(t, "../vms/vm-a\n", mustRun(t, "readlink", filepath.Join(mnt, "by-name/alpha")))
	assert.Equal(t, "s1", mustRun(t, "getfattr", "--only-values", "-n", "user.vmexport.snapshot", filepath.Join(mnt, "vms/vm-a/snapshots/first")))
	assert.Equal(t, "vm-a", mustRun(t, "getfattr", "--only-values", "-n", "user.vmexport.vm", filepath.Join(mnt, "vms/vm-a")))
}

func sha(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestSparseTools(t *testing.T) {
	src := fixture(t)
	want := sha256.Sum256(mustDisk(t, "d1", "xvda", 4*mib, 1, extent.Extent{Off: 0, Len: 64 << 10}, extent.Extent{Off: mib + 4096, Len: 300 << 10}, extent.Extent{Off: 3*mib + 12345, Len: 1000}).Data)
	alloc := int64(64<<10 + 300<<10 + 1000)
	tools := []struct {
		name string
		copy func(t *testing.T, in, dir string) string
	}{
		{"cp", func(t *testing.T, in, dir string) string {
			out := filepath.Join(dir, "out.img")
			mustRun(t, "cp", "--sparse=always", in, out)
			return out
		}},
		{"tar", func(t *testing.T, in, dir string) string {
			mustRun(t, "tar", "-S", "-cf", filepath.Join(dir, "a.tar"), "-C", filepath.Dir(in), "disk.img")
			mustRun(t, "tar", "-xf", filepath.Join(dir, "a.tar"), "-C", dir)
			return filepath.Join(dir, "disk.img")
		}},
		{"qemu-img", func(t *testing.T, in, dir string) string {
			out := filepath.Join(dir, "q.raw")
			mustRun(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", in, out)
			return out
		}},
	}
	for _, tc := range tools {
		t.Run(tc.name, func(t *testing.T) {
			// A fresh mount per tool: the page cache must not hide fetches.
			src := fixture(t)
			mnt := mountTest(t, src)
			in := filepath.Join(mnt, "vms/vm-a/snapshots/first/disk.img")
			out := tc.copy(t, in, t.TempDir())
			assert.Equal(t, hex.EncodeToString(want[:]), sha(t, out))
			assert.Equal(t, alloc, src.Calls.BytesRead.Load(), "only allocated bytes are fetched")
		})
	}
	t.Run("cp through the block cache", func(t *testing.T) {
		src := fixture(t)
		const block = 64 << 10
		mnt := mountWith(t, src, Options{Cache: cache.New(cache.Options{Capacity: 16 * mib, BlockSize: block})})
		out := filepath.Join(t.TempDir(), "out.img")
		mustRun(t, "cp", "--sparse=always", filepath.Join(mnt, "vms/vm-a/snapshots/first/disk.img"), out)
		assert.Equal(t, hex.EncodeToString(want[:]), sha(t, out))
		// Blocks may round each of the 3 extents out, never fetch whole holes.
		assert.LessOrEqual(t, src.Calls.BytesRead.Load(), alloc+3*2*block)
	})
	mnt := mountTest(t, src)
	in := filepath.Join(mnt, "vms/vm-a/snapshots/first/disk.img")
	st := strings.Fields(mustRun(t, "stat", "-c", "%s %b %B", in))
	assert.Equal(t, []string{strconv.Itoa(4 * mib), strconv.FormatInt((65536+307200+4096)/512, 10), "512"}, st)
}

func TestLseek(t *testing.T) {
	testenv.RequireTool(t, "python3")
	mnt := mountTest(t, fixture(t))
	in := filepath.Join(mnt, "vms/vm-a/snapshots/first/disk.img")
	script := `
import os, sys, errno
fd = os.open(sys.argv[1], os.O_RDONLY)
def q(off, wh):
    try: return str(os.lseek(fd, off, wh))
    except OSError as e: return errno.errorcode[e.errno]
print(" ".join([q(0, os.SEEK_DATA), q(0, os.SEEK_HOLE), q(70000, os.SEEK_DATA), q(1048577, os.SEEK_HOLE),
  q(3*1048576+13346, os.SEEK_DATA), q(4*1048576, os.SEEK_DATA), q(4*1048576, os.SEEK_HOLE), q(3*1048576+12345, os.SEEK_HOLE)]))
`
	out := mustRun(t, "python3", "-c", script, in)
	want := []string{"0", "65536", strconv.Itoa(mib + 4096), "1048577", strconv.Itoa(3*mib + 13346), "ENXIO", "ENXIO", "3162112"}
	assert.Equal(t, want, strings.Fields(out))
}

func TestXattrs(t *testing.T) {
	testenv.RequireTool(t, "python3", "getfattr")
	src := fixture(t)
	// Enough 4 KiB extents that the map text exceeds one 64 KiB xattr.
	const bigSize = 48 * mib
	big := mustDisk(t, "big", "xvda", bigSize, 5)
	var exts []extent.Extent
	for off := int64(0); off < bigSize; off += 8192 {
		exts = append(exts, extent.Extent{Off: off, Len: 4096})
	}
	m, err := extent.Normalize(exts, bigSize)
	require.NoError(t, err)
	big.Allocated = m
	src.AddVM(&backendtest.VM{ID: "vm-big", Snapshots: []*backendtest.Snapshot{{Snapshot: backend.Snapshot{ID: "b1"}, Disks: []*backendtest.Disk{big}}}})
	mnt := mountTest(t, src)
	s2 := filepath.Join(mnt, "vms/vm-a/snapshots/s2/disk.img")

	dump := mustRun(t, "getfattr", "-d", "-m", "-", s2)
	for _, want := range []string{`user.vmexport.vm="vm-a"`, `user.vmexport.snapshot="s2"`, `user.vmexport.disk="d2"`, "user.vmexport.extents=", "user.vmexport.changed.first="} {
		assert.Contains(t, dump, want)
	}
	// The base is listed by the name shown in the tree (s1 is shown as
	// "first"), not by its id.
	assert.NotContains(t, dump, "user.vmexport.changed.s1=")
	for _, base := range []string{"s1", "first"} {
		out := mustRun(t, "getfattr", "--only-values", "-n", "user.vmexport.changed."+base, s2)
		assert.Equal(t, "2097152 131072\n", out)
	}
	out, err := run(t, "getfattr", "-n", "user.vmexport.changed.nosuch", s2)
	require.Error(t, err)
	assert.Contains(t, out, "No such attribute")

	bigPath := filepath.Join(mnt, "vms/vm-big/snapshots/b1/disk.img")
	out, err = run(t, "getfattr", "-n", "user.vmexport.extents", bigPath)
	require.Error(t, err)
	assert.Contains(t, out, "Argument list too long")

	got, err := ReadMap(bigPath, "")
	require.NoError(t, err)
	assert.Equal(t, m.Extents(), got)
	got, err = ReadMap(s2, "first")
	require.NoError(t, err)
	assert.Equal(t, []extent.Extent{{Off: 2 * mib, Len: 128 << 10}}, got)

	// ERANGE: a too-small buffer gets the needed size.
	script := `
import ctypes, sys, errno
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(3)
n = libc.getxattr(sys.argv[1].encode(), b"user.vmexport.vm", buf, 3)
print(n, errno.errorcode.get(ctypes.get_errno(), "0"), libc.getxattr(sys.argv[1].encode(), b"user.vmexport.vm", None, 0))
`
	assert.Equal(t, "-1 ERANGE 4\n", mustRun(t, "python3", "-c", script, s2))
}

func TestReadOnly(t *testing.T) {
	src := fixture(t)
	mnt := mountTest(t, src)
	f := filepath.Join(mnt, "vms/vm-a/snapshots/first/disk.img")
	for _, cmd := range []string{
		"echo x >> " + f,
		"echo x > " + f,
		"touch " + filepath.Join(mnt, "vms/vm-a/snapshots/first/new"),
		"rm " + f,
		"mkdir " + filepath.Join(mnt, "vms/newvm"),
		"setfattr -n user.x -v 1 " + f,
	} {
		out, err := run(t, "sh", "-c", cmd)
		require.Error(t, err, cmd)
		assert.Contains(t, out, "Read-only file system", cmd)
	}
}

func TestReadErrorIsEIO(t *testing.T) {
	src := fixture(t)
	mnt := mountTest(t, src)
	src.SetReadErr(backend.ErrUnavailable)
	out, err := run(t, "cat", filepath.Join(mnt, "vms/vm-b/snapshots/m1/xvdb/disk.img"))
	require.Error(t, err)
	assert.Contains(t, out, "Input/output error")
}

func TestMkdirRmdir(t *testing.T) {
	src := fixture(t)
	stateDir := filepath.Join(t.TempDir(), "state")
	mnt := mountWith(t, src, Options{StateDir: stateDir})
	snaps := filepath.Join(mnt, "vms/vm-a/snapshots")
	cases := []struct {
		name, wantErr string
	}{
		{"-bad", "Invalid argument"},
		{"has space", "Invalid argument"},
		{"first", "File exists"},
		{"mine", ""},
		{"mine", "File exists"},
	}
	for _, tc := range cases {
		out, err := run(t, "mkdir", filepath.Join(snaps, tc.name))
		if tc.wantErr == "" {
			require.NoError(t, err, out)
		} else {
			require.Error(t, err, tc.name)
			assert.Contains(t, out, tc.wantErr, tc.name)
		}
	}
	assert.Contains(t, lines(mustRun(t, "ls", snaps)), "mine")
	mustRun(t, "cmp", filepath.Join(snaps, "mine/disk.img"), filepath.Join(snaps, "s2/disk.img"))

	// Survives a remount with the same state dir.
	mnt2 := mountWith(t, src, Options{StateDir: stateDir})
	snaps2 := filepath.Join(mnt2, "vms/vm-a/snapshots")
	assert.Contains(t, lines(mustRun(t, "ls", snaps2)), "mine")
	mustRun(t, "rmdir", filepath.Join(snaps2, "mine"))
	assert.NotContains(t, lines(mustRun(t, "ls", snaps2)), "mine")
	assert.Equal(t, int64(1), src.Calls.Deletes.Load())

	// Without the capability: EROFS.
	ro := mountTest(t, backendtest.ReadOnly{S: fixture(t)})
	out, err := run(t, "mkdir", filepath.Join(ro, "vms/vm-a/snapshots/x"))
	require.Error(t, err)
	assert.Contains(t, out, "Read-only file system")
}

// sizedDisk is a disk that claims any size and holds no data.
type sizedDisk struct{ size int64 }

func (d sizedDisk) Size() int64           { return d.size }
func (d sizedDisk) Allocated() extent.Map { return extent.Map{} }
func (d sizedDisk) Close() error          { return nil }
func (d sizedDisk) ReadAt(_ context.Context, p []byte, _ int64) error {
	clear(p)
	return nil
}

// sizedSource answers OpenDisk of disk "d2" in snapshot s2 with a claimed size.
type sizedSource struct {
	*backendtest.Source
	size int64
}

func (s sizedSource) OpenDisk(ctx context.Context, ref backend.DiskRef) (backend.Disk, error) {
	if ref.Snapshot == "s2" {
		return sizedDisk{s.size}, nil
	}
	return s.Source.OpenDisk(ctx, ref)
}

// TestHostileDiskSizes: a size of 0 is an empty disk; a huge or negative
// one is refused with a logged reason; the rest of the tree keeps working.
func TestHostileDiskSizes(t *testing.T) {
	for _, tc := range []struct {
		name  string
		size  int64
		files []string // "" = the lookup fails
	}{
		{"zero", 0, []string{"delta-from-first.vhd", "disk.img", "disk.img.gz", "disk.vhd"}},
		{"beyond gzip and vhd", 20 << 40, []string{"disk.img"}},
		{"2^63-1", math.MaxInt64, nil},
		{"negative", -1, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A file, not a buffer: listings ahead of the walk log while
			// the test reads.
			logs, err := os.Create(filepath.Join(t.TempDir(), "log"))
			require.NoError(t, err)
			defer logs.Close()
			mnt := mountWith(t, sizedSource{fixture(t), tc.size}, Options{Logger: slog.New(slog.NewTextHandler(logs, nil))})
			dir := filepath.Join(mnt, "vms/vm-a/snapshots/s2")
			out, err := run(t, "ls", dir)
			if tc.files == nil {
				require.Error(t, err)
				assert.Contains(t, out, "Invalid argument")
				logged, err := os.ReadFile(logs.Name())
				require.NoError(t, err)
				assert.Contains(t, string(logged), "implausible size")
			} else {
				require.NoError(t, err, out)
				assert.Equal(t, tc.files, lines(out))
				assert.Equal(t, fmt.Sprintf("%d\n", tc.size), mustRun(t, "stat", "-c", "%s", filepath.Join(dir, "disk.img")))
			}
			// The other snapshot is unaffected.
			assert.Contains(t, mustRun(t, "ls", filepath.Join(mnt, "vms/vm-a/snapshots/first")), "disk.img")
		})
	}
}

// TestToErrno: platform faults are EIO whatever errno sits inside them, so a
// reader never sees a network errno such as ECONNRESET.
func TestToErrno(t *testing.T) {
	netErr := &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}
	st := &state{log: slog.New(slog.DiscardHandler)}
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name string
		ctx  context.Context
		err  error
		want syscall.Errno
	}{
		{"nil", context.Background(), nil, 0},
		{"not found", context.Background(), fmt.Errorf("x: %w", backend.ErrNotFound), syscall.ENOENT},
		{"permission", context.Background(), fmt.Errorf("x: %w", backend.ErrPermission), syscall.EACCES},
		{"reset after retries", context.Background(), fmt.Errorf("read: %w after 4 attempts: %w", backend.ErrUnavailable, netErr), syscall.EIO},
		{"refused", context.Background(), fmt.Errorf("%w: %w", backend.ErrUnavailable, syscall.ECONNREFUSED), syscall.EIO},
		{"local errno", context.Background(), fmt.Errorf("write index: %w", syscall.ENOSPC), syscall.ENOSPC},
		{"unknown", context.Background(), errors.New("odd"), syscall.EIO},
		{"reader gone", canceled, fmt.Errorf("%w", backend.ErrUnavailable), syscall.EINTR},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, st.toErrno(tc.ctx, "read", "/x", tc.err))
		})
	}
}
