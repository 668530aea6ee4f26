package xapi

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/vmexportfs/vmexportfs/backend/redact"
)

// The fields of XenAPI records this backend reads; xapi sends many more.

type vmRecord struct {
	UUID            string   `json:"uuid"`
	NameLabel       string   `json:"name_label"`
	IsATemplate     bool     `json:"is_a_template"`
	IsASnapshot     bool     `json:"is_a_snapshot"`
	IsControlDomain bool     `json:"is_control_domain"`
	SnapshotOf      string   `json:"snapshot_of"`
	SnapshotTime    xapiTime `json:"snapshot_time"`
	Snapshots       []string `json:"snapshots"`
	VBDs            []string `json:"VBDs"`
}

type vbdRecord struct {
	UUID       string `json:"uuid"`
	VM         string `json:"VM"`
	VDI        string `json:"VDI"`
	Type       string `json:"type"` // Disk | CD | Floppy
	Userdevice string `json:"userdevice"`
}

type vdiRecord struct {
	UUID         string   `json:"uuid"`
	NameLabel    string   `json:"name_label"`
	VirtualSize  xint     `json:"virtual_size"`
	IsASnapshot  bool     `json:"is_a_snapshot"`
	SnapshotOf   string   `json:"snapshot_of"`
	SnapshotTime xapiTime `json:"snapshot_time"`
	CBTEnabled   bool     `json:"cbt_enabled"`
	Type         string   `json:"type"` // user, system, ..., cbt_metadata after data_destroy
}

type hostRecord struct {
	UUID    string `json:"uuid"`
	Address string `json:"address"`
}

type networkRecord struct {
	Purpose []string `json:"purpose"`
}

// nbdInfo is one element of VDI.get_nbd_info.
type nbdInfo struct {
	Address    string `json:"address"`
	Port       xint   `json:"port"`
	Cert       string `json:"cert"`
	Exportname string `json:"exportname"`
	Subject    string `json:"subject"`
}

// xint is an int64 that xapi may send as a JSON number or, as XML-RPC
// habits go, a string.
type xint int64

func (x *xint) UnmarshalJSON(b []byte) error {
	s := string(bytes.TrimSpace(b))
	if s == "null" {
		return nil
	}
	s = strings.Trim(s, `"`)
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return fmt.Errorf("integer %q: %w", cut(s, 32), err)
	}
	*x = xint(v)
	return nil
}

// xapiTime is a XenAPI datetime: "20261201T13:48:15Z" (ISO 8601 basic), or
// the extended form some versions send. Unparseable and the epoch are the
// zero time: a platform that does not say.
type xapiTime struct{ time.Time }

func (t *xapiTime) UnmarshalJSON(b []byte) error {
	var s string
	if json.Unmarshal(b, &s) != nil {
		return nil // a date is never worth failing a listing for
	}
	for _, layout := range []string{"20060102T15:04:05Z07:00", "20060102T15:04:05Z", "20060102T15:04:05", "2006-01-02T15:04:05Z07:00", "2006-01-02T15:04:05.999999999Z07:00"} {
		if v, err := time.Parse(layout, s); err == nil {
			if v.Unix() > 0 {
				t.Time = v.UTC()
			}
			return nil
		}
	}
	return nil
}

func cut(s string, n int) string { return redact.Cut(s, n) }

// inventory is one reading of the pool's VMs, VBDs and VDIs.
type inventory struct {
	vms  map[string]vmRecord
	vbds map[string]vbdRecord
	vdis map[string]vdiRecord
}

// fetchInventory reads the three tables at once.
func fetchInventory(ctx context.Context, c *rpcClient) (*inventory, error) {
	inv := &inventory{}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return c.call(gctx, "VM.get_all_records", query, &inv.vms) })
	g.Go(func() error { return c.call(gctx, "VBD.get_all_records", query, &inv.vbds) })
	g.Go(func() error { return c.call(gctx, "VDI.get_all_records", query, &inv.vdis) })
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return inv, nil
}

// vmByUUID finds a VM (live or snapshot) by uuid.
func (inv *inventory) vmByUUID(uuid string) (string, vmRecord, bool) {
	for ref, vm := range inv.vms {
		if vm.UUID == uuid {
			return ref, vm, true
		}
	}
	return "", vmRecord{}, false
}

// listable is a VM the mount shows under /vms: a guest, not a template, a
// snapshot or a control domain.
func listable(vm vmRecord) bool {
	return !vm.IsATemplate && !vm.IsASnapshot && !vm.IsControlDomain && vm.UUID != ""
}

// vmDisk is one disk of a VM: its VBD's position and its VDI.
type vmDisk struct {
	userdevice string
	vdiRef     string
	vdi        vdiRecord
}

// disks are the VM's disk VBDs with a VDI, ordered by userdevice: empty CD
// drives, CDs and floppies are not disks.
func (inv *inventory) disks(vm vmRecord) []vmDisk {
	var out []vmDisk
	for _, vbdRef := range vm.VBDs {
		vbd, ok := inv.vbds[vbdRef]
		if !ok || vbd.Type != "Disk" || vbd.VDI == "" || vbd.VDI == nullRef {
			continue
		}
		vdi, ok := inv.vdis[vbd.VDI]
		if !ok || vdi.UUID == "" {
			continue
		}
		out = append(out, vmDisk{userdevice: vbd.Userdevice, vdiRef: vbd.VDI, vdi: vdi})
	}
	slices.SortFunc(out, func(a, b vmDisk) int {
		ai, aerr := strconv.Atoi(a.userdevice)
		bi, berr := strconv.Atoi(b.userdevice)
		if aerr == nil && berr == nil && ai != bi {
			return ai - bi
		}
		return strings.Compare(a.userdevice, b.userdevice)
	})
	return out
}

// snapshotsOf are the snapshots of the live VM ref that still hold data
// (a snapshot whose disks were all data_destroyed keeps only CBT metadata,
// nothing to read), oldest first.
func (inv *inventory) snapshotsOf(liveRef string) []string {
	var refs []string
	for ref, vm := range inv.vms {
		if !vm.IsASnapshot || vm.SnapshotOf != liveRef || vm.UUID == "" {
			continue
		}
		disks := inv.disks(vm)
		if len(disks) > 0 && !slices.ContainsFunc(disks, func(d vmDisk) bool { return d.vdi.Type != "cbt_metadata" }) {
			continue
		}
		refs = append(refs, ref)
	}
	// snapshot_time has seconds; two snapshots within one keep the order
	// the VM lists them in (xapi's creation order), then the uuid's.
	listed := inv.vms[liveRef].Snapshots
	slices.SortFunc(refs, func(a, b string) int {
		if c := inv.vms[a].SnapshotTime.Compare(inv.vms[b].SnapshotTime.Time); c != 0 {
			return c
		}
		if c := slices.Index(listed, a) - slices.Index(listed, b); c != 0 {
			return c
		}
		return strings.Compare(inv.vms[a].UUID, inv.vms[b].UUID)
	})
	return refs
}

// deviceName is the guest's name of the disk at userdevice n: xvda, xvdb,
// ... xvdz, xvdaa. A position that is not a number keeps its own name.
func deviceName(userdevice string) string {
	n, err := strconv.Atoi(userdevice)
	if err != nil || n < 0 {
		return "disk-" + userdevice
	}
	name := ""
	for n++; n > 0; n = (n - 1) / 26 {
		name = string(rune('a'+(n-1)%26)) + name
	}
	return "xvd" + name
}
