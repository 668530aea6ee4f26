package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
)

// TestBadInvocations: every mistake is a clear message and exit status 2
// (usage) or 1 (cannot mount), before anything is mounted, and never echoes a
// secret.
func TestBadInvocations(t *testing.T) {
	t.Setenv(passwordEnv, "") // the no-password rows
	mnt := t.TempDir()
	full := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(full, "x"), nil, 0o600))
	notDir := filepath.Join(full, "x")
	pw := filepath.Join(t.TempDir(), "pw")
	require.NoError(t, os.WriteFile(pw, []byte("hunter2\n"), 0o600))
	cases := []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"no arguments", nil, 2, "want SOURCE MOUNTPOINT"},
		{"unknown flag", []string{"--bogus", "coriolis+https://h", mnt}, 2, "unknown flag"},
		{"unknown platform", []string{"vmware+https://h", mnt}, 2, "unknown platform"},
		{"no platform", []string{"https://h", mnt}, 2, "PLATFORM+https://HOST"},
		{"credentials in URL", []string{"coriolis+https://admin:hunter2@h", mnt}, 2, "credentials in the URL"},
		{"password option", []string{"-o", "password=hunter2", "coriolis+https://h", mnt}, 2, "secrets are not accepted"},
		{"unknown option", []string{"-o", "frobnicate", "coriolis+https://h", mnt}, 2, "unknown mount option"},
		{"bad cache size", []string{"--cache-size", "lots", "coriolis+https://h", mnt}, 2, "--cache-size"},
		{"tiny cache", []string{"--cache-size", "1k", "coriolis+https://h", mnt}, 2, "at least 4M"},
		{"bad retries", []string{"--retries", "0", "coriolis+https://h", mnt}, 2, "--retries"},
		{"bad log level", []string{"--log-level", "loud", "coriolis+https://h", mnt}, 2, "--log-level"},
		{"bad log format", []string{"--log-format", "xml", "coriolis+https://h", mnt}, 2, "--log-format"},
		{"bad metrics address", []string{"--metrics-addr", "9464", "coriolis+https://h", mnt}, 2, "--metrics-addr"},
		{"tiny progress interval", []string{"--progress-interval", "1ms", "coriolis+https://h", mnt}, 2, "--progress-interval"},
		{"missing mountpoint", []string{"coriolis+https://h", filepath.Join(mnt, "nope")}, 1, "mountpoint"},
		{"mountpoint not empty", []string{"coriolis+https://h", full}, 1, "not empty"},
		{"mountpoint not a directory", []string{"coriolis+https://h", notDir}, 1, "not a directory"},
		{"missing password file", []string{"--username", "u", "--password-file", filepath.Join(mnt, "nope"), "coriolis+https://h", mnt}, 2, "no such file"},
		// Refused before the fork, not by the daemon after it.
		{"no password coriolis", []string{"--username", "u", "coriolis+https://h", mnt}, 2, "coriolis: no password: give --password-file FILE or set VMEXPORTFS_PASSWORD"},
		{"no password xapi", []string{"--username", "u", "xapi+https://h", mnt}, 2, "xapi: no password"},
		{"no password ovirt", []string{"--username", "u", "ovirt+https://h", mnt}, 2, "ovirt: no password"},
		{"unreachable host", []string{"-f", "--username", "u", "--password-file", pw, "--retries", "1", "coriolis+https://127.0.0.1:1", mnt}, 1, "connection refused"},
		{"demo bad dataset", []string{"demo", "--dataset", "huge", mnt}, 2, "--dataset"},
		{"demo unknown platform", []string{"demo", "--platform", "xen", mnt}, 2, "want one of coriolis, kubevirt"},
		{"demo foreign platform flag", []string{"demo", "--kubeconfig", "kc", mnt}, 2, "is for kubevirt+ sources, not coriolis+"},
		{"extents no path", []string{"extents"}, 2, "usage"},
		{"kubevirt standalone without token", []string{"-f", "kubevirt+https://h/virtualmachineexports/e", mnt}, 2, "--token-file"},
		{"kubevirt bad path", []string{"-f", "kubevirt+https://h/nowhere", mnt}, 2, "/namespaces/NS"},
		{"kubevirt token option", []string{"-o", "token=hunter2", "kubevirt+https://h/namespaces/n", mnt}, 2, "secrets are not accepted"},
		{"kubevirt missing kubeconfig", []string{"-f", "--kubeconfig", "/nonexistent/kc", "kubevirt+https://h/namespaces/n", mnt}, 1, "kubeconfig"},
		{"bad ready timeout", []string{"--ready-timeout", "0s", "kubevirt+https://h/namespaces/n", mnt}, 2, "--ready-timeout"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(context.Background(), tc.args, &stdout, &stderr)
			assert.Equal(t, tc.code, code, stderr.String())
			assert.Contains(t, stderr.String(), tc.msg)
			assert.NotContains(t, stderr.String(), "hunter2")
			assert.NotContains(t, strings.TrimSpace(stderr.String()), "\n", "one line")
		})
	}
}

// TestMountCommand mounts the way fstab and a shell user do: daemonized with
// -o options, then unmounted with fusermount3; a wrong password or an
// untrusted certificate fails the mount with a clear message.
func TestMountCommand(t *testing.T) {
	requireTools(t, "fusermount3", "ls")
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-c", "c", coriolistest.DiskSpec{Name: "c.img", Device: "xvda", Size: 4 * mib})
	f.snapshot("vm-c")
	command := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, os.Args[0], args...)
		cmd.Env = append(os.Environ(), asCommandEnv+"=1")
		out, err := cmd.CombinedOutput()
		return string(out), err
	}

	t.Run("daemon with -o options", func(t *testing.T) {
		mnt := t.TempDir()
		opts := "username=admin,password_file=" + f.passwordFile + ",ca_file=" + f.sim.CAFile() +
			",state_dir=" + f.stateDir + ",cache_dir=" + f.cacheDir + ",rw,nodev,nosuid,_netdev"
		out, err := command("-o", opts, "coriolis+"+f.sim.URL(), mnt)
		require.NoError(t, err, out)
		t.Cleanup(func() { exec.Command("fusermount3", "-u", "-z", mnt).Run() })
		assert.Equal(t, "c\n", tool(t, "ls", filepath.Join(mnt, "by-name")))
		tool(t, "fusermount3", "-u", mnt)
		assert.Eventually(t, func() bool { return !isMounted(t, mnt) }, 10*time.Second, 100*time.Millisecond)
	})

	t.Run("mount -t fuse", func(t *testing.T) {
		requireTools(t, "mount", "umount")
		bin := t.TempDir()
		require.NoError(t, os.Symlink(os.Args[0], filepath.Join(bin, "vmexportfs")))
		mnt := t.TempDir()
		opts := "username=admin,password_file=" + f.passwordFile + ",ca_file=" + f.sim.CAFile() +
			",state_dir=" + f.stateDir + ",cache_dir=" + f.cacheDir + ",nodev,nosuid"
		// mount.fuse3 runs the helper with a fixed PATH, so the test names it
		// by full path with the "fuse" type's helper#source form; fstab
		// entries of type fuse.vmexportfs find the installed binary.
		cmd := exec.Command("mount", "-t", "fuse", "-o", opts, filepath.Join(bin, "vmexportfs")+"#coriolis+"+f.sim.URL(), mnt)
		cmd.Env = append(os.Environ(), asCommandEnv+"=1")
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, string(out))
		t.Cleanup(func() { exec.Command("umount", "-l", mnt).Run() })
		assert.Equal(t, "c\n", tool(t, "ls", filepath.Join(mnt, "by-name")))
		tool(t, "umount", mnt)
	})

	wrongPassword := filepath.Join(t.TempDir(), "pw")
	require.NoError(t, os.WriteFile(wrongPassword, []byte("hunter2\n"), 0o600))
	// Each refusal names its own cause: the exporter's 401 and its message
	// for the password (not any failure to reach it), the verification
	// error for the certificate.
	for _, tc := range []struct {
		name string
		args []string
		msg  string // a regular expression
	}{
		{"wrong password", []string{"--username", "admin", "--password-file", wrongPassword, "--ca-file", f.sim.CAFile()},
			`^vmexportfs: connect to coriolis source \S+: coriolis: login as "admin": POST \S+/api/v1/auth/login: permission denied: status 401: .*Not Authorized`},
		{"untrusted certificate", []string{"--username", "admin", "--password-file", f.passwordFile}, `x509: certificate signed by unknown authority`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mnt := t.TempDir()
			out, err := command(append(tc.args, "coriolis+"+f.sim.URL(), mnt)...)
			var exit *exec.ExitError
			require.ErrorAs(t, err, &exit)
			assert.Equal(t, 1, exit.ExitCode(), "could not mount")
			assert.Regexp(t, tc.msg, out)
			assert.NotContains(t, out, "hunter2")
			assert.NotContains(t, out, "s3cr3t-pa55word")
		})
	}
}
