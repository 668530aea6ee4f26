// Package extent holds maps of byte ranges: the allocated or changed extents of
// a disk. A Map is always sorted, non-overlapping, non-adjacent and within
// [0, size); every constructor enforces that, so code using a Map never has
// to re-check what a backend sent.
package extent

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// Extent is the byte range [Off, Off+Len).
type Extent struct {
	Off, Len int64
}

// End is the first byte after the extent.
func (e Extent) End() int64 { return e.Off + e.Len }

// Map is a normalized list of extents. The zero Map is empty (all hole). It
// holds 16 bytes per extent (two int64s, in one slice): a map of 1,000,000
// extents is 16 MB.
type Map struct {
	exts []Extent
}

// ErrInvalid reports extents that cannot be made safe (negative, overflowing
// or past the end of the disk).
var ErrInvalid = errors.New("invalid extent")

// Repairs counts what Normalize had to fix in its input.
//
// Only Unsorted and Overlapping say the source sent a wrong map (see
// Suspicious). Adjacent extents are routine: FIEMAP splits a file's extents
// wherever their physical blocks are not contiguous, so a Coriolis exporter
// asked not to squash (or one whose squash keeps physical boundaries) lists
// many touching extents, and merging them is the normal, silent case. Empty
// extents are counted for the same report but are harmless.
type Repairs struct {
	Unsorted    int // extents that start before the extent listed before them
	Overlapping int // extents sharing bytes with an earlier one, in sorted order
	Adjacent    int // extents that start where the one before ends, merged into it
	Empty       int // zero-length extents, dropped
}

// Suspicious reports a map that was unsorted or overlapping: worth one warning
// per map, since a well-behaved platform never sends one.
func (r Repairs) Suspicious() bool { return r.Unsorted+r.Overlapping > 0 }

// Normalize validates raw extents against a disk of the given size and returns
// their union as a Map. Unsorted, overlapping, adjacent and empty extents are
// fine (they are sorted and merged); an extent that is negative, overflows or
// runs past size is an error, because a map that disagrees with the disk
// cannot be trusted to say where data is. raw is not modified.
func Normalize(raw []Extent, size int64) (Map, error) {
	m, _, err := NormalizeReport(raw, size)
	return m, err
}

// NormalizeReport is Normalize that also says what it repaired, so a backend
// can log one line per map it had to fix. raw is not modified.
func NormalizeReport(raw []Extent, size int64) (Map, Repairs, error) {
	return normalize(make([]Extent, 0, len(raw)), raw, size)
}

// NormalizeShared is NormalizeReport for a list that is never modified
// again (a decoded answer kept in a cache): when raw is already normalized,
// as a platform's map usually is, the Map shares its array instead of
// copying it, so a map of a million extents is held once (16 MB), not twice.
// Otherwise raw is left alone and the Map is a normalized copy.
func NormalizeShared(raw []Extent, size int64) (Map, Repairs, error) {
	if size >= 0 && normalized(raw, size) {
		if len(raw) == 0 {
			return Map{}, Repairs{}, nil
		}
		return Map{exts: raw[:len(raw):len(raw)]}, Repairs{}, nil
	}
	return NormalizeReport(raw, size)
}

// normalized reports whether raw already satisfies Map's invariant.
func normalized(raw []Extent, size int64) bool {
	end := int64(-1)
	for _, e := range raw {
		if e.Len <= 0 || e.Off <= end || e.Off > size-e.Len {
			return false
		}
		end = e.End()
	}
	return true
}

func normalize(exts, raw []Extent, size int64) (Map, Repairs, error) {
	var rep Repairs
	if size < 0 {
		return Map{}, rep, fmt.Errorf("%w: disk size %d", ErrInvalid, size)
	}
	for _, e := range raw {
		if e.Off < 0 || e.Len < 0 || e.Off > math.MaxInt64-e.Len {
			return Map{}, rep, fmt.Errorf("%w: offset %d length %d", ErrInvalid, e.Off, e.Len)
		}
		if e.End() > size {
			return Map{}, rep, fmt.Errorf("%w: offset %d length %d runs past disk size %d", ErrInvalid, e.Off, e.Len, size)
		}
		if e.Len == 0 {
			rep.Empty++
			continue
		}
		if n := len(exts); n > 0 && e.Off < exts[n-1].Off {
			rep.Unsorted++
		}
		exts = append(exts, e)
	}
	if rep.Unsorted > 0 {
		slices.SortFunc(exts, func(a, b Extent) int { return cmp.Compare(a.Off, b.Off) })
	}
	out := exts[:0]
	for _, e := range exts {
		if n := len(out); n > 0 && e.Off <= out[n-1].End() {
			if e.Off < out[n-1].End() {
				rep.Overlapping++
			} else {
				rep.Adjacent++
			}
			if e.End() > out[n-1].End() {
				out[n-1].Len = e.End() - out[n-1].Off
			}
			continue
		}
		out = append(out, e)
	}
	if len(out) == 0 {
		return Map{}, rep, nil
	}
	// Merging left spare capacity behind (a map of adjacent extents shrinks
	// to one): give it back rather than hold it for the map's lifetime.
	if cap(out)-len(out) > len(out) {
		out = slices.Clone(out)
	}
	return Map{exts: out}, rep, nil
}

// Full is a map with all of [0, size) as data.
func Full(size int64) Map {
	if size <= 0 {
		return Map{}
	}
	return Map{exts: []Extent{{0, size}}}
}

// Extents returns the extents in order. The slice must not be modified.
func (m Map) Extents() []Extent { return m.exts }

// Len is the number of extents.
func (m Map) Len() int { return len(m.exts) }

// Bytes is the total length of all extents.
func (m Map) Bytes() int64 {
	var n int64
	for _, e := range m.exts {
		n += e.Len
	}
	return n
}

// first returns the index of the first extent ending after off.
func (m Map) first(off int64) int {
	return sort.Search(len(m.exts), func(i int) bool { return m.exts[i].End() > off })
}

// SeekData returns the first data offset >= off, and false when there is no
// data at or after off (lseek's ENXIO).
func (m Map) SeekData(off int64) (int64, bool) {
	i := m.first(off)
	if i == len(m.exts) {
		return 0, false
	}
	return max(off, m.exts[i].Off), true
}

// SeekHole returns the first hole offset >= off on a disk of the given size;
// the end of the disk counts as a hole.
func (m Map) SeekHole(off, size int64) int64 {
	i := m.first(off)
	if i == len(m.exts) || off < m.exts[i].Off {
		return min(off, size)
	}
	return min(m.exts[i].End(), size)
}

// Contains reports whether every byte of [off, off+n) is data.
func (m Map) Contains(off, n int64) bool {
	if n <= 0 {
		return true
	}
	i := m.first(off)
	return i < len(m.exts) && m.exts[i].Off <= off && m.exts[i].End() >= off+n
}

// Overlaps reports whether any byte of [off, off+n) is data.
func (m Map) Overlaps(off, n int64) bool {
	i := m.first(off)
	return n > 0 && i < len(m.exts) && m.exts[i].Off < off+n
}

// DataIn is how many bytes of [off, off+n) are data.
func (m Map) DataIn(off, n int64) int64 {
	var sum int64
	for i := m.first(off); i < len(m.exts) && m.exts[i].Off < off+n; i++ {
		sum += min(m.exts[i].End(), off+n) - max(m.exts[i].Off, off)
	}
	return sum
}

// Clip returns the data extents inside [off, off+n), cut to that range.
func (m Map) Clip(off, n int64) []Extent {
	var out []Extent
	for i := m.first(off); i < len(m.exts) && m.exts[i].Off < off+n; i++ {
		e := m.exts[i]
		lo, hi := max(e.Off, off), min(e.End(), off+n)
		out = append(out, Extent{lo, hi - lo})
	}
	return out
}

// Runs covers the data inside [off, off+n) with as few ranges as it can
// without spanning a hole longer than maxGap: consecutive extents (cut to the
// range) whose hole between them is at most maxGap bytes form one run, which
// then includes that hole. A reader fetches each run with one request and
// zeroes the holes inside (ZeroHoles), so many small extents cost few
// requests while the bytes read past the data stay below maxGap per hole.
// maxGap 0 gives the extents themselves (Clip).
func (m Map) Runs(off, n, maxGap int64) []Extent {
	var out []Extent
	for i := m.first(off); i < len(m.exts) && m.exts[i].Off < off+n; i++ {
		e := m.exts[i]
		lo, hi := max(e.Off, off), min(e.End(), off+n)
		if k := len(out); k > 0 && lo-out[k-1].End() <= maxGap {
			out[k-1].Len = hi - out[k-1].Off
			continue
		}
		out = append(out, Extent{lo, hi - lo})
	}
	return out
}

// WithoutHolesUnder returns m with every hole between two extents that is
// shorter than n made data; the holes before the first extent and after the
// last stay. A map with no such hole is returned as it is, not copied (a
// million extents are 16 MB).
func (m Map) WithoutHolesUnder(n int64) Map {
	short := false
	for i := 1; i < len(m.exts) && !short; i++ {
		short = m.exts[i].Off-m.exts[i-1].End() < n
	}
	if !short {
		return m
	}
	return Map{exts: m.Runs(0, m.exts[len(m.exts)-1].End(), n-1)}
}

// ZeroHoles clears every byte of p, which holds [off, off+len(p)), that is
// not data in m: what a run read from the backend brought in from holes.
func (m Map) ZeroHoles(p []byte, off int64) {
	end := off + int64(len(p))
	pos := off
	for i := m.first(off); i < len(m.exts) && m.exts[i].Off < end && pos < end; i++ {
		if e := m.exts[i]; e.Off > pos {
			clear(p[pos-off : e.Off-off])
		}
		pos = min(m.exts[i].End(), end)
	}
	if pos < end {
		clear(p[pos-off:])
	}
}

// Format renders the map as the text used in xattrs and by `vmexportfs
// extents`: one extent per line, "<offset> <length>\n", decimal bytes.
func (m Map) Format() string {
	var b strings.Builder
	m.WriteTo(&b)
	return b.String()
}

// WriteTo writes Format's text to w in pieces of at most 64 KiB, without
// building it whole (a million extents are some 20 MB of text): hashing a
// large map costs one small buffer.
func (m Map) WriteTo(w io.Writer) (int64, error) {
	const piece = 64 << 10
	var total int64
	buf := make([]byte, 0, min(piece, 42*len(m.exts))) // 42: the longest line
	for i, e := range m.exts {
		buf = strconv.AppendInt(buf, e.Off, 10)
		buf = append(buf, ' ')
		buf = strconv.AppendInt(buf, e.Len, 10)
		buf = append(buf, '\n')
		if len(buf) > piece-42 || i == len(m.exts)-1 {
			n, err := w.Write(buf)
			total += int64(n)
			if err != nil {
				return total, err
			}
			buf = buf[:0]
		}
	}
	return total, nil
}

// Parse reads the Format text back and normalizes it against size.
func Parse(s string, size int64) (Map, error) {
	var raw []Extent
	for n, line := range strings.Split(strings.TrimSuffix(s, "\n"), "\n") {
		if line == "" && n == 0 {
			continue
		}
		offStr, lenStr, ok := strings.Cut(line, " ")
		if !ok {
			return Map{}, fmt.Errorf("%w: line %d: want \"<offset> <length>\"", ErrInvalid, n+1)
		}
		off, err1 := strconv.ParseInt(offStr, 10, 64)
		length, err2 := strconv.ParseInt(lenStr, 10, 64)
		if err := errors.Join(err1, err2); err != nil {
			return Map{}, fmt.Errorf("%w: line %d: %v", ErrInvalid, n+1, err)
		}
		raw = append(raw, Extent{off, length})
	}
	return Normalize(raw, size)
}

// Union is every byte in m or o.
func (m Map) Union(o Map) Map {
	raw := make([]Extent, 0, len(m.exts)+len(o.exts))
	raw = append(append(raw, m.exts...), o.exts...)
	// Both inputs are already valid, so the only work left is merging.
	u, _ := Normalize(raw, math.MaxInt64)
	return u
}

// Subtract is every byte in m that is not in o.
func (m Map) Subtract(o Map) Map {
	var out []Extent
	j := 0
	for _, e := range m.exts {
		off, end := e.Off, e.End()
		for j < len(o.exts) && o.exts[j].End() <= off {
			j++
		}
		for k := j; k < len(o.exts) && o.exts[k].Off < end; k++ {
			if o.exts[k].Off > off {
				out = append(out, Extent{off, o.exts[k].Off - off})
			}
			off = max(off, o.exts[k].End())
		}
		if off < end {
			out = append(out, Extent{off, end - off})
		}
	}
	return Map{exts: out}
}
