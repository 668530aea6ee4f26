package qcow2

import (
	"container/list"
	"context"
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"

	"golang.org/x/sync/errgroup"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// Options tune an Image. The zero value is usable.
type Options struct {
	L2CacheBytes int64        // bound of the L2 table cache (default 32 MiB)
	Parallel     int          // compressed clusters decompressed at once (default GOMAXPROCS)
	Logger       *slog.Logger // nil discards
	Name         string       // for errors and logs
}

const (
	defaultL2CacheBytes = 32 << 20
	// maxTableRead bounds one read of adjacent L2 tables at Open: fewer
	// round trips to the bucket, bounded memory.
	maxTableRead = 8 << 20
	// maxCompressedRead bounds one read of adjacent compressed clusters.
	// qemu packs them back to back, often sharing a sector, so clusters
	// whose data touch or overlap are fetched together; a gap is not read
	// through, since what lies there (a normal cluster) is read anyway.
	maxCompressedRead = 4 << 20
)

// L1 and L2 entry bits.
const (
	entryCopied     = 1 << 63
	entryCompressed = 1 << 62
	entryZero       = 1 << 0
	offsetMask      = 0x00fffffffffffe00 // bits 9-55
	l1Reserved      = ^uint64(offsetMask | entryCopied)
	l2Reserved      = ^uint64(offsetMask | entryCopied | entryCompressed | entryZero)
)

type kind uint8

const (
	kindHole kind = iota
	kindZero
	kindData
	kindCompressed
)

// Image is an opened QCOW2 image. It implements backend.Disk; it is safe
// for concurrent use.
type Image struct {
	blob     backend.Blob
	blobSize int64
	name     string
	log      *slog.Logger

	size        int64
	clusterBits uint
	clusterSize int64
	l2Bits      uint // log2 of the entries of one L2 table
	csizeShift  uint // compressed descriptor: where the sector count starts
	csizeMask   uint64
	zstd        bool

	l1    []int64 // host offset of each needed L1 entry's L2 table, 0 when none
	alloc extent.Map
	meta  int64

	cache   *l2Cache
	sem     chan struct{} // decompressions in flight, across all reads
	decomp  *decompressors
	bufPool sync.Pool // *[]byte of one cluster
	closed  atomic.Bool
}

var _ backend.Disk = (*Image)(nil)

// Open reads and checks the header (v2 and v3), the L1 table and every L2
// table (so the allocation map is known at once, and a hostile table is
// refused before any data is served), from blob, a QCOW2 image of
// blob.Size() bytes.
//
// Refused with backend.ErrUnsupported: backing files, external data files,
// encryption, extended L2 entries (subclusters), unknown incompatible
// features or compression types. Refused with backend.ErrUnavailable and
// ErrMalformed: anything out of bounds or pointing where it must not. The
// dirty bit is accepted (only refcounts, which we never read, may be
// stale); the corrupt bit is refused.
func Open(ctx context.Context, blob backend.Blob, opts Options) (*Image, error) {
	im, err := open(ctx, blob, opts)
	if err != nil {
		return nil, fmt.Errorf("qcow2 %s: open: %w", opts.Name, err)
	}
	return im, nil
}

func open(ctx context.Context, blob backend.Blob, opts Options) (*Image, error) {
	if opts.L2CacheBytes <= 0 {
		opts.L2CacheBytes = defaultL2CacheBytes
	}
	if opts.Parallel <= 0 {
		opts.Parallel = runtime.GOMAXPROCS(0)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	blobSize := blob.Size()
	if blobSize < 0 {
		return nil, fmt.Errorf("%w: blob size %d", backend.ErrInvalid, blobSize)
	}
	first := make([]byte, min(blobSize, headerRead))
	if err := blob.ReadAt(ctx, first, 0); err != nil {
		return nil, fmt.Errorf("read header: %w", err)
	}
	h, err := parseHeader(first, blobSize)
	if err != nil {
		return nil, err
	}
	cb := uint(h.clusterBits)
	im := &Image{
		blob:        blob,
		blobSize:    blobSize,
		name:        opts.Name,
		log:         log,
		size:        h.size,
		clusterBits: cb,
		clusterSize: 1 << cb,
		l2Bits:      cb - 3,
		csizeShift:  62 - (cb - 8),
		csizeMask:   1<<(cb-8) - 1,
		zstd:        h.compression == compZstd,
		meta:        int64(len(first)),
		sem:         make(chan struct{}, opts.Parallel),
	}
	im.cache = newL2Cache(max(1, int(min(opts.L2CacheBytes/im.clusterSize, 1<<30))))
	im.decomp = newDecompressors(im.zstd, opts.Parallel, im.clusterSize)
	if err := im.readL1(ctx, h); err != nil {
		return nil, err
	}
	if err := im.readL2(ctx, h, opts.Parallel); err != nil {
		return nil, err
	}
	log.Debug("qcow2 image opened", "name", im.name, "version", h.version, "size", im.size,
		"cluster_size", im.clusterSize, "zstd", im.zstd, "dirty", h.dirty,
		"allocated", im.alloc.Bytes(), "extents", im.alloc.Len(), "metadata_bytes", im.meta)
	if h.dirty {
		log.Info("qcow2 image has the dirty bit set; reading it anyway (only refcounts may be stale)", "name", im.name)
	}
	return im, nil
}

// clusters is the number of virtual clusters, the last one maybe partial.
func (im *Image) clusters() int64 {
	return (im.size + im.clusterSize - 1) >> im.clusterBits
}

// region is a byte range of metadata an L2 table must not overlap.
type region struct {
	what     string
	off, end int64
}

func (im *Image) readL1(ctx context.Context, h *header) error {
	needed := (im.clusters() + 1<<im.l2Bits - 1) >> im.l2Bits
	if int64(h.l1Size) < needed {
		return malformed("L1 table of %d entries does not cover %d bytes (%d entries needed)", h.l1Size, im.size, needed)
	}
	if h.l1Size > MaxL1Entries {
		return malformed("L1 table of %d entries (at most %d)", h.l1Size, MaxL1Entries)
	}
	if needed == 0 {
		return nil
	}
	// Entries past the ones the virtual size needs are never used: they
	// are neither read nor checked, as qemu does not use them either.
	bytes := needed * 8
	switch {
	case h.l1Offset&(im.clusterSize-1) != 0:
		return malformed("L1 table offset %d not cluster-aligned", h.l1Offset)
	case h.l1Offset < im.clusterSize:
		return malformed("L1 table at %d inside the header cluster", h.l1Offset)
	case h.l1Offset > im.blobSize-bytes:
		return malformed("L1 table at %d (%d bytes) past the end of the image (%d bytes)", h.l1Offset, bytes, im.blobSize)
	}
	raw := make([]byte, bytes)
	if err := im.blob.ReadAt(ctx, raw, h.l1Offset); err != nil {
		return fmt.Errorf("read L1 table: %w", err)
	}
	im.meta += bytes
	// The areas an L2 table must not share: a table there would be
	// metadata read as a table, which only a hostile image does.
	forbidden := []region{
		{"header", 0, im.clusterSize},
		{"L1 table", h.l1Offset, h.l1Offset + int64(h.l1Size)*8},
	}
	if h.refcountOff != 0 {
		forbidden = append(forbidden, region{"refcount table", h.refcountOff,
			h.refcountOff + min(int64(h.refcountClus)<<im.clusterBits, im.blobSize)})
	}
	im.l1 = make([]int64, needed)
	for i := range im.l1 {
		e := be64(raw[8*i:])
		if e&l1Reserved != 0 {
			return malformed("L1 entry %d (%#x) has reserved bits set", i, e)
		}
		off := int64(e & offsetMask)
		if off == 0 {
			continue
		}
		if off&(im.clusterSize-1) != 0 {
			return malformed("L1 entry %d: L2 table offset %d not cluster-aligned", i, off)
		}
		if off > im.blobSize-im.clusterSize {
			return malformed("L1 entry %d: L2 table at %d past the end of the image (%d bytes)", i, off, im.blobSize)
		}
		for _, r := range forbidden {
			if off < r.end && r.off < off+im.clusterSize {
				return malformed("L1 entry %d: L2 table at %d overlaps the %s", i, off, r.what)
			}
		}
		im.l1[i] = off
	}
	return nil
}

// dataRun is a run of data clusters (normal or compressed) in one L2 table, in
// entries from the table's start.
type dataRun struct{ start, n uint32 }

// tableInfo is what Open learns from one L2 table.
type tableInfo struct {
	runs []dataRun
	// short lists normal entries whose cluster runs past the end of the
	// image: legal only for the disk's last, partial, cluster.
	short []shortEntry
}

type shortEntry struct {
	i    uint32
	host int64
}

// readL2 reads every distinct L2 table once, in reads of adjacent tables,
// and builds the allocation map from them.
func (im *Image) readL2(ctx context.Context, h *header, parallel int) error {
	offs := make([]int64, 0, len(im.l1))
	for _, off := range im.l1 {
		if off != 0 {
			offs = append(offs, off)
		}
	}
	slices.Sort(offs)
	offs = slices.Compact(offs)
	// Distinct tables are distinct clusters of the blob, so their number
	// (and the memory below) is bounded by the blob's size.
	type batch struct{ first, n int }
	var batches []batch
	perRead := int(maxTableRead >> im.clusterBits)
	for i, off := range offs {
		if n := len(batches); n > 0 {
			b := &batches[n-1]
			if b.n < perRead && offs[b.first+b.n-1]+im.clusterSize == off {
				b.n++
				continue
			}
		}
		batches = append(batches, batch{i, 1})
	}
	infos := make([]*tableInfo, len(offs))
	var runs atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(min(parallel, 4))
	for _, b := range batches {
		g.Go(func() error {
			base := offs[b.first]
			raw := make([]byte, int64(b.n)<<im.clusterBits)
			if err := im.blob.ReadAt(gctx, raw, base); err != nil {
				return fmt.Errorf("read L2 tables at %d: %w", base, err)
			}
			for j := range b.n {
				off := base + int64(j)<<im.clusterBits
				t, info, err := im.decodeTable(raw[int64(j)<<im.clusterBits:][:im.clusterSize], off)
				if err != nil {
					return err
				}
				if runs.Add(int64(len(info.runs))) > MaxExtents {
					return malformed("more than %d data extents", MaxExtents)
				}
				infos[b.first+j] = info
				im.cache.add(off, t)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	im.meta += int64(len(offs)) << im.clusterBits

	var exts []extent.Extent
	for i, off := range im.l1 {
		if off == 0 {
			continue
		}
		j, _ := slices.BinarySearch(offs, off) // offs holds every table
		info := infos[j]
		base := int64(i) << im.l2Bits // first cluster of the table
		for _, s := range info.short {
			c := base + int64(s.i)
			need := im.size - c<<im.clusterBits
			if c != im.clusters()-1 || s.host > im.blobSize-need {
				return malformed("L2 table at %d: entry %d: data cluster at %d past the end of the image (%d bytes)",
					off, s.i, s.host, im.blobSize)
			}
		}
		for _, r := range info.runs {
			start := (base + int64(r.start)) << im.clusterBits
			if start >= im.size {
				break
			}
			end := min((base+int64(r.start)+int64(r.n))<<im.clusterBits, im.size)
			if n := len(exts); n > 0 && exts[n-1].End() == start {
				exts[n-1].Len = end - exts[n-1].Off
				continue
			}
			if len(exts) >= MaxExtents {
				return malformed("more than %d data extents", MaxExtents)
			}
			exts = append(exts, extent.Extent{Off: start, Len: end - start})
		}
	}
	m, _, err := extent.NormalizeShared(exts, im.size)
	if err != nil {
		return fmt.Errorf("allocation map: %w", err)
	}
	im.alloc = m
	return nil
}

// decodeTable checks one L2 table read from host offset off.
func (im *Image) decodeTable(raw []byte, off int64) ([]uint64, *tableInfo, error) {
	t := make([]uint64, len(raw)/8)
	info := &tableInfo{}
	for i := range t {
		e := be64(raw[8*i:])
		t[i] = e
		k, host, csize := im.classify(e)
		switch k {
		case kindData:
			if e&l2Reserved != 0 {
				return nil, nil, malformed("L2 table at %d: entry %d (%#x) has reserved bits set", off, i, e)
			}
			if host&(im.clusterSize-1) != 0 {
				return nil, nil, malformed("L2 table at %d: entry %d: data offset %d not cluster-aligned", off, i, host)
			}
			if host >= im.blobSize {
				return nil, nil, malformed("L2 table at %d: entry %d: data cluster at %d past the end of the image (%d bytes)",
					off, i, host, im.blobSize)
			}
			if host > im.blobSize-im.clusterSize {
				info.short = append(info.short, shortEntry{uint32(i), host})
			}
		case kindCompressed:
			// Compressed data may start mid-sector and run past its host
			// cluster; its last sector may be cut by the end of the file
			// (qemu reads zeros there), but no more than that.
			if host < im.clusterSize {
				return nil, nil, malformed("L2 table at %d: entry %d: compressed data at %d inside the header", off, i, host)
			}
			if host >= im.blobSize || host+csize > (im.blobSize+511)&^511 {
				return nil, nil, malformed("L2 table at %d: entry %d: compressed data at %d (%d bytes) past the end of the image (%d bytes)",
					off, i, host, csize, im.blobSize)
			}
		case kindZero, kindHole:
			if e&l2Reserved != 0 {
				return nil, nil, malformed("L2 table at %d: entry %d (%#x) has reserved bits set", off, i, e)
			}
			if host&(im.clusterSize-1) != 0 {
				return nil, nil, malformed("L2 table at %d: entry %d: offset %d not cluster-aligned", off, i, host)
			}
		}
		if k == kindData || k == kindCompressed {
			if n := len(info.runs); n > 0 && info.runs[n-1].start+info.runs[n-1].n == uint32(i) {
				info.runs[n-1].n++
			} else {
				info.runs = append(info.runs, dataRun{uint32(i), 1})
			}
		}
	}
	return t, info, nil
}

// classify decodes an L2 entry: its kind, host offset and, for compressed
// clusters, the bytes of compressed data.
func (im *Image) classify(e uint64) (kind, int64, int64) {
	if e&entryCompressed != 0 {
		host := int64(e & (1<<im.csizeShift - 1))
		sectors := int64((e>>im.csizeShift)&im.csizeMask) + 1
		return kindCompressed, host, sectors*512 - host&511
	}
	host := int64(e & offsetMask)
	switch {
	case e&entryZero != 0:
		// In v3 the zero flag; qemu honours it in v2 images too.
		return kindZero, host, 0
	case host == 0:
		return kindHole, 0, 0
	}
	return kindData, host, 0
}

// table returns the L2 table of L1 entry i, nil when it has none.
func (im *Image) table(ctx context.Context, i int64) ([]uint64, error) {
	off := im.l1[i]
	if off == 0 {
		return nil, nil
	}
	if t := im.cache.get(off); t != nil {
		return t, nil
	}
	raw := make([]byte, im.clusterSize)
	if err := im.blob.ReadAt(ctx, raw, off); err != nil {
		return nil, fmt.Errorf("read L2 table at %d: %w", off, err)
	}
	// Checked again: the blob is immutable by contract, but a table read
	// twice is not trusted twice.
	t, _, err := im.decodeTable(raw, off)
	if err != nil {
		return nil, err
	}
	im.cache.add(off, t)
	return t, nil
}

// Size is the virtual size.
func (im *Image) Size() int64 { return im.size }

// Allocated is the map of clusters that hold data (normal or compressed);
// zero-flag and unallocated clusters are holes.
func (im *Image) Allocated() extent.Map { return im.alloc }

// ClusterSize is the image's cluster size.
func (im *Image) ClusterSize() int64 { return im.clusterSize }

// MetadataBytes is the bytes of header and tables Open read.
func (im *Image) MetadataBytes() int64 { return im.meta }

// Close releases the caches; it does not close the blob. Reads after Close
// fail.
func (im *Image) Close() error {
	if im.closed.Swap(true) {
		return nil
	}
	im.cache.clear()
	im.decomp.close()
	return nil
}

// piece is a normal-cluster read: n host bytes into p[at:].
type piece struct {
	at, n, host int64
}

// compressed is (part of) one compressed cluster to decompress into dst.
type compressed struct {
	dst         []byte
	inOff       int64 // where dst starts in the cluster
	host, csize int64
}

// ReadAt fills p from virtual offset off: all of p or an error. Consecutive
// host clusters are read with one blob.ReadAt, compressed clusters are
// fetched in reads of adjacent ones and decompressed in parallel.
func (im *Image) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := im.readAt(ctx, p, off); err != nil {
		return fmt.Errorf("qcow2 %s: read %d bytes at %d: %w", im.name, len(p), off, err)
	}
	return nil
}

func (im *Image) readAt(ctx context.Context, p []byte, off int64) error {
	if im.closed.Load() {
		return fmt.Errorf("%w: image closed", backend.ErrInvalid)
	}
	if off < 0 || int64(len(p)) > im.size-off {
		return fmt.Errorf("%w: outside the disk (%d bytes)", backend.ErrInvalid, im.size)
	}
	var (
		pieces []piece
		comps  []compressed
		t      []uint64
		tIdx   = int64(-1)
		end    = off + int64(len(p))
		merge  bool // the cluster before was normal data: a piece may grow
	)
	for pos := off; pos < end; {
		c := pos >> im.clusterBits
		inOff := pos & (im.clusterSize - 1)
		n := min(im.clusterSize-inOff, end-pos)
		at := pos - off
		dst := p[at : at+n]
		pos += n
		wasData := merge
		merge = false
		if i := c >> im.l2Bits; i != tIdx {
			var err error
			if t, err = im.table(ctx, i); err != nil {
				return err
			}
			tIdx = i
		}
		if t == nil {
			clear(dst)
			continue
		}
		k, host, csize := im.classify(t[c&(1<<im.l2Bits-1)])
		switch k {
		case kindHole, kindZero:
			clear(dst)
		case kindData:
			host += inOff
			merge = true
			if last := len(pieces) - 1; wasData && pieces[last].host+pieces[last].n == host {
				pieces[last].n += n
				continue
			}
			pieces = append(pieces, piece{at, n, host})
		case kindCompressed:
			comps = append(comps, compressed{dst, inOff, host, csize})
		}
	}
	for _, pc := range pieces {
		if pc.host > im.blobSize-pc.n {
			return malformed("data at %d past the end of the image (%d bytes)", pc.host, im.blobSize)
		}
		if err := im.blob.ReadAt(ctx, p[pc.at:pc.at+pc.n], pc.host); err != nil {
			return fmt.Errorf("read data at %d: %w", pc.host, err)
		}
	}
	return im.readCompressed(ctx, comps)
}

// readCompressed fetches compressed clusters in reads of neighbours, then
// decompresses them in parallel, at most Options.Parallel at once across
// all reads.
func (im *Image) readCompressed(ctx context.Context, comps []compressed) error {
	for len(comps) > 0 {
		start := comps[0].host
		end := start + comps[0].csize
		n := 1
		for ; n < len(comps); n++ {
			c := comps[n]
			cend := max(end, c.host+c.csize)
			if c.host < start || c.host > end || cend-start > maxCompressedRead {
				break
			}
			end = cend
		}
		batch := comps[:n]
		comps = comps[n:]
		// The last sector of the last cluster may be cut by the end of
		// the file (checked at Open to be no more than that): qemu reads
		// zeros there, and so does the zero tail of buf.
		buf := make([]byte, end-start)
		if err := im.blob.ReadAt(ctx, buf[:min(end, im.blobSize)-start], start); err != nil {
			return fmt.Errorf("read compressed data at %d: %w", start, err)
		}
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(cap(im.sem))
		for _, c := range batch {
			g.Go(func() error {
				select {
				case im.sem <- struct{}{}:
				case <-gctx.Done():
					return gctx.Err()
				}
				defer func() { <-im.sem }()
				return im.decompress(buf[c.host-start:][:c.csize], c)
			})
		}
		if err := g.Wait(); err != nil {
			return err
		}
	}
	return nil
}

func (im *Image) decompress(src []byte, c compressed) error {
	out := c.dst
	if c.inOff != 0 || int64(len(c.dst)) != im.clusterSize {
		bp, _ := im.bufPool.Get().(*[]byte)
		if bp == nil {
			b := make([]byte, im.clusterSize)
			bp = &b
		}
		defer im.bufPool.Put(bp)
		out = *bp
	}
	if err := im.decomp.decompress(out, src); err != nil {
		return malformed("compressed cluster at %d (%d bytes): %v", c.host, c.csize, err)
	}
	if &out[0] != &c.dst[0] {
		copy(c.dst, out[c.inOff:])
	}
	return nil
}

// l2Cache is an LRU of decoded L2 tables keyed by host offset (so tables
// shared by two L1 entries are held once), bounded in tables.
type l2Cache struct {
	mu    sync.Mutex
	max   int
	lru   *list.List // of *cacheItem, most recently used first
	items map[int64]*list.Element
}

type cacheItem struct {
	off int64
	t   []uint64
}

func newL2Cache(maxTables int) *l2Cache {
	return &l2Cache{max: maxTables, lru: list.New(), items: make(map[int64]*list.Element)}
}

func (c *l2Cache) get(off int64) []uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.items[off]
	if e == nil {
		return nil
	}
	c.lru.MoveToFront(e)
	return e.Value.(*cacheItem).t
}

func (c *l2Cache) add(off int64, t []uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.items[off]; e != nil {
		c.lru.MoveToFront(e)
		return
	}
	if c.lru.Len() >= c.max {
		old := c.lru.Back()
		c.lru.Remove(old)
		delete(c.items, old.Value.(*cacheItem).off)
	}
	c.items[off] = c.lru.PushFront(&cacheItem{off, t})
}

func (c *l2Cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Len()
}

func (c *l2Cache) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.lru.Init()
	clear(c.items)
}
