package xapitest

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/nbd"
	"github.com/vmexportfs/vmexportfs/backend/retry"
	"github.com/vmexportfs/vmexportfs/backend/testenv"
)

const mib = 1 << 20

// client is a tiny test-local XenAPI JSON-RPC client.
type client struct {
	t    *testing.T
	srv  *Server
	http *http.Client
	sess string
}

type rpcErr struct {
	Code    int      `json:"code"`
	Message string   `json:"message"`
	Data    []string `json:"data"`
}

func start(t *testing.T, opts Options) (*Server, *client) {
	t.Helper()
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	srv, err := Start(opts)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, srv.Close()) })
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: srv.CAPool()}}
	t.Cleanup(tr.CloseIdleConnections)
	return srv, &client{t: t, srv: srv, http: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

// raw posts one call and returns the answer body.
func (c *client) raw(method string, params ...any) []byte {
	c.t.Helper()
	body, err := json.Marshal(map[string]any{"jsonrpc": "2.0", "method": method, "params": params, "id": 7})
	require.NoError(c.t, err)
	resp, err := c.http.Post(c.srv.URL()+"/jsonrpc", "application/json", bytes.NewReader(body))
	require.NoError(c.t, err)
	defer resp.Body.Close()
	require.Equal(c.t, http.StatusOK, resp.StatusCode)
	b, err := io.ReadAll(resp.Body)
	require.NoError(c.t, err)
	return b
}

// try calls method and returns the result, or the XenAPI error.
func (c *client) try(method string, params ...any) (json.RawMessage, *rpcErr) {
	c.t.Helper()
	var a struct {
		JSONRPC string          `json:"jsonrpc"`
		Result  json.RawMessage `json:"result"`
		Error   *rpcErr         `json:"error"`
		ID      int             `json:"id"`
	}
	require.NoError(c.t, json.Unmarshal(c.raw(method, params...), &a))
	require.Equal(c.t, "2.0", a.JSONRPC)
	require.Equal(c.t, 7, a.ID)
	return a.Result, a.Error
}

func (c *client) call(method string, out any, params ...any) {
	c.t.Helper()
	res, e := c.try(method, params...)
	require.Nil(c.t, e, "%s: %+v", method, e)
	if out != nil {
		require.NoError(c.t, json.Unmarshal(res, out))
	}
}

// callS calls with the session first.
func (c *client) callS(method string, out any, params ...any) {
	c.t.Helper()
	c.call(method, out, append([]any{c.sess}, params...)...)
}

func (c *client) failS(method, code string, params ...any) []string {
	c.t.Helper()
	_, e := c.try(method, append([]any{c.sess}, params...)...)
	require.NotNil(c.t, e, method)
	require.Equal(c.t, 1, e.Code)
	require.Equal(c.t, code, e.Message, "%+v", e)
	return e.Data
}

func (c *client) login() string {
	c.t.Helper()
	var ref string
	c.call("session.login_with_password", &ref, DefaultUser, DefaultPassword, "2.21", "xapitest")
	c.sess = ref
	return ref
}

type rec = map[string]any

func (c *client) records(class string) map[string]rec {
	c.t.Helper()
	var out map[string]rec
	c.callS(class+".get_all_records", &out)
	return out
}

func byUUID(t *testing.T, recs map[string]rec, uuid string) (string, rec) {
	t.Helper()
	for ref, r := range recs {
		if r["uuid"] == uuid {
			return ref, r
		}
	}
	t.Fatalf("no record with uuid %s", uuid)
	return "", nil
}

// diskRef finds the VDI ref of a VM's userdevice through its VBDs.
func (c *client) diskRef(vmUUID, userdevice string) string {
	c.t.Helper()
	_, v := byUUID(c.t, c.records("VM"), vmUUID)
	vbds := c.records("VBD")
	for _, b := range v["VBDs"].([]any) {
		r := vbds[b.(string)]
		if r["userdevice"] == userdevice && r["type"] == "Disk" {
			return r["VDI"].(string)
		}
	}
	c.t.Fatalf("vm %s has no disk %s", vmUUID, userdevice)
	return ""
}

func TestLoginLogout(t *testing.T) {
	srv, c := start(t, Options{})
	_, e := c.try("session.login_with_password", DefaultUser, "wrong", "2.21", "xapitest")
	require.NotNil(t, e)
	assert.Equal(t, "SESSION_AUTHENTICATION_FAILED", e.Message)
	assert.Equal(t, []string{DefaultUser, "Authentication failure"}, e.Data)

	ref := c.login()
	assert.True(t, strings.HasPrefix(ref, "OpaqueRef:"))
	c.records("VM")
	st := srv.Stats()
	assert.Equal(t, 1, st.Logins)
	assert.Equal(t, 1, st.Sessions)

	c.callS("session.logout", nil)
	assert.Equal(t, []string{ref}, c.failS("VM.get_all_records", "SESSION_INVALID"))
	st = srv.Stats()
	assert.Equal(t, 1, st.Logouts)
	assert.Equal(t, 0, st.Sessions)
}

func TestSessionLimitAndInvalidate(t *testing.T) {
	srv, c := start(t, Options{SessionsPerUser: 2})
	first := c.login()
	second := c.login()
	third := c.login()
	c.sess = first
	assert.Equal(t, []string{first}, c.failS("VM.get_all_records", "SESSION_INVALID"))
	for _, s := range []string{second, third} {
		c.sess = s
		c.records("VM")
	}
	assert.Equal(t, 2, srv.Stats().Sessions)

	srv.InvalidateSessions()
	c.failS("VM.get_all_records", "SESSION_INVALID")
	assert.Equal(t, 0, srv.Stats().Sessions)
	c.login()
	c.records("VM")
}

func TestProtocolErrors(t *testing.T) {
	_, c := start(t, Options{})
	c.login()
	_, e := c.try("VM.frobnicate", c.sess)
	require.NotNil(t, e)
	assert.Equal(t, "MESSAGE_METHOD_UNKNOWN", e.Message)
	assert.Equal(t, []string{"VM.frobnicate"}, e.Data)
	assert.Equal(t, []string{"VDI", "OpaqueRef:nope"}, c.failS("VDI.destroy", "HANDLE_INVALID", "OpaqueRef:nope"))
	assert.Equal(t, []string{"VM", "OpaqueRef:nope"}, c.failS("VM.snapshot", "HANDLE_INVALID", "OpaqueRef:nope", "x"))
	c.failS("VM.snapshot", "MESSAGE_PARAMETER_COUNT_MISMATCH", "OpaqueRef:nope")

	for _, tc := range []struct{ name, ctype, body string }{
		{"bad json", "application/json", `{"jsonrpc":`},
		{"xml content type", "text/xml", `{"jsonrpc":"2.0","method":"VM.get_all_records","params":[],"id":1}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := c.http.Post(c.srv.URL()+"/jsonrpc", tc.ctype, strings.NewReader(tc.body))
			require.NoError(t, err)
			resp.Body.Close()
			assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
		})
	}
}

func TestRecords(t *testing.T) {
	for _, tc := range []struct {
		name     string
		opts     Options
		hosts    int
		purposes []string
	}{
		{"tls", Options{NBD: NBDTLS}, 1, []string{"nbd"}},
		{"insecure member", Options{NBD: NBDInsecure, PoolMember: true}, 2, []string{"insecure_nbd"}},
		{"none", Options{NBD: NBDNone}, 1, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, c := start(t, tc.opts)
			id, err := srv.AddVM(VMSpec{UUID: "vm-1", Name: "web", Disks: []DiskSpec{{"0", 3 * mib}, {"1", 4 * mib}}})
			require.NoError(t, err)
			assert.Equal(t, "vm-1", id)
			c.login()

			vms := c.records("VM")
			var control, template int
			for _, r := range vms {
				if r["is_control_domain"] == true {
					control++
				}
				if r["is_a_template"] == true {
					template++
				}
			}
			assert.Equal(t, 1, control)
			assert.Equal(t, 1, template)
			vmRef, v := byUUID(t, vms, "vm-1")
			assert.Equal(t, "web", v["name_label"])
			assert.Equal(t, false, v["is_a_snapshot"])
			assert.Equal(t, "OpaqueRef:NULL", v["snapshot_of"])
			assert.Equal(t, "19700101T00:00:00Z", v["snapshot_time"])
			assert.Equal(t, "Running", v["power_state"])
			require.Len(t, v["VBDs"], 3)

			vbds, vdis := c.records("VBD"), c.records("VDI")
			var cds int
			sizes := map[string]float64{}
			for _, b := range v["VBDs"].([]any) {
				r := vbds[b.(string)]
				assert.Equal(t, vmRef, r["VM"])
				if r["type"] == "CD" {
					cds++
					assert.Equal(t, "OpaqueRef:NULL", r["VDI"])
					assert.Equal(t, "RO", r["mode"])
					continue
				}
				assert.Equal(t, "RW", r["mode"])
				d := vdis[r["VDI"].(string)]
				require.NotNil(t, d)
				sizes[r["userdevice"].(string)] = d["virtual_size"].(float64) // a JSON number
				assert.Equal(t, "user", d["type"])
				assert.Equal(t, false, d["cbt_enabled"])
				assert.Equal(t, map[string]any{}, d["sm_config"])
				assert.Equal(t, []any{b}, d["VBDs"])
			}
			assert.Equal(t, 1, cds)
			assert.Equal(t, map[string]float64{"0": 4 * mib, "1": 4 * mib}, sizes) // 3 MiB rounds up to 4

			hosts := c.records("host")
			assert.Len(t, hosts, tc.hosts)
			for _, h := range hosts {
				assert.Equal(t, "127.0.0.1", h["address"])
			}
			var pools map[string]rec
			c.callS("pool.get_all_records", &pools)
			require.Len(t, pools, 1)
			for _, p := range pools {
				assert.Contains(t, hosts, p["master"])
			}
			var got []string
			for _, n := range c.records("network") {
				for _, p := range n["purpose"].([]any) {
					got = append(got, p.(string))
				}
			}
			assert.Equal(t, tc.purposes, got)
		})
	}
}

func TestSnapshotRecords(t *testing.T) {
	clock := func() time.Time { return time.Date(2026, 12, 1, 13, 48, 15, 0, time.UTC) }
	srv, c := start(t, Options{Clock: clock})
	_, err := srv.AddVM(VMSpec{UUID: "vm-1", Name: "web", Disks: []DiskSpec{{"0", 2 * mib}}})
	require.NoError(t, err)
	c.login()
	liveVDI := c.diskRef("vm-1", "0")
	vmRef, _ := byUUID(t, c.records("VM"), "vm-1")
	c.callS("VDI.enable_cbt", nil, liveVDI)
	c.callS("VDI.enable_cbt", nil, liveVDI) // idempotent

	var snapRef string
	c.callS("VM.snapshot", &snapRef, vmRef, "backup-1")
	vms, vbds, vdis := c.records("VM"), c.records("VBD"), c.records("VDI")
	snap := vms[snapRef]
	assert.Equal(t, true, snap["is_a_snapshot"])
	assert.Equal(t, true, snap["is_a_template"], "xapi marks snapshots as templates too")
	assert.Equal(t, vmRef, snap["snapshot_of"])
	assert.Equal(t, "backup-1", snap["name_label"])
	assert.Equal(t, "20261201T13:48:15Z", snap["snapshot_time"])
	assert.Equal(t, []any{snapRef}, vms[vmRef]["snapshots"])
	snapUUIDs, err := srv.Snapshots("vm-1")
	require.NoError(t, err)
	assert.Equal(t, []string{snap["uuid"].(string)}, snapUUIDs)

	var snapVDI string
	for _, b := range snap["VBDs"].([]any) {
		r := vbds[b.(string)]
		assert.Equal(t, snapRef, r["VM"])
		if r["type"] == "Disk" {
			assert.Equal(t, "0", r["userdevice"])
			snapVDI = r["VDI"].(string)
		}
	}
	require.NotEmpty(t, snapVDI)
	d := vdis[snapVDI]
	assert.Equal(t, true, d["is_a_snapshot"])
	assert.Equal(t, liveVDI, d["snapshot_of"])
	assert.Equal(t, true, d["cbt_enabled"])
	assert.Equal(t, vdis[liveVDI]["name_label"], d["name_label"])
	assert.Equal(t, "20261201T13:48:15Z", d["snapshot_time"])
	assert.NotEqual(t, vdis[liveVDI]["uuid"], d["uuid"])
	assert.Equal(t, []any{snapVDI}, vdis[liveVDI]["snapshots"])

	// The live VM cannot go; the snapshot VM can, leaving its VDIs.
	c.failS("VM.destroy", "VM_BAD_POWER_STATE", vmRef)
	c.callS("VM.destroy", nil, snapRef)
	vms, vdis = c.records("VM"), c.records("VDI")
	assert.NotContains(t, vms, snapRef)
	assert.Equal(t, []any{}, vms[vmRef]["snapshots"])
	require.Contains(t, vdis, snapVDI)
	assert.Equal(t, []any{}, vdis[snapVDI]["VBDs"])
	c.failS("VDI.destroy", "VDI_IN_USE", liveVDI)
	c.callS("VDI.destroy", nil, snapVDI)
	assert.NotContains(t, c.records("VDI"), snapVDI)
	snapUUIDs, err = srv.Snapshots("vm-1")
	require.NoError(t, err)
	assert.Empty(t, snapUUIDs)
}

// snapVDIRef is the VDI ref of a snapshot's disk.
func (c *client) snapVDIRef(snapUUID, userdevice string) string {
	c.t.Helper()
	_, v := byUUID(c.t, c.records("VM"), snapUUID)
	vbds := c.records("VBD")
	for _, b := range v["VBDs"].([]any) {
		if r := vbds[b.(string)]; r["userdevice"] == userdevice && r["type"] == "Disk" {
			return r["VDI"].(string)
		}
	}
	c.t.Fatalf("snapshot %s has no disk %s", snapUUID, userdevice)
	return ""
}

func TestListChangedBlocks(t *testing.T) {
	srv, c := start(t, Options{})
	_, err := srv.AddVM(VMSpec{UUID: "vm-1", Name: "web", Disks: []DiskSpec{{"0", 4 * mib}, {"1", 2 * mib}}})
	require.NoError(t, err)
	c.login()
	early, err := srv.TakeSnapshot("vm-1", "before-cbt")
	require.NoError(t, err)
	require.NoError(t, srv.EnableCBT("vm-1"))
	s1, err := srv.TakeSnapshot("vm-1", "s1")
	require.NoError(t, err)
	require.NoError(t, srv.WriteDisk("vm-1", "0", 0, []byte{1}))                      // block 0
	require.NoError(t, srv.WriteDisk("vm-1", "0", 9*64<<10+10, make([]byte, 64<<10))) // blocks 9, 10
	require.NoError(t, srv.DiscardDisk("vm-1", "0", 3*mib, 1))                        // block 48
	s2, err := srv.TakeSnapshot("vm-1", "s2")
	require.NoError(t, err)
	require.NoError(t, srv.WriteDisk("vm-1", "0", 63*64<<10, []byte{1})) // block 63, after s2

	from, to := c.snapVDIRef(s1, "0"), c.snapVDIRef(s2, "0")
	var b64 string
	c.callS("VDI.list_changed_blocks", &b64, from, to)
	bm, err := base64.StdEncoding.DecodeString(b64)
	require.NoError(t, err)
	assert.Equal(t, []byte{0x80, 0x60, 0, 0, 0, 0, 0x80, 0}, bm) // 64 blocks of 64 KiB, MSB first

	c.callS("VDI.list_changed_blocks", &b64, from, c.diskRef("vm-1", "0")) // to the live disk
	bm, _ = base64.StdEncoding.DecodeString(b64)
	assert.Equal(t, []byte{0x80, 0x60, 0, 0, 0, 0, 0x80, 0x01}, bm)
	assert.Equal(t, 2, srv.Stats().ChangedBlocksCalls)

	e1 := c.snapVDIRef(early, "0")
	assert.Equal(t, []string{e1}, c.failS("VDI.list_changed_blocks", "VDI_NO_CBT_METADATA", e1, to))
	c.failS("VDI.list_changed_blocks", "SR_BACKEND_FAILURE_460", from, c.snapVDIRef(s2, "1"))

	// CBT off and on again breaks the chain from s2 on.
	live := c.diskRef("vm-1", "0")
	c.callS("VDI.disable_cbt", nil, live)
	c.callS("VDI.enable_cbt", nil, live)
	s3, err := srv.TakeSnapshot("vm-1", "s3")
	require.NoError(t, err)
	c.failS("VDI.list_changed_blocks", "VDI_NO_CBT_METADATA", to, c.snapVDIRef(s3, "0"))

	// data_destroy keeps the CBT metadata: the delta can still be listed.
	c.callS("VDI.data_destroy", nil, from)
	_, d := byUUID(t, c.records("VDI"), c.records("VDI")[from]["uuid"].(string))
	assert.Equal(t, "cbt_metadata", d["type"])
	c.callS("VDI.list_changed_blocks", &b64, from, to)
	c.failS("VDI.get_nbd_info", "VDI_INCOMPATIBLE_TYPE", from)
	c.failS("VDI.data_destroy", "OPERATION_NOT_ALLOWED", live)
	c.failS("VDI.data_destroy", "VDI_NO_CBT_METADATA", e1)
	snaps, err := srv.Snapshots("vm-1")
	require.NoError(t, err)
	assert.Equal(t, []string{early, s1, s2, s3}, snaps) // s1 still has disk 1's data
}

func TestNoCBTAndReadOnly(t *testing.T) {
	srv, c := start(t, Options{NoCBT: true, Users: map[string]string{"root": "pw", "ro": "pw"}, ReadOnlyUsers: []string{"ro"}})
	_, err := srv.AddVM(VMSpec{UUID: "vm-1", Name: "web", Disks: []DiskSpec{{"0", 2 * mib}}})
	require.NoError(t, err)
	c.call("session.login_with_password", &c.sess, "root", "pw", "2.21", "t")
	d := c.diskRef("vm-1", "0")
	for _, m := range []struct {
		name string
		args []any
	}{
		{"VDI.enable_cbt", []any{d}}, {"VDI.disable_cbt", []any{d}}, {"VDI.data_destroy", []any{d}}, {"VDI.list_changed_blocks", []any{d, d}},
	} {
		assert.Equal(t, []string{m.name}, c.failS(m.name, "MESSAGE_METHOD_UNKNOWN", m.args...))
	}

	c.call("session.login_with_password", &c.sess, "ro", "pw", "2.21", "t")
	vmRef, _ := byUUID(t, c.records("VM"), "vm-1")
	c.failS("VM.snapshot", "RBAC_PERMISSION_DENIED", vmRef, "x")
	c.failS("VM.destroy", "RBAC_PERMISSION_DENIED", vmRef)
	c.failS("VDI.destroy", "RBAC_PERMISSION_DENIED", d)

	resp, err := c.http.Get(srv.URL() + "/export_raw_vdi?vdi=" + d + "&session_id=" + c.sess)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusForbidden, resp.StatusCode)
}

func TestNonFinite(t *testing.T) {
	srv, c := start(t, Options{NonFinite: true})
	_, err := srv.AddVM(VMSpec{UUID: "vm-1", Name: "web"})
	require.NoError(t, err)
	c.login()
	body := c.raw("VM.get_all_records", c.sess)
	for _, lit := range []string{":Infinity", ":-Infinity", ":NaN"} {
		assert.Contains(t, string(body), lit)
	}
	var v any
	assert.Error(t, json.Unmarshal(body, &v), "the answer is not JSON, as real xapi's can be")
}

// fill writes a recognisable pattern: some blocks full, some partly, some
// zeroed again (still allocated).
func fill(t *testing.T, srv *Server, vm string) {
	t.Helper()
	pat := func(n int, seed byte) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = seed + byte(i*7)
		}
		return b
	}
	require.NoError(t, srv.WriteDisk(vm, "0", 0, pat(3*mib, 1)))
	require.NoError(t, srv.WriteDisk(vm, "0", 6*mib+12345, pat(1000, 9)))
	require.NoError(t, srv.DiscardDisk(vm, "0", 6*mib, 4096))
}

func exportURL(srv *Server, q url.Values) string { return srv.URL() + "/export_raw_vdi?" + q.Encode() }

func get(t *testing.T, c *client, u string, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, u, nil)
	require.NoError(t, err)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.http.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, b
}

func TestExportRaw(t *testing.T) {
	srv, c := start(t, Options{})
	_, err := srv.AddVM(VMSpec{UUID: "vm-1", Name: "web", Disks: []DiskSpec{{"0", 8 * mib}}})
	require.NoError(t, err)
	fill(t, srv, "vm-1")
	snap, err := srv.TakeSnapshot("vm-1", "s1")
	require.NoError(t, err)
	require.NoError(t, srv.WriteDisk("vm-1", "0", 0, []byte("after the snapshot")))
	path, err := srv.SnapshotData(snap, "0")
	require.NoError(t, err)
	want, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Len(t, want, 8*mib)
	c.login()
	ref := c.snapVDIRef(snap, "0")
	uuid := c.records("VDI")[ref]["uuid"].(string)

	for _, tc := range []struct {
		name string
		q    url.Values
		hdr  map[string]string
	}{
		{"ref and query session", url.Values{"vdi": {ref}, "session_id": {c.sess}}, nil},
		{"uuid, format raw, cookie", url.Values{"vdi": {uuid}, "format": {"raw"}}, map[string]string{"Cookie": "session_id=" + c.sess}},
		{"basic auth, range ignored", url.Values{"vdi": {ref}}, map[string]string{
			"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte(DefaultUser+":"+DefaultPassword)), "Range": "bytes=4096-"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := get(t, c, exportURL(srv, tc.q), tc.hdr)
			require.Equal(t, http.StatusOK, resp.StatusCode)
			assert.Equal(t, int64(-1), resp.ContentLength)
			assert.Empty(t, resp.TransferEncoding)
			assert.True(t, resp.Close)
			assert.Equal(t, "no-cache, no-store", resp.Header.Get("Cache-Control"))
			assert.True(t, strings.HasPrefix(resp.Header.Get("task-id"), "OpaqueRef:"))
			assert.Equal(t, "application/octet-stream", resp.Header.Get("Content-Type"))
			assert.Equal(t, `attachment; filename="`+uuid+`.raw"`, resp.Header.Get("Content-Disposition"))
			assert.True(t, bytes.Equal(want, body), "export equals the snapshot")
		})
	}
	st := srv.Stats()
	assert.Equal(t, 3, st.ExportRequests["raw"])
	assert.Equal(t, int64(3*8*mib), st.ExportBytes)

	for _, tc := range []struct {
		name   string
		q      url.Values
		status int
	}{
		{"no session", url.Values{"vdi": {ref}}, http.StatusUnauthorized},
		{"bad session", url.Values{"vdi": {ref}, "session_id": {"OpaqueRef:gone"}}, http.StatusUnauthorized},
		{"unknown vdi", url.Values{"vdi": {"OpaqueRef:nope"}, "session_id": {c.sess}}, http.StatusNotFound},
		{"qcow2", url.Values{"vdi": {ref}, "format": {"qcow2"}, "session_id": {c.sess}}, http.StatusNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, _ := get(t, c, exportURL(srv, tc.q), nil)
			assert.Equal(t, tc.status, resp.StatusCode)
			if tc.status == http.StatusUnauthorized {
				assert.Equal(t, `Basic realm="xapi"`, resp.Header.Get("WWW-Authenticate"))
			}
		})
	}
}

// TestExportWire reads the answer off the socket: the exact head, no
// length or chunking, and the body running to the close.
func TestExportWire(t *testing.T) {
	srv, c := start(t, Options{})
	_, err := srv.AddVM(VMSpec{UUID: "vm-1", Name: "web", Disks: []DiskSpec{{"0", 2 * mib}}})
	require.NoError(t, err)
	require.NoError(t, srv.WriteDisk("vm-1", "0", 0, []byte("hello")))
	c.login()
	ref := c.diskRef("vm-1", "0")
	conn, err := tls.Dial("tcp", strings.TrimPrefix(srv.URL(), "https://"), &tls.Config{RootCAs: srv.CAPool()})
	require.NoError(t, err)
	defer conn.Close()
	_, err = io.WriteString(conn, "GET /export_raw_vdi/?vdi="+ref+"&session_id="+c.sess+" HTTP/1.1\r\nHost: x\r\nRange: bytes=5-\r\n\r\n")
	require.NoError(t, err)
	all, err := io.ReadAll(conn)
	require.NoError(t, err)
	head, body, ok := bytes.Cut(all, []byte("\r\n\r\n"))
	require.True(t, ok)
	lines := strings.Split(string(head), "\r\n")
	assert.Equal(t, "HTTP/1.1 200 OK", lines[0])
	assert.Contains(t, lines, "Connection: close")
	for _, l := range lines {
		assert.NotContains(t, strings.ToLower(l), "content-length")
		assert.NotContains(t, strings.ToLower(l), "transfer-encoding")
	}
	require.Len(t, body, 2*mib)
	assert.Equal(t, "hello", string(body[:5]))
}

func qemuImg(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	require.NoError(t, err, "qemu-img %v: %s", args, out)
	return string(out)
}

func needQemuImg(t *testing.T) {
	t.Helper()
	testenv.RequireTool(t, "qemu-img")
}

// vhdFile is a parsed VHD: footer fields and the BAT.
type vhdFile struct {
	diskType  uint32
	creator   string
	timestamp uint32
	uid       [16]byte
	parentUID [16]byte
	size      uint64
	bat       []uint32
	data      []byte
}

func parseVHD(t *testing.T, b []byte) vhdFile {
	t.Helper()
	require.GreaterOrEqual(t, len(b), 1536+512)
	foot := b[len(b)-512:]
	require.Equal(t, b[:512], foot, "footer copy equals footer")
	require.Equal(t, "conectix", string(foot[:8]))
	sum := binary.BigEndian.Uint32(foot[64:])
	f := append([]byte(nil), foot...)
	binary.BigEndian.PutUint32(f[64:], 0)
	require.Equal(t, vhdChecksum(f), sum)
	h := b[512:1536]
	require.Equal(t, "cxsparse", string(h[:8]))
	hs := binary.BigEndian.Uint32(h[36:])
	hh := append([]byte(nil), h...)
	binary.BigEndian.PutUint32(hh[36:], 0)
	require.Equal(t, vhdChecksum(hh), hs)
	v := vhdFile{diskType: binary.BigEndian.Uint32(foot[60:]), creator: string(foot[28:32]), timestamp: binary.BigEndian.Uint32(foot[24:]),
		size: binary.BigEndian.Uint64(foot[48:]), data: b}
	copy(v.uid[:], foot[68:84])
	copy(v.parentUID[:], h[40:56])
	n := binary.BigEndian.Uint32(h[28:])
	require.Equal(t, uint32(vhdBlockSize), binary.BigEndian.Uint32(h[32:]))
	for i := uint32(0); i < n; i++ {
		v.bat = append(v.bat, binary.BigEndian.Uint32(b[1536+4*i:]))
	}
	return v
}

// present lists the blocks in the BAT and checks each one's bitmap is full.
func (v vhdFile) present(t *testing.T) []int {
	var out []int
	for i, e := range v.bat {
		if e == 0xffffffff {
			continue
		}
		out = append(out, i)
		off := int(e) * 512
		assert.Equal(t, bytes.Repeat([]byte{0xff}, 512), v.data[off:off+512], "bitmap of block %d", i)
	}
	return out
}

func (v vhdFile) block(i int) []byte {
	off := int(v.bat[i])*512 + 512
	return v.data[off : off+vhdBlockSize]
}

func TestExportVHD(t *testing.T) {
	needQemuImg(t)
	srv, c := start(t, Options{})
	_, err := srv.AddVM(VMSpec{UUID: "vm-1", Name: "web", Disks: []DiskSpec{{"0", 10*mib + 1536}}}) // rounds to 12 MiB
	require.NoError(t, err)
	fill(t, srv, "vm-1")
	s1, err := srv.TakeSnapshot("vm-1", "s1")
	require.NoError(t, err)
	require.NoError(t, srv.WriteDisk("vm-1", "0", 10*mib+5, []byte("new block"))) // block 5
	require.NoError(t, srv.WriteDisk("vm-1", "0", 1*mib, []byte("rewritten")))    // block 0
	s2, err := srv.TakeSnapshot("vm-1", "s2")
	require.NoError(t, err)
	c.login()
	dir := t.TempDir()

	full := func(snap string) ([]byte, string) {
		resp, body := get(t, c, exportURL(srv, url.Values{"vdi": {c.snapVDIRef(snap, "0")}, "format": {"vhd"}, "session_id": {c.sess}}), nil)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		assert.Equal(t, "application/vhd", resp.Header.Get("Content-Type"))
		p := filepath.Join(dir, snap+".vhd")
		require.NoError(t, os.WriteFile(p, body, 0o644))
		return body, p
	}
	for _, snap := range []string{s1, s2} {
		body, p := full(snap)
		v := parseVHD(t, body)
		assert.Equal(t, uint32(3), v.diskType)
		assert.Equal(t, "tap\x00", v.creator)
		assert.Equal(t, uint64(12*mib), v.size)
		wantBlocks := []int{0, 1, 3}
		if snap == s2 {
			wantBlocks = []int{0, 1, 3, 5}
		}
		assert.Equal(t, wantBlocks, v.present(t))
		assert.Len(t, body, 1536+512+len(wantBlocks)*(512+vhdBlockSize)+512)

		// qemu-img has no check for vpc ("does not support checks"); compare
		// reads every sector of both.
		ref, err := srv.SnapshotData(snap, "0")
		require.NoError(t, err)
		qemuImg(t, "compare", "-f", "vpc", "-F", "raw", p, ref)
		assert.Contains(t, qemuImg(t, "info", "-f", "vpc", p), "12 MiB (12582912 bytes)")
		out := filepath.Join(dir, snap+".raw")
		qemuImg(t, "convert", "-f", "vpc", "-O", "raw", p, out)
		got, err := os.ReadFile(out)
		require.NoError(t, err)
		want, err := os.ReadFile(ref)
		require.NoError(t, err)
		assert.True(t, bytes.Equal(want, got), "qemu-img's conversion of %s equals the snapshot", snap)
	}

	// The delta from s1 to s2: a differencing VHD with blocks 0 and 5.
	base, _ := full(s1)
	baseUID := parseVHD(t, base).uid
	resp, body := get(t, c, exportURL(srv, url.Values{"vdi": {c.snapVDIRef(s2, "0")}, "base": {c.snapVDIRef(s1, "0")}, "format": {"vhd"}, "session_id": {c.sess}}), nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	v := parseVHD(t, body)
	assert.Equal(t, uint32(4), v.diskType)
	assert.Equal(t, "caml", v.creator)
	assert.Equal(t, uint32(0), v.timestamp)
	assert.Equal(t, baseUID, v.parentUID)
	assert.NotEqual(t, baseUID, v.uid)
	assert.Equal(t, []int{0, 5}, v.present(t))
	ref2, err := srv.SnapshotData(s2, "0")
	require.NoError(t, err)
	want2, err := os.ReadFile(ref2)
	require.NoError(t, err)
	for _, b := range []int{0, 5} {
		assert.True(t, bytes.Equal(want2[b*vhdBlockSize:(b+1)*vhdBlockSize], v.block(b)), "delta block %d", b)
	}
	h := body[512:1536]
	assert.Equal(t, "MacX", string(h[576:580]))
	locOff := binary.BigEndian.Uint64(h[576+16:])
	assert.Equal(t, make([]byte, 512), body[locOff:locOff+512], "locator data streamed as zeros")
	p := filepath.Join(dir, "delta.vhd")
	require.NoError(t, os.WriteFile(p, body, 0o644))
	// qemu reads a differencing VHD like a dynamic one (present blocks,
	// zeros elsewhere) and sizes a "caml" file from CHS, which may be a
	// little short of the disk.
	conv := filepath.Join(dir, "delta.raw")
	qemuImg(t, "convert", "-f", "vpc", "-O", "raw", p, conv)
	got, err := os.ReadFile(conv)
	require.NoError(t, err)
	require.Greater(t, len(got), 11*mib)
	for i := 0; i < len(got); i += vhdBlockSize {
		end := min(i+vhdBlockSize, len(got))
		if b := i / vhdBlockSize; b == 0 || b == 5 {
			assert.True(t, bytes.Equal(want2[i:end], got[i:end]), "qemu block %d", b)
		} else {
			assert.True(t, allZero(got[i:end]), "qemu block %d", b)
		}
	}
	testenv.RequireTool(t, "vhdiinfo")
	out, err := exec.Command("vhdiinfo", p).CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), "Differential")

	// raw with base: the changed blocks' bytes, zeros elsewhere.
	resp, body = get(t, c, exportURL(srv, url.Values{"vdi": {c.snapVDIRef(s2, "0")}, "base": {c.snapVDIRef(s1, "0")}, "session_id": {c.sess}}), nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Len(t, body, 12*mib)
	for b := 0; b < 6; b++ {
		chunk := body[b*vhdBlockSize : (b+1)*vhdBlockSize]
		if b == 0 || b == 5 {
			assert.True(t, bytes.Equal(want2[b*vhdBlockSize:(b+1)*vhdBlockSize], chunk), "raw+base block %d", b)
		} else {
			assert.True(t, allZero(chunk), "raw+base block %d is zero", b)
		}
	}
	st := srv.Stats()
	assert.Equal(t, map[string]int{"vhd": 3, "vhd+base": 1, "raw+base": 1}, st.ExportRequests)
}

func TestPoolMemberRedirect(t *testing.T) {
	srv, c := start(t, Options{PoolMember: true})
	_, err := srv.AddVM(VMSpec{UUID: "vm-1", Name: "web", Disks: []DiskSpec{{"0", 2 * mib}}})
	require.NoError(t, err)
	require.NoError(t, srv.WriteDisk("vm-1", "0", 100, []byte("x")))
	c.login()
	ref := c.diskRef("vm-1", "0")
	q := url.Values{"vdi": {ref}, "session_id": {c.sess}, "format": {"raw"}}

	noFollow := &http.Client{Transport: c.http.Transport, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noFollow.Get(srv.URL() + "/export_raw_vdi?" + q.Encode())
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusFound, resp.StatusCode)
	loc, err := url.Parse(resp.Header.Get("Location"))
	require.NoError(t, err)
	master, _ := url.Parse(srv.URL())
	assert.Equal(t, "https", loc.Scheme)
	assert.Equal(t, "127.0.0.1", loc.Hostname())
	assert.NotEqual(t, master.Port(), loc.Port())
	assert.Equal(t, "/export_raw_vdi", loc.Path)
	assert.Equal(t, q.Encode(), loc.RawQuery)

	resp, body := get(t, c, srv.URL()+"/export_raw_vdi?"+q.Encode(), nil) // followed; the member's cert is from the same CA
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Len(t, body, 2*mib)
	assert.Equal(t, byte('x'), body[100])
	assert.Equal(t, 2, srv.Stats().Redirects)

	// The member refuses API calls, naming the master.
	mc := &client{t: t, srv: srv, http: c.http}
	b, err := json.Marshal(map[string]any{"jsonrpc": "2.0", "method": "VM.get_all_records", "params": []any{c.sess}, "id": 1})
	require.NoError(t, err)
	r2, err := mc.http.Post("https://"+loc.Host+"/jsonrpc", "application/json", bytes.NewReader(b))
	require.NoError(t, err)
	defer r2.Body.Close()
	ans, _ := io.ReadAll(r2.Body)
	assert.Contains(t, string(ans), "HOST_IS_SLAVE")
}

func TestNBDInfoAndLookup(t *testing.T) {
	t.Run("none", func(t *testing.T) {
		srv, c := start(t, Options{NBD: NBDNone})
		_, err := srv.AddVM(VMSpec{UUID: "vm-1", Name: "web", Disks: []DiskSpec{{"0", 2 * mib}}})
		require.NoError(t, err)
		c.login()
		var info []any
		c.callS("VDI.get_nbd_info", &info, c.diskRef("vm-1", "0"))
		assert.Empty(t, info)
		assert.NotNil(t, info)
		assert.Empty(t, srv.NBDAddr())
	})
	for _, mode := range []NBDMode{NBDTLS, NBDInsecure} {
		srv, c := start(t, Options{NBD: mode})
		_, err := srv.AddVM(VMSpec{UUID: "vm-1", Name: "web", Disks: []DiskSpec{{"0", 4 * mib}}})
		require.NoError(t, err)
		require.NoError(t, srv.EnableCBT("vm-1"))
		s1, err := srv.TakeSnapshot("vm-1", "s1")
		require.NoError(t, err)
		s2, err := srv.TakeSnapshot("vm-1", "s2")
		require.NoError(t, err)
		c.login()
		from, to := c.snapVDIRef(s1, "0"), c.snapVDIRef(s2, "0")
		var info []struct {
			Exportname, Address, Cert, Subject string
			Port                               int
		}
		c.callS("VDI.get_nbd_info", &info, to)
		require.Len(t, info, 1)
		toUUID := c.records("VDI")[to]["uuid"].(string)
		assert.Equal(t, "/"+toUUID+"?session_id="+c.sess, info[0].Exportname)
		assert.Equal(t, "127.0.0.1", info[0].Address)
		assert.Equal(t, srv.NBDAddr(), "127.0.0.1:"+strconv.Itoa(info[0].Port))
		assert.Equal(t, "nbd.xapi.test", info[0].Subject)
		blk, _ := pem.Decode([]byte(info[0].Cert))
		require.NotNil(t, blk)
		cert, err := x509.ParseCertificate(blk.Bytes)
		require.NoError(t, err)
		assert.NoError(t, cert.VerifyHostname("nbd.xapi.test"))
		_, err = cert.Verify(x509.VerifyOptions{Roots: srv.CAPool()})
		assert.Error(t, err, "the NBD cert is not from the HTTPS CA")

		ra, size, release, err := srv.nbdLookup(info[0].Exportname)
		require.NoError(t, err)
		assert.Equal(t, int64(4*mib), size)
		buf := make([]byte, 512)
		_, err = ra.ReadAt(buf, 0)
		require.NoError(t, err)
		c.failS("VDI.list_changed_blocks", "VDI_IN_USE", from, to)
		assert.Equal(t, 1, srv.Stats().ChangedWhileAttached)
		c.failS("VDI.destroy", "VDI_IN_USE", to)
		release()
		release() // twice is harmless
		c.callS("VDI.list_changed_blocks", nil, from, to)

		_, _, _, err = srv.nbdLookup("/" + toUUID + "?session_id=OpaqueRef:gone")
		assert.Error(t, err)
		_, _, _, err = srv.nbdLookup("/nope?session_id=" + c.sess)
		assert.Error(t, err)
	}
}

// TestNBDEndToEnd reads a snapshot disk through get_nbd_info with the
// project's NBD client, pinning the certificate the call returns.
func TestNBDEndToEnd(t *testing.T) {
	for _, mode := range []NBDMode{NBDTLS, NBDInsecure} {
		t.Run(map[NBDMode]string{NBDTLS: "tls", NBDInsecure: "insecure"}[mode], func(t *testing.T) {
			srv, c := start(t, Options{NBD: mode})
			_, err := srv.AddVM(VMSpec{UUID: "vm-1", Name: "web", Disks: []DiskSpec{{"0", 8 * mib}}})
			require.NoError(t, err)
			fill(t, srv, "vm-1")
			require.NoError(t, srv.EnableCBT("vm-1"))
			s1, err := srv.TakeSnapshot("vm-1", "s1")
			require.NoError(t, err)
			s2, err := srv.TakeSnapshot("vm-1", "s2")
			require.NoError(t, err)
			c.login()
			from, to := c.snapVDIRef(s1, "0"), c.snapVDIRef(s2, "0")
			var info []struct {
				Exportname, Address, Cert, Subject string
				Port                               int
			}
			c.callS("VDI.get_nbd_info", &info, to)
			require.Len(t, info, 1)
			opts := nbd.Options{Addr: net.JoinHostPort(info[0].Address, strconv.Itoa(info[0].Port)), Export: info[0].Exportname,
				Connections: 2, Policy: retry.Policy{Attempts: 1, AttemptTimeout: 10 * time.Second}}
			if mode == NBDTLS {
				pool := x509.NewCertPool()
				require.True(t, pool.AppendCertsFromPEM([]byte(info[0].Cert)))
				opts.TLS = &tls.Config{RootCAs: pool, ServerName: info[0].Subject}
			}
			ctx := context.Background()
			cl, err := nbd.Dial(ctx, opts)
			require.NoError(t, err)
			require.Equal(t, int64(8*mib), cl.Size())
			got := make([]byte, 8*mib)
			require.NoError(t, cl.ReadAt(ctx, got, 0))
			p, err := srv.SnapshotData(s2, "0")
			require.NoError(t, err)
			want, err := os.ReadFile(p)
			require.NoError(t, err)
			assert.True(t, bytes.Equal(want, got), "NBD read equals the snapshot")

			c.failS("VDI.list_changed_blocks", "VDI_IN_USE", from, to)
			c.failS("VDI.destroy", "VDI_IN_USE", to)
			require.NoError(t, cl.Close())
			require.Eventually(t, func() bool { return srv.Stats().NBDConns == 0 }, 5*time.Second, 10*time.Millisecond)
			c.callS("VDI.list_changed_blocks", nil, from, to)
			st := srv.Stats()
			assert.GreaterOrEqual(t, st.NBDBytes, int64(8*mib))
			assert.GreaterOrEqual(t, st.PeakNBDConns, 1)
			assert.Equal(t, 1, st.ChangedWhileAttached)
		})
	}
}
