package ovirttest

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSSO(t *testing.T) {
	clk := newFakeClock()
	srv, a := start(t, Options{Clock: clk.Now, TokenTTL: time.Minute})

	code, m := a.sso(DefaultUser, DefaultPassword, "application/json")
	require.Equal(t, 200, code)
	assert.Equal(t, "bearer", m["token_type"])
	assert.Equal(t, "ovirt-app-api", m["scope"])
	assert.NotEmpty(t, m["access_token"])
	exp, ok := m["exp"].(string)
	require.True(t, ok, "exp is a string: %v", m["exp"])
	ms, err := strconv.ParseInt(exp, 10, 64)
	require.NoError(t, err)
	assert.Equal(t, clk.Now().Add(time.Minute).UnixMilli(), ms)

	code, m = a.sso(DefaultUser, "wrong", "application/json")
	assert.Equal(t, 400, code)
	assert.Equal(t, "access_denied", m["error_code"])
	assert.Contains(t, m["error"], "username or password is incorrect")
	assert.NotContains(t, m, "error_description")

	code, m = a.sso(DefaultUser, DefaultPassword, "application/json, text/plain")
	assert.Equal(t, 400, code, "Accept must be exactly application/json")
	assert.Contains(t, m, "error_code")
	assert.Equal(t, 1, srv.Stats().Logins)
}

func TestTokenExpiry(t *testing.T) {
	clk := newFakeClock()
	_, a := start(t, Options{Clock: clk.Now, TokenTTL: time.Minute})
	code, body := a.do("GET", "/vms", nil)
	assert.Equal(t, 401, code, "no token")
	assert.Contains(t, string(body), "Unauthorized")

	a.login()
	a.call("GET", "/vms", nil, 200)
	clk.Advance(time.Minute)
	code, _ = a.do("GET", "/vms", nil)
	assert.Equal(t, 401, code, "expired token")
	a.login()
	a.call("GET", "/vms", nil, 200)

	a.token = "forged"
	code, _ = a.do("GET", "/vms", nil)
	assert.Equal(t, 401, code)
}

func TestAcceptAndVersion(t *testing.T) {
	srv, a := start(t, Options{})
	a.login()
	req, _ := http.NewRequest("GET", srv.URL()+apiPrefix+"/vms", nil)
	req.Header.Set("Authorization", "Bearer "+a.token)
	req.Header.Set("Accept", "application/xml")
	resp, err := a.http.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusNotAcceptable, resp.StatusCode, "JSON only")

	req.Header.Set("Accept", "application/json") // no Version header: v4
	resp, err = a.http.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, 200, resp.StatusCode)

	resp, err = a.http.Get(srv.URL() + pkiPath + "?resource=ca-certificate&format=X509-PEM-CA")
	require.NoError(t, err)
	pem, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, srv.CAPEM(), pem)
}

func TestVMsDisksAndSnapshots(t *testing.T) {
	srv, a := start(t, Options{SnapshotDelay: 50 * time.Millisecond})
	vmID, err := srv.AddVM(VMSpec{ID: "vm-1", Name: "web", Disks: []DiskSpec{{ID: "disk-a", Name: "web_Disk1", Size: 8 * mib}, {Name: "web_Disk2", Size: 4 * mib}}})
	require.NoError(t, err)
	require.NoError(t, srv.WriteDisk("web", "web_Disk1", 0, bytes.Repeat([]byte{1}, 100_000)))
	a.login()

	vms := list(a.call("GET", "/vms?search=name%3Dweb", nil, 200), "vm")
	require.Len(t, vms, 1)
	assert.Equal(t, vmID, vms[0]["id"])
	assert.Equal(t, apiPrefix+"/vms/vm-1", vms[0]["href"])
	assert.Empty(t, list(a.call("GET", "/vms?search=name%3Dnope", nil, 200), "vm"))

	atts := list(a.call("GET", "/vms/vm-1/diskattachments", nil, 200), "disk_attachment")
	require.Len(t, atts, 2)
	assert.Equal(t, "disk-a", atts[0]["id"])
	assert.Equal(t, "disk-a", atts[0]["disk"].(map[string]any)["id"])
	assert.Equal(t, true, atts[0]["active"])
	disk2 := atts[1]["id"].(string)

	d := a.call("GET", "/disks/disk-a", nil, 200)
	assert.Equal(t, "web_Disk1", d["alias"])
	assert.Equal(t, "cow", d["format"])
	assert.EqualValues(t, 8*mib, d["provisioned_size"])
	assert.EqualValues(t, 2*clusterSize, d["actual_size"])
	a.call("GET", "/disks/nope", nil, 404)

	snaps := list(a.call("GET", "/vms/vm-1/snapshots", nil, 200), "snapshot")
	require.Len(t, snaps, 1)
	assert.Equal(t, "active", snaps[0]["snapshot_type"])
	active := snaps[0]["id"].(string)
	activeImages := a.snapshotDisks("vm-1", active)

	// Description is mandatory.
	f := a.call("POST", "/vms/vm-1/snapshots", map[string]any{"persist_memorystate": false}, 400)
	assert.Contains(t, f["detail"], "description")

	sn := a.call("POST", "/vms/vm-1/snapshots", map[string]any{"description": "backup-1", "persist_memorystate": false}, 202)
	sid := sn["id"].(string)
	assert.Equal(t, "locked", sn["snapshot_status"])
	assert.Equal(t, "regular", sn["snapshot_type"])
	assert.Equal(t, false, sn["persist_memorystate"])
	// A second one while the first is being created, and deleting it, conflict.
	a.call("POST", "/vms/vm-1/snapshots", map[string]any{"description": "x"}, 409)
	a.call("DELETE", "/vms/vm-1/snapshots/"+sid, nil, 409)
	require.Eventually(t, func() bool {
		return a.call("GET", "/vms/vm-1/snapshots/"+sid, nil, 200)["snapshot_status"] == "ok"
	}, 5*time.Second, 10*time.Millisecond)

	// The snapshot holds the volumes that were active; the disks got new ones.
	snapImages := a.snapshotDisks("vm-1", sid)
	assert.Equal(t, activeImages, snapImages)
	nowImages := a.snapshotDisks("vm-1", active)
	require.Len(t, nowImages, 2)
	assert.NotEqual(t, snapImages["disk-a"], nowImages["disk-a"])
	assert.NotEqual(t, snapImages[disk2], nowImages[disk2])
	sdisks := list(a.call("GET", "/vms/vm-1/snapshots/"+sid+"/disks", nil, 200), "disk")
	assert.Equal(t, "web_Disk1", sdisks[0]["alias"])
	assert.Equal(t, "cow", sdisks[0]["format"])

	ids, err := srv.Snapshots("vm-1")
	require.NoError(t, err)
	assert.Equal(t, []string{sid}, ids)
	snaps = list(a.call("GET", "/vms/vm-1/snapshots", nil, 200), "snapshot")
	require.Len(t, snaps, 2)
	assert.Equal(t, sid, snaps[0]["id"])
	assert.Equal(t, "active", snaps[1]["snapshot_type"])

	// Data written after the snapshot stays out of it; deleting the
	// snapshot keeps the disk's bytes.
	require.NoError(t, srv.WriteDisk("vm-1", "disk-a", 4*mib, []byte("after")))
	before, err := srv.SnapshotData("vm-1", active, "disk-a")
	require.NoError(t, err)
	want, err := readFile(before)
	require.NoError(t, err)
	a.call("DELETE", "/vms/vm-1/snapshots/nope", nil, 404)
	a.call("DELETE", "/vms/vm-1/snapshots/"+active, nil, 409)
	a.call("DELETE", "/vms/vm-1/snapshots/"+sid, nil, 200)
	assert.Equal(t, "locked", a.call("GET", "/vms/vm-1/snapshots/"+sid, nil, 200)["snapshot_status"])
	a.call("DELETE", "/vms/vm-1/snapshots/"+sid, nil, 409)
	require.Eventually(t, func() bool {
		code, _ := a.do("GET", "/vms/vm-1/snapshots/"+sid, nil)
		return code == 404
	}, 5*time.Second, 10*time.Millisecond)
	after, err := srv.SnapshotData("vm-1", active, "disk-a")
	require.NoError(t, err)
	got, err := readFile(after)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(want, got), "the merge kept the bytes")
	assert.Equal(t, []byte("after"), got[4*mib:4*mib+5])
	assert.Equal(t, byte(1), got[99_999])
	assert.Equal(t, 1, srv.Stats().Snapshots)
}

func TestStringScalars(t *testing.T) {
	for _, str := range []bool{false, true} {
		t.Run(strconv.FormatBool(str), func(t *testing.T) {
			srv, a := start(t, Options{StringScalars: str})
			_, err := srv.AddVM(VMSpec{ID: "vm", Name: "vm", Disks: []DiskSpec{{ID: "d", Name: "d", Size: mib}}})
			require.NoError(t, err)
			sid, err := srv.TakeSnapshot("vm", "s1")
			require.NoError(t, err)
			a.login()
			d := a.call("GET", "/disks/d", nil, 200)
			att := list(a.call("GET", "/vms/vm/diskattachments", nil, 200), "disk_attachment")[0]
			sn := a.call("GET", "/vms/vm/snapshots/"+sid, nil, 200)
			if str {
				assert.Equal(t, "1048576", d["provisioned_size"])
				assert.Equal(t, "true", att["active"])
				assert.Equal(t, "false", sn["persist_memorystate"])
				assert.IsType(t, float64(0), sn["date"], "epoch milliseconds")
				assert.Greater(t, sn["date"].(float64), 1e12)
			} else {
				assert.Equal(t, float64(mib), d["provisioned_size"])
				assert.Equal(t, true, att["active"])
				assert.Equal(t, false, sn["persist_memorystate"])
				_, err := time.Parse(time.RFC3339, sn["date"].(string))
				assert.NoError(t, err, "ISO date: %v", sn["date"])
			}
			// The engine reads both spellings in requests.
			_, tr := a.startTransfer(map[string]any{"disk": map[string]any{"id": "d"}, "direction": "download", "format": "raw", "shallow": "false", "inactivity_timeout": "30"}, nil)
			if str {
				assert.Equal(t, "30", tr["inactivity_timeout"])
			} else {
				assert.Equal(t, float64(30), tr["inactivity_timeout"])
			}
		})
	}
}

func TestTransferPhases(t *testing.T) {
	clk := newFakeClock()
	srv, a := start(t, Options{Clock: clk.Now, SnapshotDelay: time.Millisecond, TransferDelay: 100 * time.Millisecond})
	_, err := srv.AddVM(VMSpec{ID: "vm", Name: "vm", Disks: []DiskSpec{{ID: "d", Name: "d", Size: 4 * mib}, {ID: "e", Name: "e", Size: mib}}})
	require.NoError(t, err)
	require.NoError(t, srv.WriteDisk("vm", "d", 0, []byte("hello")))
	sid, err := srv.TakeSnapshot("vm", "s1")
	require.NoError(t, err)
	a.login()
	img := a.snapshotDisks("vm", sid)["d"]

	// Bad requests.
	a.call("POST", "/imagetransfers", map[string]any{"snapshot": map[string]any{"id": img}, "format": "raw"}, 400) // upload by default
	a.call("POST", "/imagetransfers", map[string]any{"snapshot": map[string]any{"id": "nope"}, "direction": "download", "format": "raw"}, 404)
	a.call("POST", "/imagetransfers", map[string]any{"direction": "download", "format": "raw"}, 400)

	body := map[string]any{"snapshot": map[string]any{"id": img}, "direction": "download", "format": "raw"}
	id, tr := a.startTransfer(body, clk)
	url := tr["transfer_url"].(string)
	assert.True(t, strings.HasPrefix(url, srv.DaemonURL()+"/images/"), url)
	assert.True(t, strings.HasPrefix(tr["proxy_url"].(string), srv.ProxyURL()+"/images/"))
	assert.Equal(t, img, tr["snapshot"].(map[string]any)["id"])
	assert.Equal(t, "locked", a.call("GET", "/disks/d", nil, 200)["status"])
	// The disk is locked: no second transfer, no snapshot, no removal.
	a.call("POST", "/imagetransfers", body, 409)
	a.call("POST", "/vms/vm/snapshots", map[string]any{"description": "x"}, 409)
	a.call("DELETE", "/vms/vm/snapshots/"+sid, nil, 409)

	resp, b := a.imageio("GET", url, map[string]string{"Range": "bytes=0-4"})
	require.Equal(t, 206, resp.StatusCode)
	assert.Equal(t, "hello", string(b))
	assert.Equal(t, 1, srv.Stats().OpenTransfers)

	a.call("POST", "/imagetransfers/"+id+"/finalize", map[string]any{}, 200)
	assert.Equal(t, "finalizing_success", a.call("GET", "/imagetransfers/"+id, nil, 200)["phase"])
	resp, b = a.imageio("GET", url, map[string]string{"Range": "bytes=0-4"})
	assert.Equal(t, 403, resp.StatusCode, "the ticket is gone")
	assert.Contains(t, string(b), "No such ticket")
	tr = a.waitPhase(id, "finished_success", clk)
	assert.NotContains(t, tr, "transfer_url")
	a.call("POST", "/imagetransfers/"+id+"/finalize", map[string]any{}, 409)

	// Cancel by the client.
	id, tr = a.startTransfer(map[string]any{"disk": map[string]any{"id": "d"}, "direction": "download", "format": "raw"}, clk)
	a.call("POST", "/imagetransfers/"+id+"/cancel", nil, 200)
	assert.Equal(t, "cancelled_user", a.call("GET", "/imagetransfers/"+id, nil, 200)["phase"])
	resp, _ = a.imageio("OPTIONS", tr["proxy_url"].(string), nil)
	assert.Equal(t, 403, resp.StatusCode)
	a.waitPhase(id, "finished_cleanup", clk)

	// Cancel by the engine: no imageio activity for inactivity_timeout.
	body = map[string]any{"disk": map[string]any{"id": "e"}, "direction": "download", "format": "raw", "inactivity_timeout": 5}
	id, tr = a.startTransfer(body, clk)
	clk.Advance(4 * time.Second)
	resp, _ = a.imageio("GET", tr["transfer_url"].(string), map[string]string{"Range": "bytes=0-0"})
	require.Equal(t, 206, resp.StatusCode, "activity resets the timer")
	clk.Advance(4 * time.Second)
	assert.Equal(t, "transferring", a.call("GET", "/imagetransfers/"+id, nil, 200)["phase"])
	clk.Advance(time.Second)
	assert.Equal(t, "cancelled_system", a.call("GET", "/imagetransfers/"+id, nil, 200)["phase"])
	resp, _ = a.imageio("GET", tr["transfer_url"].(string), map[string]string{"Range": "bytes=0-0"})
	assert.Equal(t, 403, resp.StatusCode)
	a.waitPhase(id, "finished_cleanup", clk)

	st := srv.Stats()
	assert.Equal(t, 3, st.Transfers)
	assert.Equal(t, 0, st.OpenTransfers)
	assert.Equal(t, 1, st.Finalized)
	assert.Equal(t, 2, st.Cancelled)
	// The disk is free again.
	a.call("POST", "/vms/vm/snapshots", map[string]any{"description": "after", "persist_memorystate": false}, 202)
}

func TestNoTransferURL(t *testing.T) {
	srv, a := start(t, Options{NoTransferURL: true, TransferDelay: time.Millisecond})
	_, err := srv.AddVM(VMSpec{ID: "vm", Name: "vm", Disks: []DiskSpec{{ID: "d", Name: "d", Size: mib}}})
	require.NoError(t, err)
	a.login()
	_, tr := a.startTransfer(map[string]any{"disk": map[string]any{"id": "d"}, "direction": "download", "format": "raw"}, nil)
	assert.NotContains(t, tr, "transfer_url")
	resp, _ := a.imageio("OPTIONS", tr["proxy_url"].(string), nil)
	assert.Equal(t, 200, resp.StatusCode)
}

// A request in flight holds the ticket: finalize answers 409 until it
// ends; an idle keep-alive connection does not stand in the way.
func TestFinalizeWithRequestInFlight(t *testing.T) {
	srv, a := start(t, Options{TransferDelay: time.Millisecond})
	_, err := srv.AddVM(VMSpec{ID: "vm", Name: "vm", Disks: []DiskSpec{{ID: "d", Name: "d", Size: 256 * mib}}})
	require.NoError(t, err)
	a.login()
	id, tr := a.startTransfer(map[string]any{"disk": map[string]any{"id": "d"}, "direction": "download", "format": "raw"}, nil)
	req, _ := http.NewRequest("GET", tr["transfer_url"].(string), nil)
	resp, err := a.http.Do(req) // the whole image; read only a little
	require.NoError(t, err)
	_, err = io.ReadFull(resp.Body, make([]byte, 4096))
	require.NoError(t, err)
	f := a.call("POST", "/imagetransfers/"+id+"/finalize", nil, 409)
	assert.Equal(t, "Operation Failed", f["reason"])
	assert.NotEmpty(t, f["detail"])
	_, err = io.Copy(io.Discard, resp.Body)
	require.NoError(t, err)
	resp.Body.Close()
	// The connection is idle in the pool now; finalize goes through (the
	// handler's release may trail the last byte by a moment).
	require.Eventually(t, func() bool {
		code, _ := a.do("POST", "/imagetransfers/"+id+"/finalize", map[string]any{})
		return code == 200
	}, 5*time.Second, 10*time.Millisecond)
	assert.EqualValues(t, 256*mib, srv.Stats().DataBytes)
}

func TestFaultShape(t *testing.T) {
	_, a := start(t, Options{})
	a.login()
	code, b := a.do("GET", "/vms/nope", nil)
	assert.Equal(t, 404, code)
	var f map[string]any
	require.NoError(t, json.Unmarshal(b, &f))
	assert.Contains(t, f, "reason")
	assert.Contains(t, f, "detail")
	code, _ = a.do("GET", "/nothing/here", nil)
	assert.Equal(t, 404, code)
}
