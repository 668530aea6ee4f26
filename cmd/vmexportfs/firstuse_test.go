package main

import (
	"bytes"
	"os"
	"path/filepath"
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
