package cache

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/extent"
)

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
