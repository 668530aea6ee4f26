package fs

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// MountOptions configure the kernel side of the mount.
type MountOptions struct {
	AllowOther, Debug bool
	FsName            string // default "vmexportfs"
	ReadAheadKB       int    // default 1024
	// ReadOnly mounts ro: the kernel refuses every change before it
	// reaches the filesystem, mkdir and rmdir of snapshots included.
	ReadOnly bool
}

// Mount serves root at dir and returns once the mount is visible. Stop it
// with server.Unmount.
func Mount(dir string, root *Root, mo MountOptions) (*fuse.Server, error) {
	if root == nil {
		return nil, fmt.Errorf("mount %s: nil root", dir)
	}
	if mo.FsName == "" {
		mo.FsName = "vmexportfs"
	}
	if mo.ReadAheadKB <= 0 {
		// As large as one READ (max_pages, 1 MiB): more brings no larger
		// requests, only more of the hole after each extent read ahead
		// (about four windows an extent) and answered page by page
		// before cp seeks past it. 4 MiB read 1 GiB of holes in a cp of
		// scripts/bench.sh's 512 MiB and made it 1.3x curl's time.
		mo.ReadAheadKB = 1024
	}
	// Snapshot contents are immutable: long timeouts by default; listings
	// set their own short ones, and misses expire fast so new snapshots show.
	long, negative := immutableTimeout, time.Second
	// The kernel checks modes, so 0444/0555 hold for every user.
	options := []string{"default_permissions"}
	var flags uintptr // go-fuse's default for a direct mount
	if mo.ReadOnly {
		// "ro" for fusermount3, the flag for a direct mount(2).
		options = append(options, "ro")
		flags = unix.MS_NOSUID | unix.MS_NODEV | unix.MS_RDONLY
	}
	opts := &gofs.Options{
		MountOptions: fuse.MountOptions{
			AllowOther:    mo.AllowOther,
			Debug:         mo.Debug,
			FsName:        mo.FsName,
			Name:          "vmexportfs",
			MaxWrite:      1 << 20,
			MaxBackground: 64,
			// Reads are answered from memory: splicing them through a pipe
			// buys nothing and fails for 1 MiB replies (pipe-max-size).
			DisableSplice: true,
			// READDIRPLUS would look up every entry a readdir returns:
			// `ls` or `find` would then size every disk.img.gz (compressing
			// it) and open every delta. Plain readdir leaves that to stat.
			DisableReadDirPlus: true,
			MaxReadAhead:       mo.ReadAheadKB << 10,
			DirectMount:        os.Geteuid() == 0, // falls back to fusermount3
			DirectMountFlags:   flags,
			Options:            options,
			// --debug output goes where every other log line goes, through
			// the same handler (and so the same redaction of secrets).
			Logger: slog.NewLogLogger(root.st.log.Handler(), slog.LevelInfo),
		},
		EntryTimeout:    &long,
		AttrTimeout:     &long,
		NegativeTimeout: &negative,
		UID:             root.st.uid,
		GID:             root.st.gid,
	}
	server, err := gofs.Mount(dir, root, opts)
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	if err := raiseReadAhead(dir, mo.ReadAheadKB); err != nil {
		root.st.log.Debug("fs: could not raise bdi read_ahead_kb", "dir", dir, "err", err)
	}
	return server, nil
}

// raiseReadAhead lets sequential reads arrive in large requests; the FUSE
// init reply can only lower the bdi window, so it is set through sysfs.
func raiseReadAhead(dir string, kb int) error {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return fmt.Errorf("stat mountpoint: %w", err)
	}
	bdi := filepath.Join("/sys/class/bdi", fmt.Sprintf("%d:%d", unix.Major(st.Dev), unix.Minor(st.Dev)), "read_ahead_kb")
	if err := os.WriteFile(bdi, []byte(strconv.Itoa(kb)), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", bdi, err)
	}
	return nil
}
