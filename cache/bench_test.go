package cache

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// patternSource serves a repeating pattern with a per-request latency, so a
// large disk costs no memory.
type patternSource struct {
	pattern []byte
	latency time.Duration
}

func (s *patternSource) ReadAt(ctx context.Context, p []byte, off int64) error {
	if s.latency > 0 {
		t := time.NewTimer(s.latency)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	for len(p) > 0 {
		n := copy(p, s.pattern[off%int64(len(s.pattern)):])
		p, off = p[n:], off+int64(n)
	}
	return nil
}

func newPattern() *patternSource {
	pat := make([]byte, 1<<20+3) // odd length: blocks differ
	for i := range pat {
		pat[i] = byte(i*31 + 7)
	}
	return &patternSource{pattern: pat}
}

func BenchmarkSequentialRead(b *testing.B) {
	const size = 256 << 20
	src := newPattern()
	src.latency = time.Millisecond
	c := New(Options{Capacity: 64 << 20})
	defer c.Close()
	r := c.Open("seq", size, extent.Full(size), src)
	defer r.Close()
	p := make([]byte, 128<<10)
	ctx := context.Background()
	b.SetBytes(int64(len(p)))
	b.ResetTimer()
	var off int64
	for b.Loop() {
		if err := r.ReadAt(ctx, p, off); err != nil {
			b.Fatal(err)
		}
		off = (off + int64(len(p))) % size
	}
}

func BenchmarkRandomRead(b *testing.B) {
	const size = 32 << 20
	src := newPattern()
	c := New(Options{Capacity: 64 << 20})
	defer c.Close()
	r := c.Open("rand", size, extent.Full(size), src)
	defer r.Close()
	p := make([]byte, 128<<10)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(1, 1))
	b.SetBytes(int64(len(p)))
	b.ResetTimer()
	for b.Loop() {
		off := rng.Int64N(size-int64(len(p))) &^ 4095
		if err := r.ReadAt(ctx, p, off); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkHoleRead(b *testing.B) {
	const size = 1 << 30
	c := New(Options{})
	defer c.Close()
	r := c.Open("hole", size, extent.Map{}, newPattern())
	defer r.Close()
	p := make([]byte, 128<<10)
	ctx := context.Background()
	b.SetBytes(int64(len(p)))
	var off int64
	for b.Loop() {
		if err := r.ReadAt(ctx, p, off); err != nil {
			b.Fatal(err)
		}
		off = (off + int64(len(p))) % size
	}
}
