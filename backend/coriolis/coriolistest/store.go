package coriolistest

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// Granularity is the block size of the extent bookkeeping. Data is stored
// byte-exact; only the "physical location" accounting is per granule, like the
// block size of a reflink filesystem.
const Granularity = 64 << 10

// Errors returned by the model; the HTTP layer maps them to APIError statuses.
var (
	errNotFound = errors.New("not found")
	errInvalid  = errors.New("invalid argument")
	errExists   = errors.New("already exists")
	errConflict = errors.New("conflict")
)

// VMSpec describes a VM to add to the simulator.
type VMSpec struct {
	ID           string // used in URLs (the server's "name")
	FriendlyName string
	Disks        []DiskSpec
}

// DiskSpec describes one disk of a VM. Device defaults to xvda, xvdb, ...;
// a CD-ROM gets the ":cdrom" suffix and mode "r". Like the real server on a
// repository whose metadata leaves the ISO untyped, a CD-ROM is reflinked
// into every snapshot and listed as one of its disks; one typed "not a
// virtual disk" (ISOTyped) makes snapshot creation of its VM fail with 400
// "VM does not support reflink cloning".
type DiskSpec struct {
	Name     string // the diskID of the disk route
	Device   string
	Size     int64
	CDROM    bool
	ISOTyped bool // CD-ROM only: the repository types it as not a virtual disk
}

// fsBlock is the block size of the repository's filesystem: FIEMAP reports
// whole blocks, so the last chunk of a disk whose size is not a multiple of
// it ends past the end of the file, as on the real server.
const fsBlock = 4096

// errNoReflink is the server's refusal to snapshot a VM with a typed ISO.
var errNoReflink = fmt.Errorf("%w: VM does not support reflink cloning", errInvalid)

// vmNotFound is the server's answer for an unknown VM: 500 with details
// "could not find VM with ID <id>".
type vmNotFound struct{ id string }

func (e vmNotFound) Error() string { return "could not find VM with ID " + e.id }
func (e vmNotFound) Unwrap() error { return errNotFound }

// granuleMap maps a granule index to the physical id it was allocated at.
type granuleMap map[int64]uint64

type disk struct {
	spec     DiskSpec
	livePath string
	granules granuleMap
}

type snapshot struct {
	id    string
	seq   uint64 // creation order, to tell older from newer for compareTo
	dir   string
	disks []*snapDisk
}

type snapDisk struct {
	spec   DiskSpec
	path   string
	chunks []Chunk // unsquashed extents, recorded at creation like the server's database
	// verbatim: chunks were set by OverrideChunks and are answered as they
	// are, squashChunks or not.
	verbatim bool
}

type vm struct {
	spec      VMSpec
	uuid      string
	repo      string
	dir       string
	disks     []*disk
	snapshots []*snapshot // creation order
}

func (v *vm) disk(name string) *disk {
	for _, d := range v.disks {
		if d.spec.Name == name {
			return d
		}
	}
	return nil
}

func (v *vm) snapshot(id string) *snapshot {
	for _, s := range v.snapshots {
		if s.id == id {
			return s
		}
	}
	return nil
}

func (s *snapshot) disk(name string) *snapDisk {
	for _, d := range s.disks {
		if d.spec.Name == name {
			return d
		}
	}
	return nil
}

// safeName keeps ids usable as single path components in Dir.
func safeName(s string) error {
	if s == "" || s == "." || s == ".." || strings.ContainsAny(s, "/\\\x00") {
		return fmt.Errorf("%w: bad name %q", errInvalid, s)
	}
	return nil
}

// granuleRange returns the granules touched by [off, off+n).
func granuleRange(off, n int64) (first, last int64) {
	return off / Granularity, (off + n - 1) / Granularity
}

// granuleBounds returns the byte range of granule g, clipped to the disk size.
func granuleBounds(g, size int64) (start, end int64) {
	start = g * Granularity
	end = min(start+Granularity, size)
	return start, end
}

func checkRange(off, n, size int64) error {
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("%w: range [%d,+%d) outside disk of %d bytes", errInvalid, off, n, size)
	}
	return nil
}

// punchHole deallocates [off, off+n) of f so the live file stays sparse; where
// the filesystem cannot punch holes, zeros are written instead (same bytes).
func punchHole(f *os.File, off, n int64) error {
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err == nil {
		return nil
	}
	zeros := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(zeros)))
		if _, werr := f.WriteAt(zeros[:k], off); werr != nil {
			return fmt.Errorf("zero range after fallocate failed (%v): %w", err, werr)
		}
		off += k
		n -= k
	}
	return nil
}

// copyGranules makes dst a sparse copy of src: only the allocated granules of
// m are copied, and of those only the blocks that hold more than zeros (the
// real server's reflink copy shares them instead: either way the copy costs
// no space for what it does not hold); everything else stays a hole.
func copyGranules(dst, src *os.File, m granuleMap, size int64) error {
	keys := sortedGranules(m)
	buf := make([]byte, Granularity)
	for _, g := range keys {
		start, end := granuleBounds(g, size)
		b := buf[:end-start]
		if _, err := src.ReadAt(b, start); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read live disk at %d: %w", start, err)
		}
		for off := 0; off < len(b); {
			// Runs of blocks with data are written in one go.
			for off < len(b) && zeroBlock(b[off:min(off+fsBlock, len(b))]) {
				off += fsBlock
			}
			run := off
			for run < len(b) && !zeroBlock(b[run:min(run+fsBlock, len(b))]) {
				run += fsBlock
			}
			run = min(run, len(b))
			if run > off {
				if _, err := dst.WriteAt(b[off:run], start+int64(off)); err != nil {
					return fmt.Errorf("write snapshot disk at %d: %w", start+int64(off), err)
				}
			}
			off = run
		}
	}
	return nil
}

func zeroBlock(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func sortedGranules(m granuleMap) []int64 {
	keys := make([]int64, 0, len(m))
	for g := range m {
		keys = append(keys, g)
	}
	slices.Sort(keys)
	return keys
}

// Chunk is one extent of a snapshot disk as the server encodes it.
type Chunk struct {
	Start         uint64 `json:"start"`
	Length        uint64 `json:"length"`
	PhysicalStart uint64 `json:"physical_start"`
}

// fiemapChunks lists the extents of m in logical order the way FIEMAP does:
// a new extent starts wherever the physical location is not contiguous.
func fiemapChunks(m granuleMap, size int64) []Chunk {
	chunks := []Chunk{}
	var prevG int64 = -2
	var prevP uint64
	for _, g := range sortedGranules(m) {
		p := m[g]
		start, end := granuleBounds(g, size)
		// FIEMAP answers in whole filesystem blocks: the last chunk runs
		// past the end of a file whose size is not a block multiple.
		end = min(start+Granularity, (size+fsBlock-1)/fsBlock*fsBlock)
		if end <= start {
			continue
		}
		if len(chunks) > 0 && g == prevG+1 && p == prevP+1 {
			chunks[len(chunks)-1].Length += uint64(end - start)
		} else {
			chunks = append(chunks, Chunk{Start: uint64(start), Length: uint64(end - start), PhysicalStart: p * Granularity})
		}
		prevG, prevP = g, p
	}
	return chunks
}

// squashChunks merges logically contiguous chunks, keeping the first one's
// physical start, as the real server's SquashChunks does (never nil).
func squashChunks(chunks []Chunk) []Chunk {
	out := []Chunk{}
	for _, c := range chunks {
		if n := len(out); n > 0 && out[n-1].Start+out[n-1].Length == c.Start {
			out[n-1].Length += c.Length
			continue
		}
		out = append(out, c)
	}
	return out
}

// diffChunks is the real server's compareTo: a chunk of cur is kept unless
// base has a chunk with the same start, length and physical start (compared
// before squashing). So an extent split by copy-on-write is reported whole
// (64 KiB written inside a 3 MiB extent reports all 3 MiB: its untouched
// pieces no longer match the base's extent), and a discarded range is never
// reported (cur has no chunk there). Like the server it yields nil (JSON
// null) when nothing changed.
func diffChunks(cur, old []Chunk) []Chunk {
	same := make(map[Chunk]bool, len(old))
	for _, o := range old {
		same[o] = true
	}
	var out []Chunk
	for _, c := range cur {
		if !same[c] {
			out = append(out, c)
		}
	}
	return out
}

// editLive runs change on the disk's live file, opened for writing.
func editLive(d *disk, op string, change func(*os.File) error) error {
	f, err := os.OpenFile(d.livePath, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("open live disk: %w", err)
	}
	if err := change(f); err != nil {
		f.Close()
		return fmt.Errorf("%s live disk: %w", op, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close live disk: %w", err)
	}
	return nil
}

func writeLive(d *disk, off int64, data []byte, alloc func() uint64) error {
	n := int64(len(data))
	if err := checkRange(off, n, d.spec.Size); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if err := editLive(d, "write", func(f *os.File) error {
		_, err := f.WriteAt(data, off)
		return err
	}); err != nil {
		return err
	}
	// Copy-on-write: every touched granule moves to a new physical location,
	// so older snapshots keep theirs and compareTo sees the change.
	first, last := granuleRange(off, n)
	for g := first; g <= last; g++ {
		d.granules[g] = alloc()
	}
	return nil
}

func discardLive(d *disk, off, n int64, alloc func() uint64) error {
	if err := checkRange(off, n, d.spec.Size); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if err := editLive(d, "punch hole in", func(f *os.File) error { return punchHole(f, off, n) }); err != nil {
		return err
	}
	first, last := granuleRange(off, n)
	for g := first; g <= last; g++ {
		if _, ok := d.granules[g]; !ok {
			continue
		}
		start, end := granuleBounds(g, d.spec.Size)
		if off <= start && off+n >= end {
			delete(d.granules, g)
			continue
		}
		// A partially discarded granule keeps data but its bytes changed:
		// treat it as rewritten so an incremental copy fetches it again.
		d.granules[g] = alloc()
	}
	return nil
}

// snapshotDisk writes a sparse, immutable copy of d to path.
func snapshotDisk(d *disk, path string) (*snapDisk, error) {
	src, err := os.Open(d.livePath)
	if err != nil {
		return nil, fmt.Errorf("open live disk: %w", err)
	}
	defer src.Close()
	dst, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, fmt.Errorf("create snapshot disk: %w", err)
	}
	if err := dst.Truncate(d.spec.Size); err != nil {
		dst.Close()
		return nil, fmt.Errorf("size snapshot disk: %w", err)
	}
	if err := copyGranules(dst, src, d.granules, d.spec.Size); err != nil {
		dst.Close()
		return nil, err
	}
	if err := dst.Close(); err != nil {
		return nil, fmt.Errorf("close snapshot disk: %w", err)
	}
	return &snapDisk{spec: d.spec, path: path, chunks: fiemapChunks(d.granules, d.spec.Size)}, nil
}

func vmDir(root, vmID string) string { return filepath.Join(root, "vms", vmID) }
