package ovirttest

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"
)

// defaultInactivity is the engine's TransferImageClientInactivityTimeoutInSeconds.
const defaultInactivity = 60 * time.Second

// Image transfer phases, as the API model spells them.
const (
	phaseInitializing      = "initializing"
	phaseTransferring      = "transferring"
	phaseFinalizingSuccess = "finalizing_success"
	phaseFinishedSuccess   = "finished_success"
	phaseCancelledUser     = "cancelled_user"
	phaseCancelledSystem   = "cancelled_system"
	phaseFinalizingCleanup = "finalizing_cleanup"
	phaseFinishedCleanup   = "finished_cleanup"
)

// transfer is one image transfer (downloads only).
type transfer struct {
	id         string
	d          *disk
	v          view
	snapshotID string // the disk snapshot id (image_id) it was created with; "" for a disk
	shallow    bool
	inactivity time.Duration
	created    time.Time
	phase      string
	phaseAt    time.Time
	tk         *ticket // from transferring on; nil after it is removed
}

func (tr *transfer) finished() bool { return strings.HasPrefix(tr.phase, "finished_") }

// transferring says whether a transfer of d is not finished: the engine
// keeps the disk locked until then. Callers hold s.mu.
func (s *Server) transferring(d *disk) bool {
	return slices.ContainsFunc(s.tOrder, func(tr *transfer) bool { return tr.d == d && !tr.finished() })
}

// advance moves the transfer through the phases that time alone changes.
// Each step happens at the instant it was due, so a late call catches up
// exactly. Callers hold s.mu.
func (s *Server) advance(tr *transfer, now time.Time) {
	step := s.opts.TransferDelay
	for {
		switch tr.phase {
		case phaseInitializing:
			at := tr.created.Add(step)
			if now.Before(at) {
				return
			}
			tr.phase, tr.phaseAt = phaseTransferring, at
			tr.tk = &ticket{
				id: newUUID(), transferID: tr.id, v: tr.v, size: tr.d.size,
				expires: tr.created.Add(s.opts.TicketTimeout), conns: map[*connTrack]struct{}{}, lastActive: at,
			}
			s.tickets[tr.tk.id] = tr.tk
			s.log.Debug("image transfer transferring", "transfer", tr.id, "ticket", tr.tk.id)
		case phaseTransferring:
			if tr.tk == nil || tr.tk.inflight > 0 {
				return
			}
			at := tr.tk.lastActive.Add(tr.inactivity)
			if now.Before(at) {
				return
			}
			// No client activity for inactivity_timeout: the engine gives up.
			tr.phase, tr.phaseAt = phaseCancelledSystem, at
			s.stats.Cancelled++
			s.removeTicket(tr)
			s.log.Debug("image transfer cancelled for inactivity", "transfer", tr.id)
		case phaseCancelledUser, phaseCancelledSystem:
			if !s.stepAt(tr, now, phaseFinalizingCleanup) {
				return
			}
		case phaseFinalizingCleanup:
			if !s.stepAt(tr, now, phaseFinishedCleanup) {
				return
			}
		case phaseFinalizingSuccess:
			if !s.stepAt(tr, now, phaseFinishedSuccess) {
				return
			}
		default:
			return
		}
	}
}

func (s *Server) stepAt(tr *transfer, now time.Time, next string) bool {
	at := tr.phaseAt.Add(s.opts.TransferDelay)
	if now.Before(at) {
		return false
	}
	tr.phase, tr.phaseAt = next, at
	return true
}

// removeTicket takes the transfer's ticket off the daemon and proxy:
// later requests get 403, reads in flight are cut.
func (s *Server) removeTicket(tr *transfer) {
	if tr.tk == nil {
		return
	}
	tr.tk.removed = true
	delete(s.tickets, tr.tk.id)
	tr.tk = nil
}

// transferRequest is the image_transfer a client posts; scalars may come
// as strings.
type transferRequest struct {
	Snapshot          *struct{ ID string } `json:"snapshot"`
	Disk              *struct{ ID string } `json:"disk"`
	Image             *struct{ ID string } `json:"image"` // the older spelling of disk
	Direction         string               `json:"direction"`
	Format            string               `json:"format"`
	Shallow           flexBool             `json:"shallow"`
	InactivityTimeout flexInt              `json:"inactivity_timeout"`
}

// createTransfer is POST /imagetransfers. Callers hold s.mu.
func (s *Server) createTransfer(req transferRequest) (*transfer, *fault) {
	dir := req.Direction
	if dir == "" {
		dir = "upload" // the API's default
	}
	if dir != "download" {
		return nil, badRequest(fmt.Sprintf("the simulator does downloads only, not %q", dir))
	}
	var d *disk
	var top *layer
	var snapID string
	switch {
	case req.Snapshot != nil && req.Snapshot.ID != "":
		snapID = req.Snapshot.ID
		d, top = s.layerByImageID(snapID)
		if d == nil {
			return nil, notFound("disk snapshot", snapID)
		}
	case req.Disk != nil && req.Disk.ID != "" || req.Image != nil && req.Image.ID != "":
		id := ""
		if req.Disk != nil {
			id = req.Disk.ID
		}
		if id == "" {
			id = req.Image.ID
		}
		if d = s.diskByID(id); d == nil {
			return nil, notFound("disk", id)
		}
		d.mu.RLock()
		top = d.active()
		d.mu.RUnlock()
	default:
		return nil, &fault{status: http.StatusBadRequest, reason: "Incomplete parameters", detail: "ImageTransfer [disk.id|snapshot.id] required for add"}
	}
	format := req.Format
	if format == "" {
		format = "cow" // the disk's own
	}
	if format != "raw" {
		return nil, badRequest(fmt.Sprintf("the simulator downloads format raw only, not %q", format))
	}
	now := s.opts.Clock()
	if s.transferring(d) || slices.ContainsFunc(d.vm.snaps, func(sn *snapshot) bool { return sn.locked(now) }) {
		return nil, conflict(fmt.Sprintf("[Cannot transfer Virtual Disk. The following disks are locked: %s. Please try again in a few minutes.]", d.name))
	}
	inactivity := defaultInactivity
	if req.InactivityTimeout.set {
		inactivity = time.Duration(req.InactivityTimeout.v) * time.Second
	}
	tr := &transfer{
		id: newUUID(), d: d, v: view{d: d, top: top, shallow: bool(req.Shallow)}, snapshotID: snapID,
		shallow: bool(req.Shallow), inactivity: inactivity, created: now, phase: phaseInitializing, phaseAt: now,
	}
	s.transfers[tr.id] = tr
	s.tOrder = append(s.tOrder, tr)
	s.stats.Transfers++
	s.advance(tr, now) // TransferDelay 0 would start it at once
	return tr, nil
}

// finalize is POST /imagetransfers/{id}/finalize. The daemon cannot remove
// a ticket while a request on it is being served (ovirt-imageio #208; it
// waits for it, then gives up with 409), so neither can the engine; an idle
// keep-alive connection does not stand in the way, as observed.
func (s *Server) finalize(tr *transfer) *fault {
	switch tr.phase {
	case phaseInitializing, phaseTransferring:
	default:
		return conflict(fmt.Sprintf("[Cannot finalize the image transfer %s in phase %s.]", tr.id, tr.phase))
	}
	if tr.tk != nil && tr.tk.inflight > 0 {
		return conflict(fmt.Sprintf("[Cannot finalize the image transfer %s: ticket %s has %d request(s) in progress.]", tr.id, tr.tk.id, tr.tk.inflight))
	}
	s.removeTicket(tr)
	tr.phase, tr.phaseAt = phaseFinalizingSuccess, s.opts.Clock()
	s.stats.Finalized++
	return nil
}

// cancel is POST /imagetransfers/{id}/cancel.
func (s *Server) cancel(tr *transfer) *fault {
	switch tr.phase {
	case phaseInitializing, phaseTransferring:
	default:
		return conflict(fmt.Sprintf("[Cannot cancel the image transfer %s in phase %s.]", tr.id, tr.phase))
	}
	s.removeTicket(tr)
	tr.phase, tr.phaseAt = phaseCancelledUser, s.opts.Clock()
	s.stats.Cancelled++
	return nil
}

// transferRecord is the image_transfer as the engine shows it; the URLs
// exist only while transferring.
func (s *Server) transferRecord(tr *transfer) obj {
	o := obj{
		"id": tr.id, "href": apiPrefix + "/imagetransfers/" + tr.id,
		"phase": tr.phase, "direction": "download", "format": "raw", "shallow": tr.shallow,
		"inactivity_timeout": int64(tr.inactivity / time.Second), "active": tr.phase == phaseTransferring,
		"transferred": int64(0), "timeout_policy": "legacy",
		"image": obj{"id": tr.d.id},
		"disk":  obj{"id": tr.d.id, "href": apiPrefix + "/disks/" + tr.d.id},
	}
	if tr.snapshotID != "" {
		o["snapshot"] = obj{"id": tr.snapshotID}
	}
	if tr.phase == phaseTransferring && tr.tk != nil {
		if !s.opts.NoTransferURL {
			base := s.daemon.url()
			if s.advertised != "" {
				base = s.advertised
			}
			o["transfer_url"] = base + "/images/" + tr.tk.id
		}
		o["proxy_url"] = s.proxy.url() + "/images/" + tr.tk.id
	}
	return o
}
