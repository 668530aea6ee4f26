package statedir

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
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
	if _, err := s.SetCreated("vm", "a", t0); err != nil {
		t.Fatal(err)
	}
	t1 := t0.Add(time.Hour)
	got := s.Times("vm", ids("a", "b"), t1)
	if !got["a"].Equal(t0) || !got["b"].Equal(t1) {
		t.Fatalf("times %v", got)
	}
	require.NoError(t, s.Flush())
	// A remount reads them back; b stays first seen at t1; a is pruned.
	s2, _ := Open(dir, nil)
	got = s2.Times("vm", ids("b"), t1.Add(time.Hour))
	if len(got) != 1 || !got["b"].Equal(t1) {
		t.Fatalf("after reopen: %v", got)
	}
	require.NoError(t, s2.Close())
	s3, _ := Open(dir, nil)
	if got := s3.Times("vm", ids("a", "b"), t1.Add(2*time.Hour)); !got["a"].Equal(t1.Add(2 * time.Hour)) {
		t.Fatalf("a was pruned, so first seen again: %v", got)
	}
}

// TestFirstSeenTimesBatched: first sightings of many VMs reach the journal
// together, later, in one file, and the next mount reads them back.
func TestFirstSeenTimesBatched(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, nil)
	require.NoError(t, err)
	seen := time.Date(2026, 3, 4, 5, 6, 7, 8, time.UTC)
	const vms = keepLoaded + 100 // past the bound on VM files kept parsed
	for i := range vms {
		s.Times(fmt.Sprintf("vm-%d", i), ids("snap"), seen)
	}
	journal := filepath.Join(dir, seenFile)
	assert.NoFileExists(t, journal, "nothing written before the batch")
	require.NoError(t, s.Flush())
	files, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Len(t, files, 1, "one journal, no file per VM")
	fi, err := os.Stat(journal)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	assert.LessOrEqual(t, len(s.loaded), keepLoaded)

	s2, err := Open(dir, nil)
	require.NoError(t, err)
	for _, vm := range []string{"vm-0", "vm-7", fmt.Sprintf("vm-%d", vms-1)} {
		got := s2.Times(vm, ids("snap"), seen.Add(time.Hour))
		assert.True(t, got["snap"].Equal(seen), "%s: %v", vm, got)
	}
}

// TestFirstSeenJournal: what a journal line may be after a crash or
// damage, and compaction of a journal mostly made of the past.
func TestFirstSeenJournal(t *testing.T) {
	t0 := time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC)
	line := func(vm, id string, at time.Time) string {
		return fmt.Sprintf(`{"vm":%q,"id":%q,"at":%d}`+"\n", vm, id, at.UnixNano())
	}
	tests := []struct {
		name    string
		journal string
		want    map[string]time.Time // of vm "a", ids "x" and "y"; absent: first seen now (y a second later when x is too)
	}{
		{"torn last line", line("a", "x", t0) + `{"vm":"a","id":"y","a`, map[string]time.Time{"x": t0}},
		{"no final newline", line("a", "x", t0) + strings.TrimSuffix(line("a", "y", t0.Add(time.Hour)), "\n"), map[string]time.Time{"x": t0, "y": t0.Add(time.Hour)}},
		{"damaged line between", line("a", "x", t0) + "\x00garbage\n" + line("a", "y", t0.Add(time.Hour)), map[string]time.Time{"x": t0, "y": t0.Add(time.Hour)}},
		{"overlong line", line("a", "x", t0) + strings.Repeat("z", 3*maxSeenLine) + "\n" + line("a", "y", t0.Add(time.Hour)), map[string]time.Time{"x": t0, "y": t0.Add(time.Hour)}},
		{"dropped then seen again", line("a", "x", t0) + `{"vm":"a","id":"x"}` + "\n" + line("a", "x", t0.Add(time.Minute)), map[string]time.Time{"x": t0.Add(time.Minute)}},
		{"dropped", line("a", "x", t0) + `{"vm":"a","id":"x"}` + "\n", map[string]time.Time{}},
		{"negative time", `{"vm":"a","id":"x","at":-5}` + "\n", map[string]time.Time{}},
		{"other vm", line("b", "x", t0), map[string]time.Time{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			require.NoError(t, os.WriteFile(filepath.Join(dir, seenFile), []byte(tc.journal), 0o600))
			s, err := Open(dir, nil)
			require.NoError(t, err)
			now := t0.Add(24 * time.Hour)
			got := s.Times("a", ids("x", "y"), now)
			fresh := now // the next first sighting: one second each
			for _, id := range []string{"x", "y"} {
				want, ok := tc.want[id]
				if !ok {
					want, fresh = fresh, fresh.Add(time.Second)
				}
				assert.True(t, got[id].Equal(want), "%s: got %v, want %v", id, got[id], want)
			}
		})
	}

	// A crash can leave any last line, even an overlong one, without its
	// newline: the next sighting is still written on a line of its own.
	for name, torn := range map[string]string{
		"torn last line":     `{"vm":"a","id":"y","a`,
		"overlong last line": strings.Repeat("z", 3*maxSeenLine),
	} {
		t.Run("appended after "+name, func(t *testing.T) {
			dir := t.TempDir()
			require.NoError(t, os.WriteFile(filepath.Join(dir, seenFile), []byte(line("a", "x", t0)+torn), 0o600))
			s, err := Open(dir, nil)
			require.NoError(t, err)
			s.Times("b", ids("new"), t0.Add(time.Minute))
			require.NoError(t, s.Close())
			s2, err := Open(dir, nil)
			require.NoError(t, err)
			assert.True(t, s2.Times("b", ids("new"), t0.Add(time.Hour))["new"].Equal(t0.Add(time.Minute)))
			assert.True(t, s2.Times("a", ids("x"), t0.Add(time.Hour))["x"].Equal(t0))
		})
	}

	t.Run("compacted when mostly past", func(t *testing.T) {
		dir := t.TempDir()
		var b strings.Builder
		for i := range 3000 { // 3000 sightings, each dropped again
			b.WriteString(line("old", fmt.Sprint(i), t0))
			fmt.Fprintf(&b, `{"vm":"old","id":"%d"}`+"\n", i)
		}
		b.WriteString(line("a", "x", t0))
		path := filepath.Join(dir, seenFile)
		require.NoError(t, os.WriteFile(path, []byte(b.String()), 0o600))
		s, err := Open(dir, nil)
		require.NoError(t, err)
		got := s.Times("a", ids("x"), t0.Add(time.Hour))
		assert.True(t, got["x"].Equal(t0))
		after, err := os.ReadFile(path)
		require.NoError(t, err)
		assert.Equal(t, line("a", "x", t0), string(after))
	})
}

// FuzzFirstSeenJournal feeds arbitrary journals: opening never panics, and
// a sighting recorded afterwards is what the next mount reads back.
func FuzzFirstSeenJournal(f *testing.F) {
	f.Add(`{"vm":"vm1","id":"s1","at":1}` + "\n")
	f.Add(`{"vm":"vm1","id":"s1"}` + "\n" + `{"vm":"vm1","id":"s1","at":99}`)
	f.Add("\n\n{}\n[]\nnull\n")
	f.Fuzz(func(t *testing.T, journal string) {
		dir := t.TempDir()
		require.NoError(t, os.WriteFile(filepath.Join(dir, seenFile), []byte(journal), 0o600))
		s, err := Open(dir, nil)
		require.NoError(t, err)
		before := s.Times("vm1", ids("s1"), time.Unix(0, 1234))
		require.Len(t, before, 1)
		at := s.Times("fresh-vm", ids("fresh"), time.Unix(0, 5678))["fresh"]
		require.NoError(t, s.Close())
		s2, err := Open(dir, nil)
		require.NoError(t, err)
		assert.True(t, s2.Times("fresh-vm", ids("fresh"), time.Unix(0, 9999))["fresh"].Equal(at))
		assert.True(t, s2.Times("vm1", ids("s1"), time.Unix(0, 9999))["s1"].Equal(before["s1"]), "what was read is kept")
	})
}

// TestFlushAfterDelay: nobody calls Flush, the timer does.
func TestFlushAfterDelay(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, nil)
	require.NoError(t, err)
	s.Times("vm", ids("a"), time.Now())
	require.Eventually(t, func() bool {
		_, err := os.Stat(filepath.Join(dir, seenFile))
		return err == nil
	}, 5*FlushDelay, 10*time.Millisecond)
}

// ids are snapshots without a platform time, oldest first.
func ids(id ...string) []Snap {
	out := make([]Snap, len(id))
	for i, id := range id {
		out[i] = Snap{ID: id}
	}
	return out
}

// TestTimesDistinctSeconds: no two snapshots of a VM get times in one
// whole second (rsync's quick check compares seconds); a time once given
// never changes, across remounts and when older snapshots go, so no copy of
// one snapshot ever carries the second of another.
func TestTimesDistinctSeconds(t *testing.T) {
	t0 := time.Date(2026, 7, 8, 9, 10, 11, 250_000_000, time.UTC)
	sec := func(d time.Duration) time.Time { return t0.Truncate(time.Second).Add(d) }
	reopen := func(t *testing.T, s *Store, dir string) *Store {
		require.NoError(t, s.Close())
		s2, err := Open(dir, nil)
		require.NoError(t, err)
		return s2
	}
	equal := func(t *testing.T, want, got map[string]time.Time, why ...string) {
		t.Helper()
		require.Len(t, got, len(want), why)
		for id, w := range want {
			assert.True(t, got[id].Equal(w), "%s: got %v, want %v %v", id, got[id], w, why)
		}
	}
	platform := func(created ...time.Time) []Snap {
		var out []Snap
		for i, c := range created {
			out = append(out, Snap{ID: string(rune('a' + i)), Created: c})
		}
		return out
	}

	t.Run("first seen together", func(t *testing.T) {
		dir := t.TempDir()
		s, err := Open(dir, nil)
		require.NoError(t, err)
		want := map[string]time.Time{"a": t0, "b": sec(time.Second), "c": sec(2 * time.Second)}
		equal(t, want, s.Times("vm", ids("a", "b", "c"), t0))
		s = reopen(t, s, dir)
		equal(t, want, s.Times("vm", ids("a", "b", "c"), t0.Add(time.Hour)))
		delete(want, "a")
		equal(t, want, s.Times("vm", ids("b", "c"), t0.Add(time.Hour)))
	})
	t.Run("seen in the second of one seen before", func(t *testing.T) {
		s, err := Open(t.TempDir(), nil)
		require.NoError(t, err)
		equal(t, map[string]time.Time{"a": t0}, s.Times("vm", ids("a"), t0))
		equal(t, map[string]time.Time{"a": t0, "b": sec(time.Second)}, s.Times("vm", ids("a", "b"), t0.Add(100*time.Millisecond)))
		// A second later nothing moves: the nanoseconds are kept.
		later := t0.Add(1500 * time.Millisecond)
		equal(t, map[string]time.Time{"a": t0, "b": sec(time.Second), "c": later.Add(time.Second)}, s.Times("vm", ids("a", "b", "c"), later.Add(time.Second)))
		equal(t, map[string]time.Time{"x": t0}, s.Times("other-vm", ids("x"), t0), "another VM's seconds are its own")
	})
	t.Run("platform times in one second", func(t *testing.T) {
		dir := t.TempDir()
		s, err := Open(dir, nil)
		require.NoError(t, err)
		snaps := platform(t0, t0.Add(300*time.Millisecond), sec(5*time.Second))
		want := map[string]time.Time{"a": t0, "b": sec(time.Second), "c": sec(5 * time.Second)}
		equal(t, want, s.Times("vm", snaps, t0.Add(time.Hour)))
		s = reopen(t, s, dir)
		equal(t, want, s.Times("vm", snaps, t0.Add(2*time.Hour)))
		// a goes: b keeps the second it was moved to, which copies of it carry.
		delete(want, "a")
		equal(t, want, s.Times("vm", snaps[1:], t0.Add(2*time.Hour)))
		s = reopen(t, s, dir)
		equal(t, want, s.Times("vm", snaps[1:], t0.Add(3*time.Hour)))
	})
	t.Run("mkdir in the second of one seen before", func(t *testing.T) {
		dir := t.TempDir()
		s, err := Open(dir, nil)
		require.NoError(t, err)
		s.Times("vm", ids("a"), t0)
		kept, err := s.SetCreated("vm", "b", t0.Add(200*time.Millisecond))
		require.NoError(t, err)
		assert.True(t, kept.Equal(sec(time.Second)), "kept %v", kept)
		want := map[string]time.Time{"a": t0, "b": sec(time.Second)}
		equal(t, want, s.Times("vm", ids("a", "b"), t0.Add(time.Minute)))
		s = reopen(t, s, dir)
		equal(t, want, s.Times("vm", ids("a", "b"), t0.Add(time.Hour)))
	})
	t.Run("journal of an older version", func(t *testing.T) {
		dir := t.TempDir()
		var journal strings.Builder
		for _, id := range []string{"a", "b"} { // both first seen in one listing
			fmt.Fprintf(&journal, `{"vm":"vm","id":%q,"at":%d}`+"\n", id, t0.UnixNano())
		}
		require.NoError(t, os.WriteFile(filepath.Join(dir, seenFile), []byte(journal.String()), 0o600))
		s, err := Open(dir, nil)
		require.NoError(t, err)
		want := map[string]time.Time{"a": t0, "b": sec(time.Second)}
		equal(t, want, s.Times("vm", ids("a", "b"), t0.Add(time.Hour)))
		s = reopen(t, s, dir)
		delete(want, "a")
		equal(t, want, s.Times("vm", ids("b"), t0.Add(2*time.Hour)), "the moved time was recorded")
	})
}
