package fs

import (
	"math"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

func TestSplitPage(t *testing.T) {
	tests := []struct {
		in   string
		name string
		from int64
		ok   bool
	}{
		{"user.vmexport.extents", "user.vmexport.extents", 0, false},
		{"user.vmexport.extents@0", "user.vmexport.extents", 0, true},
		{"user.vmexport.changed.a@b@42", "user.vmexport.changed.a@b", 42, true},
		{"user.vmexport.changed.a@-1", "user.vmexport.changed.a@-1", 0, false},
		{"user.vmexport.changed.a@x", "user.vmexport.changed.a@x", 0, false},
		{"user.vmexport.changed.a@+5", "user.vmexport.changed.a@+5", 0, false},
		{"user.vmexport.changed.a@05", "user.vmexport.changed.a@05", 0, false},
		{"user.vmexport.extents@9223372036854775808", "user.vmexport.extents@9223372036854775808", 0, false},
	}
	for _, tc := range tests {
		name, from, ok := splitPage(tc.in)
		assert.Equal(t, []any{tc.name, tc.from, tc.ok}, []any{name, from, ok}, tc.in)
	}
}

// FuzzPage checks that paging any map returns it whole, in pages that fit
// an xattr.
func FuzzPage(f *testing.F) {
	f.Add(int64(1<<30), uint16(5000), uint16(4096), uint16(4096))
	f.Add(int64(100), uint16(3), uint16(1), uint16(7))
	f.Fuzz(func(t *testing.T, size int64, n, gap, length uint16) {
		if size <= 0 || gap == 0 || length == 0 {
			return
		}
		var raw []extent.Extent
		for i, off := 0, int64(0); i < int(n) && off+int64(length) <= size; i++ {
			raw = append(raw, extent.Extent{Off: off, Len: int64(length)})
			off += int64(length) + int64(gap)
		}
		m, err := extent.Normalize(raw, size)
		require.NoError(t, err)
		var got []extent.Extent
		var from int64
		for {
			b := page(m, from)
			require.LessOrEqual(t, len(b), xattrSizeMax)
			if len(b) == 0 {
				break
			}
			pm, err := extent.Parse(string(b), math.MaxInt64)
			require.NoError(t, err)
			got = append(got, pm.Extents()...)
			from = got[len(got)-1].End()
		}
		assert.Equal(t, len(m.Extents()), len(got), "size "+strconv.FormatInt(size, 10))
		if len(got) > 0 {
			assert.Equal(t, m.Extents(), got)
		}
	})
}

// FuzzXattrName: an attribute name is paged exactly when it is well formed,
// NAME@FROM with FROM as ReadMap writes it (the canonical decimal of an
// int64 >= 0); paged names decode and encode back to themselves, and no
// decoding leaves the namespace the attribute was in.
func FuzzXattrName(f *testing.F) {
	for _, s := range []string{"user.vmexport.extents", "user.vmexport.extents@0", "user.vmexport.changed.a@b@12", "@", "x@-1", "x@99999999999999999999",
		"x@+5", "x@05", "x@-0", "user.vmexport.changed.@7"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, attr string) {
		name, from, paged := splitPage(attr)
		wellFormed := false
		if i := strings.LastIndexByte(attr, '@'); i >= 0 {
			n, err := strconv.ParseInt(attr[i+1:], 10, 64)
			wellFormed = err == nil && n >= 0 && strconv.FormatInt(n, 10) == attr[i+1:]
		}
		require.Equal(t, wellFormed, paged, "%q", attr)
		if !paged {
			require.Equal(t, attr, name)
			require.Zero(t, from)
			return
		}
		require.GreaterOrEqual(t, from, int64(0))
		require.Equal(t, attr, name+"@"+strconv.FormatInt(from, 10), "decode and encode again")
		for _, at := range []int64{0, from, math.MaxInt64} {
			n, f, ok := splitPage(name + "@" + strconv.FormatInt(at, 10))
			require.True(t, ok && n == name && f == at, "encode %q at %d, decode: %q %d %v", name, at, n, f, ok)
		}
		for _, ns := range []string{"user.vmexport.", xattrChangedPrefix} {
			require.Equal(t, strings.HasPrefix(attr, ns), strings.HasPrefix(name, ns), "%q decoded to %q", attr, name)
		}
	})
}
