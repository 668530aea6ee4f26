package extent

import (
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
