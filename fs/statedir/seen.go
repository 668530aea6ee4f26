package statedir

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"
)

// FlushDelay is how long first sightings wait in memory for others to join
// their batch.
const FlushDelay = 2 * time.Second

const (
	seenFile = "first-seen.jsonl"
	// maxSeenLine bounds a journal line: ids are at most 255 bytes each,
	// so a longer line is damage, skipped.
	maxSeenLine = 4096
)

// seenRecord is one journal line: vm's snapshot id first seen At (Unix
// nanoseconds), or, with At zero, id no longer listed.
type seenRecord struct {
	VM string `json:"vm"`
	ID string `json:"id"`
	At int64  `json:"at,omitempty"`
}

type seenSnap struct {
	id string
	at int64
}

// firstSeen keeps, for every VM listed, when each of its snapshots was
// first seen, in memory (a sorted slice per VM: some 150 bytes a VM) and
// in a journal the next mount reads back. The journal only grows by
// appends; it is rewritten, compacted, when it is read and holds more than
// twice the lines still true.
type firstSeen struct {
	path string // "" keeps nothing on disk
	log  *slog.Logger

	writing sync.Mutex // one append at a time, so close waits for a running one

	mu      sync.Mutex
	byVM    map[string][]seenSnap // sorted by id
	pending []seenRecord
	flusher *time.Timer
	closed  bool
	// unterminated says the journal does not end in a newline (a crash
	// cut its last line): the next append starts with one, so its first
	// record is not glued to the torn line.
	unterminated bool
}

func openFirstSeen(dir string, log *slog.Logger) *firstSeen {
	f := &firstSeen{log: log, byVM: map[string][]seenSnap{}}
	if dir == "" {
		return f
	}
	f.path = filepath.Join(dir, seenFile)
	lines, err := f.read()
	if err != nil {
		log.Error("statedir: first-seen journal unreadable, starting afresh", "file", f.path, "err", err)
		return f
	}
	if live := f.count(); lines > 2*live+1024 {
		if err := f.compact(); err != nil {
			log.Warn("statedir: first-seen journal not compacted", "file", f.path, "err", err)
		}
	}
	return f
}

// read replays the journal into byVM and returns its number of lines.
// Lines that do not parse (the last one after a crash, or damage) are
// skipped and counted in the log.
func (f *firstSeen) read() (int, error) {
	file, err := os.Open(f.path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer file.Close()
	at := map[string]map[string]int64{}
	lines, bad := 0, 0
	r := bufio.NewReaderSize(file, maxSeenLine)
	ended := true // what was read so far ends with a newline
	for {
		line, err := r.ReadSlice('\n')
		overlong := false
		for errors.Is(err, bufio.ErrBufferFull) { // damage: skipped whole
			overlong, ended = true, false
			line, err = r.ReadSlice('\n')
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return lines, err
		}
		if len(line) > 0 {
			ended = line[len(line)-1] == '\n'
		}
		if overlong || len(line) > 0 {
			lines++
			var rec seenRecord
			switch {
			case overlong || json.Unmarshal(line, &rec) != nil || rec.VM == "" || rec.ID == "" || rec.At < 0:
				bad++
			case rec.At == 0:
				delete(at[rec.VM], rec.ID)
			default:
				if at[rec.VM] == nil {
					at[rec.VM] = map[string]int64{}
				}
				at[rec.VM][rec.ID] = rec.At
			}
		}
		if err != nil { // io.EOF
			break
		}
	}
	f.unterminated = !ended
	for vm, ids := range at {
		if len(ids) == 0 {
			continue
		}
		snaps := make([]seenSnap, 0, len(ids))
		for id, t := range ids {
			snaps = append(snaps, seenSnap{id: id, at: t})
		}
		slices.SortFunc(snaps, func(a, b seenSnap) int { return cmp.Compare(a.id, b.id) })
		f.byVM[vm] = snaps
	}
	if bad > 0 {
		f.log.Warn("statedir: skipped damaged first-seen journal lines", "file", f.path, "lines", bad)
	}
	return lines, nil
}

func (f *firstSeen) count() int {
	n := 0
	for _, snaps := range f.byVM {
		n += len(snaps)
	}
	return n
}

// compact rewrites the journal with only what is true now.
func (f *firstSeen) compact() error {
	var b bytes.Buffer
	for _, vm := range slices.Sorted(maps.Keys(f.byVM)) {
		for _, s := range f.byVM[vm] {
			appendRecord(&b, seenRecord{VM: vm, ID: s.id, At: s.at})
		}
	}
	if err := replaceFile(filepath.Dir(f.path), f.path, b.Bytes()); err != nil {
		return err
	}
	f.unterminated = false
	return nil
}

// times returns when each of ids, the snapshots of vm that have no other
// time, oldest first, was first seen, recording those never seen as seen
// at now; the VM's other ids are forgotten. Each claims its second in
// taken: those seen before first, as they were shown already (one moves
// only when a journal written before times were kept distinct gave two
// the same second), then the new ones.
func (f *firstSeen) times(vm string, ids []string, now time.Time, taken seconds) map[string]time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	known := f.byVM[vm]
	out := make(map[string]time.Time, len(ids))
	next := make([]seenSnap, 0, len(ids))
	changed := false
	// add gives id its time, at or moved off a taken second, and records
	// it when it is new or moved.
	add := func(id string, at int64, seen bool) {
		if _, dup := out[id]; dup {
			return
		}
		t := taken.claim(time.Unix(0, at))
		if !seen || t.UnixNano() != at {
			at = t.UnixNano()
			f.record(seenRecord{VM: vm, ID: id, At: at})
			changed = true
		}
		out[id] = t
		next = append(next, seenSnap{id: id, at: at})
	}
	var unseen []string
	for _, id := range ids {
		if i, ok := slices.BinarySearchFunc(known, id, func(s seenSnap, id string) int { return cmp.Compare(s.id, id) }); ok {
			add(id, known[i].at, true)
		} else {
			unseen = append(unseen, id)
		}
	}
	for _, id := range unseen {
		add(id, now.UnixNano(), false)
	}
	for _, s := range known {
		if _, listed := out[s.id]; !listed {
			f.record(seenRecord{VM: vm, ID: s.id})
			changed = true
		}
	}
	switch {
	case len(next) == 0:
		delete(f.byVM, vm)
	case changed:
		slices.SortFunc(next, func(a, b seenSnap) int { return cmp.Compare(a.id, b.id) })
		next = slices.CompactFunc(next, func(a, b seenSnap) bool { return a.id == b.id })
		f.byVM[vm] = slices.Clip(next)
	}
	return out
}

// taken adds to taken the seconds of vm's snapshots first seen, but id's.
func (f *firstSeen) taken(vm, id string, taken seconds) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, s := range f.byVM[vm] {
		if s.id != id {
			taken.take(time.Unix(0, s.at))
		}
	}
}

// record queues rec for the next batch.
func (f *firstSeen) record(rec seenRecord) {
	if f.path == "" {
		return
	}
	f.pending = append(f.pending, rec)
	if f.flusher == nil && !f.closed {
		f.flusher = time.AfterFunc(FlushDelay, func() { _ = f.flush() })
	}
}

// flush appends the pending records and syncs the journal once.
func (f *firstSeen) flush() error {
	f.writing.Lock()
	defer f.writing.Unlock()
	f.mu.Lock()
	if f.flusher != nil {
		f.flusher.Stop()
		f.flusher = nil
	}
	pending := f.pending
	f.pending = nil
	f.mu.Unlock()
	if len(pending) == 0 {
		return nil
	}
	var b bytes.Buffer
	if f.unterminated {
		b.WriteByte('\n')
	}
	for _, rec := range pending {
		appendRecord(&b, rec)
	}
	err := appendFile(f.path, b.Bytes())
	if err == nil {
		f.unterminated = false
	} else {
		f.log.Warn("statedir: snapshot first-seen times not saved", "file", f.path, "records", len(pending), "err", err)
	}
	return err
}

func (f *firstSeen) close() error {
	f.mu.Lock()
	f.closed = true
	f.mu.Unlock()
	return f.flush()
}

func appendRecord(b *bytes.Buffer, rec seenRecord) {
	line, _ := json.Marshal(rec) // strings and an int64: cannot fail
	b.Write(line)
	b.WriteByte('\n')
}

// appendFile appends b to path and syncs it. A crash in the middle leaves
// a partial last line, which read skips.
func appendFile(path string, b []byte) error {
	file, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("statedir append %s: %w", path, err)
	}
	_, err = file.Write(b)
	if err == nil {
		err = file.Sync()
	}
	if cerr := file.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("statedir append %s: %w", path, err)
	}
	return nil
}
