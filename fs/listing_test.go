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
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v, err := c.get(context.Background(), time.Hour, fetch)
			assert.NoError(t, err)
			results[i] = v
		}()
	}
	time.Sleep(50 * time.Millisecond)
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
	fetch := func(context.Context) ([]int, error) {
		if calls.Add(1) > 1 {
			<-gate // the refresh is slow
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
	const ttl = 10 * time.Millisecond
	_, err := c.getKnown(context.Background(), ttl, fetch, has(1))
	require.NoError(t, err)
	time.Sleep(2 * ttl)
	start := time.Now()
	l, err := c.getKnown(context.Background(), ttl, fetch, has(2))
	require.NoError(t, err)
	assert.Less(t, time.Since(start), time.Second, "answered from the expired listing")
	assert.Equal(t, []int{1, 2, 1}, l)
	require.Eventually(t, func() bool { return calls.Load() == 2 }, time.Second, time.Millisecond, "refreshing behind")

	missed := make(chan []int)
	go func() {
		l, _ := c.getKnown(context.Background(), ttl, fetch, has(3))
		missed <- l
	}()
	select {
	case <-missed:
		t.Fatal("a lookup the listing cannot answer did not wait for the fresh one")
	case <-time.After(50 * time.Millisecond):
	}
	close(gate)
	assert.Equal(t, []int{1, 2, 2}, <-missed, "it got the refreshed listing")
	assert.Equal(t, int32(2), calls.Load(), "one refresh, shared")
}
