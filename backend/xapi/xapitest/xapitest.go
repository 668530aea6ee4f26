// Package xapitest runs an in-process simulator of a XenServer / XCP-ng pool
// as the xapi backend sees it, in the spirit of net/http/httptest: XenAPI
// JSON-RPC on POST /jsonrpc, GET /export_raw_vdi (raw and VHD streams with
// no length, ended by closing the connection) and an xapi-nbd style NBD
// server. Disks are sparse files; snapshots copy them, and every write is
// logged per 64 KiB block so VDI.list_changed_blocks and VHD deltas answer
// exactly what was written between two snapshots.
package xapitest

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"mime"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmexportfs/vmexportfs/backend/internal/testpki"
)

// The account every simulator accepts unless Options.Users says otherwise.
const (
	DefaultUser     = "root"
	DefaultPassword = "xapi-sim-password-7f3a"
)

// NBDMode is which network purpose the pool has, which decides whether
// VDI.get_nbd_info answers and whether the NBD server speaks TLS.
type NBDMode int

const (
	NBDTLS      NBDMode = iota // a network with purpose "nbd": FORCEDTLS
	NBDInsecure                // purpose "insecure_nbd": plain NBD
	NBDNone                    // no such network: get_nbd_info answers []
)

// Options configure a simulator. Dir is required.
type Options struct {
	Dir           string            // where disk files live (required)
	Users         map[string]string // user → password; nil: {DefaultUser: DefaultPassword}
	ReadOnlyUsers []string          // users with the read-only role
	// SessionsPerUser bounds live sessions per user (default 50); a login
	// beyond it destroys that user's oldest session, as xapi does, so its
	// holder gets SESSION_INVALID.
	SessionsPerUser int
	NBD             NBDMode
	NoCBT           bool // XenServer 7.1: the CBT calls are MESSAGE_METHOD_UNKNOWN
	// PoolMember adds a second host that alone sees the SR: the master
	// answers export_raw_vdi with a 302 to it.
	PoolMember bool
	// NonFinite puts Infinity, -Infinity and NaN literals in VM records, as
	// real xapi can; the answer is then not valid JSON.
	NonFinite bool
	Clock     func() time.Time // snapshot_time; default time.Now
	Logger    *slog.Logger     // nil discards
}

// VMSpec describes a VM added with AddVM.
type VMSpec struct {
	UUID  string // the caller's choice (tests use readable ids); "" → random
	Name  string
	Disks []DiskSpec
}

// DiskSpec is one disk of a VMSpec.
type DiskSpec struct {
	Userdevice string // "0", "1", ...
	// Size is rounded up to a multiple of 2 MiB, as SM's vhdutil does on VHD
	// SRs; virtual_size is the rounded size.
	Size int64
}

// Stats counts what clients did since Start.
type Stats struct {
	NBDBytes, ExportBytes              int64          // disk bytes over NBD; bytes of export_raw_vdi bodies
	ExportRequests                     map[string]int // "raw", "vhd", "vhd+base", "raw+base"
	NBDConns, PeakNBDConns, NBDRefused int
	Logins, Logouts, Sessions          int // Sessions: live now
	ChangedBlocksCalls                 int
	ChangedWhileAttached               int // list_changed_blocks calls whose vdi_to had an NBD connection open
	Redirects                          int
}

const (
	nullRef      = "OpaqueRef:NULL"
	vhdBlockSize = 2 << 20  // VHD block and SM size rounding
	cbtBlockSize = 64 << 10 // one bit of list_changed_blocks
	nbdSubject   = "nbd.xapi.test"
	nullDate     = "19700101T00:00:00Z" // what xapi shows for a datetime never set
)

// Server is a running simulator.
type Server struct {
	opts Options
	log  *slog.Logger

	ca                *testpki.CA
	master, member    *host
	nbd               *nbdServer
	nbdCertPEM        string
	srRef, srUUID     string
	mgmtNet, nbdNet   string
	poolRef, poolUUID string

	mu       sync.Mutex
	sessions map[string]*session
	sessSeq  uint64
	vms      map[string]*vm
	vbds     map[string]*vbd
	vdis     map[string]*vdi
	stats    Stats

	calls map[string]handler // fixed at Start

	exportBytes atomic.Int64
	closeOnce   sync.Once
	advertised  atomic.Pointer[string] // AdvertiseNBD's host:port, nil: the NBD server's own

	// streams are the hijacked export connections, which http.Server.Close
	// no longer knows about.
	streamsMu sync.Mutex
	streams   map[net.Conn]struct{}
	closed    bool
}

// host is one HTTPS endpoint of the pool: the master, or the member that
// sees the SR.
type host struct {
	ref, uuid, name string
	ln              net.Listener
	srv             *http.Server
	done            chan struct{}
	isMember        bool
}

type session struct {
	ref, user, originator string
	seq                   uint64
	readOnly              bool
}

type vm struct {
	ref, uuid, name   string
	template, control bool
	snapshot          bool
	snapshotOf        string // ref
	snapshots         []string
	snapTime          time.Time
	vbds              []string
	power             string
	history           []*snapEntry // of a live VM: every snapshot it had, kept past VM.destroy
}

// snapEntry remembers a snapshot's disks for the test helpers, which name
// snapshots by uuid even after a client destroyed the snapshot VM.
type snapEntry struct {
	uuid string
	vdis map[string]*vdi // userdevice →
}

type vbd struct {
	ref, uuid, vm, vdi string
	typ, userdevice    string
	mode, device       string
}

type vdi struct {
	ref, uuid, name string
	size            int64
	snapshot        bool
	snapshotOf      string // ref
	snapshots       []string
	snapTime        time.Time
	cbt             bool   // a snapshot's own flag; a live VDI uses lin.cbtOn
	typ             string // "user" | "cbt_metadata"
	path            string // "" once the data is gone
	lin             *lineage
	epoch           int // a snapshot's: the last write epoch it holds
	vbds            []string
	attached        int // open NBD connections
	uid             [16]byte
	gone            bool // destroyed
}

// lineage is the write history of one live disk and its snapshots. Writes
// happen in epochs; a snapshot holds every write of epochs up to its own
// and starts the next one, so "written between snapshots a and b" is the
// writes with a.epoch < epoch <= b.epoch.
type lineage struct {
	live    *vdi
	epoch   int
	writes  map[int64][]int // 64 KiB block → epochs it was written in, ascending
	cbtOn   bool
	cbtOffs []int // epochs in which CBT was disabled
}

// Start creates the TLS material, listens and serves in the background.
func Start(opts Options) (*Server, error) {
	if opts.Dir == "" {
		return nil, errors.New("xapitest start: Options.Dir is required")
	}
	if opts.Users == nil {
		opts.Users = map[string]string{DefaultUser: DefaultPassword}
	}
	if opts.SessionsPerUser <= 0 {
		opts.SessionsPerUser = 50
	}
	if opts.Clock == nil {
		opts.Clock = time.Now
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("xapitest start: create dir: %w", err)
	}
	s := &Server{
		opts: opts, log: log,
		sessions: map[string]*session{}, vms: map[string]*vm{}, vbds: map[string]*vbd{}, vdis: map[string]*vdi{},
		stats: Stats{ExportRequests: map[string]int{}}, streams: map[net.Conn]struct{}{},
	}
	s.calls = s.handlers()
	s.srRef, s.srUUID = newRef(), newUUID()
	s.mgmtNet, s.nbdNet = newRef(), newRef()
	s.poolRef, s.poolUUID = newRef(), newUUID()
	ca, err := testpki.NewCA("xapitest CA")
	if err != nil {
		return nil, fmt.Errorf("xapitest start: %w", err)
	}
	s.ca = ca
	s.addFixedVMs()

	s.master, err = s.startHost("xapi-sim-master", false)
	if err != nil {
		return nil, fmt.Errorf("xapitest start: %w", err)
	}
	if opts.PoolMember {
		s.member, err = s.startHost("xapi-sim-member", true)
		if err != nil {
			_ = s.master.close()
			return nil, fmt.Errorf("xapitest start: %w", err)
		}
	}
	if opts.NBD != NBDNone {
		if err := s.startNBD(); err != nil {
			_ = s.closeHosts()
			return nil, fmt.Errorf("xapitest start: %w", err)
		}
	}
	log.Info("xapi simulator started", "url", s.URL(), "nbd", s.NBDAddr())
	return s, nil
}

// addFixedVMs adds what every pool has: dom0 and a template. Clients must
// skip both.
func (s *Server) addFixedVMs() {
	dom0 := &vm{ref: newRef(), uuid: newUUID(), name: "Control domain on host: xapi-sim-master", control: true, power: "Running"}
	tmpl := &vm{ref: newRef(), uuid: newUUID(), name: "Debian Bookworm 12", template: true, power: "Halted"}
	s.vms[dom0.ref] = dom0
	s.vms[tmpl.ref] = tmpl
}

func (s *Server) startHost(name string, member bool) (*host, error) {
	leaf, err := s.ca.Issue(testpki.Loopback())
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	h := &host{ref: newRef(), uuid: newUUID(), name: name, ln: ln, done: make(chan struct{}), isMember: member}
	mux := http.NewServeMux()
	mux.HandleFunc("/jsonrpc", func(w http.ResponseWriter, r *http.Request) { s.serveJSONRPC(h, w, r) })
	mux.HandleFunc("/export_raw_vdi", func(w http.ResponseWriter, r *http.Request) { s.serveExport(h, w, r) })
	mux.HandleFunc("/export_raw_vdi/", func(w http.ResponseWriter, r *http.Request) { s.serveExport(h, w, r) })
	h.srv = &http.Server{
		Handler: mux,
		// xapi speaks HTTP/1.1 only, and the export hijacks the connection,
		// which HTTP/2 cannot do.
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{leaf}, MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}},
		TLSNextProto:      map[string]func(*http.Server, *tls.Conn, http.Handler){},
		ReadHeaderTimeout: 10 * time.Second,
		// Handshake failures of clients that distrust the CA are expected
		// in tests; keep them out of stderr.
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	go func() {
		defer close(h.done)
		if err := h.srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("xapi simulator serve", "host", name, "err", err)
		}
	}()
	return h, nil
}

func (h *host) url() string { return "https://" + h.ln.Addr().String() }

func (h *host) close() error {
	err := h.srv.Close()
	<-h.done
	return err
}

// startNBD starts the xapi-nbd stand-in. Its certificate is self-signed and
// not from the HTTPS CA, as on a real host: clients must pin the cert that
// get_nbd_info returns.
func (s *Server) startNBD() error {
	cfg := nbdConfig{MaxConns: 16, Lookup: s.nbdLookup, Logger: s.log}
	cert, certPEM, err := selfSignedNBDCert()
	if err != nil {
		return err
	}
	s.nbdCertPEM = certPEM
	if s.opts.NBD == NBDTLS {
		cfg.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	srv, err := newNBDServer(cfg)
	if err != nil {
		return fmt.Errorf("nbd server: %w", err)
	}
	s.nbd = srv
	return nil
}

// selfSignedNBDCert makes an RSA certificate, as xapi's own (TLS 1.2
// ECDHE-RSA), for nbd.xapi.test and 127.0.0.1.
func selfSignedNBDCert() (tls.Certificate, string, error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return tls.Certificate{}, "", fmt.Errorf("nbd key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, "", fmt.Errorf("nbd serial: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: nbdSubject},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		DNSNames:              []string{nbdSubject},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, "", fmt.Errorf("nbd certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, "", fmt.Errorf("nbd certificate: %w", err)
	}
	p := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, string(p), nil
}

// Close stops serving and drops open connections. Files in Dir stay.
func (s *Server) Close() error {
	var err error
	s.closeOnce.Do(func() {
		err = s.closeHosts()
		s.streamsMu.Lock()
		s.closed = true
		for c := range s.streams {
			_ = c.Close()
		}
		s.streamsMu.Unlock()
		if s.nbd != nil {
			if nerr := s.nbd.Close(); err == nil {
				err = nerr
			}
		}
	})
	if err != nil {
		return fmt.Errorf("xapitest close: %w", err)
	}
	return nil
}

func (s *Server) closeHosts() error {
	err := s.master.close()
	if s.member != nil {
		if merr := s.member.close(); err == nil {
			err = merr
		}
	}
	return err
}

// URL is the pool master, https://127.0.0.1:PORT.
func (s *Server) URL() string { return s.master.url() }

// CAPEM is the CA of the HTTPS certificates (master and member).
func (s *Server) CAPEM() []byte { return s.ca.PEM() }

// CAPool trusts the HTTPS CA only.
func (s *Server) CAPool() *x509.CertPool { return s.ca.Pool() }

// NBDAddr is the NBD server's 127.0.0.1:PORT, "" with NBDNone.
func (s *Server) NBDAddr() string {
	if s.nbd == nil {
		return ""
	}
	return s.nbd.Addr()
}

// Stats returns the counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	st := s.stats
	st.ExportRequests = make(map[string]int, len(s.stats.ExportRequests))
	for k, v := range s.stats.ExportRequests {
		st.ExportRequests[k] = v
	}
	st.Sessions = len(s.sessions)
	s.mu.Unlock()
	st.ExportBytes = s.exportBytes.Load()
	if s.nbd != nil {
		ns := s.nbd.stats()
		st.NBDBytes, st.NBDConns, st.PeakNBDConns, st.NBDRefused = ns.Bytes, ns.Conns, ns.Peak, ns.Refused
	}
	return st
}

// InvalidateSessions drops every live session, as an xapi restart does.
func (s *Server) InvalidateSessions() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.sessions)
}

// AddVM adds a running VM with its (sparse, all-zero) disks and an empty CD
// drive, and returns its uuid.
func (s *Server) AddVM(spec VMSpec) (string, error) {
	uuid, err := s.addVM(spec)
	if err != nil {
		return "", fmt.Errorf("xapitest add vm %q: %w", spec.Name, err)
	}
	return uuid, nil
}

func (s *Server) addVM(spec VMSpec) (string, error) {
	if spec.UUID == "" {
		spec.UUID = newUUID()
	}
	if strings.ContainsAny(spec.UUID, "/?&=") {
		return "", fmt.Errorf("uuid %q has URL syntax characters", spec.UUID)
	}
	seen := map[string]bool{"3": true} // the CD drive's
	for _, d := range spec.Disks {
		if d.Userdevice == "" || seen[d.Userdevice] {
			return "", fmt.Errorf("bad or duplicate userdevice %q", d.Userdevice)
		}
		seen[d.Userdevice] = true
		if d.Size < 0 {
			return "", fmt.Errorf("disk %s: negative size", d.Userdevice)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.vmByUUID(spec.UUID) != nil {
		return "", fmt.Errorf("vm %s exists", spec.UUID)
	}
	v := &vm{ref: newRef(), uuid: spec.UUID, name: spec.Name, power: "Running"}
	for i, d := range spec.Disks {
		size := (d.Size + vhdBlockSize - 1) / vhdBlockSize * vhdBlockSize
		di := &vdi{ref: newRef(), uuid: newUUID(), name: fmt.Sprintf("%s %s", spec.Name, d.Userdevice), size: size, typ: "user", uid: newUID()}
		di.path = filepath.Join(s.opts.Dir, di.uuid+".raw")
		if err := createSparse(di.path, size); err != nil {
			return "", err
		}
		di.lin = &lineage{live: di, writes: map[int64][]int{}}
		s.vdis[di.ref] = di
		s.attachVBD(v, di, d.Userdevice, "Disk", "RW", "xvd"+string(rune('a'+i%26)))
	}
	s.attachVBD(v, nil, "3", "CD", "RO", "xvdd")
	s.vms[v.ref] = v
	return v.uuid, nil
}

func (s *Server) attachVBD(v *vm, di *vdi, userdevice, typ, mode, device string) {
	b := &vbd{ref: newRef(), uuid: newUUID(), vm: v.ref, vdi: nullRef, typ: typ, userdevice: userdevice, mode: mode, device: device}
	if di != nil {
		b.vdi = di.ref
		di.vbds = append(di.vbds, b.ref)
	}
	s.vbds[b.ref] = b
	v.vbds = append(v.vbds, b.ref)
}

func createSparse(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("create disk: %w", err)
	}
	terr := f.Truncate(size)
	if cerr := f.Close(); terr == nil {
		terr = cerr
	}
	if terr != nil {
		return fmt.Errorf("size disk: %w", terr)
	}
	return nil
}

// liveDisk is the live VDI of a VM's userdevice.
func (s *Server) liveDisk(vmUUID, userdevice string) (*vdi, error) {
	v := s.vmByUUID(vmUUID)
	if v == nil || v.snapshot {
		return nil, fmt.Errorf("no vm %q", vmUUID)
	}
	for _, d := range s.vmDisks(v) {
		if d.userdevice == userdevice {
			return d.vdi, nil
		}
	}
	return nil, fmt.Errorf("vm %q has no disk %q", vmUUID, userdevice)
}

type vmDisk struct {
	userdevice string
	vdi        *vdi
}

// vmDisks lists the VM's disk VBDs with a VDI, in VBD order.
func (s *Server) vmDisks(v *vm) []vmDisk {
	var out []vmDisk
	for _, ref := range v.vbds {
		b := s.vbds[ref]
		if b == nil || b.typ != "Disk" {
			continue
		}
		if d := s.vdis[b.vdi]; d != nil {
			out = append(out, vmDisk{b.userdevice, d})
		}
	}
	return out
}

// WriteDisk writes data into the live disk at off.
func (s *Server) WriteDisk(vmUUID, userdevice string, off int64, data []byte) error {
	if err := s.changeDisk(vmUUID, userdevice, off, data, int64(len(data))); err != nil {
		return fmt.Errorf("xapitest write disk %s/%s: %w", vmUUID, userdevice, err)
	}
	return nil
}

// DiscardDisk zeros n bytes of the live disk at off. The blocks count as
// written and stay allocated: VHD does not free on TRIM.
func (s *Server) DiscardDisk(vmUUID, userdevice string, off, n int64) error {
	if err := s.changeDisk(vmUUID, userdevice, off, nil, n); err != nil {
		return fmt.Errorf("xapitest discard disk %s/%s: %w", vmUUID, userdevice, err)
	}
	return nil
}

// changeDisk writes data (nil: n zero bytes) and logs the touched blocks.
func (s *Server) changeDisk(vmUUID, userdevice string, off int64, data []byte, n int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	d, err := s.liveDisk(vmUUID, userdevice)
	if err != nil {
		return err
	}
	if off < 0 || n < 0 || off+n > d.size {
		return fmt.Errorf("range %d+%d outside the disk (%d bytes)", off, n, d.size)
	}
	if n == 0 {
		return nil
	}
	f, err := os.OpenFile(d.path, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("open disk: %w", err)
	}
	if data == nil {
		data = make([]byte, n)
	}
	_, werr := f.WriteAt(data, off)
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		return fmt.Errorf("write disk: %w", werr)
	}
	lin := d.lin
	for b := off / cbtBlockSize; b <= (off+n-1)/cbtBlockSize; b++ {
		if e := lin.writes[b]; len(e) == 0 || e[len(e)-1] != lin.epoch {
			lin.writes[b] = append(e, lin.epoch)
		}
	}
	return nil
}

// TakeSnapshot snapshots the VM as VM.snapshot does and returns the
// snapshot VM's uuid.
func (s *Server) TakeSnapshot(vmUUID, name string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v := s.vmByUUID(vmUUID)
	if v == nil {
		return "", fmt.Errorf("xapitest take snapshot of %q: no such vm", vmUUID)
	}
	snap, xerr := s.snapshotVM(v, name)
	if xerr != nil {
		return "", fmt.Errorf("xapitest take snapshot of %q: %w", vmUUID, xerr)
	}
	return snap.uuid, nil
}

// Snapshots lists the VM's snapshot uuids, oldest first, of those whose
// disks still hold data (not destroyed, not data_destroyed).
func (s *Server) Snapshots(vmUUID string) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v := s.vmByUUID(vmUUID)
	if v == nil {
		return nil, fmt.Errorf("xapitest snapshots of %q: no such vm", vmUUID)
	}
	out := []string{}
	for _, e := range v.history {
		for _, d := range e.vdis {
			if !d.gone && d.path != "" {
				out = append(out, e.uuid)
				break
			}
		}
	}
	return out, nil
}

// SnapshotData is the path of a file with the snapshot disk's bytes
// (virtual_size long): the tests' reference.
func (s *Server) SnapshotData(snapshotUUID, userdevice string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, v := range s.vms {
		for _, e := range v.history {
			if e.uuid != snapshotUUID {
				continue
			}
			d := e.vdis[userdevice]
			if d == nil || d.gone || d.path == "" {
				return "", fmt.Errorf("xapitest snapshot data %s/%s: no data", snapshotUUID, userdevice)
			}
			return d.path, nil
		}
	}
	return "", fmt.Errorf("xapitest snapshot data %s/%s: no such snapshot", snapshotUUID, userdevice)
}

// EnableCBT enables changed block tracking on the VM's live disks behind
// the client's back.
func (s *Server) EnableCBT(vmUUID string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	v := s.vmByUUID(vmUUID)
	if v == nil || v.snapshot {
		return fmt.Errorf("xapitest enable cbt on %q: no such vm", vmUUID)
	}
	for _, d := range s.vmDisks(v) {
		d.vdi.lin.cbtOn = true
	}
	return nil
}

func (s *Server) vmByUUID(uuid string) *vm {
	for _, v := range s.vms {
		if v.uuid == uuid {
			return v
		}
	}
	return nil
}

// snapshotVM is VM.snapshot: a new VM with copies of the disks. The copy
// keeps holes (all-zero 64 KiB chunks are skipped) so files stay sparse.
func (s *Server) snapshotVM(v *vm, name string) (*vm, *xapiError) {
	if v.snapshot || v.template || v.control {
		return nil, xerr("OPERATION_NOT_ALLOWED", "VM is a snapshot, template or control domain: "+v.ref)
	}
	now := s.opts.Clock().UTC().Truncate(time.Second)
	snap := &vm{ref: newRef(), uuid: newUUID(), name: name, snapshot: true, snapshotOf: v.ref, snapTime: now, power: "Halted"}
	entry := &snapEntry{uuid: snap.uuid, vdis: map[string]*vdi{}}
	var made []*vdi
	for _, ref := range v.vbds {
		b := s.vbds[ref]
		if b.typ != "Disk" || s.vdis[b.vdi] == nil {
			s.attachVBD(snap, nil, b.userdevice, b.typ, b.mode, b.device)
			continue
		}
		live := s.vdis[b.vdi]
		d := &vdi{ref: newRef(), uuid: newUUID(), name: live.name, size: live.size, snapshot: true, snapshotOf: live.ref,
			snapTime: now, cbt: live.lin.cbtOn, typ: "user", lin: live.lin, epoch: live.lin.epoch, uid: newUID()}
		d.path = filepath.Join(s.opts.Dir, d.uuid+".raw")
		if err := copySparse(live.path, d.path, live.size); err != nil {
			for _, m := range made {
				_ = os.Remove(m.path)
				delete(s.vdis, m.ref)
			}
			s.log.Error("xapi simulator snapshot copy", "err", err)
			return nil, xerr("SR_BACKEND_FAILURE_82", "", "Failed to snapshot VDI", err.Error())
		}
		made = append(made, d)
		s.vdis[d.ref] = d
		s.attachVBD(snap, d, b.userdevice, b.typ, b.mode, b.device)
		entry.vdis[b.userdevice] = d
	}
	for _, d := range made {
		live := d.lin.live
		live.snapshots = append(live.snapshots, d.ref)
		d.lin.epoch++
	}
	s.vms[snap.ref] = snap
	v.snapshots = append(v.snapshots, snap.ref)
	v.history = append(v.history, entry)
	s.log.Debug("xapi simulator snapshot", "vm", v.uuid, "snapshot", snap.uuid)
	return snap, nil
}

func copySparse(src, dst string, size int64) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("open source: %w", err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("create copy: %w", err)
	}
	defer func() {
		if cerr := out.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("close copy: %w", cerr)
		}
		if err != nil {
			_ = os.Remove(dst)
		}
	}()
	if err := out.Truncate(size); err != nil {
		return fmt.Errorf("size copy: %w", err)
	}
	buf := make([]byte, cbtBlockSize)
	for off := int64(0); off < size; off += cbtBlockSize {
		n, err := in.ReadAt(buf, off)
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read source: %w", err)
		}
		if allZero(buf[:n]) {
			continue
		}
		if _, err := out.WriteAt(buf[:n], off); err != nil {
			return fmt.Errorf("write copy: %w", err)
		}
	}
	return nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// ---- JSON-RPC ----

// xapiError is a XenAPI failure: code and parameters.
type xapiError struct {
	code   string
	params []string
}

func (e *xapiError) Error() string { return e.code + " " + strings.Join(e.params, " ") }

func xerr(code string, params ...string) *xapiError {
	if params == nil {
		params = []string{}
	}
	return &xapiError{code: code, params: params}
}

type rpcRequest struct {
	JSONRPC string            `json:"jsonrpc"`
	Method  string            `json:"method"`
	Params  []json.RawMessage `json:"params"`
	ID      json.RawMessage   `json:"id"`
}

// nonFiniteMarker values are replaced by bare literals after encoding.
var nonFiniteMarkers = map[string]string{
	`"\u0000xapitest:Infinity"`:  "Infinity",
	`"\u0000xapitest:-Infinity"`: "-Infinity",
	`"\u0000xapitest:NaN"`:       "NaN",
}

func (s *Server) serveJSONRPC(h *host, w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || (mt != "application/json" && mt != "application/json-rpc") {
			http.Error(w, "expected Content-Type application/json", http.StatusBadRequest)
			return
		}
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 16<<20))
	if err != nil {
		http.Error(w, "read body", http.StatusBadRequest)
		return
	}
	var req rpcRequest
	if err := json.Unmarshal(body, &req); err != nil || req.Method == "" {
		// xapi fails to parse such a call before it has an id to answer.
		http.Error(w, "malformed JSON-RPC request", http.StatusBadRequest)
		return
	}
	id := req.ID
	if len(id) == 0 {
		id = json.RawMessage("null")
	}
	var result any
	var xe *xapiError
	if h.isMember {
		// A pool member refuses API calls and names the master.
		xe = xerr("HOST_IS_SLAVE", "127.0.0.1")
	} else {
		result, xe = s.dispatch(req.Method, req.Params)
	}
	var out map[string]any
	if xe != nil {
		s.log.Debug("xapi simulator call failed", "method", req.Method, "err", xe.Error())
		out = map[string]any{"jsonrpc": "2.0", "error": map[string]any{"code": 1, "message": xe.code, "data": xe.params}, "id": id}
	} else {
		out = map[string]any{"jsonrpc": "2.0", "result": result, "id": id}
	}
	b, err := json.Marshal(out)
	if err != nil {
		http.Error(w, "encode answer", http.StatusInternalServerError)
		return
	}
	if s.opts.NonFinite {
		for m, lit := range nonFiniteMarkers {
			b = bytes.ReplaceAll(b, []byte(m), []byte(lit))
		}
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(b)
}

type handler struct {
	nargs int  // including the session
	write bool // denied to the read-only role
	noCBT bool // missing on XenServer 7.1
	fn    func(sess *session, args []string) (any, *xapiError)
}

func (s *Server) handlers() map[string]handler {
	return map[string]handler{
		"session.logout":          {nargs: 1, fn: s.logout},
		"VM.get_all_records":      {nargs: 1, fn: func(*session, []string) (any, *xapiError) { return s.vmRecords(), nil }},
		"VBD.get_all_records":     {nargs: 1, fn: func(*session, []string) (any, *xapiError) { return s.vbdRecords(), nil }},
		"VDI.get_all_records":     {nargs: 1, fn: func(*session, []string) (any, *xapiError) { return s.vdiRecords(), nil }},
		"host.get_all_records":    {nargs: 1, fn: s.hostRecords},
		"network.get_all_records": {nargs: 1, fn: s.networkRecords},
		"pool.get_all_records":    {nargs: 1, fn: s.poolRecords},
		"VM.get_record":           {nargs: 2, fn: s.getRecord("VM")},
		"VBD.get_record":          {nargs: 2, fn: s.getRecord("VBD")},
		"VDI.get_record":          {nargs: 2, fn: s.getRecord("VDI")},
		"VM.get_by_uuid":          {nargs: 2, fn: s.getByUUID("VM")},
		"VBD.get_by_uuid":         {nargs: 2, fn: s.getByUUID("VBD")},
		"VDI.get_by_uuid":         {nargs: 2, fn: s.getByUUID("VDI")},
		"VM.snapshot":             {nargs: 3, write: true, fn: s.vmSnapshot},
		"VM.destroy":              {nargs: 2, write: true, fn: s.vmDestroy},
		"VDI.destroy":             {nargs: 2, write: true, fn: s.vdiDestroy},
		"VDI.data_destroy":        {nargs: 2, write: true, noCBT: true, fn: s.vdiDataDestroy},
		"VDI.enable_cbt":          {nargs: 2, write: true, noCBT: true, fn: s.vdiSetCBT(true)},
		"VDI.disable_cbt":         {nargs: 2, write: true, noCBT: true, fn: s.vdiSetCBT(false)},
		"VDI.list_changed_blocks": {nargs: 3, noCBT: true, fn: s.listChangedBlocks},
		"VDI.get_nbd_info":        {nargs: 2, fn: s.getNBDInfo},
	}
}

func (s *Server) dispatch(method string, raw []json.RawMessage) (any, *xapiError) {
	args := make([]string, len(raw))
	for i, p := range raw {
		var str string
		if err := json.Unmarshal(p, &str); err != nil {
			// Every call here takes strings (refs, names); xapi reports a
			// parameter of the wrong type as below.
			return nil, xerr("FIELD_TYPE_ERROR", fmt.Sprintf("param %d", i))
		}
		args[i] = str
	}
	if method == "session.login_with_password" {
		if len(args) < 2 || len(args) > 4 {
			return nil, xerr("MESSAGE_PARAMETER_COUNT_MISMATCH", method, "4", strconv.Itoa(len(args)))
		}
		return s.login(args)
	}
	h, ok := s.calls[method]
	if !ok || (h.noCBT && s.opts.NoCBT) {
		return nil, xerr("MESSAGE_METHOD_UNKNOWN", method)
	}
	if len(args) != h.nargs {
		return nil, xerr("MESSAGE_PARAMETER_COUNT_MISMATCH", method, strconv.Itoa(h.nargs), strconv.Itoa(len(args)))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sess := s.sessions[args[0]]
	if sess == nil {
		return nil, xerr("SESSION_INVALID", args[0])
	}
	if h.write && sess.readOnly {
		return nil, xerr("RBAC_PERMISSION_DENIED", strings.ToLower(method), "No permission in user session")
	}
	return h.fn(sess, args[1:])
}

func (s *Server) login(args []string) (any, *xapiError) {
	user, pw := args[0], args[1]
	originator := ""
	if len(args) == 4 {
		originator = args[3]
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	want, ok := s.opts.Users[user]
	if !ok || want != pw {
		return nil, xerr("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
	}
	// Over the per-user limit xapi destroys the oldest session of the user.
	var mine []*session
	for _, ss := range s.sessions {
		if ss.user == user {
			mine = append(mine, ss)
		}
	}
	slices.SortFunc(mine, func(a, b *session) int { return int(a.seq) - int(b.seq) })
	for len(mine) >= s.opts.SessionsPerUser {
		delete(s.sessions, mine[0].ref)
		mine = mine[1:]
	}
	s.sessSeq++
	ss := &session{ref: newRef(), user: user, originator: originator, seq: s.sessSeq, readOnly: slices.Contains(s.opts.ReadOnlyUsers, user)}
	s.sessions[ss.ref] = ss
	s.stats.Logins++
	s.log.Debug("xapi simulator login", "user", user, "originator", originator)
	return ss.ref, nil
}

func (s *Server) logout(sess *session, _ []string) (any, *xapiError) {
	delete(s.sessions, sess.ref)
	s.stats.Logouts++
	return "", nil
}

// ---- records ----

func xapiDate(t time.Time) string {
	if t.IsZero() {
		return nullDate
	}
	return t.UTC().Format("20060102T15:04:05Z")
}

func orNull(ref string) string {
	if ref == "" {
		return nullRef
	}
	return ref
}

func refs(l []string) []string {
	if l == nil {
		return []string{}
	}
	return l
}

func (s *Server) vmRecords() map[string]map[string]any {
	out := map[string]map[string]any{}
	for ref, v := range s.vms {
		out[ref] = s.vmRecord(v)
	}
	return out
}

func (s *Server) vmRecord(v *vm) map[string]any {
	r := map[string]any{
		"uuid": v.uuid, "name_label": v.name, "name_description": "",
		"is_a_template": v.template || v.snapshot, "is_default_template": v.template, "is_a_snapshot": v.snapshot,
		"is_control_domain": v.control, "snapshot_of": orNull(v.snapshotOf), "snapshots": refs(v.snapshots),
		"snapshot_time": xapiDate(v.snapTime), "VBDs": refs(v.vbds), "power_state": v.power,
		"resident_on": nullRef, "memory_static_max": int64(2 << 30), "VCPUs_max": 2,
		"other_config": map[string]string{}, "blocked_operations": map[string]string{},
	}
	if v.power == "Running" {
		r["resident_on"] = s.master.ref
	}
	if s.opts.NonFinite {
		r["memory_overhead_ratio"] = "\x00xapitest:Infinity"
		r["cpu_usage"] = "\x00xapitest:NaN"
		r["balloon_target_delta"] = "\x00xapitest:-Infinity"
	}
	return r
}

func (s *Server) vbdRecords() map[string]map[string]any {
	out := map[string]map[string]any{}
	for ref, b := range s.vbds {
		out[ref] = s.vbdRecord(b)
	}
	return out
}

func (s *Server) vbdRecord(b *vbd) map[string]any {
	v := s.vms[b.vm]
	return map[string]any{
		"uuid": b.uuid, "VM": b.vm, "VDI": b.vdi, "type": b.typ, "userdevice": b.userdevice, "mode": b.mode,
		"device": b.device, "bootable": b.userdevice == "0", "empty": b.vdi == nullRef,
		"currently_attached": v != nil && v.power == "Running", "other_config": map[string]string{},
	}
}

func (s *Server) vdiRecords() map[string]map[string]any {
	out := map[string]map[string]any{}
	for ref, d := range s.vdis {
		out[ref] = s.vdiRecord(d)
	}
	return out
}

func (s *Server) vdiRecord(d *vdi) map[string]any {
	// int64 fields go out as JSON numbers: xapi's JSON-RPC (ocaml-rpc,
	// Rpc.Int → an integer literal) unlike its XML-RPC, which sends strings.
	return map[string]any{
		"uuid": d.uuid, "name_label": d.name, "name_description": "", "virtual_size": d.size,
		"physical_utilisation": d.size, "is_a_snapshot": d.snapshot, "snapshot_of": orNull(d.snapshotOf),
		"snapshots": refs(d.snapshots), "snapshot_time": xapiDate(d.snapTime), "cbt_enabled": s.cbtOn(d),
		"type": d.typ, "SR": s.srRef, "VBDs": refs(d.vbds), "sm_config": map[string]string{},
		"read_only": false, "managed": true, "missing": false, "sharable": false, "other_config": map[string]string{},
	}
}

func (s *Server) cbtOn(d *vdi) bool {
	if d.snapshot {
		return d.cbt
	}
	return d.lin.cbtOn
}

func (s *Server) hostRecords(*session, []string) (any, *xapiError) {
	out := map[string]any{}
	for _, h := range []*host{s.master, s.member} {
		if h != nil {
			out[h.ref] = map[string]any{"uuid": h.uuid, "name_label": h.name, "hostname": h.name, "address": "127.0.0.1", "enabled": true}
		}
	}
	return out, nil
}

func (s *Server) networkRecords(*session, []string) (any, *xapiError) {
	out := map[string]any{
		s.mgmtNet: map[string]any{"uuid": "mgmt-" + s.srUUID, "name_label": "Pool-wide network associated with eth0", "bridge": "xenbr0", "purpose": []string{}},
	}
	switch s.opts.NBD {
	case NBDTLS:
		out[s.nbdNet] = map[string]any{"uuid": "nbd-" + s.srUUID, "name_label": "NBD", "bridge": "xenbr1", "purpose": []string{"nbd"}}
	case NBDInsecure:
		out[s.nbdNet] = map[string]any{"uuid": "nbd-" + s.srUUID, "name_label": "NBD", "bridge": "xenbr1", "purpose": []string{"insecure_nbd"}}
	}
	return out, nil
}

func (s *Server) poolRecords(*session, []string) (any, *xapiError) {
	return map[string]any{s.poolRef: map[string]any{"uuid": s.poolUUID, "name_label": "xapi-sim", "master": s.master.ref}}, nil
}

func (s *Server) getRecord(class string) func(*session, []string) (any, *xapiError) {
	return func(_ *session, a []string) (any, *xapiError) {
		switch class {
		case "VM":
			if v := s.vms[a[0]]; v != nil {
				return s.vmRecord(v), nil
			}
		case "VBD":
			if b := s.vbds[a[0]]; b != nil {
				return s.vbdRecord(b), nil
			}
		case "VDI":
			if d := s.vdis[a[0]]; d != nil {
				return s.vdiRecord(d), nil
			}
		}
		return nil, xerr("HANDLE_INVALID", class, a[0])
	}
}

func (s *Server) getByUUID(class string) func(*session, []string) (any, *xapiError) {
	return func(_ *session, a []string) (any, *xapiError) {
		switch class {
		case "VM":
			if v := s.vmByUUID(a[0]); v != nil {
				return v.ref, nil
			}
		case "VBD":
			for ref, b := range s.vbds {
				if b.uuid == a[0] {
					return ref, nil
				}
			}
		case "VDI":
			if d := s.vdiByRefOrUUID(a[0]); d != nil {
				return d.ref, nil
			}
		}
		return nil, xerr("UUID_INVALID", class, a[0])
	}
}

func (s *Server) vdiByRefOrUUID(id string) *vdi {
	if d := s.vdis[id]; d != nil {
		return d
	}
	for _, d := range s.vdis {
		if d.uuid == id {
			return d
		}
	}
	return nil
}

// ---- calls that change things ----

func (s *Server) vmSnapshot(_ *session, a []string) (any, *xapiError) {
	v := s.vms[a[0]]
	if v == nil {
		return nil, xerr("HANDLE_INVALID", "VM", a[0])
	}
	snap, xe := s.snapshotVM(v, a[1])
	if xe != nil {
		return nil, xe
	}
	return snap.ref, nil
}

// vmDestroy removes the VM and its VBDs but not its VDIs, as xapi does.
func (s *Server) vmDestroy(_ *session, a []string) (any, *xapiError) {
	v := s.vms[a[0]]
	if v == nil {
		return nil, xerr("HANDLE_INVALID", "VM", a[0])
	}
	if v.control || (v.template && !v.snapshot) {
		return nil, xerr("OPERATION_NOT_ALLOWED", "VM is a control domain or template: "+v.ref)
	}
	if !v.snapshot && v.power != "Halted" {
		return nil, xerr("VM_BAD_POWER_STATE", v.ref, "halted", strings.ToLower(v.power))
	}
	for _, ref := range v.vbds {
		b := s.vbds[ref]
		if d := s.vdis[b.vdi]; d != nil {
			d.vbds = slices.DeleteFunc(d.vbds, func(r string) bool { return r == ref })
		}
		delete(s.vbds, ref)
	}
	if parent := s.vms[v.snapshotOf]; parent != nil {
		parent.snapshots = slices.DeleteFunc(parent.snapshots, func(r string) bool { return r == v.ref })
	}
	delete(s.vms, v.ref)
	return "", nil
}

func (s *Server) vdiDestroy(_ *session, a []string) (any, *xapiError) {
	d := s.vdis[a[0]]
	if d == nil {
		return nil, xerr("HANDLE_INVALID", "VDI", a[0])
	}
	if d.attached > 0 {
		return nil, xerr("VDI_IN_USE", d.ref, "destroy")
	}
	for _, ref := range d.vbds {
		if b := s.vbds[ref]; b != nil {
			if v := s.vms[b.vm]; v != nil && v.power == "Running" {
				return nil, xerr("VDI_IN_USE", d.ref, "destroy")
			}
		}
	}
	// xapi destroys the VBDs still pointing at the VDI with it.
	for _, ref := range d.vbds {
		if b := s.vbds[ref]; b != nil {
			if v := s.vms[b.vm]; v != nil {
				v.vbds = slices.DeleteFunc(v.vbds, func(r string) bool { return r == ref })
			}
			delete(s.vbds, ref)
		}
	}
	if live := s.vdis[d.snapshotOf]; live != nil {
		live.snapshots = slices.DeleteFunc(live.snapshots, func(r string) bool { return r == d.ref })
	}
	if d.path != "" {
		_ = os.Remove(d.path)
		d.path = ""
	}
	d.gone = true
	delete(s.vdis, d.ref)
	return "", nil
}

func (s *Server) vdiDataDestroy(_ *session, a []string) (any, *xapiError) {
	d := s.vdis[a[0]]
	if d == nil {
		return nil, xerr("HANDLE_INVALID", "VDI", a[0])
	}
	if !d.snapshot {
		return nil, xerr("OPERATION_NOT_ALLOWED", "VDI is not a snapshot: "+d.ref)
	}
	if !d.cbt {
		return nil, xerr("VDI_NO_CBT_METADATA", d.ref)
	}
	if d.attached > 0 {
		return nil, xerr("VDI_IN_USE", d.ref, "data_destroy")
	}
	if d.path != "" {
		_ = os.Remove(d.path)
		d.path = ""
	}
	d.typ = "cbt_metadata"
	return "", nil
}

func (s *Server) vdiSetCBT(on bool) func(*session, []string) (any, *xapiError) {
	return func(_ *session, a []string) (any, *xapiError) {
		d := s.vdis[a[0]]
		if d == nil {
			return nil, xerr("HANDLE_INVALID", "VDI", a[0])
		}
		if d.snapshot {
			return nil, xerr("OPERATION_NOT_ALLOWED", "VDI is a snapshot: "+d.ref)
		}
		lin := d.lin
		if lin.cbtOn && !on {
			lin.cbtOffs = append(lin.cbtOffs, lin.epoch)
		}
		lin.cbtOn = on
		return "", nil
	}
}

// epochOf is the last write epoch the VDI holds; the live disk holds all.
func epochOf(d *vdi) int {
	if d.snapshot {
		return d.epoch
	}
	return d.lin.epoch
}

// changed says which 64 KiB blocks were written in epochs (lo, hi].
func (l *lineage) changed(lo, hi int) map[int64]bool {
	out := map[int64]bool{}
	for b, eps := range l.writes {
		for _, e := range eps {
			if e > lo && e <= hi {
				out[b] = true
				break
			}
		}
	}
	return out
}

// written says which 64 KiB blocks were ever written up to epoch hi.
func (l *lineage) written(hi int) map[int64]bool {
	return l.changed(-1, hi)
}

func (s *Server) listChangedBlocks(_ *session, a []string) (any, *xapiError) {
	s.stats.ChangedBlocksCalls++
	from, to := s.vdis[a[0]], s.vdis[a[1]]
	if from == nil {
		return nil, xerr("HANDLE_INVALID", "VDI", a[0])
	}
	if to == nil {
		return nil, xerr("HANDLE_INVALID", "VDI", a[1])
	}
	if to.attached > 0 {
		s.stats.ChangedWhileAttached++
		return nil, xerr("VDI_IN_USE", to.ref, "list_changed_blocks")
	}
	if from.lin != to.lin {
		// SM's error for VDIs that share no CBT log (cbtutil finds no path).
		return nil, xerr("SR_BACKEND_FAILURE_460", "", "Failed to calculate changed blocks for given VDIs. [opterr=Source and target VDI are unrelated]", "")
	}
	if !s.cbtOn(from) {
		return nil, xerr("VDI_NO_CBT_METADATA", from.ref)
	}
	if !s.cbtOn(to) {
		return nil, xerr("VDI_NO_CBT_METADATA", to.ref)
	}
	lo, hi := epochOf(from), epochOf(to)
	if lo > hi {
		lo, hi = hi, lo
	}
	for _, off := range from.lin.cbtOffs {
		if off > lo && off <= hi {
			return nil, xerr("VDI_NO_CBT_METADATA", from.ref)
		}
	}
	bits := (from.size + cbtBlockSize - 1) / cbtBlockSize
	bm := make([]byte, (bits+7)/8)
	for b := range from.lin.changed(lo, hi) {
		if b < bits {
			bm[b/8] |= 0x80 >> (b % 8)
		}
	}
	return base64.StdEncoding.EncodeToString(bm), nil
}

func (s *Server) getNBDInfo(sess *session, a []string) (any, *xapiError) {
	d := s.vdis[a[0]]
	if d == nil {
		return nil, xerr("HANDLE_INVALID", "VDI", a[0])
	}
	if d.typ != "user" {
		return nil, xerr("VDI_INCOMPATIBLE_TYPE", d.ref, d.typ)
	}
	if s.nbd == nil {
		return []any{}, nil
	}
	addr, port := s.nbdEndpoint()
	p, _ := strconv.Atoi(port)
	return []any{map[string]any{
		"exportname": "/" + d.uuid + "?session_id=" + sess.ref,
		"address":    addr,
		"port":       p,
		"cert":       s.nbdCertPEM,
		"subject":    nbdSubject,
	}}, nil
}

// nbdLookup resolves an NBD export name "/<vdi-uuid>?session_id=<ref>":
// the session must be live and the VDI hold data. The VDI counts as
// attached (VDI_IN_USE for destroy and list_changed_blocks) until release.
func (s *Server) nbdLookup(export string) (io.ReaderAt, int64, func(), error) {
	path, query, _ := strings.Cut(export, "?")
	uuid := strings.TrimPrefix(path, "/")
	var ref string
	for _, kv := range strings.Split(query, "&") {
		if k, v, ok := strings.Cut(kv, "="); ok && k == "session_id" {
			ref = v
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sessions[ref] == nil {
		return nil, 0, nil, fmt.Errorf("export %q: session invalid", uuid)
	}
	var d *vdi
	for _, c := range s.vdis {
		if c.uuid == uuid {
			d = c
		}
	}
	if d == nil || d.typ != "user" || d.path == "" {
		return nil, 0, nil, fmt.Errorf("export %q: no such VDI with data", uuid)
	}
	f, err := os.Open(d.path)
	if err != nil {
		return nil, 0, nil, fmt.Errorf("export %q: %w", uuid, err)
	}
	d.attached++
	var once sync.Once
	release := func() {
		once.Do(func() {
			s.mu.Lock()
			d.attached--
			s.mu.Unlock()
			_ = f.Close()
		})
	}
	return f, d.size, release, nil
}

// ---- ids ----

func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

func newRef() string { return "OpaqueRef:" + newUUID() }

func newUID() [16]byte {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return b
}
