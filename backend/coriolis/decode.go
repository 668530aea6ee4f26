package coriolis

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync/atomic"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// Snapshot answers are decoded as a stream. A snapshot of a badly fragmented
// disk lists a million chunks (some 64 MB of JSON); reading the body whole
// (with io.ReadAll's growth copies), copying it into a json.Decoder, keeping
// two json.Number strings per chunk and then two copies of the extents took
// a mount past 210 MiB of RSS for one such answer. Here the outer objects
// are walked token by token straight from the body, each chunk is decoded on
// its own (only its few dozen bytes are buffered) into an extent, and the
// body is never held. What stays is 16 bytes per chunk (one extent.Extent,
// two int64s): 16 MB for a million chunks, shared by the cached answer and
// the disk's extent.Map when the list needs no repair (the usual case), a
// normalized copy of as much again when it does. A chunk list that is not
// kept (a listing's, beyond what it may keep) is walked a chunk at a time
// and counted, never held. How large an answer may be at all is budget.go's.
//
// What is accepted is what encoding/json accepted into the shapes in api.go:
// field names in any case, the README's vmID/snapshotID spellings beside the
// server's vm_id/snapshot_id, null for an empty value, a later duplicate key
// winning, unknown fields skipped. One thing is more lenient on purpose: a
// chunk value that cannot be a byte offset (negative, fractional, too large,
// missing, not a number) marks that disk's map hostile, so the disk is read
// whole, instead of failing the answer.

// chunkList is a disk's chunks, decoded into extents: 16 bytes per chunk,
// in one slice of exactly their number. It is never modified after decoding,
// so the disk's extent.Map can share it (extent.NormalizeShared) and a
// cached answer costs nothing beyond the maps of its open disks.
type chunkList struct {
	exts []extent.Extent
	bad  error // the first chunk that is no byte range; then exts is nil
	// phys holds each chunk's physical_start, parallel to exts, only in an
	// unsquashed answer decoded for a delta (8 more bytes per chunk, never
	// cached); nil when not asked for or when some chunk lacks a usable one.
	phys []int64
	// dropped says the list was not kept (a listing keeps only what its
	// keepPool lets it): exts is nil and says nothing of the disk.
	dropped bool
	// pooled is how many extents of a listing's keepPool the list holds.
	pooled int64
}

// chunkMode says what a decode keeps of chunk lists.
type chunkMode int

const (
	chunksSkip  chunkMode = iota // names only (chunks counted, not kept)
	chunksShort                  // extents, as many as the decoder's keepPool lets (keptChunks a list without one); longer lists dropped
	chunksKeep                   // extents
	chunksPhys                   // extents and physical starts
)

// keptChunks is the longest chunk list a snapshot listing keeps when it has
// no keepPool (64 KiB of extents).
const keptChunks = 4096

// keepPool bounds the extents that snapshot listings keep for the disks
// opened next, all listings together: a list is kept while the pool has
// room for it, so that a walk opens the disks of the snapshots it lists
// without a GET of each, while listings of million-extent snapshots keep
// what the pool holds and drop the rest (their disks are then opened with a
// GET of the snapshot). What an opened disk took goes back to the pool (the
// disk's map holds it from then on), as does what its answer held when it
// leaves the cache.
type keepPool struct{ free atomic.Int64 }

func newKeepPool(n int64) *keepPool {
	p := &keepPool{}
	p.free.Store(n)
	return p
}

func (p *keepPool) take(n int64) bool {
	for {
		f := p.free.Load()
		if f < n {
			return false
		}
		if p.free.CompareAndSwap(f, f-n) {
			return true
		}
	}
}

func (p *keepPool) give(n int64) {
	if p != nil && n > 0 {
		p.free.Add(n)
	}
}

// extents returns the chunks; the slice must not be modified.
func (l chunkList) extents() []extent.Extent { return l.exts }

// chunkPages collects extents in fixed pages while their number is unknown:
// appending a million extents to one slice would allocate five times the
// final 16 MB on the way (each growth copies), pages allocate it once and
// the final slice once more.
type chunkPages struct {
	pages [][]extent.Extent
	n     int
}

const chunkPage = 4096 // extents per page: 64 KiB

func (p *chunkPages) add(e extent.Extent) {
	if k := len(p.pages); k == 0 || len(p.pages[k-1]) == cap(p.pages[k-1]) {
		p.pages = append(p.pages, make([]extent.Extent, 0, min(chunkPage, max(p.n, 16))))
	}
	k := len(p.pages) - 1
	p.pages[k] = append(p.pages[k], e)
	p.n++
}

// full says the next add starts a page.
func (p *chunkPages) full() bool {
	k := len(p.pages)
	return k == 0 || len(p.pages[k-1]) == cap(p.pages[k-1])
}

// nextPage is the capacity the next page will have.
func (p *chunkPages) nextPage() int { return min(chunkPage, max(p.n, 16)) }

func (p *chunkPages) flatten() []extent.Extent {
	if p.n == 0 {
		return nil
	}
	out := make([]extent.Extent, 0, p.n)
	for _, pg := range p.pages {
		out = append(out, pg...)
	}
	return out
}

// decoder walks one answer. b bounds it (nil: the bytes are in memory
// already, bounded by whoever read them); pool is what a listing may keep of
// its chunk lists (nil: keptChunks each), keepNone which snapshots keep none.
type decoder struct {
	*json.Decoder
	b    *budget
	pool *keepPool
	// keepNone names the snapshots of a listing whose chunks are not kept
	// at all (nil: none).
	keepNone func(sid string) bool
}

// snapshots reads a JSON array of snapshots, the list route's answer. The
// list carries every snapshot's chunks; listing needs only ids and disk
// names, so lists are kept only as the pool lets (see keepPool), for the
// disks opened next.
func (d *decoder) snapshots(out *[]apiSnapshot) error {
	*out = nil
	return d.array("snapshots", func() error {
		var s apiSnapshot
		err := d.snapshot(&s, chunksShort)
		*out = append(*out, s)
		return err
	})
}

// vmSink takes the VMs of a listing as they are decoded.
type vmSink func(apiVM)

// vms reads a JSON array of VMs one VM at a time into sink: the listing of
// 100,000 VMs is some 36 MB, which a json.Decoder would otherwise buffer
// whole (and grow to 64 MB) before decoding a single VM, and a slice of
// every VM as the server spells it would be as much again.
func (d *decoder) vms(sink vmSink) error {
	return d.array("vms", func() error {
		var v apiVM
		if err := d.vm(&v); err != nil {
			return err
		}
		sink(v)
		return nil
	})
}

// vm reads one VirtualMachine as encoding/json would into apiVM (null is
// the zero VM), with its snapshot ids read one at a time, each raising the
// answer's limit (a VM may have any number of snapshots).
func (d *decoder) vm(v *apiVM) error {
	err := d.object("vm", func(key string) error {
		switch {
		case strings.EqualFold(key, "friendly_name"):
			return d.Decode(&v.FriendlyName)
		case strings.EqualFold(key, "name"):
			return d.Decode(&v.Name)
		case strings.EqualFold(key, "uuid"):
			return d.Decode(&v.UUID)
		case strings.EqualFold(key, "disks"):
			if err := d.Decode(&v.Disks); err != nil {
				return err
			}
			d.b.grant(diskMeta * int64(len(v.Disks)))
			return nil
		case strings.EqualFold(key, "snapshots"):
			return d.stringsInto(&v.Snapshots)
		}
		return d.skip()
	})
	d.b.grant(vmMeta)
	return err
}

// stringsInto reads a JSON array of strings into *out as encoding/json does:
// null is nil, [] an empty slice, elements decoded over those of an earlier
// duplicate key (a null element keeps what was there).
func (d *decoder) stringsInto(out *[]string) error {
	tok, err := d.Token()
	if err != nil {
		return err
	}
	if tok == nil {
		*out = nil
		return nil
	}
	if tok != json.Delim('[') {
		return fmt.Errorf("snapshots: want an array, got %s", tokenKind(tok))
	}
	old, n := *out, 0
	for d.More() {
		if n == len(old) {
			old = append(old, "")
		}
		if err := d.Decode(&old[n]); err != nil {
			return err
		}
		n++
		d.b.grant(idMeta)
	}
	if _, err := d.Token(); err != nil { // ']'
		return err
	}
	if n == 0 {
		*out = []string{}
	} else {
		*out = old[:n]
	}
	return nil
}

// snapshot reads one VMSnapshot object (null is the zero snapshot), keeping
// what mode says of the chunk lists.
func (d *decoder) snapshot(s *apiSnapshot, chunks chunkMode) error {
	*s = apiSnapshot{}
	var vmIDAlt string
	err := d.object("snapshot", func(key string) error {
		switch {
		case strings.EqualFold(key, "id"):
			return d.Decode(&s.ID)
		case strings.EqualFold(key, "vm_id"):
			return d.Decode(&s.VMID)
		case strings.EqualFold(key, "vmID"):
			return d.Decode(&vmIDAlt)
		case strings.EqualFold(key, "disks"):
			d.release(s.Disks)
			s.Disks = nil
			mode := chunks
			if mode == chunksShort && d.keepNone != nil && s.ID != "" && d.keepNone(s.ID) {
				mode = chunksSkip
			}
			return d.array("disks", func() error {
				var ds apiDiskSnapshot
				err := d.diskSnapshot(&ds, mode, s.ID)
				s.Disks = append(s.Disks, ds)
				return err
			})
		}
		return d.skip()
	})
	if s.VMID == "" {
		s.VMID = vmIDAlt
	}
	if err != nil {
		d.release(s.Disks)
	}
	return err
}

// release gives back to the pool what disks' kept lists took.
func (d *decoder) release(disks []apiDiskSnapshot) {
	for i := range disks {
		d.pool.give(disks[i].Chunks.pooled)
		disks[i].Chunks.pooled = 0
	}
}

// diskSnapshot reads one DiskSnapshot object (null is the zero disk) of the
// snapshot sid.
func (d *decoder) diskSnapshot(ds *apiDiskSnapshot, chunks chunkMode, sid string) error {
	*ds = apiDiskSnapshot{}
	var sidAlt string
	owner := func() string { return cmpOr(ds.SnapshotID, sidAlt, sid) }
	err := d.object("disk", func(key string) error {
		switch {
		case strings.EqualFold(key, "name"):
			err := d.Decode(&ds.Name)
			d.b.noteDisk(owner(), ds.Name)
			return err
		case strings.EqualFold(key, "path"):
			err := d.Decode(&ds.Path)
			d.b.notePath(owner(), ds.Path)
			return err
		case strings.EqualFold(key, "snapshot_id"):
			return d.Decode(&ds.SnapshotID)
		case strings.EqualFold(key, "snapshotID"):
			return d.Decode(&sidAlt)
		case strings.EqualFold(key, "chunks"):
			d.pool.give(ds.Chunks.pooled) // a duplicate key: the later list wins
			return d.chunks(&ds.Chunks, chunks)
		}
		return d.skip()
	})
	if ds.SnapshotID == "" {
		ds.SnapshotID = sidAlt
	}
	return err
}

func cmpOr(v ...string) string {
	for _, s := range v {
		if s != "" {
			return s
		}
	}
	return ""
}

// chunks reads a chunk array (null is empty), one element at a time,
// counting each against the answer's budget and keeping what mode says:
// the physical starts too with chunksPhys (all of them, or none when one is
// missing or unusable), nothing with chunksSkip, and with chunksShort the
// list while the pool has room for it (or up to keptChunks without a pool).
func (d *decoder) chunks(l *chunkList, mode chunkMode) error {
	*l = chunkList{}
	if mode == chunksSkip {
		l.dropped = true // nothing kept: the list says nothing of the disk
		return d.array("chunks", func() error {
			if err := d.Decode(&skipper{}); err != nil {
				return err
			}
			return d.b.chunk()
		})
	}
	var pages chunkPages
	var physPages []int64
	physOK := mode == chunksPhys
	limit := 0
	if mode == chunksShort && d.pool == nil {
		limit = keptChunks
	}
	drop := func() {
		l.dropped, pages, physOK, physPages = true, chunkPages{}, false, nil
		d.pool.give(l.pooled)
		l.pooled = 0
	}
	var c chunkValue // reused: one allocation per list, not per chunk
	i := 0
	err := d.array("chunks", func() error {
		if l.bad != nil || l.dropped {
			// Nothing more of the list is kept: check and count.
			if err := d.Decode(&skipper{}); err != nil {
				return err
			}
			return d.b.chunk()
		}
		if err := d.Decode(&c); err != nil {
			return err
		}
		if err := d.b.chunk(); err != nil {
			return err
		}
		switch {
		case limit > 0 && i >= limit:
			drop()
		case c.err != nil:
			l.bad = fmt.Errorf("%w %d: %w", errHostile, i, c.err)
			pages = chunkPages{} // the map is not used: the whole disk is read
			d.pool.give(l.pooled)
			l.pooled = 0
		default:
			if mode == chunksShort && d.pool != nil && pages.full() {
				n := int64(pages.nextPage())
				if !d.pool.take(n) {
					drop()
					break
				}
				l.pooled += n
			}
			pages.add(extent.Extent{Off: c.start, Len: c.length})
			if physOK {
				if c.physErr != nil {
					physOK, physPages = false, nil
				} else {
					physPages = append(physPages, c.phys)
				}
			}
		}
		i++
		return nil
	})
	if err != nil {
		d.pool.give(l.pooled)
		l.pooled = 0
	}
	if err == nil && l.bad == nil && !l.dropped {
		l.exts = pages.flatten()
		// The pages were taken a page at a time: keep only what the list
		// holds.
		d.pool.give(l.pooled - int64(len(l.exts)))
		l.pooled = min(l.pooled, int64(len(l.exts)))
		if physOK {
			l.phys = physPages[:len(physPages):len(physPages)]
			if l.phys == nil {
				l.phys = []int64{}
			}
		}
	}
	return err
}

// object reads an object, calling field for each key; field must consume
// the value. null is an empty object.
func (d *decoder) object(what string, field func(key string) error) error {
	tok, err := d.Token()
	if err != nil || tok == nil {
		return err
	}
	if tok != json.Delim('{') {
		return fmt.Errorf("%s: want an object, got %s", what, tokenKind(tok))
	}
	for d.More() {
		tok, err := d.Token()
		if err != nil {
			return err
		}
		key, _ := tok.(string) // the decoder only gives strings here
		if err := field(key); err != nil {
			return err
		}
	}
	_, err = d.Token() // '}'
	return err
}

// array reads an array, calling elem for each element; elem must consume
// it. null is an empty array.
func (d *decoder) array(what string, elem func() error) error {
	tok, err := d.Token()
	if err != nil || tok == nil {
		return err
	}
	if tok != json.Delim('[') {
		return fmt.Errorf("%s: want an array, got %s", what, tokenKind(tok))
	}
	for d.More() {
		if err := elem(); err != nil {
			return err
		}
	}
	_, err = d.Token() // ']'
	return err
}

func tokenKind(tok json.Token) string {
	switch tok.(type) {
	case nil:
		return "null"
	case json.Delim:
		if tok == json.Delim('{') {
			return "an object"
		}
		return "an array"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	}
	return "a number"
}

// skipper discards one JSON value without copying it.
type skipper struct{}

func (*skipper) UnmarshalJSON([]byte) error { return nil }

// skip discards one value. An array or object is walked one member at a
// time (each member is buffered and checked on its own), so skipping a
// million-chunk list holds one chunk, not the list.
func (d *decoder) skip() error {
	tok, err := d.Token()
	if err != nil {
		return err
	}
	open, ok := tok.(json.Delim)
	if !ok {
		return nil // a scalar: consumed
	}
	for d.More() {
		if open == '{' {
			if _, err := d.Token(); err != nil { // the key
				return err
			}
		}
		if err := d.Decode(&skipper{}); err != nil {
			return err
		}
	}
	_, err = d.Token() // the closing delimiter
	return err
}

// errTrailing is data after the answer's one value.
var errTrailing = errors.New("trailing data")

// decodeSnapshot reads one snapshot from b, unbounded (the bytes are in
// memory), as json.Unmarshal into apiSnapshot does.
func decodeSnapshot(b []byte, s *apiSnapshot) error {
	return (&decoder{Decoder: json.NewDecoder(bytes.NewReader(b))}).snapshot(s, chunksKeep)
}

// decodeDiskSnapshot is decodeSnapshot for one disk.
func decodeDiskSnapshot(b []byte, ds *apiDiskSnapshot) error {
	return (&decoder{Decoder: json.NewDecoder(bytes.NewReader(b))}).diskSnapshot(ds, chunksKeep, "")
}

// chunkValue is one chunk as decoded: its start and length, or why it cannot
// be a byte range. Its UnmarshalJSON never fails, so a bad chunk does not
// fail the answer.
type chunkValue struct {
	start, length int64
	err           error
	phys          int64 // physical_start
	physErr       error // physical_start missing or no offset
}

// UnmarshalJSON parses one chunk from the raw bytes the decoder hands it,
// which it has already checked are one valid JSON value.
func (c *chunkValue) UnmarshalJSON(b []byte) error {
	var physRaw []byte
	c.start, c.length, physRaw, c.err = parseChunkPhys(b)
	c.phys, c.physErr = 0, nil
	if c.err == nil {
		c.phys, c.physErr = chunkNumber(physRaw)
	}
	return nil
}

var (
	keyStart  = []byte("start")
	keyLength = []byte("length")
	keyPhys   = []byte("physical_start")
)

// parseChunk reads "start" and "length" of a chunk object as
// encoding/json would into json.Number fields (keys in any case, a later key
// winning, null leaving the value as it was, any other key ignored) without
// allocating.
func parseChunk(b []byte) (start, length int64, err error) {
	start, length, _, err = parseChunkPhys(b)
	return start, length, err
}

// parseChunkPhys is parseChunk that also returns the raw physical_start
// value (nil when absent or null), shared with b.
func parseChunkPhys(b []byte) (start, length int64, physRaw []byte, err error) {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		if bytes.Equal(bytes.TrimSpace(b), []byte("null")) {
			return 0, 0, nil, errors.New("start: missing")
		}
		return 0, 0, nil, errors.New("not an object")
	}
	var startRaw, lengthRaw []byte
	for i++; ; {
		i = skipSpace(b, i)
		if i >= len(b) {
			return 0, 0, nil, errors.New("not an object")
		}
		if b[i] == '}' {
			break
		}
		if b[i] == ',' {
			i++
			continue
		}
		kEnd := stringEnd(b, i)
		if kEnd < 0 {
			return 0, 0, nil, errors.New("not an object")
		}
		key := b[i:kEnd]
		i = skipSpace(b, kEnd)
		if i >= len(b) || b[i] != ':' {
			return 0, 0, nil, errors.New("not an object")
		}
		i = skipSpace(b, i+1)
		vEnd := valueEnd(b, i)
		if vEnd < 0 {
			return 0, 0, nil, errors.New("not an object")
		}
		val := b[i:vEnd]
		i = vEnd
		if string(val) == "null" {
			continue
		}
		switch {
		case keyIs(key, keyStart):
			startRaw = val
		case keyIs(key, keyLength):
			lengthRaw = val
		case keyIs(key, keyPhys):
			physRaw = val
		}
	}
	if start, err = chunkNumber(startRaw); err != nil {
		return 0, 0, nil, fmt.Errorf("start: %w", err)
	}
	if length, err = chunkNumber(lengthRaw); err != nil {
		return 0, 0, nil, fmt.Errorf("length: %w", err)
	}
	return start, length, physRaw, nil
}

// keyIs compares a quoted JSON key with name the way encoding/json matches
// field names: exactly, else case-insensitively (Unicode simple folding).
func keyIs(quoted, name []byte) bool {
	inner := quoted[1 : len(quoted)-1]
	if bytes.IndexByte(inner, '\\') < 0 {
		return bytes.EqualFold(inner, name)
	}
	var s string
	return json.Unmarshal(quoted, &s) == nil && strings.EqualFold(s, string(name))
}

// chunkNumber reads a byte offset: a JSON integer, or a string holding one
// (json.Number took both), within [0, MaxInt64].
func chunkNumber(raw []byte) (int64, error) {
	if raw == nil {
		return 0, errors.New("missing")
	}
	lit := raw
	if raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return 0, fmt.Errorf("not an offset: %.40q", string(raw))
		}
		lit = []byte(s)
	}
	neg := len(lit) > 0 && lit[0] == '-'
	digits := lit
	if neg {
		digits = lit[1:]
	}
	if len(digits) == 0 || (digits[0] == '0' && len(digits) > 1) {
		return 0, fmt.Errorf("not an offset: %.40q", string(raw))
	}
	var v uint64
	for _, c := range digits {
		if c < '0' || c > '9' || v > (math.MaxUint64-9)/10 {
			return 0, fmt.Errorf("not an offset: %.40q", string(raw))
		}
		v = v*10 + uint64(c-'0')
	}
	switch {
	case neg && v == 0:
		return 0, nil
	case neg && v <= 1<<63:
		return 0, fmt.Errorf("negative: -%d", v)
	case v > math.MaxInt64:
		return 0, fmt.Errorf("not an offset: %.40q", string(raw))
	}
	return int64(v), nil
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// stringEnd returns the index after the JSON string starting at b[i], or -1.
func stringEnd(b []byte, i int) int {
	if i >= len(b) || b[i] != '"' {
		return -1
	}
	for j := i + 1; j < len(b); j++ {
		switch b[j] {
		case '\\':
			j++
		case '"':
			return j + 1
		}
	}
	return -1
}

// valueEnd returns the index after the JSON value starting at b[i], or -1.
func valueEnd(b []byte, i int) int {
	if i >= len(b) {
		return -1
	}
	switch b[i] {
	case '"':
		return stringEnd(b, i)
	case '{', '[':
		depth := 0
		for j := i; j < len(b); j++ {
			switch b[j] {
			case '"':
				if j = stringEnd(b, j); j < 0 {
					return -1
				}
				j-- // the loop's j++ lands after the string
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return j + 1
				}
			}
		}
		return -1
	}
	j := i
	for j < len(b) && !strings.ContainsRune(",}] \t\r\n", rune(b[j])) {
		j++
	}
	return j
}
