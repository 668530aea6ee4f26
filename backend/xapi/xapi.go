// Package xapi is the XenServer / XCP-ng platform: VMs and their snapshots
// through XenAPI JSON-RPC on the pool master, disk data through the hosts'
// NBD servers (VDI.get_nbd_info), holes and changed blocks from the VHD
// block table at the start of an export_raw_vdi stream or from changed
// block tracking (VDI.list_changed_blocks).
//
// A pool without a network for NBD still serves every disk: each is
// streamed once through export_raw_vdi?format=vhd into a bounded local
// spill, which reads wait on.
package xapi

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
	"github.com/vmexportfs/vmexportfs/backend/nbd"
	"github.com/vmexportfs/vmexportfs/backend/redact"
	"github.com/vmexportfs/vmexportfs/backend/retry"
	"github.com/vmexportfs/vmexportfs/backend/vhdstream"
)

// apiVersion is the API version login_with_password announces.
const apiVersion = "1.0"

// cbtBlock is the granularity of VDI.list_changed_blocks: one bit per 64 KiB.
const cbtBlock = 64 << 10

// RmdirMode is what rmdir of a snapshot does.
type RmdirMode string

const (
	// RmdirDestroy destroys the snapshot VM and its disks (the default):
	// the mount shows only snapshots that hold data, so it can never use
	// a metadata-only snapshot as a delta base, and those left behind pile
	// up and confuse backup tools (stale CBT metadata forces full backups).
	RmdirDestroy RmdirMode = "destroy"
	// RmdirDataDestroy keeps the snapshot's CBT metadata (VDI.data_destroy)
	// and frees its data, as Xen Orchestra does: another tool can still
	// compute changed blocks against it. The snapshot leaves the mount.
	RmdirDataDestroy RmdirMode = "data-destroy"
)

// Config is how to reach a pool and what mkdir and rmdir do there.
type Config struct {
	URL                string // https://POOL-MASTER
	Username, Password string
	RootCAs            *x509.CertPool // nil: system roots
	InsecureSkipVerify bool
	// Originator names the client to xapi in login (its session
	// accounting is per user and originator).
	Originator string
	// EnableCBT makes mkdir enable changed block tracking on the VM's
	// disks before it snapshots, so deltas between snapshots are exact.
	EnableCBT bool
	Rmdir     RmdirMode
	// NBDConnections per opened disk (default 4); all disks on one host
	// share that host's 16.
	NBDConnections int
	// SpillDir and SpillBudget are where and how much a pool without NBD
	// may stream disks into.
	SpillDir    string
	SpillBudget *vhdstream.Budget
	Policy      retry.Policy
	Logger      *slog.Logger
	Secrets     *redact.Secrets
}

// Source is a logged-in pool.
type Source struct {
	cfg    Config
	base   *url.URL
	rpc    *rpcClient
	http   *httprange.Client
	logger *slog.Logger

	group singleflight.Group

	mu      sync.Mutex
	inv     *inventory                // the last reading, for OpenDisk's lookups
	members map[string]bool           // pool hosts' addresses: the only redirect targets
	hosts   map[string]*nbd.HostLimit // per NBD server address
	allocs  map[string]extent.Map     // VDI uuid → allocation: snapshots never change
	spills  map[string]*vhdstream.Spill
	// attached are this source's open NBD disks per VDI uuid: each holds
	// the VDI plugged into dom0, which xapi's VDI.destroy and
	// list_changed_blocks refuse (VDI_IN_USE).
	attached map[string]map[*nbdDisk]bool
}

var (
	_ backend.Source          = (*Source)(nil)
	_ backend.DeltaOpener     = (*Source)(nil)
	_ backend.SnapshotCreator = (*Source)(nil)
	_ backend.SnapshotDeleter = (*Source)(nil)
)

// New logs in to the pool master (so a wrong password or an untrusted
// certificate fails here) and reads its hosts and networks.
func New(ctx context.Context, cfg Config) (*Source, error) {
	base, err := url.Parse(cfg.URL)
	if err != nil || base.Scheme != "https" || base.Host == "" || (base.Path != "" && base.Path != "/") || base.RawQuery != "" || base.User != nil {
		// Not echoed: a URL may carry a password.
		return nil, fmt.Errorf("xapi: source URL: %w: want https://POOL-MASTER, without path, query or user", backend.ErrInvalid)
	}
	base.Path = ""
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Originator == "" {
		cfg.Originator = "vmexportfs"
	}
	if cfg.Rmdir == "" {
		cfg.Rmdir = RmdirDestroy
	}
	if cfg.NBDConnections <= 0 {
		cfg.NBDConnections = nbd.DefaultConnections
	}
	cfg.Secrets.Add(cfg.Password)
	tlsConfig := &tls.Config{RootCAs: cfg.RootCAs, InsecureSkipVerify: cfg.InsecureSkipVerify, MinVersion: tls.VersionTLS12}
	transport := httprange.NewTransport(tlsConfig, cfg.Policy.Meter)
	s := &Source{
		cfg: cfg, base: base, logger: cfg.Logger,
		members: map[string]bool{}, hosts: map[string]*nbd.HostLimit{},
		allocs: map[string]extent.Map{}, spills: map[string]*vhdstream.Spill{},
		attached: map[string]map[*nbdDisk]bool{},
	}
	s.rpc = &rpcClient{
		url: base.JoinPath("jsonrpc").String(),
		// JSON-RPC is never redirected: a redirect of a login would carry
		// the password away.
		http: &http.Client{Transport: transport, CheckRedirect: func(*http.Request, []*http.Request) error {
			return fmt.Errorf("%w: JSON-RPC is not redirected", httprange.ErrRedirectRefused)
		}},
		username: cfg.Username, password: cfg.Password, originator: cfg.Originator,
		policy: cfg.Policy, logger: cfg.Logger, secrets: cfg.Secrets,
	}
	s.http = &httprange.Client{
		HTTP: &http.Client{Transport: transport}, Policy: cfg.Policy, Logger: cfg.Logger, Secrets: cfg.Secrets,
		TrustRedirect: s.poolMember,
	}
	if _, err := s.rpc.session(ctx); err != nil {
		return nil, err
	}
	if err := s.readPool(ctx); err != nil {
		_ = s.rpc.logout(context.WithoutCancel(ctx))
		return nil, err
	}
	return s, nil
}

// readPool learns the pool's host addresses (the redirect targets) and says
// loudly when no network carries NBD.
func (s *Source) readPool(ctx context.Context) error {
	var hosts map[string]hostRecord
	if err := s.rpc.call(ctx, "host.get_all_records", query, &hosts); err != nil {
		return err
	}
	s.mu.Lock()
	for _, h := range hosts {
		if h.Address != "" {
			s.members[strings.ToLower(h.Address)] = true
		}
	}
	s.mu.Unlock()
	secure, insecure, err := s.nbdNetworks(ctx)
	if err != nil {
		return err
	}
	if !secure && !insecure {
		s.logger.Warn("xapi: NO NETWORK OF THIS POOL HAS THE PURPOSE nbd OR insecure_nbd: every disk is streamed whole through export_raw_vdi into a local spill (--spill-size) and reads wait for the stream; give a network the nbd purpose for random access")
	} else if !secure {
		s.logger.Warn("xapi: NBD runs without TLS here (network purpose insecure_nbd): disk bytes cross the network in clear")
	}
	return nil
}

// nbdNetworks says whether some network has the purpose nbd (TLS) or
// insecure_nbd.
func (s *Source) nbdNetworks(ctx context.Context) (secure, insecure bool, err error) {
	var nets map[string]networkRecord
	if err := s.rpc.call(ctx, "network.get_all_records", query, &nets); err != nil {
		return false, false, err
	}
	for _, n := range nets {
		for _, p := range n.Purpose {
			secure = secure || p == "nbd"
			insecure = insecure || p == "insecure_nbd"
		}
	}
	return secure, insecure, nil
}

// poolMember trusts a redirect of export_raw_vdi to a host of the pool,
// over https (httprange refuses https to http anyway): the master sends a
// client to the host that sees the disk's storage.
func (s *Source) poolMember(_, to *url.URL) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return to.Scheme == "https" && s.members[strings.ToLower(to.Hostname())]
}

// Close logs out; the disks were closed before it.
func (s *Source) Close() error {
	s.mu.Lock()
	spills := s.spills
	s.spills = map[string]*vhdstream.Spill{}
	s.mu.Unlock()
	for _, sp := range spills {
		_ = sp.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return s.rpc.logout(ctx)
}

// inventory reads the pool's tables; concurrent callers share one reading.
func (s *Source) inventory(ctx context.Context) (*inventory, error) {
	v, err, _ := s.group.Do("inventory", func() (any, error) {
		inv, err := fetchInventory(context.WithoutCancel(ctx), s.rpc)
		if err != nil {
			return nil, err
		}
		s.mu.Lock()
		s.inv = inv
		s.mu.Unlock()
		return inv, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*inventory), nil
}

// VMs lists the guests of the pool.
func (s *Source) VMs(ctx context.Context) ([]backend.VM, error) {
	inv, err := s.inventory(ctx)
	if err != nil {
		return nil, err
	}
	var out []backend.VM
	for _, vm := range inv.vms {
		if !listable(vm) {
			continue
		}
		out = append(out, backend.VM{ID: vm.UUID, Name: vm.NameLabel, Disks: diskInfos(inv.disks(vm))})
	}
	return out, nil
}

func diskInfos(disks []vmDisk) []backend.DiskInfo {
	var out []backend.DiskInfo
	for _, d := range disks {
		out = append(out, backend.DiskInfo{ID: d.vdi.UUID, Device: deviceName(d.userdevice), Key: d.userdevice})
	}
	return out
}

// Snapshots lists a VM's snapshots that hold data, oldest first.
func (s *Source) Snapshots(ctx context.Context, vmID string) ([]backend.Snapshot, error) {
	inv, err := s.inventory(ctx)
	if err != nil {
		return nil, err
	}
	ref, vm, ok := inv.vmByUUID(vmID)
	if !ok || !listable(vm) {
		return nil, fmt.Errorf("xapi: vm %q: %w", cut(vmID, 64), backend.ErrNotFound)
	}
	var out []backend.Snapshot
	for _, sref := range inv.snapshotsOf(ref) {
		out = append(out, snapshotOf(inv, inv.vms[sref]))
	}
	return out, nil
}

func snapshotOf(inv *inventory, vm vmRecord) backend.Snapshot {
	return backend.Snapshot{ID: vm.UUID, Name: vm.NameLabel, Created: vm.SnapshotTime.Time, Disks: diskInfos(inv.disks(vm))}
}

// vdiHandle is one snapshot disk, resolved.
type vdiHandle struct {
	ref  string
	rec  vdiRecord
	key  string // userdevice
	name string // for logs: vm/snapshot/device
}

// resolve finds the VDI of ref in the last inventory, or a fresh one: a
// snapshot disk of that VM's snapshot, holding data.
func (s *Source) resolve(ctx context.Context, ref backend.DiskRef) (vdiHandle, error) {
	s.mu.Lock()
	inv := s.inv
	s.mu.Unlock()
	if inv != nil {
		if h, ok := lookup(inv, ref); ok {
			return h, nil
		}
	}
	inv, err := s.inventory(ctx)
	if err != nil {
		return vdiHandle{}, err
	}
	if h, ok := lookup(inv, ref); ok {
		return h, nil
	}
	return vdiHandle{}, fmt.Errorf("xapi: disk %q of snapshot %q of vm %q: %w", cut(ref.Disk, 64), cut(ref.Snapshot, 64), cut(ref.VM, 64), backend.ErrNotFound)
}

func lookup(inv *inventory, ref backend.DiskRef) (vdiHandle, bool) {
	liveRef, live, ok := inv.vmByUUID(ref.VM)
	if !ok || !listable(live) {
		return vdiHandle{}, false
	}
	_, snap, ok := inv.vmByUUID(ref.Snapshot)
	if !ok || !snap.IsASnapshot || snap.SnapshotOf != liveRef {
		return vdiHandle{}, false
	}
	for _, d := range inv.disks(snap) {
		if d.vdi.UUID == ref.Disk && d.vdi.Type != "cbt_metadata" {
			return vdiHandle{ref: d.vdiRef, rec: d.vdi, key: d.userdevice, name: ref.VM + "/" + ref.Snapshot + "/" + deviceName(d.userdevice)}, true
		}
	}
	return vdiHandle{}, false
}

// OpenDisk opens a snapshot disk for reading.
func (s *Source) OpenDisk(ctx context.Context, ref backend.DiskRef) (backend.Disk, error) {
	h, err := s.resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	return s.open(ctx, h)
}

// open reads a VDI through NBD where the pool offers it, else through a
// spill of its VHD stream.
func (s *Source) open(ctx context.Context, h vdiHandle) (backend.Disk, error) {
	size := int64(h.rec.VirtualSize)
	if size < 0 {
		return nil, fmt.Errorf("xapi: %s: %w: virtual_size %d", h.name, backend.ErrUnavailable, size)
	}
	var infos []nbdInfo
	if err := s.rpc.call(ctx, "VDI.get_nbd_info", query, &infos, h.ref); err != nil {
		return nil, fmt.Errorf("xapi: %s: %w", h.name, err)
	}
	if len(infos) == 0 {
		return s.openSpill(ctx, h, size)
	}
	return s.openNBD(ctx, h, size)
}

// nbdIdle is how long an NBD disk stays connected without a read: each
// connection holds the VDI plugged into dom0 and one of the host's 16, so
// a disk is attached only while it is being read (Xen Orchestra users find
// disks left attached to dom0 after backups).
const nbdIdle = 2 * time.Second

// openNBD opens a VDI read over NBD. It connects on the first read, not
// here: listing and stat need only the records and the block table.
func (s *Source) openNBD(ctx context.Context, h vdiHandle, size int64) (backend.Disk, error) {
	alloc, err := s.allocation(ctx, h, size)
	if err != nil {
		return nil, err
	}
	return &nbdDisk{src: s, h: h, size: size, alloc: alloc}, nil
}

// dialNBD connects to the VDI's export as get_nbd_info says now (its
// export name holds the current session).
func (s *Source) dialNBD(ctx context.Context, h vdiHandle, size int64) (*nbd.Client, error) {
	var infos []nbdInfo
	if err := s.rpc.call(ctx, "VDI.get_nbd_info", query, &infos, h.ref); err != nil {
		return nil, fmt.Errorf("xapi: %s: %w", h.name, err)
	}
	if len(infos) == 0 {
		return nil, fmt.Errorf("xapi: %s: %w: get_nbd_info lists no NBD server any more", h.name, backend.ErrUnavailable)
	}
	info := infos[0]
	secure, _, err := s.nbdNetworks(ctx)
	if err != nil {
		return nil, err
	}
	s.cfg.Secrets.AddRenewed(info.Exportname) // it holds the session ref
	opts := nbd.Options{
		Addr:        net.JoinHostPort(info.Address, strconv.FormatInt(int64(info.Port), 10)),
		Export:      info.Exportname,
		Connections: s.cfg.NBDConnections,
		Policy:      s.cfg.Policy,
		Logger:      s.logger,
	}
	if secure {
		// The host's NBD certificate is its own, not the pool CA's: trust
		// exactly the one the master vouches for, under its subject.
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM([]byte(info.Cert)) {
			return nil, fmt.Errorf("xapi: %s: %w: get_nbd_info returned no usable certificate", h.name, backend.ErrUnavailable)
		}
		opts.TLS = &tls.Config{RootCAs: pool, ServerName: info.Subject, MinVersion: tls.VersionTLS12}
	}
	s.mu.Lock()
	lim := s.hosts[opts.Addr]
	if lim == nil {
		lim = nbd.NewHostLimit(nbd.MaxConnections)
		s.hosts[opts.Addr] = lim
	}
	s.mu.Unlock()
	opts.Host = lim
	cl, err := s.dialWaiting(ctx, h, opts)
	if err != nil {
		return nil, fmt.Errorf("xapi: %s: %w", h.name, err)
	}
	if cl.Size() != size {
		cl.Close()
		return nil, fmt.Errorf("xapi: %s: %w: NBD export of %d bytes for a VDI of %d", h.name, backend.ErrUnavailable, cl.Size(), size)
	}
	return cl, nil
}

// hostFullWait is how long a disk waits for a connection on a host whose
// 16 are all taken by other clients (another mount, a backup job), which
// xapi-nbd says by hanging up: they are released within seconds of their
// last read.
const hostFullWait = time.Minute

// dialWaiting dials, waiting while the host is full.
func (s *Source) dialWaiting(ctx context.Context, h vdiHandle, opts nbd.Options) (*nbd.Client, error) {
	deadline := time.Now().Add(hostFullWait)
	delay := 250 * time.Millisecond
	for warned := false; ; {
		cl, err := nbd.Dial(ctx, opts)
		if err == nil || !errors.Is(err, nbd.ErrHangUp) || time.Now().Add(delay).After(deadline) {
			return cl, err
		}
		if !warned {
			s.logger.Warn("xapi: the host's NBD connections are all in use (xapi-nbd serves 16); waiting for one", "disk", h.name, "addr", opts.Addr)
			warned = true
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
		delay = min(2*delay, 2*time.Second)
	}
}

// nbdDisk is a VDI read over NBD, connected while reads come. Its holes
// come from the VHD block table: xapi-nbd has no block status.
type nbdDisk struct {
	src   *Source
	h     vdiHandle
	size  int64
	alloc extent.Map

	mu     sync.Mutex
	cl     *nbd.Client
	users  int
	idle   *time.Timer
	closed bool
}

func (d *nbdDisk) Size() int64           { return d.size }
func (d *nbdDisk) Allocated() extent.Map { return d.alloc }

func (d *nbdDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off < 0 || off > d.size || int64(len(p)) > d.size-off {
		return fmt.Errorf("xapi: %s: read [%d,+%d) of a %d-byte disk: %w", d.h.name, off, len(p), d.size, backend.ErrInvalid)
	}
	cl, err := d.lease(ctx)
	if err != nil {
		return err
	}
	defer d.unlease()
	return cl.ReadAt(ctx, p, off)
}

// lease returns the connected client, connecting if need be.
func (d *nbdDisk) lease(ctx context.Context) (*nbd.Client, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, fmt.Errorf("xapi: %s: %w: disk closed", d.h.name, backend.ErrUnavailable)
	}
	if d.idle != nil {
		d.idle.Stop()
	}
	if d.cl == nil {
		cl, err := d.src.dialNBD(ctx, d.h, d.size)
		if err != nil {
			return nil, err
		}
		d.cl = cl
		d.src.attach(d, true)
	}
	d.users++
	return d.cl, nil
}

func (d *nbdDisk) unlease() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.users--
	if d.users == 0 && !d.closed {
		d.idle = time.AfterFunc(nbdIdle, d.disconnectIdle)
	}
}

// disconnectIdle unplugs the VDI once no read has come for nbdIdle.
func (d *nbdDisk) disconnectIdle() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.users == 0 && d.cl != nil {
		d.disconnectLocked()
	}
}

func (d *nbdDisk) disconnectLocked() {
	if d.cl != nil {
		_ = d.cl.Close()
		d.cl = nil
		d.src.attach(d, false)
	}
}

// Close disconnects, which unplugs the VDI from dom0.
func (d *nbdDisk) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	if d.idle != nil {
		d.idle.Stop()
	}
	d.disconnectLocked()
	return nil
}

// attach records whether d holds its VDI plugged in.
func (s *Source) attach(d *nbdDisk, on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	vdi := d.h.rec.UUID
	if on {
		if s.attached[vdi] == nil {
			s.attached[vdi] = map[*nbdDisk]bool{}
		}
		s.attached[vdi][d] = true
		return
	}
	delete(s.attached[vdi], d)
	if len(s.attached[vdi]) == 0 {
		delete(s.attached, vdi)
	}
}

// isAttached says whether this source holds the VDI over NBD.
func (s *Source) isAttached(vdi string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.attached[vdi]) > 0
}

// detach disconnects this source's NBD disks of the VDIs: a snapshot
// being deleted is read no more, and xapi would refuse to destroy a VDI
// still plugged in.
func (s *Source) detach(disks []vmDisk) {
	var open []*nbdDisk
	s.mu.Lock()
	for _, d := range disks {
		for nd := range s.attached[d.vdi.UUID] {
			open = append(open, nd)
		}
	}
	s.mu.Unlock()
	for _, nd := range open {
		_ = nd.Close()
	}
}

// allocation is the VDI's block table as the start of its VHD stream says:
// read footer, header and BAT, then hang up, as Xen Orchestra does. A
// snapshot's allocation never changes, so it is read once.
func (s *Source) allocation(ctx context.Context, h vdiHandle, size int64) (extent.Map, error) {
	s.mu.Lock()
	m, ok := s.allocs[h.rec.UUID]
	s.mu.Unlock()
	if ok {
		return m, nil
	}
	layout, err := s.layout(ctx, h, "")
	if err != nil {
		return extent.Map{}, err
	}
	if layout.Size != size {
		return extent.Map{}, fmt.Errorf("xapi: %s: %w: VHD stream of a %d-byte disk for a VDI of %d", h.name, backend.ErrUnavailable, layout.Size, size)
	}
	m = layout.Allocated()
	s.mu.Lock()
	s.allocs[h.rec.UUID] = m
	s.mu.Unlock()
	return m, nil
}

// layout reads the start of export_raw_vdi?format=vhd (against baseRef
// when given) and closes the stream.
func (s *Source) layout(ctx context.Context, h vdiHandle, baseRef string) (*vhdstream.Layout, error) {
	body, err := s.exportVHD(ctx, h.ref, baseRef)
	if err != nil {
		return nil, fmt.Errorf("xapi: %s: block table: %w", h.name, err)
	}
	defer body.Close()
	layout, err := vhdstream.ReadLayout(body)
	if err != nil {
		return nil, fmt.Errorf("xapi: %s: block table: %w: %w", h.name, backend.ErrUnavailable, err)
	}
	return layout, nil
}

// exportVHD starts a VHD stream of a VDI.
func (s *Source) exportVHD(ctx context.Context, vdiRef, baseRef string) (io.ReadCloser, error) {
	session, err := s.rpc.session(ctx)
	if err != nil {
		return nil, err
	}
	q := url.Values{"vdi": {vdiRef}, "format": {"vhd"}, "session_id": {session}}
	if baseRef != "" {
		q.Set("base", baseRef)
	}
	u := s.base.JoinPath("export_raw_vdi")
	u.RawQuery = q.Encode()
	return s.http.Stream(ctx, u.String())
}

// openSpill serves a VDI from one pass over its VHD stream, kept for the
// life of the source so that the filesystem's closing of idle disks does
// not stream it again.
func (s *Source) openSpill(ctx context.Context, h vdiHandle, size int64) (backend.Disk, error) {
	s.mu.Lock()
	sp := s.spills[h.rec.UUID]
	s.mu.Unlock()
	if sp == nil {
		var err error
		sp, err = vhdstream.NewSpill(ctx, vhdstream.SpillOptions{
			Open: func(ctx context.Context) (io.ReadCloser, error) {
				return s.exportVHD(ctx, h.ref, "")
			},
			Dir: s.cfg.SpillDir, Budget: s.cfg.SpillBudget, Policy: s.cfg.Policy, Logger: s.logger, Name: h.name,
		})
		if err != nil {
			return nil, fmt.Errorf("xapi: %s: %w", h.name, err)
		}
		if sp.Size() != size {
			sp.Close()
			return nil, fmt.Errorf("xapi: %s: %w: VHD stream of a %d-byte disk for a VDI of %d", h.name, backend.ErrUnavailable, sp.Size(), size)
		}
		s.mu.Lock()
		if old := s.spills[h.rec.UUID]; old != nil {
			s.mu.Unlock()
			sp.Close()
			sp = old
		} else {
			s.spills[h.rec.UUID] = sp
			s.mu.Unlock()
			s.logger.Info("xapi: streaming the disk into the spill (no NBD network)", "disk", h.name, "size", size)
		}
	}
	return &spillDisk{Spill: sp}, nil
}

// spillDisk is a lease on a spill the source keeps: closing it ends the
// lease, not the spill.
type spillDisk struct {
	*vhdstream.Spill
	closed atomic.Bool
}

func (d *spillDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if d.closed.Load() {
		return fmt.Errorf("xapi: %w: disk closed", backend.ErrUnavailable)
	}
	return d.Spill.ReadAt(ctx, p, off)
}

func (d *spillDisk) Close() error {
	d.closed.Store(true)
	return nil
}

// OpenDelta opens ref with the blocks changed since base: from changed
// block tracking when both disks have it (asked before NBD attaches the
// target, as xapi requires), else from the block table of a VHD delta
// stream against base.
func (s *Source) OpenDelta(ctx context.Context, ref, base backend.DiskRef) (backend.Disk, extent.Map, error) {
	h, err := s.resolve(ctx, ref)
	if err != nil {
		return nil, extent.Map{}, err
	}
	b, err := s.resolve(ctx, base)
	if err != nil {
		return nil, extent.Map{}, err
	}
	if h.key != b.key || ref.VM != base.VM {
		return nil, extent.Map{}, fmt.Errorf("xapi: %s against %s: %w: not the same disk", h.name, b.name, backend.ErrUnsupported)
	}
	size := int64(h.rec.VirtualSize)
	changed, err := s.changedBlocks(ctx, h, b, size)
	if err != nil {
		return nil, extent.Map{}, err
	}
	d, err := s.open(ctx, h)
	if err != nil {
		return nil, extent.Map{}, err
	}
	return d, changed, nil
}

func (s *Source) changedBlocks(ctx context.Context, h, b vdiHandle, size int64) (extent.Map, error) {
	cbt := h.rec.CBTEnabled && b.rec.CBTEnabled
	if cbt && s.isAttached(h.rec.UUID) {
		// xapi compares only a target that is not plugged in, and this
		// mount is reading it.
		s.logger.Info("xapi: the disk is open over NBD, so CBT cannot compare it; using the VHD delta's block table", "disk", h.name)
		cbt = false
	}
	if cbt {
		var encoded string
		err := s.rpc.call(ctx, "VDI.list_changed_blocks", probe, &encoded, b.ref, h.ref)
		if err == nil {
			m, err := decodeBitmap(encoded, size)
			if err != nil {
				return extent.Map{}, fmt.Errorf("xapi: %s: list_changed_blocks: %w", h.name, err)
			}
			s.logger.Info("xapi: changed blocks from CBT", "disk", h.name, "base", b.name, "changed", m.Len())
			return m, nil
		}
		var apiErr *APIError
		if !errors.Is(err, backend.ErrUnsupported) && (!errors.As(err, &apiErr) || !apiErr.busy()) {
			return extent.Map{}, fmt.Errorf("xapi: %s: list_changed_blocks: %w", h.name, err)
		}
		s.logger.Info("xapi: CBT cannot compare these snapshots; using the VHD delta's block table", "disk", h.name, "reason", err.Error())
	}
	layout, err := s.layout(ctx, h, b.ref)
	if err != nil {
		var se *httprange.StatusError
		if errors.As(err, &se) && se.Code == http.StatusNotFound {
			return extent.Map{}, fmt.Errorf("%w: %w", backend.ErrUnsupported, err)
		}
		return extent.Map{}, err
	}
	if layout.Size != size {
		return extent.Map{}, fmt.Errorf("xapi: %s: %w: VHD delta of a %d-byte disk for a VDI of %d", h.name, backend.ErrUnavailable, layout.Size, size)
	}
	m := layout.Allocated()
	s.logger.Info("xapi: changed blocks from the VHD delta's block table (CBT off)", "disk", h.name, "base", b.name, "changed", m.Len())
	return m, nil
}

// decodeBitmap turns list_changed_blocks' answer into extents: one bit per
// 64 KiB, the first block in bit 7 of byte 0. A bitmap shorter than the
// disk would hide changes; one much longer is not this disk's.
func decodeBitmap(encoded string, size int64) (extent.Map, error) {
	blocks := (size + cbtBlock - 1) / cbtBlock
	need := (blocks + 7) / 8
	if int64(base64.StdEncoding.DecodedLen(len(encoded))) > need+4096 {
		return extent.Map{}, fmt.Errorf("%w: a bitmap of %d base64 bytes for a disk of %d blocks", backend.ErrUnavailable, len(encoded), blocks)
	}
	bits, err := base64.StdEncoding.DecodeString(encoded)
	if err != nil {
		return extent.Map{}, fmt.Errorf("%w: bitmap: %w", backend.ErrUnavailable, err)
	}
	if int64(len(bits)) < need {
		return extent.Map{}, fmt.Errorf("%w: a bitmap of %d bytes for a disk of %d blocks", backend.ErrUnavailable, len(bits), blocks)
	}
	var exts []extent.Extent
	for blk := int64(0); blk < blocks; blk++ {
		if bits[blk/8]&(0x80>>(blk%8)) == 0 {
			continue
		}
		off := blk * cbtBlock
		n := min(int64(cbtBlock), size-off)
		if k := len(exts) - 1; k >= 0 && exts[k].Off+exts[k].Len == off {
			exts[k].Len += n
			continue
		}
		exts = append(exts, extent.Extent{Off: off, Len: n})
	}
	return extent.Normalize(exts, size)
}

// CreateSnapshot enables CBT on the VM's disks (unless configured not to)
// and snapshots the VM.
func (s *Source) CreateSnapshot(ctx context.Context, vmID, name string) (backend.Snapshot, error) {
	inv, err := s.inventory(ctx)
	if err != nil {
		return backend.Snapshot{}, err
	}
	ref, vm, ok := inv.vmByUUID(vmID)
	if !ok || !listable(vm) {
		return backend.Snapshot{}, fmt.Errorf("xapi: vm %q: %w", cut(vmID, 64), backend.ErrNotFound)
	}
	for _, sref := range inv.snapshotsOf(ref) {
		if inv.vms[sref].NameLabel == name {
			return backend.Snapshot{}, fmt.Errorf("xapi: vm %s already has a snapshot named %q: %w", vmID, cut(name, 64), backend.ErrExists)
		}
	}
	if s.cfg.EnableCBT {
		s.enableCBT(ctx, vmID, inv.disks(vm))
	}
	var snapRef string
	if err := s.rpc.call(ctx, "VM.snapshot", action, &snapRef, ref, name); err != nil {
		return backend.Snapshot{}, fmt.Errorf("xapi: snapshot vm %s: %w", vmID, err)
	}
	inv, err = s.inventory(ctx)
	if err != nil {
		return backend.Snapshot{}, err
	}
	snap, ok := inv.vms[snapRef]
	if !ok {
		return backend.Snapshot{}, fmt.Errorf("xapi: snapshot %s of vm %s: %w: not in the records after VM.snapshot", cut(snapRef, 64), vmID, backend.ErrUnavailable)
	}
	s.logger.Info("xapi: snapshot taken", "vm", vmID, "snapshot", snap.UUID, "name", name)
	return snapshotOf(inv, snap), nil
}

// enableCBT turns changed block tracking on where it is off. A pool that
// cannot (XenServer 7.1, an SR without CBT) still snapshots: its deltas
// then come from the VHD block table.
func (s *Source) enableCBT(ctx context.Context, vmID string, disks []vmDisk) {
	for _, d := range disks {
		if d.vdi.CBTEnabled {
			continue
		}
		var ignored any
		if err := s.rpc.call(ctx, "VDI.enable_cbt", action, &ignored, d.vdiRef); err != nil {
			s.logger.Warn("xapi: cannot enable changed block tracking; deltas will come from the VHD block table", "vm", vmID, "disk", deviceName(d.userdevice), "err", err.Error())
			continue
		}
		s.logger.Info("xapi: changed block tracking enabled", "vm", vmID, "disk", deviceName(d.userdevice))
	}
}

// DeleteSnapshot destroys a snapshot (RmdirDestroy) or its data only
// (RmdirDataDestroy).
func (s *Source) DeleteSnapshot(ctx context.Context, vmID, snapshotID string) error {
	inv, err := s.inventory(ctx)
	if err != nil {
		return err
	}
	liveRef, live, ok := inv.vmByUUID(vmID)
	if !ok || !listable(live) {
		return fmt.Errorf("xapi: vm %q: %w", cut(vmID, 64), backend.ErrNotFound)
	}
	snapRef, snap, ok := inv.vmByUUID(snapshotID)
	if !ok || !snap.IsASnapshot || snap.SnapshotOf != liveRef {
		return fmt.Errorf("xapi: snapshot %q of vm %s: %w", cut(snapshotID, 64), vmID, backend.ErrNotFound)
	}
	disks := inv.disks(snap)
	s.detach(disks)
	// Metadata is kept only where there is some: a snapshot without CBT
	// is destroyed whole, whatever the mode.
	if s.cfg.Rmdir == RmdirDataDestroy && slices.ContainsFunc(disks, func(d vmDisk) bool { return d.vdi.CBTEnabled }) {
		for _, d := range disks {
			method := "VDI.data_destroy"
			if !d.vdi.CBTEnabled {
				method = "VDI.destroy" // no metadata to keep
			}
			var ignored any
			if err := s.rpc.call(ctx, method, action, &ignored, d.vdiRef); err != nil {
				return fmt.Errorf("xapi: rmdir snapshot %s: %s: %w", snapshotID, method, err)
			}
		}
		s.forget(disks)
		s.logger.Info("xapi: snapshot data destroyed, CBT metadata kept", "vm", vmID, "snapshot", snapshotID)
		return nil
	}
	var ignored any
	if err := s.rpc.call(ctx, "VM.destroy", action, &ignored, snapRef); err != nil {
		return fmt.Errorf("xapi: rmdir snapshot %s: VM.destroy: %w", snapshotID, err)
	}
	for _, d := range disks {
		if err := s.rpc.call(ctx, "VDI.destroy", action, &ignored, d.vdiRef); err != nil {
			return fmt.Errorf("xapi: rmdir snapshot %s: VDI.destroy of %s: %w", snapshotID, deviceName(d.userdevice), err)
		}
	}
	s.forget(disks)
	s.logger.Info("xapi: snapshot destroyed", "vm", vmID, "snapshot", snapshotID)
	return nil
}

// forget drops what the source kept of destroyed disks.
func (s *Source) forget(disks []vmDisk) {
	s.mu.Lock()
	var spills []*vhdstream.Spill
	for _, d := range disks {
		delete(s.allocs, d.vdi.UUID)
		if sp := s.spills[d.vdi.UUID]; sp != nil {
			spills = append(spills, sp)
			delete(s.spills, d.vdi.UUID)
		}
	}
	s.inv = nil
	s.mu.Unlock()
	for _, sp := range spills {
		_ = sp.Close()
	}
}
