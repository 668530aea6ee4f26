// Package testenv checks what a test needs from the machine: root and a
// usable /dev/fuse to mount, installed tools to drive. A test whose needs
// are not met fails, saying what is missing and how to install it, since a
// test that skips on a machine without them reads as a pass in a run's
// summary. Setting VMEXPORTFS_ALLOW_SKIP=1 turns these failures into skips,
// for a run that knowingly lacks them (a developer's machine without root).
package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// AllowSkipEnv, set to 1, lets a test whose needs are not met skip instead
// of failing.
const AllowSkipEnv = "VMEXPORTFS_ALLOW_SKIP"

// debianPackages names the Debian package of each tool the tests drive, for
// the message that says how to install a missing one.
var debianPackages = map[string]string{
	"qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "qemu-nbd": "qemu-utils",
	"nbdkit":      "nbdkit",
	"fusermount3": "fuse3",
	"getfattr":    "attr", "setfattr": "attr",
	"vhdimount": "libvhdi-utils", "vhdiinfo": "libvhdi-utils",
	"rsync": "rsync", "pigz": "pigz", "gzip": "gzip", "curl": "curl", "tar": "tar", "python3": "python3",
}

// RequireRoot stops t unless it can mount FUSE filesystems: it runs as root
// and can open /dev/fuse.
func RequireRoot(t testing.TB) {
	t.Helper()
	if euid := os.Geteuid(); euid != 0 {
		Missing(t, fmt.Sprintf("root to mount FUSE filesystems (euid is %d)", euid), "run the tests as root (sudo make test)")
		return
	}
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		Missing(t, "a usable /dev/fuse ("+err.Error()+")", "load the module (modprobe fuse); in a container, pass the device (--device /dev/fuse)")
		return
	}
	f.Close()
}

// RequireTool stops t unless every named tool is in PATH.
func RequireTool(t testing.TB, names ...string) {
	t.Helper()
	var missing, pkgs []string
	for _, name := range names {
		if _, err := exec.LookPath(name); err == nil {
			continue
		}
		missing = append(missing, name)
		if pkg, ok := debianPackages[name]; ok && !slices.Contains(pkgs, pkg) {
			pkgs = append(pkgs, pkg)
		}
	}
	if len(missing) == 0 {
		return
	}
	how := "install it"
	if len(pkgs) > 0 {
		how = "apt-get install " + strings.Join(pkgs, " ") + " (scripts/setup.sh installs what the tests need)"
	}
	Missing(t, strings.Join(missing, ", ")+" in PATH", how)
}

// Missing stops t because the machine lacks what (a requirement the other
// helpers do not cover); how says how to provide it. t fails, unless
// AllowSkipEnv is 1: then it skips.
func Missing(t testing.TB, what, how string) {
	t.Helper()
	msg := "this test needs " + what + ": " + how
	if os.Getenv(AllowSkipEnv) == "1" {
		t.Skip(msg + " (skipped: " + AllowSkipEnv + "=1)")
		return
	}
	t.Fatal(msg + "; or set " + AllowSkipEnv + "=1 to skip such tests")
}

// SeekMap is the SEEK_DATA/SEEK_HOLE map of the file at path, as a reader
// that skips holes sees it.
func SeekMap(t testing.TB, path string) []extent.Extent {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("seek map: %v", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatalf("seek map: %v", err)
	}
	var out []extent.Extent
	for off := int64(0); off < st.Size(); {
		start, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			t.Fatalf("seek map: SEEK_DATA %d of %s: %v", off, path, err)
		}
		end, err := unix.Seek(int(f.Fd()), start, unix.SEEK_HOLE)
		if err != nil {
			t.Fatalf("seek map: SEEK_HOLE %d of %s: %v", start, path, err)
		}
		out = append(out, extent.Extent{Off: start, Len: end - start})
		off = end
	}
	return out
}
