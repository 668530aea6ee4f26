package backend

import "context"

type progressKey struct{}

// WithProgress returns ctx carrying report, which a long operation of a
// platform (CreateSnapshot waiting minutes for an export) calls with what it
// is doing now. The filesystem shows the latest in its stats and logs it at
// a steady pace, so a platform reports every change and never throttles.
func WithProgress(ctx context.Context, report func(state string)) context.Context {
	return context.WithValue(ctx, progressKey{}, report)
}

// ReportProgress tells whoever waits on ctx what a long operation is doing
// ("waiting for export snap-1 Ready: phase Pending"); without WithProgress
// it does nothing. state is for people: short, no secrets.
func ReportProgress(ctx context.Context, state string) {
	if report, ok := ctx.Value(progressKey{}).(func(string)); ok {
		report(state)
	}
}
