package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/kubevirt/kubevirttest"
)

// TestKubeVirtBackupMapWaitsForLauncher: a backup export's map answers 503
// "Backup source (virt-launcher) not connected via tunnel" for 30 s; the
// mount waits (logging progress) and then serves the backup's bytes.
func TestKubeVirtBackupMapWaitsForLauncher(t *testing.T) {
	const delay = 30 * time.Second
	f := newKVFixtureWith(t, kubevirttest.Options{LauncherDelay: delay})
	f.addVM(t, "vm-w", kubevirttest.VolumeSpec{Name: "root", Size: 8 * mib})
	f.write(t, "vm-w", "root", 1*mib, 2*mib)
	require.NoError(t, f.sim.CreateBackupExport("b1", "b1-export", "vm-w", false))
	created := time.Now()
	time.Sleep(kvReadyDelay)
	statusFile := f.backupStatusFile(t, "b1-export")
	mnt := filepath.Join(t.TempDir(), "mnt")
	require.NoError(t, os.Mkdir(mnt, 0o755))
	m := startCommand(t, "-f", "--token-file", f.tokenFile(t, "b1-export"), "--export-status", statusFile,
		"--state-dir", t.TempDir(), "--cache-dir", t.TempDir(), "kubevirt+"+f.backupExportURL(t, "b1-export"), mnt)
	m.dir = mnt
	assert.GreaterOrEqual(t, time.Since(created), delay, "mounted only once the launcher connected")
	assert.True(t, m.logged("waiting for the backup source (virt-launcher) to connect"), "progress logged")
	assert.True(t, m.logged("backup source connected"))
	found := findAll(t, mnt, "disk.img")
	require.Len(t, found, 1)
	assert.Equal(t, sha256File(t, f.sim.BackupFile("b1", "root")), sha256File(t, found[0]))
}

// TestKubeVirtPortForwardServerName: the --ca-file form against the export
// pod itself, as through `kubectl port-forward`: root paths only and a
// certificate with service DNS names only. Without --tls-server-name the
// certificate does not verify for 127.0.0.1 (the mount fails, verification
// is never turned off); with it the mount verifies and serves the bytes.
func TestKubeVirtPortForwardServerName(t *testing.T) {
	f := newKVFixtureWith(t, kubevirttest.Options{PodOnly: true})
	f.addVM(t, "vm-pf", kubevirttest.VolumeSpec{Name: "root", Size: 8 * mib})
	f.write(t, "vm-pf", "root", 2*mib, 3*mib)
	require.NoError(t, f.sim.CreateLiveExport("pf", "vm-pf", "", ""))
	time.Sleep(kvReadyDelay)
	_, local, cert := f.exportLinks(t, "pf", "internal") // local: https://127.0.0.1:PORT, the forwarded port
	ca := filepath.Join(t.TempDir(), "ca.pem")
	require.NoError(t, os.WriteFile(ca, []byte(cert), 0o600))
	source := "kubevirt+" + local + "/api/export.kubevirt.io/v1beta1/namespaces/" + f.sim.Namespace() + "/virtualmachineexports/pf"
	args := []string{"-f", "--token-file", f.tokenFile(t, "pf"), "--ca-file", ca, "--kubevirt-volume", "root",
		"--state-dir", t.TempDir(), "--cache-dir", t.TempDir()}

	var stdout, stderr bytes.Buffer
	code := run(context.Background(), append(append([]string{}, args...), source, t.TempDir()), &stdout, &stderr)
	assert.Equal(t, 1, code, "127.0.0.1 is not in the pod's certificate")
	assert.Contains(t, stderr.String(), "certificate")

	mnt := filepath.Join(t.TempDir(), "mnt")
	require.NoError(t, os.Mkdir(mnt, 0o755))
	m := startCommand(t, append(args, "--tls-server-name", "virt-export-pf."+f.sim.Namespace()+".svc", source, mnt)...)
	m.dir = mnt
	found := findAll(t, mnt, "disk.img")
	require.Len(t, found, 1)
	assert.Equal(t, sha256File(t, f.ref("vm-pf", "root")), sha256File(t, found[0]))
}

// TestKubeVirtExecPluginKubeconfig: $KUBECONFIG is a list, merged as kubectl
// merges it (cluster and context in one file, the user in another), and the
// user logs in with a client.authentication.k8s.io/v1 exec plugin, as on
// EKS, GKE and many OpenShift clusters.
func TestKubeVirtExecPluginKubeconfig(t *testing.T) {
	f := newKVFixture(t)
	f.addVM(t, "vm-x", kubevirttest.VolumeSpec{Name: "root", Size: 4 * mib})
	dir := t.TempDir()
	cluster := filepath.Join(dir, "cluster.yaml")
	require.NoError(t, os.WriteFile(cluster, f.sim.ClusterKubeconfig("cloud-user"), 0o600))
	plugin := filepath.Join(dir, "get-token")
	require.NoError(t, os.WriteFile(plugin, fmt.Appendf(nil, `#!/bin/sh
case "$KUBERNETES_EXEC_INFO" in *ExecCredential*) ;; *) exit 3;; esac
echo run >> %q
printf '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"%s"}}'
`, filepath.Join(dir, "runs"), f.sim.Token()), 0o755))
	user := filepath.Join(dir, "user.yaml")
	require.NoError(t, os.WriteFile(user, []byte(`apiVersion: v1
kind: Config
users:
- name: cloud-user
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1
      command: ./get-token
      interactiveMode: Never
`), 0o600))
	t.Setenv("KUBECONFIG", cluster+string(os.PathListSeparator)+user)

	mnt := filepath.Join(t.TempDir(), "mnt")
	require.NoError(t, os.Mkdir(mnt, 0o755))
	m := startCommand(t, "-f", "--state-dir", f.stateDir, "--cache-dir", f.cacheDir, f.source(), mnt)
	m.dir = mnt
	assert.Contains(t, tool(t, "ls", m.path("vms")), "vm-x")
	runs, err := os.ReadFile(filepath.Join(dir, "runs"))
	require.NoError(t, err)
	assert.NotEmpty(t, runs, "the exec plugin ran")
	assert.NotContains(t, m.logs.String(), f.sim.Token())
}
