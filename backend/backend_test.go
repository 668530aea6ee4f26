package backend

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// blob is a Blob of content: ReadAt only, so neither a VecReader nor a
// RangesReader. It records the reads it was asked for.
type blob struct {
	content []byte
	reads   [][2]int64 // off, len
}

func (b *blob) Size() int64 { return int64(len(b.content)) }

func (b *blob) ReadAt(_ context.Context, p []byte, off int64) error {
	if off < 0 || off+int64(len(p)) > b.Size() {
		return ErrInvalid
	}
	b.reads = append(b.reads, [2]int64{off, int64(len(p))})
	copy(p, b.content[off:])
	return nil
}

// vecBlob is a blob that is also a VecReader, recording its vectored
// reads.
type vecBlob struct {
	blob
	vecs [][2]int64 // off, total length
}

func (b *vecBlob) ReadVecAt(ctx context.Context, bufs [][]byte, off int64) error {
	b.vecs = append(b.vecs, [2]int64{off, VecLen(bufs)})
	return ReadEach(ctx, b.ReadAt, bufs, off)
}

func content(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*31 + i/256)
	}
	return b
}

func pieces(spec ...[2]int64) []Piece {
	ps := make([]Piece, len(spec))
	for i, s := range spec {
		ps[i] = Piece{Off: s[0], Buf: make([]byte, s[1])}
	}
	return ps
}

func TestReadRunsGroupsTouchingPieces(t *testing.T) {
	for _, tc := range []struct {
		name   string
		pieces [][2]int64
		runs   [][2]int64 // the vectored reads expected: off, total length
	}{
		{"one piece", [][2]int64{{10, 5}}, [][2]int64{{10, 5}}},
		{"apart", [][2]int64{{0, 4}, {10, 4}, {100, 1}}, [][2]int64{{0, 4}, {10, 4}, {100, 1}}},
		{"touching", [][2]int64{{0, 4}, {4, 6}, {10, 1}}, [][2]int64{{0, 11}}},
		{"two runs", [][2]int64{{0, 4}, {4, 4}, {9, 1}, {10, 2}}, [][2]int64{{0, 8}, {9, 3}}},
		{"one byte apart", [][2]int64{{0, 1}, {2, 1}}, [][2]int64{{0, 1}, {2, 1}}},
		{"none", nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := &vecBlob{blob: blob{content: content(200)}}
			ps := pieces(tc.pieces...)
			var runs [][2]int64
			err := ReadRuns(context.Background(), func(ctx context.Context, bufs [][]byte, off int64) error {
				runs = append(runs, [2]int64{off, VecLen(bufs)})
				return ReadVec(ctx, b, bufs, off)
			}, ps)
			require.NoError(t, err)
			assert.Equal(t, tc.runs, runs)
			for _, p := range ps {
				assert.Equal(t, b.content[p.Off:p.Off+int64(len(p.Buf))], p.Buf)
			}
		})
	}
}

func TestReadRunsRefusesDisorder(t *testing.T) {
	for _, tc := range []struct {
		name   string
		pieces [][2]int64
	}{
		{"overlapping", [][2]int64{{0, 10}, {5, 10}}},
		{"overlapping a run", [][2]int64{{0, 4}, {4, 4}, {7, 2}}},
		{"out of order", [][2]int64{{20, 4}, {0, 4}}},
		{"same offset", [][2]int64{{8, 4}, {8, 4}}},
		{"negative", [][2]int64{{-4, 4}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := &blob{content: content(100)}
			err := ReadRuns(context.Background(), func(ctx context.Context, bufs [][]byte, off int64) error {
				return ReadEach(ctx, b.ReadAt, bufs, off)
			}, pieces(tc.pieces...))
			require.ErrorIs(t, err, ErrInvalid)
		})
	}
}

func TestReadRunsStopsAtAnError(t *testing.T) {
	boom := errors.New("boom")
	calls := 0
	err := ReadRuns(context.Background(), func(ctx context.Context, bufs [][]byte, off int64) error {
		calls++
		return boom
	}, pieces([2]int64{0, 1}, [2]int64{5, 1}))
	require.ErrorIs(t, err, boom)
	assert.Equal(t, 1, calls)
}

// TestReadRangesFallback: a Blob that is no RangesReader is read a run of
// touching pieces at a time: with one ReadVecAt each where it is a
// VecReader, else a ReadAt per piece.
func TestReadRangesFallback(t *testing.T) {
	spec := [][2]int64{{0, 4}, {4, 4}, {50, 10}, {90, 3}, {93, 7}}
	t.Run("VecReader", func(t *testing.T) {
		b := &vecBlob{blob: blob{content: content(100)}}
		assert.False(t, MultipleRanges(b))
		ps := pieces(spec...)
		require.NoError(t, ReadRanges(context.Background(), b, ps))
		assert.Equal(t, [][2]int64{{0, 8}, {50, 10}, {90, 10}}, b.vecs)
		for _, p := range ps {
			assert.Equal(t, b.content[p.Off:p.Off+int64(len(p.Buf))], p.Buf)
		}
	})
	t.Run("ReadAt only", func(t *testing.T) {
		b := &blob{content: content(100)}
		assert.False(t, MultipleRanges(b))
		ps := pieces(spec...)
		require.NoError(t, ReadRanges(context.Background(), b, ps))
		assert.Equal(t, [][2]int64{{0, 4}, {4, 4}, {50, 10}, {90, 3}, {93, 7}}, b.reads)
		for _, p := range ps {
			assert.Equal(t, b.content[p.Off:p.Off+int64(len(p.Buf))], p.Buf)
		}
	})
	t.Run("overlapping", func(t *testing.T) {
		b := &blob{content: content(100)}
		require.ErrorIs(t, ReadRanges(context.Background(), b, pieces([2]int64{0, 10}, [2]int64{9, 1})), ErrInvalid)
		assert.Empty(t, b.reads, "nothing is read before the pieces are checked")
	})
}

// ranger is a RangesReader: ReadRanges goes to it whole.
type ranger struct {
	blob
	calls int
}

func (r *ranger) MultipleRanges() bool { return true }
func (r *ranger) ReadRanges(ctx context.Context, ps []Piece) error {
	r.calls++
	for _, p := range ps {
		if err := r.ReadAt(ctx, p.Buf, p.Off); err != nil {
			return err
		}
	}
	return nil
}

func TestReadRangesRangesReader(t *testing.T) {
	r := &ranger{blob: blob{content: content(100)}}
	assert.True(t, MultipleRanges(r))
	ps := pieces([2]int64{0, 4}, [2]int64{50, 10})
	require.NoError(t, ReadRanges(context.Background(), r, ps))
	assert.Equal(t, 1, r.calls)
	assert.Equal(t, r.content[50:60], ps[1].Buf)
}
