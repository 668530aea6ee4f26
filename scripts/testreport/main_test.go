package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/testenv"
)

// The streams in testdata are what `go test -json -timeout 3s ./...` (Go
// 1.26) wrote for a module with one package per case: NAME.jsonl holds the
// events of package sample/NAME.
func stream(t *testing.T, names ...string) []byte {
	t.Helper()
	var all []byte
	for _, name := range names {
		b, err := os.ReadFile(filepath.Join("testdata", name+".jsonl"))
		require.NoError(t, err)
		all = append(all, b...)
	}
	return all
}

// runReport reports events as main does, with goErr as go test's own
// failure.
func runReport(t *testing.T, events []byte, allowSkip bool, goErr error) (int, string) {
	t.Helper()
	var out bytes.Buffer
	r := newReport(&out, allowSkip)
	require.NoError(t, r.read(bytes.NewReader(events)))
	return r.finish(goErr), out.String()
}

func TestPass(t *testing.T) {
	status, out := runReport(t, stream(t, "pass", "notests"), false, nil)
	assert.Equal(t, 0, status, out)
	assert.Contains(t, out, "ok  \tsample/pass\t")
	assert.Contains(t, out, "?   \tsample/notests\t[no test files]")
	assert.Contains(t, out, "2 packages: 1 ok, 0 failed, 1 without tests. 3 tests: 3 passed, 0 failed, 0 did not finish, 0 skipped.")
	assert.True(t, strings.HasSuffix(out, "\nPASS\n"), out)
	assert.NotContains(t, out, "hello", "a passing test's log is not shown")
}

func TestFailShowsTheTestsOutput(t *testing.T) {
	status, out := runReport(t, stream(t, "pass", "fail"), false, errors.New("exit status 1"))
	assert.Equal(t, 1, status)
	assert.Contains(t, out, "FAIL\tsample/fail\t")
	assert.Contains(t, out, "f_test.go:7: context line", "the failed test's log, not only its error")
	assert.Contains(t, out, "f_test.go:7: wrong answer")
	assert.Contains(t, out, "--- FAIL: TestBad/inner")
	assert.NotContains(t, out, "=== RUN")
	assert.Contains(t, out, "2 failed")
	assert.Contains(t, out, "FAIL: tests failed (above)")
	assert.NotContains(t, out, "\nPASS\n")
}

func TestSkipFails(t *testing.T) {
	status, out := runReport(t, stream(t, "skip"), false, nil)
	assert.Equal(t, 1, status, "a run where a test skipped, though go test passed")
	assert.Contains(t, out, "s_test.go:5: no tool", "the reason is shown")
	assert.Contains(t, out, "FAIL: 2 tests skipped, and no test may skip (VMEXPORTFS_ALLOW_SKIP=1 allows it):\n    sample/skip TestSkipped\n    sample/skip TestSubSkipped/cell\n")
}

func TestSkipAllowed(t *testing.T) {
	status, out := runReport(t, stream(t, "skip"), true, nil)
	assert.Equal(t, 0, status, out)
	assert.Contains(t, out, "s_test.go:5: no tool", "the reason is shown")
	assert.Contains(t, out, "--- SKIP: TestSubSkipped/cell")
	assert.Contains(t, out, "2 skipped tests (above) allowed by VMEXPORTFS_ALLOW_SKIP=1\n")
	assert.True(t, strings.HasSuffix(out, "\nPASS\n"), out)
}

func TestSkipAllowedStillFailsOnFailure(t *testing.T) {
	status, _ := runReport(t, stream(t, "skip", "fail"), true, errors.New("exit status 1"))
	assert.Equal(t, 1, status)
}

func TestBuildFailure(t *testing.T) {
	status, out := runReport(t, stream(t, "pass", "build"), false, errors.New("exit status 1"))
	assert.Equal(t, 1, status)
	assert.Contains(t, out, "FAIL\tsample/build\t")
	assert.Contains(t, out, "BUILD FAILED: sample/build [sample/build.test]")
	assert.Contains(t, out, "build/b_test.go:5:28: undefined: undefined")
}

func TestPanic(t *testing.T) {
	status, out := runReport(t, stream(t, "panic"), false, errors.New("exit status 1"))
	assert.Equal(t, 1, status)
	assert.Contains(t, out, "--- FAIL: TestPanics")
	assert.Contains(t, out, "panic: assignment to entry in nil map")
	assert.Contains(t, out, "p_test.go:6")
}

// TestTimeout: the test that was running when the binary's alarm fired
// never ends; it is reported with the panic, which test2json gives it.
func TestTimeout(t *testing.T) {
	status, out := runReport(t, stream(t, "timeout"), false, errors.New("exit status 1"))
	assert.Equal(t, 1, status)
	assert.Contains(t, out, "FAIL\tsample/timeout\t3.008s")
	assert.Contains(t, out, "DID NOT FINISH: TestHangs\n    panic: test timed out after 3s\n")
	assert.Contains(t, out, "1 did not finish")
}

// TestCutStream: a package whose result never came (go test killed, the
// pipe cut) is a failure, even if go test's status were 0.
func TestCutStream(t *testing.T) {
	events := stream(t, "timeout")
	events = events[:bytes.LastIndex(bytes.TrimSuffix(events, []byte("\n")), []byte("\n"))+1]
	status, out := runReport(t, events, false, nil)
	assert.Equal(t, 1, status)
	assert.Contains(t, out, "FAIL\tsample/timeout\t(no result: the run ended before it)")
	assert.Contains(t, out, "DID NOT FINISH: TestHangs")
}

// TestGoTestFailed: go test's own failure fails the report, even where no
// event says why.
func TestGoTestFailed(t *testing.T) {
	status, out := runReport(t, stream(t, "pass"), false, errors.New("exit status 2"))
	assert.Equal(t, 1, status)
	assert.Contains(t, out, "FAIL: go test: exit status 2")
}

func TestNothingRan(t *testing.T) {
	status, out := runReport(t, nil, false, nil)
	assert.Equal(t, 1, status)
	assert.Contains(t, out, "FAIL: go test reported no package")
}

func TestNonEventLinesShown(t *testing.T) {
	status, out := runReport(t, append([]byte("go: something to say\n"), stream(t, "pass")...), false, nil)
	assert.Equal(t, 0, status)
	assert.True(t, strings.HasPrefix(out, "go: something to say\n"), out)
}

func TestSameOptOutAsTheTests(t *testing.T) {
	assert.Equal(t, testenv.AllowSkipEnv, allowSkipEnv)
}
