package vhdstream

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/retry"
)

// richImage is a qemu-made VHD of random data in scattered places, some of
// it written out of block order, with a last block cut by the CHS size.
func richImage(t *testing.T) (img, raw []byte, l *Layout) {
	t.Helper()
	path := qemuImage(t, "37M", "",
		"write -P 0x11 30M 3M",        // blocks 15, 16: allocated first
		"write -P 0x22 4096 8k",       // block 0
		"write -P 0x33 6M 2M",         // block 3, whole
		"write -P 0x44 36M 1M",        // the last block, cut by the size
		"write -P 0x55 10M 512",       // one sector of block 5
		"write -z 6M 4k",              // zeros in an allocated block
		"write -P 0x66 12582400 1024", // across the 12 MiB boundary: blocks 5 and 6
	)
	img = readFile(t, path)
	raw = qemuRaw(t, path)
	l, err := ReadLayout(bytes.NewReader(img))
	require.NoError(t, err)
	require.Equal(t, int64(len(raw)), l.Size)
	return img, raw, l
}

func TestSpillMatchesQemu(t *testing.T) {
	img, raw, l := richImage(t)
	// Hold the stream just after its second block, with reads already
	// waiting for everything.
	gateAt := l.BlockOffset(int(l.Order()[1])) + l.Stride()
	src := &source{data: img, gate: make(chan struct{}), gateAt: gateAt, chunk: 100_000, reached: make(chan struct{})}
	s, _ := newSpill(t, src, NewBudget(1<<30), fastPolicy())
	assert.Equal(t, l.Size, s.Size())
	assert.Equal(t, l.Allocated(), s.Allocated())

	rng := rand.New(rand.NewPCG(1, 2))
	type read struct {
		off  int64
		p    []byte
		done chan error
	}
	var reads []*read
	for range 200 {
		n := rng.Int64N(3*mib) + 1
		off := rng.Int64N(s.Size() - n + 1)
		if rng.IntN(4) == 0 { // sector aligned, as the filesystem reads
			off = off / 512 * 512
		}
		r := &read{off: off, p: make([]byte, n), done: make(chan error, 1)}
		reads = append(reads, r)
		go func() { r.done <- s.ReadAt(context.Background(), r.p, r.off) }()
	}
	<-src.reached
	// Every read the stored blocks can answer is answered while the
	// stream is held; the others are still waiting after that.
	waiting := 0
	var pending []*read
	for _, r := range reads {
		canFinish := true
		for b := r.off / l.BlockSize; b <= (r.off+int64(len(r.p))-1)/l.BlockSize; b++ {
			if o := l.BlockOffset(int(b)); o >= gateAt {
				canFinish = false
			}
		}
		if !canFinish {
			pending = append(pending, r)
			continue
		}
		select {
		case err := <-r.done:
			require.NoError(t, err)
			r.done <- nil
		case <-time.After(5 * time.Second):
			t.Fatalf("read at %d of %d bytes needs only stored blocks and holes but waits", r.off, len(r.p))
		}
	}
	time.Sleep(20 * time.Millisecond)
	for _, r := range pending {
		select {
		case err := <-r.done:
			t.Fatalf("read at %d of %d bytes answered before the stream got there: %v", r.off, len(r.p), err)
		default:
			waiting++
		}
	}
	assert.Greater(t, waiting, 50, "most reads had to wait")
	assert.False(t, s.Done())
	close(src.gate)
	for _, r := range reads {
		require.NoError(t, <-r.done)
		require.True(t, bytes.Equal(raw[r.off:r.off+int64(len(r.p))], r.p), "read at %d of %d bytes", r.off, len(r.p))
	}
	waitDone(t, s)
	assert.True(t, bytes.Equal(raw, readAll(t, s)))
	assert.Equal(t, 1, src.Opens())
	assert.Equal(t, nonzeroBytes(raw), s.opts.Budget.Used(), "only non-zero sectors are stored")
}

// nonzeroBytes is what a spill of raw stores: its sectors that are not all
// zeros (qemu's bitmaps are all ones).
func nonzeroBytes(raw []byte) int64 {
	var n int64
	zero := make([]byte, 512)
	for off := 0; off < len(raw); off += 512 {
		sec := raw[off:min(off+512, len(raw))]
		if !bytes.Equal(sec, zero[:len(sec)]) {
			n += int64(len(sec))
		}
	}
	return n
}

// TestSpillHTTP serves the image as export_raw_vdi does: 200, Connection:
// close, no Content-Length and no chunked encoding. The first request is
// cut in the middle of a block (which the client sees as a normal end).
func TestSpillHTTP(t *testing.T) {
	img, raw, l := richImage(t)
	var mu sync.Mutex
	requests := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		requests++
		n := requests
		mu.Unlock()
		conn, bw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		bw.WriteString("HTTP/1.1 200 OK\r\nConnection: close\r\nCache-Control: no-cache, no-store\r\nContent-Type: application/vhd\r\n\r\n")
		body := img
		if n == 1 {
			body = img[:l.BlockOffset(int(l.Order()[2]))+1000]
		}
		for len(body) > 0 {
			k := min(len(body), 32<<10)
			if _, err := bw.Write(body[:k]); err != nil {
				return
			}
			body = body[k:]
		}
		bw.Flush()
	}))
	defer srv.Close()
	open := func(ctx context.Context) (io.ReadCloser, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/export_raw_vdi?format=vhd", nil)
		if err != nil {
			return nil, err
		}
		resp, err := srv.Client().Do(req)
		if err != nil {
			return nil, err
		}
		if resp.ContentLength != -1 || len(resp.TransferEncoding) != 0 {
			resp.Body.Close()
			return nil, errors.New("the test server must send neither a length nor chunks")
		}
		return resp.Body, nil
	}
	log, _ := testLogger(t)
	s, err := NewSpill(context.Background(), SpillOptions{Open: open, Dir: t.TempDir(), Budget: NewBudget(1 << 30), Policy: fastPolicy(), Logger: log, Name: "xvda"})
	require.NoError(t, err)
	defer s.Close()
	assert.True(t, bytes.Equal(raw, readAll(t, s)))
	waitDone(t, s)
	mu.Lock()
	assert.Equal(t, 2, requests)
	mu.Unlock()
}

// TestSpillTruncatedRetried: each stream breaks further along; with only two
// attempts the disk still completes, because an attempt that stored blocks
// starts a fresh count.
func TestSpillTruncatedRetried(t *testing.T) {
	img, raw, l := richImage(t)
	mid := func(i int) int64 { return l.BlockOffset(int(l.Order()[i])) + l.Stride()/2 }
	src := &source{data: img, cuts: []int64{100, 1000, mid(1), mid(3), mid(5)}}
	pol := fastPolicy()
	pol.Attempts = 3
	budget := NewBudget(1 << 30)
	s, buf := newSpill(t, src, budget, pol)
	// The stream goroutine may already have reopened by now, so the opens
	// that read the layout are counted from the log NewSpill wrote first.
	beforeLayout, _, found := strings.Cut(buf.String(), "vhdstream: layout read")
	require.True(t, found, buf.String())
	assert.Equal(t, 2, strings.Count(beforeLayout, "retry: retrying"), "two truncated layouts, then the layout")
	assert.True(t, bytes.Equal(raw, readAll(t, s)))
	waitDone(t, s)
	assert.Equal(t, 6, src.Opens())
	assert.Contains(t, buf.String(), "stream broke, reopening")
	assert.Equal(t, nonzeroBytes(raw), budget.Used(), "a block rewritten after a break is charged once")
}

func TestSpillTruncatedGivesUp(t *testing.T) {
	img, raw, l := richImage(t)
	// Every stream ends in the middle of the second block.
	cut := l.BlockOffset(int(l.Order()[1])) + 700
	src := &source{data: img, cuts: []int64{cut, cut, cut, cut, cut, cut}}
	s, _ := newSpill(t, src, NewBudget(1<<30), fastPolicy())
	second := int64(l.Order()[1]) * l.BlockSize
	err := s.ReadAt(context.Background(), make([]byte, 4096), second)
	require.ErrorIs(t, err, backend.ErrUnavailable)
	require.ErrorIs(t, err, io.ErrUnexpectedEOF)
	require.ErrorIs(t, err, retry.ErrExhausted)
	assert.Equal(t, 1+3, src.Opens(), "the first stream stored one block, then three attempts without progress")
	// What was stored, and the holes, still read.
	b0 := int64(l.Order()[0]) * l.BlockSize
	p := make([]byte, l.BlockSize)
	require.NoError(t, s.ReadAt(context.Background(), p, b0))
	assert.True(t, bytes.Equal(raw[b0:b0+l.BlockSize], p))
	require.NoError(t, s.ReadAt(context.Background(), p, 20*mib), "a hole")
	assert.False(t, s.Done())
}

func TestSpillOpenErrors(t *testing.T) {
	img, raw, _ := richImage(t)
	boom := errors.New("503 service unavailable")
	src := &source{data: img, openErrs: []error{boom, boom}}
	s, _ := newSpill(t, src, NewBudget(1<<30), fastPolicy())
	assert.True(t, bytes.Equal(raw, readAll(t, s)))
	assert.Equal(t, 3, src.Opens())

	// Refusals are not retried.
	src = &source{data: img, openErrs: []error{backend.ErrPermission}}
	_, err := NewSpill(context.Background(), SpillOptions{Open: src.Open, Dir: t.TempDir(), Budget: NewBudget(1), Policy: fastPolicy()})
	require.ErrorIs(t, err, backend.ErrPermission)
	assert.NotErrorIs(t, err, backend.ErrUnavailable, "one errno")
	assert.Equal(t, 1, src.Opens())

	// Nor are malformed streams.
	bad := bytes.Clone(img)
	bad[0] = 'X'
	src = &source{data: bad}
	_, err = NewSpill(context.Background(), SpillOptions{Open: src.Open, Dir: t.TempDir(), Budget: NewBudget(1), Policy: fastPolicy()})
	require.ErrorIs(t, err, ErrMalformed)
	require.ErrorIs(t, err, backend.ErrUnavailable)
	assert.Equal(t, 1, src.Opens())

	// Persistent failures use up the attempts.
	src = &source{data: img, openErrs: []error{boom, boom, boom, boom}}
	_, err = NewSpill(context.Background(), SpillOptions{Open: src.Open, Dir: t.TempDir(), Budget: NewBudget(1), Policy: fastPolicy()})
	require.ErrorIs(t, err, boom)
	require.ErrorIs(t, err, backend.ErrUnavailable)
	assert.Equal(t, 3, src.Opens())
}

func TestSpillLayoutChanged(t *testing.T) {
	img, _, l := richImage(t)
	other := bytes.Clone(img)
	// Swap two BAT entries: still a valid VHD, but not the same one.
	a, b := int(l.Order()[0]), int(l.Order()[1])
	binary.BigEndian.PutUint32(other[1536+4*a:], l.BAT[b])
	binary.BigEndian.PutUint32(other[1536+4*b:], l.BAT[a])
	src := &source{data: img, cuts: []int64{l.End + 10}, datas: [][]byte{nil, other}}
	s, _ := newSpill(t, src, NewBudget(1<<30), fastPolicy())
	err := s.ReadAt(context.Background(), make([]byte, 512), int64(a)*l.BlockSize)
	require.ErrorIs(t, err, backend.ErrUnavailable)
	assert.Contains(t, err.Error(), "layout changed")
	assert.Equal(t, 2, src.Opens(), "not retried")
}

// TestSpillBudget: a budget smaller than the data stores what fits; later
// data fails with a message that names the flag.
func TestSpillBudget(t *testing.T) {
	path := qemuImage(t, "20M", "", "write -P 0xab 1M 64k", "write -P 0xcd 9M 64k", "write -P 0xef 15M 64k")
	img, raw := readFile(t, path), qemuRaw(t, path)
	budget := NewBudget(100 << 10)
	src := &source{data: img}
	s, _ := newSpill(t, src, budget, fastPolicy())
	// Block 0 fits (64 KiB of data, zeros are not stored); block 4 does not.
	err := s.ReadAt(context.Background(), make([]byte, 4096), 9*mib)
	require.ErrorIs(t, err, backend.ErrUnavailable)
	assert.Contains(t, err.Error(), "--spill-size")
	assert.Contains(t, err.Error(), strconv.Itoa(100<<10))
	assert.Contains(t, err.Error(), "budget")
	t.Logf("budget error: %v", err)
	err = s.ReadAt(context.Background(), make([]byte, 4096), 15*mib)
	require.ErrorIs(t, err, backend.ErrUnavailable)

	p := make([]byte, 2*mib)
	require.NoError(t, s.ReadAt(context.Background(), p, 0))
	assert.True(t, bytes.Equal(raw[:2*mib], p))
	require.NoError(t, s.ReadAt(context.Background(), p[:4096], 18*mib), "holes read")
	assert.False(t, s.Done())
	assert.Equal(t, int64(64<<10), budget.Used(), "only the stored block's data is charged")
	assert.Equal(t, 1, src.Opens(), "budget exhaustion is not retried")

	require.NoError(t, s.Close())
	assert.Zero(t, budget.Used(), "Close gives the bytes back")
	require.NoError(t, s.Close(), "Close twice")
	err = s.ReadAt(context.Background(), p[:512], 0)
	require.ErrorIs(t, err, backend.ErrInvalid, "reads after Close fail")
}

func TestSpillSharedBudget(t *testing.T) {
	path := qemuImage(t, "10M", "", "write -P 0xab 0 1M", "write -P 0xcd 4M 1M")
	img, raw := readFile(t, path), qemuRaw(t, path)
	budget := NewBudget(3 * mib)
	a, _ := newSpill(t, &source{data: img}, budget, fastPolicy())
	waitDone(t, a)
	assert.Equal(t, int64(2*mib), budget.Used())
	b, _ := newSpill(t, &source{data: img}, budget, fastPolicy())
	err := b.ReadAt(context.Background(), make([]byte, 512), 4*mib)
	require.ErrorIs(t, err, backend.ErrUnavailable, "the second disk's second block does not fit")
	assert.Equal(t, int64(3*mib), budget.Used())
	require.NoError(t, a.Close())
	assert.Equal(t, int64(mib), budget.Used())
	c, _ := newSpill(t, &source{data: img}, budget, fastPolicy())
	assert.True(t, bytes.Equal(raw, readAll(t, c)), "bytes given back are usable")
	require.NoError(t, b.Close())
	require.NoError(t, c.Close())
	assert.Zero(t, budget.Used())
}

// TestSpillBitmap: sectors whose bitmap bit is clear read as zeros in a
// dynamic VHD even when the block holds bytes there (qemu ignores the
// bitmap, so the expected data is qemu's with those sectors cleared).
func TestSpillBitmap(t *testing.T) {
	path := qemuImage(t, "10M", "", "write -P 0xab 0 2M")
	img, raw := readFile(t, path), qemuRaw(t, path)
	bm := int64(batEntry(img, 0)) * 512
	img[bm] = 0x0f     // sectors 0-3 clear, 4-7 set
	img[bm+100] = 0x7f // sector 800 clear
	want := bytes.Clone(raw)
	clear(want[:4*512])
	clear(want[800*512 : 801*512])
	s, _ := newSpill(t, &source{data: img}, NewBudget(1<<30), fastPolicy())
	assert.True(t, bytes.Equal(want, readAll(t, s)))
}

func TestSpillTrailingFooter(t *testing.T) {
	img, raw, l := richImage(t)
	last := l.BlockOffset(int(l.Order()[len(l.Order())-1])) + l.Stride()
	require.Equal(t, int64(len(img)-512), last, "qemu puts the footer right after the last block")

	t.Run("absent", func(t *testing.T) {
		src := &source{data: img, cuts: []int64{last}}
		s, buf := newSpill(t, src, NewBudget(1<<30), fastPolicy())
		waitDone(t, s)
		assert.True(t, bytes.Equal(raw, readAll(t, s)))
		assert.Equal(t, 1, src.Opens(), "a stream that ends after the last block is complete")
		assert.Eventually(t, func() bool { return bytes.Contains([]byte(buf.String()), []byte("without a trailing footer")) }, time.Second, time.Millisecond)
	})
	t.Run("different", func(t *testing.T) {
		bad := bytes.Clone(img)
		bad[len(bad)-1] ^= 1
		s, buf := newSpill(t, &source{data: bad}, NewBudget(1<<30), fastPolicy())
		waitDone(t, s)
		assert.True(t, bytes.Equal(raw, readAll(t, s)))
		assert.Eventually(t, func() bool { return bytes.Contains([]byte(buf.String()), []byte("trailing footer differs")) }, time.Second, time.Millisecond)
	})
}

// TestSpillStall: a server that goes silent is given up on after the
// attempt timeout, per attempt.
func TestSpillStall(t *testing.T) {
	img, _, l := richImage(t)
	src := &source{data: img, cuts: []int64{l.End + 5000, l.End + 5000}, stall: true}
	pol := fastPolicy()
	pol.Attempts, pol.AttemptTimeout = 2, 100*time.Millisecond
	s, _ := newSpill(t, src, NewBudget(1<<30), pol)
	start := time.Now()
	err := s.ReadAt(context.Background(), make([]byte, 512), int64(l.Order()[0])*l.BlockSize)
	require.ErrorIs(t, err, backend.ErrUnavailable)
	assert.Contains(t, err.Error(), "idle")
	assert.Less(t, time.Since(start), 5*time.Second)
	assert.Equal(t, 2, src.Opens(), "the first stream, then the second attempt")
}

func TestSpillReadHonoursContext(t *testing.T) {
	img, _, l := richImage(t)
	src := &source{data: img, gate: make(chan struct{}), gateAt: l.End + 1}
	s, _ := newSpill(t, src, NewBudget(1<<30), fastPolicy())
	off := int64(l.Order()[0]) * l.BlockSize
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	err := s.ReadAt(ctx, make([]byte, 512), off)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.ErrorIs(t, err, backend.ErrUnavailable)

	// Close wakes a waiting read and stops the held stream.
	done := make(chan error, 1)
	go func() { done <- s.ReadAt(context.Background(), make([]byte, 512), off) }()
	time.Sleep(20 * time.Millisecond)
	require.NoError(t, s.Close())
	select {
	case err := <-done:
		require.Error(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("a read waiting across Close did not return")
	}
}

func TestNewSpillHonoursContext(t *testing.T) {
	img, _, _ := richImage(t)
	src := &source{data: img, gate: make(chan struct{}), gateAt: 100}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := NewSpill(ctx, SpillOptions{Open: src.Open, Dir: t.TempDir(), Budget: NewBudget(1), Policy: fastPolicy()})
	require.ErrorIs(t, err, context.DeadlineExceeded)
}

func TestSpillFileUnlinked(t *testing.T) {
	img, raw, _ := richImage(t)
	dir := t.TempDir()
	budget := NewBudget(1 << 30)
	s, err := NewSpill(context.Background(), SpillOptions{Open: (&source{data: img}).Open, Dir: dir, Budget: budget, Policy: fastPolicy()})
	require.NoError(t, err)
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Empty(t, entries, "the file is unlinked at once")
	assert.True(t, bytes.Equal(raw, readAll(t, s)))
	assert.Positive(t, budget.Used())
	require.NoError(t, s.Close())
	assert.Zero(t, budget.Used())

	_, err = NewSpill(context.Background(), SpillOptions{Open: (&source{data: img}).Open, Dir: dir + "/missing", Budget: budget})
	require.Error(t, err)
}

func TestSpillInvalid(t *testing.T) {
	img, _, _ := richImage(t)
	_, err := NewSpill(context.Background(), SpillOptions{Dir: t.TempDir(), Budget: NewBudget(1)})
	require.ErrorIs(t, err, backend.ErrInvalid)
	_, err = NewSpill(context.Background(), SpillOptions{Open: (&source{data: img}).Open, Dir: t.TempDir()})
	require.ErrorIs(t, err, backend.ErrInvalid)

	s, _ := newSpill(t, &source{data: img}, NewBudget(1<<30), fastPolicy())
	for _, c := range []struct{ off, n int64 }{{-1, 1}, {s.Size(), 1}, {s.Size() - 10, 11}, {s.Size() + 1, 0}} {
		require.ErrorIs(t, s.ReadAt(context.Background(), make([]byte, c.n), c.off), backend.ErrInvalid)
	}
	require.NoError(t, s.ReadAt(context.Background(), nil, s.Size()))

	// A differencing VHD is refused: its absent sectors are the parent's.
	diff := bytes.Clone(img)
	binary.BigEndian.PutUint32(diff[60:], DiskTypeDifferencing)
	fixChecksums(diff)
	src := &source{data: diff}
	_, err = NewSpill(context.Background(), SpillOptions{Open: src.Open, Dir: t.TempDir(), Budget: NewBudget(1), Policy: fastPolicy()})
	require.ErrorIs(t, err, backend.ErrInvalid)
	assert.Equal(t, 1, src.Opens())
}

// TestSpillFromRaw goes through qemu-img convert of random data, whose
// zero 2 MiB blocks qemu leaves out.
func TestSpillFromRaw(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	raw := make([]byte, 24*mib+3*512)
	for _, e := range []struct{ off, n int64 }{{0, 4096}, {5 * mib, 3 * mib}, {11*mib + 17, 100}, {24 * mib, 1536}} {
		for i := e.off; i < e.off+e.n; i++ {
			raw[i] = byte(rng.IntN(255) + 1)
		}
	}
	path := qemuFromRaw(t, raw)
	img, want := readFile(t, path), qemuRaw(t, path)
	require.True(t, bytes.Equal(raw, want[:len(raw)]))
	s, _ := newSpill(t, &source{data: img, chunk: 777}, NewBudget(1<<30), fastPolicy())
	assert.Equal(t, qemuVirtualSize(t, path), s.Size())
	assert.True(t, bytes.Equal(want, readAll(t, s)))
	for _, e := range s.Allocated().Extents() {
		assert.Zero(t, e.Off%(2*mib))
	}
	assert.False(t, s.Allocated().Overlaps(12*mib, 12*mib), "zero blocks are holes")
}

// TestSpillHandBuilt covers what qemu never writes: small blocks stored in
// reverse order with gaps between them, a size that is not a sector
// multiple, and BAT entries past the end of the disk.
func TestSpillHandBuilt(t *testing.T) {
	const bs = 4096
	size := int64(3*bs + 100)
	// Blocks 3 (the last, 100 bytes of it in the disk), 0 and 4 (past the
	// disk), in that file order, with a gap of one sector after each;
	// blocks 1 and 2 absent.
	bat := []uint32{0, Absent, Absent, 0, 0}
	hdr := layoutBytes(uint64(size), bs, bat)
	pos := int64(len(hdr)+511) / 512 * 512
	img := make([]byte, pos)
	want := make([]byte, size)
	rng := rand.New(rand.NewPCG(5, 6))
	for _, b := range []int{3, 0, 4} {
		bat[b] = uint32(pos / 512)
		block := make([]byte, 512+bs)
		block[0] = 0xff
		for i := 512; i < len(block); i++ {
			block[i] = byte(rng.IntN(255) + 1)
		}
		if int64(b)*bs < size {
			copy(want[int64(b)*bs:], block[512:512+min(bs, size-int64(b)*bs)])
		}
		img = append(img, block...)
		img = append(img, make([]byte, 512)...) // the gap
		pos = int64(len(img))
	}
	copy(img, layoutBytes(uint64(size), bs, bat))
	img = append(img, img[:512]...)

	l, err := ReadLayout(bytes.NewReader(img))
	require.NoError(t, err)
	assert.Equal(t, []uint32{3, 0, 4}, l.Order())
	budget := NewBudget(1 << 20)
	// The stream ends where block 4 (past the disk) would start: never needed.
	src := &source{data: img, cuts: []int64{l.BlockOffset(4)}, chunk: 1000}
	s, _ := newSpill(t, src, budget, fastPolicy())
	assert.Equal(t, size, s.Size())
	assert.Equal(t, [][2]int64{{0, bs}, {3 * bs, 100}}, extents(s))
	assert.True(t, bytes.Equal(want, readAll(t, s)))
	waitDone(t, s)
	assert.Equal(t, int64(bs+100), budget.Used(), "bytes past the disk are not stored")
	assert.Equal(t, 1, src.Opens())
}

func extents(s *Spill) [][2]int64 {
	var out [][2]int64
	for _, e := range s.Allocated().Extents() {
		out = append(out, [2]int64{e.Off, e.Len})
	}
	return out
}
