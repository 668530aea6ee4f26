// Package statedir persists, per VM, the names users gave to snapshots they
// created through mkdir, so the names survive remounts, and each snapshot's
// time (its creation time when made through mkdir, else when vmexportfs
// first saw it), for st_mtime on platforms that do not tell. One JSON file
// per VM, written atomically. Names and creation times are written before
// the call returns; first-seen times, which a walk of 100,000 VMs records
// for every VM, are written in batches a moment later (Flush), with one
// sync per batch instead of two per file.
package statedir

import (
	"cmp"
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
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// FlushDelay is how long first-seen times wait in memory for others to
// join their batch.
const FlushDelay = 2 * time.Second

// keepLoaded is how many VMs' states stay in memory once written: beyond
// it, the written ones are dropped and read again from their files when
// next needed, so memory does not grow with the number of VMs ever seen.
const keepLoaded = 4096

// Store maps snapshot names to snapshot ids per VM. An empty dir keeps the
// maps in memory only.
type Store struct {
	dir string
	log *slog.Logger

	flushing sync.Mutex // one batch at a time, so Close waits for a running one
	syncFS   func(dir string) error

	mu      sync.Mutex
	loaded  map[string]*vmState
	dirty   map[string]bool // VMs whose first-seen times are not written yet
	flusher *time.Timer     // pending Flush, nil when none
	staging bool            // a batch is being synced: keep its states loaded
	closed  bool
}

type vmState struct {
	names   map[string]string    // name -> snapshot id
	times   map[string]time.Time // snapshot id -> created (mkdir) or first seen
	corrupt bool                 // the file on disk could not be parsed
	// gen counts changes, so a batch staged before a change does not
	// overwrite the file that change wrote.
	gen uint64
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
	return &Store{dir: dir, log: log, loaded: map[string]*vmState{}, dirty: map[string]bool{}, syncFS: syncFS}, nil
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

// SetCreated records id's creation time (a snapshot taken through mkdir).
func (s *Store) SetCreated(vm, id string, t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.load(vm)
	times := maps.Clone(st.times)
	times[id] = t
	err := s.write(vm, st, st.names, times)
	st.times = times // kept in memory even when the write failed
	return err
}

// Times returns the recorded time of each of ids, the VM's complete list of
// snapshot ids: those without one are recorded as first seen at now, and
// times of ids no longer listed are dropped. When that changed something
// the file is written in the next batch (FlushDelay); a crash before then
// loses only those first sightings, which the next listing records again.
func (s *Store) Times(vm string, ids []string, now time.Time) map[string]time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.load(vm)
	next := make(map[string]time.Time, len(ids))
	changed := false
	for _, id := range ids {
		t, ok := st.times[id]
		if !ok {
			t, changed = now, true
		}
		next[id] = t
	}
	if len(next) != len(st.times) {
		changed = true
	}
	if changed {
		st.times = next
		st.gen++
		s.markDirty(vm)
	}
	s.trim()
	return maps.Clone(next)
}

// markDirty queues vm's file for the next batch.
func (s *Store) markDirty(vm string) {
	if s.dir == "" {
		return
	}
	s.dirty[vm] = true
	if s.flusher == nil && !s.closed {
		s.flusher = time.AfterFunc(FlushDelay, func() { _ = s.Flush() })
	}
}

// trim drops written states once more than keepLoaded are in memory.
func (s *Store) trim() {
	if s.dir == "" || s.staging || len(s.loaded) <= keepLoaded {
		return
	}
	maps.DeleteFunc(s.loaded, func(vm string, st *vmState) bool { return !s.dirty[vm] && !st.corrupt })
}

// Flush writes the first-seen times still in memory: every file of the
// batch is written, then one sync of the filesystem makes them durable
// before they are renamed into place, so a crash leaves each VM's old file
// or its new one, never an empty one.
//
// The sync runs without the store's lock, so listings go on meanwhile; a
// VM whose state changed during it keeps the newer file.
func (s *Store) Flush() error {
	s.flushing.Lock()
	defer s.flushing.Unlock()
	s.mu.Lock()
	if s.flusher != nil {
		s.flusher.Stop()
		s.flusher = nil
	}
	vms := slices.SortedFunc(maps.Keys(s.dirty), cmp.Compare)
	clear(s.dirty)
	type stagedState struct {
		stagedFile
		st  *vmState
		gen uint64
	}
	var staged []stagedState
	var errs []error
	for _, vm := range vms {
		st, ok := s.loaded[vm]
		if !ok {
			continue
		}
		f, err := s.stage(vm, st, st.names, st.times, false)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		staged = append(staged, stagedState{f, st, st.gen})
	}
	s.staging = true
	s.mu.Unlock()

	var syncErr error
	if len(staged) > 0 {
		syncErr = s.syncFS(s.dir)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	s.staging = false
	for _, f := range staged {
		if syncErr != nil || f.st.gen != f.gen {
			os.Remove(f.tmp)
			continue
		}
		if err := os.Rename(f.tmp, f.path); err != nil {
			os.Remove(f.tmp)
			errs = append(errs, fmt.Errorf("statedir rename %s: %w", f.path, err))
		}
	}
	if syncErr != nil {
		errs = append(errs, syncErr)
	}
	if len(staged) > 0 {
		s.syncDir()
	}
	s.trim()
	err := errors.Join(errs...)
	if err != nil {
		s.log.Warn("statedir: snapshot first-seen times not saved", "vms", len(vms), "err", err)
	}
	return err
}

// Close writes what is pending; later first sightings stay in memory.
func (s *Store) Close() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	return s.Flush()
}

// syncFS flushes the filesystem holding dir: one call for a whole batch.
func syncFS(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("statedir sync: %w", err)
	}
	defer d.Close()
	if err := unix.Syncfs(int(d.Fd())); err != nil {
		return fmt.Errorf("statedir sync: %w", err)
	}
	return nil
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
	f, err := s.stage(vm, st, names, times, true)
	if err != nil {
		return err
	}
	defer os.Remove(f.tmp) // no-op after a successful rename
	if err := os.Rename(f.tmp, path); err != nil {
		return fmt.Errorf("statedir rename %s: %w", path, err)
	}
	st.gen++
	delete(s.dirty, vm) // the times went with it
	s.syncDir()
	return nil
}

// stagedFile is a VM's new state written to tmp, not yet renamed to path.
type stagedFile struct{ tmp, path string }

// stage writes vm's state to a temporary file beside its own, synced when
// sync says so (a batch syncs them all at once).
func (s *Store) stage(vm string, st *vmState, names map[string]string, times map[string]time.Time, sync bool) (stagedFile, error) {
	path := s.fileFor(vm)
	if st.corrupt {
		// Keep the unreadable file for a human instead of overwriting it.
		aside := fmt.Sprintf("%s.corrupt-%d", path, time.Now().UnixNano())
		if err := os.Rename(path, aside); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return stagedFile{}, fmt.Errorf("statedir: move aside corrupt %s: %w", path, err)
		}
		s.log.Warn("statedir: moved corrupt state file aside", "vm", vm, "file", aside)
		st.corrupt = false
	}
	b, err := json.MarshalIndent(fileFormat{VM: vm, Names: names, Times: times}, "", "  ")
	if err != nil {
		return stagedFile{}, fmt.Errorf("statedir write %s: %w", path, err)
	}
	tmp, err := os.CreateTemp(s.dir, ".tmp-*")
	if err != nil {
		return stagedFile{}, fmt.Errorf("statedir write %s: %w", path, err)
	}
	_, err = tmp.Write(b)
	if err == nil && sync {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp.Name())
		return stagedFile{}, fmt.Errorf("statedir write %s: %w", path, err)
	}
	return stagedFile{tmp: tmp.Name(), path: path}, nil
}

// syncDir makes renames in dir durable; best effort.
func (s *Store) syncDir() {
	if d, err := os.Open(s.dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
}
