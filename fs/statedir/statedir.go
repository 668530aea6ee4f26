// Package statedir persists, per VM, the names users gave to snapshots they
// created through mkdir, so the names survive remounts, and each snapshot's
// time (its creation time when made through mkdir, else when vmexportfs
// first saw it), for st_mtime on platforms that do not tell.
//
// Names and creation times, which users make one mkdir at a time, are one
// JSON file per VM, written atomically and synced before the call returns.
// First-seen times, which a walk of 100,000 VMs records for every VM, go to
// one append-only journal (seen.go) in batches, one sync per batch: a file
// per VM cost a create, a rename and two syncs each, and was most of the
// walk's time.
package statedir

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Store maps snapshot names to snapshot ids per VM. An empty dir keeps the
// maps in memory only.
type Store struct {
	dir string
	log *slog.Logger

	mu     sync.Mutex
	loaded map[string]*vmState
	seen   *firstSeen // nil until first needed
}

// keepLoaded is how many VMs' files stay parsed in memory: beyond it they
// are dropped and read again when next needed, so memory does not grow
// with the number of VMs ever listed.
const keepLoaded = 4096

type vmState struct {
	names   map[string]string    // name -> snapshot id
	times   map[string]time.Time // snapshot id -> created (mkdir) or first seen
	corrupt bool                 // the file on disk could not be parsed
}

type fileFormat struct {
	VM    string               `json:"vm"`
	Names map[string]string    `json:"names"`
	Times map[string]time.Time `json:"times,omitempty"`
}

// Open prepares dir (created 0700) and returns a Store; nothing is read
// until a VM's map is needed.
func Open(dir string, log *slog.Logger) (*Store, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if dir != "" {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("statedir open: %w", err)
		}
	}
	return &Store{dir: dir, log: log, loaded: map[string]*vmState{}}, nil
}

// fileFor hashes the id so hostile VM ids cannot escape dir or collide with
// each other's files.
func (s *Store) fileFor(vm string) string {
	sum := sha256.Sum256([]byte(vm))
	return filepath.Join(s.dir, hex.EncodeToString(sum[:16])+".json")
}

func (s *Store) load(vm string) *vmState {
	if st, ok := s.loaded[vm]; ok {
		return st
	}
	if len(s.loaded) >= keepLoaded {
		// Written states are on disk; keep the corrupt ones' flag.
		maps.DeleteFunc(s.loaded, func(_ string, st *vmState) bool { return !st.corrupt })
	}
	st := &vmState{names: map[string]string{}, times: map[string]time.Time{}}
	s.loaded[vm] = st
	if s.dir == "" {
		return st
	}
	b, err := os.ReadFile(s.fileFor(vm))
	if errors.Is(err, fs.ErrNotExist) {
		return st
	}
	var ff fileFormat
	if err == nil {
		err = json.Unmarshal(b, &ff)
		if err == nil && ff.VM != vm {
			err = fmt.Errorf("file belongs to vm %q", ff.VM)
		}
	}
	if err != nil {
		s.log.Error("statedir: unreadable state file, treating as empty", "vm", vm, "file", s.fileFor(vm), "err", err)
		st.corrupt = true
		return st
	}
	for name, id := range ff.Names {
		st.names[name] = id
	}
	for id, t := range ff.Times {
		st.times[id] = t
	}
	return st
}

// SetCreated records id's creation time (a snapshot taken through mkdir)
// and returns the time kept: t, or the start of the next second no other
// snapshot of the VM shows (see seconds).
func (s *Store) SetCreated(vm, id string, t time.Time) (time.Time, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.load(vm)
	taken := seconds{}
	for other, at := range st.times {
		if other != id {
			taken.take(at)
		}
	}
	s.firstSeen().taken(vm, id, taken)
	t = taken.claim(t)
	times := maps.Clone(st.times)
	times[id] = t
	err := s.write(vm, st, st.names, times)
	st.times = times // kept in memory even when the write failed
	return t, err
}

// Snap is one listed snapshot: its id and the platform's creation time,
// zero when the platform does not say.
type Snap struct {
	ID      string
	Created time.Time
}

// Times returns the time each of snaps, the VM's complete list oldest first,
// shows as st_mtime: a time kept in the VM's file (SetCreated's, or a
// platform time moved off a second already shown), else the platform's
// creation time, else when the snapshot was first seen; those never seen
// are recorded as first seen at now, and the times of snapshots no longer
// listed are dropped. No two snapshots of the VM show the same whole second
// (see seconds): times already shown keep theirs, and a newcomer falling in
// one of them moves to the start of the next free second, kept so that it
// never moves back. First sightings reach the journal in the next batch
// (FlushDelay): a crash before then loses only those, which the next
// listing records again.
func (s *Store) Times(vm string, snaps []Snap, now time.Time) map[string]time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.load(vm)
	out := make(map[string]time.Time, len(snaps))
	taken := seconds{}
	kept := make(map[string]time.Time, len(st.times))
	changed := false
	for _, sn := range snaps {
		if _, dup := out[sn.ID]; dup {
			continue
		}
		if t, ok := st.times[sn.ID]; ok {
			out[sn.ID] = taken.claim(t) // moves only times kept before this rule
			kept[sn.ID] = out[sn.ID]
			changed = changed || !out[sn.ID].Equal(t)
		}
	}
	// A snapshot made through mkdir that is gone takes its time with it,
	// so an id reused later is not given it.
	changed = changed || len(kept) != len(st.times)
	var unseen []string
	for _, sn := range snaps {
		switch _, ok := out[sn.ID]; {
		case ok:
		case !sn.Created.IsZero():
			out[sn.ID] = taken.claim(sn.Created)
			if !out[sn.ID].Equal(sn.Created) {
				kept[sn.ID] = out[sn.ID]
				changed = true
			}
		default:
			unseen = append(unseen, sn.ID)
		}
	}
	if changed {
		if err := s.write(vm, st, st.names, kept); err != nil {
			s.log.Warn("statedir: snapshot times not saved", "vm", vm, "err", err)
		}
		st.times = kept
	}
	for id, t := range s.firstSeen().times(vm, unseen, now, taken) {
		out[id] = t
	}
	return out
}

// seconds are the whole seconds (Unix) the snapshots of one VM show. No two
// may share one: rsync's quick check skips a file of the same size whose
// mtime is in the same second (it does not compare nanoseconds), so `rsync
// -a` of a newer snapshot onto a copy of an older one would keep the older
// one's bytes.
type seconds map[int64]bool

func (s seconds) take(t time.Time) { s[t.Unix()] = true }

// claim takes t's second and returns t, or when that second is taken, takes
// the next free one and returns its start.
func (s seconds) claim(t time.Time) time.Time {
	sec := t.Unix()
	if s[sec] {
		for sec++; s[sec]; sec++ {
		}
		t = time.Unix(sec, 0)
	}
	s[sec] = true
	return t
}

// firstSeen is the journal, read on first use.
func (s *Store) firstSeen() *firstSeen {
	if s.seen == nil {
		s.seen = openFirstSeen(s.dir, s.log)
	}
	return s.seen
}

// Flush writes the first sightings not yet in the journal.
func (s *Store) Flush() error {
	if seen := s.opened(); seen != nil {
		return seen.flush()
	}
	return nil
}

// Close flushes; later first sightings stay in memory only.
func (s *Store) Close() error {
	if seen := s.opened(); seen != nil {
		return seen.close()
	}
	return nil
}

// opened is the journal if it was read, else nil: nothing to write.
func (s *Store) opened() *firstSeen {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.seen
}

// Names returns a copy of the VM's name -> snapshot id map.
func (s *Store) Names(vm string) map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.load(vm).names)
}

// Put records name -> id. live reports whether a snapshot id still exists;
// mappings to dead snapshots are pruned on this write (nil keeps all).
func (s *Store) Put(vm, name, id string, live func(id string) bool) error {
	return s.update(vm, live, func(m map[string]string) { m[name] = id })
}

// Delete removes name.
func (s *Store) Delete(vm, name string, live func(id string) bool) error {
	return s.update(vm, live, func(m map[string]string) { delete(m, name) })
}

func (s *Store) update(vm string, live func(string) bool, change func(map[string]string)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.load(vm)
	next := maps.Clone(st.names)
	change(next)
	if live != nil {
		maps.DeleteFunc(next, func(_, id string) bool { return !live(id) })
	}
	if err := s.write(vm, st, next, st.times); err != nil {
		return err
	}
	st.names = next
	return nil
}

func (s *Store) write(vm string, st *vmState, names map[string]string, times map[string]time.Time) error {
	if s.dir == "" {
		return nil
	}
	path := s.fileFor(vm)
	if st.corrupt {
		// Keep the unreadable file for a human instead of overwriting it.
		aside := fmt.Sprintf("%s.corrupt-%d", path, time.Now().UnixNano())
		if err := os.Rename(path, aside); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("statedir: move aside corrupt %s: %w", path, err)
		}
		s.log.Warn("statedir: moved corrupt state file aside", "vm", vm, "file", aside)
		st.corrupt = false
	}
	b, err := json.MarshalIndent(fileFormat{VM: vm, Names: names, Times: times}, "", "  ")
	if err != nil {
		return fmt.Errorf("statedir write %s: %w", path, err)
	}
	return replaceFile(s.dir, path, b)
}

// replaceFile puts b at path atomically and durably: a temporary file in
// dir, synced, renamed over path, and the rename synced.
func replaceFile(dir, path string, b []byte) error {
	tmp, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return fmt.Errorf("statedir write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("statedir write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("statedir fsync %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("statedir write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("statedir rename %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync() // make the rename durable; best effort
		d.Close()
	}
	return nil
}
