package kubevirt

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseSourceURL(t *testing.T) {
	for _, tc := range []struct {
		raw  string
		want SourceURL
		bad  bool
	}{
		{raw: "kubevirt+https://api.example:6443/namespaces/ns1", want: SourceURL{APIServer: "https://api.example:6443", Namespace: "ns1"}},
		{raw: "https://api.example/namespaces/ns1/", want: SourceURL{APIServer: "https://api.example", Namespace: "ns1"}},
		{raw: "kubevirt+https://rancher.example/k8s/clusters/c-1/namespaces/ns", want: SourceURL{APIServer: "https://rancher.example/k8s/clusters/c-1", Namespace: "ns"}},
		{raw: "kubevirt+https://proxy.example/api/export.kubevirt.io/v1beta1/namespaces/ns/virtualmachineexports/exp1",
			want: SourceURL{ExportURL: "https://proxy.example/api/export.kubevirt.io/v1beta1/namespaces/ns/virtualmachineexports/exp1", Export: "exp1"}},
		{raw: "kubevirt+http://api.example/namespaces/ns", bad: true},
		{raw: "kubevirt+https:///namespaces/ns", bad: true},
		{raw: "kubevirt+https://api.example/", bad: true},
		{raw: "kubevirt+https://api.example/namespaces/..", bad: true},
		{raw: "kubevirt+https://user:pw@api.example/namespaces/ns", bad: true},
		{raw: "kubevirt+https://api.example/namespaces/ns?x=1", bad: true},
		{raw: "coriolis+https://api.example/namespaces/ns", bad: true},
	} {
		t.Run(tc.raw, func(t *testing.T) {
			got, err := ParseSourceURL(tc.raw)
			if tc.bad {
				assert.Error(t, err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
			assert.Equal(t, tc.want.ExportURL != "", got.Standalone())
		})
	}
}

func FuzzParseSourceURL(f *testing.F) {
	for _, s := range []string{"kubevirt+https://a/namespaces/b", "https://a/x/virtualmachineexports/e", "kubevirt+https://a:1/%zz", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		u, err := ParseSourceURL(raw)
		if err != nil {
			return
		}
		if u.Standalone() {
			assert.NotEmpty(t, u.Export)
		} else {
			assert.NotEmpty(t, u.Namespace)
			assert.NotEmpty(t, u.APIServer)
		}
	})
}

const caPEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

func TestParseKubeconfig(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "ca.crt"), []byte(caPEM), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "tok"), []byte("filetoken\n"), 0o600))
	b64 := base64.StdEncoding.EncodeToString([]byte(caPEM))
	for _, tc := range []struct {
		name string
		doc  string
		want Credentials
		bad  bool
	}{
		{name: "data and token", doc: `
current-context: b
clusters:
- {name: c1, cluster: {server: "https://one"}}
- {name: c2, cluster: {server: "https://two:6443", certificate-authority-data: ` + b64 + `}}
contexts:
- {name: a, context: {cluster: c1, user: u1}}
- {name: b, context: {cluster: c2, user: u2, namespace: vms}}
users:
- {name: u1, user: {token: one}}
- {name: u2, user: {token: secrettok2}}
`, want: Credentials{Server: "https://two:6443", Namespace: "vms", CAPEM: []byte(caPEM), Token: "secrettok2"}},
		{name: "files relative and insecure", doc: `
current-context: x
clusters: [{name: c, cluster: {server: "https://s", certificate-authority: ca.crt, insecure-skip-tls-verify: true}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
users: [{name: u, user: {tokenFile: tok}}]
`, want: Credentials{Server: "https://s", CAPEM: []byte(caPEM), Insecure: true, Token: "filetoken"}},
		{name: "no current context", doc: `clusters: []`, bad: true},
		{name: "missing context", doc: `current-context: nope`, bad: true},
		{name: "missing cluster", doc: "current-context: x\ncontexts: [{name: x, context: {cluster: c, user: u}}]", bad: true},
		{name: "bad base64", doc: "current-context: x\nclusters: [{name: c, cluster: {server: s, certificate-authority-data: '!!'}}]\ncontexts: [{name: x, context: {cluster: c}}]", bad: true},
		{name: "missing ca file", doc: "current-context: x\nclusters: [{name: c, cluster: {server: s, certificate-authority: nope.crt}}]\ncontexts: [{name: x, context: {cluster: c}}]", bad: true},
		{name: "not yaml", doc: "{{{", bad: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseKubeconfig([]byte(tc.doc), dir)
			if tc.bad {
				assert.Error(t, err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
			assert.NotContains(t, got.String(), tc.want.Token)
		})
	}
}

func FuzzParseKubeconfig(f *testing.F) {
	f.Add([]byte("current-context: x\nclusters: [{name: c, cluster: {server: s}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {token: t}}]"))
	f.Add([]byte("current-context: x\nclusters: [{name: c, cluster: {server: s, certificate-authority-data: QUJD}}]\ncontexts: [{name: x, context: {cluster: c}}]"))
	f.Add([]byte("{{"))
	f.Fuzz(func(t *testing.T, data []byte) {
		// File references resolve inside an empty directory: nothing to read.
		c, err := ParseKubeconfig(data, t.TempDir())
		if err == nil {
			assert.NotEmpty(t, c.Server)
		}
	})
}

func TestParseExportStatus(t *testing.T) {
	for _, tc := range []struct {
		name, doc string
		phase     string
		bad       bool
	}{
		{name: "whole yaml", doc: "kind: VirtualMachineExport\nstatus:\n  phase: Ready\n  links:\n    external:\n      cert: C\n      volumes: [{name: v, formats: [{format: raw, url: 'https://x/volumes/v/disk.img'}]}]\n", phase: "Ready"},
		{name: "status json", doc: `{"phase":"Pending","tokenSecretRef":"t"}`, phase: "Pending"},
		{name: "empty", doc: `{}`, bad: true},
		{name: "garbage", doc: "[", bad: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, err := ParseExportStatus([]byte(tc.doc))
			if tc.bad {
				assert.Error(t, err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.phase, st.Phase)
		})
	}
}

func FuzzParseExportStatus(f *testing.F) {
	f.Add([]byte(`{"phase":"Ready","links":{"external":{"cert":"x","volumes":[{"name":"v","formats":[{"format":"raw","url":"u"}]}]}}}`))
	f.Add([]byte("status:\n  phase: Ready\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := ParseExportStatus(data)
		if err != nil {
			return
		}
		if link, err := st.link(false); err == nil {
			for _, n := range link.volumeNames() {
				_ = link.rawURL(n)
				_ = link.mapURL(n)
			}
		}
	})
}

func FuzzDecodeMapPage(f *testing.F) {
	f.Add([]byte(`{"extents":[{"offset":0,"length":65536,"type":0,"description":"data"}],"next_offset":65536}`))
	f.Add([]byte(`{"extents":[],"next_offset":null}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := decodeMapPage(data)
		if err != nil {
			return
		}
		for _, e := range p.Extents {
			_ = e.Offset + e.Length
		}
	})
}
