// Command testreport runs `go test -json ARGS...` and reports the run for a
// person: a line per package as it finishes, the whole output of every test
// that failed or did not finish (a timeout's panic), build failures, the
// tests that skipped, and a summary. It exits 1 when anything failed, when
// go test itself failed, and when any test skipped: the tests skip only when
// the machine lacks what they need, and a run that lacked it has not shown
// that the code works. VMEXPORTFS_ALLOW_SKIP=1 lets skips pass (the summary
// says so).
//
//	go run ./scripts/testreport [-go GO] -- -count=1 -timeout 20m ./...
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strings"
)

// allowSkipEnv is backend/testenv's opt-out: set to 1, tests that lack
// what they need skip, and this report lets the skips pass.
const allowSkipEnv = "VMEXPORTFS_ALLOW_SKIP"

func main() {
	goCmd := flag.String("go", "go", "the go command")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: testreport [-go GO] [--] GO-TEST-ARGS...")
		flag.PrintDefaults()
	}
	flag.Parse()
	cmd := exec.Command(*goCmd, append([]string{"test", "-json"}, flag.Args()...)...)
	cmd.Stderr = os.Stderr
	events, err := cmd.StdoutPipe()
	if err != nil {
		fmt.Fprintln(os.Stderr, "testreport:", err)
		os.Exit(1)
	}
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "testreport:", err)
		os.Exit(1)
	}
	r := newReport(os.Stdout, os.Getenv(allowSkipEnv) == "1")
	readErr := r.read(events)
	waitErr := cmd.Wait()
	os.Exit(r.finish(errors.Join(readErr, waitErr)))
}

// event is one line of `go test -json` (cmd/test2json), build events
// included.
type event struct {
	Action      string
	Package     string
	Test        string
	Elapsed     float64
	Output      string
	ImportPath  string // build-output, build-fail
	FailedBuild string // a package's fail: the build that failed
}

type test struct {
	name   string
	action string // pass, fail, skip; "" while it runs
	output []string
}

type pkg struct {
	tests  map[string]*test
	order  []*test
	output []string // lines not of a test: TestMain's, a crash before any test
	done   bool
}

func (p *pkg) test(name string) *test {
	t, ok := p.tests[name]
	if !ok {
		t = &test{name: name}
		p.tests[name] = t
		p.order = append(p.order, t)
	}
	return t
}

// report follows one run's events and writes what a person reads.
type report struct {
	w         io.Writer
	allowSkip bool
	pkgs      map[string]*pkg
	started   []string
	builds    map[string][]string // build output by import path
	printed   map[string]bool     // build outputs already shown
	// Counts over the run.
	okPkgs, failedPkgs, noTestPkgs int
	passed, failed, unfinished     int
	skipped                        []string // "pkg TestX"
}

func newReport(w io.Writer, allowSkip bool) *report {
	return &report{w: w, allowSkip: allowSkip, pkgs: map[string]*pkg{}, builds: map[string][]string{}, printed: map[string]bool{}}
}

// read consumes the event stream; a line that is not an event is shown as
// it is (go test's own messages can be).
func (r *report) read(in io.Reader) error {
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var e event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil || e.Action == "" {
			fmt.Fprintln(r.w, sc.Text())
			continue
		}
		r.add(e)
	}
	return sc.Err()
}

func (r *report) pkg(name string) *pkg {
	p, ok := r.pkgs[name]
	if !ok {
		p = &pkg{tests: map[string]*test{}}
		r.pkgs[name] = p
		r.started = append(r.started, name)
	}
	return p
}

func (r *report) add(e event) {
	switch e.Action {
	case "build-output":
		r.builds[e.ImportPath] = append(r.builds[e.ImportPath], e.Output)
		return
	case "build-fail":
		return
	}
	p := r.pkg(e.Package)
	if e.Test == "" {
		switch e.Action {
		case "output":
			p.output = append(p.output, e.Output)
		case "pass", "fail", "skip":
			r.finishPkg(e, p)
		}
		return
	}
	t := p.test(e.Test)
	switch e.Action {
	case "output":
		t.output = append(t.output, e.Output)
	case "pass", "fail", "skip":
		t.action = e.Action
	}
}

func (r *report) finishPkg(e event, p *pkg) {
	p.done = true
	var failed, unfinished, skipped []*test
	for _, t := range p.order {
		switch t.action {
		case "pass":
			r.passed++
		case "fail":
			r.failed++
			failed = append(failed, t)
		case "skip":
			skipped = append(skipped, t)
			r.skipped = append(r.skipped, e.Package+" "+t.name)
		default:
			r.unfinished++
			unfinished = append(unfinished, t)
		}
	}
	switch {
	case e.Action == "skip" && len(p.order) == 0:
		r.noTestPkgs++
		fmt.Fprintf(r.w, "?   \t%s\t[no test files]\n", e.Package)
	case e.Action == "fail" || len(failed)+len(unfinished) > 0:
		r.failedPkgs++
		fmt.Fprintf(r.w, "FAIL\t%s\t%.3fs\n", e.Package, e.Elapsed)
		if e.FailedBuild != "" {
			r.showBuild(e.FailedBuild)
		}
		for _, t := range failed {
			r.show("", t.output)
		}
		for _, t := range unfinished {
			r.show("--- DID NOT FINISH: "+t.name, t.output)
		}
		if e.FailedBuild == "" && len(failed)+len(unfinished) == 0 {
			r.show("--- FAIL: "+e.Package+" (outside any test)", p.output)
		}
	default:
		r.okPkgs++
		fmt.Fprintf(r.w, "ok  \t%s\t%.3fs\n", e.Package, e.Elapsed)
	}
	for _, t := range skipped {
		r.show("", t.output)
	}
}

func (r *report) showBuild(importPath string) {
	if r.printed[importPath] {
		fmt.Fprintf(r.w, "    build failed: %s (output above)\n", importPath)
		return
	}
	r.printed[importPath] = true
	r.show("--- BUILD FAILED: "+importPath, r.builds[importPath])
}

// show writes a heading, if any, and lines, indented, without test2json's
// framing (=== RUN and the like): a test's own output ends with its
// verdict (--- FAIL: name), which needs no heading.
func (r *report) show(heading string, lines []string) {
	if heading != "" {
		fmt.Fprintln(r.w, "    "+heading)
	}
	for _, l := range lines {
		if strings.HasPrefix(l, "=== ") {
			continue
		}
		fmt.Fprint(r.w, "    "+l)
		if !strings.HasSuffix(l, "\n") {
			fmt.Fprintln(r.w)
		}
	}
}

// finish writes the summary and returns the exit status; goErr is go test's
// own failure (its exit status, a broken stream).
func (r *report) finish(goErr error) int {
	for _, name := range r.started {
		if p := r.pkgs[name]; !p.done {
			r.failedPkgs++
			fmt.Fprintf(r.w, "FAIL\t%s\t(no result: the run ended before it)\n", name)
			for _, t := range p.order {
				if t.action == "" {
					r.unfinished++
					r.show("--- DID NOT FINISH: "+t.name, t.output)
				}
			}
		}
	}
	fmt.Fprintf(r.w, "\n%d packages: %d ok, %d failed, %d without tests. %d tests: %d passed, %d failed, %d did not finish, %d skipped.\n",
		len(r.started), r.okPkgs, r.failedPkgs, r.noTestPkgs,
		r.passed+r.failed+r.unfinished+len(r.skipped), r.passed, r.failed, r.unfinished, len(r.skipped))
	status := 0
	if r.failedPkgs > 0 || r.failed > 0 || r.unfinished > 0 {
		fmt.Fprintln(r.w, "FAIL: tests failed (above)")
		status = 1
	}
	if goErr != nil {
		fmt.Fprintln(r.w, "FAIL: go test:", goErr)
		status = 1
	}
	if len(r.started) == 0 && goErr == nil {
		fmt.Fprintln(r.w, "FAIL: go test reported no package")
		status = 1
	}
	if len(r.skipped) > 0 {
		slices.Sort(r.skipped)
		if r.allowSkip {
			fmt.Fprintf(r.w, "%d skipped tests (above) allowed by %s=1\n", len(r.skipped), allowSkipEnv)
		} else {
			fmt.Fprintf(r.w, "FAIL: %d tests skipped, and no test may skip (%s=1 allows it):\n", len(r.skipped), allowSkipEnv)
			for _, s := range r.skipped {
				fmt.Fprintln(r.w, "    "+s)
			}
			status = 1
		}
	}
	if status == 0 {
		fmt.Fprintln(r.w, "PASS")
	}
	return status
}
