package statedir

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestPersistAndPrune(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	s, err := Open(dir, nil)
	require.NoError(t, err)
	fi, err := os.Stat(dir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())

	require.NoError(t, s.Put("vm/../x", "a", "id-a", nil))
	require.NoError(t, s.Put("vm/../x", "b", "id-b", nil))
	require.NoError(t, s.Put("other", "a", "id-z", nil))

	s2, err := Open(dir, nil)
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"a": "id-a", "b": "id-b"}, s2.Names("vm/../x"))
	assert.Equal(t, map[string]string{"a": "id-z"}, s2.Names("other"))

	// id-a is gone from the backend: pruned on the next write.
	require.NoError(t, s2.Put("vm/../x", "c", "id-c", func(id string) bool { return id != "id-a" }))
	assert.Equal(t, map[string]string{"b": "id-b", "c": "id-c"}, s2.Names("vm/../x"))
	require.NoError(t, s2.Delete("vm/../x", "b", nil))
	assert.Equal(t, map[string]string{"c": "id-c"}, s2.Names("vm/../x"))

	files, err := filepath.Glob(filepath.Join(dir, "*.json"))
	require.NoError(t, err)
	require.Len(t, files, 2)
	for _, f := range files {
		fi, err := os.Stat(f)
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	}
}

func TestCorruptFileIsKept(t *testing.T) {
	tests := []struct{ name, content string }{
		{"garbage", "{not json"},
		{"other vm", `{"vm":"someone-else","names":{"a":"b"}}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s, err := Open(dir, nil)
			require.NoError(t, err)
			path := s.fileFor("vm1")
			require.NoError(t, os.WriteFile(path, []byte(tc.content), 0o600))
			assert.Empty(t, s.Names("vm1"))
			require.NoError(t, s.Put("vm1", "n", "id", nil))
			aside, err := filepath.Glob(path + ".corrupt-*")
			require.NoError(t, err)
			require.Len(t, aside, 1)
			b, err := os.ReadFile(aside[0])
			require.NoError(t, err)
			assert.Equal(t, tc.content, string(b))
			s2, err := Open(dir, nil)
			require.NoError(t, err)
			assert.Equal(t, map[string]string{"n": "id"}, s2.Names("vm1"))
		})
	}
}

// FuzzStateFile feeds arbitrary state files: the store never panics, and a
// name recorded afterwards is persisted whatever was there before.
func FuzzStateFile(f *testing.F) {
	f.Add(`{"vm":"vm1","names":{"nightly":"s-1"}}`)
	f.Add(`{"vm":"vm1","names":{"../x":"s-1","":""}}`)
	f.Add(`{"vm":"vm1","names":null}`)
	f.Add(`[]`)
	f.Fuzz(func(t *testing.T, content string) {
		dir := t.TempDir()
		s, err := Open(dir, nil)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(s.fileFor("vm1"), []byte(content), 0o600))
		before := s.Names("vm1")
		require.NoError(t, s.Put("vm1", "fresh-name", "fresh-id", nil))
		s2, err := Open(dir, nil)
		require.NoError(t, err)
		after := s2.Names("vm1")
		assert.Equal(t, "fresh-id", after["fresh-name"])
		for name, id := range before {
			if name != "fresh-name" {
				assert.Equal(t, id, after[name], "existing names are kept")
			}
		}
	})
}

func TestTimesKeptAndPruned(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	if err := s.SetCreated("vm", "a", t0); err != nil {
		t.Fatal(err)
	}
	t1 := t0.Add(time.Hour)
	got := s.Times("vm", []string{"a", "b"}, t1)
	if !got["a"].Equal(t0) || !got["b"].Equal(t1) {
		t.Fatalf("times %v", got)
	}
	require.NoError(t, s.Flush())
	// A remount reads them back; b stays first seen at t1; a is pruned.
	s2, _ := Open(dir, nil)
	got = s2.Times("vm", []string{"b"}, t1.Add(time.Hour))
	if len(got) != 1 || !got["b"].Equal(t1) {
		t.Fatalf("after reopen: %v", got)
	}
	require.NoError(t, s2.Close())
	s3, _ := Open(dir, nil)
	if got := s3.Times("vm", []string{"a", "b"}, t1.Add(2*time.Hour)); !got["a"].Equal(t1.Add(2 * time.Hour)) {
		t.Fatalf("a was pruned, so first seen again: %v", got)
	}
}

// TestFirstSeenTimesBatched: first sightings are written together, later,
// and read back by the next mount; a name given meanwhile is never lost.
func TestFirstSeenTimesBatched(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, nil)
	require.NoError(t, err)
	seen := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	const vms = keepLoaded + 100 // past the bound on states kept in memory
	for i := range vms {
		s.Times(fmt.Sprintf("vm-%d", i), []string{"snap"}, seen)
	}
	files, err := filepath.Glob(filepath.Join(dir, "*.json"))
	require.NoError(t, err)
	assert.Empty(t, files, "nothing written before the batch")

	// A name recorded while the batch syncs wins over the batch's older
	// copy of the same VM.
	syncs := 0
	s.syncFS = func(dir string) error {
		syncs++
		require.NoError(t, s.Put("vm-7", "nightly", "snap", nil))
		return syncFS(dir)
	}
	require.NoError(t, s.Flush())
	assert.Equal(t, 1, syncs, "one sync for the whole batch")
	files, err = filepath.Glob(filepath.Join(dir, "*.json"))
	require.NoError(t, err)
	assert.Len(t, files, vms)
	leftover, err := filepath.Glob(filepath.Join(dir, ".tmp-*"))
	require.NoError(t, err)
	assert.Empty(t, leftover)
	assert.LessOrEqual(t, len(s.loaded), keepLoaded, "written states are dropped from memory")

	s2, err := Open(dir, nil)
	require.NoError(t, err)
	for _, vm := range []string{"vm-0", "vm-7", fmt.Sprintf("vm-%d", vms-1)} {
		got := s2.Times(vm, []string{"snap"}, seen.Add(time.Hour))
		assert.True(t, got["snap"].Equal(seen), "%s: %v", vm, got)
	}
	assert.Equal(t, map[string]string{"nightly": "snap"}, s2.Names("vm-7"))
	assert.Equal(t, map[string]string{"nightly": "snap"}, s.Names("vm-7"), "and in the first store's memory")
}

// TestFlushAfterDelay: nobody calls Flush, the timer does.
func TestFlushAfterDelay(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, nil)
	require.NoError(t, err)
	s.Times("vm", []string{"a"}, time.Now())
	require.Eventually(t, func() bool {
		_, err := os.Stat(s.fileFor("vm"))
		return err == nil
	}, 5*FlushDelay, 10*time.Millisecond)
}
