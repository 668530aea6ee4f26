package fs

import (
	"context"
	"path"
	"regexp"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vmexportfs/vmexportfs/backend"
)

// snapshotNameRE is what mkdir accepts: safe in paths, shells and xattr names.
var snapshotNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// Mkdir takes a snapshot named name.
func (n *snapshotsDir) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	p := path.Join("/vms", n.vm, "snapshots", name)
	if !snapshotNameRE.MatchString(name) {
		return nil, syscall.EINVAL
	}
	creator, ok := n.st.src.(backend.SnapshotCreator)
	if !ok {
		return nil, syscall.EROFS
	}
	list := n.st.snapList(n.vm)
	list.invalidate()
	l, err := n.st.listSnapshots(ctx, n.vm)
	if err != nil {
		return nil, n.st.toErrno(ctx, "mkdir", p, err)
	}
	if l.lookup(name) != nil {
		return nil, syscall.EEXIST
	}
	created := time.Now()
	cr := n.st.creations.start(n.vm, name, p)
	go cr.follow()
	sn, err := creator.CreateSnapshot(backend.WithProgress(ctx, cr.report), n.vm, name)
	if err != nil {
		cr.end()
		return nil, n.st.toErrno(ctx, "mkdir", p, err)
	}
	if problem := nameProblem(sn.ID); problem != "" {
		cr.end()
		n.st.log.Error("fs: backend created a snapshot with an unusable id", "path", p, "id", quoteShort(sn.ID), "reason", problem)
		return nil, syscall.EIO
	}
	if sn.Pending == "" {
		cr.end()
	} else {
		// mkdir returns now; the platform goes on making it, and the
		// listing says how far it is.
		cr.pending(sn.ID, sn.Pending, n.st.pollPending(cr, sn.ID))
	}
	live := liveIDs(l, sn.ID)
	if err := n.st.store.Put(n.vm, name, sn.ID, liveFunc(live)); err != nil {
		// The snapshot exists; only its name is not durable. Say so and go on.
		n.st.log.Error("fs: snapshot created but its name was not saved", "path", p, "id", sn.ID, "err", err)
	}
	e := &snapEntry{name: name, snap: sn, mtime: sn.Created}
	if sn.Created.IsZero() {
		// st_mtime: the platform does not say, so keep when we made it
		// (moved off a second another snapshot of the VM shows).
		kept, err := n.st.store.SetCreated(n.vm, sn.ID, created)
		if err != nil {
			n.st.log.Warn("fs: snapshot creation time not saved", "path", p, "id", sn.ID, "err", err)
		}
		e.mtime = kept
	}
	list.invalidate()
	if l2, err := n.st.listSnapshots(ctx, n.vm); err == nil {
		if found := l2.lookup(name); found != nil {
			e = found
		}
	}
	// The kernel may hold a negative dentry for the raw id, and for deltas
	// from a snapshot once shown under this name; drop them without
	// blocking this request (the directory is locked while we run).
	go n.invalidate(sn.ID, name)
	n.st.log.Info("fs: snapshot created", "path", p, "id", sn.ID, "took", time.Since(created).Round(time.Millisecond).String(), "pending", sn.Pending)
	return n.newSnapDir(ctx, e, out), 0
}

// Rmdir deletes the snapshot shown as name. Snapshot directories are
// virtual, so a non-empty one can be removed.
func (n *snapshotsDir) Rmdir(ctx context.Context, name string) syscall.Errno {
	p := path.Join("/vms", n.vm, "snapshots", name)
	deleter, ok := n.st.src.(backend.SnapshotDeleter)
	if !ok {
		return syscall.EROFS
	}
	list := n.st.snapList(n.vm)
	l, err := n.st.listSnapshots(ctx, n.vm)
	if err != nil {
		return n.st.toErrno(ctx, "rmdir", p, err)
	}
	e := l.lookup(name)
	if e == nil {
		return syscall.ENOENT
	}
	n.st.pool.closeSnapshot(n.vm, e.snap.ID)
	if err := deleter.DeleteSnapshot(ctx, n.vm, e.snap.ID); err != nil {
		return n.st.toErrno(ctx, "rmdir", p, err)
	}
	list.invalidate()
	n.st.forgetSnapshot(n.vm, e.snap.ID)
	live := liveIDs(l, "")
	delete(live, e.snap.ID)
	for stored, id := range n.st.store.Names(n.vm) {
		if id == e.snap.ID {
			if err := n.st.store.Delete(n.vm, stored, liveFunc(live)); err != nil {
				n.st.log.Error("fs: snapshot deleted but its name mapping was not removed", "path", p, "err", err)
			}
		}
	}
	// The same snapshot under its other name, and every delta from it in
	// the other snapshots, leave the kernel's caches now, not at their
	// timeouts.
	go n.invalidate(e.name, e.snap.ID)
	n.st.log.Info("fs: snapshot deleted", "path", p, "id", e.snap.ID)
	return 0
}

// invalidate drops from the kernel's caches the entries of the snapshot
// shown as (or with id) each of names: its directory, and the
// delta-from-<name>.vhd of every other snapshot directory the kernel knows
// (and of their disk directories). Run without holding a FUSE request: the
// kernel locks the directories a request is about.
func (n *snapshotsDir) invalidate(names ...string) {
	for _, name := range names {
		if name != "" {
			n.NotifyEntry(name)
		}
	}
	for _, ch := range n.Children() {
		dirs := []*gofs.Inode{ch}
		if _, ok := ch.Operations().(*snapDir); !ok {
			continue
		}
		for _, sub := range ch.Children() {
			if _, ok := sub.Operations().(*diskDir); ok {
				dirs = append(dirs, sub)
			}
		}
		for _, d := range dirs {
			for _, name := range names {
				if name != "" {
					d.NotifyEntry(deltaPrefix + name + deltaSuffix)
				}
			}
		}
	}
}

// lost is called with the entries a fresh listing no longer holds.
func (n *snapshotsDir) lost(gone []*snapEntry) {
	var names []string
	for _, e := range gone {
		names = append(names, e.name, e.snap.ID)
	}
	n.invalidate(names...)
}

// liveIDs is the set of snapshot ids the backend listed, plus extra.
func liveIDs(l *snapListing, extra string) map[string]bool {
	live := map[string]bool{}
	for id := range l.byID {
		live[id] = true
	}
	if extra != "" {
		live[extra] = true
	}
	return live
}

func liveFunc(live map[string]bool) func(string) bool {
	return func(id string) bool { return live[id] }
}
