package retry

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var errFault = errors.New("fault")

func fast() Policy {
	return Policy{Attempts: 4, BaseDelay: time.Millisecond, MaxDelay: 2 * time.Millisecond, AttemptTimeout: time.Second}
}

func TestDo(t *testing.T) {
	for _, tc := range []struct {
		name      string
		faults    []Kind // what each attempt returns before succeeding
		renewErr  error
		wantCalls int
		wantErr   error // nil: success
		renews    int
	}{
		{"first try", nil, nil, 1, nil, 0},
		{"transient", []Kind{Again, Again, Again}, nil, 4, nil, 0},
		{"persistent", []Kind{Again, Again, Again, Again, Again}, nil, 4, ErrExhausted, 0},
		{"stop", []Kind{Stop}, nil, 1, errFault, 0},
		{"first renewal is free", []Kind{Renew, Again, Again, Again}, nil, 5, nil, 1},
		{"renewals after the first count", []Kind{Renew, Renew, Renew, Renew, Renew, Renew}, nil, 5, ErrExhausted, 5},
		{"failed renewal counts", []Kind{Renew, Renew, Renew, Renew, Renew}, errors.New("login refused"), 4, ErrExhausted, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls, renews := 0, 0
			r := Runner{Policy: fast(), Renew: func(context.Context) error { renews++; return tc.renewErr }}
			last, err := r.Do(context.Background(), func() string { return "op" }, func(ctx context.Context) *Fault {
				calls++
				if _, ok := ctx.Deadline(); !ok {
					t.Error("an attempt has no deadline")
				}
				if calls <= len(tc.faults) {
					return &Fault{Kind: tc.faults[calls-1], Err: errFault}
				}
				return nil
			})
			assert.Equal(t, tc.wantCalls, calls)
			assert.Equal(t, tc.renews, renews)
			if tc.wantErr == nil {
				require.NoError(t, err)
				assert.Nil(t, last)
				return
			}
			require.ErrorIs(t, err, tc.wantErr)
			require.NotNil(t, last)
			assert.Contains(t, err.Error(), "op")
		})
	}
}

func TestDoRenewWithoutRenewer(t *testing.T) {
	_, err := Runner{Policy: fast()}.Do(context.Background(), func() string { return "op" }, func(context.Context) *Fault {
		return &Fault{Kind: Renew, Err: errFault}
	})
	require.ErrorIs(t, err, errFault)
	assert.NotErrorIs(t, err, ErrExhausted)
}

func TestDoStopsWhenCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	pol := Policy{Attempts: 10, BaseDelay: time.Hour, MaxDelay: time.Hour}
	calls := 0
	go func() { time.Sleep(20 * time.Millisecond); cancel() }()
	start := time.Now()
	_, err := Runner{Policy: pol}.Do(ctx, func() string { return "op" }, func(context.Context) *Fault {
		calls++
		return &Fault{Kind: Again, Err: errFault}
	})
	require.ErrorIs(t, err, context.Canceled)
	require.ErrorIs(t, err, errFault, "the last fault is kept")
	assert.Less(t, time.Since(start), time.Second)
	assert.LessOrEqual(t, calls, 2)
}

func TestBackoffBounds(t *testing.T) {
	p := Policy{BaseDelay: 100 * time.Millisecond, MaxDelay: 5 * time.Second}
	for retry, limit := range []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond} {
		for range 100 {
			assert.LessOrEqual(t, p.Backoff(retry), limit)
		}
	}
	for range 100 {
		assert.LessOrEqual(t, p.Backoff(62), 5*time.Second, "no overflow for large retries")
	}
	assert.Equal(t, Policy{Attempts: 5, BaseDelay: 100 * time.Millisecond, MaxDelay: 5 * time.Second, AttemptTimeout: 30 * time.Second}, Policy{}.WithDefaults())
}
