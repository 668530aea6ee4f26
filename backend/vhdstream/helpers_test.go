package vhdstream

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/retry"
	"github.com/vmexportfs/vmexportfs/backend/testenv"
)

// needQemu: the real-image tests prove the reader against qemu's writer,
// which nothing else here can.
func needQemu(t testing.TB) {
	t.Helper()
	testenv.RequireTool(t, "qemu-img", "qemu-io")
}

func run(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %v: %s", name, args, out)
	return out
}

// qemuImage creates a dynamic VHD with qemu-img and applies qemu-io
// commands (such as "write -P 0xab 1M 64k") to it.
func qemuImage(t testing.TB, size, opts string, cmds ...string) string {
	t.Helper()
	needQemu(t)
	path := filepath.Join(t.TempDir(), "disk.vhd")
	o := "subformat=dynamic"
	if opts != "" {
		o += "," + opts
	}
	run(t, "qemu-img", "create", "-q", "-f", "vpc", "-o", o, path, size)
	if len(cmds) > 0 {
		args := []string{"-f", "vpc"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		run(t, "qemu-io", append(args, path)...)
	}
	return path
}

// qemuFromRaw converts raw bytes to a dynamic VHD with qemu-img convert,
// which leaves zero blocks out.
func qemuFromRaw(t testing.TB, raw []byte) string {
	t.Helper()
	needQemu(t)
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src.raw"), filepath.Join(dir, "disk.vhd")
	require.NoError(t, os.WriteFile(src, raw, 0o600))
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", src, dst)
	return dst
}

func qemuVirtualSize(t testing.TB, path string) int64 {
	t.Helper()
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	require.NoError(t, json.Unmarshal(run(t, "qemu-img", "info", "--output=json", "-f", "vpc", path), &info))
	return info.VirtualSize
}

// qemuRaw is qemu's reading of the image: what a Spill must match.
func qemuRaw(t testing.TB, path string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	run(t, "qemu-img", "convert", "-f", "vpc", "-O", "raw", path, out)
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	return b
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return b
}

// fixChecksums recomputes the footer copy's and the header's checksums
// after a test patched them; the trailing footer is made a copy again.
func fixChecksums(img []byte) {
	binary.BigEndian.PutUint32(img[64:], checksum(img[:512], 64))
	binary.BigEndian.PutUint32(img[512+36:], checksum(img[512:1536], 36))
	if len(img) >= 2048+512 && bytes.Equal(img[len(img)-512:len(img)-504], []byte("conectix")) {
		copy(img[len(img)-512:], img[:512])
	}
}

func batEntry(img []byte, i int) uint32 { return binary.BigEndian.Uint32(img[1536+4*i:]) }

// layoutBytes builds footer copy, header and BAT by hand, for seeds and
// hostile cases that must not depend on qemu.
func layoutBytes(size uint64, blockSize uint32, bat []uint32) []byte {
	b := make([]byte, 1536+len(bat)*4)
	copy(b, "conectix")
	binary.BigEndian.PutUint32(b[8:], 2)
	binary.BigEndian.PutUint32(b[12:], 0x00010000)
	binary.BigEndian.PutUint64(b[16:], 512)
	copy(b[28:], "tap\x00")
	binary.BigEndian.PutUint64(b[40:], size)
	binary.BigEndian.PutUint64(b[48:], size)
	binary.BigEndian.PutUint32(b[60:], DiskTypeDynamic)
	h := b[512:1536]
	copy(h, "cxsparse")
	binary.BigEndian.PutUint64(h[8:], ^uint64(0))
	binary.BigEndian.PutUint64(h[16:], 1536)
	binary.BigEndian.PutUint32(h[24:], 0x00010000)
	binary.BigEndian.PutUint32(h[28:], uint32(len(bat)))
	binary.BigEndian.PutUint32(h[32:], blockSize)
	for i, v := range bat {
		binary.BigEndian.PutUint32(b[1536+4*i:], v)
	}
	fixChecksums(b)
	return b
}

// source serves a VHD the way export_raw_vdi does: from byte 0, no length,
// ending when the "connection" (a pipe) closes. Each open can be cut short,
// and writing can be held at a gate so reads are issued before the stream
// gets there.
type source struct {
	data  []byte
	chunk int

	mu       sync.Mutex
	opens    int
	cuts     []int64  // cuts[i]: where the i-th open ends; absent: the whole file
	datas    [][]byte // datas[i]: what the i-th open serves instead of data
	openErrs []error  // openErrs[i]: the i-th open fails
	stall    bool     // after a cut, stay silent instead of ending
	gate     chan struct{}
	gateAt   int64
	reached  chan struct{} // closed when a stream first waits at the gate
	once     sync.Once
}

func (src *source) Opens() int {
	src.mu.Lock()
	defer src.mu.Unlock()
	return src.opens
}

func (src *source) Open(ctx context.Context) (io.ReadCloser, error) {
	src.mu.Lock()
	i := src.opens
	src.opens++
	data := src.data
	if i < len(src.datas) && src.datas[i] != nil {
		data = src.datas[i]
	}
	cut, cutSet := int64(len(data)), false
	if i < len(src.cuts) && src.cuts[i] >= 0 {
		cut, cutSet = src.cuts[i], true
	}
	var openErr error
	if i < len(src.openErrs) {
		openErr = src.openErrs[i]
	}
	gate, gateAt, stall := src.gate, src.gateAt, src.stall
	chunk := src.chunk
	src.mu.Unlock()
	if openErr != nil {
		return nil, openErr
	}
	if chunk <= 0 {
		chunk = 64 << 10
	}
	pr, pw := io.Pipe()
	go func() {
		pos := int64(0)
		for pos < cut {
			n := min(int64(chunk), cut-pos)
			if gate != nil && pos < gateAt {
				n = min(n, gateAt-pos)
			}
			if gate != nil && pos >= gateAt {
				if src.reached != nil {
					src.once.Do(func() { close(src.reached) })
				}
				select {
				case <-gate:
				case <-ctx.Done():
					pw.CloseWithError(ctx.Err())
					return
				}
			}
			if _, err := pw.Write(data[pos : pos+n]); err != nil {
				return
			}
			pos += n
		}
		if stall && cutSet {
			<-ctx.Done()
			pw.CloseWithError(ctx.Err())
			return
		}
		pw.Close()
	}()
	return pr, nil
}

func fastPolicy() retry.Policy {
	return retry.Policy{Attempts: 3, BaseDelay: time.Millisecond, MaxDelay: 5 * time.Millisecond, AttemptTimeout: 5 * time.Second}
}

// syncBuffer collects log lines written from the stream goroutine.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func testLogger(t testing.TB) (*slog.Logger, *syncBuffer) {
	buf := &syncBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("log:\n%s", buf.String())
		}
	})
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug})), buf
}

func newSpill(t testing.TB, src *source, budget *Budget, pol retry.Policy) (*Spill, *syncBuffer) {
	t.Helper()
	log, buf := testLogger(t)
	s, err := NewSpill(context.Background(), SpillOptions{
		Open: src.Open, Dir: t.TempDir(), Budget: budget, Policy: pol, Logger: log, Name: "xvda",
	})
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s, buf
}

// waitDone waits for the stream goroutine to have stored everything.
func waitDone(t testing.TB, s *Spill) {
	t.Helper()
	require.Eventually(t, s.Done, 10*time.Second, time.Millisecond)
}

// readAll reads the whole disk through ReadAt in pieces.
func readAll(t testing.TB, s *Spill) []byte {
	t.Helper()
	out := make([]byte, s.Size())
	for off := int64(0); off < s.Size(); off += 1 << 20 {
		n := min(1<<20, s.Size()-off)
		require.NoError(t, s.ReadAt(context.Background(), out[off:off+n], off))
	}
	return out
}
