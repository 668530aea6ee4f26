package fs

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/fs/statedir"
)

// vmListing is the checked VM list: only ids safe as path components, the
// first of any duplicates.
type vmListing struct {
	ids     []string
	index   map[string]int // id -> position in ids
	vmNames []string       // the friendly name of each of ids, "" for none

	// The /by-name links are made when first needed: a walk of /vms over
	// 100,000 VMs need not hold a second map of them.
	linksOnce sync.Once
	byName    map[string]string // friendly name -> id, valid and unique names only
	names     []string
}

// has reports whether the listing holds vm.
func (l *vmListing) has(vm string) bool {
	_, ok := l.index[vm]
	return ok
}

func (st *state) listVMs(ctx context.Context) (*vmListing, error) {
	return st.vms.get(ctx, st.ttl, st.fetchVMs)
}

// lookupVM is the listing for a lookup of vm: the last one if it has vm.
func (st *state) lookupVM(ctx context.Context, vm string) (*vmListing, error) {
	return st.vms.getKnown(ctx, st.ttl, st.fetchVMs, func(l *vmListing) bool { return l.has(vm) })
}

func (st *state) fetchVMs(ctx context.Context) (*vmListing, error) {
	vms, err := st.src.VMs(ctx)
	if err != nil {
		return nil, fmt.Errorf("list vms: %w", err)
	}
	l := &vmListing{index: make(map[string]int, len(vms))}
	for _, vm := range vms {
		if p := nameProblem(vm.ID); p != "" {
			st.warnOnce("vm-id:"+vm.ID, "fs: skipping vm with unusable id", "id", quoteShort(vm.ID), "reason", p)
			continue
		}
		if l.has(vm.ID) {
			st.warnOnce("vm-dup:"+vm.ID, "fs: skipping duplicate vm id", "id", quoteShort(vm.ID))
			continue
		}
		l.index[vm.ID] = len(l.ids)
		l.ids = append(l.ids, vm.ID)
		l.vmNames = append(l.vmNames, vm.Name)
	}
	return l, nil
}

// links is the listing's /by-name map and its names in listing order.
func (l *vmListing) links(st *state) (map[string]string, []string) {
	l.linksOnce.Do(func() {
		l.byName = map[string]string{}
		nameCount := map[string]int{}
		for _, name := range l.vmNames {
			if name != "" {
				nameCount[name]++
			}
		}
		for i, name := range l.vmNames {
			id := l.ids[i]
			if name == "" {
				continue
			}
			if p := nameProblem(name); p != "" {
				st.warnOnce("vm-name:"+name, "fs: no by-name link for vm", "id", quoteShort(id), "name", quoteShort(name), "reason", p)
				continue
			}
			if nameCount[name] > 1 {
				st.warnOnce("vm-name-dup:"+name, "fs: no by-name link for ambiguous vm name", "name", quoteShort(name))
				continue
			}
			l.byName[name] = id
			l.names = append(l.names, name)
		}
	})
	return l.byName, l.names
}

// snapEntry is one shown snapshot.
type snapEntry struct {
	name string
	snap backend.Snapshot
	prev *backend.Snapshot // the next older snapshot, nil for the oldest
	// prevName is how prev is shown (its name, or its id when it is not
	// shown under a name of its own): the base named in Listxattr.
	prevName string
	// mtime is the snapshot's time: the platform's creation time, else the
	// creation time of a mkdir, else when this mount's state first saw it;
	// moved to the next free second where another snapshot of the VM
	// already shows that one (statedir.Store.Times).
	mtime time.Time
}

// snapListing is a VM's checked snapshot list, oldest first.
type snapListing struct {
	entries []*snapEntry
	byName  map[string]*snapEntry
	byID    map[string]*snapEntry // every snapshot with a usable id, shown or not
}

func (st *state) snapList(vm string) *cachedList[*snapListing] {
	st.useVM(vm)
	st.mu.Lock()
	defer st.mu.Unlock()
	c, ok := st.snaps[vm]
	if !ok {
		c = &cachedList[*snapListing]{}
		st.snaps[vm] = c
	}
	return c
}

func (st *state) listSnapshots(ctx context.Context, vm string) (*snapListing, error) {
	return st.snapList(vm).get(ctx, st.ttl, func(ctx context.Context) (*snapListing, error) {
		snaps, err := st.src.Snapshots(ctx, vm)
		if err != nil {
			return nil, fmt.Errorf("list snapshots of %q: %w", vm, err)
		}
		named := map[string]string{} // snapshot id -> name given by mkdir
		for name, id := range st.store.Names(vm) {
			named[id] = name
		}
		l := &snapListing{byName: map[string]*snapEntry{}, byID: map[string]*snapEntry{}}
		var timed []statedir.Snap // every entry of byID, oldest first
		var prev *backend.Snapshot
		prevName := ""
		for i := range snaps {
			sn := snaps[i]
			if p := nameProblem(sn.ID); p != "" {
				st.warnOnce("snap-id:"+vm+"/"+sn.ID, "fs: skipping snapshot with unusable id", "vm", vm, "id", quoteShort(sn.ID), "reason", p)
				continue
			}
			if _, dup := l.byID[sn.ID]; dup {
				st.warnOnce("snap-dup:"+vm+"/"+sn.ID, "fs: skipping duplicate snapshot id", "vm", vm, "id", quoteShort(sn.ID))
				continue
			}
			e := &snapEntry{snap: sn, prev: prev, prevName: prevName}
			if sn.Pending == "" { // a snapshot still being made is no base
				prev, prevName = &snaps[i], sn.ID
			}
			l.byID[sn.ID] = e
			timed = append(timed, statedir.Snap{ID: sn.ID, Created: sn.Created})
			for _, cand := range []string{named[sn.ID], sn.Name, sn.ID} {
				if cand == "" {
					continue
				}
				if p := nameProblem(cand); p != "" {
					st.warnOnce("snap-name:"+vm+"/"+cand, "fs: snapshot name unusable, trying its id", "vm", vm, "name", quoteShort(cand), "reason", p)
					continue
				}
				e.name = cand
				break
			}
			if other, dup := l.byName[e.name]; dup {
				st.warnOnce("snap-name-dup:"+vm+"/"+e.name, "fs: skipping snapshot with duplicate name", "vm", vm, "name", quoteShort(e.name), "id", quoteShort(sn.ID), "shown", quoteShort(other.snap.ID))
				continue
			}
			l.byName[e.name] = e
			l.entries = append(l.entries, e)
			if sn.Pending == "" {
				prevName = e.name
			}
		}
		st.snapshotTimes(vm, l, timed)
		st.dropLost(vm, l)
		return l, nil
	})
}

// snapshotTimes gives every entry of l its mtime from the state directory
// (snaps are l's entries, oldest first): the platform's creation time, else
// the creation time of a mkdir, else when a listing first showed the
// snapshot, and never a second another snapshot of the VM shows, so
// st_mtime is never 1970, stays the same across remounts, and rsync's
// quick check tells the VM's snapshots apart.
func (st *state) snapshotTimes(vm string, l *snapListing, snaps []statedir.Snap) {
	times := st.store.Times(vm, snaps, time.Now())
	for id, e := range l.byID {
		e.mtime = times[id]
	}
}

// dropLost drops from the kernel's caches the snapshots the previous listing
// of vm showed and l no longer holds (deleted behind our back), with the
// deltas from them, instead of letting them live to their timeouts.
func (st *state) dropLost(vm string, l *snapListing) {
	st.mu.Lock()
	if len(st.gone) > 0 {
		for id := range l.byID { // listed again: not gone after all
			delete(st.gone, vm+"\x00"+id)
		}
	}
	st.mu.Unlock()
	prev, ok := st.snapList(vm).last()
	if !ok || prev == nil {
		return
	}
	var gone []*snapEntry
	for id, e := range prev.byID {
		if now, ok := l.byID[id]; !ok || now.name != e.name {
			gone = append(gone, e)
		}
	}
	if len(gone) == 0 {
		return
	}
	for _, e := range gone {
		if _, still := l.byID[e.snap.ID]; !still {
			st.forgetSnapshot(vm, e.snap.ID)
		}
	}
	st.mu.Lock()
	sd := st.snapDirs[vm]
	st.mu.Unlock()
	if sd != nil {
		go sd.lost(gone)
	}
}

// lookup finds a snapshot by shown name, else by raw id.
func (l *snapListing) lookup(name string) *snapEntry {
	if e, ok := l.byName[name]; ok {
		return e
	}
	return l.byID[name]
}

// diskEntry is one disk of a snapshot as shown.
type diskEntry struct {
	name string // directory name when the snapshot has several disks
	info backend.DiskInfo
}

// disksOf returns the usable disks of a snapshot: none while it is still
// being made.
func (st *state) disksOf(vm string, sn backend.Snapshot) []diskEntry {
	if sn.Pending != "" {
		return nil
	}
	var out []diskEntry
	seen := map[string]bool{}
	for _, d := range sn.Disks {
		if d.ID == "" {
			st.warnOnce("disk-id:"+vm+"/"+sn.ID, "fs: skipping disk without id", "vm", vm, "snapshot", sn.ID)
			continue
		}
		name := ""
		for _, cand := range []string{d.Device, d.ID} {
			if cand != "" && nameProblem(cand) == "" {
				name = cand
				break
			}
		}
		if name == "" && len(sn.Disks) == 1 {
			name = "disk" // never shown: a lone disk is disk.img in the snapshot dir
		}
		if name == "" {
			st.warnOnce("disk-name:"+vm+"/"+sn.ID+"/"+d.ID, "fs: skipping disk with unusable name", "vm", vm, "snapshot", sn.ID, "device", quoteShort(d.Device), "id", quoteShort(d.ID))
			continue
		}
		if seen[name] {
			st.warnOnce("disk-dup:"+vm+"/"+sn.ID+"/"+name, "fs: skipping disk with duplicate name", "vm", vm, "snapshot", sn.ID, "name", quoteShort(name))
			continue
		}
		seen[name] = true
		out = append(out, diskEntry{name: name, info: d})
	}
	return out
}
