package main

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
	"github.com/vmexportfs/vmexportfs/backend/faultproxy"
)

// TestUnmountWithStalledRead: a read stalls on the backend, its reader is
// killed and the filesystem unmounted; the -f process must exit within a
// couple of seconds, cancelling the fetch that still retries for nobody. The
// kernel ends the FUSE session at the unmount only when no other mount
// namespace holds a copy of the mount; with one (any process that unshared
// its mount namespace after we mounted), the session, and before the fix the
// process with its retries, lived on as long as that namespace did.
func TestUnmountWithStalledRead(t *testing.T) {
	requireTools(t, "fusermount3", "unshare", "dd")
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-u", "unmount", coriolistest.DiskSpec{Name: "u.img", Device: "xvda", Size: 16 * mib})
	f.write("vm-u", "u.img", 0, 16*mib)
	sid := f.snapshot("vm-u")
	proxy, err := faultproxy.Start(faultproxy.Options{Upstream: f.sim.URL(), UpstreamCA: f.sim.CAPool(), Dir: t.TempDir(), StallFor: time.Minute})
	require.NoError(t, err)
	t.Cleanup(func() { proxy.Close() })

	const exitWithin = 3 * time.Second
	for _, tc := range []struct {
		name      string
		namespace bool // a copy of the mount lives in another mount namespace
		stop      string
	}{
		{"fusermount3 -u", false, "fusermount3"},
		{"fusermount3 -u, mount copied into another namespace", true, "fusermount3"},
		{"SIGTERM, mount copied into another namespace", true, "SIGTERM"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "mnt")
			require.NoError(t, os.Mkdir(dir, 0o755))
			// Each try of the stalled read waits 5 s, 5 tries: the fetch
			// would outlive the test's patience by far.
			m := startCommand(t, "-f", "--username", "admin", "--password-file", f.passwordFile, "--ca-file", proxy.CAFile(),
				"--state-dir", f.stateDir, "--cache-dir", t.TempDir(), "--read-timeout", "5s", "--retries", "5",
				"coriolis+"+proxy.URL(), dir)
			m.dir = dir
			if tc.namespace {
				ns := exec.Command("unshare", "--mount", "sleep", "60")
				require.NoError(t, ns.Start())
				t.Cleanup(func() { ns.Process.Kill(); ns.Wait() }) // before the mount's cleanup
				// unshare copies the mount table before it runs sleep.
				require.Eventually(t, func() bool {
					own, _ := os.Readlink("/proc/self/ns/mnt")
					theirs, _ := os.Readlink("/proc/" + strconv.Itoa(ns.Process.Pid) + "/ns/mnt")
					return theirs != "" && theirs != own
				}, 5*time.Second, 10*time.Millisecond)
				time.Sleep(50 * time.Millisecond)
			}

			proxy.Set(faultproxy.Stall, 1)
			t.Cleanup(func() { proxy.Set(faultproxy.None, 0) })
			before := proxy.Requests()
			dd := exec.Command("dd", "if="+m.path("vms", "vm-u", "snapshots", sid, "disk.img"), "of=/dev/null", "bs=1M")
			require.NoError(t, dd.Start())
			require.Eventually(t, func() bool { return proxy.Requests() > before }, 5*time.Second, 10*time.Millisecond, "the read reaches the backend")
			time.Sleep(200 * time.Millisecond)
			require.NoError(t, dd.Process.Kill())
			_ = dd.Wait()

			switch tc.stop {
			case "fusermount3":
				// The killed reader's file is released a moment later.
				require.Eventually(t, func() bool {
					_, err := toolErr("fusermount3", "-u", dir)
					return err == nil
				}, 5*time.Second, 20*time.Millisecond, "fusermount3 -u")
			case "SIGTERM":
				require.NoError(t, m.cmd.Process.Signal(syscall.SIGTERM))
			}
			stopped := time.Now()
			select {
			case <-m.done:
				t.Logf("exited %v after %s", time.Since(stopped).Round(time.Millisecond), tc.stop)
			case <-time.After(exitWithin):
				t.Fatalf("vmexportfs still running %v after %s during a stalled read\nlogs:\n%s", exitWithin, tc.stop, m.logs.String())
			}
			assert.True(t, m.cmd.ProcessState.Success(), "exit status %v", m.cmd.ProcessState)
			logs := m.logs.String()
			assert.Contains(t, logs, "context canceled", "the stalled fetch is cancelled, not left to retry")
			if tc.namespace {
				assert.Contains(t, logs, "mount gone from this mount namespace")
				assert.Contains(t, logs, "not open in any process of this mount namespace")
			}
		})
	}
}

// TestLazyUnmountServesOpenFiles: SIGTERM while a file is open detaches the
// mount lazily; the open file is served to its end (here with a copy of the
// mount in another namespace, which keeps the kernel session alive), and the
// process exits once it is closed.
func TestLazyUnmountServesOpenFiles(t *testing.T) {
	requireTools(t, "unshare")
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-l", "lazy", coriolistest.DiskSpec{Name: "l.img", Device: "xvda", Size: 8 * mib})
	f.write("vm-l", "l.img", 0, 8*mib)
	sid := f.snapshot("vm-l")
	m := f.mount()
	ns := exec.Command("unshare", "--mount", "sleep", "60")
	require.NoError(t, ns.Start())
	t.Cleanup(func() { ns.Process.Kill(); ns.Wait() })

	file, err := os.Open(m.path("vms", "vm-l", "snapshots", sid, "disk.img"))
	require.NoError(t, err)
	defer file.Close()
	head := make([]byte, mib)
	_, err = io.ReadFull(file, head)
	require.NoError(t, err)
	require.NoError(t, m.cmd.Process.Signal(syscall.SIGTERM))
	require.Eventually(t, func() bool { return strings.Contains(m.logs.String(), "mount gone from this mount namespace") }, 5*time.Second, 10*time.Millisecond)
	time.Sleep(1500 * time.Millisecond) // past a scan of who holds files open
	select {
	case <-m.done:
		t.Fatalf("exited with a file open:\n%s", m.logs.String())
	default:
	}
	rest, err := io.ReadAll(file)
	require.NoError(t, err, "the open file is served after the lazy unmount")
	assert.Equal(t, sha256File(t, f.source("vm-l", sid, "l.img")), sha256Bytes(append(head, rest...)))
	require.NoError(t, file.Close())
	stopped := time.Now()
	select {
	case <-m.done:
		t.Logf("exited %v after the last close", time.Since(stopped).Round(time.Millisecond))
	case <-time.After(3 * time.Second):
		t.Fatalf("vmexportfs still running 3 s after the last open file was closed\nlogs:\n%s", m.logs.String())
	}
}
