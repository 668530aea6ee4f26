package kubevirt

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/kubevirt/kubevirttest"
)

// writeExecPlugin writes a client.authentication.k8s.io/v1 exec plugin that
// prints an ExecCredential with token, and records that it ran (and its
// KUBERNETES_EXEC_INFO) in dir/ran.
func writeExecPlugin(t *testing.T, dir, token string) string {
	t.Helper()
	p := filepath.Join(dir, "plugin.sh")
	script := fmt.Sprintf(`#!/bin/sh
printf '%%s\n' "$KUBERNETES_EXEC_INFO" >> %q
printf '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"%%s"}}' "$PLUGIN_TOKEN"
`, filepath.Join(dir, "ran"))
	require.NoError(t, os.WriteFile(p, []byte(script), 0o755))
	_ = token
	return p
}

// TestKubeconfigMergedWithExecPlugin: $KUBECONFIG is a list merged as kubectl
// does (the cluster and context in one file, the user in another, a missing
// file skipped), and the user's exec credential plugin is run.
func TestKubeconfigMergedWithExecPlugin(t *testing.T) {
	sim, err := kubevirttest.Start(kubevirttest.Options{Dir: t.TempDir()})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sim.Close() })
	require.NoError(t, sim.AddVM("vm1", []kubevirttest.VolumeSpec{{Name: "root", Size: 1 << 20}}))

	dirA, dirB := t.TempDir(), t.TempDir()
	a := filepath.Join(dirA, "cluster.yaml")
	require.NoError(t, os.WriteFile(a, sim.ClusterKubeconfig("eks-user"), 0o600))
	writeExecPlugin(t, dirB, sim.Token())
	b := filepath.Join(dirB, "user.yaml")
	require.NoError(t, os.WriteFile(b, []byte(`apiVersion: v1
kind: Config
current-context: ignored-second
users:
- name: eks-user
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1
      command: ./plugin.sh
      env:
      - {name: PLUGIN_TOKEN, value: `+sim.Token()+`}
      interactiveMode: Never
`), 0o600))
	t.Setenv("KUBECONFIG", filepath.Join(t.TempDir(), "missing")+string(os.PathListSeparator)+a+string(os.PathListSeparator)+b)

	cred, err := LoadKubeconfig("")
	require.NoError(t, err)
	assert.Equal(t, sim.URL(), cred.Server)
	assert.Equal(t, sim.Namespace(), cred.Namespace)
	assert.Equal(t, sim.Token(), cred.Token, "token from the exec plugin")
	ran, err := os.ReadFile(filepath.Join(dirB, "ran"))
	require.NoError(t, err)
	assert.Contains(t, string(ran), `"kind":"ExecCredential"`)
	assert.Contains(t, string(ran), `"interactive":false`)

	src, err := New(Config{Namespace: sim.Namespace()})
	require.NoError(t, err)
	defer src.Close()
	vms, err := src.VMs(context.Background())
	require.NoError(t, err)
	require.Len(t, vms, 1)

	// A plugin that fails is a clear error, not an anonymous request.
	require.NoError(t, os.WriteFile(filepath.Join(dirB, "plugin.sh"), []byte("#!/bin/sh\necho 'please log in' >&2\nexit 1\n"), 0o755))
	_, err = LoadKubeconfig("")
	require.ErrorIs(t, err, backend.ErrPermission)
	assert.Contains(t, err.Error(), "please log in")
}
