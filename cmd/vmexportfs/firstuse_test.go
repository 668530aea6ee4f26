package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
)

// The tests of a first use of the command line: what a newcomer runs and
// reads (the demo's hint, where the log is, help, version, completion, the
// man page) works as printed.

// TestDemoHintWorks: `vmexportfs demo MOUNTPOINT`, as `make demo` runs it
// (in the background), prints a copy command that works when pasted: run
// by sh exactly as printed, it copies every snapshot of web01, each copy
// the bytes of the sample data's snapshot.
func TestDemoHintWorks(t *testing.T) {
	requireRoot(t)
	requireTools(t, "sh", "cp", "fusermount3")
	mnt := filepath.Join(t.TempDir(), "mnt")
	require.NoError(t, os.Mkdir(mnt, 0o755))
	out := vmexportfs(t, "demo", "--data-dir", t.TempDir(), "--log-file", filepath.Join(t.TempDir(), "demo.log"), mnt)
	t.Cleanup(func() { unmountDaemon(t, mnt) })

	var hint string
	for line := range strings.Lines(out) {
		if strings.Contains(line, "cp ") {
			hint = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "try:"))
		}
	}
	require.NotEmpty(t, hint, "the demo prints a copy command:\n%s", out)

	entries, err := os.ReadDir(filepath.Join(mnt, "by-name", "web01", "snapshots"))
	require.NoError(t, err)
	require.Len(t, entries, 3, "web01 has three snapshots")
	var copies []string
	for _, e := range entries {
		c := filepath.Join("/tmp", "web01-"+e.Name()+".img")
		require.NoFileExists(t, c)
		t.Cleanup(func() { os.Remove(c) })
		copies = append(copies, c)
	}
	tool(t, "sh", "-c", hint)

	ref, err := coriolistest.Start(coriolistest.Options{Dir: t.TempDir()})
	require.NoError(t, err)
	t.Cleanup(func() { ref.Close() })
	require.NoError(t, populateDemo(coriolisTarget{ref}))
	ids, err := ref.Snapshots(demoWeb)
	require.NoError(t, err)
	var want, got []string
	for _, id := range ids {
		path, err := ref.SnapshotData(demoWeb, id, demoWebDisk)
		require.NoError(t, err)
		want = append(want, sha256File(t, path))
	}
	for _, c := range copies {
		got = append(got, sha256File(t, c))
	}
	slices.Sort(want)
	slices.Sort(got)
	assert.Equal(t, want, got, "each copy is a snapshot of web01")
}

// unmountDaemon unmounts a mount served by a daemonized vmexportfs and waits
// for the daemon to exit, so that it no longer writes to the test's
// directories when they are removed.
func unmountDaemon(t *testing.T, mnt string) {
	t.Helper()
	pid := daemonPID(t, mnt)
	if isMounted(t, mnt) {
		if _, err := toolErr("fusermount3", "-u", mnt); err != nil {
			t.Errorf("fusermount3 -u %s: %v", mnt, err)
			_, _ = toolErr("fusermount3", "-u", "-z", mnt)
		}
	}
	if pid == 0 {
		return
	}
	// Released by its parent, the daemon may stay a zombie of a pid 1 that
	// does not reap: exited either way.
	assert.Eventually(t, func() bool {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		_, after, _ := bytes.Cut(b, []byte(") "))
		return err != nil || bytes.HasPrefix(after, []byte("Z"))
	}, 15*time.Second, 20*time.Millisecond, "the daemon of %s exits once unmounted", mnt)
}

// daemonPID finds the process serving mnt: the one whose last argument it
// is; 0 when there is none.
func daemonPID(t *testing.T, mnt string) int {
	t.Helper()
	procs, err := os.ReadDir("/proc")
	require.NoError(t, err)
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := bytes.Split(bytes.TrimSuffix(b, []byte{0}), []byte{0})
		if len(args) > 1 && string(args[0]) == os.Args[0] && string(args[len(args)-1]) == mnt {
			return pid
		}
	}
	return 0
}

// TestBackgroundMountSaysWhereItLogs: a mount that goes to the background
// prints one line on stderr, naming its log: the file the daemon writes,
// whose directory is named after a hash. --help gives the real defaults of
// the data directories and the log's path pattern, which that path
// follows, for root and with $XDG_*_HOME; README names the pattern too.
func TestBackgroundMountSaysWhereItLogs(t *testing.T) {
	requireTools(t, "fusermount3")
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-l", "l", coriolistest.DiskSpec{Name: "l.img", Device: "xvda", Size: 4 * mib})
	f.snapshot("vm-l")
	xdg := t.TempDir()
	env := []string{"XDG_STATE_HOME=" + filepath.Join(xdg, "state"), "XDG_CACHE_HOME=" + filepath.Join(xdg, "cache")}

	help, _, err := commandOutput(env, "--help")
	require.NoError(t, err)
	m := regexp.MustCompile(`(?m)^ +--log-file string .* else (\S+), printed once mounted\)$`).FindStringSubmatch(help)
	require.NotNil(t, m, "--help gives the log's default:\n%s", help)
	pattern := m[1]
	assert.Equal(t, filepath.Join(xdg, "state", "vmexportfs", "HOST-HASH", "vmexportfs.log"), pattern)
	assert.Regexp(t, `(?m)^ +--cache-dir string .*\(default `+regexp.QuoteMeta(filepath.Join(xdg, "cache", "vmexportfs"))+`\)$`, help)

	mnt := t.TempDir()
	source := "coriolis+" + f.sim.URL()
	stdout, stderr, err := commandOutput(env, "--username", "admin", "--password-file", f.passwordFile, "--ca-file", f.sim.CAFile(), source, mnt)
	require.NoError(t, err, stderr)
	t.Cleanup(func() { unmountDaemon(t, mnt) })
	assert.Empty(t, stdout)
	logPath := strings.Replace(pattern, "HOST-HASH", sourceKey(source, "admin"), 1)
	assert.Equal(t, "vmexportfs: mounted "+mnt+"; logging to "+logPath+"\n", stderr)
	log, err := os.ReadFile(logPath)
	require.NoError(t, err)
	assert.Contains(t, string(log), "msg=mounted")

	var rootEnv []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "XDG_STATE_HOME=") && !strings.HasPrefix(kv, "XDG_CACHE_HOME=") {
			rootEnv = append(rootEnv, kv)
		}
	}
	cmd := exec.Command(os.Args[0], "--help")
	cmd.Env = append(rootEnv, asCommandEnv+"=1")
	out, err := cmd.Output()
	require.NoError(t, err)
	for _, want := range []string{
		`--state-dir string .*\(default /var/lib/vmexportfs\)$`,
		`--cache-dir string .*\(default /var/cache/vmexportfs\)$`,
		`--log-file string .* else /var/lib/vmexportfs/HOST-HASH/vmexportfs\.log, printed once mounted\)$`,
	} {
		assert.Regexp(t, `(?m)^ +`+want, string(out), "root's defaults")
	}
	readme, err := os.ReadFile("../../README.md")
	require.NoError(t, err)
	assert.True(t, strings.Contains(string(readme), "/var/lib/vmexportfs/HOST-HASH/vmexportfs.log"), "README names the log's default")
}

// commandOutput runs the command with env added to the test's and returns
// its stdout and stderr.
func commandOutput(env []string, args ...string) (stdout, stderr string, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], args...)
	cmd.Env = append(append(os.Environ(), env...), asCommandEnv+"=1")
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	return out.String(), errOut.String(), err
}

// runCommand runs the command in this process, as TestBadInvocations does.
func runCommand(args ...string) (code int, stdout, stderr string) {
	var out, errOut bytes.Buffer
	code = run(context.Background(), args, &out, &errOut)
	return code, out.String(), errOut.String()
}

// TestEveryCommandHelp: every command's -h and --help, anywhere on its
// command line, print its usage on stdout and exit 0; `vmexportfs help
// COMMAND` prints the same, and `vmexportfs help` and `--help` the
// overview, which names every command.
func TestEveryCommandHelp(t *testing.T) {
	for _, c := range commands() {
		t.Run(c.name, func(t *testing.T) {
			code, want, stderr := runCommand("help", c.name)
			require.Equal(t, 0, code, stderr)
			assert.Empty(t, stderr)
			assert.Regexp(t, `^(?i)usage:\n?\s+vmexportfs `, want)
			assert.Contains(t, want, strings.Fields(strings.TrimPrefix(c.synopsis, "[mount] "))[0])
			for _, args := range [][]string{{"--help"}, {"-h"}, {"--help", "extra"}, {"extra", "-h"}} {
				code, stdout, stderr := runCommand(append([]string{c.name}, args...)...)
				assert.Equal(t, 0, code, "%s %v: %s", c.name, args, stderr)
				assert.Empty(t, stderr, "%s %v", c.name, args)
				assert.Equal(t, want, stdout, "%s %v", c.name, args)
			}
		})
	}
	code, overview, _ := runCommand("--help")
	require.Equal(t, 0, code)
	for _, args := range [][]string{{"-h"}, {"help"}, {"--username", "u", "--help"}} {
		code, stdout, stderr := runCommand(args...)
		assert.Equal(t, 0, code, "%v: %s", args, stderr)
		assert.Equal(t, overview, stdout, "%v", args)
	}
	for _, c := range commands() {
		assert.Regexp(t, `(?m)^  vmexportfs `+regexp.QuoteMeta(c.synopsis)+` +\S`, overview)
	}
	code, _, stderr := runCommand("help", "nosuch")
	assert.Equal(t, 2, code)
	assert.Equal(t, "vmexportfs: usage: help: unknown command \"nosuch\" (commands: mount, demo, extents, stats, version, help, completion, man)\n", stderr)
}

// TestOperandMistakes: a command given the wrong operands says, in one line
// and with exit status 2, what it wants, and says "usage" once.
func TestOperandMistakes(t *testing.T) {
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"extents"}, "vmexportfs: usage: extents: want one PATH: vmexportfs extents [--since BASE] PATH\n"},
		{[]string{"extents", "a", "b"}, "vmexportfs: usage: extents: want one PATH: vmexportfs extents [--since BASE] PATH\n"},
		{[]string{"demo"}, "vmexportfs: usage: demo: want one MOUNTPOINT: vmexportfs demo [--platform NAME] [flags] MOUNTPOINT\n"},
		{[]string{"stats"}, "vmexportfs: usage: stats: want one MOUNTPOINT: vmexportfs stats [--watch [--interval D]] [--json] MOUNTPOINT\n"},
		{[]string{"version", "x"}, "vmexportfs: usage: version takes no arguments\n"},
		{[]string{"-V", "x"}, "vmexportfs: usage: version takes no arguments\n"},
		{[]string{"man", "x"}, "vmexportfs: usage: man takes no arguments\n"},
		{[]string{"completion"}, "vmexportfs: usage: completion: want one of bash, zsh, fish\n"},
		{[]string{"completion", "tcsh"}, "vmexportfs: usage: completion: want one of bash, zsh, fish\n"},
		{[]string{"help", "a", "b"}, "vmexportfs: usage: help: want at most one COMMAND\n"},
		{[]string{"extents", "--bogus", "p"}, "vmexportfs: usage: extents: unknown flag: --bogus\n"},
	} {
		code, stdout, stderr := runCommand(tc.args...)
		assert.Equal(t, 2, code, tc.args)
		assert.Empty(t, stdout, tc.args)
		assert.Equal(t, tc.msg, stderr, tc.args)
	}
}

// TestVersion: -V, --version and `version` print one line from the build
// information: the module's version, the commit, its time and whether the
// tree was modified when the build recorded them, and the toolchain.
func TestVersion(t *testing.T) {
	platform := runtime.GOOS + "/" + runtime.GOARCH
	for _, tc := range []struct {
		name string
		info *debug.BuildInfo
		ok   bool
		want string
	}{
		{"no build information", nil, false, "vmexportfs (no build information) " + runtime.Version() + " " + platform},
		{"a checkout without VCS stamps", &debug.BuildInfo{GoVersion: "go1.26.1", Main: debug.Module{Version: "(devel)"}}, true,
			"vmexportfs devel go1.26.1 " + platform},
		{"a tagged build", &debug.BuildInfo{GoVersion: "go1.26.1", Main: debug.Module{Version: "v1.2.3"}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: "0123456789abcdef0123456789abcdef01234567"}, {Key: "vcs.time", Value: "2026-11-30T10:00:00Z"},
			{Key: "vcs.modified", Value: "false"}}}, true,
			"vmexportfs v1.2.3 (commit 0123456789abcdef0123456789abcdef01234567, 2026-11-30T10:00:00Z) go1.26.1 " + platform},
		{"a modified tree", &debug.BuildInfo{GoVersion: "go1.26.1", Main: debug.Module{Version: "v0.0.0-20261130100000-0123456789ab+dirty"}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: "0123456789abcdef0123456789abcdef01234567"}, {Key: "vcs.time", Value: "2026-11-30T10:00:00Z"},
			{Key: "vcs.modified", Value: "true"}}}, true,
			"vmexportfs v0.0.0-20261130100000-0123456789ab+dirty (commit 0123456789abcdef0123456789abcdef01234567, 2026-11-30T10:00:00Z, modified) go1.26.1 " + platform},
	} {
		assert.Equal(t, tc.want, versionLine(tc.info, tc.ok), tc.name)
	}

	info, ok := debug.ReadBuildInfo()
	want := versionLine(info, ok) + "\n"
	for _, args := range [][]string{{"-V"}, {"--version"}, {"version"}} {
		code, stdout, stderr := runCommand(args...)
		assert.Equal(t, 0, code, stderr)
		assert.Equal(t, want, stdout, args)
	}
}

// definedFlags are the spellings of a command's visible flags, from the
// definitions its command line is parsed with.
func definedFlags(c command) []string {
	var names []string
	c.flags().VisitAll(func(fl *pflag.Flag) {
		if !fl.Hidden {
			names = append(names, "--"+fl.Name)
			if fl.Shorthand != "" {
				names = append(names, "-"+fl.Shorthand)
			}
		}
	})
	return append(names, "--help", "-h")
}

// completionScript is what `vmexportfs completion SHELL` prints, in a file.
func completionScript(t *testing.T, shell string) string {
	t.Helper()
	code, script, stderr := runCommand("completion", shell)
	require.Equal(t, 0, code, stderr)
	path := filepath.Join(t.TempDir(), "vmexportfs."+shell)
	require.NoError(t, os.WriteFile(path, []byte(script), 0o644))
	return path
}

// TestBashCompletion loads the bash script in bash and completes words as
// bash would on Tab: command names, each command's flags (every flag it
// defines), flag values from closed sets, `--flag=value` split at "=".
func TestBashCompletion(t *testing.T) {
	requireTools(t, "bash")
	script := completionScript(t, "bash")
	complete := func(words ...string) []string {
		t.Helper()
		// The function is the one `complete -p` names, as bash calls it.
		out, err := runTool("bash", append([]string{"-c", `source "$1" || exit 1
[[ $(complete -p vmexportfs) =~ -F\ ([^ ]+) ]] || exit 1
COMP_WORDS=("${@:2}"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
"${BASH_REMATCH[1]}" && printf '%s\n' "${COMPREPLY[@]}"`, "bash", script}, words...))
		require.NoError(t, err, words)
		return strings.Fields(out)
	}
	for _, tc := range []struct {
		words []string
		want  []string
	}{
		{[]string{"vmexportfs", "mo"}, []string{"mount"}},
		{[]string{"vmexportfs", ""}, commandNames()},
		{[]string{"vmexportfs", "demo", "--pl"}, []string{"--platform"}},
		{[]string{"vmexportfs", "demo", "--platform", ""}, demoPlatformNames()},
		{[]string{"vmexportfs", "--log-level", "=", "w"}, []string{"warn"}},
		{[]string{"vmexportfs", "--log-format", "="}, []string{"text", "json"}},
		{[]string{"vmexportfs", "--xapi-r"}, []string{"--xapi-rmdir"}},
		{[]string{"vmexportfs", "mount", "--user"}, []string{"--username"}},
		{[]string{"vmexportfs", "extents", "--"}, []string{"--since", "--help"}},
		{[]string{"vmexportfs", "completion", ""}, []string{"bash", "zsh", "fish"}},
		{[]string{"vmexportfs", "help", "st"}, []string{"stats"}},
		{[]string{"vmexportfs", "--username", ""}, nil},
	} {
		assert.ElementsMatch(t, tc.want, complete(tc.words...), tc.words)
	}
	for _, c := range commands() {
		want := definedFlags(c)
		if c.name == "mount" {
			want = append(want, "--version", "-V")
		}
		assert.ElementsMatch(t, want, complete("vmexportfs", c.name, "-"), "every flag of %s", c.name)
	}
}

// TestZshAndFishCompletion: the zsh and fish scripts name every flag of
// every command; where the shells are installed, they parse, and their
// functions offer what bash's does (zsh's with its completion system's
// functions stubbed to print what they are given; fish's through
// `complete -C`, fish's own completion).
func TestZshAndFishCompletion(t *testing.T) {
	zsh, fish := completionScript(t, "zsh"), completionScript(t, "fish")
	for _, path := range []string{zsh, fish} {
		b, err := os.ReadFile(path)
		require.NoError(t, err)
		for _, c := range commands() {
			assert.Contains(t, string(b), c.name, path)
			c.flags().VisitAll(func(fl *pflag.Flag) {
				if !fl.Hidden {
					assert.Regexp(t, `(['\s])--`+regexp.QuoteMeta(fl.Name)+`[=\[ ]|-l `+regexp.QuoteMeta(fl.Name)+` `, string(b), "%s: %s --%s", path, c.name, fl.Name)
				}
			})
		}
	}

	if _, err := exec.LookPath("zsh"); err == nil {
		tool(t, "zsh", "-n", zsh)
		stub := filepath.Join(t.TempDir(), "stub.zsh")
		require.NoError(t, os.WriteFile(stub, []byte(`compdef() { }
source "$1"; shift
_describe() { print -rl -- "${(@P)${@[-1]}}" }
_arguments() { print -rl -- "$@" }
words=("$@"); CURRENT=$#words
_vmexportfs
`), 0o644))
		out := tool(t, "zsh", "-f", stub, zsh, "vmexportfs", "mo")
		assert.Contains(t, out, "mount:mount a platform's snapshots")
		out = tool(t, "zsh", "-f", stub, zsh, "vmexportfs", "demo", "--pl")
		assert.Contains(t, out, "--platform=[the platform to simulate\\: coriolis, kubevirt, xapi, ovirt]:string:(coriolis kubevirt xapi ovirt)")
		assert.NotContains(t, out, "--kubeconfig", "the demo's own flags, not the mount's")
		out = tool(t, "zsh", "-f", stub, zsh, "vmexportfs", "completion", "")
		assert.Contains(t, out, "*:shells:(bash zsh fish)")
	} else {
		t.Log("zsh is not installed: its script's syntax is not checked")
	}

	if _, err := exec.LookPath("fish"); err == nil {
		tool(t, "fish", "-n", fish)
		complete := func(line string) []string {
			out := tool(t, "fish", "--no-config", "-c", `source $argv[1]; complete -C $argv[2]`, fish, line)
			var words []string
			for l := range strings.Lines(out) {
				words = append(words, strings.SplitN(strings.TrimSpace(l), "\t", 2)[0])
			}
			return words
		}
		assert.Equal(t, []string{"mount"}, complete("vmexportfs mo"))
		assert.Equal(t, []string{"--platform"}, complete("vmexportfs demo --pl"))
		assert.ElementsMatch(t, demoPlatformNames(), complete("vmexportfs demo --platform "))
		assert.ElementsMatch(t, []string{"bash", "zsh", "fish"}, complete("vmexportfs completion "))
		assert.ElementsMatch(t, []string{"--since", "--help", "-h"}, slices.DeleteFunc(complete("vmexportfs extents -"), func(s string) bool { return s == "" }))
	} else {
		t.Log("fish is not installed: its script's syntax is not checked")
	}
}

// TestManPage: `make man` writes the man page, generated by `vmexportfs
// man`; groff renders it without a warning, and the page names every
// command, every flag of every command, every platform's source form and
// every -o spelling. The binary `make` built tells its version as its build
// information has it.
func TestManPage(t *testing.T) {
	requireTools(t, "make", "groff")
	dir := t.TempDir()
	bin, page := filepath.Join(dir, "vmexportfs"), filepath.Join(dir, "vmexportfs.1")
	tool(t, "make", "-C", "../..", "man", "BIN="+bin, "MAN="+page)
	code, generated, _ := runCommand("man")
	require.Equal(t, 0, code)
	b, err := os.ReadFile(page)
	require.NoError(t, err)
	assert.Equal(t, stripTH(generated), stripTH(string(b)), "make man writes what vmexportfs man prints")

	cmd := exec.Command("groff", "-k", "-man", "-Tutf8", "-ww", "-P-cbou", page)
	var out, warnings bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &warnings
	require.NoError(t, cmd.Run())
	assert.Empty(t, warnings.String(), "groff's warnings")
	// Rendered, a flag reads as typed: the page writes its '-' as \-,
	// which some groff setups show as U+2212.
	text := strings.ReplaceAll(out.String(), "\u2212", "-")
	for _, c := range commands() {
		assert.Regexp(t, `(?m)^ +vmexportfs `+regexp.QuoteMeta(c.synopsis)+`$`, text, "the synopsis of %s", c.name)
		for _, fl := range definedFlags(c) {
			assert.Regexp(t, `(?m)^ +(-\w, )?`+regexp.QuoteMeta(fl)+`\b`, text, "%s %s", c.name, fl)
			// A bare '-' may render as a hyphen, which a shell does not take.
			assert.True(t, strings.Contains(string(b), `\fB`+strings.ReplaceAll(fl, "-", `\-`)+`\fR`), "%s %s written with minus signs", c.name, fl)
		}
	}
	var cfg mountConfig
	newMountFlags(&cfg, new(string), new([]string), platforms())
	for _, p := range cfg.platforms {
		for _, u := range p.Usage {
			assert.Contains(t, text, u.Source)
		}
	}
	flat := strings.Join(strings.Fields(text), " ")
	for _, key := range defaultOptions.spellings() {
		assert.Contains(t, flat, " "+key+" ", "-o %s", key)
	}
	if _, err := exec.LookPath("man"); err == nil {
		tool(t, "man", "-l", page)
	}

	version, err := runTool(bin, []string{"--version"})
	require.NoError(t, err)
	stamps, err := runTool("go", []string{"version", "-m", bin})
	require.NoError(t, err)
	for line := range strings.Lines(stamps) {
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[0] == "mod" && f[2] != "(devel)":
			assert.Contains(t, version, " "+f[2]+" ", "the module's version")
		case len(f) == 2 && f[0] == "build" && strings.HasPrefix(f[1], "vcs.revision="):
			assert.Contains(t, version, strings.TrimPrefix(f[1], "vcs.revision="))
		case len(f) == 2 && f[0] == "build" && f[1] == "vcs.modified=true":
			assert.Contains(t, version, ", modified)")
		}
	}
	assert.True(t, strings.HasPrefix(version, "vmexportfs "), version)
}

// stripTH drops the page's title line, whose date and version are the
// building binary's.
func stripTH(page string) string {
	_, rest, _ := strings.Cut(page, "\n")
	return rest
}

// TestExtentsSinceUnknownBase: `extents --since` with a base the VM does
// not have says so, naming it and the VM's snapshots, in one line without
// the paging suffix of the attributes it reads (@0); a file that is not on
// a mount says that. A base it has still prints the map.
func TestExtentsSinceUnknownBase(t *testing.T) {
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-e", "e", coriolistest.DiskSpec{Name: "e.img", Device: "xvda", Size: 4 * mib})
	f.write("vm-e", "e.img", 0, 64*kib)
	base := f.snapshot("vm-e")
	f.write("vm-e", "e.img", 1*mib, 64*kib)
	target := f.snapshot("vm-e")
	m := f.mount()
	disk := m.path("vms", "vm-e", "snapshots", target, "disk.img")
	outside := filepath.Join(t.TempDir(), "plain.img")
	require.NoError(t, os.WriteFile(outside, []byte("x"), 0o644))

	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"--since", "nosuch", disk}, `vmexportfs: extents --since nosuch: unknown base snapshot "nosuch": this VM's snapshots are `},
		{[]string{outside}, "vmexportfs: extents " + outside + ": not a disk file of a vmexportfs mount\n"},
		{[]string{"--since", base, outside}, "vmexportfs: extents " + outside + ": not a disk file of a vmexportfs mount\n"},
	} {
		code, stdout, stderr := runCommand(append([]string{"extents"}, tc.args...)...)
		assert.Equal(t, 1, code, tc.args)
		assert.Empty(t, stdout)
		assert.True(t, strings.HasPrefix(stderr, tc.msg), "%v: %q", tc.args, stderr)
		assert.NotContains(t, stderr, "@0")
		assert.Equal(t, 1, strings.Count(stderr, "\n"), "one line: %q", stderr)
	}
	_, _, stderr := runCommand("extents", "--since", "nosuch", disk)
	snaps := strings.TrimSpace(stderr[strings.Index(stderr, "snapshots are ")+len("snapshots are "):])
	assert.ElementsMatch(t, []string{base, target}, strings.Split(snaps, ", "))

	code, stdout, stderr := runCommand("extents", "--since", base, disk)
	assert.Equal(t, 0, code, stderr)
	assert.Equal(t, fmt.Sprintf("%d %d\n", 1*mib, 64*kib), stdout)
}

// TestReadOnlyMount: the default mount is rw in the mount table only so
// that mkdir and rmdir can make and delete snapshots; every other change,
// tried with the tools a user has, is refused with EROFS. --read-only and
// -o ro (what mount -r and fstab's ro pass) mount ro, where the kernel
// refuses mkdir too and reads are as before.
func TestReadOnlyMount(t *testing.T) {
	requireTools(t, "touch", "mkdir", "rmdir", "rm", "mv", "ln", "chmod", "truncate", "mkfifo", "setfattr", "cp", "sh")
	f := newFixture(t, coriolistest.Options{})
	f.addVM("vm-r", "r", coriolistest.DiskSpec{Name: "r.img", Device: "xvda", Size: 4 * mib})
	f.write("vm-r", "r.img", 0, 64*kib)
	sid := f.snapshot("vm-r")
	for _, tc := range []struct {
		name     string
		args     []string
		readOnly bool
	}{
		{"default", nil, false},
		{"--read-only", []string{"--read-only"}, true},
		{"-o ro", []string{"-o", "ro"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := f.mount(tc.args...)
			want := "rw"
			if tc.readOnly {
				want = "ro"
			}
			assert.Equal(t, want, mountAccess(t, m.dir), "the mount table")

			snaps := m.path("vms", "vm-r", "snapshots")
			disk := filepath.Join(snaps, sid, "disk.img")
			for _, c := range [][]string{
				{"touch", m.path("new")},
				{"touch", disk},
				{"sh", "-c", `echo x >> "$1"`, "sh", disk},
				{"truncate", "-s", "0", disk},
				{"chmod", "0666", disk},
				{"rm", disk},
				{"mv", disk, filepath.Join(snaps, sid, "moved.img")},
				{"ln", "-s", "disk.img", filepath.Join(snaps, sid, "link")},
				{"ln", disk, filepath.Join(snaps, sid, "hard")},
				{"mkfifo", filepath.Join(snaps, sid, "fifo")},
				{"setfattr", "-n", "user.x", "-v", "1", disk},
				{"mkdir", m.path("vms", "vm-r", "other")},
			} {
				_, err := toolErr(c[0], c[1:]...)
				require.Error(t, err, c)
				assert.Contains(t, err.Error(), "Read-only file system", c)
			}

			_, err := toolErr("mkdir", filepath.Join(snaps, "nightly"))
			if tc.readOnly {
				require.Error(t, err)
				assert.Contains(t, err.Error(), "Read-only file system")
			} else {
				require.NoError(t, err, "mkdir takes a snapshot")
				assert.DirExists(t, filepath.Join(snaps, "nightly"))
				tool(t, "rmdir", filepath.Join(snaps, "nightly"))
			}

			copied := filepath.Join(t.TempDir(), "disk.img")
			tool(t, "cp", "--sparse=always", disk, copied)
			assert.Equal(t, sha256File(t, f.source("vm-r", sid, "r.img")), sha256File(t, copied))
		})
	}

	t.Run("fstab ro", func(t *testing.T) {
		requireTools(t, "mount", "umount")
		bin := t.TempDir()
		require.NoError(t, os.Symlink(os.Args[0], filepath.Join(bin, "vmexportfs")))
		mnt := t.TempDir()
		opts := "ro,username=admin,password_file=" + f.passwordFile + ",ca_file=" + f.sim.CAFile() +
			",state_dir=" + f.stateDir + ",cache_dir=" + f.cacheDir
		cmd := exec.Command("mount", "-t", "fuse", "-o", opts, filepath.Join(bin, "vmexportfs")+"#coriolis+"+f.sim.URL(), mnt)
		cmd.Env = append(os.Environ(), asCommandEnv+"=1")
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, string(out))
		t.Cleanup(func() { unmountDaemon(t, mnt) })
		assert.Equal(t, "ro", mountAccess(t, mnt))
		_, err = toolErr("mkdir", filepath.Join(mnt, "vms", "vm-r", "snapshots", "nightly"))
		require.Error(t, err)
		assert.Contains(t, err.Error(), "Read-only file system")
	})
}

// mountAccess is "ro" or "rw", as the mount table has the mount at dir.
func mountAccess(t *testing.T, dir string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	require.NoError(t, err)
	for line := range strings.Lines(string(b)) {
		// mount ID, parent ID, major:minor, root, mount point, options, ...
		f := strings.Fields(line)
		if len(f) > 5 && f[4] == dir {
			return strings.Split(f[5], ",")[0]
		}
	}
	t.Fatalf("%s is not in the mount table", dir)
	return ""
}

// TestDemoHelpListsItsFlags: `demo --help` lists exactly the flags that
// apply to a demo, with the demo's defaults; the mount flags the demo sets
// itself (the simulator's credentials and CA, a platform's own flags, -o)
// are neither listed nor accepted.
func TestDemoHelpListsItsFlags(t *testing.T) {
	code, help, stderr := runCommand("demo", "--help")
	require.Equal(t, 0, code, stderr)
	flagsPart := help[strings.Index(help, "\nFlags:\n"):]
	var listed []string
	for _, m := range regexp.MustCompile(`(?m)^ +(?:-\w, )?--([a-z-]+)`).FindAllStringSubmatch(flagsPart, -1) {
		listed = append(listed, m[1])
	}
	assert.ElementsMatch(t, []string{
		"platform", "dataset", "data-dir", "serve-only", "env-file",
		"foreground", "allow-other", "read-only", "cache-size", "state-dir", "cache-dir", "list-ttl",
		"read-timeout", "retries", "log-level", "log-format", "log-file", "metrics-addr", "progress-interval", "debug",
	}, listed)
	assert.Contains(t, help, "(default DATA-DIR/state)")
	assert.Contains(t, help, "(default DATA-DIR/cache)")
	assert.Contains(t, help, "else "+filepath.Join(os.TempDir(), "vmexportfs-demo.log")+")")

	// A mountpoint that does not exist: were a flag accepted, the demo
	// would stop there (exit 1) instead of mounting.
	mnt := filepath.Join(t.TempDir(), "absent")
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"--username", "u"}, "demo: --username is not a demo flag"},
		{[]string{"--password-file", "pw"}, "demo: --password-file is not a demo flag"},
		{[]string{"--ca-file", "ca.pem"}, "demo: --ca-file is not a demo flag"},
		{[]string{"--insecure-skip-tls-verify"}, "demo: --insecure-skip-tls-verify is not a demo flag"},
		{[]string{"--platform", "kubevirt", "--kubeconfig", "kc"}, "demo: --kubeconfig is not a demo flag"},
		{[]string{"-o", "ro"}, "demo: -o is for platform mounts"},
	} {
		code, _, stderr := runCommand(append(append([]string{"demo"}, tc.args...), mnt)...)
		assert.Equal(t, 2, code, tc.args)
		assert.Contains(t, stderr, tc.msg, tc.args)
	}
}
