package main

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/ovirt/ovirttest"
)

// ovirtDisk makes a VM with one disk holding 24 MiB of data in a 64 MiB
// disk and snapshots it; it returns the snapshot's name and reference.
func ovirtDisk(t *testing.T, o *ovirtPlatform, vm string) (snap, ref string) {
	o.AddVM(t, vm, diskSpec{"xvda", 64 * mib})
	o.Write(t, vm, "xvda", 0, 8*mib)
	o.Write(t, vm, "xvda", 20*mib+64*kib, 8*mib)
	o.Write(t, vm, "xvda", 56*mib, 8*mib)
	snap = o.Snapshot(t, vm)
	return snap, o.Reference(t, vm, snap, "xvda")
}

// TestOVirtTransferFinalizedWhenIdle: a disk's image transfer lives while
// it is read and is finalized once idle, with the mount still up (each
// transfer keeps the disk locked on the engine); the next read makes a new
// one.
func TestOVirtTransferFinalizedWhenIdle(t *testing.T) {
	requireTools(t, "cp")
	o := newOVirt(t, ovirttest.Options{})
	snap, ref := ovirtDisk(t, o, "vm-idle")
	m := mountSim(t, o, "--cache-size", "4M") // the first MiB is evicted by the end of the copy
	img := m.path("vms", "vm-idle", "snapshots", snap, "disk.img")
	dst := filepath.Join(t.TempDir(), "copy")
	tool(t, "cp", "--sparse=always", img, dst)
	assert.Equal(t, sha256File(t, ref), sha256File(t, dst))
	st := o.sim.Stats()
	require.Equal(t, 1, st.OpenTransfers, "the transfer is open right after the copy")
	assert.Equal(t, int64(1), mountStats(t, m).Open["transfers"], "and the mount's stats say so")
	deadline := time.Now().Add(20 * time.Second)
	for o.sim.Stats().OpenTransfers > 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	st = o.sim.Stats()
	assert.Zero(t, st.OpenTransfers, "the idle transfer was finalized")
	assert.Equal(t, st.Transfers, st.Finalized, "every transfer was finalized, none cancelled by the engine")
	assert.Zero(t, mountStats(t, m).Open["transfers"], "the stats too")
	tool(t, "dd", "if="+img, "of=/dev/null", "bs=1M", "count=1", "iflag=direct")
	assert.Greater(t, o.sim.Stats().Transfers, st.Transfers, "a read after the finalize made a new transfer")
	m.stop(t)
	assert.Zero(t, o.sim.Stats().OpenTransfers, "unmounting finalizes what is open")
}

// TestOVirtTicketExpiresMidCopy: the ticket of the transfer a copy is
// reading expires half-way; the copy finishes byte-identical on a new
// transfer, and the log says so.
func TestOVirtTicketExpiresMidCopy(t *testing.T) {
	requireTools(t, "cp")
	o := newOVirt(t, ovirttest.Options{})
	snap, ref := ovirtDisk(t, o, "vm-expire")
	m := mountSim(t, o, "--cache-size", "4M")
	img := m.path("vms", "vm-expire", "snapshots", snap, "disk.img")
	before := o.sim.Stats()
	done := make(chan error, 1)
	dst := filepath.Join(t.TempDir(), "copy")
	go func() {
		_, err := toolErr("dd", "if="+img, "of="+dst, "bs=64k", "iflag=direct", "conv=sparse")
		done <- err
	}()
	expired := false
	for !expired {
		select {
		case err := <-done:
			t.Fatalf("the copy finished (%v) before half of it was served", err)
		case <-time.After(time.Millisecond):
		}
		if o.sim.Stats().DataBytes-before.DataBytes >= 12*mib {
			o.sim.ExpireTickets()
			expired = true
		}
	}
	require.NoError(t, <-done)
	assert.Equal(t, sha256File(t, ref), sha256File(t, dst), "the copy across the expiry")
	assert.True(t, m.logged("starting a new one"), "the log says the transfer was renewed:\n%s", m.logs.String())
	assert.Greater(t, o.sim.Stats().Transfers-before.Transfers, 1, "a second transfer carried the rest")
}

// TestOVirtSnapshotWaits: mkdir and rmdir wait for the engine's job (the
// snapshot stays locked for a while) and say so in the log, mkdir at the
// set pace with the engine's status.
func TestOVirtSnapshotWaits(t *testing.T) {
	o := newOVirt(t, ovirttest.Options{SnapshotDelay: 800 * time.Millisecond})
	o.AddVM(t, "vm-wait", diskSpec{"xvda", 8 * mib})
	o.Write(t, "vm-wait", "xvda", 0, 1*mib)
	m := mountSim(t, o, "--progress-interval", "200ms")
	dir := m.path("vms", "vm-wait", "snapshots", "nightly")
	start := time.Now()
	tool(t, "mkdir", dir)
	assert.GreaterOrEqual(t, time.Since(start), 800*time.Millisecond, "mkdir returned before the snapshot was ok")
	assert.True(t, m.logged("snapshot ready"), m.logs.String())
	assert.Contains(t, m.logs.String(), `state="engine: snapshot locked"`, "the engine's status, logged while mkdir waits")
	ids := o.Snapshots(t, "vm-wait")
	require.Len(t, ids, 1)
	ref, err := o.sim.SnapshotData("vm-wait", ids[0], "vm-wait-xvda")
	require.NoError(t, err)
	assert.Equal(t, sha256File(t, ref), sha256File(t, filepath.Join(dir, "disk.img")))
	// Reading it left an idle transfer, which locks the disk on the
	// engine: a second mkdir gives it up rather than fail with 409.
	start = time.Now()
	tool(t, "mkdir", m.path("vms", "vm-wait", "snapshots", "weekly"))
	assert.Less(t, time.Since(start), 10*time.Second, "mkdir waited for the idle transfer to time out")
	require.Len(t, o.Snapshots(t, "vm-wait"), 2)
	tool(t, "rmdir", m.path("vms", "vm-wait", "snapshots", "weekly"))
	start = time.Now()
	tool(t, "rmdir", dir)
	assert.GreaterOrEqual(t, time.Since(start), 800*time.Millisecond, "rmdir returned before the snapshot was gone")
	assert.True(t, m.logged("snapshot deleted"), m.logs.String())
	assert.Empty(t, o.Snapshots(t, "vm-wait"))
}
