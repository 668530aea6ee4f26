// Package coriolistest runs an in-process simulator of the Coriolis OVM
// exporter (cloudbase/coriolis-ovm-exporter) over real HTTPS, in the spirit of
// net/http/httptest. Disks are sparse files with copy-on-write extent
// bookkeeping, so snapshots, chunks and compareTo behave like the real server
// on a reflink repository. It is used by tests and by `vmexportfs demo`.
package coriolistest

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmexportfs/vmexportfs/backend/internal/testpki"
)

// Options configure a simulator. Dir is required.
type Options struct {
	Dir      string        // where disk files and the CA PEM live
	Username string        // default "admin"
	Password string        // default "secret"
	TokenTTL time.Duration // default 1h
	Addr     string        // default "127.0.0.1:0"
	Logger   *slog.Logger
	// ChunkListCost is how long every disk request (GET or HEAD) waits per
	// chunk of its snapshot before it is answered: the real exporter
	// re-reads and decodes the snapshot's whole chunk list from its
	// database on each one (ObservedChunkListCost). A GET of the snapshot
	// reads the same record (the disk route's lookup is that GET's), so it
	// waits as long, and a VM's snapshot list, which reads every one of
	// the VM's snapshots that way, waits for all their chunks. Zero: no
	// wait.
	ChunkListCost time.Duration
	// ScanCost is how long a per-VM request waits per VM and per snapshot
	// record the exporter holds: the real one finds a VM by re-reading
	// every vm.cfg (internal.GetVM lists them all) and a VM's snapshot ids
	// by scanning every snapshot record (its database selects them without
	// an index), on each GET of a VM, of its snapshot list and on a
	// snapshot's creation. The VM listing does that scan once per VM, so it
	// waits per VM plus per VM and record. A GET of one snapshot or disk
	// looks the record up by id: no scan. ObservedScanCost; zero: no wait.
	ScanCost time.Duration
}

// ObservedChunkListCost is the real exporter's cost per chunk and disk
// request, measured on XFS with 4 KiB extents: 64 ms at 100,000 chunks,
// 530 ms at 1,000,000 (specs/coriolis.md).
const ObservedChunkListCost = 530 * time.Nanosecond

// ObservedScanCost is ScanCost fitted to the one measurement the spec has
// of it: a cold find over 200 VMs × 5 snapshots took 5.5 s against the real
// exporter with a client that asked, one request at a time, for the VM
// listing, then per VM for the VM and its snapshot list and per snapshot for
// the snapshot and a HEAD (2.4 requests per snapshot). Those requests scan
// 200 + 200 × 1,000 records for the listing and 1,200 for each of the 400
// per-VM requests, 680,200 in all; with the 2,400 requests' own round trips
// (about half a millisecond each on a LAN) taken off, that is about 6 µs a
// record.
const ObservedScanCost = 6 * time.Microsecond

// Stats counts what clients asked for since Start or the last ResetStats.
type Stats struct {
	DiskBytes    int64 // body bytes of disk GETs actually written
	DiskRequests int64 // GET/HEAD requests on the disk route
	DiskHeads    int64 // the HEADs among them
	Logins       int64 // successful logins (tokens issued)
	Unauthorized int64 // requests refused with 401 for their token (logins not counted)
	APIRequests  int64 // every other routed request (metadata, snapshots)
	// Among APIRequests: the VM listing, GETs of one VM, snapshot lists
	// and GETs of one snapshot.
	VMListings, VMGets, SnapshotLists, SnapshotGets int64
}

// Server is a running simulator.
type Server struct {
	opts      Options
	log       *slog.Logger
	jwtSecret []byte // guarded by secretMu: RotateSecret replaces it
	secretMu  sync.RWMutex
	tokenTTL  atomic.Int64
	handler   http.Handler

	ln      net.Listener
	srv     *http.Server
	caPool  *x509.CertPool
	caFile  string
	done    chan struct{}
	closeMu sync.Once

	mu  sync.RWMutex
	vms []*vm
	// byID and owners index vms (by id) and their snapshots (snapshot id
	// -> VM), so that a request costs the same with 100,000 VMs as with
	// ten: the benchmarks measure the client, not the simulator's scans.
	byID    map[string]*vm
	owners  map[string]*vm
	nextPID uint64
	nextSeq uint64

	diskBytes, diskRequests, diskHeads, logins, apiRequests, unauthorized atomic.Int64
	vmListings, vmGets, snapshotLists, snapshotGets                       atomic.Int64

	hold atomic.Pointer[diskHold] // HoldDisk's, while on
}

// Start creates the TLS material, listens and serves in the background.
func Start(opts Options) (*Server, error) {
	if opts.Dir == "" {
		return nil, errors.New("coriolistest start: Options.Dir is required")
	}
	if opts.Username == "" {
		opts.Username = "admin"
	}
	if opts.Password == "" {
		opts.Password = "secret"
	}
	if opts.TokenTTL == 0 {
		opts.TokenTTL = time.Hour
	}
	if opts.Addr == "" {
		opts.Addr = "127.0.0.1:0"
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(filepath.Join(opts.Dir, "vms"), 0o755); err != nil {
		return nil, fmt.Errorf("coriolistest start: create dir: %w", err)
	}
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		return nil, fmt.Errorf("coriolistest start: jwt secret: %w", err)
	}
	s := &Server{opts: opts, log: log, jwtSecret: secret, done: make(chan struct{}), nextPID: 1}
	s.tokenTTL.Store(int64(opts.TokenTTL))
	s.handler = s.routes()

	ca, err := testpki.NewCA("coriolistest CA")
	if err != nil {
		return nil, fmt.Errorf("coriolistest start: %w", err)
	}
	leaf, err := ca.Issue(testpki.Loopback())
	if err != nil {
		return nil, fmt.Errorf("coriolistest start: %w", err)
	}
	s.caPool = ca.Pool()
	s.caFile = filepath.Join(opts.Dir, "ca.pem")
	if err := os.WriteFile(s.caFile, ca.PEM(), 0o644); err != nil {
		return nil, fmt.Errorf("coriolistest start: write CA: %w", err)
	}

	ln, err := net.Listen("tcp", opts.Addr)
	if err != nil {
		return nil, fmt.Errorf("coriolistest start: listen %s: %w", opts.Addr, err)
	}
	s.ln = ln
	s.srv = &http.Server{
		Handler:           s.handler,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{leaf}, MinVersion: tls.VersionTLS12},
		ReadHeaderTimeout: 10 * time.Second,
		// Handshake failures from clients that do not trust the CA are
		// expected in tests; keep them out of stderr.
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	go func() {
		defer close(s.done)
		if err := s.srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("coriolis simulator serve", "err", err)
		}
	}()
	log.Info("coriolis simulator started", "url", s.URL())
	return s, nil
}

// URL is the base URL, https://host:port, without /api/v1.
func (s *Server) URL() string { return "https://" + s.ln.Addr().String() }

// CAPool trusts the simulator's freshly generated CA.
func (s *Server) CAPool() *x509.CertPool { return s.caPool }

// CAFile is the PEM file of the CA, inside Dir.
func (s *Server) CAFile() string { return s.caFile }

// Handler is the full API handler, for serving behind a proxy.
func (s *Server) Handler() http.Handler { return s.handler }

// Close stops serving and drops open connections. Files in Dir stay.
func (s *Server) Close() error {
	var err error
	s.closeMu.Do(func() {
		err = s.srv.Close()
		<-s.done
	})
	if err != nil {
		return fmt.Errorf("coriolistest close: %w", err)
	}
	return nil
}

// SetTokenTTL changes the lifetime of tokens issued from now on; a negative
// value issues already-expired tokens.
func (s *Server) SetTokenTTL(d time.Duration) { s.tokenTTL.Store(int64(d)) }

// RotateSecret replaces the JWT secret, as a server restarted with a new
// `[jwt] secret` does: every token issued so far is refused with 401 from
// now on, however long before it expires, and a new login works.
func (s *Server) RotateSecret() error {
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		return fmt.Errorf("coriolistest rotate secret: %w", err)
	}
	s.secretMu.Lock()
	s.jwtSecret = secret
	s.secretMu.Unlock()
	return nil
}

// secret is the JWT secret tokens are signed and checked with now.
func (s *Server) secret() []byte {
	s.secretMu.RLock()
	defer s.secretMu.RUnlock()
	return s.jwtSecret
}

// Stats returns the counters.
func (s *Server) Stats() Stats {
	return Stats{
		DiskBytes:     s.diskBytes.Load(),
		DiskRequests:  s.diskRequests.Load(),
		DiskHeads:     s.diskHeads.Load(),
		Logins:        s.logins.Load(),
		Unauthorized:  s.unauthorized.Load(),
		APIRequests:   s.apiRequests.Load(),
		VMListings:    s.vmListings.Load(),
		VMGets:        s.vmGets.Load(),
		SnapshotLists: s.snapshotLists.Load(),
		SnapshotGets:  s.snapshotGets.Load(),
	}
}

// ResetStats zeroes the counters.
func (s *Server) ResetStats() {
	s.diskBytes.Store(0)
	s.diskRequests.Store(0)
	s.diskHeads.Store(0)
	s.logins.Store(0)
	s.unauthorized.Store(0)
	s.apiRequests.Store(0)
	s.vmListings.Store(0)
	s.vmGets.Store(0)
	s.snapshotLists.Store(0)
	s.snapshotGets.Store(0)
}

func (s *Server) alloc() uint64 {
	p := s.nextPID
	s.nextPID++
	return p
}

func (s *Server) findVM(id string) *vm {
	return s.byID[id]
}

// AddVM registers a VM and creates its (sparse, all-hole) live disks.
func (s *Server) AddVM(spec VMSpec) error {
	if err := s.addVM(spec); err != nil {
		return fmt.Errorf("coriolistest add vm %q: %w", spec.ID, err)
	}
	return nil
}

func (s *Server) addVM(spec VMSpec) error {
	if err := safeName(spec.ID); err != nil {
		return err
	}
	disks := make([]DiskSpec, len(spec.Disks))
	copy(disks, spec.Disks)
	seen := map[string]bool{}
	for i := range disks {
		d := &disks[i]
		if err := safeName(d.Name); err != nil {
			return err
		}
		if seen[d.Name] {
			return fmt.Errorf("%w: duplicate disk %q", errInvalid, d.Name)
		}
		seen[d.Name] = true
		if d.Size < 0 {
			return fmt.Errorf("%w: disk %q has negative size", errInvalid, d.Name)
		}
		if d.Device == "" {
			d.Device = "xvd" + string(rune('a'+i%26))
		}
		if d.CDROM && !strings.HasSuffix(d.Device, ":cdrom") {
			d.Device += ":cdrom"
		}
	}
	spec.Disks = disks

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.findVM(spec.ID) != nil {
		return errExists
	}
	repo, err := newHexID()
	if err != nil {
		return err
	}
	uuid, err := vmUUID(spec.ID)
	if err != nil {
		return err
	}
	v := &vm{spec: spec, uuid: uuid, repo: repo, dir: vmDir(s.opts.Dir, spec.ID)}
	liveDir := filepath.Join(v.dir, "live")
	if err := os.MkdirAll(liveDir, 0o755); err != nil {
		return fmt.Errorf("create vm dir: %w", err)
	}
	for _, ds := range spec.Disks {
		p := filepath.Join(liveDir, ds.Name)
		f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
		if err != nil {
			return fmt.Errorf("create live disk: %w", err)
		}
		terr := f.Truncate(ds.Size)
		if cerr := f.Close(); terr == nil {
			terr = cerr
		}
		if terr != nil {
			return fmt.Errorf("size live disk: %w", terr)
		}
		v.disks = append(v.disks, &disk{spec: ds, livePath: p, granules: granuleMap{}})
	}
	s.vms = append(s.vms, v)
	if s.byID == nil {
		s.byID, s.owners = map[string]*vm{}, map[string]*vm{}
	}
	if _, dup := s.byID[v.spec.ID]; !dup { // the first answers, as a scan would find it
		s.byID[v.spec.ID] = v
	}
	return nil
}

func (s *Server) liveDisk(vmID, diskName string) (*disk, error) {
	v := s.findVM(vmID)
	if v == nil {
		return nil, fmt.Errorf("vm %q: %w", vmID, errNotFound)
	}
	d := v.disk(diskName)
	if d == nil {
		return nil, fmt.Errorf("disk %q: %w", diskName, errNotFound)
	}
	return d, nil
}

// WriteDisk writes data into the live disk at off; every touched granule gets
// a new physical location (copy-on-write).
func (s *Server) WriteDisk(vmID, diskName string, off int64, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	d, err := s.liveDisk(vmID, diskName)
	if err == nil {
		err = writeLive(d, off, data, s.alloc)
	}
	if err != nil {
		return fmt.Errorf("coriolistest write disk %s/%s: %w", vmID, diskName, err)
	}
	return nil
}

// DiscardDisk punches a hole in the live disk; fully covered granules are
// deallocated, partially covered ones are rewritten.
func (s *Server) DiscardDisk(vmID, diskName string, off, n int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	d, err := s.liveDisk(vmID, diskName)
	if err == nil {
		err = discardLive(d, off, n, s.alloc)
	}
	if err != nil {
		return fmt.Errorf("coriolistest discard disk %s/%s: %w", vmID, diskName, err)
	}
	return nil
}

// TakeSnapshot creates a snapshot as POST .../snapshots does and returns its id.
func (s *Server) TakeSnapshot(vmID string) (string, error) {
	snap, err := s.takeSnapshot(vmID)
	if err != nil {
		return "", fmt.Errorf("coriolistest take snapshot of %q: %w", vmID, err)
	}
	return snap.id, nil
}

// Snapshots returns the IDs of a VM's snapshots, oldest first.
func (s *Server) Snapshots(vmID string) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v := s.findVM(vmID)
	if v == nil {
		return nil, fmt.Errorf("coriolistest snapshots of %q: %w", vmID, errNotFound)
	}
	ids := make([]string, 0, len(v.snapshots))
	for _, snap := range v.snapshots {
		ids = append(ids, snap.id)
	}
	return ids, nil
}

func (s *Server) takeSnapshot(vmID string) (*snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v := s.findVM(vmID)
	if v == nil {
		return nil, vmNotFound{vmID}
	}
	id, err := newUUID()
	if err != nil {
		return nil, err
	}
	s.nextSeq++
	snap := &snapshot{id: id, seq: s.nextSeq, dir: filepath.Join(v.dir, "snapshots", id)}
	if err := os.MkdirAll(snap.dir, 0o755); err != nil {
		return nil, fmt.Errorf("create snapshot dir: %w", err)
	}
	for _, d := range v.disks {
		if d.spec.CDROM && d.spec.ISOTyped {
			_ = os.RemoveAll(snap.dir)
			return nil, errNoReflink
		}
	}
	for _, d := range v.disks {
		// An untyped ISO is reflinked like a disk (the real server does).
		sd, err := snapshotDisk(d, filepath.Join(snap.dir, d.spec.Name))
		if err != nil {
			_ = os.RemoveAll(snap.dir)
			return nil, err
		}
		snap.disks = append(snap.disks, sd)
	}
	v.snapshots = append(v.snapshots, snap)
	s.owners[id] = v
	s.log.Debug("coriolis simulator snapshot", "vm", vmID, "snapshot", id)
	return snap, nil
}

// DeleteSnapshot deletes one snapshot as DELETE .../snapshots/{id} does (an
// unknown id is no error), behind the back of any client.
func (s *Server) DeleteSnapshot(vmID, id string) error {
	if err := s.deleteSnapshots(vmID, id); err != nil {
		return fmt.Errorf("coriolistest delete snapshot %s/%s: %w", vmID, id, err)
	}
	return nil
}

// deleteSnapshots removes one snapshot (id != "") or all of the VM's, with
// their files. Like the server, deleting an unknown snapshot id succeeds and
// does not check the VM, while a snapshot of another VM is a conflict.
func (s *Server) deleteSnapshots(vmID, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var v *vm
	if id != "" {
		owner, _, err := s.lookupSnapshot(vmID, id)
		if errors.Is(err, errNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		v = owner
	} else if v = s.findVM(vmID); v == nil {
		return vmNotFound{vmID}
	}
	kept := v.snapshots[:0:0]
	for i, snap := range v.snapshots {
		if id != "" && snap.id != id {
			kept = append(kept, snap)
			continue
		}
		// Open readers keep their file descriptors; new requests get 404.
		if err := os.RemoveAll(snap.dir); err != nil {
			v.snapshots = append(kept, v.snapshots[i:]...)
			return fmt.Errorf("remove snapshot %s: %w", snap.id, err)
		}
		delete(s.owners, snap.id)
	}
	v.snapshots = kept
	return nil
}

// OverrideChunks makes the server report chunks for a snapshot disk instead
// of the extents it recorded, in every answer about that snapshot from now on
// and exactly as given: squashChunks does not merge them, and compareTo
// compares them (with their PhysicalStart) as the recorded extents. It models
// an exporter on a badly fragmented filesystem (a million tiny FIEMAP
// extents) or one that does not squash. The disk's data is not changed: the
// caller writes the data the chunks describe before the snapshot, and bytes
// outside the chunks must be zero, since clients read them as holes.
func (s *Server) OverrideChunks(vmID, snapID, diskName string, chunks []Chunk) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	sd, err := s.snapDisk(vmID, snapID, diskName)
	if err != nil {
		return fmt.Errorf("coriolistest override chunks %s/%s/%s: %w", vmID, snapID, diskName, err)
	}
	sd.chunks = slices.Clone(chunks)
	if sd.chunks == nil {
		sd.chunks = []Chunk{}
	}
	sd.verbatim = true
	return nil
}

// SnapshotData returns the path of a snapshot's disk file, for checksums.
func (s *Server) SnapshotData(vmID, snapID, diskName string) (string, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	sd, err := s.snapDisk(vmID, snapID, diskName)
	if err != nil {
		return "", fmt.Errorf("coriolistest snapshot data %s/%s/%s: %w", vmID, snapID, diskName, err)
	}
	return sd.path, nil
}

func (s *Server) snapDisk(vmID, snapID, diskName string) (*snapDisk, error) {
	_, snap, err := s.lookupSnapshot(vmID, snapID)
	if err != nil {
		return nil, err
	}
	sd := snap.disk(diskName)
	if sd == nil {
		return nil, fmt.Errorf("disk %q: %w", diskName, errNotFound)
	}
	return sd, nil
}
