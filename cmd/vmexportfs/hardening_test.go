package main

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
)

const simPassword = "s3cr3t-pa55word" // newFixture's

// TestSecretsNeverLeak runs a mount with every log enabled through logins,
// a token renewal and failures, then greps everything a user or another
// user on the machine can see for the password and any JWT.
func TestSecretsNeverLeak(t *testing.T) {
	f := newFixture(t, coriolistest.Options{TokenTTL: time.Second})
	f.addVM("vm-sec", "sec", coriolistest.DiskSpec{Name: "s.img", Device: "xvda", Size: 4 * mib})
	f.write("vm-sec", "s.img", 0, 1*mib)
	sid := f.snapshot("vm-sec")
	later := f.snapshot("vm-sec")
	m := f.mount("--log-level", "debug", "--debug")
	disk := m.path("vms", "vm-sec", "snapshots", sid, "disk.img")
	tool(t, "cat", disk)
	time.Sleep(1500 * time.Millisecond) // the token expires: the next request renews it
	tool(t, "cat", m.path("vms", "vm-sec", "snapshots", later, "disk.img"))
	tool(t, "getfattr", "-d", "-m", "-", disk)
	_, _ = toolErr("cat", m.path("vms", "vm-sec", "snapshots", "no-such", "disk.img"))

	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", m.cmd.Process.Pid))
	require.NoError(t, err)
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", m.cmd.Process.Pid))
	require.NoError(t, err)
	m.stop(t)
	seen := map[string]string{"logs": m.logs.String(), "cmdline": string(cmdline), "environ": string(environ)}
	require.GreaterOrEqual(t, strings.Count(seen["logs"], "coriolis: logged in"), 2, "the test must exercise a renewal")

	// A wrong password and a bad CA: the messages users get, on stdout and
	// stderr (which the error holds). Each must say what went wrong, or
	// finding no secret in it would prove nothing.
	wrong := filepath.Join(t.TempDir(), "pw")
	require.NoError(t, os.WriteFile(wrong, []byte("hunter2-wrong\n"), 0o600))
	for _, tc := range []struct {
		name string
		args []string
		says string
	}{
		{"wrong password", []string{"--password-file", wrong, "--ca-file", f.sim.CAFile()}, "permission denied: status 401"},
		{"untrusted CA", []string{"--password-file", f.passwordFile}, "certificate signed by unknown authority"},
	} {
		args := append(append([]string{"-f", "--username", "admin"}, tc.args...), "coriolis+"+f.sim.URL(), t.TempDir())
		out, err := runTool(os.Args[0], args, asCommandEnv+"=1")
		require.Error(t, err, "%s: the mount must fail", tc.name)
		text := out + "\n" + err.Error()
		assert.Contains(t, text, tc.says, "%s: the message says why", tc.name)
		seen[tc.name] = text
	}

	for where, text := range seen {
		assert.NotContains(t, text, simPassword, where)
		assert.NotContains(t, text, "hunter2-wrong", where)
		assert.NotContains(t, text, "eyJ", where+": looks like a JWT") // base64 of `{"`
	}
}

// TestAccessModes: the default mount is its user's alone; modes are
// read-only except snapshots/; the state and cache directories are private.
func TestAccessModes(t *testing.T) {
	requireTools(t, "setpriv", "stat")
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-p", "p", coriolistest.DiskSpec{Name: "p.img", Device: "xvda", Size: 4 * mib})
	sid := f.snapshot("vm-p")
	m := f.mount()
	mode := func(parts ...string) string {
		return strings.TrimSpace(tool(t, "stat", "-c", "%a", m.path(parts...)))
	}
	assert.Equal(t, "555", mode())
	assert.Equal(t, "555", mode("vms"))
	assert.Equal(t, "555", mode("vms", "vm-p"))
	assert.Equal(t, "755", mode("vms", "vm-p", "snapshots"))
	assert.Equal(t, "555", mode("vms", "vm-p", "snapshots", sid))
	for _, name := range []string{"disk.img", "disk.img.gz", "disk.vhd"} {
		assert.Equal(t, "444", mode("vms", "vm-p", "snapshots", sid, name), name)
	}
	_, err := toolErr("touch", m.path("vms", "vm-p", "snapshots", sid, "new"))
	assert.ErrorContains(t, err, "Read-only file system")

	for _, dir := range []string{f.stateDir, f.cacheDir} {
		entries, err := os.ReadDir(dir)
		require.NoError(t, err)
		require.NotEmpty(t, entries)
		for _, e := range entries {
			info, err := os.Stat(filepath.Join(dir, e.Name()))
			require.NoError(t, err)
			assert.Equal(t, os.FileMode(0o700), info.Mode().Perm(), "%s/%s", dir, e.Name())
		}
	}

	// Another user cannot even look, unless allow_other was asked for.
	// The mountpoints' parents are open to all, so only FUSE can refuse.
	publicMount := func(extra ...string) string {
		dir, err := os.MkdirTemp("", "vmexportfs-access-")
		require.NoError(t, err)
		require.NoError(t, os.Chmod(dir, 0o755))
		t.Cleanup(func() { os.Remove(dir) })
		m := startCommand(t, append(append(append([]string{"-f"}, f.mountArgs()...), extra...), "coriolis+"+f.sim.URL(), dir)...)
		m.dir = dir
		return dir
	}
	private, shared := publicMount(), publicMount("--allow-other")
	asNobody := func(dir string) (string, error) {
		return toolErr("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls", filepath.Join(dir, "vms"))
	}
	_, err = asNobody(private)
	assert.ErrorContains(t, err, "Permission denied")
	out, err := asNobody(shared)
	require.NoError(t, err)
	assert.Contains(t, out, "vm-p")
}

// TestSignalsDuringCopy: SIGTERM, SIGINT and fusermount3 -u while a copy
// runs all end the daemon cleanly and free the mountpoint, and the copy
// finishes, byte-identical: the mount is detached at once, the daemon
// serves the copy's open file to its end and exits after it.
//
// The copy is held mid-flight by the simulator (HoldDisk), once it has
// fetched 2 MiB of the disk's 12 MiB of data, from before the stop until
// the mount has left the mount table; only then does the rest flow.
func TestSignalsDuringCopy(t *testing.T) {
	requireTools(t, "fusermount3", "cp")
	f, sid, source := copyFixture(t)
	want := sha256File(t, source)
	for _, stop := range []string{"SIGTERM", "SIGINT", "fusermount3 -u"} {
		t.Run(stop, func(t *testing.T) {
			m := f.mount()
			dst := filepath.Join(t.TempDir(), "copy")
			held, release := f.sim.HoldDisk(2 * mib)
			t.Cleanup(release)
			var out syncBuffer
			cp := exec.Command("cp", m.path("vms", "vm-copy", "snapshots", sid, "disk.img"), dst)
			cp.Stdout, cp.Stderr = &out, &out
			require.NoError(t, cp.Start())
			copied := make(chan error, 1)
			go func() { copied <- cp.Wait() }()
			select {
			case <-held:
			case err := <-copied:
				t.Fatalf("the copy ended before 2 MiB were served: %v %s", err, out.String())
			case <-time.After(time.Minute):
				t.Fatal("the copy did not fetch 2 MiB in a minute")
			}

			switch stop {
			case "SIGTERM":
				require.NoError(t, m.cmd.Process.Signal(syscall.SIGTERM))
			case "SIGINT":
				require.NoError(t, m.cmd.Process.Signal(syscall.SIGINT))
			default:
				tool(t, "fusermount3", "-u", "-z", m.dir)
			}
			require.True(t, waitUntil(15*time.Second, func() bool { return !isMounted(t, m.dir) }),
				"still in the mount table 15 s after %s", stop)
			select {
			case <-m.done:
				t.Fatalf("the daemon exited with a copy running: %v\n%s", m.cmd.ProcessState, m.logs.String())
			case err := <-copied:
				t.Fatalf("the copy ended while its reads were held: %v %s", err, out.String())
			default:
			}

			release()
			select {
			case err := <-copied:
				require.NoError(t, err, "the copy after %s: %s", stop, out.String())
			case <-time.After(time.Minute):
				t.Fatal("the copy did not finish a minute after its reads were let through")
			}
			assert.Equal(t, want, sha256File(t, dst), "the copy's bytes")
			select {
			case <-m.done:
			case <-time.After(15 * time.Second):
				t.Fatal("daemon still running 15 s after the copy finished")
			}
			assert.True(t, m.cmd.ProcessState.Success(), "daemon exit: %v\n%s", m.cmd.ProcessState, m.logs.String())
			assert.False(t, isMounted(t, m.dir))
		})
	}
}

// waitUntil polls cond every 10 ms for up to d, for states nothing
// announces (the mount table's).
func waitUntil(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// TestKill9ThenRemount: after kill -9 the mountpoint is dead until
// fusermount3 -u; then a new mount works there and the names are intact.
func TestKill9ThenRemount(t *testing.T) {
	requireTools(t, "fusermount3")
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-k", "k", coriolistest.DiskSpec{Name: "k.img", Device: "xvda", Size: 4 * mib})
	m := f.mount()
	t.Cleanup(func() { _, _ = toolErr("fusermount3", "-u", "-z", m.dir) })
	tool(t, "mkdir", m.path("vms", "vm-k", "snapshots", "keep"))
	require.NoError(t, m.cmd.Process.Kill())
	<-m.done
	_, err := os.ReadDir(m.path("vms")) // a stat could be answered from the kernel's cache
	require.Error(t, err)
	assert.True(t, errors.Is(err, syscall.ENOTCONN), "dead mount: %v", err)

	// A new mount refuses the dead mountpoint with the fix in its message.
	out, err := runTool(os.Args[0], append(f.mountArgs(), "-f", "coriolis+"+f.sim.URL(), m.dir), asCommandEnv+"=1")
	require.Error(t, err, out)
	assert.Contains(t, err.Error()+out, "fusermount3 -u")

	tool(t, "fusermount3", "-u", m.dir)
	again := startCommand(t, append(append([]string{"-f"}, f.mountArgs()...), "coriolis+"+f.sim.URL(), m.dir)...)
	again.dir = m.dir
	assert.Contains(t, tool(t, "ls", again.path("vms", "vm-k", "snapshots")), "keep")
	ids, err := f.sim.Snapshots("vm-k")
	require.NoError(t, err)
	assert.Len(t, ids, 1)
}

// TestManyVMs walks a simulator with many VMs and snapshots with find and
// reports how many backend listings that cost.
func TestManyVMs(t *testing.T) {
	vms, snaps := envInt(t, "VMEXPORTFS_MANY_VMS", 1000), 10
	f := newFixture(t, coriolistest.Options{})
	for i := range vms {
		id := fmt.Sprintf("vm-%04d", i)
		f.addVM(id, id, coriolistest.DiskSpec{Name: "d.img", Device: "xvda", Size: 1 * mib})
		for range snaps {
			f.snapshot(id)
		}
	}
	m := f.mount()
	f.sim.ResetStats()
	start := time.Now()
	out := tool(t, "sh", "-c", `find "$1" -name disk.img | wc -l`, "sh", m.path("vms"))
	took := time.Since(start)
	assert.Equal(t, strconv.Itoa(vms*snaps), strings.TrimSpace(out))
	st := f.sim.Stats()
	t.Logf("find over %d VMs × %d snapshots: %v, %d API requests (%.2f per snapshot), %d logins",
		vms, snaps, took.Round(time.Millisecond), st.APIRequests, float64(st.APIRequests)/float64(vms*snaps), st.Logins)
	// One VM listing, one snapshot listing per VM, and per snapshot at most
	// the open of its disk (snapshot GET + HEAD).
	assert.LessOrEqual(t, st.APIRequests, int64(1+vms+2*vms*snaps))
}

// TestLoad: 64 readers at random offsets of 16 files for a while (60 s in the
// full run, VMEXPORTFS_LOAD_SECONDS; 15 s by default) through a 32 MiB
// cache: every read checked against the source, memory bounded, and the
// daemon's goroutines, as the Go runtime reports them on /metrics (not as
// the daemon's own log says), back near their count at mount time once the
// readers are done, each file opened for every read.
func TestLoad(t *testing.T) {
	seconds := envInt(t, "VMEXPORTFS_LOAD_SECONDS", 15)
	f := newFixture(t, coriolistest.Options{})
	type file struct{ path, source string }
	var files []file
	const size = 24 * mib
	for v := range 8 {
		vm := fmt.Sprintf("vm-l%d", v)
		f.addVM(vm, vm, coriolistest.DiskSpec{Name: "l.img", Device: "xvda", Size: size})
		for range 2 {
			for range 4 {
				off := f.rng.Uint64() % uint64(size-2*mib)
				f.write(vm, "l.img", int64(off)/(64*kib)*(64*kib), 2*mib)
			}
			sid := f.snapshot(vm)
			files = append(files, file{filepath.Join("vms", vm, "snapshots", sid, "disk.img"), f.source(vm, sid, "l.img")})
		}
	}
	addr := freeAddr(t)
	m := f.mount("--cache-size", "32M", "--metrics-addr", addr)
	atMount := goroutines(t, addr)
	deadline := time.Now().Add(time.Duration(seconds) * time.Second)
	var reads, failures atomic.Int64
	var wg sync.WaitGroup
	for r := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(r), 99))
			buf, want := make([]byte, 1*mib), make([]byte, 1*mib)
			for time.Now().Before(deadline) {
				fl := files[rng.IntN(len(files))]
				n := 1 + rng.Int64N(1*mib)
				off := rng.Int64N(size - n)
				if err := readAt(m.path(fl.path), buf[:n], off); err != nil {
					failures.Add(1)
					t.Errorf("reader %d: %v", r, err)
					return
				}
				if err := readAt(fl.source, want[:n], off); err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(buf[:n], want[:n]) {
					failures.Add(1)
					t.Errorf("reader %d: WRONG BYTES at %s %d+%d", r, fl.path, off, n)
					return
				}
				reads.Add(1)
			}
		}()
	}
	wg.Wait()
	// Goroutines of requests just answered take a moment to exit: the
	// count must come down within the bound, and stay there.
	var afterLoad int
	waitUntil(5*time.Second, func() bool { afterLoad = goroutines(t, addr); return afterLoad <= atMount+idleGoroutines })
	rss := peakRSSMiB(t, m)
	m.stop(t)
	t.Logf("%d s: %d checked reads by 64 readers over %d files, %d failures; peak RSS %d MiB with a 32 MiB cache; goroutines %d at mount, %d after the load",
		seconds, reads.Load(), len(files), failures.Load(), rss, atMount, afterLoad)
	assert.Zero(t, failures.Load())
	assert.Positive(t, reads.Load())
	assert.LessOrEqual(t, rss, int64(200), "peak RSS MiB")
	assert.LessOrEqual(t, afterLoad, atMount+idleGoroutines, "goroutines left after %d opens and reads", reads.Load())
	assert.True(t, m.cmd.ProcessState.Success(), "daemon exit: %v", m.cmd.ProcessState)
}

// idleGoroutines is what an idle mount may keep beyond its count at mount
// time once readers are done: its idle keep-alive connections to the
// platform (httprange keeps 32 per host, two goroutines each) and go-fuse's
// request readers (at most 16). A goroutine leaked per open or per read
// is thousands after the load's tens of thousands.
const idleGoroutines = 2*32 + 16

func readAt(path string, p []byte, off int64) error {
	fh, err := os.Open(path)
	if err != nil {
		return err
	}
	defer fh.Close()
	_, err = fh.ReadAt(p, off)
	return err
}

// goroutines is the daemon's goroutine count as the Go runtime reports it on
// /metrics (go_goroutines).
func goroutines(t *testing.T, addr string) int {
	t.Helper()
	families := scrape(t, "http://"+addr+"/metrics")
	require.Contains(t, families, "go_goroutines")
	return int(families["go_goroutines"].GetMetric()[0].GetGauge().GetValue())
}
