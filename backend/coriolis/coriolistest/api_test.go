package coriolistest

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestLogin(t *testing.T) {
	h := newHarness(t)
	tests := []struct {
		name   string
		path   string
		method string
		body   string
		status int
		errMsg string
	}{
		{"good", "/api/v1/auth/login", "POST", `{"username":"admin","password":"secret"}`, 200, ""},
		{"good trailing slash", "/api/v1/auth/login/", "POST", `{"username":"admin","password":"secret"}`, 200, ""},
		{"bad password", "/api/v1/auth/login", "POST", `{"username":"admin","password":"nope"}`, 401, "Not Authorized"},
		{"bad user", "/api/v1/auth/login/", "POST", `{"username":"root","password":"secret"}`, 401, "Not Authorized"},
		{"empty creds", "/api/v1/auth/login", "POST", `{}`, 401, "Not Authorized"},
		{"malformed", "/api/v1/auth/login", "POST", `{"username":`, 400, "Bad Request"},
		{"empty body", "/api/v1/auth/login", "POST", ``, 400, "Bad Request"},
		{"not an object", "/api/v1/auth/login", "POST", `[1,2]`, 400, "Bad Request"},
		{"wrong method reaches the authenticated catch-all", "/api/v1/auth/login", "GET", ``, 401, "Authentication failed"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := h.srv.Stats().Logins
			r := h.do(tc.method, tc.path, "", strings.NewReader(tc.body), nil)
			require.Equal(t, tc.status, r.status, string(r.body))
			if tc.status == 200 {
				assert.Equal(t, before+1, h.srv.Stats().Logins)
				var lr loginResponse
				require.NoError(t, json.Unmarshal(r.body, &lr))
				var c claims
				_, _, err := jwt.NewParser().ParseUnverified(lr.Token, &c)
				require.NoError(t, err)
				assert.Equal(t, "gopherbin", c.Issuer)
				assert.Equal(t, "admin", c.User)
				require.NotNil(t, c.ExpiresAt)
				assert.WithinDuration(t, time.Now().Add(time.Hour), c.ExpiresAt.Time, 5*time.Second)
				return
			}
			assert.Equal(t, before, h.srv.Stats().Logins)
			if tc.errMsg != "" {
				e := decodeAPIError(t, r.body)
				assert.Equal(t, tc.errMsg, e.Error)
				assert.NotContains(t, string(r.body), "secret")
			}
		})
	}
}

func TestAuth(t *testing.T) {
	h := newHarness(t)
	require.NoError(t, h.srv.AddVM(VMSpec{ID: "vm1"}))

	sign := func(method jwt.SigningMethod, key any, c claims) string {
		s, err := jwt.NewWithClaims(method, c).SignedString(key)
		require.NoError(t, err)
		return s
	}
	valid := claims{User: "admin", RegisteredClaims: jwt.RegisteredClaims{
		Issuer: "gopherbin", ExpiresAt: jwt.NewNumericDate(time.Now().Add(time.Hour))}}
	noExp := valid
	noExp.ExpiresAt = nil
	wrongIss := valid
	wrongIss.Issuer = "someone"

	h.srv.SetTokenTTL(-time.Minute)
	expired := h.login("admin", "secret")
	h.srv.SetTokenTTL(time.Hour)

	tests := []struct {
		name   string
		header string
		status int
	}{
		{"valid login token", "Bearer " + h.token, 200},
		{"self-signed with server secret", "Bearer " + sign(jwt.SigningMethodHS256, h.srv.jwtSecret, valid), 200},
		{"no header", "", 401},
		{"not bearer", "Basic YWRtaW46c2VjcmV0", 401},
		{"garbage", "Bearer abc.def.ghi", 401},
		{"other secret", "Bearer " + sign(jwt.SigningMethodHS256, []byte("other"), valid), 401},
		{"alg none", "Bearer " + sign(jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, valid), 401},
		{"expired", "Bearer " + expired, 401},
		{"no exp", "Bearer " + sign(jwt.SigningMethodHS256, h.srv.jwtSecret, noExp), 401},
		{"wrong issuer", "Bearer " + sign(jwt.SigningMethodHS256, h.srv.jwtSecret, wrongIss), 401},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			hdr := map[string]string{}
			if tc.header != "" {
				hdr["Authorization"] = tc.header
			}
			r := h.do("GET", "/api/v1/vms/vm1", "", nil, hdr)
			require.Equal(t, tc.status, r.status, string(r.body))
			if tc.status == 401 {
				e := decodeAPIError(t, r.body)
				assert.Equal(t, apiError{Error: "Authentication failed", Details: "Invalid authentication token"}, e)
				if tc.header != "" {
					assert.NotContains(t, string(r.body), strings.TrimPrefix(tc.header, "Bearer "))
				}
			}
		})
	}
}

func TestRoutesWithAndWithoutSlash(t *testing.T) {
	h := newHarness(t)
	require.NoError(t, h.srv.AddVM(VMSpec{ID: "vm1", Disks: []DiskSpec{{Name: "d.img", Size: 1 << 20}}}))
	require.NoError(t, h.srv.AddVM(VMSpec{ID: "vm2"}))
	sid, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	const unknownSnap = "00000000-0000-4000-8000-000000000000"

	tests := []struct {
		method string
		path   string
		status int
		title  string // APIError.error; "" for no JSON body
	}{
		{"GET", "/api/v1/vms", 200, ""},
		{"GET", "/api/v1/vms/vm1", 200, ""},
		// Observed on the real server: unknown things are 500, not 404.
		{"GET", "/api/v1/vms/nope", 500, "Server error"},
		{"GET", "/api/v1/vms/vm1/snapshots", 200, ""},
		{"GET", "/api/v1/vms/nope/snapshots", 500, "Server error"},
		{"GET", "/api/v1/vms/vm1/snapshots/" + sid, 200, ""},
		{"GET", "/api/v1/vms/vm2/snapshots/" + sid, 409, "Conflict"},
		{"GET", "/api/v1/vms/vm1/snapshots/" + unknownSnap, 500, "Server error"},
		{"GET", diskPath("vm1", sid, "d.img"), 200, ""},
		{"HEAD", diskPath("vm1", sid, "d.img"), 200, ""},
		{"GET", diskPath("vm1", sid, "other.img"), 404, ""},
		{"GET", diskPath("vm1", unknownSnap, "d.img"), 500, "Server error"},
		{"GET", diskPath("vm2", sid, "d.img"), 409, "Conflict"},
		{"DELETE", "/api/v1/vms/vm1/snapshots/" + unknownSnap, 200, ""},
		{"DELETE", "/api/v1/vms/vm2/snapshots/" + sid, 409, "Conflict"},
		{"DELETE", "/api/v1/vms/nope/snapshots", 500, "Server error"},
		// gorilla/mux sends a method mismatch to the catch-all not-found handler.
		{"PUT", "/api/v1/vms", 404, "Not found"},
		{"DELETE", "/api/v1/vms/vm1", 404, "Not found"},
		{"HEAD", "/api/v1/vms", 404, "Not found"},
		{"POST", diskPath("vm1", sid, "d.img"), 404, "Not found"},
	}
	for _, tc := range tests {
		for _, slash := range []bool{false, true} {
			p := withSlash(tc.path, slash)
			t.Run(tc.method+" "+p, func(t *testing.T) {
				r := h.do(tc.method, p, h.token, nil, nil)
				require.Equal(t, tc.status, r.status, string(r.body))
				switch {
				case tc.title != "" && tc.method != "HEAD":
					assert.Equal(t, tc.title, decodeAPIError(t, r.body).Error)
				case tc.status != 200:
					assert.Empty(t, r.body)
				}
			})
		}
	}

	// POST and DELETE change state, so they run in order.
	for _, slash := range []bool{false, true} {
		r := h.do("POST", withSlash("/api/v1/vms/vm1/snapshots", slash), h.token, nil, nil)
		require.Equal(t, 200, r.status, string(r.body))
		var created apiSnapshot
		require.NoError(t, json.Unmarshal(r.body, &created))
		require.Equal(t, 200, h.get(withSlash("/api/v1/vms/vm1/snapshots/"+created.ID, slash)).status)
		r = h.do("DELETE", withSlash("/api/v1/vms/vm1/snapshots/"+created.ID, slash), h.token, nil, nil)
		require.Equal(t, 200, r.status, string(r.body))
		assert.Empty(t, r.body)
		require.Equal(t, 500, h.get(withSlash("/api/v1/vms/vm1/snapshots/"+created.ID, slash)).status)
		r = h.do("DELETE", withSlash("/api/v1/vms/vm1/snapshots", slash), h.token, nil, nil)
		require.Equal(t, 200, r.status, string(r.body))
		assert.Empty(t, r.body)
	}
	r := h.do("POST", "/api/v1/vms/nope/snapshots", h.token, nil, nil)
	assert.Equal(t, 500, r.status)
	assert.Equal(t, "could not find VM with ID nope", decodeAPIError(t, r.body).Details)
	r = h.get("/api/v1/vms/nope")
	assert.Equal(t, apiError{Error: "Server error", Details: "could not find VM with ID nope"}, decodeAPIError(t, r.body))
	r = h.get("/api/v1/vms/vm1/snapshots/" + unknownSnap)
	assert.Equal(t, apiError{Error: "Server error", Details: "not found"}, decodeAPIError(t, r.body))
	r = h.get(diskPath("vm1", unknownSnap, "d.img"))
	assert.Equal(t, apiError{Error: "Server error", Details: "not found"}, decodeAPIError(t, r.body))
}

func TestUnknownPaths(t *testing.T) {
	h := newHarness(t)
	tests := []struct {
		path     string
		noToken  int
		token    int
		body     string // expected with a token
		location string
	}{
		{"/", 404, 404, "404 page not found\n", ""},
		{"/api", 404, 404, "404 page not found\n", ""},
		{"/api/v1", 404, 404, "404 page not found\n", ""},
		{"/vms/vm1/snapshots/x/disks/y", 404, 404, "404 page not found\n", ""},
		{"/api/v1/", 401, 404, jsonNotFound, ""},
		{"/api/v2/vms", 404, 404, "404 page not found\n", ""},
		{"/api/v1/vm", 401, 404, jsonNotFound, ""},
		{"/api/v1/vms/vm1/snapshot", 401, 404, jsonNotFound, ""},
		{"/api/v1/vms/vm1/snapshots/x/disk/y", 401, 404, jsonNotFound, ""},
		{"/api/v1/vms/vm1/snapshots/x/disks", 401, 404, jsonNotFound, ""},
		{"/api/v1/vms/vm1/snapshots/x/disks/y/z", 401, 404, jsonNotFound, ""},
		{"/api/v1/auth", 401, 404, jsonNotFound, ""},
		{"/api/v1/auth/logout", 401, 404, jsonNotFound, ""},
		{"/api/v1/vms//", 301, 301, "", "/api/v1/vms/"},
		{"/api/v1/vms/x/../../vms", 301, 301, "", "/api/v1/vms"},
	}
	noRedirect := *h.client
	noRedirect.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	h2 := *h
	h2.client = &noRedirect
	for _, tc := range tests {
		t.Run(tc.path, func(t *testing.T) {
			r := h2.do("GET", tc.path, "", nil, nil)
			require.Equal(t, tc.noToken, r.status)
			if tc.noToken == 401 {
				assert.JSONEq(t, `{"error":"Authentication failed","details":"Invalid authentication token"}`, string(r.body))
			}
			r = h2.do("GET", tc.path, h.token, nil, nil)
			require.Equal(t, tc.token, r.status)
			assert.Equal(t, tc.location, r.header.Get("Location"))
			if tc.body != "" {
				assert.Equal(t, tc.body, string(r.body))
			}
		})
	}
}

const jsonNotFound = `{"error":"Not found","details":"Resource not found"}` + "\n"

func TestVMShapes(t *testing.T) {
	h := newHarness(t)
	require.NoError(t, h.srv.AddVM(VMSpec{ID: "vm1", FriendlyName: "first", Disks: []DiskSpec{
		{Name: "root.img", Size: 1 << 20},
		{Name: "data.img", Device: "xvdq", Size: 2 << 20},
		{Name: "install.iso", Size: 4096, CDROM: true},
	}}))
	require.NoError(t, h.srv.AddVM(VMSpec{ID: "vm2"}))
	require.Error(t, h.srv.AddVM(VMSpec{ID: "vm2"}))
	for _, bad := range []VMSpec{{ID: ""}, {ID: "../x"}, {ID: "ok", Disks: []DiskSpec{{Name: "a/b"}}},
		{ID: "ok", Disks: []DiskSpec{{Name: "a"}, {Name: "a"}}}, {ID: "ok", Disks: []DiskSpec{{Name: "a", Size: -1}}}} {
		assert.Error(t, h.srv.AddVM(bad), "%+v", bad)
	}
	s1, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	s2, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	assert.Regexp(t, `^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`, s1)

	r := h.get("/api/v1/vms")
	require.Equal(t, 200, r.status)
	var raw []map[string]any
	require.NoError(t, json.Unmarshal(r.body, &raw))
	require.Len(t, raw, 2)
	for _, k := range []string{"friendly_name", "name", "uuid", "disks", "snapshot_compatible", "snapshots"} {
		assert.Contains(t, raw[0], k)
	}
	assert.Equal(t, []any{}, raw[1]["snapshots"], "empty list, not null")

	var vms []apiVM
	require.NoError(t, json.Unmarshal(r.body, &vms))
	v := vms[0]
	assert.Equal(t, "vm1", v.Name)
	assert.Equal(t, "first", v.FriendlyName)
	assert.Equal(t, []string{s1, s2}, v.Snapshots)
	require.Len(t, v.Disks, 3)
	assert.Equal(t, apiDisk{Name: "root.img", Path: v.Disks[0].Path, DeviceName: "xvda", SnapshotCompatible: true, Mode: "w"}, v.Disks[0])
	assert.Equal(t, "xvdq", v.Disks[1].DeviceName)
	assert.Equal(t, "xvdc:cdrom", v.Disks[2].DeviceName)
	assert.Equal(t, "r", v.Disks[2].Mode)
	assert.True(t, v.Disks[2].SnapshotCompatible, "an untyped ISO is reflinked, as on the real server")

	snap := h.snapshot("vm1", s1, "")
	var rawSnap map[string]any
	require.NoError(t, json.Unmarshal(h.get("/api/v1/vms/vm1/snapshots/"+s1).body, &rawSnap))
	assert.Contains(t, rawSnap, "vm_id")
	disk0 := rawSnap["disks"].([]any)[0].(map[string]any)
	for _, k := range []string{"parent_path", "path", "snapshot_id", "chunks", "name", "repo_mountpoint"} {
		assert.Contains(t, disk0, k)
	}
	assert.Equal(t, "vm1", snap.VMID)
	require.Len(t, snap.Disks, 3, "an untyped ISO is reflinked into the snapshot")
	assert.Equal(t, []string{"root.img", "data.img", "install.iso"}, []string{snap.Disks[0].Name, snap.Disks[1].Name, snap.Disks[2].Name})
	assert.Equal(t, s1, snap.Disks[0].SnapshotID)
	assert.Equal(t, []Chunk{}, snap.Disks[0].Chunks)
	r = h.get(diskPath("vm1", s1, "nope.img"))
	assert.Equal(t, 404, r.status)
	assert.Empty(t, r.body, "unknown disk: bare 404")

	var list []apiSnapshot
	require.NoError(t, json.Unmarshal(h.get("/api/v1/vms/vm1/snapshots").body, &list))
	require.Len(t, list, 2)
	assert.Equal(t, []string{s1, s2}, []string{list[0].ID, list[1].ID})

	r = h.get("/api/v1/vms/vm1")
	var one apiVM
	require.NoError(t, json.Unmarshal(r.body, &one))
	assert.Equal(t, v, one)

	// Deleting removes the files too.
	p, err := h.srv.SnapshotData("vm1", s1, "root.img")
	require.NoError(t, err)
	require.FileExists(t, p)
	r = h.do("DELETE", "/api/v1/vms/vm1/snapshots", h.token, nil, nil)
	require.Equal(t, 200, r.status)
	assert.NoFileExists(t, p)
	_, err = h.srv.SnapshotData("vm1", s1, "root.img")
	assert.Error(t, err)
	require.NoError(t, json.Unmarshal(h.get("/api/v1/vms/vm1").body, &one))
	assert.Empty(t, one.Snapshots)
}

func TestSnapshotQueryErrors(t *testing.T) {
	h := newHarness(t)
	require.NoError(t, h.srv.AddVM(VMSpec{ID: "vm1", Disks: []DiskSpec{{Name: "d", Size: 1 << 20}}}))
	require.NoError(t, h.srv.AddVM(VMSpec{ID: "vm2", Disks: []DiskSpec{{Name: "d", Size: 1 << 20}}}))
	s1, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	s2, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	other, err := h.srv.TakeSnapshot("vm2")
	require.NoError(t, err)
	tests := []struct {
		name, query string
		status      int
	}{
		{"older ok", "compareTo=" + s1, 200},
		{"same", "compareTo=" + s2, 400},
		{"unknown", "compareTo=00000000-0000-4000-8000-000000000000", 500},
		{"other vm", "compareTo=" + other, 409},
		{"unparsable bool means false", "squashChunks=maybe", 200},
		{"false bool", "squashChunks=false", 200},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := h.get("/api/v1/vms/vm1/snapshots/" + s2 + "?" + tc.query)
			require.Equal(t, tc.status, r.status, string(r.body))
			if tc.status != 200 {
				e := decodeAPIError(t, r.body)
				assert.Equal(t, map[int]string{400: "Bad Request", 500: "Server error", 409: "Conflict"}[tc.status], e.Error)
				assert.Equal(t, "application/json", r.header.Get("Content-Type"))
			}
		})
	}
	r := h.get("/api/v1/vms/vm1/snapshots/" + s1 + "?compareTo=" + s2)
	assert.Equal(t, 400, r.status, "newer compareTo")
}

func stringsReader(s string) *strings.Reader { return strings.NewReader(s) }

func TestLoginBodyLimit(t *testing.T) {
	h := newHarness(t)
	big := `{"username":"` + strings.Repeat("a", 1<<17) + `","password":"x"}`
	r := h.do("POST", "/api/v1/auth/login", "", bytes.NewReader([]byte(big)), nil)
	assert.Equal(t, 400, r.status)
}

func TestVMUUID(t *testing.T) {
	u, err := vmUUID("0004fb0000060000ccaf98a0baa2c186")
	require.NoError(t, err)
	assert.Equal(t, "0004fb00-0006-0000-ccaf-98a0baa2c186", u)
	u, err = vmUUID("vm1")
	require.NoError(t, err)
	assert.Len(t, u, 36)
}
