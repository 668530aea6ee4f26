package fs

import (
	"encoding/json"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestRenderFitsTheXattr: a mount that read thousands of disks still has a
// stats document within the kernel's xattr limit; the disks that fetched
// least are left out and counted, the totals still cover them all.
func TestRenderFitsTheXattr(t *testing.T) {
	for _, n := range []int{0, 1, 100, 5000} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			doc := Document{Version: DocumentVersion, Faults: map[string]int64{}, Errors: map[string]int64{}, Open: map[string]int64{}}
			for i := range n {
				doc.Disks = append(doc.Disks, DiskDoc{VM: fmt.Sprintf("vm-%05d", i), Snapshot: "6f1c0a52-5b0e-4c59-9d2c-0123456789ab", Disk: "xvda", FetchedBytes: int64(n - i)})
				doc.Fetches.Bytes += int64(n - i)
			}
			b := doc.Render(xattrSizeMax)
			require.LessOrEqual(t, len(b), xattrSizeMax)
			var got Document
			require.NoError(t, json.Unmarshal(b, &got))
			assert.Equal(t, n, len(got.Disks)+got.Omitted)
			assert.Equal(t, doc.Fetches.Bytes, got.Fetches.Bytes)
			if len(got.Disks) > 0 {
				assert.Equal(t, "vm-00000", got.Disks[0].VM, "the most fetched is kept")
			}
			if n <= 100 {
				assert.Zero(t, got.Omitted)
			} else {
				assert.Greater(t, len(b), xattrSizeMax*3/4, "left out no more than needed")
			}
		})
	}
}
