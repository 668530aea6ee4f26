package coriolis

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
)

// These tests hold the client to what the real exporter was observed doing
// (specs/coriolis.md, "Observed on the real server"), through the simulator.

func observedSim(t *testing.T, vms ...coriolistest.VMSpec) (*coriolistest.Server, *Client, *bytes.Buffer) {
	t.Helper()
	sim, err := coriolistest.Start(coriolistest.Options{Dir: t.TempDir()})
	require.NoError(t, err)
	t.Cleanup(func() { sim.Close() })
	for _, v := range vms {
		require.NoError(t, sim.AddVM(v))
	}
	var logs bytes.Buffer
	c, err := New(context.Background(), Config{URL: sim.URL(), Username: "admin", Password: "secret", RootCAs: sim.CAPool(),
		Logger: slog.New(slog.NewTextHandler(&logs, nil)),
		// The default policy: 5 tries, backoff from 100 ms.
		Policy: httprange.Policy{Attempts: 5, BaseDelay: 100 * time.Millisecond, MaxDelay: 5 * time.Second, AttemptTimeout: 10 * time.Second}})
	require.NoError(t, err)
	return sim, c, &logs
}

// TestSnapshotCDROMFiltered: the exporter reflinks an untyped ISO into the
// snapshot and lists it among the snapshot's disks; the client shows only
// the VM disk, as it does for the VM.
func TestSnapshotCDROMFiltered(t *testing.T) {
	sim, c, _ := observedSim(t, coriolistest.VMSpec{ID: "vm", Disks: []coriolistest.DiskSpec{
		{Name: "root.img", Size: 1 << 20}, {Name: "boot.iso", Device: "xvdc", Size: 1 << 20, CDROM: true}}})
	_, err := sim.TakeSnapshot("vm")
	require.NoError(t, err)
	ctx := context.Background()
	snaps, err := c.Snapshots(ctx, "vm")
	require.NoError(t, err)
	require.Len(t, snaps, 1)
	assert.Equal(t, []backend.DiskInfo{{ID: "root.img", Device: "xvda"}}, snaps[0].Disks)
	created, err := c.CreateSnapshot(ctx, "vm", "")
	require.NoError(t, err)
	assert.Equal(t, []backend.DiskInfo{{ID: "root.img", Device: "xvda"}}, created.Disks)
}

// TestUnknownIsNotFoundAtOnce: the exporter answers an unknown VM, snapshot
// or compareTo base with 500 and details "could not find VM with ID ..." or
// "not found": ErrNotFound without retries (under the 5 tries with backoff
// that another 500 gets).
func TestUnknownIsNotFoundAtOnce(t *testing.T) {
	sim, c, _ := observedSim(t, coriolistest.VMSpec{ID: "vm", Disks: []coriolistest.DiskSpec{{Name: "root.img", Size: 1 << 20}}})
	sid, err := sim.TakeSnapshot("vm")
	require.NoError(t, err)
	ctx := context.Background()
	const unknown = "00000000-0000-4000-8000-000000000000"
	ref := backend.DiskRef{VM: "vm", Snapshot: sid, Disk: "root.img"}
	for name, op := range map[string]func() error{
		"snapshots of unknown VM": func() error { _, err := c.Snapshots(ctx, "nope"); return err },
		"unknown snapshot": func() error {
			_, err := c.OpenDisk(ctx, backend.DiskRef{VM: "vm", Snapshot: unknown, Disk: "root.img"})
			return err
		},
		"unknown base": func() error {
			_, _, err := c.OpenDelta(ctx, ref, backend.DiskRef{VM: "vm", Snapshot: unknown, Disk: "root.img"})
			return err
		},
		"delete unknown":       func() error { return c.DeleteSnapshot(ctx, "vm", unknown) },
		"create on unknown VM": func() error { _, err := c.CreateSnapshot(ctx, "nope", ""); return err },
	} {
		t.Run(name, func(t *testing.T) {
			sim.ResetStats()
			start := time.Now()
			err := op()
			took := time.Since(start)
			require.ErrorIs(t, err, backend.ErrNotFound)
			assert.Less(t, took, time.Second)
			assert.LessOrEqual(t, sim.Stats().APIRequests, int64(2), "no retries")
			t.Logf("%s: ErrNotFound in %v, %d API requests", name, took, sim.Stats().APIRequests)
		})
	}
}

// TestOther500StillRetried: only the exact not-found details are mapped.
func TestOther500StillRetried(t *testing.T) {
	var hits atomic.Int32
	f := newFake(t)
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/auth/login") {
			f.ServeHTTP(w, r)
			return
		}
		hits.Add(1)
		http.Error(w, `{"error":"Server error","details":"not found in database: connection reset"}`, http.StatusInternalServerError)
	}))
	t.Cleanup(srv.Close)
	pool := srv.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs
	c, err := New(context.Background(), Config{URL: srv.URL, Username: testUser, Password: testPass, RootCAs: pool,
		Policy: httprange.Policy{Attempts: 3, BaseDelay: time.Millisecond, MaxDelay: time.Millisecond, AttemptTimeout: 5 * time.Second}})
	require.NoError(t, err)
	_, err = c.VMs(context.Background())
	require.ErrorIs(t, err, backend.ErrUnavailable)
	assert.NotErrorIs(t, err, backend.ErrNotFound)
	assert.EqualValues(t, 3, hits.Load())
	for _, b := range []string{`{"details":"NOT FOUND"}`, `{"details":"Could not find VM with ID x"}`} {
		assert.True(t, notFoundDetails([]byte(b)), b)
	}
	for _, b := range []string{`{"details":"not found in db"}`, `not found`, `{"error":"not found"}`} {
		assert.False(t, notFoundDetails([]byte(b)), b)
	}
}

// TestSnapshotRefusedUnsupported: a VM whose ISO is typed "not a virtual
// disk" cannot be snapshotted (400 "VM does not support reflink cloning"):
// ErrUnsupported (ENOTSUP), with the server's reason logged.
func TestSnapshotRefusedUnsupported(t *testing.T) {
	_, c, logs := observedSim(t, coriolistest.VMSpec{ID: "vm", Disks: []coriolistest.DiskSpec{
		{Name: "root.img", Size: 1 << 20}, {Name: "boot.iso", Size: 1 << 20, CDROM: true, ISOTyped: true}}})
	_, err := c.CreateSnapshot(context.Background(), "vm", "")
	require.ErrorIs(t, err, backend.ErrUnsupported)
	assert.NotErrorIs(t, err, backend.ErrInvalid, "ENOTSUP, not EINVAL")
	assert.Contains(t, logs.String(), "VM does not support reflink cloning")
	assert.Contains(t, logs.String(), "refused to snapshot")
}
