package extent

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestUnionSubtract(t *testing.T) {
	mk := func(ex ...Extent) Map {
		m, err := Normalize(ex, 1000)
		require.NoError(t, err)
		return m
	}
	for _, tc := range []struct {
		name          string
		a, b          Map
		union, aMinus []Extent
	}{
		{"empty", mk(), mk(), nil, nil},
		{"disjoint", mk(Extent{0, 10}), mk(Extent{20, 10}), []Extent{{0, 10}, {20, 10}}, []Extent{{0, 10}}},
		{"adjacent merge", mk(Extent{0, 10}), mk(Extent{10, 10}), []Extent{{0, 20}}, []Extent{{0, 10}}},
		{"hole in middle", mk(Extent{0, 100}), mk(Extent{10, 10}, Extent{50, 10}), []Extent{{0, 100}}, []Extent{{0, 10}, {20, 30}, {60, 40}}},
		{"covered", mk(Extent{10, 10}), mk(Extent{0, 100}), []Extent{{0, 100}}, nil},
		{"overlap edges", mk(Extent{10, 20}, Extent{40, 20}), mk(Extent{25, 20}), []Extent{{10, 50}}, []Extent{{10, 15}, {45, 15}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.union, tc.a.Union(tc.b).Extents())
			assert.Equal(t, tc.aMinus, tc.a.Subtract(tc.b).Extents())
		})
	}
}

func FuzzSubtract(f *testing.F) {
	f.Add(int64(0), int64(10), int64(5), int64(10), int64(30), int64(4))
	f.Fuzz(func(t *testing.T, a0, a1, b0, b1, c0, c1 int64) {
		const size = 256
		norm := func(off, n int64) Extent { return Extent{((off % size) + size) % size, ((n % 64) + 64) % 64} }
		ea, eb, ec := norm(a0, a1), norm(b0, b1), norm(c0, c1)
		for _, e := range []*Extent{&ea, &eb, &ec} {
			if e.End() > size {
				e.Len = size - e.Off
			}
		}
		a, err := Normalize([]Extent{ea, ec}, size)
		require.NoError(t, err)
		b, err := Normalize([]Extent{eb}, size)
		require.NoError(t, err)
		diff, union := a.Subtract(b), a.Union(b)
		for off := int64(0); off < size; off++ {
			inA, inB := a.Contains(off, 1), b.Contains(off, 1)
			require.Equal(t, inA && !inB, diff.Contains(off, 1), "subtract at %d", off)
			require.Equal(t, inA || inB, union.Contains(off, 1), "union at %d", off)
		}
	})
}
