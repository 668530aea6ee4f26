package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
)

// TestStaleGzipIndexHeals: the data under an unchanged snapshot id changes
// between two mounts sharing a cache directory, so the persisted gzip index
// no longer matches what the members compress to. The first read that meets
// the changed member fails with EIO (the reader sized the file by the stale
// index), the index is dropped and logged, and a fresh open sees the rebuilt
// file: gzip -t passes and zcat gives the new data. A third mount uses the
// rebuilt index as is.
func TestStaleGzipIndexHeals(t *testing.T) {
	requireTools(t, "gzip", "sh", "sha256sum")
	const size = 12*mib + 100*kib
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-z", "stale", coriolistest.DiskSpec{Name: "z.img", Device: "xvda", Size: size})
	f.write("vm-z", "z.img", 0, size) // random bytes: barely compressible
	sid := f.snapshot("vm-z")
	gzPath := func(m *mounted) string { return m.path("vms", "vm-z", "snapshots", sid, "disk.img.gz") }

	m := f.mount()
	st, err := os.Stat(gzPath(m)) // builds and saves the index
	require.NoError(t, err)
	oldSize := st.Size()
	m.stop(t)
	idx, err := filepath.Glob(filepath.Join(f.cacheDir, "*", "gzip-*.idx"))
	require.NoError(t, err)
	require.Len(t, idx, 1)
	stale, err := os.ReadFile(idx[0])
	require.NoError(t, err)

	// Same snapshot id, same chunk map, other bytes: a run of zeros in the
	// second member (4-8 MiB) shrinks it.
	src := f.source("vm-z", sid, "z.img")
	file, err := os.OpenFile(src, os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = file.WriteAt(make([]byte, mib), 5*mib)
	require.NoError(t, err)
	require.NoError(t, file.Close())
	want := sha256File(t, src)

	m = f.mount()
	st, err = os.Stat(gzPath(m))
	require.NoError(t, err)
	assert.Equal(t, oldSize, st.Size(), "sized by the stale index, nothing read yet")
	// A copy that meets the changed member fails: its size came from the
	// stale index.
	_, err = toolErr("gzip", "-t", gzPath(m))
	require.Error(t, err, "the read meeting the stale index")
	assert.Contains(t, err.Error(), "Input/output error")
	logs := m.logs.String()
	assert.Contains(t, logs, "stale index")
	assert.Contains(t, logs, "index="+idx[0], "the log names the stale index")
	assert.Contains(t, logs, "member=1 ")

	// A fresh open sees the rebuilt file.
	tool(t, "gzip", "-t", gzPath(m))
	st, err = os.Stat(gzPath(m))
	require.NoError(t, err)
	assert.NotEqual(t, oldSize, st.Size(), "a fresh stat sees the rebuilt size")
	out := tool(t, "sh", "-c", `zcat "$1" | sha256sum`, "sh", gzPath(m))
	assert.Equal(t, want, strings.Fields(out)[0], "zcat disk.img.gz equals the new data")
	assert.Equal(t, want, sha256File(t, m.path("vms", "vm-z", "snapshots", sid, "disk.img")))
	assert.Contains(t, m.logs.String(), "index rebuilt")
	assert.NotContains(t, m.logs.String(), "keeps changing")
	rebuilt, err := os.ReadFile(idx[0])
	require.NoError(t, err)
	assert.NotEqual(t, stale, rebuilt, "the rebuilt index replaced the stale one")
	m.stop(t)

	// The next mount trusts the rebuilt index: no mismatch, same bytes.
	m = f.mount()
	tool(t, "gzip", "-t", gzPath(m))
	out = tool(t, "sh", "-c", `zcat "$1" | sha256sum`, "sh", gzPath(m))
	assert.Equal(t, want, strings.Fields(out)[0])
	assert.NotContains(t, m.logs.String(), "stale index")
}
