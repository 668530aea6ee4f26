package meter_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/meter"
	"github.com/vmexportfs/vmexportfs/backend/retry"
)

type kinded struct{ kind string }

func (k kinded) Error() string     { return "kinded" }
func (k kinded) FaultKind() string { return k.kind }

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{context.DeadlineExceeded, meter.FaultTimeout},
		{fmt.Errorf("read: %w", os.ErrDeadlineExceeded), meter.FaultTimeout},
		{&net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}, meter.FaultConnection},
		{fmt.Errorf("body: %w", syscall.ECONNRESET), meter.FaultConnection},
		{fmt.Errorf("body: %w", io.ErrUnexpectedEOF), meter.FaultConnection},
		{fmt.Errorf("answer: %w", kinded{meter.FaultStatus}), meter.FaultStatus},
		{errors.New("Content-Range mismatch"), meter.FaultProtocol},
	} {
		assert.Equal(t, tc.want, meter.Classify(tc.err), "%v", tc.err)
	}
}

// TestNilMeter: code given no meter counts nothing and does not check.
func TestNilMeter(t *testing.T) {
	var m *meter.Meter
	r := m.Begin(meter.HTTP)
	r.Received(10)
	r.End(false)
	m.Fault(errors.New("x"), false)
	m.Retry()
	m.Exhausted()
	m.Gauge("transfers").Add(1)
	rt := http.DefaultTransport
	assert.Equal(t, rt, m.RoundTripper(rt))
	assert.Empty(t, m.Read().Transports)
}

// TestRoundTripper counts what a real server sees: requests (a redirect is
// two), answer bytes, failed answers, and connections open until closed.
func TestRoundTripper(t *testing.T) {
	body := make([]byte, 100_000)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/data":
			w.Write(body)
		case "/moved":
			http.Redirect(w, r, "/data", http.StatusFound)
		default:
			http.Error(w, "no such thing", http.StatusNotFound)
		}
	}))
	defer srv.Close()
	m := meter.New("test")
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.DialContext = m.DialContext(meter.HTTP, (&net.Dialer{}).DialContext)
	client := &http.Client{Transport: m.RoundTripper(tr)}
	get := func(path string) int {
		resp, err := client.Get(srv.URL + path)
		require.NoError(t, err)
		n, err := io.Copy(io.Discard, resp.Body)
		require.NoError(t, err)
		resp.Body.Close()
		return int(n)
	}
	require.Equal(t, len(body), get("/data"))
	require.Equal(t, len(body), get("/moved"))
	get("/missing")

	r := m.Read()
	require.Len(t, r.Transports, 1)
	h := r.Transports[0]
	assert.Equal(t, "test", r.Platform)
	assert.Equal(t, int64(4), h.Requests)
	assert.Equal(t, int64(1), h.Failed, "the 404")
	assert.GreaterOrEqual(t, h.BytesReceived, int64(2*len(body)))
	assert.Equal(t, uint64(4), h.Durations.Count)
	assert.Equal(t, int64(1), h.ConnsOpened, "kept alive")
	assert.Equal(t, int64(1), h.ConnsOpen)
	client.CloseIdleConnections()
	assert.Eventually(t, func() bool { return m.Read().Transports[0].ConnsOpen == 0 }, 5*time.Second, 10*time.Millisecond)
}

// TestRetryCounts: the retry runner counts each retried fault by kind,
// each retry, and an operation that ran out of attempts; a final answer
// (Stop) is no fault.
func TestRetryCounts(t *testing.T) {
	m := meter.New("test")
	r := retry.Runner{Policy: retry.Policy{Attempts: 3, BaseDelay: time.Millisecond, Meter: m}}
	faults := []*retry.Fault{
		{Kind: retry.Again, Err: context.DeadlineExceeded},
		{Kind: retry.Again, Err: errors.New("short body")},
		{Kind: retry.Again, Err: syscall.ECONNRESET},
	}
	i := 0
	_, err := r.Do(context.Background(), func() string { return "op" }, func(context.Context) *retry.Fault {
		f := faults[i]
		i++
		return f
	})
	require.ErrorIs(t, err, retry.ErrExhausted)
	_, err = r.Do(context.Background(), func() string { return "op" }, func(context.Context) *retry.Fault {
		return &retry.Fault{Kind: retry.Stop, Err: errors.New("not found")}
	})
	require.Error(t, err)
	got := m.Read()
	assert.Equal(t, map[string]int64{meter.FaultTimeout: 1, meter.FaultProtocol: 1, meter.FaultConnection: 1}, got.Faults)
	assert.Equal(t, int64(2), got.Retries)
	assert.Equal(t, int64(1), got.Exhausted)
}

func TestHistogram(t *testing.T) {
	var h meter.Histogram
	assert.True(t, isNaN(h.Read().Quantile(0.5)), "empty")
	for range 90 {
		h.Observe(3 * time.Millisecond)
	}
	for range 10 {
		h.Observe(2 * time.Second)
	}
	h.Observe(10 * time.Minute) // past the last bucket
	r := h.Read()
	assert.Equal(t, uint64(101), r.Count)
	assert.InDelta(t, 90*0.003+10*2+600, r.SumSeconds, 1e-6)
	for i := 1; i < len(r.Cumulative); i++ {
		assert.GreaterOrEqual(t, r.Cumulative[i], r.Cumulative[i-1])
	}
	assert.Equal(t, uint64(100), r.Cumulative[len(r.Cumulative)-1], "the +Inf one is only in Count")
	p50 := r.Quantile(0.5)
	assert.Greater(t, p50, 0.0025)
	assert.LessOrEqual(t, p50, 0.005)
	p95 := r.Quantile(0.95)
	assert.Greater(t, p95, 1.0)
	assert.LessOrEqual(t, p95, 2.5)
}

func isNaN(f float64) bool { return f != f }
