package coriolis

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
)

const (
	testUser = "admin"
	testPass = "hunter2-very-secret"
	diskSize = 1 << 16
)

// fakeExporter follows specs/coriolis.md for one VM with a data disk and a
// CD-ROM. Snapshot JSON bodies are templates so tests can make them hostile.
type fakeExporter struct {
	t        *testing.T
	secret   []byte
	ttl      time.Duration
	logins   atomic.Int32
	snapGets atomic.Int32
	reject   atomic.Bool // answer 401 to every non-login request once
	camel    bool        // README spellings vmID/snapshotID
	chunks   string      // JSON chunk list of disk0 in every snapshot
	old      string      // JSON chunk list of disk0 in s-old, when set
	changed  string      // JSON chunk list answered for compareTo
	data     []byte
	mu       sync.Mutex
	snaps    []string // ids in creation order
	listed   []string // order of the snapshot list route (may differ)
	queries  []string
}

func newFake(t *testing.T) *fakeExporter {
	data := make([]byte, diskSize)
	for i := range data {
		data[i] = byte(i % 253)
	}
	return &fakeExporter{t: t, secret: []byte("s3cret-key"), ttl: time.Hour,
		chunks:  `[{"start":0,"length":4096,"physical_start":99},{"start":8192,"length":4096,"physical_start":5}]`,
		changed: `[{"start":8192,"length":4096,"physical_start":5}]`,
		data:    data, snaps: []string{"s-old", "s-new"}, listed: []string{"s-new", "s-extra", "s-old"}}
}

func (f *fakeExporter) token() string {
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{
		"exp": time.Now().Add(f.ttl).Unix(), "iss": "gopherbin", "user": testUser,
	}).SignedString(f.secret)
	require.NoError(f.t, err)
	return tok
}

func (f *fakeExporter) snapJSON(id, chunks string) string {
	vmKey, sidKey := "vm_id", "snapshot_id"
	if f.camel {
		vmKey, sidKey = "vmID", "snapshotID"
	}
	return fmt.Sprintf(`{"id":%q,%q:"vm1","disks":[{"name":"disk0.img","path":"/x",%q:%q,"chunks":%s}]}`, id, vmKey, sidKey, id, chunks)
}

func (f *fakeExporter) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p := strings.TrimSuffix(r.URL.Path, "/")
	if p == "/api/v1/auth/login" {
		var lr loginRequest
		if json.NewDecoder(r.Body).Decode(&lr) != nil || lr.Username != testUser || lr.Password != testPass {
			http.Error(w, `{"error":"Not Authorized","details":"bad credentials"}`, http.StatusUnauthorized)
			return
		}
		f.logins.Add(1)
		fmt.Fprintf(w, `{"token":%q}`, f.token())
		return
	}
	auth := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	_, err := jwt.Parse(auth, func(*jwt.Token) (any, error) { return f.secret, nil })
	if err != nil || f.reject.CompareAndSwap(true, false) {
		http.Error(w, `{"error":"Not Authorized"}`, http.StatusUnauthorized)
		return
	}
	vmJSON := `{"friendly_name":"web","name":"vm1","uuid":"u","snapshots":` + mustJSON(f.snaps) + `,"disks":[` +
		`{"name":"disk0.img","device_name":"xvda","mode":"w"},{"name":"boot.iso","device_name":"xvdb:cdrom","mode":"r"}]}`
	f.mu.Lock()
	f.queries = append(f.queries, r.URL.RawQuery)
	f.mu.Unlock()
	switch {
	case p == "/api/v1/vms":
		fmt.Fprint(w, "["+vmJSON+"]")
	case p == "/api/v1/vms/vm1":
		fmt.Fprint(w, vmJSON)
	case p == "/api/v1/vms/vm1/snapshots" && r.Method == http.MethodGet:
		var parts []string
		for _, id := range f.listed {
			parts = append(parts, f.snapJSON(id, f.chunks))
		}
		fmt.Fprint(w, "["+strings.Join(parts, ",")+"]")
	case p == "/api/v1/vms/vm1/snapshots" && r.Method == http.MethodPost:
		fmt.Fprint(w, f.snapJSON("s-created", f.chunks))
	case strings.HasPrefix(p, "/api/v1/vms/vm1/snapshots/") && strings.Contains(p, "/disks/"):
		if !strings.HasSuffix(p, "/disks/disk0.img") {
			http.Error(w, `{"error":"Not found"}`, http.StatusNotFound)
			return
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(f.data))
	case strings.HasPrefix(p, "/api/v1/vms/vm1/snapshots/"):
		id := strings.TrimPrefix(p, "/api/v1/vms/vm1/snapshots/")
		if r.Method == http.MethodDelete {
			return
		}
		f.snapGets.Add(1)
		if r.URL.Query().Get("compareTo") != "" {
			fmt.Fprint(w, f.snapJSON(id, f.changed))
			return
		}
		if id == "s-old" && f.old != "" {
			fmt.Fprint(w, f.snapJSON(id, f.old))
			return
		}
		fmt.Fprint(w, f.snapJSON(id, f.chunks))
	default:
		http.Error(w, `{"error":"Not found","details":"Resource not found"}`, http.StatusNotFound)
	}
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func startFake(t *testing.T, f *fakeExporter) (*httptest.Server, Config) {
	srv := httptest.NewTLSServer(f)
	t.Cleanup(srv.Close)
	pool := srv.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs
	return srv, Config{URL: srv.URL, Username: testUser, Password: testPass, RootCAs: pool,
		Policy: httprange.Policy{Attempts: 2, BaseDelay: time.Millisecond, MaxDelay: time.Millisecond, AttemptTimeout: 5 * time.Second}}
}

func TestListingAndMapping(t *testing.T) {
	for _, camel := range []bool{false, true} {
		t.Run(fmt.Sprint("camel=", camel), func(t *testing.T) {
			f := newFake(t)
			f.camel = camel
			_, cfg := startFake(t, f)
			c, err := New(context.Background(), cfg)
			require.NoError(t, err)
			vms, err := c.VMs(context.Background())
			require.NoError(t, err)
			require.Equal(t, []backend.VM{{ID: "vm1", Name: "web", Disks: []backend.DiskInfo{{ID: "disk0.img", Device: "xvda"}}}}, vms)
			snaps, err := c.Snapshots(context.Background(), "vm1")
			require.NoError(t, err)
			var ids []string
			for _, s := range snaps {
				ids = append(ids, s.ID)
				assert.Equal(t, []backend.DiskInfo{{ID: "disk0.img", Device: "xvda"}}, s.Disks)
			}
			assert.Equal(t, []string{"s-old", "s-new", "s-extra"}, ids)
		})
	}
}

func TestBadCredentialsFailInNew(t *testing.T) {
	f := newFake(t)
	_, cfg := startFake(t, f)
	cfg.Password = "wrong-password-xyz"
	_, err := New(context.Background(), cfg)
	require.ErrorIs(t, err, backend.ErrPermission)
	assert.NotContains(t, err.Error(), "wrong-password-xyz")
}

func TestUntrustedCertificateRejected(t *testing.T) {
	f := newFake(t)
	_, cfg := startFake(t, f)
	cfg.RootCAs = nil
	_, err := New(context.Background(), cfg)
	require.Error(t, err)
	cfg.InsecureSkipVerify = true
	_, err = New(context.Background(), cfg)
	require.NoError(t, err)
}

func TestOpenDiskReadAndChanges(t *testing.T) {
	f := newFake(t)
	_, cfg := startFake(t, f)
	c, err := New(context.Background(), cfg)
	require.NoError(t, err)
	ref := backend.DiskRef{VM: "vm1", Snapshot: "s-new", Disk: "disk0.img"}
	d, err := c.OpenDisk(context.Background(), ref)
	require.NoError(t, err)
	assert.EqualValues(t, diskSize, d.Size())
	want, err := extent.Normalize([]extent.Extent{{Off: 0, Len: 4096}, {Off: 8192, Len: 4096}}, diskSize)
	require.NoError(t, err)
	assert.Equal(t, want, d.Allocated())
	p := make([]byte, 5000)
	require.NoError(t, d.ReadAt(context.Background(), p, 1234))
	assert.Equal(t, f.data[1234:6234], p)
	require.ErrorIs(t, d.ReadAt(context.Background(), p, diskSize-10), backend.ErrInvalid)

	// A second open of the same snapshot is served from the cache.
	before := f.snapGets.Load()
	_, err = c.OpenDisk(context.Background(), ref)
	require.NoError(t, err)
	assert.Equal(t, before, f.snapGets.Load())

	// The chunk at 8192 moved (copy-on-write); the one at 0 is shared.
	f.old = `[{"start":0,"length":4096,"physical_start":99},{"start":8192,"length":4096,"physical_start":77}]`
	delta, changed, err := c.OpenDelta(context.Background(), ref, backend.DiskRef{VM: "vm1", Snapshot: "s-old", Disk: ref.Disk})
	require.NoError(t, err)
	assert.Equal(t, "8192 4096\n", changed.Format())
	require.NoError(t, delta.Close())
	require.ErrorIs(t, delta.ReadAt(context.Background(), p, 0), backend.ErrInvalid, "reads after Close fail")
	f.mu.Lock()
	assert.Contains(t, f.queries, "squashChunks=false", "exact changes from the unsquashed maps")
	assert.NotContains(t, f.queries, "compareTo=s-old&squashChunks=true", "compareTo not needed")
	f.mu.Unlock()

	_, err = c.OpenDisk(context.Background(), backend.DiskRef{VM: "vm1", Snapshot: "s-new", Disk: "nope"})
	require.ErrorIs(t, err, backend.ErrNotFound)
}

// TestExactChanges: the exporter's compareTo reports an extent split by
// copy-on-write whole; the unsquashed maps' physical starts say exactly what
// moved. Discarded ranges count; compareTo is the fallback when a map has no
// physical starts.
func TestExactChanges(t *testing.T) {
	for _, tc := range []struct {
		name, old, cur, compare, want string
		compareUsed                   bool
	}{
		{"64 KiB CoW inside a 3 MiB extent",
			`[{"start":0,"length":3145728,"physical_start":1048576}]`,
			`[{"start":0,"length":1048576,"physical_start":1048576},{"start":1048576,"length":65536,"physical_start":99999744},{"start":1114112,"length":2031616,"physical_start":2162688}]`,
			`[{"start":0,"length":3145728}]`, "1048576 65536\n", false},
		{"discard counts", `[{"start":0,"length":8192,"physical_start":40960}]`, `[{"start":0,"length":4096,"physical_start":40960}]`, `null`, "4096 4096\n", false},
		{"unchanged", `[{"start":0,"length":8192,"physical_start":40960}]`, `[{"start":4096,"length":4096,"physical_start":45056},{"start":0,"length":4096,"physical_start":40960}]`, `null`, "", false},
		{"no physical_start: compareTo", `[{"start":0,"length":8192}]`, `[{"start":0,"length":8192}]`, `[{"start":4096,"length":4096}]`, "4096 4096\n", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t)
			f.data = make([]byte, 4<<20)
			f.old, f.chunks, f.changed = tc.old, tc.cur, tc.compare
			_, cfg := startFake(t, f)
			c, err := New(context.Background(), cfg)
			require.NoError(t, err)
			ref := backend.DiskRef{VM: "vm1", Snapshot: "s-new", Disk: "disk0.img"}
			_, changed, err := c.OpenDelta(context.Background(), ref, backend.DiskRef{VM: "vm1", Snapshot: "s-old", Disk: ref.Disk})
			require.NoError(t, err)
			assert.Equal(t, tc.want, changed.Format())
			f.mu.Lock()
			defer f.mu.Unlock()
			assert.Equal(t, tc.compareUsed, slices.Contains(f.queries, "compareTo=s-old&squashChunks=true"), "%v", f.queries)
		})
	}
}

// TestChunkPastEndClipped: FIEMAP's whole last block runs past the end of a
// disk whose size is not a block multiple; the map is clipped, not
// distrusted (which read the whole disk).
func TestChunkPastEndClipped(t *testing.T) {
	f := newFake(t)
	f.chunks = fmt.Sprintf(`[{"start":0,"length":4096,"physical_start":8},{"start":%d,"length":4096,"physical_start":4096}]`, diskSize-1536)
	f.old = f.chunks
	_, cfg := startFake(t, f)
	var logs bytes.Buffer
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	c, err := New(context.Background(), cfg)
	require.NoError(t, err)
	ref := backend.DiskRef{VM: "vm1", Snapshot: "s-new", Disk: "disk0.img"}
	for range 2 {
		d, err := c.OpenDisk(context.Background(), ref)
		require.NoError(t, err)
		assert.Equal(t, "0 4096\n"+fmt.Sprint(diskSize-1536)+" 1536\n", d.Allocated().Format())
	}
	assert.Equal(t, 1, strings.Count(logs.String(), "clipped"), "logged once: %s", logs.String())
	assert.NotContains(t, logs.String(), "untrusted")
	_, changed, err := c.OpenDelta(context.Background(), ref, backend.DiskRef{VM: "vm1", Snapshot: "s-old", Disk: ref.Disk})
	require.NoError(t, err)
	assert.Equal(t, "", changed.Format())
}

func TestHostileChunkMaps(t *testing.T) {
	for _, tc := range []struct{ name, chunks string }{
		{"negative", `[{"start":-4096,"length":4096}]`},
		{"overflow", `[{"start":9223372036854775807,"length":9223372036854775807}]`},
		{"uint64", `[{"start":18446744073709551615,"length":1}]`},
		{"float", `[{"start":1.5,"length":1}]`},
		{"missing", `[{"length":1}]`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t)
			f.chunks, f.changed = tc.chunks, tc.chunks
			_, cfg := startFake(t, f)
			c, err := New(context.Background(), cfg)
			require.NoError(t, err)
			d, err := c.OpenDisk(context.Background(), backend.DiskRef{VM: "vm1", Snapshot: "s-new", Disk: "disk0.img"})
			require.NoError(t, err)
			assert.Equal(t, extent.Full(diskSize), d.Allocated())
			_, _, err = c.OpenDelta(context.Background(), backend.DiskRef{VM: "vm1", Snapshot: "s-new", Disk: "disk0.img"}, backend.DiskRef{VM: "vm1", Snapshot: "s-old", Disk: "disk0.img"})
			require.ErrorIs(t, err, backend.ErrUnavailable)
		})
	}
}

func TestReloginOn401AndExpiry(t *testing.T) {
	f := newFake(t)
	_, cfg := startFake(t, f)
	c, err := New(context.Background(), cfg)
	require.NoError(t, err)
	require.EqualValues(t, 1, f.logins.Load())

	f.reject.Store(true)
	_, err = c.VMs(context.Background())
	require.NoError(t, err)
	assert.EqualValues(t, 2, f.logins.Load(), "one re-login after a 401")

	// A token whose TTL is inside the margin is renewed before use.
	f.ttl = 2 * time.Second
	c2, err := New(context.Background(), cfg)
	require.NoError(t, err)
	logins := f.logins.Load()
	time.Sleep(1700 * time.Millisecond) // past exp - ttl/5
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := c2.VMs(context.Background())
			assert.NoError(t, err)
		}()
	}
	wg.Wait()
	assert.Equal(t, logins+1, f.logins.Load(), "concurrent requests share one login")
}

func TestCreateDeleteSnapshot(t *testing.T) {
	f := newFake(t)
	_, cfg := startFake(t, f)
	c, err := New(context.Background(), cfg)
	require.NoError(t, err)
	s, err := c.CreateSnapshot(context.Background(), "vm1", "ignored")
	require.NoError(t, err)
	assert.Equal(t, backend.Snapshot{ID: "s-created", Disks: []backend.DiskInfo{{ID: "disk0.img", Device: "xvda"}}}, s)
	require.NoError(t, c.DeleteSnapshot(context.Background(), "vm1", "s-created"))
	_, err = c.Snapshots(context.Background(), "no/such/../vm")
	require.ErrorIs(t, err, backend.ErrNotFound)
}

func TestTokenRenewal(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	sign := func(claims jwt.MapClaims) string {
		s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte("k"))
		require.NoError(t, err)
		return s
	}
	for _, tc := range []struct {
		name  string
		token string
		want  time.Time
		err   bool
	}{
		{"hour", sign(jwt.MapClaims{"exp": now.Add(time.Hour).Unix()}), now.Add(time.Hour - time.Minute), false},
		{"short", sign(jwt.MapClaims{"exp": now.Add(100 * time.Second).Unix()}), now.Add(80 * time.Second), false},
		{"expired", sign(jwt.MapClaims{"exp": now.Add(-time.Second).Unix()}), time.Time{}, true},
		{"garbage", "not.a.jwt", time.Time{}, true},
		{"empty", "", time.Time{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tokenRenewal(tc.token, now)
			if tc.err {
				require.Error(t, err)
				if tc.token != "" {
					assert.NotContains(t, err.Error(), tc.token)
				}
				return
			}
			require.NoError(t, err)
			assert.True(t, tc.want.Equal(got), "got %v want %v", got, tc.want)
		})
	}
}
