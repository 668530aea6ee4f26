package coriolistest

import (
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestHoldDisk: reads pass until the bytes asked for are served, then wait
// (held says so) until release; HEADs never wait.
func TestHoldDisk(t *testing.T) {
	h := newHarness(t)
	setupDisk(t, h, testDiskSize)
	h.write(&model{data: make([]byte, testDiskSize)}, 0, pattern(1, 256<<10))
	sid, err := h.srv.TakeSnapshot("vm1")
	require.NoError(t, err)
	path := diskPath("vm1", sid, "d.img")
	ranged := map[string]string{"Range": "bytes=0-65535"}

	held, release := h.srv.HoldDisk(100 << 10)
	defer release()
	for range 2 { // 128 KiB: the second starts below the mark
		assert.Equal(t, http.StatusPartialContent, h.do(http.MethodGet, path, h.token, nil, ranged).status)
	}
	select {
	case <-held:
		t.Fatal("held before the bytes were served")
	default:
	}
	type result struct {
		r   reply
		err error
	}
	got := make(chan result, 1)
	go func() {
		r, err := h.tryDo(http.MethodGet, path, h.token, nil, ranged)
		got <- result{r, err}
	}()
	select {
	case <-held:
	case r := <-got:
		t.Fatalf("read past the mark answered, not held: %d %v", r.r.status, r.err)
	}
	assert.Equal(t, http.StatusOK, h.do(http.MethodHead, path, h.token, nil, nil).status, "a HEAD is not held")
	// Not answered: nothing can say so but time; a read let through
	// answers in a millisecond.
	select {
	case r := <-got:
		t.Fatalf("a held read was answered: %d %v", r.r.status, r.err)
	case <-time.After(100 * time.Millisecond):
	}
	release()
	r := <-got
	require.NoError(t, r.err)
	assert.Equal(t, http.StatusPartialContent, r.r.status)
	assert.Equal(t, pattern(1, 256<<10)[:64<<10], r.r.body)
	release() // idempotent
	assert.Equal(t, http.StatusPartialContent, h.do(http.MethodGet, path, h.token, nil, ranged).status, "released for good")
}
