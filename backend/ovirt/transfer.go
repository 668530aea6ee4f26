package ovirt

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
)

// transfer is one image transfer of a disk snapshot, transferring: its
// ticket URL (the daemon's, or the proxy's where the daemon cannot be
// reached) and the client that reads it, whose connections are its own so
// that they can be closed before finalizing (imageio refuses a finalize
// while connections are open).
type transfer struct {
	id      string
	name    string
	url     string
	readers int
	http    *httprange.Transport
	client  *httprange.Client
	// extents has the long deadline the extents answer needs.
	extentsClient *httprange.Client
	ended         atomic.Bool // finalized or cancelled: no longer held
}

// startTransfer creates a download transfer of a disk snapshot (shallow:
// that layer alone) and waits until it is transferring.
func (s *Source) startTransfer(ctx context.Context, name, imageID string, shallow bool) (*transfer, error) {
	if !safeID(imageID) {
		return nil, fmt.Errorf("ovirt: %s: %w: disk snapshot id %q", name, backend.ErrUnavailable, cut(imageID, 64))
	}
	body := map[string]any{
		"snapshot": map[string]string{"id": imageID}, "direction": "download", "format": "raw",
		"shallow": shallow, "inactivity_timeout": inactivityTimeout,
	}
	var tj transferJSON
	if err := s.createTransfer(ctx, name, body, &tj); err != nil {
		return nil, err
	}
	if !safeID(tj.ID) {
		return nil, fmt.Errorf("ovirt: %s: %w: image transfer without a usable id", name, backend.ErrUnavailable)
	}
	t := &transfer{id: tj.ID, name: name}
	s.transfers.Add(1)
	wait, cancel := context.WithTimeout(ctx, transferTimeout)
	defer cancel()
	for poll := s.firstPoll(); tj.Phase != "transferring"; poll = s.nextPoll(poll) {
		switch tj.Phase {
		case "", "initializing", "resuming":
		case "paused_system", "paused_user":
			s.cancelTransfer(t)
			return nil, fmt.Errorf("ovirt: %s: image transfer %s: %w: phase %s", name, t.id, backend.ErrUnavailable, tj.Phase)
		default:
			return nil, fmt.Errorf("ovirt: %s: image transfer %s: %w: phase %s", name, t.id, backend.ErrUnavailable, cut(tj.Phase, 40))
		}
		timer := time.NewTimer(poll)
		select {
		case <-wait.Done():
			timer.Stop()
			s.cancelTransfer(t)
			return nil, fmt.Errorf("ovirt: %s: image transfer %s: %w: not transferring after %s", name, t.id, backend.ErrUnavailable, transferTimeout)
		case <-timer.C:
		}
		if err := s.call(wait, http.MethodGet, "imagetransfers/"+t.id, nil, &tj); err != nil {
			s.cancelTransfer(t)
			return nil, fmt.Errorf("ovirt: %s: image transfer %s: %w", name, t.id, err)
		}
	}
	if err := s.connect(ctx, t, tj); err != nil {
		s.cancelTransfer(t)
		return nil, err
	}
	s.logger.Debug("ovirt: image transfer ready", "disk", name, "transfer", t.id, "shallow", shallow, "readers", t.readers)
	return t, nil
}

// lockedWait bounds the wait for a disk locked by someone else: another
// mount's transfer (finalized within transferIdle of its last read), a
// snapshot being made or deleted, a backup.
const lockedWait = 3 * transferIdle

// createTransfer POSTs a transfer, waiting while the engine says the disk
// is locked.
func (s *Source) createTransfer(ctx context.Context, name string, body any, tj *transferJSON) error {
	if err := s.callUnlocked(ctx, http.MethodPost, "imagetransfers", body, tj, name); err != nil {
		return fmt.Errorf("ovirt: %s: image transfer: %w", name, err)
	}
	return nil
}

// callUnlocked is call, asked again for up to lockedWait while the engine
// answers 409: the disks it needs are locked by a transfer or a snapshot
// job of someone else (this source's own idle transfers are given up
// first by its callers).
func (s *Source) callUnlocked(ctx context.Context, method, path string, body, out any, what string) error {
	deadline := time.Now().Add(lockedWait)
	delay := 100 * time.Millisecond
	for warned := false; ; {
		err := s.call(ctx, method, path, body, out)
		var se *httprange.StatusError
		if err == nil || !errors.As(err, &se) || se.Code != http.StatusConflict || time.Now().Add(delay).After(deadline) {
			return err
		}
		if !warned {
			s.logger.Info("ovirt: the engine says the disks are locked (another transfer or a snapshot job); waiting", "for", what, "up_to", lockedWait)
			warned = true
		}
		timer := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			timer.Stop()
			return fmt.Errorf("%w (the disks were locked: %w)", ctx.Err(), err)
		case <-timer.C:
		}
		delay = min(2*delay, 2*time.Second)
	}
}

// releaseVM gives up this source's idle transfers of a VM's disks: the
// engine refuses to snapshot or delete while any is open.
func (s *Source) releaseVM(vmID string) {
	for _, d := range s.openDisks(vmID + "/") {
		if t := d.yield(); t != nil {
			s.finalize(t)
			s.release(d.diskID, d)
		}
	}
}

// connect picks the transfer's URL (the daemon's, else the proxy's) by
// asking each for its options, and learns how many readers it allows.
func (s *Source) connect(ctx context.Context, t *transfer, tj transferJSON) error {
	var lastErr error
	for _, raw := range []string{tj.TransferURL, tj.ProxyURL} {
		if raw == "" {
			continue
		}
		u, err := url.Parse(raw)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			lastErr = fmt.Errorf("%w: ticket URL is not https", backend.ErrUnavailable)
			continue
		}
		// The ticket in the path is the credential.
		s.cfg.Secrets.AddRenewed(u.Path)
		s.cfg.Secrets.AddRenewed(lastSegment(u.Path))
		tr := httprange.NewTransport(s.tls, s.cfg.Policy.Meter)
		client := &httprange.Client{HTTP: &http.Client{Transport: tr}, Policy: s.cfg.Policy, Logger: s.logger, Secrets: s.cfg.Secrets}
		readers, err := s.options(ctx, client, raw)
		if err != nil {
			tr.CloseIdleConnections()
			lastErr = err
			s.logger.Info("ovirt: ticket URL not usable; trying the next", "disk", t.name, "err", err.Error())
			continue
		}
		long := s.cfg.Policy
		long.AttemptTimeout = extentsTimeout
		t.url, t.http, t.client = raw, tr, client
		t.extentsClient = &httprange.Client{HTTP: &http.Client{Transport: tr}, Policy: long, Logger: s.logger, Secrets: s.cfg.Secrets}
		t.readers = max(1, min(readers, s.cfg.Readers))
		return nil
	}
	if lastErr == nil {
		lastErr = fmt.Errorf("%w: the transfer has neither transfer_url nor proxy_url", backend.ErrUnavailable)
	}
	return fmt.Errorf("ovirt: %s: image transfer %s: %w", t.name, t.id, lastErr)
}

func lastSegment(p string) string {
	for i := len(p) - 1; i >= 0; i-- {
		if p[i] == '/' {
			return p[i+1:]
		}
	}
	return p
}

// options asks imageio what a ticket allows. An old daemon without OPTIONS
// (405, 204) allows one reader.
func (s *Source) options(ctx context.Context, client *httprange.Client, rawURL string) (int, error) {
	resp, err := client.Do(ctx, func(ctx context.Context) (*http.Request, error) {
		return http.NewRequestWithContext(ctx, http.MethodOptions, rawURL, nil)
	})
	if err != nil {
		var se *httprange.StatusError
		if errors.As(err, &se) && se.Code == http.StatusMethodNotAllowed {
			return 1, nil
		}
		return 0, err
	}
	defer resp.Body.Close()
	var opts imageOptions
	if resp.StatusCode == http.StatusNoContent || json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&opts) != nil {
		return 1, nil
	}
	return max(opts.MaxReaders, 1), nil
}

// extents reads the transfer's zero extents once.
func (t *transfer) extents(ctx context.Context, size int64) (data, allocated extent.Map, err error) {
	resp, err := t.extentsClient.Do(ctx, func(ctx context.Context) (*http.Request, error) {
		return http.NewRequestWithContext(ctx, http.MethodGet, t.url+"/extents?context=zero", nil)
	})
	if err != nil {
		return extent.Map{}, extent.Map{}, err
	}
	defer resp.Body.Close()
	return decodeExtents(resp.Body, size)
}

// finalize ends a transfer: its connections first, then the engine's
// finalize, waited for briefly. A failure is logged: the engine cancels an
// abandoned transfer on its inactivity timeout anyway.
func (s *Source) finalize(t *transfer) {
	if t.id == "" {
		return
	}
	s.let(t)
	if t.http != nil {
		t.http.CloseIdleConnections()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// A request that has just been answered may still count on the daemon
	// for a moment (imageio answers 409 while one is in progress): ask
	// again, briefly.
	for delay := 20 * time.Millisecond; ; delay = min(2*delay, time.Second) {
		err := s.call(ctx, http.MethodPost, "imagetransfers/"+t.id+"/finalize", map[string]any{}, nil)
		if err == nil {
			break
		}
		var se *httprange.StatusError
		if !errors.As(err, &se) || se.Code != http.StatusConflict || ctx.Err() != nil {
			s.logger.Warn("ovirt: finalizing the image transfer failed; the engine cancels it when idle", "disk", t.name, "transfer", t.id, "err", err.Error())
			return
		}
		timer := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			timer.Stop()
		case <-timer.C:
		}
	}
	for {
		var tj transferJSON
		err := s.call(ctx, http.MethodGet, "imagetransfers/"+t.id, nil, &tj)
		switch {
		case errors.Is(err, backend.ErrNotFound), err == nil && tj.Phase == "finished_success":
			s.logger.Debug("ovirt: image transfer finalized", "disk", t.name, "transfer", t.id)
			return
		case err != nil || tj.Phase == "finished_failure" || tj.Phase == "finished_cleanup":
			s.logger.Warn("ovirt: image transfer did not finish cleanly", "disk", t.name, "transfer", t.id, "phase", tj.Phase, "err", fmt.Sprint(err))
			return
		}
		timer := time.NewTimer(s.firstPoll())
		select {
		case <-ctx.Done():
			timer.Stop()
			s.logger.Warn("ovirt: image transfer still finalizing", "disk", t.name, "transfer", t.id, "phase", tj.Phase)
			return
		case <-timer.C:
		}
	}
}

// let counts t no longer held, once.
func (s *Source) let(t *transfer) {
	if !t.ended.Swap(true) {
		s.transfers.Add(-1)
	}
}

// cancelTransfer gives a transfer up.
func (s *Source) cancelTransfer(t *transfer) {
	s.let(t)
	if t.http != nil {
		t.http.CloseIdleConnections()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.call(ctx, http.MethodPost, "imagetransfers/"+t.id+"/cancel", map[string]any{}, nil); err != nil {
		s.logger.Warn("ovirt: cancelling the image transfer failed", "disk", t.name, "transfer", t.id, "err", err.Error())
	}
}

// One transfer per disk at a time: the engine locks a disk while any of
// its snapshots is being transferred ("The following disks are locked").
// A disk of this source that needs a transfer takes its disk's slot; a
// holder that is idle gives its transfer up (finalized) to the asker, a
// busy one is waited for.

// slotPoll is how often a wait for a busy slot looks again.
const slotPoll = 20 * time.Millisecond

// acquire takes diskID's slot for d.
func (s *Source) acquire(ctx context.Context, diskID string, d *disk) error {
	for {
		s.mu.Lock()
		h := s.slots[diskID]
		if h == nil || h == d {
			s.slots[diskID] = d
			s.mu.Unlock()
			return nil
		}
		s.mu.Unlock()
		if t := h.yield(); t != nil {
			s.finalize(t)
			s.release(diskID, h)
			continue
		}
		timer := time.NewTimer(slotPoll)
		select {
		case <-ctx.Done():
			timer.Stop()
			return fmt.Errorf("ovirt: %s: %w while another snapshot of the disk is being read: %w", d.name, backend.ErrUnavailable, ctx.Err())
		case <-timer.C:
		}
	}
}

// release frees diskID's slot if d holds it.
func (s *Source) release(diskID string, d *disk) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.slots[diskID] == d {
		delete(s.slots, diskID)
	}
}

// disk is a disk snapshot read through image transfers: one made on the
// first read (or by OpenDisk, to learn its extents), finalized after
// transferIdle without reads, at Close, or when another snapshot of the
// same disk needs a transfer; renewed once when its ticket stops answering
// mid-read (expired, or the transfer was cancelled).
type disk struct {
	src     *Source
	name    string
	diskID  string
	imageID string
	shallow bool
	size    int64
	alloc   extent.Map

	mu     sync.Mutex
	t      *transfer
	sem    chan struct{}
	users  int
	idle   *time.Timer
	closed bool
}

func (d *disk) Size() int64           { return d.size }
func (d *disk) Allocated() extent.Map { return d.alloc }

func (d *disk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off < 0 || off > d.size || int64(len(p)) > d.size-off {
		return fmt.Errorf("ovirt: %s: read [%d,+%d) of a %d-byte disk: %w", d.name, off, len(p), d.size, backend.ErrInvalid)
	}
	if !d.alloc.Overlaps(off, int64(len(p))) {
		if d.isClosed() {
			return fmt.Errorf("ovirt: %s: %w: disk closed", d.name, backend.ErrUnavailable)
		}
		clear(p)
		return nil
	}
	t, sem, err := d.lease(ctx)
	if err != nil {
		return err
	}
	defer d.unlease()
	err = d.readOn(ctx, t, sem, p, off)
	if err == nil || !ticketGone(err) || ctx.Err() != nil {
		return err
	}
	d.src.logger.Warn("ovirt: the image transfer stopped answering; starting a new one", "disk", d.name, "transfer", t.id, "err", err.Error())
	t, sem, rerr := d.renew(ctx, t)
	if rerr != nil {
		return outage(fmt.Errorf("%w (renewing the transfer: %w)", err, rerr))
	}
	return outage(d.readOn(ctx, t, sem, p, off))
}

// outage makes a refusal by the data server an outage (EIO), not a
// permission error: the ticket is the only credential there, and the
// mount made it; a refusal that outlasts a new transfer is the server's.
func outage(err error) error {
	if err != nil && errors.Is(err, backend.ErrPermission) {
		return fmt.Errorf("%w: imageio refused a fresh ticket: %s", backend.ErrUnavailable, err.Error())
	}
	return err
}

// extents reads the disk's extents through its transfer, renewing the
// transfer once as reads do.
func (d *disk) extents(ctx context.Context) (data, allocated extent.Map, err error) {
	t, _, err := d.lease(ctx)
	if err != nil {
		return extent.Map{}, extent.Map{}, err
	}
	defer d.unlease()
	data, allocated, err = t.extents(ctx, d.size)
	if err != nil && ticketGone(err) && ctx.Err() == nil {
		d.src.logger.Warn("ovirt: the image transfer stopped answering; starting a new one", "disk", d.name, "transfer", t.id, "err", err.Error())
		if t, _, err = d.renew(ctx, t); err == nil {
			data, allocated, err = t.extents(ctx, d.size)
		}
	}
	if err != nil {
		return extent.Map{}, extent.Map{}, outage(fmt.Errorf("ovirt: %s: extents: %w", d.name, err))
	}
	return data, allocated, nil
}

func (d *disk) readOn(ctx context.Context, t *transfer, sem chan struct{}, p []byte, off int64) error {
	select {
	case sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-sem }()
	if err := t.client.ReadRange(ctx, t.url, d.size, p, off); err != nil {
		return fmt.Errorf("ovirt: %s: %w", d.name, err)
	}
	return nil
}

// ticketGone says the ticket no longer answers: 403 (expired, cancelled or
// unknown ticket), 404, or a 401 imageio never sends for a ticket it knows.
func ticketGone(err error) bool {
	var se *httprange.StatusError
	if errors.As(err, &se) {
		switch se.Code {
		case http.StatusUnauthorized, http.StatusForbidden, http.StatusNotFound:
			return true
		}
	}
	return false
}

func (d *disk) isClosed() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.closed
}

// lease returns the disk's transfer, making one (in its disk's slot) if it
// has none; unlease must follow.
func (d *disk) lease(ctx context.Context) (*transfer, chan struct{}, error) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil, nil, fmt.Errorf("ovirt: %s: %w: disk closed", d.name, backend.ErrUnavailable)
	}
	if d.idle != nil {
		d.idle.Stop()
	}
	d.users++ // from here on, not idle: no one takes the slot away
	if d.t != nil {
		defer d.mu.Unlock()
		return d.t, d.sem, nil
	}
	d.mu.Unlock()
	if err := d.src.acquire(ctx, d.diskID, d); err != nil {
		d.unlease()
		return nil, nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.t == nil {
		t, err := d.src.startTransfer(ctx, d.name, d.imageID, d.shallow)
		if err != nil {
			d.users--
			d.src.release(d.diskID, d)
			return nil, nil, err
		}
		d.t = t
		d.sem = make(chan struct{}, t.readers)
	}
	return d.t, d.sem, nil
}

// renew replaces the transfer t (unless another read already did).
func (d *disk) renew(ctx context.Context, t *transfer) (*transfer, chan struct{}, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, nil, fmt.Errorf("ovirt: %s: %w: disk closed", d.name, backend.ErrUnavailable)
	}
	if d.t != t && d.t != nil {
		return d.t, d.sem, nil
	}
	d.src.cancelTransfer(t) // the engine locks the disk until it is gone
	nt, err := d.src.startTransfer(ctx, d.name, d.imageID, d.shallow)
	if err != nil {
		d.t = nil
		return nil, nil, err
	}
	d.t = nt
	d.sem = make(chan struct{}, nt.readers)
	return nt, d.sem, nil
}

func (d *disk) unlease() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.users--
	if d.users == 0 && !d.closed && d.t != nil {
		if d.idle != nil {
			d.idle.Stop()
		}
		d.idle = time.AfterFunc(transferIdle, d.finalizeIdle)
	}
}

// yield gives up the transfer of an idle disk, for another snapshot of the
// same disk: the caller finalizes it. nil when the disk is busy.
func (d *disk) yield() *transfer {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.users > 0 {
		return nil
	}
	if d.idle != nil {
		d.idle.Stop()
	}
	t := d.t
	d.t = nil
	if t == nil {
		// Between transfers (a failed start): nothing to finalize, and the
		// slot is free for the asking.
		return &transfer{}
	}
	return t
}

// finalizeIdle finalizes the transfer once no read has come for
// transferIdle: a transfer holds the disk locked on the engine.
func (d *disk) finalizeIdle() {
	if t := d.yield(); t != nil {
		d.src.finalize(t)
		d.src.release(d.diskID, d)
	}
}

// Close finalizes the transfer.
func (d *disk) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	if d.idle != nil {
		d.idle.Stop()
	}
	t := d.t
	d.t = nil
	d.mu.Unlock()
	d.src.mu.Lock()
	delete(d.src.disks, d)
	d.src.mu.Unlock()
	if t != nil {
		d.src.finalize(t)
	}
	d.src.release(d.diskID, d)
	return nil
}
