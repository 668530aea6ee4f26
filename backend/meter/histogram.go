package meter

import (
	"math"
	"sync/atomic"
	"time"
)

// DurationBuckets are the upper bounds, in seconds, of request durations:
// from a loopback round trip to a request near its deadline.
var DurationBuckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}

// Histogram counts durations into DurationBuckets, lock-free.
type Histogram struct {
	counts [16]atomic.Int64 // one per bucket, then +Inf
	count  atomic.Int64
	sumNs  atomic.Int64
}

// Observe adds one duration.
func (h *Histogram) Observe(d time.Duration) {
	s := d.Seconds()
	i := len(DurationBuckets)
	for j, ub := range DurationBuckets {
		if s <= ub {
			i = j
			break
		}
	}
	h.counts[i].Add(1)
	h.count.Add(1)
	h.sumNs.Add(int64(d))
}

// HistogramReading is a histogram at one moment, in Prometheus' terms:
// Cumulative[i] counts the observations <= DurationBuckets[i].
type HistogramReading struct {
	Count      uint64
	SumSeconds float64
	Cumulative []uint64
}

// Read returns the histogram now.
func (h *Histogram) Read() HistogramReading {
	r := HistogramReading{Cumulative: make([]uint64, len(DurationBuckets))}
	var acc uint64
	for i := range DurationBuckets {
		acc += uint64(h.counts[i].Load())
		r.Cumulative[i] = acc
	}
	// Count is read after the buckets so it is never below their sum.
	r.Count = max(uint64(h.count.Load()), acc+uint64(h.counts[len(DurationBuckets)].Load()))
	r.SumSeconds = float64(h.sumNs.Load()) / float64(time.Second)
	return r
}

// Quantile estimates the q-th quantile (0..1) by linear interpolation in
// its bucket, as Prometheus' histogram_quantile does; NaN when empty.
func (r HistogramReading) Quantile(q float64) float64 {
	if r.Count == 0 {
		return math.NaN()
	}
	rank := q * float64(r.Count)
	lower, prev := 0.0, uint64(0)
	for i, c := range r.Cumulative {
		if float64(c) >= rank {
			inBucket := float64(c - prev)
			if inBucket == 0 {
				return DurationBuckets[i]
			}
			return lower + (DurationBuckets[i]-lower)*(rank-float64(prev))/inBucket
		}
		lower, prev = DurationBuckets[i], c
	}
	return DurationBuckets[len(DurationBuckets)-1]
}
