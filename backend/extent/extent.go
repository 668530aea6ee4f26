// Package extent holds maps of byte ranges: the allocated or changed extents of
// a disk. A Map is always sorted, non-overlapping, non-adjacent and within
// [0, size); every constructor enforces that, so code using a Map never has
// to re-check what a backend sent.
package extent

import (
	"errors"
	"fmt"
	"math"
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

// Map is a normalized list of extents. The zero Map is empty (all hole).
type Map struct {
	exts []Extent
}

// ErrInvalid reports extents that cannot be made safe (negative, overflowing
// or past the end of the disk).
var ErrInvalid = errors.New("invalid extent")

// Normalize validates raw extents against a disk of the given size and returns
// their union as a Map. Unsorted, overlapping, adjacent and empty extents are
// fine (they are sorted and merged); an extent that is negative, overflows or
// runs past size is an error, because a map that disagrees with the disk
// cannot be trusted to say where data is.
func Normalize(raw []Extent, size int64) (Map, error) {
	if size < 0 {
		return Map{}, fmt.Errorf("%w: disk size %d", ErrInvalid, size)
	}
	exts := make([]Extent, 0, len(raw))
	for _, e := range raw {
		if e.Off < 0 || e.Len < 0 || e.Off > math.MaxInt64-e.Len {
			return Map{}, fmt.Errorf("%w: offset %d length %d", ErrInvalid, e.Off, e.Len)
		}
		if e.End() > size {
			return Map{}, fmt.Errorf("%w: offset %d length %d runs past disk size %d", ErrInvalid, e.Off, e.Len, size)
		}
		if e.Len > 0 {
			exts = append(exts, e)
		}
	}
	sort.Slice(exts, func(i, j int) bool { return exts[i].Off < exts[j].Off })
	out := exts[:0]
	for _, e := range exts {
		if n := len(out); n > 0 && e.Off <= out[n-1].End() {
			if e.End() > out[n-1].End() {
				out[n-1].Len = e.End() - out[n-1].Off
			}
			continue
		}
		out = append(out, e)
	}
	if len(out) == 0 {
		return Map{}, nil
	}
	return Map{exts: out}, nil
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

// Format renders the map as the text used in xattrs and by `vmexportfs
// extents`: one extent per line, "<offset> <length>\n", decimal bytes.
func (m Map) Format() string {
	var b strings.Builder
	for _, e := range m.exts {
		b.WriteString(strconv.FormatInt(e.Off, 10))
		b.WriteByte(' ')
		b.WriteString(strconv.FormatInt(e.Len, 10))
		b.WriteByte('\n')
	}
	return b.String()
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
