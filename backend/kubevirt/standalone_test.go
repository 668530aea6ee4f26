package kubevirt

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/kubevirt/kubevirttest"
)

func TestStandalone(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, kubevirttest.Options{}, Config{})
	_, err := e.src.CreateSnapshot(ctx, "vm1", "s1")
	require.NoError(t, err)
	statusJSON, err := e.sim.ExportStatus("s1")
	require.NoError(t, err)
	st, err := ParseExportStatus(statusJSON)
	require.NoError(t, err)
	raw := st.Links.External.rawURL("root")
	exportURL := raw[:strings.Index(raw, "/volumes/")]
	tok, err := e.sim.ExportToken("s1")
	require.NoError(t, err)

	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, data, 0o600))
		return p
	}
	tokenFile := write("token", []byte(tok+"\n"))
	caFile := write("ca.pem", []byte(st.Links.External.Cert))
	var asMap map[string]any
	require.NoError(t, json.Unmarshal(statusJSON, &asMap))
	whole, err := yaml.Marshal(map[string]any{"apiVersion": "export.kubevirt.io/v1beta1", "kind": "VirtualMachineExport", "status": asMap})
	require.NoError(t, err)
	yamlFile := write("export.yaml", whole)
	jsonFile := write("status.json", statusJSON)

	for _, tc := range []struct {
		name string
		cfg  StandaloneConfig
	}{
		{"token and ca files", StandaloneConfig{CAFile: caFile, Volumes: []string{"root", "data"}}},
		{"status yaml", StandaloneConfig{ExportStatusFile: yamlFile}},
		{"status json", StandaloneConfig{ExportStatusFile: jsonFile}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			cfg.ExportURL = "kubevirt+" + exportURL
			cfg.TokenFile = tokenFile
			cfg.Policy = e.src.cfg.Policy
			s, err := NewStandalone(cfg)
			require.NoError(t, err)
			vms, err := s.VMs(ctx)
			require.NoError(t, err)
			require.Len(t, vms, 1)
			snaps, err := s.Snapshots(ctx, vms[0].ID)
			require.NoError(t, err)
			require.Len(t, snaps, 1)
			assert.Equal(t, "s1", snaps[0].ID)
			d, err := s.OpenDisk(ctx, backend.DiskRef{VM: vms[0].ID, Snapshot: "s1", Disk: "root"})
			require.NoError(t, err)
			p := make([]byte, 300000)
			require.NoError(t, d.ReadAt(ctx, p, 1000))
			assert.Equal(t, e.root[1000:301000], p)
		})
	}

	t.Run("wrong token", func(t *testing.T) {
		bad := write("bad", []byte("wrongwrongwrong"))
		s, err := NewStandalone(StandaloneConfig{ExportURL: exportURL, TokenFile: bad, ExportStatusFile: jsonFile, Policy: e.src.cfg.Policy})
		require.NoError(t, err)
		_, err = s.OpenDisk(ctx, backend.DiskRef{VM: "s1", Snapshot: "s1", Disk: "root"})
		require.ErrorIs(t, err, backend.ErrPermission)
		assert.NotContains(t, err.Error(), "wrongwrongwrong")
	})
	t.Run("bad config", func(t *testing.T) {
		for _, cfg := range []StandaloneConfig{
			{ExportURL: exportURL},
			{ExportURL: exportURL, TokenFile: tokenFile},
			{ExportURL: exportURL, TokenFile: tokenFile, CAFile: caFile},
			{ExportURL: "https://h/namespaces/x", TokenFile: tokenFile, ExportStatusFile: jsonFile},
		} {
			_, err := NewStandalone(cfg)
			assert.ErrorIs(t, err, backend.ErrInvalid)
		}
	})
}
