package main

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
)

// isMounted reads the mount table now, with no retry: what systemd and
// mount(8) rely on is that the mount is there when readiness is said.
func isMounted(t *testing.T, dir string) bool {
	t.Helper()
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	require.NoError(t, err)
	return strings.Contains(string(mounts), " "+dir+" ")
}

// TestSystemdNotifyProtocol runs `vmexportfs -f` as systemd runs a
// Type=notify service: $NOTIFY_SOCKET names a datagram socket, READY=1
// arrives once the mount is in the mount table (not before), and STOPPING=1
// when SIGTERM unmounts it. This is the protocol itself, so it runs where
// systemd does not (this machine's PID 1 is not systemd).
func TestSystemdNotifyProtocol(t *testing.T) {
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-n", "n", coriolistest.DiskSpec{Name: "n.img", Device: "xvda", Size: 4 * mib})
	f.snapshot("vm-n")
	for _, abstract := range []bool{false, true} {
		name := map[bool]string{false: "path", true: "abstract"}[abstract]
		t.Run(name, func(t *testing.T) {
			sockPath := filepath.Join(t.TempDir(), "notify")
			env := sockPath
			if abstract {
				sockPath = "\x00vmexportfs-test-" + filepath.Base(t.TempDir())
				env = "@" + sockPath[1:]
			}
			sock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
			require.NoError(t, err)
			defer sock.Close()
			mnt := t.TempDir()
			args := append(append([]string{"-f"}, f.mountArgs()...), "coriolis+"+f.sim.URL(), mnt)
			cmd := exec.Command(os.Args[0], args...)
			cmd.Env = append(os.Environ(), asCommandEnv+"=1", notifySocketEnv+"="+env)
			var logs bytes.Buffer
			cmd.Stdout, cmd.Stderr = &logs, &logs
			require.NoError(t, cmd.Start())
			t.Cleanup(func() { exec.Command("fusermount3", "-u", "-z", mnt).Run() })

			read := func() string {
				buf := make([]byte, 4096)
				require.NoError(t, sock.SetReadDeadline(time.Now().Add(30*time.Second)))
				n, err := sock.Read(buf)
				require.NoError(t, err, "no notification; logs:\n%s", logs.String())
				return string(buf[:n])
			}
			ready := read()
			mountedAtReady := isMounted(t, mnt)
			assert.Contains(t, strings.Split(ready, "\n"), "READY=1")
			assert.True(t, mountedAtReady, "READY=1 before the mount was there")
			assert.Equal(t, "n\n", tool(t, "ls", filepath.Join(mnt, "by-name")))

			require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
			assert.Equal(t, "STOPPING=1", read())
			require.NoError(t, cmd.Wait(), logs.String())
			assert.False(t, isMounted(t, mnt))
		})
	}
}

// TestForkingReadiness is systemd's Type=forking protocol (and mount(8)'s):
// the command returns 0 only once the mount is there, leaving a daemon in
// a session of its own that serves it; a failure returns non-zero and
// leaves nothing mounted.
func TestForkingReadiness(t *testing.T) {
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-k", "k", coriolistest.DiskSpec{Name: "k.img", Device: "xvda", Size: 4 * mib})
	f.snapshot("vm-k")
	mnt := t.TempDir()
	logFile := filepath.Join(t.TempDir(), "log")
	args := append(f.mountArgs(), "--log-file", logFile, "coriolis+"+f.sim.URL(), mnt)
	out, err := runTool(os.Args[0], args, asCommandEnv+"=1")
	mountedAtExit := isMounted(t, mnt)
	require.NoError(t, err, out)
	t.Cleanup(func() { exec.Command("fusermount3", "-u", "-z", mnt).Run() })
	assert.True(t, mountedAtExit, "exit 0 before the mount was there")
	assert.Equal(t, "k\n", tool(t, "ls", filepath.Join(mnt, "by-name")))
	tool(t, "fusermount3", "-u", mnt)
	assert.Eventually(t, func() bool {
		b, _ := os.ReadFile(logFile)
		return strings.Contains(string(b), "unmounted")
	}, 10*time.Second, 50*time.Millisecond, "the daemon saw the unmount and exited")

	bad := t.TempDir()
	args = append(f.mountArgs(), "--log-file", logFile, "coriolis+https://127.0.0.1:1", bad)
	out, err = runTool(os.Args[0], args, asCommandEnv+"=1")
	require.Error(t, err, out)
	assert.False(t, isMounted(t, bad))

	// Under a real systemd, the unit of the README does this.
	if state, _ := exec.Command("systemctl", "is-system-running").Output(); !strings.HasPrefix(string(state), "running") && !strings.HasPrefix(string(state), "degraded") {
		t.Logf("systemd is not running here (%q): the protocol tests above stand for systemd-run", strings.TrimSpace(string(state)))
		return
	}
	unit := "vmexportfs-test-" + filepath.Base(t.TempDir())
	sdMnt := t.TempDir()
	sdArgs := append([]string{"--unit", unit, "--collect", "-p", "Type=forking", "--setenv", asCommandEnv + "=1", os.Args[0]},
		append(f.mountArgs(), "coriolis+"+f.sim.URL(), sdMnt)...)
	out, err = runTool("systemd-run", sdArgs)
	require.NoError(t, err, out)
	t.Cleanup(func() { exec.Command("systemctl", "stop", unit).Run() })
	assert.True(t, isMounted(t, sdMnt), "systemd-run returned before the mount")
	assert.Equal(t, "k\n", tool(t, "ls", filepath.Join(sdMnt, "by-name")))
}
