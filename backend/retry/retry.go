// Package retry is the one place where backend operations are retried: each
// attempt under its own deadline, exponential backoff with full jitter
// between attempts, a bounded number of attempts, and credentials renewed
// when an attempt says they were refused. Every transport (HTTP Range today,
// NBD next) runs its attempts through it, so a fault is handled the same way
// whatever carried the bytes.
package retry

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/meter"
)

// Policy bounds the retries of one operation.
type Policy struct {
	Attempts       int           // total tries; default 5
	BaseDelay      time.Duration // first backoff; default 100ms (exponential, full jitter)
	MaxDelay       time.Duration // backoff cap; default 5s
	AttemptTimeout time.Duration // deadline of one attempt including its body; default 30s
	// Meter, when set, counts the faults, retries and operations that ran
	// out of attempts. It travels with the policy so that every transport
	// built from the mount's policy counts into the mount's meter.
	Meter *meter.Meter
}

// WithDefaults fills in the zero fields.
func (p Policy) WithDefaults() Policy {
	if p.Attempts <= 0 {
		p.Attempts = 5
	}
	if p.BaseDelay <= 0 {
		p.BaseDelay = 100 * time.Millisecond
	}
	if p.MaxDelay <= 0 {
		p.MaxDelay = 5 * time.Second
	}
	if p.AttemptTimeout <= 0 {
		p.AttemptTimeout = 30 * time.Second
	}
	return p
}

// Backoff is full jitter: uniform in [0, min(MaxDelay, BaseDelay<<retry)], so
// many clients hitting one failing server spread out.
func (p Policy) Backoff(retry int) time.Duration {
	d := p.MaxDelay
	if retry < 30 && p.BaseDelay<<retry > 0 && p.BaseDelay<<retry < d {
		d = p.BaseDelay << retry
	}
	return rand.N(d + 1)
}

// Kind is what a failed attempt calls for.
type Kind int

const (
	Again Kind = iota // transient: back off and try again
	Renew             // credentials refused: renew them, then try again
	Stop              // no point retrying
)

// Fault is a failed attempt: its error and what it calls for.
type Fault struct {
	Kind Kind
	Err  error
}

func (f *Fault) Error() string { return f.Err.Error() }
func (f *Fault) Unwrap() error { return f.Err }

// Faultf makes a Fault of kind with a formatted error.
func Faultf(kind Kind, format string, args ...any) *Fault {
	return &Fault{Kind: kind, Err: fmt.Errorf(format, args...)}
}

// Runner runs attempts under a policy.
type Runner struct {
	Policy Policy
	Logger *slog.Logger // nil discards
	// Renew, when set, renews credentials after a Renew fault. The first
	// renewal is free (a token expired: expected); after that a refusal
	// uses up attempts like any fault. A failed renewal is a Renew fault.
	Renew func(ctx context.Context) error
}

// Do runs attempt until it succeeds, returns a Stop fault, or the attempts
// are used up, and returns nil or the last fault. op names the operation in
// log lines (a func, since an attempt may learn its name). The error of
// ctx ending wraps both ctx's error and the last fault.
func (r Runner) Do(ctx context.Context, op func() string, attempt func(ctx context.Context) *Fault) (last *Fault, err error) {
	pol := r.Policy.WithDefaults()
	renewed := false
	for try := 0; try < pol.Attempts; try++ {
		if try > 0 {
			pol.Meter.Retry()
			t := time.NewTimer(pol.Backoff(try - 1))
			select {
			case <-ctx.Done():
				t.Stop()
				return last, fmt.Errorf("%s: %w (last fault: %w)", op(), ctx.Err(), last)
			case <-t.C:
			}
		}
		actx, cancel := context.WithTimeout(ctx, pol.AttemptTimeout)
		last = attempt(actx)
		cancel()
		if last == nil {
			return nil, nil
		}
		if err := ctx.Err(); err != nil {
			return last, fmt.Errorf("%s: %w", op(), err)
		}
		if ce := Certificate(last.Err, ""); ce != nil && last.Kind == Again {
			// Whatever carried it: the same certificate fails the same way.
			last = &Fault{Kind: Stop, Err: ce}
		}
		if last.Kind != Stop {
			pol.Meter.Fault(last.Err, last.Kind == Renew)
		}
		switch last.Kind {
		case Stop:
			return last, fmt.Errorf("%s: %w", op(), last)
		case Renew:
			if r.Renew == nil {
				return last, fmt.Errorf("%s: %w", op(), last)
			}
			r.logger().Warn("retry: renewing credentials", "op", op())
			if err := r.Renew(ctx); err != nil {
				// Credentials that worked a moment ago being refused is
				// more often a passing storm than a revocation: retry
				// within the budget.
				last = &Fault{Kind: Renew, Err: fmt.Errorf("renew credentials: %w", err)}
				break
			}
			if !renewed {
				renewed = true
				try-- // the first renewal is expected (a token expired), not a fault
				continue
			}
		}
		if try+1 < pol.Attempts {
			r.logger().Warn("retry: retrying", "op", op(), "attempt", try+1, "of", pol.Attempts, "fault", last.Error())
		}
	}
	pol.Meter.Exhausted()
	return last, fmt.Errorf("%s: %w after %d attempts: %w", op(), ErrExhausted, pol.Attempts, last)
}

// CertificateError is a server certificate that did not verify: signed by
// an authority not trusted here, issued for another name, expired. Trying
// again meets the same certificate, so it is never retried; what the user
// can do about it is part of the message.
type CertificateError struct {
	Err    error  // what crypto/x509 said
	Advice string // for an unknown authority: where the trusted CA comes from
}

// DefaultAdvice is the advice for an unknown authority when the platform
// is verified with the common --ca-file.
const DefaultAdvice = "pass --ca-file with the platform's CA"

func (e *CertificateError) Error() string {
	var invalid x509.CertificateInvalidError
	switch {
	case errors.As(e.Err, new(x509.HostnameError)):
		// x509 says which names the certificate has and which we asked for.
		return fmt.Sprintf("TLS: %v; reach the server by a name its certificate is valid for", e.Err)
	case errors.As(e.Err, &invalid) && invalid.Reason == x509.Expired:
		return fmt.Sprintf("TLS: %v; the server needs a new certificate, or this machine's clock is wrong", e.Err)
	case errors.As(e.Err, new(x509.UnknownAuthorityError)):
		return fmt.Sprintf("TLS: %v; %s", e.Err, e.Advice)
	}
	return "TLS: " + e.Err.Error()
}

// Unwrap is the x509 error and backend.ErrPermission: a read of a disk whose
// server is not trusted is EACCES, not a passing EIO.
func (e *CertificateError) Unwrap() []error { return []error{e.Err, backend.ErrPermission} }

// Certificate returns err as a *CertificateError when it is, or wraps, a
// certificate that did not verify, else nil. advice is for an unknown
// authority ("" is DefaultAdvice).
func Certificate(err error, advice string) *CertificateError {
	if err == nil {
		return nil
	}
	if ce := (*CertificateError)(nil); errors.As(err, &ce) {
		return ce
	}
	if advice == "" {
		advice = DefaultAdvice
	}
	var unknown x509.UnknownAuthorityError
	var hostname x509.HostnameError
	var invalid x509.CertificateInvalidError
	switch {
	case errors.As(err, &unknown):
		return &CertificateError{Err: unknown, Advice: advice}
	case errors.As(err, &hostname):
		return &CertificateError{Err: hostname, Advice: advice}
	case errors.As(err, &invalid):
		return &CertificateError{Err: invalid, Advice: advice}
	}
	// A verification error of another kind (a custom VerifyConnection).
	if cv := (*tls.CertificateVerificationError)(nil); errors.As(err, &cv) {
		return &CertificateError{Err: cv.Err, Advice: advice}
	}
	return nil
}

// ErrExhausted marks an operation whose attempts were all used up.
var ErrExhausted = errors.New("attempts used up")

func (r Runner) logger() *slog.Logger {
	if r.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return r.Logger
}
