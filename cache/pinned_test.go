package cache

import (
	"bytes"
	"context"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

func TestReadPinnedMatchesReference(t *testing.T) {
	tests := []struct {
		name      string
		size      int64
		blockSize int64
		capacity  int64
		nExt      int
	}{
		{"unaligned size, small blocks", 1<<20 + 12345, 4096, 64 << 10, 20},
		{"tiny cache forces eviction", 300001, 1024, 4096, 50},
		{"all hole", 1 << 18, 8192, 1 << 20, 0},
		{"many extents", 2<<20 + 7, 65536, 512 << 10, 200},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(tc.size), uint64(tc.nExt+5)))
			src := randomDisk(t, rng, tc.size, tc.nExt)
			c := New(Options{Capacity: tc.capacity, BlockSize: tc.blockSize, Parallel: 3})
			defer c.Close()
			r := c.Open("disk", tc.size, src.data, src)
			defer r.Close()
			for range 500 {
				off := rng.Int64N(tc.size)
				n := rng.Int64N(min(tc.size-off, 3*tc.blockSize) + 1)
				p, err := r.ReadPinned(context.Background(), off, n)
				require.NoError(t, err)
				got := bytes.Join(p.Bufs, nil)
				p.Release()
				require.Equal(t, src.ref[off:off+n], append([]byte{}, got...), "read [%d,+%d)", off, n)
				assert.LessOrEqual(t, c.Stats().ResidentBytes, tc.capacity+3*tc.blockSize)
			}
			assert.Equal(t, make([]byte, tc.blockSize), c.zeros, "the zeros handed out for holes were written to")
			assert.Zero(t, c.Stats().Pinned, "pins left after every release")
			if tc.nExt == 0 {
				assert.Zero(t, src.calls.Load(), "an all-hole disk needs no fetch")
			}
		})
	}
}

// A pinned block's bytes go to the kernel after ReadPinned returns; reads
// of other blocks meanwhile must neither evict it nor recycle its buffer.
func TestPinnedBlockOutlivesEviction(t *testing.T) {
	const bs, blocks = 4096, 64
	size := int64(bs * blocks)
	src := &memSource{t: t, ref: make([]byte, size), data: extent.Full(size)}
	for i := range src.ref {
		src.ref[i] = byte(i/bs + 1)
	}
	c := New(Options{BlockSize: bs, Capacity: 2 * bs, MaxReadahead: bs})
	defer c.Close()
	r := c.Open("d", size, src.data, src)
	defer r.Close()
	ctx := context.Background()

	pinned, err := r.ReadPinned(ctx, 100, bs) // spans blocks 0 and 1
	require.NoError(t, err)
	require.Len(t, pinned.Bufs, 2)
	assert.Equal(t, int64(2), c.Stats().Pinned)
	want := append([]byte{}, src.ref[100:100+bs]...)
	p := make([]byte, bs)
	for idx := int64(blocks - 1); idx >= 2; idx-- { // backwards: no readahead
		require.NoError(t, r.ReadAt(ctx, p, idx*bs))
		require.Equal(t, src.ref[idx*bs:(idx+1)*bs], p)
	}
	assert.Equal(t, want, bytes.Join(pinned.Bufs, nil), "pinned bytes changed under eviction")
	assert.Positive(t, c.Stats().Evictions)
	calls := src.calls.Load()
	require.NoError(t, r.ReadAt(ctx, p, 0))
	assert.Equal(t, calls, src.calls.Load(), "a pinned block was evicted")

	pinned.Release()
	pinned.Release() // twice is harmless
	assert.Zero(t, c.Stats().Pinned)
	for idx := int64(2); idx < 6; idx++ {
		require.NoError(t, r.ReadAt(ctx, p, idx*bs))
	}
	assert.LessOrEqual(t, c.Stats().ResidentBytes, int64(3*bs), "released blocks are evicted again")
	calls = src.calls.Load()
	require.NoError(t, r.ReadAt(ctx, p, 0))
	assert.Greater(t, src.calls.Load(), calls, "block 0 stayed cached after its release")
}

func TestReadPinnedBadRange(t *testing.T) {
	c := New(Options{})
	defer c.Close()
	r := c.Open("d", 100, extent.Full(100), &memSource{t: t, ref: make([]byte, 100), data: extent.Full(100)})
	for _, tc := range []struct{ off, n int64 }{{-1, 1}, {99, 2}, {101, 0}, {0, -1}} {
		_, err := r.ReadPinned(context.Background(), tc.off, tc.n)
		require.Error(t, err, "[%d, +%d)", tc.off, tc.n)
	}
	r.Close()
	_, err := r.ReadPinned(context.Background(), 0, 1)
	require.ErrorIs(t, err, ErrClosed)
}
