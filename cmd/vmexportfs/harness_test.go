package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/testenv"
)

// asCommandEnv makes the test binary behave as the vmexportfs command, so
// the end-to-end tests run the real command (flags, login, daemon protocol,
// signals) as a child process without a separate build step. The mount is
// always served by a child: a process must not access its own FUSE mount.
const asCommandEnv = "VMEXPORTFS_TEST_AS_COMMAND"

func TestMain(m *testing.M) {
	if os.Getenv(asCommandEnv) == "1" {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
		code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	os.Exit(m.Run())
}

func requireRoot(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
}

// fixture is a Coriolis simulator plus everything a mount of it needs.
type fixture struct {
	t            *testing.T
	sim          *coriolistest.Server
	passwordFile string
	stateDir     string
	cacheDir     string
	rng          *rand.ChaCha8
}

func newFixture(t *testing.T, opts coriolistest.Options) *fixture {
	t.Helper()
	requireRoot(t)
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	opts.Username, opts.Password = "admin", "s3cr3t-pa55word"
	sim, err := coriolistest.Start(opts)
	require.NoError(t, err)
	t.Cleanup(func() { sim.Close() })
	pw := filepath.Join(t.TempDir(), "password")
	require.NoError(t, os.WriteFile(pw, []byte(opts.Password+"\n"), 0o600))
	var seed [32]byte
	copy(seed[:], t.Name())
	return &fixture{t: t, sim: sim, passwordFile: pw, stateDir: t.TempDir(), cacheDir: t.TempDir(), rng: rand.NewChaCha8(seed)}
}

func (f *fixture) addVM(id, friendly string, disks ...coriolistest.DiskSpec) {
	f.t.Helper()
	require.NoError(f.t, f.sim.AddVM(coriolistest.VMSpec{ID: id, FriendlyName: friendly, Disks: disks}))
}

// write puts fresh pseudo-random bytes at [off, off+n) of a live disk.
func (f *fixture) write(vm, disk string, off, n int64) {
	f.t.Helper()
	buf := make([]byte, n)
	f.rng.Read(buf)
	require.NoError(f.t, f.sim.WriteDisk(vm, disk, off, buf))
}

func (f *fixture) snapshot(vm string) string {
	f.t.Helper()
	sid, err := f.sim.TakeSnapshot(vm)
	require.NoError(f.t, err)
	return sid
}

// source is the simulator's own file for a snapshot's disk: the reference
// every copy is checked against.
func (f *fixture) source(vm, sid, disk string) string {
	f.t.Helper()
	path, err := f.sim.SnapshotData(vm, sid, disk)
	require.NoError(f.t, err)
	return path
}

// mountArgs are the flags of a mount of this fixture's simulator.
func (f *fixture) mountArgs() []string {
	return []string{
		"--username", "admin", "--password-file", f.passwordFile, "--ca-file", f.sim.CAFile(),
		"--state-dir", f.stateDir, "--cache-dir", f.cacheDir,
	}
}

// mounted is a running `vmexportfs -f` child.
type mounted struct {
	dir  string
	cmd  *exec.Cmd
	logs *syncBuffer
	done chan struct{}
}

// mount runs the command in the foreground on a fresh mountpoint and returns
// once it reports the mount usable; the test's cleanup unmounts it.
func (f *fixture) mount(extra ...string) *mounted {
	f.t.Helper()
	dir := filepath.Join(f.t.TempDir(), "mnt")
	require.NoError(f.t, os.Mkdir(dir, 0o755))
	args := append(append([]string{"-f"}, f.mountArgs()...), extra...)
	args = append(args, "coriolis+"+f.sim.URL(), dir)
	m := startCommand(f.t, args...)
	m.dir = dir
	return m
}

// startCommand starts the command with the ready-pipe protocol a daemonizing
// parent uses and waits for "mounted" or the startup error.
func startCommand(t *testing.T, args ...string) *mounted {
	t.Helper()
	r, w, err := os.Pipe()
	require.NoError(t, err)
	defer r.Close()
	m := &mounted{logs: &syncBuffer{}, done: make(chan struct{})}
	m.cmd = exec.Command(os.Args[0], args...)
	m.cmd.Env = append(os.Environ(), asCommandEnv+"=1", readyFDEnv+"=3")
	m.cmd.ExtraFiles = []*os.File{w}
	m.cmd.Stdout, m.cmd.Stderr = m.logs, m.logs
	require.NoError(t, m.cmd.Start())
	w.Close()
	go func() { m.cmd.Wait(); close(m.done) }()
	msg, _ := io.ReadAll(r)
	if string(msg) != "ok" {
		<-m.done
		t.Fatalf("vmexportfs did not mount: %q\nlogs:\n%s", msg, m.logs.String())
	}
	t.Cleanup(func() {
		m.stop(t)
		if t.Failed() {
			t.Logf("vmexportfs logs:\n%s", m.logs.String())
		}
	})
	return m
}

// stop unmounts the way a user does: SIGTERM to the daemon.
func (m *mounted) stop(t *testing.T) {
	select {
	case <-m.done:
		return
	default:
	}
	m.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-m.done:
	case <-time.After(15 * time.Second):
		t.Errorf("vmexportfs did not exit 15 s after SIGTERM")
		exec.Command("fusermount3", "-u", "-z", m.dir).Run()
		m.cmd.Process.Kill()
		<-m.done
	}
}

// logged waits up to 2 s for the log to hold one of words: the child's
// stderr reaches the buffer through a pipe, so a line written just before a
// failed read may arrive just after the reader sees the failure.
func (m *mounted) logged(words ...string) bool {
	deadline := time.Now().Add(2 * time.Second)
	for {
		if containsAny(m.logs.String(), words) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (m *mounted) path(parts ...string) string {
	return filepath.Join(append([]string{m.dir}, parts...)...)
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// tool runs a program the way a user does and returns its stdout; a failure
// fails the test with its stderr.
func tool(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := toolErr(name, args...)
	require.NoError(t, err, "%s %s", name, strings.Join(args, " "))
	return out
}

// vmexportfs runs the test binary as the vmexportfs command, like tool.
func vmexportfs(t *testing.T, args ...string) string {
	t.Helper()
	out, err := runTool(os.Args[0], args, asCommandEnv+"=1")
	require.NoError(t, err, "vmexportfs %s", strings.Join(args, " "))
	return out
}

func toolErr(name string, args ...string) (string, error) {
	return runTool(name, args)
}

func runTool(name string, args []string, env ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), errors.Join(err, errors.New(strings.TrimSpace(stderr.String())))
	}
	return stdout.String(), nil
}

func requireTools(t *testing.T, names ...string) {
	t.Helper()
	testenv.RequireTool(t, names...)
}

func sha256File(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	h := sha256.New()
	_, err = io.Copy(h, f)
	require.NoError(t, err)
	return hex.EncodeToString(h.Sum(nil))
}

// sha256Range hashes [off, off+n) of a local file.
func sha256Range(t *testing.T, path string, off, n int64) string {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	h := sha256.New()
	_, err = io.Copy(h, io.NewSectionReader(f, off, n))
	require.NoError(t, err)
	return hex.EncodeToString(h.Sum(nil))
}

// contentDigest is a digest of a sparse file's bytes that does not read its
// holes: the offset and bytes of every 4 KiB block holding a non-zero byte,
// and the size. Two files with the same bytes have the same digest however
// they are allocated (cp --sparse=always punches zero blocks a simulator
// keeps).
func contentDigest(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	st, err := f.Stat()
	require.NoError(t, err)
	h := sha256.New()
	block := make([]byte, 4096)
	next := int64(0) // where the blocks not yet hashed start
	for _, e := range testenv.SeekMap(t, path) {
		for b := max(e.Off/4096*4096, next); b < e.End(); b += 4096 {
			n, err := f.ReadAt(block, b)
			if !errors.Is(err, io.EOF) {
				require.NoError(t, err)
			}
			if slices.ContainsFunc(block[:n], func(c byte) bool { return c != 0 }) {
				_ = binary.Write(h, binary.BigEndian, b)
				h.Write(block[:n])
			}
			next = b + 4096
		}
	}
	_ = binary.Write(h, binary.BigEndian, st.Size())
	return hex.EncodeToString(h.Sum(nil))
}

func formatExtents(es []extent.Extent) string {
	var b strings.Builder
	for _, e := range es {
		fmt.Fprintf(&b, "%d %d\n", e.Off, e.Len)
	}
	return b.String()
}

func sha256Bytes(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// envInt is an integer test setting from the environment (the full-length
// runs in README), def when unset.
func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	require.NoError(t, err, name)
	return n
}

// findAll walks dir for entries called name.
func findAll(t *testing.T, dir, name string) []string {
	t.Helper()
	var found []string
	require.NoError(t, filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err == nil && info.Name() == name {
			found = append(found, p)
		}
		return err
	}))
	return found
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	require.NoError(t, err)
	return fi.Size()
}
