package coriolis

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"path"
	"sync"

	"golang.org/x/sync/errgroup"

	"github.com/vmexportfs/vmexportfs/backend"
)

// How large a JSON answer may be. There is no fixed cap: an answer may take
// what what it describes can legitimately take, and is cut off past that.
//
// Every answer is decoded as it streams in and keeps only what is needed
// (decode.go), so memory grows with what is kept, not with the answer; the
// limit is there to stop an answer that never ends, or one far larger than
// anything it can legitimately be, before it ties up the link, the CPU and
// the memory of what is kept.
//
// What makes a snapshot answer large is its chunks: a snapshot of a
// 1,000,000-extent disk is 66 MB of JSON, the VM's snapshot list carries
// every snapshot's (132 MB for two). The chunks are the disk file's FIEMAP
// extents, in whole filesystem blocks, disjoint (specs/coriolis.md: 4 KiB
// blocks on the exporter's reflink repository; Oracle VM repositories are
// OCFS2, whose clusters are 4 KiB or more, or XFS as observed), so a disk of
// S bytes has at most ceil(S/4096) of them, squashed or not, and a compareTo
// answer a subset of those. A snapshot answer may therefore carry
//
//	chunks ≤ chunkFloor + Σ ceil(S/4096)     over the disks it describes
//	bytes  ≤ answerBase + pairMeta × disks + chunkJSONMax × chunks read
//
// where the sizes come from a HEAD of each disk (kept for the mount: the HEAD
// that opening the disk needs anyway), and the disks are the pairs of
// snapshot and disk that the VM (its listing, or a GET of it) and the answer
// itself name. chunkJSONMax is the most one chunk can take: {"start": 19
// digits, "length": 19 digits, "physical_start": 19 digits} is 95 bytes,
// with room for a separator and a pretty-printer's whitespace. pairMeta is
// what a disk's strings can take (its name, snapshot id and three paths, of
// up to PATH_MAX bytes each, with room for escapes); answerBase holds the
// rest (brackets, the snapshots' ids, an unknown field or two).
//
// chunkFloor is what any answer may carry whatever its disks' sizes, a
// million chunks (16 MiB kept at most): below it an answer costs no HEAD
// here, however long it runs, and the exporters of the fragmented-disk
// stress tests, which report extents far finer than a filesystem block
// (the real one does not), are read as far as a million of them. Past it the
// disks are sized (the HEADs their openings make next anyway), and an answer
// still past its limit once every disk it names has been sized is cut off:
// ErrUnavailable, saying what the limit was made of.
//
// Answers without chunks (the VM listing, a VM, the login) have nothing to
// measure them against but themselves: each VM, VM disk and snapshot id they
// hold raises their limit by the most one can take (vmMeta, diskMeta,
// idMeta), so an answer of whitespace, of one endless string or of unknown
// fields is cut off at answerBase, while a listing of any number of VMs is
// read, holding what it keeps of each.
const (
	answerBase   = 1 << 20
	chunkJSONMax = 256
	pairMeta     = 32 << 10
	vmMeta       = 64 << 10
	diskMeta     = 16 << 10
	idMeta       = 1 << 10
	// fiemapBlock is the filesystem block FIEMAP reports chunks in.
	fiemapBlock = 4096
	// sizeLookups is how many HEADs one answer may ask for beyond the
	// pairs the VM names (disks named only by the answer, as a snapshot
	// of a disk since removed from the VM is): a hostile answer naming
	// endless disks must not make endless requests.
	sizeLookups = 64
)

// chunkFloor is a variable only so that tests can make it small.
var chunkFloor int64 = 1 << 20

// budget is the reader an answer is decoded from: it counts what was read and
// refuses to read past the answer's limit, which grows as the decoder finds
// what the answer legitimately holds.
type budget struct {
	r    io.Reader
	read int64
	err  error // the first read error, or the cut-off

	grants   int64 // what the chunks, VMs and ids read so far may take
	pairs    int64 // disks (snapshot and disk) the answer may describe
	chunks   int64 // chunks decoded so far
	chunkCap int64 // chunks allowed now
	sizer    *sizer
	capWhy   string // what chunkCap is made of, for errors
}

func newBudget(r io.Reader, s *sizer) *budget {
	b := &budget{r: r, chunkCap: chunkFloor, sizer: s, capWhy: fmt.Sprintf("no disk sized: %d chunks whatever their size", chunkFloor)}
	if s != nil {
		b.pairs = int64(len(s.pairs))
	}
	return b
}

// limit is how many bytes the answer may take now.
func (b *budget) limit() int64 {
	return satAdd(answerBase, b.grants, satMul(pairMeta, b.pairs))
}

func (b *budget) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if b.read >= b.limit() {
		if b.grow(); b.read >= b.limit() {
			b.err = &tooLarge{msg: fmt.Sprintf("answer cut off after %d bytes, more than what it holds can take: %s", b.read, b.what())}
			return 0, b.err
		}
	}
	if rem := b.limit() - b.read; int64(len(p)) > rem {
		p = p[:rem]
	}
	n, err := b.r.Read(p)
	b.read += int64(n)
	if err != nil && b.err == nil {
		b.err = err
	}
	return n, err
}

// what says what the limit is made of.
func (b *budget) what() string {
	return fmt.Sprintf("%d bytes (%d for its frame, %d for %s, %d for the %s and the VMs and ids read)",
		b.limit(), answerBase, satMul(pairMeta, b.pairs), count(b.pairs, "disk"), b.grants, count(b.chunks, "chunk"))
}

// grant raises the limit by what a kept element may take.
func (b *budget) grant(n int64) {
	if b != nil {
		b.grants = satAdd(b.grants, n)
	}
}

// chunk counts one more chunk of the answer, refusing one past the most its
// disks can hold.
func (b *budget) chunk() error {
	if b == nil {
		return nil
	}
	b.chunks++
	b.grant(chunkJSONMax)
	if b.chunks <= b.chunkCap {
		return nil
	}
	if b.grow(); b.chunks <= b.chunkCap {
		return nil
	}
	return &tooLarge{msg: fmt.Sprintf("answer cut off at chunk %d: more than the %d chunks its disks can hold (%s)", b.chunks, b.chunkCap, b.capWhy)}
}

// noteDisk and notePath say what the answer describes (a disk of a
// snapshot, by its name or the base name of its path, which the exporter
// makes of the name), so that a disk the VM does not name is sized too.
func (b *budget) noteDisk(sid, disk string) {
	if b != nil && b.sizer != nil && sid != "" && disk != "" && disk != "." && disk != "/" {
		b.sizer.note(sid, disk)
	}
}

func (b *budget) notePath(sid, p string) {
	if p != "" {
		b.noteDisk(sid, path.Base(p))
	}
}

// grow sizes the disks named since the last time, and reports whether the
// limit rose.
func (b *budget) grow() bool {
	if b.sizer == nil || !b.sizer.pending() {
		return false
	}
	before := b.limit()
	total, found, why := b.sizer.resolve()
	b.chunkCap = satAdd(chunkFloor, total)
	b.capWhy = why
	b.pairs = max(b.pairs, found)
	return b.limit() > before
}

// tooLarge is an answer cut off by its budget.
type tooLarge struct{ msg string }

func (e *tooLarge) Error() string { return e.msg }

// sizer finds the sizes of the disks an answer may describe.
type sizer struct {
	ctx  context.Context
	vm   string
	size func(ctx context.Context, ref backend.DiskRef) (int64, error)

	pairs   map[[2]string]bool // snapshot and disk: known to the answer
	sized   map[[2]string]int64
	failed  map[[2]string]error
	named   int // pairs the answer itself added
	dirty   bool
	lastErr error
}

// newSizer sizes the disks of snapshots sids of vm among disks (the VM's
// and what an earlier answer said), and those the answer names.
func (c *Client) newSizer(ctx context.Context, vm string, sids, disks []string) *sizer {
	return newSizer(ctx, vm, sids, disks, c.probeSize)
}

// newSizer is Client.newSizer with disks sized by size.
func newSizer(ctx context.Context, vm string, sids, disks []string, size func(context.Context, backend.DiskRef) (int64, error)) *sizer {
	s := &sizer{ctx: ctx, vm: vm, size: size, pairs: map[[2]string]bool{}, sized: map[[2]string]int64{}, failed: map[[2]string]error{}}
	for _, sid := range sids {
		for _, d := range disks {
			if sid != "" && d != "" {
				s.pairs[[2]string{sid, d}] = true
			}
		}
	}
	s.dirty = len(s.pairs) > 0
	return s
}

func (s *sizer) note(sid, disk string) {
	k := [2]string{sid, disk}
	if s.pairs[k] || s.named >= sizeLookups {
		return
	}
	s.pairs[k] = true
	s.named++
	s.dirty = true
}

func (s *sizer) pending() bool { return s.dirty }

// resolve HEADs every pair not sized yet, a few at a time, and returns the
// chunks they can hold, how many exist, and a description.
func (s *sizer) resolve() (chunks, found int64, why string) {
	s.dirty = false
	var todo [][2]string
	for k := range s.pairs {
		if _, ok := s.sized[k]; !ok {
			if _, bad := s.failed[k]; !bad {
				todo = append(todo, k)
			}
		}
	}
	var mu sync.Mutex
	var g errgroup.Group
	g.SetLimit(8)
	for _, k := range todo {
		g.Go(func() error {
			n, err := s.size(s.ctx, backend.DiskRef{VM: s.vm, Snapshot: k[0], Disk: k[1]})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				s.sized[k] = n
			case errors.Is(err, backend.ErrNotFound):
				s.sized[k] = -1 // no such disk in that snapshot
			default:
				s.failed[k] = err
				s.lastErr = err
			}
			return nil
		})
	}
	g.Wait()
	var bytes int64
	for _, n := range s.sized {
		if n >= 0 {
			found++
			bytes = satAdd(bytes, n)
			chunks = satAdd(chunks, n/fiemapBlock+min(n%fiemapBlock, 1))
		}
	}
	why = fmt.Sprintf("%s, %d bytes in all: a chunk per %d-byte block, and %d more whatever their size", count(found, "disk"), bytes, fiemapBlock, chunkFloor)
	if s.lastErr != nil {
		why += fmt.Sprintf("; %d disks could not be sized: %v", len(s.failed), s.lastErr)
	}
	return chunks, found, why
}

// count is "1 disk", "2 disks".
func count(n int64, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

// satAdd and satMul are + and × that stop at MaxInt64.
func satAdd(v ...int64) int64 {
	var t int64
	for _, x := range v {
		if x > math.MaxInt64-t {
			return math.MaxInt64
		}
		t += x
	}
	return t
}

func satMul(a, b int64) int64 {
	if a != 0 && b > math.MaxInt64/a {
		return math.MaxInt64
	}
	return a * b
}
