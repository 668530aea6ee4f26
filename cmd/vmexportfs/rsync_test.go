package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// rsyncDiskSize is small: what is checked is which bytes the backup ends
// with, not how they travel.
const rsyncDiskSize = 4 * mib

// TestRsyncNewerSnapshotOntoOlderCopy is the nightly backup that keeps one
// copy per VM: last night's `rsync -a A/disk.img backup/disk.img`, then
// tonight's `rsync -a B/disk.img backup/disk.img` of a newer snapshot of the
// same size. rsync's quick check skips a file whose size and mtime match,
// and it compares mtimes in whole seconds (a nanosecond difference is not
// seen), so the backup keeps A's bytes unless A and B carry mtimes in
// different seconds. Each row makes A and B in a way that puts them close
// together, on every platform.
func TestRsyncNewerSnapshotOntoOlderCopy(t *testing.T) {
	requireTools(t, "rsync", "ls")
	rows := []struct {
		name string
		// early: both snapshots are taken before the mount lists the VM, so
		// it first sees them in one listing, at one instant.
		early bool
		// mkdir: the snapshots are made through the mount, back to back;
		// else through the platform's API, behind the mount's back, each
		// listed by the mount as soon as it exists.
		mkdir bool
	}{
		{name: "first seen together", early: true},
		{name: "taken behind the mount within a second"},
		{name: "made by mkdir within a second", mkdir: true},
	}
	forEachPlatform(t, e2ePlatforms, func(t *testing.T, _ int, p simPlatform) {
		vm := func(i int) string { return "vm-rsync" + string(rune('a'+i)) }
		// A and B of the rows that take them before the mount.
		early := map[int][2]string{}
		for i, row := range rows {
			p.AddVM(t, vm(i), diskSpec{"xvda", rsyncDiskSize})
			p.Write(t, vm(i), "xvda", 0, 1*mib)
			if row.early {
				a := p.Snapshot(t, vm(i))
				p.Write(t, vm(i), "xvda", 512*kib, 1*mib) // same size, other bytes
				early[i] = [2]string{a, p.Snapshot(t, vm(i))}
			}
		}
		m := mountSim(t, p, "--list-ttl", "1ms")

		for i, row := range rows {
			t.Run(row.name, func(t *testing.T) {
				snapshots := m.path("vms", vm(i), "snapshots")
				// take makes the next snapshot the row's way and returns its
				// shown name and its platform id.
				take := func(name string) (string, string) {
					if row.mkdir {
						tool(t, "mkdir", filepath.Join(snapshots, name))
					} else {
						name = p.Snapshot(t, vm(i))
						tool(t, "ls", snapshots) // the mount sees it now
					}
					ids := p.Snapshots(t, vm(i))
					return name, ids[len(ids)-1]
				}
				var a, b, aID, bID string
				if row.early {
					a, b = early[i][0], early[i][1]
					aID, bID = a, b
				} else {
					a, aID = take("nightly-a")
				}
				backup := filepath.Join(t.TempDir(), "disk.img")
				tool(t, "rsync", "-a", filepath.Join(snapshots, a, "disk.img"), backup)
				require.Equal(t, sha256File(t, p.Reference(t, vm(i), aID, "xvda")), sha256File(t, backup), "last night's copy is A")
				if !row.early {
					p.Write(t, vm(i), "xvda", 512*kib, 1*mib)
					b, bID = take("nightly-b")
				}
				want := sha256File(t, p.Reference(t, vm(i), bID, "xvda"))
				require.NotEqual(t, sha256File(t, backup), want, "B holds other bytes than A")

				tool(t, "rsync", "-a", filepath.Join(snapshots, b, "disk.img"), backup)
				assert.Equal(t, want, sha256File(t, backup), "rsync -a of B onto the copy of A leaves B's bytes")

				ta, tb := fileMtime(t, filepath.Join(snapshots, a, "disk.img")), fileMtime(t, filepath.Join(snapshots, b, "disk.img"))
				assert.Greater(t, tb.Unix(), ta.Unix(), "B's mtime is in a later second than A's (%v, %v)", ta, tb)
				assert.Equal(t, tb.Unix(), fileMtime(t, backup).Unix(), "the copy carries B's mtime")
			})
		}
	})
}

func fileMtime(t *testing.T, path string) time.Time {
	t.Helper()
	fi, err := os.Stat(path)
	require.NoError(t, err)
	return fi.ModTime()
}
