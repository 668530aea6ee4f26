package cache

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// costlySource is a backend whose every request costs a fixed time however
// little it carries (the Coriolis exporter re-reading a long chunk list),
// and which fills several buffers with one request.
type costlySource struct {
	t        testing.TB
	ref      []byte
	data     extent.Map
	fixed    time.Duration
	multi    bool // fills pieces far apart with one request
	requests atomic.Int64
	bytes    atomic.Int64
}

func (s *costlySource) MultipleRanges() bool { return s.multi }

func (s *costlySource) ReadRanges(ctx context.Context, pieces []backend.Piece) error {
	if !s.multi {
		return backend.ReadRuns(ctx, s.ReadVecAt, pieces)
	}
	var n int64
	for i, p := range pieces {
		// Only the extents travel: every piece is data.
		if !s.data.Contains(p.Off, int64(len(p.Buf))) {
			s.t.Errorf("piece [%d, +%d) reaches into a hole", p.Off, len(p.Buf))
			return errors.New("hole fetched")
		}
		if i > 0 && p.Off < pieces[i-1].Off+int64(len(pieces[i-1].Buf)) {
			s.t.Errorf("piece at %d overlaps the one before", p.Off)
			return errors.New("overlap")
		}
		n += int64(len(p.Buf))
	}
	if err := s.request(ctx, n); err != nil {
		return err
	}
	for _, p := range pieces {
		copy(p.Buf, s.ref[p.Off:])
	}
	return nil
}

// request is one request of n bytes: its fixed cost, counted.
func (s *costlySource) request(ctx context.Context, n int64) error {
	select {
	case <-time.After(s.fixed):
	case <-ctx.Done():
		return ctx.Err()
	}
	s.requests.Add(1)
	s.bytes.Add(n)
	return nil
}

func (s *costlySource) ReadAt(ctx context.Context, p []byte, off int64) error {
	return s.ReadVecAt(ctx, [][]byte{p}, off)
}

func (s *costlySource) ReadVecAt(ctx context.Context, bufs [][]byte, off int64) error {
	n := backend.VecLen(bufs)
	// Reads may cross holes of any length the plan chose, but never start
	// or end in one.
	if !s.data.Contains(off, 1) || !s.data.Contains(off+n-1, 1) {
		s.t.Errorf("request [%d, +%d) starts or ends in a hole", off, n)
		return errors.New("hole fetched")
	}
	if err := s.request(ctx, n); err != nil {
		return err
	}
	for _, p := range bufs {
		copy(p, s.ref[off:])
		off += int64(len(p))
	}
	return nil
}

// TestPlannedByCost: a sequential read of a disk of 4 KiB extents every
// 256 KiB (holes longer than the default gap) from a backend whose requests
// cost 5 ms each. The cache learns that cost from its first fetches and
// from then on reads through the holes and several blocks a request; from a
// backend too fast to plan around it fetches each block's extents apart, as
// before. From a backend that fills ranges far apart with one request
// (multipart/byteranges) it reads no hole at all and fetches as many blocks
// a request as memory allows, whatever requests cost.
func TestPlannedByCost(t *testing.T) {
	const bs, size = 1 << 20, 64 << 20
	var raw []extent.Extent
	for off := int64(0); off < size; off += 256 << 10 {
		raw = append(raw, extent.Extent{Off: off, Len: 4 << 10})
	}
	m, err := extent.Normalize(raw, size)
	require.NoError(t, err)
	ref := make([]byte, size)
	for _, e := range m.Extents() {
		for i := e.Off; i < e.End(); i++ {
			ref[i] = byte(i%251) | 1
		}
	}
	tests := []struct {
		name        string
		fixed       time.Duration
		multi       bool
		maxRequests int64
	}{
		// 64 blocks of 4 extents: 256 requests extent by extent. Learnt,
		// a fetch carries up to Capacity/(2 × Parallel) = 4 MiB: 16, plus
		// the first fetches made before the cost was known (more on a
		// busy machine, whose scheduling delays the first fits).
		{"5 ms a request", 5 * time.Millisecond, false, 64},
		{"too fast to plan around", 0, false, 256},
		// Several ranges a request: no hole is read, and a fetch is as
		// large as memory allows from the first readahead on.
		{"5 ms a request, several ranges each", 5 * time.Millisecond, true, 32},
		{"several ranges a request, fast", 0, true, 32},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := &costlySource{t: t, ref: ref, data: m, fixed: tt.fixed, multi: tt.multi}
			c := New(Options{BlockSize: bs, Capacity: 64 << 20})
			defer c.Close()
			r := c.Open("d", size, m, src)
			defer r.Close()
			got := make([]byte, size)
			for off := int64(0); off < size; off += 128 << 10 {
				require.NoError(t, r.ReadAt(context.Background(), got[off:off+128<<10], off))
			}
			require.Equal(t, ref, got)
			t.Logf("%d requests, %d bytes (%d of data)", src.requests.Load(), src.bytes.Load(), m.Bytes())
			assert.LessOrEqual(t, src.requests.Load(), tt.maxRequests, "requests")
			assert.LessOrEqual(t, src.bytes.Load(), int64(size), "bytes")
			if tt.fixed == 0 || tt.multi {
				assert.Equal(t, m.Bytes(), src.bytes.Load(), "holes are not read")
			}
		})
	}
}

// TestCostModel: the fixed part and the part per byte come back from
// fetches of several sizes, and stay when a few fetches stall (the busy CI
// machine on which a fit through every fetch read one slow 4 MiB fetch as a
// slow link and went back to a request per extent); a fixed part too small
// to plan around leaves the defaults.
func TestCostModel(t *testing.T) {
	tests := []struct {
		name            string
		fixed           time.Duration
		perMiB          time.Duration
		stalls          int // of the last fetches of the largest size, by a second each
		wantGap, spanHi int64
	}{
		{"half a second a request, 1 ms a MiB", 500 * time.Millisecond, time.Millisecond, 0, 500 << 20, 32 << 20},
		{"10 ms a request, 4 ms a MiB", 10 * time.Millisecond, 4 * time.Millisecond, 0, 2560 << 10, 32 << 20},
		{"10 ms a request, 4 ms a MiB, fetches stalled", 10 * time.Millisecond, 4 * time.Millisecond, costWindow - 1, 2560 << 10, 32 << 20},
		{"100 µs: defaults", 100 * time.Microsecond, time.Millisecond, 0, defaultGap, defaultSpan},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newCostModel()
			const fetches = 40
			for i := range fetches {
				n := int64(1) << (20 + i%4) // 1, 2, 4, 8 MiB: a size class each
				d := tt.fixed + time.Duration(n>>20)*tt.perMiB
				if i%4 == 3 && i >= fetches-4*tt.stalls {
					d += time.Second
				}
				m.observe(n, d)
			}
			assert.InEpsilon(t, tt.wantGap, m.gap(), 0.01, "gap")
			want := min(max(int64(float64(tt.wantGap)*(1/fixedShare-1)), 1<<20), tt.spanHi)
			if tt.wantGap == defaultGap {
				want = defaultSpan
			}
			assert.InEpsilon(t, want, m.span(1<<20, tt.spanHi), 0.01, "span")
		})
	}
}

// TestCostModelRecovers: a plan that went back to small fetches because a
// large one stalled tries large ones again once the stall has aged out, and
// fetches of several sizes that all cost the same read as a fast link, not
// as no cost per byte at all nor as no fixed cost.
func TestCostModelRecovers(t *testing.T) {
	m := newCostModel()
	for range 8 {
		m.observe(4<<10, 5*time.Millisecond)
	}
	m.observe(4<<20, 500*time.Millisecond)
	assert.Less(t, m.gap(), int64(64<<10), "one stalled 4 MiB fetch and nothing else to go by")
	for range costMaxAge {
		m.observe(4<<10, 5*time.Millisecond)
	}
	assert.InEpsilon(t, 5e-3/assumedPerByte, m.gap(), 0.01, "the stall aged out: the defaults for a 5 ms request")

	m = newCostModel()
	for i := range 16 {
		m.observe(int64(1)<<(20+i%4), 10*time.Millisecond)
	}
	assert.Greater(t, m.gap(), int64(4<<20), "sizes that cost the same: holes are cheap to read through")
	assert.Equal(t, m.span(1<<20, 32<<20), int64(32<<20))
}
