package fs

import (
	"context"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/redact"
	"github.com/vmexportfs/vmexportfs/cache"
)

// StatsXattr is the mountpoint's stats document (a Document). It is not
// listed, so cp -a and rsync -X of the mount never copy it; getfattr -n
// asks for it by name.
const StatsXattr = "user.vmexport.stats"

// statsReuse is how long a document measured by a size query answers the
// value query after it: getxattr is asked twice (size, then value), and a
// document that grew in between would fail the second with ERANGE.
const statsReuse = time.Second

// creationInfo is a snapshot being made by mkdir.
type creationInfo struct {
	vm, name string
	id       string // "" until the platform has named it
	started  time.Time
	state    string // what the platform says it is doing
}

// diskMeter counts one disk's reads, whichever of its openings they use.
type diskMeter struct {
	ref                                backend.DiskRef
	tally                              cache.Tally
	fetches, fetchedBytes, fetchErrors atomic.Int64
	pageCacheBytes                     atomic.Int64 // stored in the kernel's page cache ahead of readers (pageFiller)
	readRequests                       atomic.Int64 // READs the kernel sent for the disk's files
}

// meters are the disks' counters and the errnos, for Stats.
type meters struct {
	mu     sync.Mutex
	disks  map[backend.DiskRef]*diskMeter
	errnos map[syscall.Errno]int64
}

func (m *meters) disk(ref backend.DiskRef) *diskMeter {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.disks == nil {
		m.disks = map[backend.DiskRef]*diskMeter{}
	}
	d := m.disks[ref]
	if d == nil {
		d = &diskMeter{ref: ref}
		m.disks[ref] = d
	}
	return d
}

func (m *meters) errno(e syscall.Errno) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.errnos == nil {
		m.errnos = map[syscall.Errno]int64{}
	}
	m.errnos[e]++
}

// disks are every disk's counters, most fetched first; a disk of a
// deleted snapshot stays, so that totals never go down.
func (m *meters) diskDocs(open map[backend.DiskRef]bool) []DiskDoc {
	m.mu.Lock()
	out := make([]DiskDoc, 0, len(m.disks))
	for _, d := range m.disks {
		out = append(out, DiskDoc{
			VM: d.ref.VM, Snapshot: d.ref.Snapshot, Disk: d.ref.Disk, Open: open[d.ref],
			Reads: d.tally.Reads.Load(), CacheBytes: d.tally.HitBytes.Load(), FetchBytes: d.tally.MissBytes.Load(), HoleBytes: d.tally.HoleBytes.Load(),
			PageCacheBytes: d.pageCacheBytes.Load(), ReadRequests: d.readRequests.Load(),
			Fetches: d.fetches.Load(), FetchedBytes: d.fetchedBytes.Load(), FetchErrors: d.fetchErrors.Load(),
		})
	}
	m.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.FetchedBytes != b.FetchedBytes {
			return a.FetchedBytes > b.FetchedBytes
		}
		return cacheKey(backend.DiskRef{VM: a.VM, Snapshot: a.Snapshot, Disk: a.Disk}) < cacheKey(backend.DiskRef{VM: b.VM, Snapshot: b.Snapshot, Disk: b.Disk})
	})
	return out
}

// errnoCounts are the errnos given, by name.
func (m *meters) errnoCounts() map[string]int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]int64, len(m.errnos))
	for e, n := range m.errnos {
		out[errnoName(e)] = n
	}
	return out
}

// errnoName is "EIO" for EIO: what a person looks up.
func errnoName(e syscall.Errno) string {
	switch e {
	case syscall.EIO:
		return "EIO"
	case syscall.EACCES:
		return "EACCES"
	case syscall.EINVAL:
		return "EINVAL"
	case syscall.ENOTSUP:
		return "ENOTSUP"
	case syscall.ENOENT:
		return "ENOENT"
	case syscall.EEXIST:
		return "EEXIST"
	}
	return "errno " + e.Error()
}

// Getxattr answers the stats document on the mountpoint.
func (r *Root) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	if attr != StatsXattr {
		return 0, syscall.ENODATA
	}
	return xattrValue(r.st.statsValue(len(dest)), dest)
}

// statsValue renders the document for a getxattr with a buffer of room
// bytes. A size query (room 0) keeps what it measured for the value query
// that follows it, so the two agree; any other read renders afresh.
func (st *state) statsValue(room int) []byte {
	st.statsMu.Lock()
	defer st.statsMu.Unlock()
	if kept := st.statsDoc; room > 0 && kept != nil && len(kept) <= room && time.Since(st.statsAt) < statsReuse {
		st.statsDoc = nil
		return kept
	}
	doc := st.document().Render(xattrSizeMax)
	if room == 0 {
		st.statsDoc, st.statsAt = doc, time.Now()
	}
	return doc
}

// creations are the snapshots mkdir is making, each logged every interval
// until it is ready.
type creations struct {
	every time.Duration
	done  <-chan struct{} // closed when the tree closes
	log   func(msg string, args ...any)

	mu  sync.Mutex
	all map[*creation]bool
}

type creation struct {
	c    *creations
	path string
	stop chan struct{}

	mu    sync.Mutex
	info  creationInfo
	poll  func() bool // set once pending
	ended bool
}

// start registers a creation; follow logs it until end.
func (c *creations) start(vm, name, path string) *creation {
	cr := &creation{c: c, path: path, stop: make(chan struct{}), info: creationInfo{vm: vm, name: name, started: time.Now(), state: "requested"}}
	c.mu.Lock()
	if c.all == nil {
		c.all = map[*creation]bool{}
	}
	c.all[cr] = true
	c.mu.Unlock()
	return cr
}

// report records what the platform says it is doing; a peer's text is made
// printable and short first.
func (cr *creation) report(state string) {
	state = redact.Cut(strings.TrimSpace(strings.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return ' '
	}, state)), 120)
	cr.mu.Lock()
	cr.info.state = state
	cr.mu.Unlock()
}

// pending records that the platform returned the snapshot, id, still being
// made: from now on each interval asks poll how it is doing.
func (cr *creation) pending(id, state string, poll func() bool) {
	cr.report(state)
	cr.mu.Lock()
	cr.info.id = id
	cr.poll = poll
	cr.mu.Unlock()
}

// pollPending follows a snapshot mkdir returned pending through the VM's
// listing; it reports false (and ends cr) once the listing has it ready
// or no longer has it.
func (st *state) pollPending(cr *creation, id string) func() bool {
	return func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), st.ttl+time.Minute)
		defer cancel()
		in := cr.snapshot()
		l, err := st.listSnapshots(ctx, in.vm)
		if err != nil {
			return true // the listing logs its own errors; ask again next time
		}
		e, ok := l.byID[id]
		switch {
		case !ok:
			st.log.Warn("fs: snapshot being created is no longer listed", "path", cr.path, "id", id)
		case e.snap.Pending == "":
			st.log.Info("fs: snapshot ready", "path", cr.path, "id", id, "took", time.Since(in.started).Round(time.Second).String())
		default:
			cr.report(e.snap.Pending)
			return true
		}
		cr.end()
		return false
	}
}

func (cr *creation) snapshot() creationInfo {
	cr.mu.Lock()
	defer cr.mu.Unlock()
	return cr.info
}

// follow logs the creation every interval until it ends; once the
// snapshot is pending, each tick first asks its poll.
func (cr *creation) follow() {
	t := time.NewTicker(cr.c.every)
	defer t.Stop()
	for {
		select {
		case <-cr.stop:
			return
		case <-cr.c.done:
			cr.end()
			return
		case <-t.C:
		}
		cr.mu.Lock()
		poll := cr.poll
		cr.mu.Unlock()
		if poll != nil && !poll() {
			return
		}
		in := cr.snapshot()
		cr.c.log("fs: snapshot still being created", "path", cr.path, "elapsed", time.Since(in.started).Round(min(cr.c.every, time.Second)).String(), "state", in.state)
	}
}

// end removes the creation from stats and stops its log lines; once.
func (cr *creation) end() {
	cr.mu.Lock()
	ended := cr.ended
	cr.ended = true
	cr.mu.Unlock()
	if ended {
		return
	}
	close(cr.stop)
	cr.c.mu.Lock()
	delete(cr.c.all, cr)
	cr.c.mu.Unlock()
}

func (c *creations) list() []creationInfo {
	c.mu.Lock()
	out := make([]creationInfo, 0, len(c.all))
	for cr := range c.all {
		out = append(out, cr.snapshot())
	}
	c.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].started.Before(out[j].started) })
	return out
}
