package testenv

import (
	"fmt"
	"os"
	"strings"
	"testing"
)

// recorder is a testing.TB that records how a helper stopped the test
// instead of stopping it.
type recorder struct {
	testing.TB
	failed, skipped string
}

func (r *recorder) Helper()           {}
func (r *recorder) Fatal(args ...any) { r.failed = fmt.Sprint(args...) }
func (r *recorder) Skip(args ...any)  { r.skipped = fmt.Sprint(args...) }

func TestMissingToolFails(t *testing.T) {
	t.Setenv(AllowSkipEnv, "")
	var r recorder
	RequireTool(&r, "sh", "vmexportfs-no-such-tool", "qemu-img-no-such", "vhdimount")
	if r.skipped != "" {
		t.Fatalf("skipped without %s: %s", AllowSkipEnv, r.skipped)
	}
	for _, want := range []string{"vmexportfs-no-such-tool", "qemu-img-no-such", AllowSkipEnv + "=1"} {
		if !strings.Contains(r.failed, want) {
			t.Errorf("failure %q does not mention %q", r.failed, want)
		}
	}
	if strings.Contains(r.failed, "sh,") || strings.Contains(r.failed, " sh ") {
		t.Errorf("failure %q names a tool that is installed", r.failed)
	}
}

func TestMissingToolNamesPackage(t *testing.T) {
	t.Setenv(AllowSkipEnv, "")
	t.Setenv("PATH", t.TempDir()) // nothing is installed
	var r recorder
	RequireTool(&r, "qemu-img", "qemu-io", "getfattr")
	want := "this test needs qemu-img, qemu-io, getfattr in PATH: apt-get install qemu-utils attr"
	if !strings.HasPrefix(r.failed, want) {
		t.Errorf("failure %q, want it to start with %q", r.failed, want)
	}
}

func TestInstalledToolPasses(t *testing.T) {
	var r recorder
	RequireTool(&r, "sh")
	if r.failed != "" || r.skipped != "" {
		t.Errorf("sh is installed, yet failed %q skipped %q", r.failed, r.skipped)
	}
}

func TestOptOutSkips(t *testing.T) {
	t.Setenv(AllowSkipEnv, "1")
	var r recorder
	RequireTool(&r, "vmexportfs-no-such-tool")
	if r.failed != "" || !strings.Contains(r.skipped, "vmexportfs-no-such-tool") {
		t.Errorf("with %s=1: failed %q skipped %q", AllowSkipEnv, r.failed, r.skipped)
	}
}

// TestRequireRoot: as root with /dev/fuse the test goes on; otherwise it
// fails naming root or /dev/fuse.
func TestRequireRoot(t *testing.T) {
	t.Setenv(AllowSkipEnv, "")
	var r recorder
	RequireRoot(&r)
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err == nil {
		f.Close()
	}
	switch {
	case os.Geteuid() != 0:
		if !strings.Contains(r.failed, "root to mount FUSE filesystems (euid is") {
			t.Errorf("not root, yet failed %q", r.failed)
		}
	case err != nil:
		if !strings.Contains(r.failed, "/dev/fuse") {
			t.Errorf("no usable /dev/fuse, yet failed %q", r.failed)
		}
	case r.failed != "" || r.skipped != "":
		t.Errorf("root with /dev/fuse, yet failed %q skipped %q", r.failed, r.skipped)
	}
}
