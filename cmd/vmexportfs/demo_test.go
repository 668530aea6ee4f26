package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
	"github.com/vmexportfs/vmexportfs/backend/kubevirt/kubevirttest"
	"github.com/vmexportfs/vmexportfs/backend/ovirt/ovirttest"
	"github.com/vmexportfs/vmexportfs/backend/xapi/xapitest"
)

// TestDemoPlatforms: `vmexportfs demo -f --platform NAME MOUNTPOINT` mounts
// each platform's simulator with the sample VMs through the platform's own
// mount path. The sample data is reproducible, so the reference is the same
// dataset written into a simulator of the platform in the test: copies of
// db01's root disk in every snapshot are those bytes, and its derived files
// pass gzip -t and qemu-img info. An unknown platform is a usage error
// naming the known ones.
func TestDemoPlatforms(t *testing.T) {
	requireRoot(t)
	requireTools(t, "cp", "ls", "gzip", "qemu-img")
	for _, tc := range []struct {
		name string
		// references are the sample data's files of db01's root disk, one per
		// snapshot.
		references func(t *testing.T) []string
		// live: the demo also exports each VM itself (snapshots/live).
		live bool
	}{
		{"coriolis", func(t *testing.T) []string {
			sim, err := coriolistest.Start(coriolistest.Options{Dir: t.TempDir()})
			require.NoError(t, err)
			t.Cleanup(func() { sim.Close() })
			require.NoError(t, populateDemo(coriolisTarget{sim}))
			ids, err := sim.Snapshots(demoDB)
			return snapshotFiles(t, ids, err, func(id string) (string, error) { return sim.SnapshotData(demoDB, id, demoDBRoot) })
		}, false},
		{"kubevirt", func(t *testing.T) []string {
			sim, err := kubevirttest.Start(kubevirttest.Options{Dir: t.TempDir(), Namespace: demoNamespace})
			require.NoError(t, err)
			t.Cleanup(func() { sim.Close() })
			require.NoError(t, populateDemo(newKubeVirtTarget(sim)))
			names, err := sim.Snapshots("db01")
			return snapshotFiles(t, names, err, func(name string) (string, error) { return sim.SnapshotData(name, "xvda") })
		}, true},
		{"xapi", func(t *testing.T) []string {
			sim, err := xapitest.Start(xapitest.Options{Dir: t.TempDir()})
			require.NoError(t, err)
			t.Cleanup(func() { sim.Close() })
			require.NoError(t, populateDemo(newXapiTarget(sim)))
			ids, err := sim.Snapshots(demoDB)
			return snapshotFiles(t, ids, err, func(id string) (string, error) { return sim.SnapshotData(id, "0") })
		}, false},
		{"ovirt", func(t *testing.T) []string {
			sim, err := ovirttest.Start(ovirttest.Options{Dir: t.TempDir()})
			require.NoError(t, err)
			t.Cleanup(func() { sim.Close() })
			require.NoError(t, populateDemo(newOVirtTarget(sim)))
			ids, err := sim.Snapshots(demoDB)
			return snapshotFiles(t, ids, err, func(id string) (string, error) { return sim.SnapshotData(demoDB, id, demoDBRoot) })
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mnt := filepath.Join(t.TempDir(), "mnt")
			require.NoError(t, os.Mkdir(mnt, 0o755))
			m := startCommand(t, "demo", "-f", "--platform", tc.name, "--data-dir", t.TempDir(), mnt)
			m.dir = mnt
			assert.Equal(t, "db01\nweb01\n", tool(t, "ls", m.path("by-name")))

			var want []string
			for _, ref := range tc.references(t) {
				want = append(want, contentDigest(t, ref))
			}
			require.Len(t, want, 2, "db01 has two snapshots")
			require.NotEqual(t, want[0], want[1], "the second rewrote the root disk")
			entries, err := os.ReadDir(m.path("by-name", "db01", "snapshots"))
			require.NoError(t, err)
			var got, snaps []string
			for _, e := range entries {
				if e.Name() == "live" {
					assert.True(t, tc.live, "only the KubeVirt demo exports VMs live")
					continue
				}
				snaps = append(snaps, e.Name())
				copied := filepath.Join(t.TempDir(), "disk.img")
				tool(t, "cp", "--sparse=always", m.path("by-name", "db01", "snapshots", e.Name(), "xvda", "disk.img"), copied)
				got = append(got, contentDigest(t, copied))
			}
			slices.Sort(want)
			slices.Sort(got)
			assert.Equal(t, want, got, "db01's root disk in every snapshot")
			if tc.live {
				assert.DirExists(t, m.path("by-name", "db01", "snapshots", "live", "xvda"))
			}

			dir := m.path("by-name", "db01", "snapshots", snaps[0], "xvda")
			tool(t, "gzip", "-t", filepath.Join(dir, "disk.img.gz"))
			var info qemuInfo
			require.NoError(t, json.Unmarshal([]byte(tool(t, "qemu-img", "info", "--output=json", filepath.Join(dir, "disk.vhd"))), &info))
			assert.Equal(t, qemuInfo{Format: "vpc", VirtualSize: 512 * mib}, info)
		})
	}

	var help bytes.Buffer
	require.Equal(t, 0, run(context.Background(), []string{"demo", "--help"}, &help, &help))
	for _, name := range demoPlatformNames() {
		assert.Regexp(t, `(?m)^  `+name+` +\S`, help.String(), "--help lists the platforms")
	}
	var stdout, stderr bytes.Buffer
	assert.Equal(t, 2, run(context.Background(), []string{"demo", "--platform", "vmware", t.TempDir()}, &stdout, &stderr))
	assert.Contains(t, stderr.String(), `--platform "vmware": want one of coriolis, kubevirt, xapi, ovirt`)
}

// snapshotFiles are the simulator's files of db01's root disk in the
// snapshots ids (listed with err), one per snapshot, oldest first.
func snapshotFiles(t *testing.T, ids []string, err error, data func(id string) (string, error)) []string {
	t.Helper()
	require.NoError(t, err)
	var refs []string
	for _, id := range ids {
		path, err := data(id)
		require.NoError(t, err)
		refs = append(refs, path)
	}
	return refs
}
