// Package coriolis is a backend.Source for the Coriolis OVM exporter
// (see specs/coriolis.md): VMs, reflink snapshots with chunk maps, and
// Range reads of snapshot disks.
package coriolis

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
	"github.com/vmexportfs/vmexportfs/backend/redact"
)

// Config says where the exporter is and how to log in.
type Config struct {
	URL                string // https://host:5544 (the "coriolis+" scheme prefix is stripped by the command)
	Username           string
	Password           string         // never logged, never in an error
	RootCAs            *x509.CertPool // nil: system pool. TLS is always verified unless InsecureSkipVerify
	InsecureSkipVerify bool
	Policy             httprange.Policy
	Logger             *slog.Logger
	HTTP               *http.Client    // optional override (tests); otherwise built from RootCAs
	Secrets            *redact.Secrets // the password and every token issued are added to it
}

// listKeep is how many extents the snapshot listings' answers may hold for
// the disks opened next, all together (keepPool): 16 MiB, a million
// extents. A walk of an estate of fragmented disks then opens each disk with
// its HEAD alone, where a listing dropped the chunks and each disk cost a GET
// of its snapshot too (2.2 requests per snapshot instead of 1.2 at five
// snapshots a VM); the listing of a VM whose snapshots hold millions of
// extents keeps as many as that and drops the rest.
const listKeep = 1 << 20

// snapshotCacheTTL is how long one snapshot answer serves OpenDisk calls, so
// opening every disk of a snapshot costs one GET. Snapshots are immutable, so
// the only risk is serving a deleted one briefly, which reads then report.
// An answer that took long to come (a listing of million-extent snapshots:
// seconds) serves for snapshotCacheSpan times as long, so that the disks
// opened after it still find it.
const (
	snapshotCacheTTL  = 10 * time.Second
	snapshotCacheSpan = 4
)

// Client talks to one Coriolis OVM exporter.
type Client struct {
	base   *url.URL
	http   *httprange.Client
	probe  *httprange.Client // c.http with fewer attempts, for sizing answers
	auth   *httprange.TokenAuth
	logger *slog.Logger

	mu    sync.Mutex
	cache map[[2]string]cachedSnapshot
	// keep bounds the extents the cache holds from listings.
	keep *keepPool
	// snapFlight shares one GET of a snapshot between the disks opened
	// at once (a walk opens every disk of a snapshot together).
	snapFlight singleflight.Group
	// sizes and maps are the disks' sizes and allocation maps, kept for
	// the mount: snapshots are immutable.
	sizes sizeCache
	maps  mapCache
	// listed is the last VM listing, by id, and when it was fetched: a
	// snapshot listing soon after takes its VM's snapshot order from it
	// instead of asking for the VM again.
	listed   map[string]apiVM
	listedAt time.Time
	// clipLogged holds the disks whose chunk map ran past the end of the
	// disk (FIEMAP's last whole block) and was clipped: logged once each.
	clipLogged sync.Map
}

type cachedSnapshot struct {
	snap    apiSnapshot
	fetched time.Time
	ttl     time.Duration
	// held is what its lists (a listing's) took from the keep pool, per
	// disk not opened yet.
	held map[string]int64
}

var (
	_ backend.Source          = (*Client)(nil)
	_ backend.SnapshotCreator = (*Client)(nil)
	_ backend.SnapshotDeleter = (*Client)(nil)
	_ backend.DeltaOpener     = (*Client)(nil)
	_ backend.CheapOpener     = (*Client)(nil)
)

// New builds a client and logs in once, so bad credentials fail here.
func New(ctx context.Context, cfg Config) (*Client, error) {
	base, err := url.Parse(strings.TrimRight(cfg.URL, "/"))
	if err == nil && base.Scheme == "http" {
		return nil, fmt.Errorf("coriolis: %w: URL %s: plain http would send the password in cleartext; use https", backend.ErrInvalid, base.Redacted())
	}
	if err != nil || base.Host == "" || base.Scheme != "https" || base.RawQuery != "" || base.User != nil {
		return nil, fmt.Errorf("coriolis: %w: URL must be https://host:port", backend.ErrInvalid)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	hc := cfg.HTTP
	if hc == nil {
		tr := httprange.NewTransport(&tls.Config{RootCAs: cfg.RootCAs, InsecureSkipVerify: cfg.InsecureSkipVerify, MinVersion: tls.VersionTLS12}, cfg.Policy.Meter)
		hc = &http.Client{Transport: tr}
	}
	hc = withNotFound(hc)
	if cfg.InsecureSkipVerify {
		logger.Warn("coriolis: TLS certificate verification disabled", "url", base.Redacted())
	}
	c := &Client{base: base, logger: logger, cache: map[[2]string]cachedSnapshot{}, keep: newKeepPool(listKeep)}
	secrets := cfg.Secrets
	if secrets == nil {
		secrets = &redact.Secrets{}
	}
	secrets.Add(cfg.Password)
	login := &authorizer{
		login:   &httprange.Client{HTTP: hc, Policy: cfg.Policy, Logger: logger, Secrets: secrets},
		url:     c.route("auth", "login"),
		user:    cfg.Username,
		pass:    cfg.Password,
		logger:  logger,
		secrets: secrets,
	}
	c.auth = &httprange.TokenAuth{Login: login.Login}
	c.http = &httprange.Client{HTTP: hc, Auth: c.auth, Policy: cfg.Policy, Logger: logger, Secrets: secrets}
	// Sizing the disks an answer may describe tries twice: a pair the VM
	// names that is gone (a snapshot deleted since its listing) answers
	// HEAD with a bare 500, which retrying the mount's attempts over would
	// only delay the answer being read.
	probe := cfg.Policy
	probe.Attempts = min(probe.WithDefaults().Attempts, 2)
	c.probe = &httprange.Client{HTTP: hc, Auth: c.auth, Policy: probe, Logger: logger, Secrets: secrets}
	if err := c.auth.Renew(ctx); err != nil {
		return nil, err
	}
	// The login proved the credentials: later 401s are a server hiccup
	// (retried, then EIO), not a refusal.
	c.http.CredentialsAccepted()
	c.probe.CredentialsAccepted()
	return c, nil
}

// Close lets an unmounted client go without leaving kept-alive connections
// (and their goroutines) behind. The exporter has no logout: a JWT simply
// expires.
func (c *Client) Close() error {
	if c.http.HTTP != nil {
		c.http.HTTP.CloseIdleConnections()
	}
	return nil
}

// route builds /api/v1/<segments...>, escaping each segment so hostile ids
// cannot change the path.
func (c *Client) route(segments ...string) string {
	esc := make([]string, len(segments))
	for i, s := range segments {
		esc[i] = url.PathEscape(s)
	}
	return c.base.String() + "/api/v1/" + strings.Join(esc, "/")
}

// call decodes the answer of method url into v (when v is not nil).
func (c *Client) call(ctx context.Context, method, u string, v any) error {
	return c.callSized(ctx, method, u, v, nil, nil)
}

// callSized is call for an answer about snapshots, bounded by the sizes of
// the disks sz finds (see budget.go); what a listing keeps of its chunk
// lists is taken from pool.
func (c *Client) callSized(ctx context.Context, method, u string, v any, sz *sizer, pool *keepPool) error {
	return c.callSizedKeep(ctx, method, u, v, sz, pool, nil)
}

// callSizedKeep is callSized for a listing that keeps no chunks of the
// snapshots skip says.
func (c *Client) callSizedKeep(ctx context.Context, method, u string, v any, sz *sizer, pool *keepPool, skip func(sid string) bool) error {
	resp, err := c.http.Do(ctx, func(ctx context.Context) (*http.Request, error) {
		req, err := http.NewRequestWithContext(ctx, method, u, nil)
		if err == nil {
			req.Header.Set("Accept", "application/json")
		}
		return req, err
	})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if v == nil {
		return nil
	}
	if err := decodeAnswer(resp.Body, v, sz, pool, skip); err != nil {
		return fmt.Errorf("%s %s: %w", method, u, err)
	}
	return nil
}

// decodeJSON reads one JSON value, bounded as an answer that names no disk
// it could size (budget.go); trailing data is malformed.
func decodeJSON(r io.Reader, v any) error { return decodeAnswer(r, v, nil, nil, nil) }

// decodeAnswer reads one JSON value, bounded by budget.go's rules with the
// disks sz sizes, a listing keeping what pool lets of the chunks of the
// snapshots skip does not name; trailing data or an oversize body is
// malformed. Snapshots
// and VMs are decoded as a stream (decode.go), so the body of a
// million-chunk answer is never held.
func decodeAnswer(r io.Reader, v any, sz *sizer, pool *keepPool, skip func(sid string) bool) error {
	body := newBudget(r, sz)
	d := &decoder{Decoder: json.NewDecoder(body), b: body, pool: pool, keepNone: skip}
	var err error
	switch v := v.(type) {
	case *apiSnapshot:
		err = d.snapshot(v, chunksKeep)
	case *createdSnapshot:
		err = d.snapshot(&v.apiSnapshot, chunksSkip)
	case *[]apiSnapshot:
		err = d.snapshots(v)
	case vmSink:
		err = d.vms(v)
	case *apiVM:
		err = d.vm(v)
	case *unsquashedSnapshot:
		err = d.snapshot(&v.apiSnapshot, chunksPhys)
	default:
		err = d.Decode(v)
	}
	if err == nil {
		// d.More is false at a closing ']' or '}' too: only the end of
		// the body ends the answer.
		if _, terr := d.Token(); !errors.Is(terr, io.EOF) {
			err = errTrailing
		}
	}
	if snaps, ok := v.(*[]apiSnapshot); ok && (err != nil || body.err != nil && !errors.Is(body.err, io.EOF)) {
		for i := range *snaps {
			d.release((*snaps)[i].Disks)
		}
	}
	var cut *tooLarge
	switch {
	case errors.As(body.err, &cut), errors.As(err, &cut):
		return fmt.Errorf("%w: %s", backend.ErrUnavailable, cut.msg)
	case body.err != nil && !errors.Is(body.err, io.EOF):
		return fmt.Errorf("%w: read answer: %w", backend.ErrUnavailable, body.err)
	case err != nil:
		return fmt.Errorf("%w: malformed JSON answer: %w", backend.ErrUnavailable, err)
	}
	return nil
}

// createdSnapshot is a creation's answer: its ids and disk names are kept,
// its (unsquashed) chunks only counted.
type createdSnapshot struct{ apiSnapshot }

// diskNames are the names of v's disks.
func diskNames(v apiVM) []string {
	out := make([]string, 0, len(v.Disks))
	for _, d := range v.Disks {
		out = append(out, d.Name)
	}
	return out
}

// VMs lists the exporter's VMs.
func (c *Client) VMs(ctx context.Context) ([]backend.VM, error) {
	// Sized as the last listing was: a refresh of 100,000 VMs then grows
	// neither by doubling.
	c.mu.Lock()
	hint := len(c.listed)
	c.mu.Unlock()
	out := make([]backend.VM, 0, hint)
	byID := make(map[string]apiVM, hint)
	sink := vmSink(func(v apiVM) {
		out = append(out, v.toBackend())
		byID[v.Name] = v.ordering()
	})
	if err := c.call(ctx, http.MethodGet, c.route("vms"), sink); err != nil {
		return nil, fmt.Errorf("coriolis: list VMs: %w", err)
	}
	c.mu.Lock()
	c.listed, c.listedAt = byID, time.Now()
	c.mu.Unlock()
	return out, nil
}

// listedVMReuse is how long the VM listing answers for a VM's snapshot
// order. Snapshots are ordered by the VM's list of ids; one made since the
// listing is not in it and goes last, which is where the newest belongs,
// and one deleted since is simply not in the snapshot list: an old listing
// orders as well as a new one. It must outlast the filesystem's spacing of
// VM listing refreshes during a walk (half a minute at 100,000 VMs), or
// every snapshot listing costs a VM GET too.
const listedVMReuse = 10 * time.Minute

// listedVM is vmID as the last VM listing had it (its snapshot order and
// its disks' devices), if that is recent.
func (c *Client) listedVM(vmID string) (apiVM, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.listed[vmID]
	return v, ok && time.Since(c.listedAt) < listedVMReuse
}

func (c *Client) vm(ctx context.Context, vmID string) (apiVM, error) {
	var v apiVM
	if err := c.call(ctx, http.MethodGet, c.route("vms", vmID), &v); err != nil {
		return apiVM{}, fmt.Errorf("coriolis: get VM: %w", err)
	}
	return v, nil
}

// Snapshots lists a VM's snapshots oldest first (the VM's own snapshot id
// order; any it does not list go last).
func (c *Client) Snapshots(ctx context.Context, vmID string) ([]backend.Snapshot, error) {
	v, ok := c.listedVM(vmID)
	if !ok {
		var err error
		if v, err = c.vm(ctx, vmID); err != nil {
			return nil, err
		}
	}
	var snaps []apiSnapshot
	sz := c.newSizer(ctx, vmID, v.Snapshots, diskNames(v))
	start := time.Now()
	// A snapshot whose disks are all opened already (their maps kept: a
	// listing refreshed during a copy) keeps none of its chunks.
	disks := diskNames(v)
	opened := func(sid string) bool {
		for _, d := range disks {
			if !c.maps.has(backend.DiskRef{VM: vmID, Snapshot: sid, Disk: d}) {
				return false
			}
		}
		return len(disks) > 0
	}
	if err := c.callSizedKeep(ctx, http.MethodGet, c.route("vms", vmID, "snapshots"), &snaps, sz, c.keep, opened); err != nil {
		return nil, fmt.Errorf("coriolis: list snapshots: %w", err)
	}
	// The listing carries each snapshot's chunks: the disks opened next
	// need not ask for the snapshot again, unless their lists were more
	// than the keep pool held (decoder.snapshots).
	took := time.Since(start)
	for _, s := range snaps {
		c.remember(vmID, s, took)
	}
	return orderSnapshots(v, snaps), nil
}

func orderSnapshots(v apiVM, snaps []apiSnapshot) []backend.Snapshot {
	rank := make(map[string]int, len(v.Snapshots))
	for i, id := range v.Snapshots {
		if _, dup := rank[id]; !dup {
			rank[id] = i
		}
	}
	var listed, unlisted []backend.Snapshot
	ordered := make([][]backend.Snapshot, len(v.Snapshots))
	for _, s := range snaps {
		bs := s.toBackend(v)
		if i, ok := rank[s.ID]; ok {
			ordered[i] = append(ordered[i], bs)
		} else {
			unlisted = append(unlisted, bs)
		}
	}
	for _, group := range ordered {
		listed = append(listed, group...)
	}
	return append(listed, unlisted...)
}

// CreateSnapshot takes a snapshot; name is ignored (Coriolis generates ids).
func (c *Client) CreateSnapshot(ctx context.Context, vmID, _ string) (backend.Snapshot, error) {
	var s createdSnapshot
	vm, _ := c.listedVM(vmID)
	sz := c.newSizer(ctx, vmID, nil, diskNames(vm))
	if err := c.callSized(ctx, http.MethodPost, c.route("vms", vmID, "snapshots"), &s, sz, nil); err != nil {
		if errors.Is(err, backend.ErrInvalid) {
			// The exporter refused this VM (mkdir carries no argument it
			// could object to): say why, and make it "Operation not
			// supported" when the VM cannot be reflink-cloned (a CD-ROM
			// image typed as not a virtual disk), which is what it is.
			c.logger.Warn("coriolis: the exporter refused to snapshot the VM", "vm", vmID, "reason", err.Error())
			if strings.Contains(strings.ToLower(err.Error()), "does not support reflink cloning") {
				return backend.Snapshot{}, fmt.Errorf("coriolis: create snapshot: %w: the exporter cannot snapshot this VM: %v", backend.ErrUnsupported, err)
			}
		}
		return backend.Snapshot{}, fmt.Errorf("coriolis: create snapshot: %w", err)
	}
	if s.ID == "" {
		return backend.Snapshot{}, fmt.Errorf("coriolis: create snapshot: %w: answer has no id", backend.ErrUnavailable)
	}
	v, err := c.vm(ctx, vmID)
	if err != nil {
		// The snapshot exists; devices fall back to disk names.
		c.logger.Warn("coriolis: cannot read VM after snapshot", "err", err)
	}
	return s.toBackend(v), nil
}

// DeleteSnapshot deletes one snapshot.
func (c *Client) DeleteSnapshot(ctx context.Context, vmID, snapshotID string) error {
	// The exporter answers a DELETE of an unknown id with success: ask
	// first, so a snapshot that is not the VM's is ErrNotFound.
	if _, err := c.snapshot(ctx, vmID, snapshotID, ""); err != nil {
		return fmt.Errorf("coriolis: delete snapshot: %w", err)
	}
	if err := c.call(ctx, http.MethodDelete, c.route("vms", vmID, "snapshots", snapshotID), nil); err != nil {
		return fmt.Errorf("coriolis: delete snapshot: %w", err)
	}
	c.mu.Lock()
	c.dropLocked([2]string{vmID, snapshotID})
	c.mu.Unlock()
	c.sizes.forget(vmID, snapshotID)
	c.maps.forget(vmID, snapshotID)
	return nil
}

func (c *Client) snapshotURL(vmID, sid, compareTo string) string {
	q := url.Values{"squashChunks": {"true"}}
	if compareTo != "" {
		q.Set("compareTo", compareTo)
	}
	return c.route("vms", vmID, "snapshots", sid) + "?" + q.Encode()
}

// snapshot is snapshot sid of vmID, from the cache when an answer there
// holds disk's chunks (disk "": any answer), else from a GET shared by every
// caller asking at once. Taking a disk's chunks from a listing's answer
// gives back to the keep pool what they held: the disk's map has them now.
func (c *Client) snapshot(ctx context.Context, vmID, sid, disk string) (apiSnapshot, error) {
	key := [2]string{vmID, sid}
	c.mu.Lock()
	cs, ok := c.cache[key]
	if ok && time.Since(cs.fetched) < cs.ttl {
		if d, has := cs.snap.disk(disk); disk == "" || !has || !d.Chunks.dropped {
			if disk != "" {
				c.keep.give(cs.held[disk])
				delete(cs.held, disk)
			}
			c.mu.Unlock()
			return cs.snap, nil
		}
	}
	c.mu.Unlock()
	// Detached: one caller giving up does not fail the others.
	gctx := context.WithoutCancel(ctx)
	ch := c.snapFlight.DoChan(vmID+"\x00"+sid, func() (any, error) {
		var s apiSnapshot
		vm, _ := c.listedVM(vmID)
		sz := c.newSizer(gctx, vmID, []string{sid}, append(diskNames(vm), disk))
		start := time.Now()
		if err := c.callSized(gctx, http.MethodGet, c.snapshotURL(vmID, sid, ""), &s, sz, nil); err != nil {
			return nil, fmt.Errorf("coriolis: get snapshot: %w", notThisVM(err))
		}
		c.remember(vmID, s, time.Since(start))
		return s, nil
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return apiSnapshot{}, r.Err
		}
		return r.Val.(apiSnapshot), nil
	case <-ctx.Done():
		return apiSnapshot{}, fmt.Errorf("coriolis: get snapshot: %w", ctx.Err())
	}
}

// remember keeps a snapshot answer that took took to fetch for
// snapshotCacheTTL (or snapshotCacheSpan times took), with what its lists
// took from the keep pool.
func (c *Client) remember(vmID string, s apiSnapshot, took time.Duration) {
	held := map[string]int64{}
	for _, d := range s.Disks {
		if d.Chunks.pooled > 0 {
			held[d.Name] += d.Chunks.pooled
		}
	}
	if s.ID == "" {
		for _, n := range held {
			c.keep.give(n)
		}
		return
	}
	key := [2]string{vmID, s.ID}
	c.mu.Lock()
	if old, ok := c.cache[key]; ok && time.Since(old.fetched) < old.ttl && droppedLists(old.snap) < droppedLists(s) {
		// A listing that kept less than the answer cached (a GET's, whole)
		// does not replace it: the disks opened next would GET it again.
		c.mu.Unlock()
		for _, n := range held {
			c.keep.give(n)
		}
		return
	}
	fetched := time.Now()
	ttl := max(snapshotCacheTTL, snapshotCacheSpan*took)
	c.dropLocked(key)
	c.cache[key] = cachedSnapshot{snap: s, fetched: fetched, ttl: ttl, held: held}
	c.mu.Unlock()
	// The answer holds every disk's chunks (16 bytes each, 16 MB for a
	// million): drop it when it expires, not at the next snapshot GET,
	// which may never come. A timer per entry, not a sweep per call: a
	// walk remembers every snapshot of 100,000 VMs.
	time.AfterFunc(ttl, func() {
		c.mu.Lock()
		if cs, ok := c.cache[key]; ok && cs.fetched.Equal(fetched) {
			c.dropLocked(key)
		}
		c.mu.Unlock()
	})
}

// droppedLists counts the disks of s whose chunks were not kept.
func droppedLists(s apiSnapshot) int {
	n := 0
	for _, d := range s.Disks {
		if d.Chunks.dropped {
			n++
		}
	}
	return n
}

// dropLocked forgets a cached answer, giving back what it held of the keep
// pool; c.mu is held.
func (c *Client) dropLocked(key [2]string) {
	if cs, ok := c.cache[key]; ok {
		for _, n := range cs.held {
			c.keep.give(n)
		}
		delete(c.cache, key)
	}
}

// OpenDisk opens one snapshot disk: its size from HEAD and its allocation
// from the snapshot's chunks.
func (c *Client) OpenDisk(ctx context.Context, ref backend.DiskRef) (backend.Disk, error) {
	u := c.diskURL(ref)
	size, alloc, err := c.diskMap(ctx, ref)
	if err != nil {
		return nil, err
	}
	// Reads are independent Range requests: the disk holds nothing on the
	// server.
	return c.http.Disk(u, size, alloc, httprange.DiskOptions{Name: "coriolis: disk " + ref.Disk, MultipleRanges: true}), nil
}

// diskMap is a disk's size and allocation map: kept from its last opening,
// or from its snapshot's chunks (a listing's, or a GET of it) and a HEAD.
func (c *Client) diskMap(ctx context.Context, ref backend.DiskRef) (int64, extent.Map, error) {
	if m, ok := c.maps.get(ref); ok {
		if size, ok := c.sizes.get(ref); ok {
			return size, m, nil
		}
	}
	// The snapshot first: an unknown one is a 500 "not found" (or a 409
	// under another VM), which only a GET's body says. When its answer is
	// large enough to need sizes, its budget's HEAD of this disk is the one
	// diskSize finds kept.
	s, err := c.snapshot(ctx, ref.VM, ref.Snapshot, ref.Disk)
	if err != nil {
		return 0, extent.Map{}, err
	}
	ds, ok := s.disk(ref.Disk)
	if !ok {
		return 0, extent.Map{}, fmt.Errorf("coriolis: open disk: %w: snapshot has no disk %q", backend.ErrNotFound, ref.Disk)
	}
	size, err := c.diskSize(ctx, ref)
	if err != nil {
		return 0, extent.Map{}, fmt.Errorf("coriolis: open disk: %w", err)
	}
	alloc, rep, clipped, err := chunkMapClipped(ds.Chunks, size)
	if clipped > 0 && err == nil {
		c.logClipped(ref, clipped, size)
	}
	if err != nil {
		// Reading everything is always correct; a wrong map is not.
		c.logger.Warn("coriolis: untrusted chunk map, reading the whole disk", "vm", ref.VM, "snapshot", ref.Snapshot, "disk", ref.Disk, "reason", err.Error())
		alloc = extent.Full(size)
	} else if rep.Suspicious() {
		// Adjacent chunks (FIEMAP splits) are merged silently: routine.
		c.logger.Warn(fmt.Sprintf("coriolis: chunk map normalized: %d unsorted/overlapping extents", rep.Unsorted+rep.Overlapping),
			"vm", ref.VM, "snapshot", ref.Snapshot, "disk", ref.Disk, "unsorted", rep.Unsorted, "overlapping", rep.Overlapping, "extents", alloc.Len())
	}
	c.maps.put(ref, alloc)
	return size, alloc, nil
}

// CheapOpen implements backend.CheapOpener: a disk is a HEAD and the chunk
// map its snapshot's listing already brought; reads are independent Range
// requests, so an open disk holds nothing on the exporter.
func (c *Client) CheapOpen() bool { return true }

// logClipped says once per disk that its chunk map ran past the disk's end.
func (c *Client) logClipped(ref backend.DiskRef, n int, size int64) {
	if _, dup := c.clipLogged.LoadOrStore(ref, true); dup {
		return
	}
	c.logger.Info("coriolis: chunk map runs past the end of the disk (FIEMAP's whole last block), clipped to its size",
		"vm", ref.VM, "snapshot", ref.Snapshot, "disk", ref.Disk, "extents", n, "size", size)
}

// OpenDelta opens ref's disk with the extents changed since base (the same
// disk name in an older snapshot). The changes are computed exactly from the
// two unsquashed chunk maps (exactChanges); the exporter's compareTo, which
// reports every extent split by copy-on-write whole, is used only when a map
// has no physical starts or cannot be compared.
func (c *Client) OpenDelta(ctx context.Context, ref, base backend.DiskRef) (backend.Disk, extent.Map, error) {
	d, err := c.OpenDisk(ctx, ref)
	if err != nil {
		return nil, extent.Map{}, err
	}
	changed, err := c.exactChanges(ctx, ref, base, d.Size())
	if errors.Is(err, errNoPhysical) {
		c.logger.Debug("coriolis: exact changes unavailable, using compareTo", "vm", ref.VM, "snapshot", ref.Snapshot, "base", base.Snapshot, "disk", ref.Disk, "reason", err.Error())
		changed, err = c.changedSince(ctx, ref, base, d.Size(), d.Allocated())
	}
	if err != nil {
		d.Close()
		return nil, extent.Map{}, err
	}
	return d, changed, nil
}

// errNoPhysical: the unsquashed maps cannot say what changed (no physical
// starts, or extents that overlap), so compareTo has to.
var errNoPhysical = errors.New("no usable physical starts")

// unsquashedSnapshot is a snapshot answer decoded with each chunk's
// physical_start (decodeJSON keeps them only for this type).
type unsquashedSnapshot struct{ apiSnapshot }

func (c *Client) unsquashedURL(vmID, sid string) string {
	return c.route("vms", vmID, "snapshots", sid) + "?" + url.Values{"squashChunks": {"false"}}.Encode()
}

// physExtent is one chunk with its physical start.
type physExtent struct{ off, len, phys int64 }

// physChunks is a disk's unsquashed chunks with their physical starts,
// clipped to size and sorted, or errNoPhysical.
func physChunks(l chunkList, size int64) ([]physExtent, error) {
	if l.bad != nil {
		return nil, fmt.Errorf("%w: %w", backend.ErrUnavailable, l.bad)
	}
	if l.phys == nil || len(l.phys) != len(l.exts) {
		return nil, fmt.Errorf("%w: the answer has no physical_start", errNoPhysical)
	}
	out := make([]physExtent, 0, len(l.exts))
	for i, e := range l.exts {
		if e.Off < 0 || e.Len < 0 || e.Off > math.MaxInt64-e.Len || l.phys[i] > math.MaxInt64-e.Len {
			return nil, fmt.Errorf("%w: %w: offset %d length %d physical %d", backend.ErrUnavailable, errHostile, e.Off, e.Len, l.phys[i])
		}
		if e.End() > size { // FIEMAP's whole last block
			e.Len = max(0, size-e.Off)
		}
		if e.Len > 0 {
			out = append(out, physExtent{e.Off, e.Len, l.phys[i]})
		}
	}
	slices.SortFunc(out, func(a, b physExtent) int { return cmp.Compare(a.off, b.off) })
	for i := 1; i < len(out); i++ {
		if out[i].off < out[i-1].off+out[i-1].len {
			return nil, fmt.Errorf("%w: overlapping chunks at %d", errNoPhysical, out[i].off)
		}
	}
	return out, nil
}

// exactChanges computes the extents of ref changed since base from both
// disks' unsquashed chunk maps: a byte whose physical location is the same in
// both (reflink sharing) is unchanged; every other byte allocated in either
// changed (rewritten, written, or discarded: it reads as zeros now).
func (c *Client) exactChanges(ctx context.Context, ref, base backend.DiskRef, size int64) (extent.Map, error) {
	fetch := func(r backend.DiskRef) ([]physExtent, bool, error) {
		var s unsquashedSnapshot
		vm, _ := c.listedVM(r.VM)
		sz := c.newSizer(ctx, r.VM, []string{r.Snapshot}, append(diskNames(vm), r.Disk))
		if err := c.callSized(ctx, http.MethodGet, c.unsquashedURL(r.VM, r.Snapshot), &s, sz, nil); err != nil {
			return nil, false, fmt.Errorf("coriolis: changes since %q: %w", base.Snapshot, notThisVM(err))
		}
		ds, ok := s.disk(r.Disk)
		if !ok {
			return nil, false, nil
		}
		pe, err := physChunks(ds.Chunks, size)
		if err != nil {
			return nil, true, fmt.Errorf("coriolis: changes since %q: snapshot %q disk %q: %w", base.Snapshot, r.Snapshot, r.Disk, err)
		}
		return pe, true, nil
	}
	// The base first: an unknown base is ErrNotFound before anything else.
	// A base without this disk: everything allocated now changed.
	old, _, err := fetch(base)
	if err != nil {
		return extent.Map{}, err
	}
	cur, haveCur, err := fetch(ref)
	if err != nil {
		return extent.Map{}, err
	}
	if !haveCur {
		return extent.Map{}, fmt.Errorf("coriolis: changes since %q: %w: answer has no disk %q", base.Snapshot, backend.ErrUnavailable, ref.Disk)
	}
	return physDiff(cur, old, size)
}

// physDiff is (cur ∪ old) minus the ranges mapped to the same physical bytes
// in both; cur and old are sorted and non-overlapping.
func physDiff(cur, old []physExtent, size int64) (extent.Map, error) {
	all := make([]extent.Extent, 0, len(cur)+len(old))
	for _, e := range cur {
		all = append(all, extent.Extent{Off: e.off, Len: e.len})
	}
	for _, e := range old {
		all = append(all, extent.Extent{Off: e.off, Len: e.len})
	}
	var same []extent.Extent
	for i, j := 0, 0; i < len(cur) && j < len(old); {
		a, b := cur[i], old[j]
		lo, hi := max(a.off, b.off), min(a.off+a.len, b.off+b.len)
		if lo < hi && a.phys-a.off == b.phys-b.off {
			if n := len(same); n > 0 && same[n-1].End() == lo {
				same[n-1].Len += hi - lo
			} else {
				same = append(same, extent.Extent{Off: lo, Len: hi - lo})
			}
		}
		if a.off+a.len <= b.off+b.len {
			i++
		} else {
			j++
		}
	}
	union, err := extent.Normalize(all, size)
	if err != nil {
		return extent.Map{}, fmt.Errorf("coriolis: changes: %w: %w", backend.ErrUnavailable, err)
	}
	unchanged, err := extent.Normalize(same, size)
	if err != nil {
		return extent.Map{}, fmt.Errorf("coriolis: changes: %w: %w", backend.ErrUnavailable, err)
	}
	return union.Subtract(unchanged), nil
}

// changedSince is the map of extents of ref (size bytes, alloc allocated)
// rewritten or discarded since base, from compareTo: coarse (an extent split
// by copy-on-write is reported whole) but never short. A hostile map is an
// error here: guessing would make an incremental backup silently wrong.
func (c *Client) changedSince(ctx context.Context, ref, base backend.DiskRef, size int64, alloc extent.Map) (extent.Map, error) {
	baseSnapshotID := base.Snapshot
	var s apiSnapshot
	vm, _ := c.listedVM(ref.VM)
	sz := c.newSizer(ctx, ref.VM, []string{ref.Snapshot}, append(diskNames(vm), ref.Disk))
	if err := c.callSized(ctx, http.MethodGet, c.snapshotURL(ref.VM, ref.Snapshot, baseSnapshotID), &s, sz, nil); err != nil {
		return extent.Map{}, fmt.Errorf("coriolis: changes since %q: %w", baseSnapshotID, notThisVM(err))
	}
	ds, ok := s.disk(ref.Disk)
	if !ok {
		return extent.Map{}, fmt.Errorf("coriolis: changes since %q: %w: answer has no disk %q", baseSnapshotID, backend.ErrUnavailable, ref.Disk)
	}
	rewritten, err := chunkMap(ds.Chunks, size)
	if err != nil {
		return extent.Map{}, fmt.Errorf("coriolis: changes since %q: %w: %w", baseSnapshotID, backend.ErrUnavailable, err)
	}
	// compareTo lists only extents that hold data now; a range discarded
	// since base is a change too (it reads as zeros now), and a delta that
	// left it out would restore stale data.
	baseSnap, err := c.snapshot(ctx, ref.VM, baseSnapshotID, base.Disk)
	if err != nil {
		return extent.Map{}, fmt.Errorf("coriolis: changes since %q: %w", baseSnapshotID, err)
	}
	baseAlloc := extent.Map{}
	if bd, ok := baseSnap.disk(base.Disk); ok {
		if baseAlloc, err = chunkMap(bd.Chunks, size); err != nil {
			return extent.Map{}, fmt.Errorf("coriolis: changes since %q: base map: %w: %w", baseSnapshotID, backend.ErrUnavailable, err)
		}
	}
	return rewritten.Union(baseAlloc.Subtract(alloc)), nil
}

// errHostile marks chunk values that cannot be byte offsets.
var errHostile = errors.New("hostile chunk")
