package ovirttest

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func readFile(path string) ([]byte, error) { return os.ReadFile(path) }

type zeroExtent struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
	Zero   bool  `json:"zero"`
	Hole   bool  `json:"hole"`
}

func (a *api) extents(u string) []zeroExtent {
	a.t.Helper()
	resp, b := a.imageio("GET", u+"/extents", nil)
	require.Equal(a.t, 200, resp.StatusCode, string(b))
	var out []zeroExtent
	require.NoError(a.t, json.Unmarshal(b, &out))
	return out
}

func TestImageioRanges(t *testing.T) {
	srv, a := start(t, Options{TransferDelay: time.Millisecond})
	const size = 4 * mib
	_, err := srv.AddVM(VMSpec{ID: "vm", Name: "vm", Disks: []DiskSpec{{ID: "d", Name: "d", Size: size}}})
	require.NoError(t, err)
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i*7 + i>>16)
	}
	require.NoError(t, srv.WriteDisk("vm", "d", 0, data))
	a.login()
	_, tr := a.startTransfer(map[string]any{"disk": map[string]any{"id": "d"}, "direction": "download", "format": "raw"}, nil)
	u := tr["transfer_url"].(string)

	get := func(rng string) (*http.Response, []byte) {
		h := map[string]string{}
		if rng != "" {
			h["Range"] = rng
		}
		return a.imageio("GET", u, h)
	}
	resp, b := get("bytes=100-199")
	require.Equal(t, 206, resp.StatusCode)
	assert.Equal(t, fmt.Sprintf("bytes 100-199/%d", size), resp.Header.Get("Content-Range"))
	assert.Equal(t, "100", resp.Header.Get("Content-Length"))
	assert.Equal(t, data[100:200], b)

	resp, b = get(fmt.Sprintf("bytes=%d-", size-10))
	require.Equal(t, 206, resp.StatusCode)
	assert.Equal(t, data[size-10:], b)

	resp, b = get("")
	require.Equal(t, 200, resp.StatusCode)
	assert.Equal(t, data, b)

	for _, rng := range []string{"bytes=0-1,5-6", "bytes=-10", "bytes=x", "items=0-1", "bytes=9-3", "bytes= 0-1"} {
		resp, _ = get(rng)
		assert.Equal(t, 416, resp.StatusCode, rng)
		assert.Empty(t, resp.Header.Get("Content-Range"), rng)
	}
	for _, rng := range []string{fmt.Sprintf("bytes=%d-%d", size, size+10), fmt.Sprintf("bytes=%d-%d", size-1, size)} {
		resp, _ = get(rng)
		assert.Equal(t, 416, resp.StatusCode, rng)
		assert.Equal(t, fmt.Sprintf("bytes */%d", size), resp.Header.Get("Content-Range"), rng)
	}
	// The broken open ranges, as observed.
	resp, b = get(fmt.Sprintf("bytes=%d-", size))
	assert.Equal(t, 206, resp.StatusCode)
	assert.Empty(t, b)
	assert.Equal(t, fmt.Sprintf("bytes %d-%d/%d", size, size-1, size), resp.Header.Get("Content-Range"))
	resp, b = get(fmt.Sprintf("bytes=%d-", size+100))
	assert.Equal(t, 400, resp.StatusCode)
	assert.Equal(t, "Requested -100 bytes, available 0 bytes\n", string(b))

	resp, b = a.imageio("OPTIONS", u, nil)
	require.Equal(t, 200, resp.StatusCode)
	assert.Equal(t, "OPTIONS,GET", resp.Header.Get("Allow"))
	var opt map[string]any
	require.NoError(t, json.Unmarshal(b, &opt))
	assert.Equal(t, []any{"checksum", "extents"}, opt["features"])
	assert.Equal(t, float64(8), opt["max_readers"])

	resp, _ = a.imageio("GET", u+"/extents?context=dirty", nil)
	assert.Equal(t, 404, resp.StatusCode)
	assert.Equal(t, []zeroExtent{{Start: 0, Length: size}}, a.extents(u))

	st := srv.Stats()
	assert.EqualValues(t, 100+10+size, st.DataBytes)
	assert.Equal(t, 1, st.ExtentsRequests)
}

// TestChainExtents writes random data and zero clusters across three
// snapshots and checks every snapshot's full-chain and shallow transfers
// against SnapshotData.
func TestChainExtents(t *testing.T) {
	srv, a := start(t, Options{TransferDelay: time.Millisecond, SnapshotDelay: time.Millisecond})
	const size = 16*mib + 4096 // a last, partial cluster
	_, err := srv.AddVM(VMSpec{ID: "vm", Name: "vm", Disks: []DiskSpec{{ID: "d", Name: "d", Size: size}}})
	require.NoError(t, err)
	rng := rand.New(rand.NewPCG(1, 2))
	var snaps []string
	written := map[string]map[int64]bool{} // snapshot → clusters its layer allocated
	for i := 0; i < 3; i++ {
		mine := map[int64]bool{}
		for j := 0; j < 12; j++ {
			off := rng.Int64N(size - 1)
			n := min(1+rng.Int64N(300_000), size-off)
			if rng.IntN(4) == 0 {
				require.NoError(t, srv.DiscardDisk("vm", "d", off, n))
			} else {
				b := make([]byte, n)
				for k := range b {
					b[k] = byte(1 + rng.IntN(255))
				}
				require.NoError(t, srv.WriteDisk("vm", "d", off, b))
			}
			for c := off / clusterSize; c <= (off+n-1)/clusterSize; c++ {
				mine[c] = true
			}
		}
		sid, err := srv.TakeSnapshot("vm", fmt.Sprint("s", i))
		require.NoError(t, err)
		snaps = append(snaps, sid)
		written[sid] = mine
	}
	ids, err := srv.Snapshots("vm")
	require.NoError(t, err)
	require.Equal(t, snaps, ids)
	a.login()
	for _, sid := range snaps {
		path, err := srv.SnapshotData("vm", sid, "d")
		require.NoError(t, err)
		want, err := os.ReadFile(path)
		require.NoError(t, err)
		require.Len(t, want, size)
		img := a.snapshotDisks("vm", sid)["d"]
		for _, shallow := range []bool{false, true} {
			id, tr := a.startTransfer(map[string]any{"snapshot": map[string]any{"id": img}, "direction": "download", "format": "raw", "shallow": shallow}, nil)
			u := tr["transfer_url"].(string)
			ext := a.extents(u)
			_, got := a.imageio("GET", u, nil)
			require.Len(t, got, size)
			var end int64
			for _, e := range ext {
				require.Equal(t, end, e.Start, "contiguous")
				end += e.Length
				seg := got[e.Start : e.Start+e.Length]
				if e.Zero {
					assert.Equal(t, make([]byte, e.Length), seg, "zero extent at %d reads zeros", e.Start)
				}
				if e.Hole {
					assert.True(t, e.Zero, "a hole reads as zeros")
				}
				if shallow {
					for c := e.Start / clusterSize; c*clusterSize < e.Start+e.Length; c++ {
						assert.Equal(t, !written[sid][c], e.Hole, "shallow: hole ⇔ the layer left cluster %d alone", c)
					}
					if !e.Zero {
						// The layer's own data is what the snapshot shows there.
						assert.True(t, bytes.Equal(want[e.Start:e.Start+e.Length], seg), "shallow data at %d", e.Start)
					}
				}
			}
			require.EqualValues(t, size, end, "extents cover the image")
			if !shallow {
				assert.True(t, bytes.Equal(want, got), "full chain = SnapshotData")
			}
			a.call("POST", "/imagetransfers/"+id+"/finalize", map[string]any{}, 200)
			a.waitPhase(id, "finished_success", nil)
		}
	}
}

// HEAD is answered with a body, and the connection keeps serving: the
// next answer on it comes after those 77 bytes, as head-wire recorded.
func TestHeadWire(t *testing.T) {
	srv, a := start(t, Options{TransferDelay: time.Millisecond})
	_, err := srv.AddVM(VMSpec{ID: "vm", Name: "vm", Disks: []DiskSpec{{ID: "d", Name: "d", Size: mib}}})
	require.NoError(t, err)
	require.NoError(t, srv.WriteDisk("vm", "d", 0, []byte{0x9e, 0x04, 0x35, 0x1e}))
	a.login()
	_, tr := a.startTransfer(map[string]any{"disk": map[string]any{"id": "d"}, "direction": "download", "format": "raw"}, nil)
	u, err := url.Parse(tr["transfer_url"].(string))
	require.NoError(t, err)
	c, err := tls.Dial("tcp", u.Host, &tls.Config{RootCAs: srv.CAPool()})
	require.NoError(t, err)
	defer c.Close()
	_, err = fmt.Fprintf(c, "HEAD %s HTTP/1.1\r\nHost: %s\r\n\r\n", u.Path, u.Host)
	require.NoError(t, err)
	br := bufio.NewReader(c)
	// Read the HEAD answer as if it were a GET's, body included.
	resp, err := http.ReadResponse(br, &http.Request{Method: "GET"})
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	assert.Equal(t, 405, resp.StatusCode)
	assert.Equal(t, fmt.Sprintf("Method 'HEAD' not defined for '%s'\n", u.Path), string(body))
	_, err = fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nRange: bytes=0-3\r\n\r\n", u.Path, u.Host)
	require.NoError(t, err)
	resp, err = http.ReadResponse(br, &http.Request{Method: "GET"})
	require.NoError(t, err)
	body, err = io.ReadAll(resp.Body)
	require.NoError(t, err)
	assert.Equal(t, 206, resp.StatusCode)
	assert.Equal(t, []byte{0x9e, 0x04, 0x35, 0x1e}, body)
	assert.Equal(t, 1, srv.Stats().PeakConnections, "one connection across the hand-back")
}

// An idle connection is closed without a word after InactivityTimeout.
func TestIdleWire(t *testing.T) {
	srv, a := start(t, Options{TransferDelay: time.Millisecond, InactivityTimeout: 300 * time.Millisecond})
	_, err := srv.AddVM(VMSpec{ID: "vm", Name: "vm", Disks: []DiskSpec{{ID: "d", Name: "d", Size: mib}}})
	require.NoError(t, err)
	a.login()
	_, tr := a.startTransfer(map[string]any{"disk": map[string]any{"id": "d"}, "direction": "download", "format": "raw"}, nil)
	u, err := url.Parse(tr["proxy_url"].(string))
	require.NoError(t, err)
	c, err := tls.Dial("tcp", u.Host, &tls.Config{RootCAs: srv.CAPool()})
	require.NoError(t, err)
	defer c.Close()
	br := bufio.NewReader(c)
	_, err = fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nRange: bytes=0-3\r\n\r\n", u.Path, u.Host)
	require.NoError(t, err)
	resp, err := http.ReadResponse(br, &http.Request{Method: "GET"})
	require.NoError(t, err)
	_, _ = io.ReadAll(resp.Body)
	assert.Equal(t, 206, resp.StatusCode)
	time.Sleep(700 * time.Millisecond)
	_, _ = fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nRange: bytes=4-7\r\n\r\n", u.Path, u.Host)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := br.Read(make([]byte, 1))
	assert.Zero(t, n)
	assert.ErrorIs(t, err, io.EOF, "closed silently")
}

func TestPeakConnectionsAndExpiry(t *testing.T) {
	srv, a := start(t, Options{TransferDelay: time.Millisecond})
	_, err := srv.AddVM(VMSpec{ID: "vm", Name: "vm", Disks: []DiskSpec{{ID: "d", Name: "d", Size: 8 * mib}}})
	require.NoError(t, err)
	a.login()
	id, tr := a.startTransfer(map[string]any{"disk": map[string]any{"id": "d"}, "direction": "download", "format": "raw"}, nil)
	u := tr["transfer_url"].(string)
	var wg sync.WaitGroup
	var clients []*http.Client
	for range 3 {
		tp := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: srv.CAPool()}}
		t.Cleanup(tp.CloseIdleConnections)
		clients = append(clients, &http.Client{Transport: tp})
	}
	start := make(chan struct{})
	for _, hc := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			resp, err := hc.Get(u)
			if assert.NoError(t, err) {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}()
	}
	close(start)
	wg.Wait()
	assert.Equal(t, 3, srv.Stats().PeakConnections, "three keep-alive connections on one ticket")

	srv.ExpireTickets()
	resp, b := a.imageio("GET", u, map[string]string{"Range": "bytes=0-0"})
	assert.Equal(t, 403, resp.StatusCode)
	assert.Equal(t, fmt.Sprintf("You are not allowed to access this resource: Transfer=%s expired\n", id), string(b))
	assert.True(t, resp.Close, "403 closes the connection")
}
