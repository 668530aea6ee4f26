package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/qemutest"
)

// TestJDCloudMkdirShowsProgress: an export made in the console is a
// snapshot whose disk.img copies as qemu-img's raw of the QCOW2; mkdir
// returns at once with the directory empty and user.vmexport.state saying
// what is being done, and its disk.img appears once the export is
// finished; rmdir deletes the exported object.
func TestJDCloudMkdirShowsProgress(t *testing.T) {
	requireTools(t, "cp", "getfattr", "mkdir", "rmdir")
	p := newJDCloud(t)
	const vm = "i-web01"
	p.AddVM(t, vm, diskSpec{"disk", 8 * mib})
	p.Write(t, vm, "disk", 0, 1*mib)
	p.Write(t, vm, "disk", 5*mib, 64*kib)
	console := p.Snapshot(t, vm)

	m := mountSim(t, p, "--list-ttl", "100ms", "--progress-interval", "200ms")
	snaps := m.path("vms", vm, "snapshots")
	assert.Equal(t, console+"\n", tool(t, "ls", snaps))
	copied := filepath.Join(t.TempDir(), "copy")
	tool(t, "cp", "--sparse=always", filepath.Join(snaps, console, "disk.img"), copied)
	assert.Equal(t, sha256File(t, p.Reference(t, vm, console, "disk")), sha256File(t, copied))
	state := func(dir string) string {
		return tool(t, "getfattr", "--only-values", "-n", "user.vmexport.state", dir)
	}
	assert.Equal(t, "ready", state(filepath.Join(snaps, console)))

	p.Write(t, vm, "disk", 2*mib, 1*mib) // the new snapshot holds this too
	nightly := filepath.Join(snaps, "web01-nightly")
	start := time.Now()
	tool(t, "mkdir", nightly)
	assert.Less(t, time.Since(start), 2*time.Second, "mkdir waited for the export")
	first := state(nightly)
	assert.NotEqual(t, "ready", first)
	assert.Empty(t, strings.TrimSpace(tool(t, "ls", nightly)), "no files while %q", first)
	seen := map[string]bool{strings.TrimRight(first, "0123456789%"): true}
	inStats := map[string]bool{}
	require.Eventually(t, func() bool {
		s := state(nightly)
		seen[strings.TrimRight(s, "0123456789%")] = true
		for _, c := range mountStats(t, m).Creating {
			if c.Name == "web01-nightly" {
				inStats[strings.TrimRight(c.State, "0123456789%")] = true
			}
		}
		return s == "ready"
	}, 30*time.Second, 20*time.Millisecond, "never ready")
	assert.True(t, seen["exporting "], "the export's progress was shown: %v", seen)
	assert.True(t, inStats["exporting "], "and in the stats: %v", inStats)
	require.Eventually(t, func() bool { return len(mountStats(t, m).Creating) == 0 }, 5*time.Second, 100*time.Millisecond, "ready: gone from the stats")
	assert.True(t, m.logged("fs: snapshot ready"), "the log says when it is ready")
	require.Eventually(t, func() bool { return strings.Contains(tool(t, "ls", nightly), "disk.img") }, 5*time.Second, 100*time.Millisecond)
	tool(t, "cp", "--sparse=always", filepath.Join(nightly, "disk.img"), copied)
	p.mu.Lock()
	made := p.made
	p.mu.Unlock()
	raw, err := qemutest.Raw(t.TempDir(), made)
	require.NoError(t, err)
	assert.Equal(t, sha256File(t, raw), sha256File(t, copied), "the mkdir'd snapshot is the disk at mkdir")

	tool(t, "rmdir", filepath.Join(snaps, console))
	assert.Equal(t, "web01-nightly\n", tool(t, "ls", snaps))
}

// TestJDCloudWrongSecret: a wrong secret key fails the mount (exit 1)
// with a line that says the credentials were refused and holds no secret.
func TestJDCloudWrongSecret(t *testing.T) {
	p := newJDCloud(t)
	bad := filepath.Join(t.TempDir(), "bad")
	require.NoError(t, os.WriteFile(bad, []byte("wrong-jdcloud-secret-0000"), 0o600))
	args := p.MountArgs()
	for i := range args {
		if args[i] == p.files["sk"] {
			args[i] = bad
		}
	}
	out, err := runTool(os.Args[0], append(append([]string{"-f"}, args...), t.TempDir()), asCommandEnv+"=1")
	require.Error(t, err, out)
	assert.Contains(t, err.Error(), "exit status 1")
	assert.Contains(t, err.Error(), "permission denied")
	for _, secret := range []string{"wrong-jdcloud-secret-0000", p.creds.SecretKey} {
		assert.NotContains(t, err.Error()+out, secret)
	}
}
