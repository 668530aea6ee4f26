package kubevirttest

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// recorded is one answer of the real export server, from
// testdata/kubevirt-exportserver (NAME.s status line, NAME.h headers, NAME.b body).
type recorded struct {
	status int
	header http.Header
	body   []byte
}

const recordedDir = "../../../testdata/kubevirt-exportserver"

func loadRecorded(t *testing.T, name string) recorded {
	t.Helper()
	s, err := os.ReadFile(filepath.Join(recordedDir, name+".s"))
	require.NoError(t, err)
	var rec recorded
	_, err = fmt.Sscan(string(s), &rec.status)
	require.NoError(t, err)
	h, err := os.ReadFile(filepath.Join(recordedDir, name+".h"))
	require.NoError(t, err)
	rec.header = http.Header{}
	lines := strings.Split(strings.ReplaceAll(string(h), "\r", ""), "\n")
	for _, l := range lines[min(1, len(lines)):] {
		if l == "" {
			break // a HEAD probe recorded the header block twice
		}
		k, v, ok := strings.Cut(l, ":")
		if ok {
			rec.header.Add(k, strings.TrimSpace(v))
		}
	}
	rec.body, _ = os.ReadFile(filepath.Join(recordedDir, name+".b"))
	return rec
}

// headersThatMatter are compared by presence and, except for the multipart
// boundary, by value.
var headersThatMatter = []string{"Content-Type", "Content-Range", "Accept-Ranges", "Content-Length"}

// TestSimulatorMatchesRecordedServer asks the simulator what the recorded
// probes asked the real virt-exportserver and compares status, the headers
// that matter and the body (exactly for error texts, by shape for maps).
func TestSimulatorMatchesRecordedServer(t *testing.T) {
	const size = 1 << 30
	sim, err := Start(Options{Dir: t.TempDir()})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sim.Close() })
	require.NoError(t, sim.AddVM("vm", []VolumeSpec{{Name: "nightly-disk", Size: size}}))
	require.NoError(t, sim.WriteDisk("vm", "nightly-disk", 2<<20, bytes.Repeat([]byte{7}, 1<<20)))
	require.NoError(t, sim.WriteDisk("vm", "nightly-disk", size-512, bytes.Repeat([]byte{9}, 512)))
	require.NoError(t, sim.CreateLiveExport("live", "vm", "", ""))
	require.NoError(t, sim.CreateBackupExport("full", "full-export", "vm", false))
	require.NoError(t, sim.WriteDisk("vm", "nightly-disk", 9<<20, bytes.Repeat([]byte{8}, 1<<20)))
	require.NoError(t, sim.DiscardDisk("vm", "nightly-disk", 2<<20, 64<<10))
	require.NoError(t, sim.CreateBackupExport("incr", "incr-export", "vm", true))

	client := func(export string) (*http.Client, string, string) {
		raw, err := sim.ExportStatus(export)
		require.NoError(t, err)
		var st ExportStatus
		require.NoError(t, json.Unmarshal(raw, &st))
		pool := x509.NewCertPool()
		require.True(t, pool.AppendCertsFromPEM([]byte(st.Links.Internal.Cert)))
		tok, err := sim.ExportToken(export)
		require.NoError(t, err)
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}}
		base := sim.exportURL(export)
		return hc, base, tok
	}
	live, liveBase, liveTok := client("live")
	bak, bakBase, bakTok := client("full-export")

	type probe struct {
		name, method, url string
		header            map[string]string
		client            *http.Client
		exactBody         bool
	}
	raw := liveBase + "/volumes/nightly-disk/disk.img"
	mapURL := bakBase + "/exports/nightly-disk/map"
	tokH := map[string]string{tokenName: liveTok}
	withH := func(extra map[string]string) map[string]string {
		m := map[string]string{tokenName: liveTok}
		for k, v := range extra {
			m[k] = v
		}
		return m
	}
	bakH := map[string]string{tokenName: bakTok}
	for _, p := range []probe{
		{name: "get-range", method: "GET", url: raw, header: withH(map[string]string{"Range": "bytes=0-1023"}), client: live},
		{name: "get-multirange", method: "GET", url: raw, header: withH(map[string]string{"Range": "bytes=0-9,1048576-1048585"}), client: live},
		{name: "get-range-416", method: "GET", url: raw, header: withH(map[string]string{"Range": "bytes=2000000000-2000000010"}), client: live, exactBody: true},
		{name: "get-range-tail", method: "GET", url: raw, header: withH(map[string]string{"Range": "bytes=-512"}), client: live},
		{name: "head", method: "HEAD", url: raw, header: tokH, client: live},
		{name: "post-raw", method: "POST", url: raw, header: withH(map[string]string{"Range": "bytes=0-9"}), client: live},
		{name: "gz-head", method: "HEAD", url: liveBase + "/volumes/nightly-disk/disk.img.gz", header: tokH, client: live},
		{name: "no-token", method: "GET", url: raw, client: live, exactBody: true},
		{name: "wrong-token", method: "GET", url: raw, header: map[string]string{tokenName: "wrong"}, client: live, exactBody: true},
		{name: "query-token", method: "GET", url: raw + "?" + tokenName + "=" + liveTok, header: map[string]string{"Range": "bytes=0-9"}, client: live},
		{name: "badq-goodhdr", method: "GET", url: raw + "?" + tokenName + "=wrong", header: withH(map[string]string{"Range": "bytes=0-9"}), client: live},
		{name: "unknown-vol", method: "GET", url: liveBase + "/volumes/nope/disk.img", header: tokH, client: live, exactBody: true},
		{name: "unknown-vol-nt", method: "GET", url: liveBase + "/volumes/nope/disk.img", client: live, exactBody: true},
		{name: "ready-notoken", method: "GET", url: liveBase + "/exportready", client: live, exactBody: true},
		{name: "map-end", method: "GET", url: mapURL + "?offset=1073741824", header: bakH, client: bak, exactBody: true},
		{name: "map-badoff", method: "GET", url: mapURL + "?offset=x", header: bakH, client: bak, exactBody: true},
		{name: "map-head", method: "HEAD", url: mapURL, header: bakH, client: bak},
		{name: "map-notoken", method: "GET", url: mapURL, client: bak, exactBody: true},
		{name: "map-len", method: "GET", url: mapURL + "?offset=0&length=4096", header: bakH, client: bak, exactBody: true},
		{name: "map-p2", method: "GET", url: mapURL + "?offset=0&page_size=2", header: bakH, client: bak},
		{name: "data", method: "GET", url: bakBase + "/exports/nightly-disk/data?offset=0&length=16", header: withHeaders(bakH, "Range", "bytes=0-3"), client: bak},
	} {
		t.Run(p.name, func(t *testing.T) {
			want := loadRecorded(t, p.name)
			req, err := http.NewRequest(p.method, p.url, nil)
			require.NoError(t, err)
			for k, v := range p.header {
				req.Header.Set(k, v)
			}
			resp, err := p.client.Do(req)
			require.NoError(t, err)
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			assert.Equal(t, want.status, resp.StatusCode, "status")
			for _, h := range headersThatMatter {
				w, g := want.header.Get(h), resp.Header.Get(h)
				if h == "Content-Length" && p.method == "GET" && want.status < 300 && w != "" && g != "" {
					continue // body sizes differ with the disk's layout; presence is what matters
				}
				if strings.HasPrefix(w, "multipart/byteranges") {
					assert.True(t, strings.HasPrefix(g, "multipart/byteranges; boundary="), "%s: %q", h, g)
					continue
				}
				if h == "Content-Length" && (p.name == "map-len" || strings.HasPrefix(p.name, "map-p")) {
					assert.NotEmpty(t, g, h)
					continue
				}
				assert.Equal(t, w, g, "header %s", h)
			}
			switch {
			case p.exactBody:
				assert.Equal(t, string(want.body), string(body), "body")
			case strings.HasPrefix(p.name, "map-p"):
				assertSameMapShape(t, want.body, body)
			}
		})
	}

	// The whole maps: same JSON shape, the same description/type pairs,
	// contiguous extents, next_offset null at the end.
	for _, tc := range []struct{ name, export string }{{"map-full", "full-export"}, {"map-incr", "incr-export"}} {
		t.Run(tc.name, func(t *testing.T) {
			hc, base, tok := client(tc.export)
			want, err := os.ReadFile(filepath.Join(recordedDir, tc.name+".json"))
			require.NoError(t, err)
			req, _ := http.NewRequest("GET", base+"/exports/nightly-disk/map", nil)
			req.Header.Set(tokenName, tok)
			resp, err := hc.Do(req)
			require.NoError(t, err)
			defer resp.Body.Close()
			got, _ := io.ReadAll(resp.Body)
			require.Equal(t, 200, resp.StatusCode, string(got))
			assertSameMapShape(t, want, got)
			var w, g mapPage
			require.NoError(t, json.Unmarshal(want, &w))
			require.NoError(t, json.Unmarshal(got, &g))
			kinds := func(p mapPage) map[string]uint64 {
				m := map[string]uint64{}
				for _, e := range p.Extents {
					m[e.Description] = e.Type
				}
				return m
			}
			assert.Equal(t, kinds(w), kinds(g), "descriptions and types")
			assert.Nil(t, g.NextOffset)
		})
	}
}

func withHeaders(m map[string]string, k, v string) map[string]string {
	out := map[string]string{k: v}
	for a, b := range m {
		out[a] = b
	}
	return out
}

// assertSameMapShape checks the JSON keys, description/type pairs seen in
// the recording, contiguity and next_offset's meaning.
func assertSameMapShape(t *testing.T, want, got []byte) {
	t.Helper()
	var w, g map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(want, &w))
	require.NoError(t, json.Unmarshal(got, &g), string(got))
	assert.Equal(t, sortedKeys(w), sortedKeys(g), "top-level keys")
	var wp, gp []map[string]any
	require.NoError(t, json.Unmarshal(w["extents"], &wp))
	require.NoError(t, json.Unmarshal(g["extents"], &gp))
	if len(wp) > 0 && len(gp) > 0 {
		assert.Equal(t, sortedKeys(wp[0]), sortedKeys(gp[0]), "extent keys")
	}
	var page mapPage
	require.NoError(t, json.Unmarshal(got, &page))
	for i := 1; i < len(page.Extents); i++ {
		prev := page.Extents[i-1]
		assert.Equal(t, prev.Offset+prev.Length, page.Extents[i].Offset, "contiguous extents")
		assert.NotEqual(t, prev.Description, page.Extents[i].Description, "adjacent extents of one kind are merged")
	}
	if page.NextOffset != nil && len(page.Extents) > 0 {
		last := page.Extents[len(page.Extents)-1]
		assert.Equal(t, last.Offset+last.Length, *page.NextOffset, "next_offset = start of the first extent left out")
	}
}
