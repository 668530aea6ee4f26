package coriolis

import (
	"container/list"
	"context"
	"fmt"
	"sync"

	"golang.org/x/sync/singleflight"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// sizeCache keeps the size of each snapshot disk a HEAD found, for the
// mount: a snapshot is immutable, so its disk's size never changes, and the
// filesystem, which forgets the disks of VMs it has not used lately and
// closes idle ones, opens a disk again without a HEAD. Two generations of at
// most sizeGeneration entries each bound it (some 100 bytes an entry): the
// sizes asked for least recently go first. Concurrent HEADs of one disk are
// one request.
type sizeCache struct {
	mu        sync.Mutex
	cur, prev map[backend.DiskRef]int64
	flight    singleflight.Group
}

const sizeGeneration = 1 << 16

func (s *sizeCache) get(ref backend.DiskRef) (int64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n, ok := s.cur[ref]; ok {
		return n, true
	}
	n, ok := s.prev[ref]
	if ok {
		s.putLocked(ref, n)
	}
	return n, ok
}

func (s *sizeCache) put(ref backend.DiskRef, n int64) {
	s.mu.Lock()
	s.putLocked(ref, n)
	s.mu.Unlock()
}

func (s *sizeCache) putLocked(ref backend.DiskRef, n int64) {
	if s.cur == nil || len(s.cur) >= sizeGeneration {
		s.prev, s.cur = s.cur, make(map[backend.DiskRef]int64)
	}
	s.cur[ref] = n
}

// forget drops the sizes of a deleted snapshot's disks.
func (s *sizeCache) forget(vm, sid string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range []map[backend.DiskRef]int64{s.cur, s.prev} {
		for ref := range m {
			if ref.VM == vm && ref.Snapshot == sid {
				delete(m, ref)
			}
		}
	}
}

func (c *Client) diskURL(ref backend.DiskRef) string {
	return c.route("vms", ref.VM, "snapshots", ref.Snapshot, "disks", ref.Disk)
}

// diskSize is the size of a snapshot disk: a HEAD of its disk route the
// first time (shared by callers asking at once), the kept answer after. A
// failure is not kept.
func (c *Client) diskSize(ctx context.Context, ref backend.DiskRef) (int64, error) {
	if n, ok := c.sizes.get(ref); ok {
		return n, nil
	}
	gctx := context.WithoutCancel(ctx) // one caller giving up does not fail the others
	ch := c.sizes.flight.DoChan(ref.VM+"\x00"+ref.Snapshot+"\x00"+ref.Disk, func() (any, error) {
		n, err := c.http.Size(gctx, c.diskURL(ref))
		if err != nil {
			return nil, err
		}
		c.sizes.put(ref, n)
		return n, nil
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return 0, r.Err
		}
		return r.Val.(int64), nil
	case <-ctx.Done():
		return 0, fmt.Errorf("size: %w", ctx.Err())
	}
}

// probeSize is diskSize for an answer's budget (sizer): the same kept
// sizes, asked for with fewer attempts.
func (c *Client) probeSize(ctx context.Context, ref backend.DiskRef) (int64, error) {
	if n, ok := c.sizes.get(ref); ok {
		return n, nil
	}
	n, err := c.probe.Size(ctx, c.diskURL(ref))
	if err != nil {
		return 0, err
	}
	c.sizes.put(ref, n)
	return n, nil
}

// mapCache keeps the allocation maps of the disks opened, for the mount: the
// filesystem closes idle disks and opens them again when read, and a disk
// whose map and size are kept opens without a request (the map came from a
// snapshot answer of up to 66 MB). The maps share their extents with those
// the filesystem holds for its open files, so what the cache costs beyond
// them is the maps of disks the filesystem has let go: at most mapKeep
// extents, the least recently opened going first.
type mapCache struct {
	mu    sync.Mutex
	used  int
	lru   list.List // of *keptMap, most recently opened first
	byRef map[backend.DiskRef]*list.Element
}

type keptMap struct {
	ref backend.DiskRef
	m   extent.Map
}

// mapKeep is the most extents mapCache holds: 32 MiB.
const mapKeep = 1 << 21

func (c *mapCache) get(ref backend.DiskRef) (extent.Map, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.byRef[ref]
	if !ok {
		return extent.Map{}, false
	}
	c.lru.MoveToFront(e)
	return e.Value.(*keptMap).m, true
}

// has says whether ref's map is kept, without making it recent.
func (c *mapCache) has(ref backend.DiskRef) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.byRef[ref]
	return ok
}

func (c *mapCache) put(ref backend.DiskRef, m extent.Map) {
	n := max(m.Len(), 1)
	if n > mapKeep {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.byRef == nil {
		c.byRef = map[backend.DiskRef]*list.Element{}
	}
	if e, ok := c.byRef[ref]; ok {
		c.used -= max(e.Value.(*keptMap).m.Len(), 1)
		c.lru.Remove(e)
	}
	c.byRef[ref] = c.lru.PushFront(&keptMap{ref: ref, m: m})
	c.used += n
	for c.used > mapKeep {
		last := c.lru.Back()
		k := last.Value.(*keptMap)
		c.lru.Remove(last)
		delete(c.byRef, k.ref)
		c.used -= max(k.m.Len(), 1)
	}
}

// forget drops the maps of a deleted snapshot's disks.
func (c *mapCache) forget(vm, sid string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for ref, e := range c.byRef {
		if ref.VM == vm && ref.Snapshot == sid {
			c.used -= max(e.Value.(*keptMap).m.Len(), 1)
			c.lru.Remove(e)
			delete(c.byRef, ref)
		}
	}
}
