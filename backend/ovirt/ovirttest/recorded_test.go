package ovirttest

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// recordedDir holds the answers of a real ovirt-imageio 2.5.3, copied from
// the specs (see its README.md): NAME.s status line and body hash, NAME.h
// headers, NAME.b body.
const recordedDir = "testdata/ovirt-imageio"

type recordedAnswer struct {
	status int
	sha    string // of the whole body
	header http.Header
	body   []byte
}

func loadRecordedAnswer(t *testing.T, name string) recordedAnswer {
	t.Helper()
	s, err := os.ReadFile(filepath.Join(recordedDir, name+".s"))
	require.NoError(t, err)
	var rec recordedAnswer
	lines := strings.Split(string(s), "\n")
	_, err = fmt.Sscanf(lines[0], "HTTP/1.1 %d", &rec.status)
	require.NoError(t, err)
	if len(lines) > 1 {
		if _, sha, ok := strings.Cut(lines[1], "sha256: "); ok {
			rec.sha = strings.TrimSpace(sha)
		}
	}
	h, err := os.ReadFile(filepath.Join(recordedDir, name+".h"))
	require.NoError(t, err)
	rec.header = http.Header{}
	for _, l := range strings.Split(string(h), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			rec.header.Add(k, strings.TrimSpace(v))
		}
	}
	rec.body, _ = os.ReadFile(filepath.Join(recordedDir, name+".b"))
	return rec
}

// recordedIDs are the ticket ids of ids.txt: name → id.
func recordedIDs(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(recordedDir, "ids.txt"))
	require.NoError(t, err)
	out := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(l)
		out[f[0]] = f[1]
	}
	return out
}

// TestMatchesRecordedImageio asks the simulator's daemon what the recorded
// probes asked the real one, on images laid out as the recorded ones (1 GiB
// virtual size, sparse), and compares status, the headers that matter and
// the bodies: exactly for error texts, ranges and the qcow2 chain's
// extents; by shape for the raw image's extents, whose 4 KiB raw layout a
// qcow2 disk with 64 KiB clusters cannot have.
func TestMatchesRecordedImageio(t *testing.T) {
	const size = 1 << 30
	srv, a := start(t, Options{TransferDelay: time.Millisecond, SnapshotDelay: time.Millisecond})
	ids := recordedIDs(t)
	fill := func(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

	// "raw": the recorded bytes where probes read data, a hole at 200 MiB.
	_, err := srv.AddVM(VMSpec{ID: "raw-vm", Name: "raw", Disks: []DiskSpec{{ID: "raw", Name: "raw", Size: size}}})
	require.NoError(t, err)
	head := loadRecordedAnswer(t, "get-range").body
	tail := loadRecordedAnswer(t, "get-range-open").body
	require.NoError(t, srv.WriteDisk("raw-vm", "raw", 0, head))
	require.NoError(t, srv.WriteDisk("raw-vm", "raw", size-int64(len(tail)), tail))
	require.NoError(t, srv.WriteDisk("raw-vm", "raw", 300*mib, make([]byte, 2*mib))) // written zeros

	// The qcow2 chain base ← snap1 ← snap2, each frozen by a snapshot.
	_, err = srv.AddVM(VMSpec{ID: "chain-vm", Name: "chain", Disks: []DiskSpec{{ID: "chain", Name: "chain", Size: size}}})
	require.NoError(t, err)
	w := func(off int64, b byte, n int) {
		require.NoError(t, srv.WriteDisk("chain-vm", "chain", off, fill(b, n)))
	}
	w(0, 0x11, 4*mib)
	w(64*mib, 0x12, mib)
	w(512*mib, 0x13, 2*mib)
	base, err := srv.TakeSnapshot("chain-vm", "base")
	require.NoError(t, err)
	w(mib, 0x21, mib)
	w(200*mib, 0x22, mib)
	snap1, err := srv.TakeSnapshot("chain-vm", "snap1")
	require.NoError(t, err)
	w(2*mib, 0x31, 64<<10)
	w(200*mib, 0x32, 512<<10)
	require.NoError(t, srv.DiscardDisk("chain-vm", "chain", 512*mib, mib))
	w(900*mib, 0x33, mib)
	snap2, err := srv.TakeSnapshot("chain-vm", "snap2")
	require.NoError(t, err)

	// "dirty.qcow2" as a plain disk: its zero extents need no bitmap.
	_, err = srv.AddVM(VMSpec{ID: "dirty-vm", Name: "dirty", Disks: []DiskSpec{{ID: "dirty", Name: "dirty", Size: size}}})
	require.NoError(t, err)
	wd := func(off int64, b byte, n int) {
		require.NoError(t, srv.WriteDisk("dirty-vm", "dirty", off, fill(b, n)))
	}
	wd(0, 0x41, 2*mib)
	wd(100*mib, 0x42, mib)
	wd(mib, 0x43, 64<<10)
	wd(10*mib, 0x44, mib)
	require.NoError(t, srv.DiscardDisk("dirty-vm", "dirty", 100*mib, 512<<10))
	require.NoError(t, srv.DiscardDisk("dirty-vm", "dirty", 300*mib, mib))

	a.login()
	// Tickets: recorded name → simulator ticket id, and transfer ids.
	tickets, transfers := map[string]string{}, map[string]string{}
	open := func(name string, body map[string]any) {
		id, tr := a.startTransfer(body, nil)
		u := tr["transfer_url"].(string)
		tickets[name] = u[strings.LastIndex(u, "/")+1:]
		transfers[name] = id
	}
	snapImage := func(sid string) map[string]any {
		return map[string]any{"id": a.snapshotDisks("chain-vm", sid)["chain"]}
	}
	dl := func(extra map[string]any) map[string]any {
		m := map[string]any{"direction": "download", "format": "raw"}
		for k, v := range extra {
			m[k] = v
		}
		return m
	}
	open("raw", dl(map[string]any{"disk": map[string]any{"id": "raw"}}))
	open("snap2", dl(map[string]any{"snapshot": snapImage(snap2)}))
	// The shallow tickets would lock the chain disk a second time (the
	// engine allows one transfer per disk): they get their own runs below.
	open("dirty", dl(map[string]any{"disk": map[string]any{"id": "dirty"}}))

	// subst turns the recorded ticket and transfer names into ours.
	subst := func(s string) string {
		for name, id := range ids {
			if tk, ok := tickets[name]; ok {
				s = strings.ReplaceAll(s, id, tk)
			}
		}
		for name, id := range transfers {
			s = strings.ReplaceAll(s, "transfer-"+name, id)
		}
		return s
	}

	type probe struct {
		name, method, path string
		hdr                map[string]string
		body               string
		shape              bool // compare JSON shape, not bytes
		hash               bool // compare the sha256 of the whole body
	}
	img := func(name string) string { return "/images/" + ids[name] }
	probes := []probe{
		{name: "info", method: "GET", path: "/info/"},
		{name: "options", method: "OPTIONS", path: img("raw")},
		{name: "options-star", method: "OPTIONS", path: "/images/*"},
		{name: "options-unknown", method: "OPTIONS", path: "/images/00000000-0000-0000-0000-000000000000"},
		{name: "head", method: "HEAD", path: img("raw")},
		{name: "get-full", method: "GET", path: img("raw")},
		{name: "get-range", method: "GET", path: img("raw"), hdr: map[string]string{"Range": "bytes=0-1023"}},
		{name: "get-range-open", method: "GET", path: img("raw"), hdr: map[string]string{"Range": "bytes=1073740800-"}},
		{name: "get-range-last", method: "GET", path: img("raw"), hdr: map[string]string{"Range": "bytes=1073741823-1073741823"}},
		{name: "get-range-hole", method: "GET", path: img("raw"), hdr: map[string]string{"Range": "bytes=209715200-209716223"}},
		{name: "get-multirange", method: "GET", path: img("raw"), hdr: map[string]string{"Range": "bytes=0-99,200-299"}},
		{name: "get-suffix", method: "GET", path: img("raw"), hdr: map[string]string{"Range": "bytes=-100"}},
		{name: "get-range-oob", method: "GET", path: img("raw"), hdr: map[string]string{"Range": "bytes=1073741824-1073742847"}},
		{name: "get-range-over", method: "GET", path: img("raw"), hdr: map[string]string{"Range": "bytes=1073741000-1073742000"}},
		{name: "get-range-open-at-size", method: "GET", path: img("raw"), hdr: map[string]string{"Range": "bytes=1073741824-"}},
		{name: "get-range-open-past", method: "GET", path: img("raw"), hdr: map[string]string{"Range": "bytes=2000000000-"}},
		{name: "get-range-junk", method: "GET", path: img("raw"), hdr: map[string]string{"Range": "bytes=abc"}},
		{name: "get-range-units", method: "GET", path: img("raw"), hdr: map[string]string{"Range": "items=0-10"}},
		{name: "get-range-inverted", method: "GET", path: img("raw"), hdr: map[string]string{"Range": "bytes=100-50"}},
		{name: "get-range-space", method: "GET", path: img("raw"), hdr: map[string]string{"Range": "bytes = 0-9"}},
		{name: "extents-zero", method: "GET", path: img("raw") + "/extents", shape: true},
		{name: "extents-zero-explicit", method: "GET", path: img("raw") + "/extents?context=zero", shape: true},
		{name: "extents-dirty-nondirty", method: "GET", path: img("raw") + "/extents?context=dirty"},
		{name: "extents-bad-context", method: "GET", path: img("raw") + "/extents?context=foo"},
		{name: "extents-snap2", method: "GET", path: img("snap2") + "/extents"},
		{name: "extents-dirty-zero", method: "GET", path: img("dirty") + "/extents?context=zero"},
		{name: "checksum-bad-bs", method: "GET", path: img("raw") + "/checksum?block_size=1000"},
		{name: "checksum-algorithms", method: "GET", path: img("raw") + "/checksum/algorithms"},
		{name: "unknown-ticket", method: "GET", path: "/images/00000000-0000-0000-0000-000000000000"},
		{name: "unknown-ticket-extents", method: "GET", path: "/images/00000000-0000-0000-0000-000000000000/extents"},
		{name: "no-ticket", method: "GET", path: "/images/"},
		{name: "unknown-route", method: "GET", path: "/foo"},
		{name: "put-on-read-ticket", method: "PUT", path: img("raw"), body: "data"},
		{name: "patch-on-read-ticket", method: "PATCH", path: img("raw"), body: `{"op": "zero", "offset": 0, "size": 4096}`},
		{name: "post", method: "POST", path: img("raw")},
		{name: "delete", method: "DELETE", path: img("raw")},
	}
	if !testing.Short() {
		probes = append(probes, probe{name: "get-full-snap2", method: "GET", path: img("snap2"), hash: true})
	}
	run := func(t *testing.T, p probe) {
		want := loadRecordedAnswer(t, p.name)
		var body io.Reader
		if p.body != "" {
			body = strings.NewReader(p.body)
		}
		req, err := http.NewRequest(p.method, srv.DaemonURL()+subst(p.path), body)
		require.NoError(t, err)
		for k, v := range p.hdr {
			req.Header.Set(k, v)
		}
		// A fresh connection per probe: HEAD's body and 403's close must
		// not leak into the next probe.
		tp := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: srv.CAPool()}}
		defer tp.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tp}).Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		h := sha256.New()
		var got []byte
		if p.method == "GET" && resp.ContentLength > 1<<20 {
			_, err = io.Copy(h, resp.Body) // whole images: hashed, not kept
		} else {
			got, err = io.ReadAll(io.TeeReader(resp.Body, h))
		}
		require.NoError(t, err)
		assert.Equal(t, want.status, resp.StatusCode, "status")
		for _, k := range []string{"Content-Range", "Content-Length", "Content-Type", "Allow", "Connection", "Content-Disposition", "Server"} {
			wv, gv := want.header.Get(k), resp.Header.Get(k)
			if k == "Connection" && resp.Close {
				gv = "close"
			}
			if k == "Content-Length" && p.shape {
				assert.NotEmpty(t, gv, k)
				continue
			}
			if k == "Content-Length" && len(want.body) > 0 {
				// Our transfer ids are longer than the recorded names.
				wv = strconv.Itoa(len(subst(string(want.body))))
			}
			assert.Equal(t, subst(wv), gv, "header %s", k)
		}
		switch {
		case p.hash:
			assert.Equal(t, want.sha, hex.EncodeToString(h.Sum(nil)), "body sha256")
		case p.shape:
			assertSameExtentsShape(t, want.body, got, size)
		case p.method == "HEAD" || len(want.body) == 0 && want.sha == "":
		case len(want.body) > 0:
			assert.Equal(t, subst(string(want.body)), string(got), "body")
		}
	}
	for _, p := range probes {
		t.Run(p.name, func(t *testing.T) { run(t, p) })
	}

	// One layer at a time, each after the chain disk's previous transfer
	// is finalized.
	prev := "snap2"
	for _, layer := range []struct {
		ticket, snap string
		probes       []probe
	}{
		{"base-shallow", base, []probe{{name: "extents-base-shallow", method: "GET", path: img("base-shallow") + "/extents"}}},
		{"snap1-shallow", snap1, []probe{{name: "extents-snap1-shallow", method: "GET", path: img("snap1-shallow") + "/extents"}}},
		{"snap2-shallow", snap2, []probe{
			{name: "extents-snap2-shallow", method: "GET", path: img("snap2-shallow") + "/extents"},
			{name: "get-range-snap2-shallow", method: "GET", path: img("snap2-shallow"), hdr: map[string]string{"Range": "bytes=1048576-1049599"}},
		}},
	} {
		a.call("POST", "/imagetransfers/"+transfers[prev]+"/finalize", map[string]any{}, 200)
		a.waitPhase(transfers[prev], "finished_success", nil)
		open(layer.ticket, dl(map[string]any{"snapshot": snapImage(layer.snap), "shallow": true}))
		for _, p := range layer.probes {
			t.Run(p.name, func(t *testing.T) { run(t, p) })
		}
		prev = layer.ticket
	}

	// Expired tickets: the raw ticket stands in for the recorded "expired" one.
	srv.ExpireTickets()
	transfers["expired"] = transfers["raw"]
	for _, p := range []probe{
		{name: "expired", method: "GET", path: img("raw"), hdr: map[string]string{"Range": "bytes=0-3"}},
		{name: "expired-options", method: "OPTIONS", path: img("raw")},
		{name: "expired-extents", method: "GET", path: img("raw") + "/extents"},
	} {
		t.Run(p.name, func(t *testing.T) { run(t, p) })
	}
}

// assertSameExtentsShape compares zero extents by keys, contiguity,
// coverage and merging; the raw image's exact runs are not reproducible.
func assertSameExtentsShape(t *testing.T, want, got []byte, size int64) {
	t.Helper()
	var w, g []map[string]any
	require.NoError(t, json.Unmarshal(want, &w))
	require.NoError(t, json.Unmarshal(got, &g), string(got))
	require.NotEmpty(t, g)
	keys := func(m map[string]any) []string {
		var k []string
		for x := range m {
			k = append(k, x)
		}
		sort.Strings(k)
		return k
	}
	assert.Equal(t, keys(w[0]), keys(g[0]), "extent keys")
	var end float64
	for i, e := range g {
		assert.Equal(t, end, e["start"], "contiguous")
		end += e["length"].(float64)
		if i > 0 {
			p := g[i-1]
			assert.False(t, p["zero"] == e["zero"] && p["hole"] == e["hole"], "neighbours of one kind merge")
		}
	}
	assert.Equal(t, float64(size), end, "extents cover the image")
	assert.Equal(t, w[0]["zero"], g[0]["zero"], "the image starts with data")
}
