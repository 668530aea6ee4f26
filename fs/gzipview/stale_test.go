package gzipview

import (
	"bytes"
	"container/list"
	"context"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// swapDisk is a raw disk whose bytes can be replaced under it, as the data
// behind an unchanged snapshot id can on a misbehaving platform.
type swapDisk struct{ b atomic.Pointer[[]byte] }

func (d *swapDisk) set(b []byte) { d.b.Store(&b) }

func (d *swapDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	copy(p, (*d.b.Load())[off:])
	return ctx.Err()
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestStaleIndexHealsOnce: data that changed under an unchanged identity
// makes a member compress to another length than the index says. The first
// time, the read fails, the index is dropped (file too), logged, and rebuilt
// on next use; readers pinned to the old layout fail from then on; a second
// mismatch after the rebuild only fails the read.
func TestStaleIndexHealsOnce(t *testing.T) {
	const chunk, chunks = 4096, 12
	const size = chunks*chunk - 100 // a partial last member
	cases := []struct {
		name      string
		changed   int64 // the chunk whose data changes
		persisted bool  // the stale index comes from the file of a previous view
	}{
		{"first member, index file", 0, true},
		{"middle member, index file", 5, true},
		{"last partial member, index file", chunks - 1, true},
		{"member changed during the view's life", 7, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(tc.changed), 9))
			orig := makeDisk(t, rng, size, exts(0, size))
			// High-entropy bytes compress far worse than the low-entropy
			// original, so the member's length must change.
			changed := bytes.Clone(orig.b)
			lo, hi := tc.changed*chunk, min((tc.changed+1)*chunk, size)
			for i := lo; i < hi; i++ {
				changed[i] = byte(rng.Uint32())
			}
			again := bytes.Clone(changed)
			for i := lo; i < hi; i++ {
				again[i] = 0
			}
			path := filepath.Join(t.TempDir(), "gzip.idx")
			logs := &lockedBuffer{}
			var changes atomic.Int32
			d := &swapDisk{}
			d.set(orig.b)
			opts := Options{ChunkSize: chunk, Workers: 1, IndexPath: path, Name: "vm/snap/disk.img.gz",
				Logger:         slog.New(slog.NewTextHandler(logs, nil)),
				OnLayoutChange: func() { changes.Add(1) }}
			ctx := context.Background()
			if tc.persisted {
				prev := New(d, size, orig.data, opts)
				_ = readAll(t, prev)
				prev.Close()
			}
			v := New(d, size, orig.data, opts)
			defer v.Close()
			oldSize, err := v.Size(ctx)
			require.NoError(t, err)
			require.FileExists(t, path)
			assert.Zero(t, changes.Load(), "building or loading the first index is no change")
			d.set(changed)
			if !tc.persisted {
				v.cacheMu.Lock() // forget the members compressed from the old data
				v.cache, v.lru = map[int64]*list.Element{}, list.New()
				v.cacheMu.Unlock()
			}

			// A reader mid-copy: the members before the changed one still
			// match (same bytes at the same offsets in both layouts) ...
			gen := v.Generation()
			offs, err := v.index(ctx)
			require.NoError(t, err)
			prefix := make([]byte, offs[tc.changed])
			require.NoError(t, v.ReadAtGeneration(ctx, gen, prefix, 0))
			// ... the read that covers the changed member fails, and
			// drops the index.
			rest := make([]byte, oldSize-offs[tc.changed])
			err = v.ReadAtGeneration(ctx, gen, rest, offs[tc.changed])
			require.ErrorIs(t, err, ErrStaleIndex)
			assert.NoFileExists(t, path, "the stale index file is dropped")
			assert.Equal(t, gen+1, v.Generation())
			assert.Equal(t, int32(1), changes.Load())
			assert.Contains(t, logs.String(), "stale index")
			assert.Contains(t, logs.String(), "file=vm/snap/disk.img.gz")
			assert.Contains(t, logs.String(), "member="+itoa(tc.changed))
			assert.Contains(t, logs.String(), "index_length="+itoa(offs[tc.changed+1]-offs[tc.changed]))
			// Every later read of the old layout fails, even of bytes that
			// were fine: its opener sized the file by the old index.
			assert.ErrorIs(t, v.ReadAtGeneration(ctx, gen, prefix, 0), ErrLayoutChanged)

			// A fresh open sees the rebuilt layout: the new data.
			newSize, err := v.Size(ctx)
			require.NoError(t, err)
			assert.NotEqual(t, oldSize, newSize)
			assert.Equal(t, int32(2), changes.Load(), "the rebuilt layout is announced too")
			assert.FileExists(t, path, "the rebuilt index is saved")
			gz := make([]byte, newSize)
			require.NoError(t, v.ReadAtGeneration(ctx, v.Generation(), gz, 0))
			assert.Equal(t, changed, gunzip(t, gz))
			assert.Equal(t, prefix, gz[:len(prefix)], "the layouts agree before the changed member")
			fresh := New(d, size, orig.data, Options{ChunkSize: chunk, Workers: 1, IndexPath: path})
			defer fresh.Close()
			assert.Equal(t, gz, readAll(t, fresh), "the saved index is the rebuilt one")

			// A second mismatch after the rebuild is only an error.
			d.set(again)
			v.cacheMu.Lock()
			v.cache, v.lru = map[int64]*list.Element{}, list.New()
			v.cacheMu.Unlock()
			saved, err := os.ReadFile(path)
			require.NoError(t, err)
			err = v.ReadAt(ctx, gz, 0)
			require.ErrorIs(t, err, ErrStaleIndex)
			assert.NotErrorIs(t, err, ErrLayoutChanged)
			assert.Equal(t, gen+1, v.Generation(), "no second rebuild")
			assert.Equal(t, int32(2), changes.Load())
			assert.Contains(t, logs.String(), "keeps changing")
			kept, err := os.ReadFile(path)
			require.NoError(t, err)
			assert.Equal(t, saved, kept)
			assert.ErrorIs(t, v.ReadAt(ctx, gz, 0), ErrStaleIndex, "and stays one")
		})
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// TestLayoutChangeDuringRead: a read that began in a layout dropped before
// it finished fails rather than return bytes placed by two layouts.
func TestLayoutChangeDuringRead(t *testing.T) {
	const chunk, size = 4096, 8 * 4096
	rng := rand.New(rand.NewPCG(1, 2))
	orig := makeDisk(t, rng, size, exts(0, size))
	gate := &gatedDisk{d: orig, at: 6 * chunk, entered: make(chan struct{}), release: make(chan struct{})}
	v := New(gate, size, orig.data, Options{ChunkSize: chunk, Workers: 1})
	defer v.Close()
	ctx := context.Background()
	n, err := v.Size(ctx)
	require.NoError(t, err)
	v.cacheMu.Lock()
	v.cache, v.lru = map[int64]*list.Element{}, list.New()
	v.cacheMu.Unlock()
	gate.armed.Store(true)
	done := make(chan error, 1)
	go func() { done <- v.ReadAt(ctx, make([]byte, n), 0) }()
	<-gate.entered
	offs, gen, _ := v.current()
	require.ErrorIs(t, v.stale(gen, 2, 1, offs[3]-offs[2]), ErrStaleIndex) // another reader found member 2 changed
	close(gate.release)
	assert.ErrorIs(t, <-done, ErrLayoutChanged)
}

// gatedDisk blocks the first read at offset at until released, once armed.
type gatedDisk struct {
	d                *memDisk
	at               int64
	armed            atomic.Bool
	entered, release chan struct{}
}

func (g *gatedDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off <= g.at && g.at < off+int64(len(p)) && g.armed.CompareAndSwap(true, false) {
		close(g.entered)
		<-g.release
	}
	return g.d.ReadAt(ctx, p, off)
}
