package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/kubevirt/kubevirttest"
)

// kvFixture is a KubeVirt simulator (API server and export servers) plus a
// local reference copy of every volume, kept in step with each write.
type kvFixture struct {
	sim        *kubevirttest.Server
	kubeconfig string
	stateDir   string
	cacheDir   string
	refDir     string
	vols       map[string][]string // each VM's volumes
	rng        *rand.ChaCha8
}

func newKVFixture(t *testing.T) *kvFixture {
	t.Helper()
	requireRoot(t)
	sim, err := kubevirttest.Start(kubevirttest.Options{Dir: t.TempDir(), Namespace: "backups", ReadyDelay: kvReadyDelay, Clock: steppingClock()})
	require.NoError(t, err)
	t.Cleanup(func() { sim.Close() })
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	require.NoError(t, os.WriteFile(kc, sim.Kubeconfig(), 0o600))
	var seed [32]byte
	copy(seed[:], t.Name())
	return &kvFixture{sim: sim, kubeconfig: kc, stateDir: t.TempDir(), cacheDir: t.TempDir(), refDir: t.TempDir(),
		vols: map[string][]string{}, rng: rand.NewChaCha8(seed)}
}

func (f *kvFixture) ref(vm, vol string) string { return filepath.Join(f.refDir, vm+"-"+vol+".img") }

func (f *kvFixture) addVM(t *testing.T, vm string, vols ...kubevirttest.VolumeSpec) {
	t.Helper()
	require.NoError(t, f.sim.AddVM(vm, vols))
	for _, v := range vols {
		require.NoError(t, os.WriteFile(f.ref(vm, v.Name), nil, 0o600))
		require.NoError(t, os.Truncate(f.ref(vm, v.Name), v.Size))
		f.vols[vm] = append(f.vols[vm], v.Name)
	}
}

// write puts fresh pseudo-random bytes into the live volume and its reference.
func (f *kvFixture) write(t *testing.T, vm, vol string, off, n int64) {
	t.Helper()
	buf := make([]byte, n)
	f.rng.Read(buf)
	require.NoError(t, f.sim.WriteDisk(vm, vol, off, buf))
	f.writeRef(t, vm, vol, off, buf)
}

// discard zeroes a range of the live volume and of its reference.
func (f *kvFixture) discard(t *testing.T, vm, vol string, off, n int64) {
	t.Helper()
	require.NoError(t, f.sim.DiscardDisk(vm, vol, off, n))
	f.writeRef(t, vm, vol, off, make([]byte, n))
}

func (f *kvFixture) writeRef(t *testing.T, vm, vol string, off int64, p []byte) {
	t.Helper()
	ref, err := os.OpenFile(f.ref(vm, vol), os.O_WRONLY, 0)
	require.NoError(t, err)
	defer ref.Close()
	_, err = ref.WriteAt(p, off)
	require.NoError(t, err)
}

// freeze keeps the reference of a volume as it is now: what a snapshot
// taken now must hold.
func (f *kvFixture) freeze(t *testing.T, vm, vol string) string {
	t.Helper()
	frozen := filepath.Join(t.TempDir(), vol+".img")
	tool(t, "cp", "--sparse=always", f.ref(vm, vol), frozen)
	return frozen
}

func (f *kvFixture) source() string {
	return "kubevirt+" + f.sim.URL() + "/namespaces/" + f.sim.Namespace()
}

// mountArgs are the flags of an API-mode mount, ending with the source.
func (f *kvFixture) mountArgs() []string {
	return []string{"--kubeconfig", f.kubeconfig, "--state-dir", f.stateDir, "--cache-dir", f.cacheDir, f.source()}
}

func (f *kvFixture) mount(t *testing.T, extra ...string) *mounted {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "mnt")
	require.NoError(t, os.Mkdir(dir, 0o755))
	m := startCommand(t, append(append(append([]string{"-f"}, extra...), f.mountArgs()...), dir)...)
	m.dir = dir
	return m
}

// externalExport reads an export's status as the simulator publishes it:
// the raw status, the export's external base URL
// (…/virtualmachineexports/<name>) and the cert its links carry.
func (f *kvFixture) externalExport(t *testing.T, name string) (status []byte, exportURL, cert string) {
	t.Helper()
	return f.exportLinks(t, name, "external")
}

// exportLinks is externalExport for the "internal" or "external" links.
func (f *kvFixture) exportLinks(t *testing.T, name, which string) (status []byte, exportURL, cert string) {
	t.Helper()
	status, err := f.sim.ExportStatus(name)
	require.NoError(t, err)
	type links struct {
		Cert    string
		Volumes []struct {
			Formats []struct{ Format, URL string }
		}
	}
	var st struct {
		Links struct{ Internal, External links }
	}
	require.NoError(t, json.Unmarshal(status, &st))
	l := st.Links.External
	if which == "internal" {
		l = st.Links.Internal
	}
	require.NotEmpty(t, l.Volumes, "export %s has %s volumes", name, which)
	raw := l.Volumes[0].Formats[0].URL
	i := strings.Index(raw, "/volumes/")
	require.Positive(t, i, "raw link %s", raw)
	return status, raw[:i], l.Cert
}

// tokenFile writes an export's token into a fresh file, as a user given
// only the token would hold it.
func (f *kvFixture) tokenFile(t *testing.T, export string) string {
	t.Helper()
	token, err := f.sim.ExportToken(export)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(path, []byte(token), 0o600))
	return path
}

// object returns the HTTP status of a GET of one object on the API server.
func (f *kvFixture) object(t *testing.T, group, version, resource, name string) int {
	t.Helper()
	pool := x509.NewCertPool()
	require.True(t, pool.AppendCertsFromPEM(f.sim.CAPEM()))
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	prefix := "/apis/" + group + "/" + version
	if group == "" {
		prefix = "/api/v1"
	}
	req, err := http.NewRequest(http.MethodGet, fmt.Sprintf("%s%s/namespaces/%s/%s/%s", f.sim.URL(), prefix, f.sim.Namespace(), resource, name), nil)
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+f.sim.Token())
	resp, err := c.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	return resp.StatusCode
}

// TestKubeVirtSnapshotObjects: mkdir makes a VirtualMachineSnapshot and an
// export owned by it, one directory per volume; rmdir removes both (and the
// token Secret). What mkdir and rmdir do on every platform is
// TestSnapshotsByDirectory's.
func TestKubeVirtSnapshotObjects(t *testing.T) {
	f := newKVFixture(t)
	f.addVM(t, "vm-two", kubevirttest.VolumeSpec{Name: "root", Size: 4 * mib}, kubevirttest.VolumeSpec{Name: "data", Size: 6 * mib})
	f.write(t, "vm-two", "root", 64*kib, 1*mib)
	f.write(t, "vm-two", "data", 3*mib, 512*kib)
	m := f.mount(t)
	snaps := m.path("vms", "vm-two", "snapshots")

	tool(t, "mkdir", filepath.Join(snaps, "nightly"))
	root, data := f.freeze(t, "vm-two", "root"), f.freeze(t, "vm-two", "data")
	assert.Equal(t, http.StatusOK, f.object(t, "snapshot.kubevirt.io", "v1beta1", "virtualmachinesnapshots", "nightly"))
	assert.Equal(t, http.StatusOK, f.object(t, "export.kubevirt.io", "v1beta1", "virtualmachineexports", "nightly"))
	assert.ElementsMatch(t, []string{"data", "root"}, strings.Fields(tool(t, "ls", filepath.Join(snaps, "nightly"))))
	assert.Equal(t, sha256File(t, root), sha256File(t, filepath.Join(snaps, "nightly", "root", "disk.img")))
	assert.Equal(t, sha256File(t, data), sha256File(t, filepath.Join(snaps, "nightly", "data", "disk.img")))

	// The in-cluster links serve the same bytes.
	internal := f.mount(t, "--kubevirt-internal")
	assert.Equal(t, sha256File(t, data), sha256File(t, internal.path("vms", "vm-two", "snapshots", "nightly", "data", "disk.img")))

	// An export of the VM itself shows as "live".
	require.NoError(t, f.sim.CreateLiveExport("vm-two-export", "vm-two", "vm-two-export-token", "live-token"))
	assert.Eventually(t, func() bool { return strings.Contains(tool(t, "ls", snaps), "live") }, 10*time.Second, 200*time.Millisecond)
	assert.Equal(t, sha256File(t, f.ref("vm-two", "root")), sha256File(t, filepath.Join(snaps, "live", "root", "disk.img")))

	tool(t, "rmdir", filepath.Join(snaps, "nightly"))
	assert.Equal(t, http.StatusNotFound, f.object(t, "snapshot.kubevirt.io", "v1beta1", "virtualmachinesnapshots", "nightly"))
	assert.Equal(t, http.StatusNotFound, f.object(t, "export.kubevirt.io", "v1beta1", "virtualmachineexports", "nightly"))
	assert.Equal(t, http.StatusNotFound, f.object(t, "", "v1", "secrets", "nightly-export-token"))
	assert.NotContains(t, tool(t, "ls", snaps), "nightly")
}

// TestKubeVirtWrongToken: an export that rejects our token is EACCES on
// read, and the log explains it without printing any token.
func TestKubeVirtWrongToken(t *testing.T) {
	f := newKVFixture(t)
	f.addVM(t, "vm-t", kubevirttest.VolumeSpec{Name: "root", Size: 4 * mib})
	f.write(t, "vm-t", "root", 0, 1*mib)
	m := f.mount(t)
	tool(t, "mkdir", m.path("vms", "vm-t", "snapshots", "s1"))
	token, err := f.sim.ExportToken("s1")
	require.NoError(t, err)
	f.sim.ForceExportToken("s1", "other-token-only-the-server-knows")

	_, err = toolErr("cat", m.path("vms", "vm-t", "snapshots", "s1", "disk.img"))
	assert.ErrorContains(t, err, "Permission denied")
	logs := m.logs.String()
	assert.Contains(t, logs, "401")
	assert.NotContains(t, logs, token)
	assert.NotContains(t, logs, "other-token-only-the-server-knows")
	assert.NotContains(t, logs, f.sim.Token())
}

// TestKubeVirtCertRotation: the export server's certificate changes under a
// running mount; the client takes the new CA from the export status.
func TestKubeVirtCertRotation(t *testing.T) {
	f := newKVFixture(t)
	f.addVM(t, "vm-r", kubevirttest.VolumeSpec{Name: "root", Size: 16 * mib})
	f.write(t, "vm-r", "root", 0, 16*mib)
	m := f.mount(t)
	tool(t, "mkdir", m.path("vms", "vm-r", "snapshots", "s1"))
	source := f.freeze(t, "vm-r", "root")
	disk := m.path("vms", "vm-r", "snapshots", "s1", "disk.img")
	read := func(off int64) string {
		return tool(t, "dd", "if="+disk, "bs=64K", "iflag=skip_bytes,count_bytes", fmt.Sprintf("skip=%d", off), "count=65536", "status=none")
	}
	assert.Equal(t, sha256Range(t, source, 0, 64*kib), sha256String(read(0)))
	require.NoError(t, f.sim.RotateCert("s1"))
	// Far from the first read, so neither cache holds it.
	assert.Equal(t, sha256Range(t, source, 12*mib, 64*kib), sha256String(read(12*mib)))
}

// TestKubeVirtStandalone mounts one export with only its token and status,
// as a user without API access does.
func TestKubeVirtStandalone(t *testing.T) {
	f := newKVFixture(t)
	f.addVM(t, "vm-s", kubevirttest.VolumeSpec{Name: "root", Size: 8 * mib})
	f.write(t, "vm-s", "root", 2*mib, 3*mib)
	setup := f.mount(t)
	tool(t, "mkdir", setup.path("vms", "vm-s", "snapshots", "s1"))
	source := f.freeze(t, "vm-s", "root")

	status, exportURL, _ := f.externalExport(t, "s1")
	dir := t.TempDir()
	statusFile, tokenFile := filepath.Join(dir, "status.json"), f.tokenFile(t, "s1")
	require.NoError(t, os.WriteFile(statusFile, status, 0o600))

	// A token the export server refuses fails the mount, not the first read.
	badToken := filepath.Join(dir, "bad-token")
	require.NoError(t, os.WriteFile(badToken, []byte("refusedToken31337"), 0o600))
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"-f", "--token-file", badToken, "--export-status", statusFile,
		"--state-dir", f.stateDir, "kubevirt+" + exportURL, t.TempDir()}, &stdout, &stderr)
	assert.Equal(t, 1, code)
	lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
	last := lines[len(lines)-1] // -f logs to stderr before the error
	assert.Contains(t, last, "vmexportfs: connect to kubevirt")
	assert.Contains(t, last, "permission denied")
	assert.NotContains(t, stderr.String(), "refusedToken31337")

	mnt := filepath.Join(t.TempDir(), "mnt")
	require.NoError(t, os.Mkdir(mnt, 0o755))
	m := startCommand(t, "-f", "--token-file", tokenFile, "--export-status", statusFile,
		"--state-dir", f.stateDir, "--cache-dir", f.cacheDir, "kubevirt+"+exportURL, mnt)
	m.dir = mnt
	found := findAll(t, mnt, "disk.img")
	require.Len(t, found, 1, "one disk.img in the standalone tree")
	copied := filepath.Join(t.TempDir(), "disk.img")
	tool(t, "cp", "--sparse=always", found[0], copied)
	assert.Equal(t, sha256File(t, source), sha256File(t, copied))
}

// TestKubeVirtBadCredentials: a kubeconfig whose token the API server
// rejects fails the mount with a message that does not echo the token.
func TestKubeVirtBadCredentials(t *testing.T) {
	f := newKVFixture(t)
	kc := strings.ReplaceAll(string(f.sim.Kubeconfig()), f.sim.Token(), "rejected-token-4711")
	require.NotEqual(t, string(f.sim.Kubeconfig()), kc)
	bad := filepath.Join(t.TempDir(), "kubeconfig")
	require.NoError(t, os.WriteFile(bad, []byte(kc), 0o600))
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"-f", "--kubeconfig", bad, f.source(), t.TempDir()}, &stdout, &stderr)
	assert.Equal(t, 1, code)
	assert.Contains(t, stderr.String(), "connect to kubevirt")
	assert.NotContains(t, stderr.String(), "rejected-token-4711")
}
