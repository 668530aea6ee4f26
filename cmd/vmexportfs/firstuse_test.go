package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
)

// The tests of a first use of the command line: what a newcomer runs and
// reads (the demo's hint, where the log is, help, version, completion, the
// man page) works as printed.

// TestDemoHintWorks: `vmexportfs demo MOUNTPOINT`, as `make demo` runs it
// (in the background), prints a copy command that works when pasted: run
// by sh exactly as printed, it copies every snapshot of web01, each copy
// the bytes of the sample data's snapshot.
func TestDemoHintWorks(t *testing.T) {
	requireRoot(t)
	requireTools(t, "sh", "cp", "fusermount3")
	mnt := filepath.Join(t.TempDir(), "mnt")
	require.NoError(t, os.Mkdir(mnt, 0o755))
	out := vmexportfs(t, "demo", "--data-dir", t.TempDir(), "--log-file", filepath.Join(t.TempDir(), "demo.log"), mnt)
	t.Cleanup(func() { unmountDaemon(t, mnt) })

	var hint string
	for line := range strings.Lines(out) {
		if strings.Contains(line, "cp ") {
			hint = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "try:"))
		}
	}
	require.NotEmpty(t, hint, "the demo prints a copy command:\n%s", out)

	entries, err := os.ReadDir(filepath.Join(mnt, "by-name", "web01", "snapshots"))
	require.NoError(t, err)
	require.Len(t, entries, 3, "web01 has three snapshots")
	var copies []string
	for _, e := range entries {
		c := filepath.Join("/tmp", "web01-"+e.Name()+".img")
		require.NoFileExists(t, c)
		t.Cleanup(func() { os.Remove(c) })
		copies = append(copies, c)
	}
	tool(t, "sh", "-c", hint)

	ref, err := coriolistest.Start(coriolistest.Options{Dir: t.TempDir()})
	require.NoError(t, err)
	t.Cleanup(func() { ref.Close() })
	require.NoError(t, populateDemo(coriolisTarget{ref}))
	ids, err := ref.Snapshots(demoWeb)
	require.NoError(t, err)
	var want, got []string
	for _, id := range ids {
		path, err := ref.SnapshotData(demoWeb, id, demoWebDisk)
		require.NoError(t, err)
		want = append(want, sha256File(t, path))
	}
	for _, c := range copies {
		got = append(got, sha256File(t, c))
	}
	slices.Sort(want)
	slices.Sort(got)
	assert.Equal(t, want, got, "each copy is a snapshot of web01")
}

// unmountDaemon unmounts a mount served by a daemonized vmexportfs and waits
// for the daemon to exit, so that it no longer writes to the test's
// directories when they are removed.
func unmountDaemon(t *testing.T, mnt string) {
	t.Helper()
	pid := daemonPID(t, mnt)
	if isMounted(t, mnt) {
		if _, err := toolErr("fusermount3", "-u", mnt); err != nil {
			t.Errorf("fusermount3 -u %s: %v", mnt, err)
			_, _ = toolErr("fusermount3", "-u", "-z", mnt)
		}
	}
	if pid == 0 {
		return
	}
	// Released by its parent, the daemon may stay a zombie of a pid 1 that
	// does not reap: exited either way.
	assert.Eventually(t, func() bool {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		_, after, _ := bytes.Cut(b, []byte(") "))
		return err != nil || bytes.HasPrefix(after, []byte("Z"))
	}, 15*time.Second, 20*time.Millisecond, "the daemon of %s exits once unmounted", mnt)
}

// daemonPID finds the process serving mnt: the one whose last argument it
// is; 0 when there is none.
func daemonPID(t *testing.T, mnt string) int {
	t.Helper()
	procs, err := os.ReadDir("/proc")
	require.NoError(t, err)
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := bytes.Split(bytes.TrimSuffix(b, []byte{0}), []byte{0})
		if len(args) > 1 && string(args[0]) == os.Args[0] && string(args[len(args)-1]) == mnt {
			return pid
		}
	}
	return 0
}

// TestBackgroundMountSaysWhereItLogs: a mount that goes to the background
// prints one line on stderr, naming its log: the file the daemon writes,
// whose directory is named after a hash. --help gives the real defaults of
// the data directories and the log's path pattern, which that path
// follows, for root and with $XDG_*_HOME; README names the pattern too.
func TestBackgroundMountSaysWhereItLogs(t *testing.T) {
	requireTools(t, "fusermount3")
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-l", "l", coriolistest.DiskSpec{Name: "l.img", Device: "xvda", Size: 4 * mib})
	f.snapshot("vm-l")
	xdg := t.TempDir()
	env := []string{"XDG_STATE_HOME=" + filepath.Join(xdg, "state"), "XDG_CACHE_HOME=" + filepath.Join(xdg, "cache")}

	help, _, err := commandOutput(env, "--help")
	require.NoError(t, err)
	m := regexp.MustCompile(`(?m)^ +--log-file string .* else (\S+), printed once mounted\)$`).FindStringSubmatch(help)
	require.NotNil(t, m, "--help gives the log's default:\n%s", help)
	pattern := m[1]
	assert.Equal(t, filepath.Join(xdg, "state", "vmexportfs", "HOST-HASH", "vmexportfs.log"), pattern)
	assert.Regexp(t, `(?m)^ +--cache-dir string .*\(default `+regexp.QuoteMeta(filepath.Join(xdg, "cache", "vmexportfs"))+`\)$`, help)

	mnt := t.TempDir()
	source := "coriolis+" + f.sim.URL()
	stdout, stderr, err := commandOutput(env, "--username", "admin", "--password-file", f.passwordFile, "--ca-file", f.sim.CAFile(), source, mnt)
	require.NoError(t, err, stderr)
	t.Cleanup(func() { unmountDaemon(t, mnt) })
	assert.Empty(t, stdout)
	logPath := strings.Replace(pattern, "HOST-HASH", sourceKey(source, "admin"), 1)
	assert.Equal(t, "vmexportfs: mounted "+mnt+"; logging to "+logPath+"\n", stderr)
	log, err := os.ReadFile(logPath)
	require.NoError(t, err)
	assert.Contains(t, string(log), "msg=mounted")

	var rootEnv []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "XDG_STATE_HOME=") && !strings.HasPrefix(kv, "XDG_CACHE_HOME=") {
			rootEnv = append(rootEnv, kv)
		}
	}
	cmd := exec.Command(os.Args[0], "--help")
	cmd.Env = append(rootEnv, asCommandEnv+"=1")
	out, err := cmd.Output()
	require.NoError(t, err)
	for _, want := range []string{
		`--state-dir string .*\(default /var/lib/vmexportfs\)$`,
		`--cache-dir string .*\(default /var/cache/vmexportfs\)$`,
		`--log-file string .* else /var/lib/vmexportfs/HOST-HASH/vmexportfs\.log, printed once mounted\)$`,
	} {
		assert.Regexp(t, `(?m)^ +`+want, string(out), "root's defaults")
	}
	readme, err := os.ReadFile("../../README.md")
	require.NoError(t, err)
	assert.True(t, strings.Contains(string(readme), "/var/lib/vmexportfs/HOST-HASH/vmexportfs.log"), "README names the log's default")
}

// commandOutput runs the command with env added to the test's and returns
// its stdout and stderr.
func commandOutput(env []string, args ...string) (stdout, stderr string, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], args...)
	cmd.Env = append(append(os.Environ(), env...), asCommandEnv+"=1")
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	return out.String(), errOut.String(), err
}
