// Package ovirt is the oVirt / RHV platform: VMs and snapshots through the
// engine's REST API (v4, JSON, SSO bearer tokens), disk data through image
// transfers served by ovirt-imageio (single-range GETs on a ticket URL),
// holes from imageio's zero extents and changed extents from the snapshot
// chain (a shallow transfer of each layer: what it allocates is what
// changed in it).
package ovirt

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
	"github.com/vmexportfs/vmexportfs/backend/meter"
	"github.com/vmexportfs/vmexportfs/backend/redact"
	"github.com/vmexportfs/vmexportfs/backend/retry"
)

// Defaults.
const (
	DefaultSnapshotTimeout = 10 * time.Minute
	DefaultReaders         = 4
	// transferTimeout bounds the wait for a transfer to reach
	// transferring, as the SDK does.
	transferTimeout = 60 * time.Second
	// extentsTimeout: the extents of a large disk take over a minute to
	// compute (ovirt-imageio #71); the answer is waited for that long.
	extentsTimeout = 10 * time.Minute
	// inactivityTimeout is asked of each transfer: the engine cancels it
	// if the mount dies without finalizing. The mount itself finalizes a
	// transfer idle for transferIdle.
	inactivityTimeout = 120
	transferIdle      = 10 * time.Second
)

// Config is how to reach an engine.
type Config struct {
	URL                string // https://ENGINE
	Username, Password string
	RootCAs            *x509.CertPool // the engine CA (signs imageio's certificates too)
	InsecureSkipVerify bool
	// SnapshotTimeout bounds mkdir's and rmdir's wait for the engine.
	SnapshotTimeout time.Duration
	// Readers is how many connections a disk's reads use at most (also
	// bounded by imageio's max_readers).
	Readers int
	// PollInterval is the longest wait between two questions about a job
	// (default 1s, as the SDK polls); the first comes sooner, most jobs
	// being quick.
	PollInterval time.Duration
	Policy       retry.Policy
	Logger       *slog.Logger
	Secrets      *redact.Secrets
}

// Source is a logged-in engine.
type Source struct {
	cfg    Config
	api    *url.URL // https://ENGINE/ovirt-engine/api
	tls    *tls.Config
	engine *httprange.Client
	logger *slog.Logger

	mu     sync.Mutex
	allocs map[string]extent.Map // disk snapshot image id → data extents
	disks  map[*disk]bool        // open disks, for Close
	slots  map[string]*disk      // disk id → the disk whose transfer locks it

	transfers *meter.Gauge // image transfers open on the engine
}

var (
	_ backend.Source          = (*Source)(nil)
	_ backend.DeltaOpener     = (*Source)(nil)
	_ backend.SnapshotCreator = (*Source)(nil)
	_ backend.SnapshotDeleter = (*Source)(nil)
)

// New logs in (so a wrong password or an untrusted certificate fails here).
func New(ctx context.Context, cfg Config) (*Source, error) {
	base, err := url.Parse(cfg.URL)
	if err != nil || base.Scheme != "https" || base.Host == "" || base.RawQuery != "" || base.User != nil ||
		(base.Path != "" && base.Path != "/" && strings.TrimSuffix(base.Path, "/") != "/ovirt-engine/api") {
		return nil, fmt.Errorf("ovirt: source URL: %w: want https://ENGINE (the API at /ovirt-engine/api)", backend.ErrInvalid)
	}
	base.Path = ""
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.SnapshotTimeout <= 0 {
		cfg.SnapshotTimeout = DefaultSnapshotTimeout
	}
	if cfg.Readers <= 0 {
		cfg.Readers = DefaultReaders
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = time.Second
	}
	cfg.Secrets.Add(cfg.Password)
	s := &Source{
		cfg: cfg, api: base.JoinPath("ovirt-engine", "api"), logger: cfg.Logger,
		tls:    &tls.Config{RootCAs: cfg.RootCAs, InsecureSkipVerify: cfg.InsecureSkipVerify, MinVersion: tls.VersionTLS12},
		allocs: map[string]extent.Map{}, disks: map[*disk]bool{}, slots: map[string]*disk{},
		transfers: cfg.Policy.Meter.Gauge("transfers"),
	}
	transport := &http.Client{Transport: httprange.NewTransport(s.tls, cfg.Policy.Meter)}
	sso := &ssoAuth{
		sso:  &httprange.Client{HTTP: transport, Policy: cfg.Policy, Logger: cfg.Logger, Secrets: cfg.Secrets},
		url:  base.JoinPath("ovirt-engine", "sso", "oauth", "token").String(),
		user: cfg.Username, pass: cfg.Password, logger: cfg.Logger, secrets: cfg.Secrets,
	}
	auth := &httprange.TokenAuth{Login: sso.Login}
	s.engine = &httprange.Client{HTTP: transport, Auth: auth, Policy: cfg.Policy, Logger: cfg.Logger, Secrets: cfg.Secrets}
	if err := auth.Renew(ctx); err != nil {
		return nil, err
	}
	s.engine.CredentialsAccepted()
	return s, nil
}

// Close finalizes the transfers of disks still open (the filesystem closes
// its disks first; this is for a source closed without them).
func (s *Source) Close() error {
	s.mu.Lock()
	var open []*disk
	for d := range s.disks {
		open = append(open, d)
	}
	s.mu.Unlock()
	for _, d := range open {
		_ = d.Close()
	}
	return nil
}

// call sends one engine request and decodes its JSON answer into out (nil:
// ignored). Engine faults become errors with their reason, wrapping the
// sentinel of their status.
func (s *Source) call(ctx context.Context, method, path string, body, out any) error {
	var payload []byte
	if body != nil {
		var err error
		if payload, err = json.Marshal(body); err != nil {
			return fmt.Errorf("ovirt: %s %s: %w", method, path, err)
		}
	}
	u := s.api.JoinPath(path)
	resp, err := s.engine.Do(ctx, func(ctx context.Context) (*http.Request, error) {
		req, err := http.NewRequestWithContext(ctx, method, u.String(), bytes.NewReader(payload))
		if err != nil {
			return nil, err
		}
		req.Header.Set("Accept", "application/json")
		req.Header.Set("Version", "4")
		if body != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		return req, nil
	})
	if err != nil {
		return fmt.Errorf("ovirt: %s %s: %w", method, path, faultReason(err))
	}
	defer resp.Body.Close()
	if out == nil {
		return nil
	}
	if err := decodeEngine(resp.Body, out); err != nil {
		return fmt.Errorf("ovirt: %s %s: %w", method, path, err)
	}
	return nil
}

// faultReason rewrites a status error whose text is an engine fault to
// its reason and detail, which say what went wrong.
func faultReason(err error) error {
	var se *httprange.StatusError
	if !errors.As(err, &se) {
		return err
	}
	var f faultJSON
	if json.Unmarshal([]byte(se.Text), &f) != nil || f.Reason == "" {
		return err
	}
	text := f.Reason
	if f.Detail != "" {
		text += ": " + f.Detail
	}
	return &httprange.StatusError{Code: se.Code, Kind: se.Kind, Text: cut(text, 400)}
}

// VMs lists the engine's VMs.
func (s *Source) VMs(ctx context.Context) ([]backend.VM, error) {
	var ans vmsJSON
	if err := s.call(ctx, http.MethodGet, "vms", nil, &ans); err != nil {
		return nil, err
	}
	var out []backend.VM
	for _, vm := range ans.VM {
		if vm.ID != "" {
			out = append(out, backend.VM{ID: vm.ID, Name: vm.Name})
		}
	}
	return out, nil
}

// Snapshots lists a VM's regular snapshots whose status is ok, oldest
// first (the "active" one is the VM's present, not a snapshot; a locked
// one is being made or deleted).
func (s *Source) Snapshots(ctx context.Context, vmID string) ([]backend.Snapshot, error) {
	snaps, err := s.snapshots(ctx, vmID)
	if err != nil {
		return nil, err
	}
	var out []backend.Snapshot
	for _, sn := range snaps {
		if sn.Status != "ok" {
			continue
		}
		disks, err := s.snapshotDisks(ctx, vmID, sn.ID)
		if errors.Is(err, backend.ErrNotFound) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, backend.Snapshot{ID: sn.ID, Name: sn.Description, Created: sn.Date.Time, Disks: diskInfos(disks)})
	}
	return out, nil
}

// snapshots are the VM's regular snapshots, oldest first.
func (s *Source) snapshots(ctx context.Context, vmID string) ([]snapshotJSON, error) {
	if !safeID(vmID) {
		return nil, fmt.Errorf("ovirt: vm %q: %w", cut(vmID, 64), backend.ErrNotFound)
	}
	var ans snapshotsJSON
	if err := s.call(ctx, http.MethodGet, "vms/"+vmID+"/snapshots", nil, &ans); err != nil {
		return nil, err
	}
	var out []snapshotJSON
	for _, sn := range ans.Snapshot {
		if sn.Type == "regular" && sn.ID != "" {
			out = append(out, sn)
		}
	}
	slices.SortStableFunc(out, func(a, b snapshotJSON) int { return a.Date.Compare(b.Date.Time) })
	return out, nil
}

func (s *Source) snapshotDisks(ctx context.Context, vmID, snapID string) ([]snapshotDiskJSON, error) {
	if !safeID(vmID) || !safeID(snapID) {
		return nil, fmt.Errorf("ovirt: snapshot %q of vm %q: %w", cut(snapID, 64), cut(vmID, 64), backend.ErrNotFound)
	}
	var ans snapshotDisksJSON
	if err := s.call(ctx, http.MethodGet, "vms/"+vmID+"/snapshots/"+snapID+"/disks", nil, &ans); err != nil {
		return nil, err
	}
	var out []snapshotDiskJSON
	for _, d := range ans.Disk {
		if d.ID != "" && d.ImageID != "" {
			out = append(out, d)
		}
	}
	return out, nil
}

// safeID says whether an id can go into a URL path as one segment.
func safeID(id string) bool {
	return id != "" && len(id) <= 128 && !strings.ContainsAny(id, "/?#%\\") && id != "." && id != ".."
}

// diskInfos names a snapshot's disks by their alias where that is unique
// among them, else by id; the id stays the same across snapshots.
func diskInfos(disks []snapshotDiskJSON) []backend.DiskInfo {
	count := map[string]int{}
	for _, d := range disks {
		count[d.name()]++
	}
	var out []backend.DiskInfo
	for _, d := range disks {
		dev := d.name()
		if dev == "" || count[dev] > 1 {
			dev = d.ID
		}
		out = append(out, backend.DiskInfo{ID: d.ID, Device: dev})
	}
	return out
}

func (d snapshotDiskJSON) name() string {
	if d.Alias != "" {
		return d.Alias
	}
	return d.Name
}

// diskOf finds a snapshot's disk.
func (s *Source) diskOf(ctx context.Context, ref backend.DiskRef) (snapshotDiskJSON, error) {
	disks, err := s.snapshotDisks(ctx, ref.VM, ref.Snapshot)
	if err != nil {
		return snapshotDiskJSON{}, err
	}
	i := slices.IndexFunc(disks, func(d snapshotDiskJSON) bool { return d.ID == ref.Disk })
	if i < 0 {
		return snapshotDiskJSON{}, fmt.Errorf("ovirt: disk %q of snapshot %s: %w", cut(ref.Disk, 64), ref.Snapshot, backend.ErrNotFound)
	}
	if disks[i].ProvisionedSize < 0 {
		return snapshotDiskJSON{}, fmt.Errorf("ovirt: disk %s: %w: provisioned_size %d", ref.Disk, backend.ErrUnavailable, disks[i].ProvisionedSize)
	}
	return disks[i], nil
}

// OpenDisk opens a snapshot disk. Its transfer is made when it is first
// read (or here, to learn its extents, the first time this disk snapshot
// is opened) and finalized once it is idle.
func (s *Source) OpenDisk(ctx context.Context, ref backend.DiskRef) (backend.Disk, error) {
	sd, err := s.diskOf(ctx, ref)
	if err != nil {
		return nil, err
	}
	d := &disk{src: s, name: ref.VM + "/" + ref.Snapshot + "/" + ref.Disk, diskID: ref.Disk, imageID: sd.ImageID, size: int64(sd.ProvisionedSize)}
	s.mu.Lock()
	alloc, known := s.allocs[sd.ImageID]
	s.mu.Unlock()
	if !known {
		data, _, err := d.extents(ctx)
		if err != nil {
			d.Close()
			return nil, err
		}
		alloc = data
		s.mu.Lock()
		s.allocs[sd.ImageID] = alloc
		s.mu.Unlock()
	}
	d.alloc = alloc
	s.mu.Lock()
	s.disks[d] = true
	s.mu.Unlock()
	return d, nil
}

// OpenDelta opens ref with what changed since base: the union of what each
// snapshot layer after base, up to ref's, allocates, read through a
// shallow transfer of each.
func (s *Source) OpenDelta(ctx context.Context, ref, base backend.DiskRef) (backend.Disk, extent.Map, error) {
	if ref.VM != base.VM || ref.Disk != base.Disk {
		return nil, extent.Map{}, fmt.Errorf("ovirt: %w: not the same disk", backend.ErrUnsupported)
	}
	snaps, err := s.snapshots(ctx, ref.VM)
	if err != nil {
		return nil, extent.Map{}, err
	}
	bi := slices.IndexFunc(snaps, func(sn snapshotJSON) bool { return sn.ID == base.Snapshot })
	ti := slices.IndexFunc(snaps, func(sn snapshotJSON) bool { return sn.ID == ref.Snapshot })
	switch {
	case bi < 0:
		return nil, extent.Map{}, fmt.Errorf("ovirt: base snapshot %s: %w", base.Snapshot, backend.ErrNotFound)
	case ti < 0:
		return nil, extent.Map{}, fmt.Errorf("ovirt: snapshot %s: %w", ref.Snapshot, backend.ErrNotFound)
	case bi >= ti:
		return nil, extent.Map{}, fmt.Errorf("ovirt: %w: base %s is not older than %s", backend.ErrUnsupported, base.Snapshot, ref.Snapshot)
	}
	target, err := s.diskOf(ctx, ref)
	if err != nil {
		return nil, extent.Map{}, err
	}
	size := int64(target.ProvisionedSize)
	changed := extent.Map{}
	for _, sn := range snaps[bi+1 : ti+1] {
		layer, err := s.diskOf(ctx, backend.DiskRef{VM: ref.VM, Snapshot: sn.ID, Disk: ref.Disk})
		if errors.Is(err, backend.ErrNotFound) {
			// The disk was not in that snapshot: the chain cannot be
			// followed; the filesystem makes a larger, exact, delta.
			return nil, extent.Map{}, fmt.Errorf("ovirt: %w: disk %s is not in snapshot %s", backend.ErrUnsupported, ref.Disk, sn.ID)
		}
		if err != nil {
			return nil, extent.Map{}, err
		}
		if int64(layer.ProvisionedSize) != size {
			return nil, extent.Map{}, fmt.Errorf("ovirt: %w: disk %s was resized between the snapshots", backend.ErrUnsupported, ref.Disk)
		}
		m, err := s.layerExtents(ctx, ref.VM+"/"+sn.ID+"/"+ref.Disk, ref.Disk, layer.ImageID, size)
		if err != nil {
			return nil, extent.Map{}, err
		}
		if changed, err = extent.Normalize(changed.Union(m).Extents(), size); err != nil {
			return nil, extent.Map{}, err
		}
	}
	s.logger.Info("ovirt: changed extents from the snapshot chain", "disk", ref.Disk, "base", base.Snapshot, "snapshot", ref.Snapshot,
		"layers", ti-bi, "changed_bytes", changed.Bytes())
	d, err := s.OpenDisk(ctx, ref)
	if err != nil {
		return nil, extent.Map{}, err
	}
	return d, changed, nil
}

// layerExtents is what one snapshot layer allocates, from a shallow
// transfer's extents (hole: not in this layer).
func (s *Source) layerExtents(ctx context.Context, name, diskID, imageID string, size int64) (extent.Map, error) {
	layer := &disk{src: s, name: name + " (layer)", diskID: diskID, imageID: imageID, shallow: true, size: size}
	defer layer.Close()
	_, allocated, err := layer.extents(ctx)
	return allocated, err
}

// CreateSnapshot takes a snapshot (its description is the name) and waits
// until the engine says it is ok.
func (s *Source) CreateSnapshot(ctx context.Context, vmID, name string) (backend.Snapshot, error) {
	snaps, err := s.snapshots(ctx, vmID)
	if err != nil {
		return backend.Snapshot{}, err
	}
	if slices.ContainsFunc(snaps, func(sn snapshotJSON) bool { return sn.Description == name }) {
		return backend.Snapshot{}, fmt.Errorf("ovirt: vm %s already has a snapshot %q: %w", vmID, cut(name, 64), backend.ErrExists)
	}
	var created snapshotJSON
	body := map[string]any{"description": name, "persist_memorystate": false}
	s.releaseVM(vmID)
	if err := s.callUnlocked(ctx, http.MethodPost, "vms/"+vmID+"/snapshots", body, &created, "a snapshot of "+vmID); err != nil {
		return backend.Snapshot{}, err
	}
	if !safeID(created.ID) {
		return backend.Snapshot{}, fmt.Errorf("ovirt: snapshot of vm %s: %w: the engine returned no usable id", vmID, backend.ErrUnavailable)
	}
	s.logger.Info("ovirt: snapshot requested; waiting for the engine", "vm", vmID, "snapshot", created.ID, "name", name)
	sn, err := s.waitSnapshot(ctx, vmID, created.ID, false)
	if err != nil {
		return backend.Snapshot{}, err
	}
	disks, err := s.snapshotDisks(ctx, vmID, sn.ID)
	if err != nil {
		return backend.Snapshot{}, err
	}
	return backend.Snapshot{ID: sn.ID, Name: sn.Description, Created: sn.Date.Time, Disks: diskInfos(disks)}, nil
}

// DeleteSnapshot deletes a snapshot and waits until it is gone.
func (s *Source) DeleteSnapshot(ctx context.Context, vmID, snapshotID string) error {
	snaps, err := s.snapshots(ctx, vmID)
	if err != nil {
		return err
	}
	if !slices.ContainsFunc(snaps, func(sn snapshotJSON) bool { return sn.ID == snapshotID }) {
		return fmt.Errorf("ovirt: snapshot %q of vm %s: %w", cut(snapshotID, 64), vmID, backend.ErrNotFound)
	}
	s.closeDisksOf(vmID, snapshotID)
	s.releaseVM(vmID)
	if err := s.callUnlocked(ctx, http.MethodDelete, "vms/"+vmID+"/snapshots/"+snapshotID, nil, nil, "deleting "+snapshotID); err != nil {
		return err
	}
	_, err = s.waitSnapshot(ctx, vmID, snapshotID, true)
	return err
}

// waitSnapshot polls a snapshot until its status is ok (or, gone, until
// the engine no longer lists it), for at most SnapshotTimeout.
func (s *Source) waitSnapshot(ctx context.Context, vmID, snapID string, gone bool) (snapshotJSON, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.SnapshotTimeout)
	defer cancel()
	start := time.Now()
	for logged, poll := time.Now(), s.firstPoll(); ; poll = s.nextPoll(poll) {
		var sn snapshotJSON
		err := s.call(ctx, http.MethodGet, "vms/"+vmID+"/snapshots/"+snapID, nil, &sn)
		switch {
		case gone && errors.Is(err, backend.ErrNotFound):
			s.logger.Info("ovirt: snapshot deleted", "vm", vmID, "snapshot", snapID, "waited", time.Since(start).Round(time.Millisecond))
			return snapshotJSON{}, nil
		case err != nil && ctx.Err() == nil:
			return snapshotJSON{}, err
		case err == nil && !gone && sn.Status == "ok":
			s.logger.Info("ovirt: snapshot ready", "vm", vmID, "snapshot", snapID, "waited", time.Since(start).Round(time.Millisecond))
			return sn, nil
		}
		if !gone && sn.Status != "" {
			// mkdir's caller logs it at a steady pace and shows it in stats.
			backend.ReportProgress(ctx, "engine: snapshot "+cut(sn.Status, 32))
		} else if gone && time.Since(logged) > 30*time.Second {
			s.logger.Info("ovirt: still waiting for the engine", "vm", vmID, "snapshot", snapID, "status", sn.Status, "deleting", gone)
			logged = time.Now()
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			what := "to be ok"
			if gone {
				what = "to be deleted"
			}
			return snapshotJSON{}, fmt.Errorf("ovirt: snapshot %s of vm %s: %w: still %q after %s waiting for it %s (the engine's job may still finish)",
				snapID, vmID, backend.ErrUnavailable, sn.Status, time.Since(start).Round(time.Second), what)
		case <-t.C:
		}
	}
}

// firstPoll and nextPoll space the questions about a job: 50 ms, doubling
// up to PollInterval.
func (s *Source) firstPoll() time.Duration { return min(50*time.Millisecond, s.cfg.PollInterval) }

func (s *Source) nextPoll(d time.Duration) time.Duration { return min(2*d, s.cfg.PollInterval) }

// closeDisksOf finalizes the transfers of this source's disks of a
// snapshot about to be deleted: the engine keeps a snapshot whose disk is
// being transferred locked.
func (s *Source) closeDisksOf(vmID, snapID string) {
	for _, d := range s.openDisks(vmID + "/" + snapID + "/") {
		_ = d.Close()
	}
}

// openDisks are this source's open disks whose name starts with prefix.
func (s *Source) openDisks(prefix string) []*disk {
	s.mu.Lock()
	defer s.mu.Unlock()
	var open []*disk
	for d := range s.disks {
		if strings.HasPrefix(d.name, prefix) {
			open = append(open, d)
		}
	}
	return open
}
