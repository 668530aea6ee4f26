package coriolis_test

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/backendtest"
	"github.com/vmexportfs/vmexportfs/backend/coriolis"
	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
)

const (
	confUser = "conformance"
	confPass = "pw-conformance-suite"
)

// TestConformance runs the backend contract suite against the simulator:
// chunk maps and compareTo are per 64 KiB granule, so maps are checked at
// that granularity; the client compares snapshots, creates and deletes them.
func TestConformance(t *testing.T) {
	backendtest.Run(t, backendtest.Harness{
		New: func(t *testing.T) backendtest.Platform {
			sim, err := coriolistest.Start(coriolistest.Options{Dir: t.TempDir(), Username: confUser, Password: confPass})
			require.NoError(t, err)
			t.Cleanup(func() { _ = sim.Close() })
			return &platform{sim: sim}
		},
		Capabilities: backendtest.Capabilities{Granularity: coriolistest.Granularity, Delta: true},
	})
}

// platform is the simulator in the suite's words. It counts the TCP
// connections its clients hold (the client's transport is built as
// coriolis.New builds it, with a counting dialer): the exporter has no
// server-side session, so those are what Close must release.
type platform struct {
	sim  *coriolistest.Server
	open atomic.Int64
}

func (p *platform) AddVM(t testing.TB, vm string, disks ...backendtest.DiskSpec) {
	spec := coriolistest.VMSpec{ID: vm, FriendlyName: "conformance " + vm}
	for _, d := range disks {
		spec.Disks = append(spec.Disks, coriolistest.DiskSpec{Name: d.Name, Size: d.Size})
	}
	require.NoError(t, p.sim.AddVM(spec))
}

func (p *platform) Write(t testing.TB, vm, disk string, off int64, data []byte) {
	require.NoError(t, p.sim.WriteDisk(vm, disk, off, data))
}

func (p *platform) Discard(t testing.TB, vm, disk string, off, n int64) {
	require.NoError(t, p.sim.DiscardDisk(vm, disk, off, n))
}

func (p *platform) Snapshot(t testing.TB, vm string) string {
	id, err := p.sim.TakeSnapshot(vm)
	require.NoError(t, err)
	return id
}

func (p *platform) Source(t testing.TB) backend.Source {
	tr := httprange.NewTransport(&tls.Config{RootCAs: p.sim.CAPool(), MinVersion: tls.VersionTLS12}, nil)
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dialer.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		p.open.Add(1)
		return &countedConn{Conn: c, n: &p.open}, nil
	}
	c, err := coriolis.New(context.Background(), coriolis.Config{
		URL: p.sim.URL(), Username: confUser, Password: confPass,
		HTTP:   &http.Client{Transport: tr},
		Policy: httprange.Policy{Attempts: 2, BaseDelay: time.Millisecond, MaxDelay: 5 * time.Millisecond, AttemptTimeout: 10 * time.Second},
	})
	require.NoError(t, err)
	return c
}

func (p *platform) OpenResources() int { return int(p.open.Load()) }

type countedConn struct {
	net.Conn
	n    *atomic.Int64
	once sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() { c.n.Add(-1) })
	return c.Conn.Close()
}
