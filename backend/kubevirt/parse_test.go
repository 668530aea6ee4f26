package kubevirt

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
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

// FuzzParseSourceURL: an accepted address renders back to one that parses
// to the same value, carries no credentials, query or fragment, and a
// password put into any address is refused and quoted nowhere.
func FuzzParseSourceURL(f *testing.F) {
	for _, s := range []string{"kubevirt+https://a/namespaces/b", "https://a/x/virtualmachineexports/e", "kubevirt+https://a:1/%zz", "",
		"kubevirt+https://a/p%2Fq/namespaces/n%20s", "https://a/virtualmachineexports/e%3F", "kubevirt+https://a:bad/namespaces/n"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		if i := strings.Index(raw, "://"); i >= 0 && !strings.ContainsAny(raw[:i], "/?#") {
			const secret = "Pw0rdFuzzSecret"
			_, err := ParseSourceURL(raw[:i+3] + "user:" + secret + "@" + raw[i+3:])
			require.Error(t, err, "credentials accepted")
			require.NotContains(t, err.Error(), secret)
		}
		u, err := ParseSourceURL(raw)
		if err != nil {
			return
		}
		var again string
		if u.Standalone() {
			require.NotEmpty(t, u.Export)
			require.Empty(t, u.APIServer+u.Namespace)
			again = "kubevirt+" + u.ExportURL
		} else {
			require.NotEmpty(t, u.Namespace)
			require.NotEmpty(t, u.APIServer)
			again = "kubevirt+" + u.APIServer + "/namespaces/" + url.PathEscape(u.Namespace)
		}
		for _, s := range []string{u.ExportURL, u.APIServer} {
			if s == "" {
				continue
			}
			pu, err := url.Parse(s)
			require.NoError(t, err, "rendered %q", s)
			require.True(t, pu.User == nil && pu.RawQuery == "" && pu.Fragment == "" && pu.Scheme == "https", "rendered %q", s)
		}
		u2, err := ParseSourceURL(again)
		require.NoError(t, err, "the rendering %q of %q", again, raw)
		require.Equal(t, u, u2, "the rendering %q of %q", again, raw)
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
	f.Add([]byte("current-context: x\nclusters: [{name: c, cluster: {server: s}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {token: tok3n-secret}}]"))
	f.Add([]byte("current-context: x\nclusters: [{name: c, cluster: {server: s, certificate-authority-data: QUJD}}]\ncontexts: [{name: x, context: {cluster: c}}]"))
	f.Add([]byte("{{"))
	f.Fuzz(func(t *testing.T, data []byte) {
		// File references resolve inside an empty directory: nothing to read.
		c, err := ParseKubeconfig(data, t.TempDir())
		if err != nil {
			return
		}
		require.NotEmpty(t, c.Server)
		// However it is printed, the credentials never show the token
		// (unless the server or namespace spell it too).
		shown := "Credentials{Server: Namespace: token:true}" + c.Server + c.Namespace
		if len(c.Token) >= 4 && !strings.Contains(shown, c.Token) {
			for _, format := range []string{"%v", "%+v", "%s"} {
				require.NotContains(t, fmt.Sprintf(format, c), c.Token, format)
			}
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
	f.Add([]byte(`{"phase":"Ready","virtualMachineName":"vm","links":{"external":{"volumes":[{"name":"v"},{"name":"v"}],"backups":[{"name":"b","endpoints":[{"endpoint":"map","url":"m"}]}]}}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := ParseExportStatus(data)
		if err != nil {
			return
		}
		// What kubectl -o json prints of it reads back the same.
		js, err := json.Marshal(map[string]ExportStatus{"status": st})
		require.NoError(t, err)
		again, err := ParseExportStatus(js)
		require.NoError(t, err, "%s", js)
		require.Equal(t, st, again, "%s", js)
		link, err := st.link(false)
		if err != nil {
			return
		}
		// Each disk is named once, by a name; a backup's disk has both of
		// its routes.
		seen := map[string]bool{}
		for _, n := range link.volumeNames() {
			require.NotEmpty(t, n)
			require.False(t, seen[n], "disk %q listed twice", n)
			seen[n] = true
			if !slices.ContainsFunc(link.Volumes, func(v exportVolume) bool { return v.Name == n }) {
				require.NotEmpty(t, link.mapURL(n), "backup disk %q without a map", n)
				require.NotEmpty(t, link.backupURL(n, "data"), "backup disk %q without a data route", n)
			}
		}
	})
}

// FuzzDecodeMapPage: a page is accepted exactly when it is JSON of the
// map route's shape that can be paged through safely, and then it is what
// encoding/json reads.
func FuzzDecodeMapPage(f *testing.F) {
	f.Add([]byte(`{"extents":[{"offset":0,"length":65536,"type":0,"description":"data"}],"next_offset":65536}`))
	f.Add([]byte(`{"extents":[],"next_offset":null}`))
	f.Add([]byte(`{"extents":[{"offset":0,"length":65536}],"next_offset":4096}`))
	f.Add([]byte(`{"extents":[{"offset":65536,"length":4096},{"offset":0,"length":65536}],"next_offset":69632}`))
	f.Add([]byte(`{"extents":[],"next_offset":0}`))
	f.Add([]byte(`{"extents":[{"offset":72057594037927935,"length":1}]}`))
	f.Add([]byte(`{"extents":[{"offset":72057594037927935,"length":2}]}`))
	f.Add([]byte(`{"extents":[{"offset":1,"length":18446744073709551615}]}`))
	f.Add([]byte(`{"extents":[{"offset":18446744073709551615,"length":1}],"next_offset":0}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := decodeMapPage(data)
		var ref mapPage
		if json.Unmarshal(data, &ref) != nil {
			require.Error(t, err, "accepted what encoding/json refuses")
			return
		}
		var end uint64
		safe := true
		for _, e := range ref.Extents {
			// An extent must fit the int64 offsets of a map: its end is at
			// most maxBackupSize, and computing it does not wrap.
			if e.Offset > maxBackupSize || e.Offset+e.Length > maxBackupSize || e.Offset+e.Length < e.Offset {
				safe = false
			}
			end = max(end, e.Offset+e.Length)
		}
		if n := ref.NextOffset; n != nil && (len(ref.Extents) == 0 || *n < end || *n > maxBackupSize) {
			safe = false // paging from *n would read this page again
		}
		if !safe {
			require.Error(t, err, "accepted a page that cannot be paged through")
			return
		}
		require.NoError(t, err)
		require.Equal(t, ref, p)
	})
}
