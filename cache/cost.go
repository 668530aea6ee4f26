package cache

import (
	"math/bits"
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
// The model is a least-squares line (duration against bytes) through one
// point per size class (fetches of the same power of two of bytes): the
// fastest of that class's last costWindow fetches. Delays only ever add to a
// fetch's time (a stall at the server, a scheduler that ran something else,
// a garbage collection), so the fastest recent fetch is the best reading of
// what the link costs, and one slow fetch of a large size, which a fit
// through every fetch would read as a high cost per byte and answer with
// many small requests, changes nothing. A server whose cost really changes
// is followed within costWindow fetches of each size.
type costModel struct {
	mu             sync.Mutex
	classes        [65]sizeClass // by bits.Len64 of the fetch's bytes
	fetches        uint64        // observed so far: the clock that ages classes
	fixed, perByte float64       // seconds, seconds per byte; valid when known
	known          bool
}

// sizeClass holds a size class's last costWindow fetches, the oldest
// overwritten first.
type sizeClass struct {
	bytes   [costWindow]float64
	seconds [costWindow]float64
	at      [costWindow]uint64 // costModel.fetches when observed
	n, next int
}

const (
	// costWindow is how many recent fetches of a size class are kept.
	costWindow = 8
	// costMaxAge is how many fetches later a fetch no longer counts. A
	// class that a plan stopped using (a stalled fetch made large ones
	// look slow, so the plan went back to small ones) drops out of the
	// fit, the plan falls back to the defaults and tries that size again.
	costMaxAge = 64
	// minPerByte is the least transfer cost believed, 10 Gbit/s: fetches
	// of several sizes whose fit says larger ones are no slower mean
	// transfer is cheap, not free.
	minPerByte = 8e-10 // seconds
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
	if n <= 0 {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.fetches++
	c := &m.classes[bits.Len64(uint64(n))]
	c.bytes[c.next], c.seconds[c.next], c.at[c.next] = float64(n), d.Seconds(), m.fetches
	c.next = (c.next + 1) % costWindow
	c.n = min(c.n+1, costWindow)

	var w, sx, sy, sxx, sxy float64
	minX, maxX := 0.0, 0.0
	for i := range m.classes {
		c := &m.classes[i]
		if c.n == 0 {
			continue
		}
		best := -1
		for j := range c.n {
			if m.fetches-c.at[j] < costMaxAge && (best < 0 || c.seconds[j] < c.seconds[best]) {
				best = j
			}
		}
		if best < 0 {
			continue
		}
		x, y := c.bytes[best], c.seconds[best]
		if w == 0 {
			minX, maxX = x, x
		}
		minX, maxX = min(minX, x), max(maxX, x)
		w++
		sx += x
		sy += y
		sxx += x * x
		sxy += x * y
	}
	meanX, meanY := sx/w, sy/w
	varX := sxx/w - meanX*meanX
	// Fetches all of about one size say nothing of the cost per byte:
	// assume a slow link, which makes the holes read through short, until
	// fetches of several sizes tell.
	slope := assumedPerByte
	if maxX >= 1.5*minX && varX > 0 {
		slope = max((sxy/w-meanX*meanY)/varX, minPerByte)
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
