package fs

import (
	"container/list"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
)

// maxRecentVMs is how many VMs the tree keeps what it learnt of (snapshot
// listings, disk handles, kernel entries) before forgetting the least
// recently used: a walk of 100,000 VMs then holds a few thousand at a time,
// not all of them. It is well above what a walk lists ahead (walkAheadMax).
const maxRecentVMs = 2048

// recentVMs orders VMs by last use; it is not safe for concurrent use (the
// state's lock guards it).
type recentVMs struct {
	max     int
	order   *list.List // of string, most recent first
	at      map[string]*list.Element
	evicted int // since the last sweep
}

func newRecentVMs(max int) *recentVMs {
	return &recentVMs{max: max, order: list.New(), at: map[string]*list.Element{}}
}

// touch marks vm used now and returns the VM it pushed out, if any.
func (r *recentVMs) touch(vm string) (evicted string, ok bool) {
	if e, ok := r.at[vm]; ok {
		r.order.MoveToFront(e)
		return "", false
	}
	r.at[vm] = r.order.PushFront(vm)
	if r.order.Len() <= r.max {
		return "", false
	}
	last := r.order.Back()
	r.order.Remove(last)
	old := last.Value.(string)
	delete(r.at, old)
	return old, true
}

// useVM records that vm is in use. When that pushes another VM out, its
// listings and handles are dropped, and the kernel is asked to forget its
// directory, so that its nodes are released too (entries in use, such as
// an open file's, stay until closed; a later lookup makes them anew).
func (st *state) useVM(vm string) {
	st.mu.Lock()
	old, evicted := st.recent.touch(vm)
	sweep := false
	if evicted {
		delete(st.snaps, old)
		delete(st.snapDirs, old)
		delete(st.handles, old)
		st.recent.evicted++
		if sweep = st.recent.evicted >= st.recent.max; sweep {
			st.recent.evicted = 0
		}
	}
	st.mu.Unlock()
	if evicted && st.vmsDir != nil {
		// Not from within the request that called us: the kernel holds
		// the directory's lock while it waits for the answer.
		go st.vmsDir.NotifyEntry(old)
		if sweep {
			go st.sweepForgotten()
		}
	}
}

// sweepForgotten asks the kernel again to forget the VMs it still holds
// that are no longer recent, a sweep every max evictions, so stragglers do
// not add up. A VM's entry dropped while something was inside it (a walk's
// open directory) leaves that inner entry cached once released, and it
// keeps the VM's node alive: forget deeper, where the kernel still has
// entries.
func (st *state) sweepForgotten() {
	for name, node := range st.vmsDir.Children() {
		st.mu.Lock()
		_, recent := st.recent.at[name]
		st.mu.Unlock()
		if !recent {
			forgetEntry(&st.vmsDir.Inode, name, node)
		}
	}
}

// forgetEntry asks the kernel to drop parent's entry name (node) or, when
// it no longer has that entry, the entries below node.
func forgetEntry(parent *gofs.Inode, name string, node *gofs.Inode) {
	if parent.NotifyEntry(name) != syscall.ENOENT {
		return
	}
	for childName, child := range node.Children() {
		forgetEntry(node, childName, child)
	}
}
