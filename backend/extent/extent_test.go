package extent

import (
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestNormalize(t *testing.T) {
	tests := []struct {
		name    string
		raw     []Extent
		size    int64
		want    []Extent
		wantErr bool
	}{
		{"empty", nil, 100, nil, false},
		{"sorted", []Extent{{0, 10}, {20, 10}}, 100, []Extent{{0, 10}, {20, 10}}, false},
		{"unsorted", []Extent{{20, 10}, {0, 10}}, 100, []Extent{{0, 10}, {20, 10}}, false},
		{"overlap", []Extent{{0, 15}, {10, 10}}, 100, []Extent{{0, 20}}, false},
		{"adjacent", []Extent{{0, 10}, {10, 10}}, 100, []Extent{{0, 20}}, false},
		{"contained", []Extent{{0, 50}, {10, 10}}, 100, []Extent{{0, 50}}, false},
		{"zero length dropped", []Extent{{5, 0}}, 100, nil, false},
		{"negative offset", []Extent{{-1, 10}}, 100, nil, true},
		{"negative length", []Extent{{1, -10}}, 100, nil, true},
		{"past end", []Extent{{90, 20}}, 100, nil, true},
		{"overflow", []Extent{{1 << 62, 1<<63 - 1}}, 1<<63 - 1, nil, true},
		{"negative size", nil, -1, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := Normalize(tt.raw, tt.size)
			if tt.wantErr {
				require.ErrorIs(t, err, ErrInvalid)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, m.Extents())
		})
	}
}

func TestSeek(t *testing.T) {
	m, err := Normalize([]Extent{{10, 10}, {40, 10}}, 100)
	require.NoError(t, err)
	tests := []struct {
		off       int64
		data      int64
		hasData   bool
		hole      int64
		contains4 bool
		overlaps4 bool
	}{
		{0, 10, true, 0, false, false},
		{8, 10, true, 8, false, true},
		{10, 10, true, 20, true, true},
		{19, 19, true, 20, false, true},
		{20, 40, true, 20, false, false},
		{45, 45, true, 50, true, true},
		{50, 0, false, 50, false, false},
		{99, 0, false, 99, false, false},
	}
	for _, tt := range tests {
		d, ok := m.SeekData(tt.off)
		assert.Equal(t, tt.hasData, ok, "SeekData(%d)", tt.off)
		if ok {
			assert.Equal(t, tt.data, d, "SeekData(%d)", tt.off)
		}
		assert.Equal(t, tt.hole, m.SeekHole(tt.off, 100), "SeekHole(%d)", tt.off)
		assert.Equal(t, tt.contains4, m.Contains(tt.off, 4), "Contains(%d,4)", tt.off)
		assert.Equal(t, tt.overlaps4, m.Overlaps(tt.off, 4), "Overlaps(%d,4)", tt.off)
	}
	assert.Equal(t, []Extent{{15, 5}, {40, 5}}, m.Clip(15, 30))
	assert.Equal(t, int64(20), m.Bytes())
	assert.Equal(t, int64(100), Full(100).SeekHole(0, 100))
}

func TestFormatParse(t *testing.T) {
	m, err := Normalize([]Extent{{0, 4096}, {1 << 20, 512}}, 2<<20)
	require.NoError(t, err)
	assert.Equal(t, "0 4096\n1048576 512\n", m.Format())
	back, err := Parse(m.Format(), 2<<20)
	require.NoError(t, err)
	assert.Equal(t, m, back)

	empty, err := Parse("", 10)
	require.NoError(t, err)
	assert.Equal(t, 0, empty.Len())

	for _, bad := range []string{"x", "1", "1 2 3", "-1 5", "0 11", "\n\n"} {
		_, err := Parse(bad, 10)
		assert.ErrorIs(t, err, ErrInvalid, "Parse(%q)", bad)
	}
}

func FuzzParse(f *testing.F) {
	f.Add("0 4096\n1048576 512\n", int64(2<<20))
	f.Add("5 5\n0 7\n", int64(10))
	f.Fuzz(func(t *testing.T, s string, size int64) {
		m, err := Parse(s, size)
		if err != nil {
			return
		}
		prevEnd := int64(-1)
		for _, e := range m.Extents() {
			if e.Len <= 0 || e.Off <= prevEnd || e.End() > size {
				t.Fatalf("not normalized: %v (size %d)", m.Extents(), size)
			}
			prevEnd = e.End()
		}
		again, err := Parse(m.Format(), size)
		if err != nil || again.Format() != m.Format() {
			t.Fatalf("round trip: %v %q %q", err, m.Format(), again.Format())
		}
	})
}

func TestNormalizeReport(t *testing.T) {
	tests := []struct {
		name       string
		raw        []Extent
		want       []Extent
		rep        Repairs
		suspicious bool
	}{
		{"clean", []Extent{{0, 10}, {20, 10}}, []Extent{{0, 10}, {20, 10}}, Repairs{}, false},
		{"adjacent is routine", []Extent{{0, 10}, {10, 10}, {20, 5}}, []Extent{{0, 25}}, Repairs{Adjacent: 2}, false},
		{"empty is harmless", []Extent{{0, 10}, {50, 0}}, []Extent{{0, 10}}, Repairs{Empty: 1}, false},
		{"unsorted", []Extent{{20, 10}, {0, 10}, {40, 1}}, []Extent{{0, 10}, {20, 10}, {40, 1}}, Repairs{Unsorted: 1}, true},
		{"overlapping", []Extent{{0, 15}, {10, 10}, {12, 2}}, []Extent{{0, 20}}, Repairs{Overlapping: 2}, true},
		{"unsorted and adjacent", []Extent{{10, 10}, {0, 10}}, []Extent{{0, 20}}, Repairs{Unsorted: 1, Adjacent: 1}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			raw := append([]Extent(nil), tt.raw...)
			m, rep, err := NormalizeReport(raw, 100)
			require.NoError(t, err)
			assert.Equal(t, tt.want, m.Extents())
			assert.Equal(t, tt.rep, rep)
			assert.Equal(t, tt.suspicious, rep.Suspicious())
			assert.Equal(t, tt.raw, raw, "input left alone")
		})
	}
}

func TestRunsAndZeroHoles(t *testing.T) {
	m, err := Normalize([]Extent{{10, 2}, {20, 2}, {30, 2}, {100, 5}, {200, 50}}, 1000)
	require.NoError(t, err)
	tests := []struct {
		name        string
		off, n, gap int64
		want        []Extent
	}{
		{"no merging", 0, 1000, 0, m.Clip(0, 1000)},
		{"small gaps merged", 0, 1000, 8, []Extent{{10, 22}, {100, 5}, {200, 50}}},
		{"gap bound is inclusive", 0, 1000, 68, []Extent{{10, 95}, {200, 50}}},
		{"everything", 0, 1000, 1000, []Extent{{10, 240}}},
		{"cut to the range", 21, 200, 8, []Extent{{21, 11}, {100, 5}, {200, 21}}},
		{"hole only", 40, 50, 1000, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			runs := m.Runs(tt.off, tt.n, tt.gap)
			assert.Equal(t, tt.want, runs)
			// Runs then ZeroHoles leaves exactly the data, and every data
			// byte lies in a run.
			p := make([]byte, tt.n)
			for i := range p {
				p[i] = 0xEE
			}
			m.ZeroHoles(p, tt.off)
			for i, b := range p {
				pos := tt.off + int64(i)
				assert.Equal(t, m.Contains(pos, 1), b == 0xEE, "byte %d", pos)
				if m.Contains(pos, 1) {
					in := false
					for _, r := range runs {
						in = in || (r.Off <= pos && pos < r.End())
					}
					assert.True(t, in, "data byte %d outside every run", pos)
				}
			}
		})
	}
}

func TestWithoutHolesUnder(t *testing.T) {
	m, err := Normalize([]Extent{{10, 2}, {20, 2}, {30, 2}, {100, 5}, {200, 50}}, 1000)
	require.NoError(t, err)
	tests := []struct {
		name string
		n    int64
		want []Extent
	}{
		{"zero keeps every hole", 0, m.Extents()},
		{"one keeps every hole", 1, m.Extents()},
		{"holes shorter than 9", 9, []Extent{{10, 22}, {100, 5}, {200, 50}}},
		{"a hole of exactly n stays", 8, m.Extents()},
		{"holes shorter than 96", 96, []Extent{{10, 240}}},
		{"the holes at either end stay", 1 << 40, []Extent{{10, 240}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := m.WithoutHolesUnder(tt.n)
			assert.Equal(t, tt.want, got.Extents())
			// Still a normalized map of the same disk, holding all of m.
			again, err := Normalize(got.Extents(), 1000)
			require.NoError(t, err)
			assert.Equal(t, got.Extents(), again.Extents())
			assert.Zero(t, m.Subtract(got).Len(), "data of m outside the result")
		})
	}
	assert.Zero(t, Map{}.WithoutHolesUnder(64).Len())
	kept := m.WithoutHolesUnder(8)
	assert.Same(t, &m.Extents()[0], &kept.Extents()[0], "no hole under n: the map itself, not a copy")
}

func TestWriteToMatchesFormat(t *testing.T) {
	var raw []Extent
	for i := range int64(20000) { // many 64 KiB pieces
		raw = append(raw, Extent{i * 1000003, 1 + i%977})
	}
	raw = append(raw, Extent{1<<62 - 1<<40, 1 << 40})
	m, err := Normalize(raw, 1<<62)
	require.NoError(t, err)
	var b strings.Builder
	n, err := m.WriteTo(&b)
	require.NoError(t, err)
	assert.Equal(t, int64(b.Len()), n)
	var want strings.Builder
	for _, e := range m.Extents() {
		want.WriteString(strconv.FormatInt(e.Off, 10) + " " + strconv.FormatInt(e.Len, 10) + "\n")
	}
	assert.Equal(t, want.String(), b.String())
	assert.Equal(t, want.String(), m.Format())
	assert.Equal(t, "", Map{}.Format())
}

func TestNormalizeShared(t *testing.T) {
	clean := []Extent{{0, 10}, {20, 10}}
	m, rep, err := NormalizeShared(clean, 100)
	require.NoError(t, err)
	assert.Equal(t, Repairs{}, rep)
	assert.Same(t, &clean[0], &m.Extents()[0], "a normalized list is shared, not copied")

	for _, raw := range [][]Extent{{{20, 10}, {0, 10}}, {{0, 10}, {10, 10}}, {{0, 0}, {5, 1}}} {
		in := append([]Extent(nil), raw...)
		m, _, err := NormalizeShared(in, 100)
		require.NoError(t, err)
		assert.Equal(t, raw, in, "input left alone")
		want, err := Normalize(raw, 100)
		require.NoError(t, err)
		assert.Equal(t, want, m)
	}
	_, _, err = NormalizeShared([]Extent{{90, 20}}, 100)
	assert.ErrorIs(t, err, ErrInvalid)
	_, _, err = NormalizeShared(nil, -1)
	assert.ErrorIs(t, err, ErrInvalid)
	m, _, err = NormalizeShared(nil, 0)
	require.NoError(t, err)
	assert.Zero(t, m.Len())
}
