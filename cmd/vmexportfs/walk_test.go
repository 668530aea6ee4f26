package main

import (
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
)

// TestColdFindRequests: a cold find over the estate asks the exporter for
// one snapshot list per VM and one HEAD per snapshot disk (its size, which
// only the disk route tells and the snapshot directory's names depend on),
// counted by the simulator; a second find asks for no size again.
func TestColdFindRequests(t *testing.T) {
	for _, tc := range []struct {
		name       string
		vms, snaps int
	}{
		{"one snapshot per VM", 300, 1},
		{"five snapshots per VM", 60, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, coriolistest.Options{})
			for i := range tc.vms {
				vm := fmt.Sprintf("vm-%03d", i)
				f.addVM(vm, "", coriolistest.DiskSpec{Name: vm + ".img", Size: 1 << 20})
				for range tc.snaps {
					f.write(vm, vm+".img", 0, 4096)
					f.snapshot(vm)
				}
			}
			m := f.mount()
			f.sim.ResetStats()
			found := strings.Fields(tool(t, "find", m.path("vms"), "-name", "disk.img"))
			snapshots := tc.vms * tc.snaps
			require.Len(t, found, snapshots)
			st := f.sim.Stats()
			listing := float64(st.APIRequests) / float64(snapshots)
			t.Logf("cold find of %d VMs × %d snapshots: %d API requests (%.2f per snapshot), %d HEADs, %d logins",
				tc.vms, tc.snaps, st.APIRequests, listing, st.DiskHeads, st.Logins)
			assert.LessOrEqual(t, st.APIRequests, int64(tc.vms+2), "a snapshot list per VM, and the VM listing")
			assert.Equal(t, int64(snapshots), st.DiskHeads, "one HEAD per snapshot disk")
			assert.Equal(t, st.DiskHeads, st.DiskRequests, "no data read")

			f.sim.ResetStats()
			require.Len(t, strings.Fields(tool(t, "find", m.path("vms"), "-name", "disk.img")), snapshots)
			assert.Zero(t, f.sim.Stats().DiskHeads, "sizes are kept for the mount")
		})
	}
}
