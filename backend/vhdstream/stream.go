package vhdstream

import (
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// stream is one opened GET of the VHD: the body, where we are in it, and a
// watchdog. A stream of a whole disk takes as long as the disk is large, so
// no deadline can bound the attempt; what is bounded instead is silence: a
// server that sends nothing for idle (the policy's attempt timeout) is given
// up on, and so is one that does not answer the open in that time.
type stream struct {
	body  io.ReadCloser // set once before the stream is handed out
	idle  time.Duration
	timer *time.Timer
	pos   int64 // bytes read so far: the offset in the VHD file

	cancel   context.CancelFunc
	stopCtx  func() bool
	expired  atomic.Bool
	closeOne sync.Once

	mu   sync.Mutex
	dead bool
}

// openStream opens a stream under ctx; ending ctx also closes the body, for
// bodies (pipes) that do not watch the context they were opened with.
func openStream(ctx context.Context, open func(context.Context) (io.ReadCloser, error), idle time.Duration) (*stream, error) {
	ctx, cancel := context.WithCancel(ctx)
	st := &stream{idle: idle, cancel: cancel}
	st.timer = time.AfterFunc(idle, func() { st.expired.Store(true); st.kill() })
	st.stopCtx = context.AfterFunc(ctx, st.kill)
	body, err := open(ctx)
	if err == nil && body == nil {
		err = fmt.Errorf("open returned no body")
	}
	if err != nil {
		st.close()
		if st.expired.Load() {
			return nil, fmt.Errorf("no answer in %s: %w", idle, err)
		}
		return nil, err
	}
	st.mu.Lock()
	st.body = body
	dead := st.dead
	st.mu.Unlock()
	if dead {
		// The watchdog or ctx fired while open was returning.
		st.close()
		if st.expired.Load() {
			return nil, fmt.Errorf("no answer in %s", idle)
		}
		return nil, ctx.Err()
	}
	return st, nil
}

func (st *stream) Read(p []byte) (int, error) {
	n, err := st.body.Read(p)
	st.pos += int64(n)
	if n > 0 {
		st.timer.Reset(st.idle)
	}
	if err != nil && st.expired.Load() {
		err = fmt.Errorf("stream idle for %s: %w", st.idle, err)
	}
	return n, err
}

// kill ends the stream from any goroutine: it cancels the request and
// closes the body, which unblocks a Read in progress (HTTP bodies and pipes
// allow Close concurrent with Read).
func (st *stream) kill() {
	st.cancel()
	st.mu.Lock()
	st.dead = true
	b := st.body
	st.mu.Unlock()
	if b != nil {
		st.closeOne.Do(func() { b.Close() })
	}
}

// close is kill that also stops the watchdog and the context hook.
func (st *stream) close() {
	st.timer.Stop()
	st.stopCtx()
	st.kill()
}
