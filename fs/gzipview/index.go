package gzipview

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// indexMagic starts every persisted index; bump indexVersion whenever the
// member layout or the file format changes, so old files are rebuilt.
const (
	indexMagic   = "VMXGZIDX"
	indexVersion = 1
	// compressVersionFallback is used when the binary carries no build info
	// (e.g. some test binaries); it still binds the index to this format.
	compressVersionFallback = "klauspost-compress-unknown"
	maxMembers              = 1 << 32
	maxVersionLen           = 256
)

var errBadIndex = errors.New("gzipview: invalid index")

// identity is everything that determines the compressed bytes; an index is
// only trusted when every field matches.
type identity struct {
	compressVersion string
	level           int32
	chunkSize       int64
	rawSize         int64
	extentHash      [sha256.Size]byte
}

func compressModuleVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return compressVersionFallback
	}
	for _, dep := range info.Deps {
		if dep.Path == "github.com/klauspost/compress" {
			if dep.Replace != nil {
				dep = dep.Replace
			}
			return dep.Path + "@" + dep.Version
		}
	}
	return compressVersionFallback
}

func hashExtents(m extent.Map, size int64) [sha256.Size]byte {
	h := sha256.New()
	h.Write([]byte(strconv.FormatInt(size, 10) + "\n"))
	m.WriteTo(h) // the text of m.Format(), streamed: a large map is never held as text
	var out [sha256.Size]byte
	copy(out[:], h.Sum(nil))
	return out
}

// encodeIndex layout (little endian):
// magic[8] version u32 | verLen u16 ver | level i32 | chunk i64 | size i64 |
// extentHash[32] | count u64 | count × u64 lengths | sha256 of all before.
func encodeIndex(id identity, lengths []int64) []byte {
	var b bytes.Buffer
	b.WriteString(indexMagic)
	le := binary.LittleEndian
	b.Write(le.AppendUint32(nil, indexVersion))
	b.Write(le.AppendUint16(nil, uint16(len(id.compressVersion))))
	b.WriteString(id.compressVersion)
	b.Write(le.AppendUint32(nil, uint32(id.level)))
	b.Write(le.AppendUint64(nil, uint64(id.chunkSize)))
	b.Write(le.AppendUint64(nil, uint64(id.rawSize)))
	b.Write(id.extentHash[:])
	b.Write(le.AppendUint64(nil, uint64(len(lengths))))
	for _, n := range lengths {
		b.Write(le.AppendUint64(nil, uint64(n)))
	}
	sum := sha256.Sum256(b.Bytes())
	b.Write(sum[:])
	return b.Bytes()
}

// decodeIndex returns the member lengths only when buf is a well-formed,
// checksummed index for exactly want with wantMembers members.
func decodeIndex(buf []byte, want identity, wantMembers int64) ([]int64, error) {
	if len(buf) < len(indexMagic)+sha256.Size {
		return nil, fmt.Errorf("%w: too short", errBadIndex)
	}
	body, sum := buf[:len(buf)-sha256.Size], buf[len(buf)-sha256.Size:]
	if got := sha256.Sum256(body); !bytes.Equal(got[:], sum) {
		return nil, fmt.Errorf("%w: checksum mismatch", errBadIndex)
	}
	r := &byteReader{b: body}
	if string(r.next(len(indexMagic))) != indexMagic {
		return nil, fmt.Errorf("%w: bad magic", errBadIndex)
	}
	le := binary.LittleEndian
	if v := r.u32(); r.err != nil || v != indexVersion {
		return nil, fmt.Errorf("%w: unsupported version", errBadIndex)
	}
	vlen := int(le.Uint16(r.next(2)))
	if vlen > maxVersionLen {
		return nil, fmt.Errorf("%w: version string too long", errBadIndex)
	}
	var got identity
	got.compressVersion = string(r.next(vlen))
	got.level = int32(r.u32())
	got.chunkSize = int64(r.u64())
	got.rawSize = int64(r.u64())
	copy(got.extentHash[:], r.next(sha256.Size))
	count := r.u64()
	if r.err != nil {
		return nil, fmt.Errorf("%w: truncated header", errBadIndex)
	}
	if got != want {
		return nil, fmt.Errorf("%w: identity mismatch", errBadIndex)
	}
	if count != uint64(wantMembers) || count > maxMembers || uint64(len(r.b)-r.off) != count*8 {
		return nil, fmt.Errorf("%w: member count %d", errBadIndex, count)
	}
	lengths := make([]int64, count)
	for i := range lengths {
		n := r.u64()
		// The smallest gzip member is 20 bytes (header 10 + empty deflate
		// block + trailer 8); anything outside sane bounds is not ours.
		if n < 18 || n > 1<<40 {
			return nil, fmt.Errorf("%w: member %d length %d", errBadIndex, i, n)
		}
		lengths[i] = int64(n)
	}
	return lengths, nil
}

type byteReader struct {
	b   []byte
	off int
	err error
}

func (r *byteReader) next(n int) []byte {
	if r.err != nil || n < 0 || len(r.b)-r.off < n {
		r.err = errBadIndex
		return make([]byte, max(n, 0))
	}
	out := r.b[r.off : r.off+n]
	r.off += n
	return out
}

func (r *byteReader) u32() uint32 { return binary.LittleEndian.Uint32(r.next(4)) }
func (r *byteReader) u64() uint64 { return binary.LittleEndian.Uint64(r.next(8)) }

// writeFileAtomic writes via a temp file in the same directory and renames,
// so a crash never leaves a half-written index that a later mount would read.
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("create temp index: %w", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after a successful rename
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return fmt.Errorf("chmod temp index: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write temp index: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync temp index: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close temp index: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename index: %w", err)
	}
	return nil
}
