package fs

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCachedListSharesOneFetch(t *testing.T) {
	var c cachedList[int]
	var calls atomic.Int32
	release := make(chan struct{})
	fetch := func(context.Context) (int, error) {
		calls.Add(1)
		<-release
		return 42, nil
	}
	var wg sync.WaitGroup
	results := make([]int, 8)
	waiting := make(chan struct{}, len(results))
	ctx := waitingCtx{context.Background(), waiting}
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v, err := c.get(ctx, time.Hour, fetch)
			assert.NoError(t, err)
			results[i] = v
		}()
	}
	// The fetch cannot return before release: every caller is waiting for
	// a fetch when it does.
	awaitN(t, waiting, len(results), "callers waiting for the listing")
	close(release)
	wg.Wait()
	assert.Equal(t, int32(1), calls.Load())
	for _, v := range results {
		assert.Equal(t, 42, v)
	}
	// Within the TTL: no new fetch; after invalidate: one more.
	_, err := c.get(context.Background(), time.Hour, fetch)
	require.NoError(t, err)
	assert.Equal(t, int32(1), calls.Load())
	c.invalidate()
	_, err = c.get(context.Background(), time.Hour, fetch)
	require.NoError(t, err)
	assert.Equal(t, int32(2), calls.Load())
}

func TestCachedListDoesNotKeepErrors(t *testing.T) {
	var c cachedList[int]
	boom := errors.New("boom")
	_, err := c.get(context.Background(), time.Hour, func(context.Context) (int, error) { return 0, boom })
	require.ErrorIs(t, err, boom)
	v, err := c.get(context.Background(), time.Hour, func(context.Context) (int, error) { return 7, nil })
	require.NoError(t, err)
	assert.Equal(t, 7, v)
}

func TestNameProblem(t *testing.T) {
	long := make([]byte, 256)
	for i := range long {
		long[i] = 'a'
	}
	tests := []struct {
		name string
		bad  bool
	}{
		{"vm-1", false}, {"", true}, {".", true}, {"..", true}, {"a/b", true},
		{"a\x00b", true}, {string(long), true}, {string(long[:255]), false}, {"...", false},
	}
	for _, tc := range tests {
		assert.Equal(t, tc.bad, nameProblem(tc.name) != "", "%q", tc.name)
	}
}

// TestCachedListKnownAnswersWhileRefreshing: an expired listing that has
// what a lookup asks for answers it at once and is refreshed behind it; one
// that does not waits for the fresh listing.
func TestCachedListKnownAnswersWhileRefreshing(t *testing.T) {
	var c cachedList[[]int]
	var calls atomic.Int32
	gate := make(chan struct{})
	refreshing := make(chan struct{})
	fetch := func(context.Context) ([]int, error) {
		if calls.Add(1) > 1 {
			close(refreshing) // a second refresh would panic here
			<-gate            // the refresh is slow
		}
		return []int{1, 2, int(calls.Load())}, nil
	}
	has := func(n int) func([]int) bool {
		return func(l []int) bool {
			for _, v := range l {
				if v == n {
					return true
				}
			}
			return false
		}
	}
	const ttl = time.Minute
	_, err := c.getKnown(context.Background(), ttl, fetch, has(1))
	require.NoError(t, err)
	// Expire the listing by making it older than the TTL, not by waiting.
	c.mu.Lock()
	c.at = c.at.Add(-2 * ttl)
	c.mu.Unlock()
	// The refresh is held at the gate, so an answer now can only come from
	// the expired listing.
	answered := make(chan []int, 1)
	go func() {
		l, err := c.getKnown(context.Background(), ttl, fetch, has(2))
		assert.NoError(t, err)
		answered <- l
	}()
	select {
	case l := <-answered:
		assert.Equal(t, []int{1, 2, 1}, l, "answered from the expired listing")
	case <-time.After(10 * time.Second):
		t.Fatal("a lookup the expired listing answers waited for the refresh")
	}
	select {
	case <-refreshing:
	case <-time.After(10 * time.Second):
		t.Fatal("the expired listing was not refreshed behind the lookup")
	}

	waiting := make(chan struct{}, 1)
	missed := make(chan []int, 1)
	go func() {
		l, _ := c.getKnown(waitingCtx{context.Background(), waiting}, ttl, fetch, has(3))
		missed <- l
	}()
	select {
	case l := <-missed:
		t.Fatalf("a lookup the listing cannot answer did not wait for the fresh one: %v", l)
	case <-waiting:
	}
	close(gate)
	assert.Equal(t, []int{1, 2, 2}, <-missed, "it got the refreshed listing")
	assert.Equal(t, int32(2), calls.Load(), "one refresh, shared")
}

// waitingCtx tells when a caller starts waiting for a fetch in flight: the
// wait selects on its context's Done, so a test knows each caller it
// started is waiting, not merely running. A send is dropped when waiting
// is full.
type waitingCtx struct {
	context.Context
	waiting chan<- struct{}
}

func (c waitingCtx) Done() <-chan struct{} {
	select {
	case c.waiting <- struct{}{}:
	default:
	}
	return c.Context.Done()
}

// awaitN receives n values from ch, failing the test when they do not come
// within 10 s.
func awaitN(t *testing.T, ch <-chan struct{}, n int, what string) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for i := range n {
		select {
		case <-ch:
		case <-timeout:
			t.Fatalf("%s: %d of %d after 10s", what, i, n)
		}
	}
}
