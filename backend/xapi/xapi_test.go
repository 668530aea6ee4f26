package xapi_test

import (
	"bytes"
	"context"
	"log/slog"
	"net/url"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/redact"
	"github.com/vmexportfs/vmexportfs/backend/xapi"
	"github.com/vmexportfs/vmexportfs/backend/xapi/xapitest"
)

// pool is a simulator with one VM (one 8 MiB disk, some data) and one
// snapshot of it, and a logged-in Source.
type pool struct {
	sim  *xapitest.Server
	src  *xapi.Source
	cfg  xapi.Config
	snap string
	logs *bytes.Buffer
}

func newPool(t *testing.T, opts xapitest.Options, user string) *pool {
	p := newPlatform(t, opts, true)
	p.AddVM(t, "vm-1", backendDisk("d0", 8<<20))
	p.Write(t, "vm-1", "d0", 3<<20, bytes.Repeat([]byte{7}, 1<<20))
	snap := p.Snapshot(t, "vm-1")
	logs := &bytes.Buffer{}
	cfg := p.cfg
	cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
	cfg.Secrets = &redact.Secrets{}
	if user != "" {
		cfg.Username = user
	}
	src, err := xapi.New(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = src.Close() })
	return &pool{sim: p.sim, src: src, cfg: cfg, snap: snap, logs: logs}
}

func (p *pool) read(t *testing.T) []byte {
	snaps, err := p.src.Snapshots(t.Context(), "vm-1")
	require.NoError(t, err)
	require.Len(t, snaps, 1)
	d, err := p.src.OpenDisk(t.Context(), backend.DiskRef{VM: "vm-1", Snapshot: snaps[0].ID, Disk: snaps[0].Disks[0].ID})
	require.NoError(t, err)
	defer d.Close()
	buf := make([]byte, d.Size())
	require.NoError(t, d.ReadAt(t.Context(), buf, 0))
	want, err := os.ReadFile(must(p.sim.SnapshotData(snaps[0].ID, "0")))
	require.NoError(t, err)
	require.Equal(t, want, buf)
	return buf
}

func must(s string, err error) string {
	if err != nil {
		panic(err)
	}
	return s
}

// TestPoolRedirect: the master sends export_raw_vdi to the member that
// sees the storage; the block table is read there.
func TestPoolRedirect(t *testing.T) {
	p := newPool(t, xapitest.Options{PoolMember: true}, "")
	p.read(t)
	assert.Positive(t, p.sim.Stats().Redirects, "the block table came through the member")
}

// TestNonFiniteRecords: records with NaN and Infinity literals are read.
func TestNonFiniteRecords(t *testing.T) {
	p := newPool(t, xapitest.Options{NonFinite: true}, "")
	vms, err := p.src.VMs(t.Context())
	require.NoError(t, err)
	require.Len(t, vms, 1, "the guest, not dom0 or the template: %+v", vms)
	assert.Equal(t, "vm-1", vms[0].ID)
	p.read(t)
}

// TestSessionEvicted: xapi drops the oldest session of a user with too
// many; the Source logs in again once and goes on.
func TestSessionEvicted(t *testing.T) {
	p := newPool(t, xapitest.Options{SessionsPerUser: 1}, "")
	other, err := xapi.New(context.Background(), p.cfg) // evicts p.src's session
	require.NoError(t, err)
	defer other.Close()
	p.read(t)
	assert.Contains(t, p.logs.String(), "session invalid, logging in again")
	p.sim.InvalidateSessions()
	p.read(t)
}

// TestReadOnlyUser: a user without the VM-admin role lists and reads, and
// mkdir and rmdir are refused with EACCES.
func TestReadOnlyUser(t *testing.T) {
	p := newPool(t, xapitest.Options{Users: map[string]string{xapitest.DefaultUser: xapitest.DefaultPassword, "auditor": xapitest.DefaultPassword}, ReadOnlyUsers: []string{"auditor"}}, "auditor")
	_, err := p.src.CreateSnapshot(t.Context(), "vm-1", "nope")
	assert.ErrorIs(t, err, backend.ErrPermission)
	snaps, err := p.src.Snapshots(t.Context(), "vm-1")
	require.NoError(t, err)
	assert.ErrorIs(t, p.src.DeleteSnapshot(t.Context(), "vm-1", snaps[0].ID), backend.ErrPermission)
}

// TestBadLogin: a wrong password fails New with EACCES, and the error
// does not carry the password.
func TestBadLogin(t *testing.T) {
	p := newPlatform(t, xapitest.Options{}, false)
	cfg := p.cfg
	cfg.Password = "wrong-password-123"
	cfg.Secrets = &redact.Secrets{}
	_, err := xapi.New(context.Background(), cfg)
	require.ErrorIs(t, err, backend.ErrPermission)
	assert.NotContains(t, err.Error(), cfg.Password)
	assert.Zero(t, p.sim.Stats().Sessions)
}

// TestSourceURL: only https://HOST is a pool master.
func TestSourceURL(t *testing.T) {
	for _, raw := range []string{"http://h", "https://", "https://h/path", "https://h?x=1", "https://u:p@h"} {
		_, err := xapi.New(context.Background(), xapi.Config{URL: raw})
		assert.ErrorIs(t, err, backend.ErrInvalid, raw)
		if u, perr := url.Parse(raw); perr == nil && u.User != nil {
			assert.NotContains(t, err.Error(), "u:p", "userinfo is not echoed")
		}
	}
}

// TestLogoutOnClose: Close ends the session.
func TestLogoutOnClose(t *testing.T) {
	p := newPool(t, xapitest.Options{}, "")
	p.read(t)
	require.NoError(t, p.src.Close())
	st := p.sim.Stats()
	assert.Zero(t, st.Sessions, "sessions left on the pool")
	assert.Positive(t, st.Logouts)
}
