package cache

import (
	"sync"
	"time"
)

// costModel learns what one backend request of a disk costs: a fixed part
// (a round trip; on the Coriolis exporter also a re-read of the snapshot's
// whole chunk list, half a second at a million extents) and a part per
// byte. Reads are planned from it: a hole is read through when carrying its
// bytes costs less than another request would, and a readahead fetch is
// made large enough that the fixed part is a small share of it.
//
// The model is a least-squares line through the recent fetches (duration
// against bytes), each older fetch weighing costDecay times less than the
// next, so it follows a server whose cost changes (a growing chunk list, a
// busier network). Fetches run concurrently, so a duration includes queueing
// at the server: the fixed part reads high when the server is busy, which
// is also when fewer, larger requests help most.
type costModel struct {
	mu                  sync.Mutex
	w, sx, sy, sxx, sxy float64 // decayed sums over fetches: weight, bytes, seconds
	minBytes, maxBytes  float64
	fixed, perByte      float64 // seconds, seconds per byte; valid when known
	known               bool
}

const (
	costDecay = 0.95
	// defaultGap is the hole read through before anything is measured:
	// about a LAN round trip's worth of transfer.
	defaultGap = 64 << 10
	// defaultSpan is a readahead fetch's size before anything is measured.
	defaultSpan = 4 << 20
	// fixedShare is the largest share of a readahead fetch's time that its
	// fixed cost may take: fetches are made ≥ (1/fixedShare - 1) × gap.
	fixedShare = 0.1
	// minPlannedFixed is the smallest fixed cost planned around. Below it
	// (a loopback or LAN round trip) the defaults already cost little, and
	// a fit of microseconds of scheduling noise would plan at random.
	minPlannedFixed = 1e-3 // seconds
	// assumedPerByte is the transfer cost assumed until measured: 1 Gbit/s.
	assumedPerByte = 8e-9 // seconds
)

func newCostModel() *costModel { return &costModel{} }

// observe adds one fetch of n bytes that took d.
func (m *costModel) observe(n int64, d time.Duration) {
	x, y := float64(n), d.Seconds()
	m.mu.Lock()
	defer m.mu.Unlock()
	m.w = m.w*costDecay + 1
	m.sx = m.sx*costDecay + x
	m.sy = m.sy*costDecay + y
	m.sxx = m.sxx*costDecay + x*x
	m.sxy = m.sxy*costDecay + x*y
	if m.w == 1 {
		m.minBytes, m.maxBytes = x, x
	}
	m.minBytes, m.maxBytes = min(m.minBytes, x), max(m.maxBytes, x)
	meanX, meanY := m.sx/m.w, m.sy/m.w
	varX := m.sxx/m.w - meanX*meanX
	slope := 0.0
	if m.maxBytes >= 1.5*m.minBytes && varX > 0 {
		slope = (m.sxy/m.w - meanX*meanY) / varX
	}
	if slope <= 0 {
		// Fetches all of one size (or noise: larger ones looked cheaper)
		// say nothing of the cost per byte: assume a slow link, which
		// makes the holes read through short, until fetches of several
		// sizes tell.
		slope = assumedPerByte
	}
	m.perByte, m.fixed = slope, max(meanY-slope*meanX, 0)
	m.known = m.fixed >= minPlannedFixed
}

// gap is the longest hole worth reading through: the bytes one request's
// fixed cost would carry.
func (m *costModel) gap() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.gapLocked()
}

func (m *costModel) gapLocked() int64 {
	if !m.known {
		return defaultGap
	}
	return int64(min(m.fixed/m.perByte, 1<<40))
}

// span is the size a readahead fetch should have, between lo and hi: large
// enough that its fixed cost is at most fixedShare of its time.
func (m *costModel) span(lo, hi int64) int64 {
	m.mu.Lock()
	want := int64(defaultSpan)
	if m.known {
		want = int64(min(float64(m.gapLocked())*(1/fixedShare-1), 1<<40))
	}
	m.mu.Unlock()
	return min(max(want, lo), hi)
}
