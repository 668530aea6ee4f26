// Package ovirttest runs an in-process simulator of an oVirt engine and its
// ovirt-imageio data path, as the ovirt backend sees them, in the spirit of
// net/http/httptest: the engine's SSO and REST API (JSON) on one HTTPS
// listener, and an imageio daemon and proxy on two more, serving the image
// transfer tickets the engine hands out. Disks are qcow2 chains with 64 KiB
// clusters, one layer per snapshot, so shallow transfers and extents answer
// exactly what each layer holds. The imageio answers follow the recorded
// probes of a real ovirt-imageio 2.5.3 (testdata/ovirt-imageio).
package ovirttest

import (
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmexportfs/vmexportfs/backend/internal/testpki"
)

// The account every simulator accepts unless Options.Users says otherwise.
const (
	DefaultUser     = "admin@internal"
	DefaultPassword = "ovirt-sim-password-3c9e"
)

// Options configure a simulator. Dir is required.
type Options struct {
	Dir   string            // disk data (required)
	Users map[string]string // user → password; nil: {DefaultUser: DefaultPassword}
	// TokenTTL: SSO tokens are refused (401) after this; default 1h.
	TokenTTL time.Duration
	// TicketTimeout: imageio tickets expire this long after the transfer
	// starts (403 "Transfer=<id> expired"); default 1h.
	TicketTimeout time.Duration
	// InactivityTimeout: imageio closes a connection idle this long
	// silently (EOF, no answer), as observed; default 60s.
	InactivityTimeout time.Duration
	// SnapshotDelay: snapshot_status stays "locked" this long after POST
	// (and a DELETE takes this long to remove it); default 200ms.
	SnapshotDelay time.Duration
	// TransferDelay: an image transfer stays "initializing" this long (and
	// each finalizing/cleanup step takes this long); default 100ms.
	TransferDelay time.Duration
	// NoTransferURL: transfers carry only proxy_url (the daemon is not
	// reachable), so clients must fall back to it.
	NoTransferURL bool
	MaxReaders    int // OPTIONS max_readers; default 8
	// StringScalars: the engine writes numbers and booleans as strings
	// ("provisioned_size":"1073741824", "active":"true") and dates as epoch
	// milliseconds, as older engines do.
	StringScalars bool
	Clock         func() time.Time
	Logger        *slog.Logger // nil discards
}

// VMSpec describes a VM added with AddVM.
type VMSpec struct {
	ID, Name string // ID "": a random uuid
	Disks    []DiskSpec
}

// DiskSpec is one qcow2 ("cow") disk of a VMSpec.
type DiskSpec struct {
	ID, Name string // ID "": a random uuid; Name is the disk's alias
	Size     int64
}

// Stats counts what clients did since Start.
type Stats struct {
	DataBytes       int64 // bytes of GET /images/<ticket> bodies (daemon and proxy)
	ExtentsRequests int
	// Transfers created; OpenTransfers not yet finished (any phase before
	// finished_*); Finalized by the client; Cancelled by the engine
	// (inactivity) or the client.
	Transfers, OpenTransfers, Finalized, Cancelled int
	PeakConnections                                int // most imageio connections open at once on one ticket
	Logins                                         int // SSO tokens issued
	Snapshots                                      int // snapshots created through the API
}

// Server is a running simulator.
type Server struct {
	opts Options
	log  *slog.Logger
	ca   *testpki.CA

	engine, daemon, proxy *listener

	mu        sync.Mutex
	tokens    map[string]*token
	vms       []*vm // in AddVM order
	transfers map[string]*transfer
	tOrder    []*transfer
	tickets   map[string]*ticket
	stats     Stats
	dataBytes atomic.Int64 // outside mu: counted per write of a body
	// advertised replaces the daemon's base URL in transfer_url (a proxy
	// in front of it, for fault tests); "" the daemon's own.
	advertised string

	closeOnce sync.Once
}

type token struct {
	user    string
	expires time.Time
}

type vm struct {
	id, name   string
	activeSnap string // the id of the "Active VM" snapshot
	created    time.Time
	disks      []*disk
	snaps      []*snapshot // regular ones, oldest first
}

type snapshot struct {
	id, description string
	date            time.Time
	readyAt         time.Time // locked before
	persistMemory   bool
	deleting        bool
	goneAt          time.Time // with deleting: when it is removed
	layers          map[*disk]*layer
}

func (sn *snapshot) locked(now time.Time) bool { return sn.deleting || now.Before(sn.readyAt) }

// Start creates the TLS material, listens and serves in the background.
func Start(opts Options) (*Server, error) {
	if opts.Dir == "" {
		return nil, errors.New("ovirttest start: Options.Dir is required")
	}
	if opts.Users == nil {
		opts.Users = map[string]string{DefaultUser: DefaultPassword}
	}
	setDefault := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	setDefault(&opts.TokenTTL, time.Hour)
	setDefault(&opts.TicketTimeout, time.Hour)
	setDefault(&opts.InactivityTimeout, 60*time.Second)
	setDefault(&opts.SnapshotDelay, 200*time.Millisecond)
	setDefault(&opts.TransferDelay, 100*time.Millisecond)
	if opts.MaxReaders <= 0 {
		opts.MaxReaders = 8
	}
	if opts.Clock == nil {
		opts.Clock = time.Now
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("ovirttest start: create dir: %w", err)
	}
	ca, err := testpki.NewCA("ovirttest engine CA")
	if err != nil {
		return nil, fmt.Errorf("ovirttest start: %w", err)
	}
	s := &Server{
		opts: opts, log: log, ca: ca,
		tokens: map[string]*token{}, transfers: map[string]*transfer{}, tickets: map[string]*ticket{},
	}
	if s.engine, err = s.listen("engine", s.engineHandler(), nil); err != nil {
		return nil, fmt.Errorf("ovirttest start: %w", err)
	}
	io := s.imageioHandler()
	if s.daemon, err = s.listen("imageio daemon", io, s.trackConn); err != nil {
		_ = s.engine.close()
		return nil, fmt.Errorf("ovirttest start: %w", err)
	}
	if s.proxy, err = s.listen("imageio proxy", io, s.trackConn); err != nil {
		_ = s.engine.close()
		_ = s.daemon.close()
		return nil, fmt.Errorf("ovirttest start: %w", err)
	}
	log.Info("ovirt simulator started", "engine", s.URL(), "daemon", s.daemon.url(), "proxy", s.proxy.url())
	return s, nil
}

// Close stops serving and drops open connections. Files in Dir stay, but
// the layers' descriptors are closed.
func (s *Server) Close() error {
	var err error
	s.closeOnce.Do(func() {
		err = errors.Join(s.engine.close(), s.daemon.close(), s.proxy.close())
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, v := range s.vms {
			for _, d := range v.disks {
				d.mu.Lock()
				for _, l := range d.layers {
					_ = l.f.Close()
				}
				d.mu.Unlock()
			}
		}
	})
	if err != nil {
		return fmt.Errorf("ovirttest close: %w", err)
	}
	return nil
}

// URL is the engine, https://127.0.0.1:PORT: the API at /ovirt-engine/api,
// SSO at /ovirt-engine/sso/oauth/token, the CA at
// /ovirt-engine/services/pki-resource?resource=ca-certificate&format=X509-PEM-CA.
func (s *Server) URL() string { return s.engine.url() }

// DaemonURL and ProxyURL are the imageio listeners, https://127.0.0.1:PORT.
func (s *Server) DaemonURL() string { return s.daemon.url() }

// AdvertiseDaemon makes transfers name base (https://HOST:PORT, a fault
// proxy in front of DaemonURL) as their transfer_url's server.
func (s *Server) AdvertiseDaemon(base string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.advertised = base
}

// ProxyURL is the imageio proxy, https://127.0.0.1:PORT.
func (s *Server) ProxyURL() string { return s.proxy.url() }

// CAPEM is the engine CA, which signed the engine's, the daemon's and the
// proxy's certificates.
func (s *Server) CAPEM() []byte { return s.ca.PEM() }

// CAPool trusts the engine CA only.
func (s *Server) CAPool() *x509.CertPool { return s.ca.Pool() }

// Stats returns the counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tick()
	st := s.stats
	st.DataBytes = s.dataBytes.Load()
	for _, tr := range s.tOrder {
		if !tr.finished() {
			st.OpenTransfers++
		}
	}
	return st
}

// AddVM adds a VM with its (all-unallocated) qcow2 disks and returns its id.
func (s *Server) AddVM(spec VMSpec) (string, error) {
	id, err := s.addVM(spec)
	if err != nil {
		return "", fmt.Errorf("ovirttest add vm %q: %w", spec.Name, err)
	}
	return id, nil
}

func (s *Server) addVM(spec VMSpec) (string, error) {
	if spec.ID == "" {
		spec.ID = newUUID()
	}
	if !safeID(spec.ID) {
		return "", fmt.Errorf("id %q has URL syntax characters", spec.ID)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.vmByID(spec.ID) != nil {
		return "", fmt.Errorf("vm %s exists", spec.ID)
	}
	v := &vm{id: spec.ID, name: spec.Name, activeSnap: newUUID(), created: s.opts.Clock()}
	for _, ds := range spec.Disks {
		if ds.ID == "" {
			ds.ID = newUUID()
		}
		if !safeID(ds.ID) || s.diskByID(ds.ID) != nil || slices.ContainsFunc(v.disks, func(d *disk) bool { return d.id == ds.ID }) {
			return "", fmt.Errorf("bad or duplicate disk id %q", ds.ID)
		}
		if ds.Size <= 0 {
			return "", fmt.Errorf("disk %s: size %d", ds.ID, ds.Size)
		}
		l, err := newLayer(s.opts.Dir, newUUID(), ds.Size)
		if err != nil {
			for _, d := range v.disks {
				d.layers[0].remove()
			}
			return "", err
		}
		v.disks = append(v.disks, &disk{id: ds.ID, name: ds.Name, size: ds.Size, vm: v, layers: []*layer{l}})
	}
	s.vms = append(s.vms, v)
	return v.id, nil
}

// WriteDisk writes data into the disk's active layer at off. vm and disk
// are ids or names.
func (s *Server) WriteDisk(vmKey, diskKey string, off int64, data []byte) error {
	if err := s.change(vmKey, diskKey, off, data, int64(len(data))); err != nil {
		return fmt.Errorf("ovirttest write disk %s/%s: %w", vmKey, diskKey, err)
	}
	return nil
}

// DiscardDisk zeroes n bytes of the active layer at off, as qemu-io
// write -z: whole clusters become zero clusters (allocated, reading as
// zeros, hiding the backing chain); partial ones get zeros written.
func (s *Server) DiscardDisk(vmKey, diskKey string, off, n int64) error {
	if err := s.change(vmKey, diskKey, off, nil, n); err != nil {
		return fmt.Errorf("ovirttest discard disk %s/%s: %w", vmKey, diskKey, err)
	}
	return nil
}

func (s *Server) change(vmKey, diskKey string, off int64, data []byte, n int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	d, err := s.lookupDisk(vmKey, diskKey)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.write(off, data, n)
}

// TakeSnapshot snapshots the VM as POST /vms/{id}/snapshots does, behind
// the client's back (even while one of its disks is in a transfer, which
// the API refuses), and returns the snapshot id once its status is ok.
func (s *Server) TakeSnapshot(vmKey, description string) (string, error) {
	s.mu.Lock()
	v := s.lookupVM(vmKey)
	if v == nil {
		s.mu.Unlock()
		return "", fmt.Errorf("ovirttest take snapshot of %q: no such vm", vmKey)
	}
	sn, err := s.snapshotVM(v, description, false)
	s.mu.Unlock()
	if err != nil {
		return "", fmt.Errorf("ovirttest take snapshot of %q: %w", vmKey, err)
	}
	time.Sleep(s.opts.SnapshotDelay)
	s.mu.Lock()
	// A fake clock may not have moved: the caller was promised ok.
	if now := s.opts.Clock(); now.Before(sn.readyAt) {
		sn.readyAt = now
	}
	s.mu.Unlock()
	return sn.id, nil
}

// Snapshots lists the VM's regular snapshot ids, oldest first (not the
// active one, nor those being deleted).
func (s *Server) Snapshots(vmKey string) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tick()
	v := s.lookupVM(vmKey)
	if v == nil {
		return nil, fmt.Errorf("ovirttest snapshots of %q: no such vm", vmKey)
	}
	out := []string{}
	for _, sn := range v.snaps {
		if !sn.deleting {
			out = append(out, sn.id)
		}
	}
	return out, nil
}

// SnapshotData writes a file with the disk's bytes in that snapshot
// (virtual size long, sparse) and returns its path: the tests' reference.
// snapshot may also be the VM's active snapshot id (the disk as it is now).
func (s *Server) SnapshotData(vmKey, snapshotID, diskKey string) (string, error) {
	s.mu.Lock()
	s.tick()
	d, err := s.lookupDisk(vmKey, diskKey)
	if err != nil {
		s.mu.Unlock()
		return "", fmt.Errorf("ovirttest snapshot data: %w", err)
	}
	var top *layer
	if snapshotID == d.vm.activeSnap {
		d.mu.RLock()
		top = d.active()
		d.mu.RUnlock()
	} else if sn := d.vm.snapByID(snapshotID); sn != nil {
		top = sn.layers[d]
	}
	s.mu.Unlock()
	if top == nil {
		return "", fmt.Errorf("ovirttest snapshot data: vm %s has no snapshot %q", vmKey, snapshotID)
	}
	path := filepath.Join(s.opts.Dir, fmt.Sprintf("snapdata-%s-%s.raw", snapshotID, d.id))
	if err := (view{d: d, top: top}).writeFile(path); err != nil {
		return "", fmt.Errorf("ovirttest snapshot data %s/%s: %w", snapshotID, d.id, err)
	}
	return path, nil
}

// ExpireTickets makes every current imageio ticket expire now, as a ticket
// whose timeout passes in the middle of a copy.
func (s *Server) ExpireTickets() {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.opts.Clock()
	for _, tk := range s.tickets {
		if tk.expires.After(now) {
			tk.expires = now
		}
	}
}

// snapshotVM freezes every disk's active layer as the new snapshot's and
// starts a fresh active layer. Callers hold s.mu.
func (s *Server) snapshotVM(v *vm, description string, persistMemory bool) (*snapshot, error) {
	now := s.opts.Clock()
	for _, sn := range v.snaps {
		if !sn.deleting && sn.locked(now) {
			return nil, &fault{status: 409, reason: "Operation Failed", detail: fmt.Sprintf("[Cannot create Snapshot. Snapshot is currently being created for VM %s.]", v.name)}
		}
	}
	sn := &snapshot{id: newUUID(), description: description, date: now, readyAt: now.Add(s.opts.SnapshotDelay), persistMemory: persistMemory, layers: map[*disk]*layer{}}
	var added []*layer
	for _, d := range v.disks {
		l, err := newLayer(s.opts.Dir, newUUID(), d.size)
		if err != nil {
			for _, a := range added {
				a.remove()
			}
			return nil, err
		}
		added = append(added, l)
	}
	for i, d := range v.disks {
		d.mu.Lock()
		sn.layers[d] = d.active()
		d.layers = append(d.layers, added[i])
		d.mu.Unlock()
	}
	v.snaps = append(v.snaps, sn)
	s.log.Debug("snapshot created", "vm", v.id, "snapshot", sn.id)
	return sn, nil
}

// removeSnapshot merges the snapshot's layers into their children and
// forgets it. Callers hold s.mu.
func (s *Server) removeSnapshot(v *vm, sn *snapshot) {
	for _, d := range v.disks {
		d.mu.Lock()
		if i := d.indexOf(sn.layers[d]); i >= 0 && i < len(d.layers)-1 {
			if err := d.mergeDown(i); err != nil {
				s.log.Error("snapshot merge", "vm", v.id, "snapshot", sn.id, "disk", d.id, "err", err)
			}
		}
		d.mu.Unlock()
	}
	v.snaps = slices.DeleteFunc(v.snaps, func(x *snapshot) bool { return x == sn })
	s.log.Debug("snapshot removed", "vm", v.id, "snapshot", sn.id)
}

// tick moves every time-driven state forward to now: snapshots removed,
// transfers through their phases, idle transfers cancelled. Everything is
// computed from timestamps, so a late tick lands where timers would have.
// Callers hold s.mu.
func (s *Server) tick() {
	now := s.opts.Clock()
	for _, v := range s.vms {
		for _, sn := range slices.Clone(v.snaps) {
			if sn.deleting && !now.Before(sn.goneAt) {
				s.removeSnapshot(v, sn)
			}
		}
	}
	for _, tr := range s.tOrder {
		s.advance(tr, now)
	}
}

func (s *Server) vmByID(id string) *vm {
	for _, v := range s.vms {
		if v.id == id {
			return v
		}
	}
	return nil
}

// lookupVM finds a VM by id, then by name.
func (s *Server) lookupVM(key string) *vm {
	if v := s.vmByID(key); v != nil {
		return v
	}
	for _, v := range s.vms {
		if v.name == key {
			return v
		}
	}
	return nil
}

func (s *Server) lookupDisk(vmKey, diskKey string) (*disk, error) {
	v := s.lookupVM(vmKey)
	if v == nil {
		return nil, fmt.Errorf("no vm %q", vmKey)
	}
	for _, d := range v.disks {
		if d.id == diskKey {
			return d, nil
		}
	}
	for _, d := range v.disks {
		if d.name == diskKey {
			return d, nil
		}
	}
	return nil, fmt.Errorf("vm %q has no disk %q", vmKey, diskKey)
}

func (s *Server) diskByID(id string) *disk {
	for _, v := range s.vms {
		for _, d := range v.disks {
			if d.id == id {
				return d
			}
		}
	}
	return nil
}

func (v *vm) snapByID(id string) *snapshot {
	for _, sn := range v.snaps {
		if sn.id == id {
			return sn
		}
	}
	return nil
}

// layerByImageID finds a disk snapshot (or the active volume) by image id.
// Callers hold s.mu.
func (s *Server) layerByImageID(id string) (*disk, *layer) {
	for _, v := range s.vms {
		for _, d := range v.disks {
			d.mu.RLock()
			for _, l := range d.layers {
				if l.imageID == id {
					d.mu.RUnlock()
					return d, l
				}
			}
			d.mu.RUnlock()
		}
	}
	return nil, nil
}

func safeID(id string) bool {
	for _, r := range id {
		if r == '/' || r == '?' || r == '#' || r == '%' || r == '&' || r == ' ' {
			return false
		}
	}
	return id != ""
}

func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
