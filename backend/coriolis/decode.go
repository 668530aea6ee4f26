package coriolis

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"

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
// normalized copy of as much again when it does.
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
	// dropped says the list was not kept (a listing keeps only short ones):
	// exts is nil and says nothing of the disk.
	dropped bool
}

// chunkMode says what a decode keeps of chunk lists.
type chunkMode int

const (
	chunksSkip  chunkMode = iota // names only
	chunksShort                  // extents of lists up to keptChunks long; longer ones dropped
	chunksKeep                   // extents
	chunksPhys                   // extents and physical starts
)

// keptChunks is the longest chunk list a snapshot listing keeps (64 KiB of
// extents): enough for the disks opened next to need no snapshot GET, while
// the listing of million-extent snapshots (hundreds of MB) keeps nothing.
const keptChunks = 4096

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

// decodeSnapshots reads a JSON array of snapshots, the list route's answer.
// The list carries every snapshot's chunks; listing needs only ids and disk
// names, so only short lists are kept (see keptChunks), for the disks
// opened next.
func decodeSnapshots(dec *json.Decoder, out *[]apiSnapshot) error {
	*out = nil
	return decodeArray(dec, "snapshots", func() error {
		var s apiSnapshot
		err := decodeSnapshotChunks(dec, &s, chunksShort)
		*out = append(*out, s)
		return err
	})
}

// vmSink takes the VMs of a listing as they are decoded.
type vmSink func(apiVM)

// decodeVMs reads a JSON array of VMs one VM at a time into sink: the
// listing of 100,000 VMs is some 36 MB, which a json.Decoder would
// otherwise buffer whole (and grow to 64 MB) before decoding a single VM,
// and a slice of every VM as the server spells it would be as much again.
func decodeVMs(dec *json.Decoder, sink vmSink) error {
	return decodeArray(dec, "vms", func() error {
		var v apiVM
		if err := dec.Decode(&v); err != nil {
			return err
		}
		sink(v)
		return nil
	})
}

// decodeSnapshot reads one VMSnapshot object (null is the zero snapshot).
func decodeSnapshot(dec *json.Decoder, s *apiSnapshot) error {
	return decodeSnapshotChunks(dec, s, chunksKeep)
}

// decodeSnapshotChunks is decodeSnapshot keeping what mode says of the
// chunk lists.
func decodeSnapshotChunks(dec *json.Decoder, s *apiSnapshot, chunks chunkMode) error {
	*s = apiSnapshot{}
	var vmIDAlt string
	err := decodeObject(dec, "snapshot", func(key string) error {
		switch {
		case strings.EqualFold(key, "id"):
			return dec.Decode(&s.ID)
		case strings.EqualFold(key, "vm_id"):
			return dec.Decode(&s.VMID)
		case strings.EqualFold(key, "vmID"):
			return dec.Decode(&vmIDAlt)
		case strings.EqualFold(key, "disks"):
			s.Disks = nil
			return decodeArray(dec, "disks", func() error {
				var d apiDiskSnapshot
				err := decodeDiskSnapshotChunks(dec, &d, chunks)
				s.Disks = append(s.Disks, d)
				return err
			})
		}
		return skipValue(dec)
	})
	if s.VMID == "" {
		s.VMID = vmIDAlt
	}
	return err
}

// decodeDiskSnapshot reads one DiskSnapshot object (null is the zero disk).
func decodeDiskSnapshot(dec *json.Decoder, d *apiDiskSnapshot) error {
	return decodeDiskSnapshotChunks(dec, d, chunksKeep)
}

func decodeDiskSnapshotChunks(dec *json.Decoder, d *apiDiskSnapshot, chunks chunkMode) error {
	*d = apiDiskSnapshot{}
	var sidAlt string
	err := decodeObject(dec, "disk", func(key string) error {
		switch {
		case strings.EqualFold(key, "name"):
			return dec.Decode(&d.Name)
		case strings.EqualFold(key, "path"):
			return dec.Decode(&d.Path)
		case strings.EqualFold(key, "snapshot_id"):
			return dec.Decode(&d.SnapshotID)
		case strings.EqualFold(key, "snapshotID"):
			return dec.Decode(&sidAlt)
		case strings.EqualFold(key, "chunks") && chunks != chunksSkip:
			limit := 0
			if chunks == chunksShort {
				limit = keptChunks
			}
			return decodeChunksMode(dec, &d.Chunks, chunks == chunksPhys, limit)
		}
		return skipValue(dec)
	})
	if d.SnapshotID == "" {
		d.SnapshotID = sidAlt
	}
	return err
}

// decodeChunks reads a chunk array (null is empty), one element at a time.
func decodeChunks(dec *json.Decoder, l *chunkList) error {
	return decodeChunksMode(dec, l, false, 0)
}

// decodeChunksMode is decodeChunks that also keeps the physical starts when
// phys is set (all of them, or none when one is missing or unusable), and
// drops a list longer than limit (0: no limit).
func decodeChunksMode(dec *json.Decoder, l *chunkList, phys bool, limit int) error {
	*l = chunkList{}
	var pages chunkPages
	var physPages []int64
	physOK := phys
	var c chunkValue // reused: one allocation per list, not per chunk
	i := 0
	err := decodeArray(dec, "chunks", func() error {
		if err := dec.Decode(&c); err != nil {
			return err
		}
		switch {
		case l.bad != nil, l.dropped:
		case limit > 0 && i >= limit:
			l.dropped, pages, physOK, physPages = true, chunkPages{}, false, nil
		case c.err != nil:
			l.bad = fmt.Errorf("%w %d: %w", errHostile, i, c.err)
			pages = chunkPages{} // the map is not used: the whole disk is read
		default:
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
	if err == nil && l.bad == nil && !l.dropped {
		l.exts = pages.flatten()
		if physOK {
			l.phys = physPages[:len(physPages):len(physPages)]
			if l.phys == nil {
				l.phys = []int64{}
			}
		}
	}
	return err
}

// decodeObject reads an object, calling field for each key; field must
// consume the value. null is an empty object.
func decodeObject(dec *json.Decoder, what string, field func(key string) error) error {
	tok, err := dec.Token()
	if err != nil || tok == nil {
		return err
	}
	if tok != json.Delim('{') {
		return fmt.Errorf("%s: want an object, got %s", what, tokenKind(tok))
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key, _ := tok.(string) // the decoder only gives strings here
		if err := field(key); err != nil {
			return err
		}
	}
	_, err = dec.Token() // '}'
	return err
}

// decodeArray reads an array, calling elem for each element; elem must
// consume it. null is an empty array.
func decodeArray(dec *json.Decoder, what string, elem func() error) error {
	tok, err := dec.Token()
	if err != nil || tok == nil {
		return err
	}
	if tok != json.Delim('[') {
		return fmt.Errorf("%s: want an array, got %s", what, tokenKind(tok))
	}
	for dec.More() {
		if err := elem(); err != nil {
			return err
		}
	}
	_, err = dec.Token() // ']'
	return err
}

func tokenKind(tok json.Token) string {
	switch tok.(type) {
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

// skipValue discards one value. An array or object is walked one member at
// a time (each member is buffered and checked on its own), so skipping a
// million-chunk list holds one chunk, not the list.
func skipValue(dec *json.Decoder) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	open, ok := tok.(json.Delim)
	if !ok {
		return nil // a scalar: consumed
	}
	for dec.More() {
		if open == '{' {
			if _, err := dec.Token(); err != nil { // the key
				return err
			}
		}
		if err := dec.Decode(&skipper{}); err != nil {
			return err
		}
	}
	_, err = dec.Token() // the closing delimiter
	return err
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
