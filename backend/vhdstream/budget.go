package vhdstream

import "sync"

// Budget is the bytes that spills may store in total (the --spill-size of a
// mount), shared by every Spill. A spill takes from it as it writes data and
// gives everything back on Close.
type Budget struct {
	mu    sync.Mutex
	total int64
	used  int64
}

// NewBudget returns a budget of bytes; zero or less stores nothing.
func NewBudget(bytes int64) *Budget {
	return &Budget{total: max(bytes, 0)}
}

// Total is the budget's size.
func (b *Budget) Total() int64 { return b.total }

// Used is the bytes the open spills hold.
func (b *Budget) Used() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// take reserves n bytes, or none when fewer than n are left.
func (b *Budget) take(n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if n > b.total-b.used {
		return false
	}
	b.used += n
	return true
}

// give returns n bytes taken earlier.
func (b *Budget) give(n int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.used = max(b.used-n, 0)
}
