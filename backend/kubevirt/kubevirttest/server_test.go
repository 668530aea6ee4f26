package kubevirttest

import (
	"bytes"
	"compress/gzip"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestExportServer(t *testing.T) {
	sim, err := Start(Options{Dir: t.TempDir()})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sim.Close() })
	require.NoError(t, sim.AddVM("vm", []VolumeSpec{{Name: "root", Size: 256 << 10}}))
	content := bytes.Repeat([]byte("0123456789abcdef"), 16<<10)
	require.NoError(t, sim.WriteDisk("vm", "root", 0, content))
	require.NoError(t, sim.CreateLiveExport("ex", "vm", "", ""))
	tok, err := sim.ExportToken("ex")
	require.NoError(t, err)
	raw, err := sim.ExportStatus("ex")
	require.NoError(t, err)
	var st ExportStatus
	require.NoError(t, json.Unmarshal(raw, &st))
	require.Equal(t, "Ready", st.Phase)
	pool := x509.NewCertPool()
	require.True(t, pool.AppendCertsFromPEM([]byte(st.Links.Internal.Cert)))
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	base := st.Links.Internal.Volumes[0].Formats[0].URL
	base = base[:strings.Index(base, "/volumes/")]
	ext := st.Links.External.Volumes[0].Formats[0].URL

	for _, tc := range []struct {
		name, method, url string
		header            map[string]string
		code              int
		body              []byte
		check             func(t *testing.T, r *http.Response)
	}{
		{name: "unknown path before token", method: "GET", url: base + "/volumes/nope/disk.img", code: 404},
		{name: "no token", method: "GET", url: base + "/volumes/root/disk.img", code: 401, body: []byte{}},
		{name: "header token", method: "GET", url: base + "/volumes/root/disk.img", header: map[string]string{tokenName: tok}, code: 200, body: content},
		{name: "query token", method: "GET", url: base + "/volumes/root/disk.img?" + tokenName + "=" + tok, code: 200, body: content},
		{name: "wrong query, right header passes (recorded badq-goodhdr)", method: "GET", url: base + "/volumes/root/disk.img?" + tokenName + "=bad", header: map[string]string{tokenName: tok}, code: 200, body: content},
		{name: "range", method: "GET", url: ext, header: map[string]string{tokenName: tok, "Range": "bytes=10-19"}, code: 206, body: content[10:20],
			check: func(t *testing.T, r *http.Response) {
				assert.Equal(t, "bytes 10-19/262144", r.Header.Get("Content-Range"))
			}},
		{name: "unsatisfiable", method: "GET", url: ext, header: map[string]string{tokenName: tok, "Range": "bytes=999999-"}, code: 416},
		{name: "head", method: "HEAD", url: ext, header: map[string]string{tokenName: tok}, code: 200,
			check: func(t *testing.T, r *http.Response) {
				assert.Equal(t, int64(len(content)), r.ContentLength)
				assert.Empty(t, r.Header.Get("Last-Modified"))
				assert.Equal(t, "bytes", r.Header.Get("Accept-Ranges"))
			}},
		{name: "gzip ignores range", method: "GET", url: base + "/volumes/root/disk.img.gz", header: map[string]string{tokenName: tok, "Range": "bytes=0-1", "Accept-Encoding": "identity"}, code: 200,
			check: func(t *testing.T, r *http.Response) {
				assert.Equal(t, int64(-1), r.ContentLength)
				zr, err := gzip.NewReader(r.Body)
				require.NoError(t, err)
				got, err := io.ReadAll(zr)
				require.NoError(t, err)
				assert.Equal(t, content, got)
			}},
		{name: "gzip head", method: "HEAD", url: base + "/volumes/root/disk.img.gz", header: map[string]string{tokenName: tok}, code: 400},
		{name: "ready", method: "GET", url: base + "/exportready", code: 200, body: []byte("OK")},
		{name: "map off", method: "GET", url: base + "/exports/root/map", header: map[string]string{tokenName: tok}, code: 404},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := http.NewRequest(tc.method, tc.url, nil)
			require.NoError(t, err)
			for k, v := range tc.header {
				req.Header.Set(k, v)
			}
			resp, err := hc.Do(req)
			require.NoError(t, err)
			defer resp.Body.Close()
			require.Equal(t, tc.code, resp.StatusCode)
			if tc.check != nil {
				tc.check(t, resp)
			}
			if tc.body != nil {
				got, err := io.ReadAll(resp.Body)
				require.NoError(t, err)
				assert.Equal(t, tc.body, got)
			}
		})
	}

	t.Run("api needs bearer", func(t *testing.T) {
		p := x509.NewCertPool()
		require.True(t, p.AppendCertsFromPEM(sim.CAPEM()))
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: p}}}
		resp, err := c.Get(sim.URL() + "/apis/kubevirt.io/v1/namespaces/default/virtualmachines")
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, 401, resp.StatusCode)
	})
}
