package main

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// runVmexportfs runs the command as a user does, in a child process, and
// returns its exit status and everything it printed.
func runVmexportfs(t *testing.T, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], args...)
	cmd.Env = append(os.Environ(), asCommandEnv+"=1")
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("vmexportfs %s: %v", strings.Join(args, " "), err)
	}
	return cmd.ProcessState.ExitCode(), string(out)
}

// lastLine is the command's own message: with -f, log lines come first.
func lastLine(out string) string {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	return lines[len(lines)-1]
}

// plainListener is a local TCP server that records every connection made
// to it and the bytes sent over it: what a plain-http source would leak.
type plainListener struct {
	ln    net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns int
	got   []byte
}

func startPlainListener(t *testing.T) *plainListener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	l := &plainListener{ln: ln}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			l.mu.Lock()
			l.conns++
			l.mu.Unlock()
			// A client that sent a request waits for the answer: read
			// what it sent, then hang up so it gives up.
			_ = c.SetReadDeadline(time.Now().Add(time.Second))
			b, _ := io.ReadAll(c)
			c.Close()
			l.mu.Lock()
			l.got = append(l.got, b...)
			l.mu.Unlock()
		}
	}()
	t.Cleanup(func() { ln.Close(); l.wg.Wait() })
	return l
}

// seen stops listening and returns what reached the listener. The command
// has exited: any connection it made was accepted before it could send, so
// none is lost by closing now.
func (l *plainListener) seen() (int, []byte) {
	l.ln.Close()
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.conns, l.got
}

func (l *plainListener) addr() string { return l.ln.Addr().String() }

// TestPlainHTTPSourceRefused: a source that would speak plain http (or no
// HTTP at all) is a bad invocation whatever the platform: exit 2 with the
// reason, before the command daemonizes, and nothing reaches the address,
// least of all the password.
func TestPlainHTTPSourceRefused(t *testing.T) {
	const password = "cleartext-pa55word-7e1f"
	dir := t.TempDir()
	pw := filepath.Join(dir, "password")
	require.NoError(t, os.WriteFile(pw, []byte(password+"\n"), 0o600))
	key := filepath.Join(dir, "secret-key")
	require.NoError(t, os.WriteFile(key, []byte(password+"\n"), 0o600))
	plain := "plain http would send the password, token or keys in cleartext"
	for _, tc := range []struct {
		name string
		args func(addr string) []string // the flags and source, given the listener's address
		want []string
	}{
		{"coriolis", func(a string) []string { return []string{"--username", "admin", "coriolis+http://" + a} },
			[]string{plain, "use coriolis+https://127.0.0.1:"}},
		{"coriolis, scheme in capitals", func(a string) []string { return []string{"--username", "admin", "coriolis+HTTP://" + a} },
			[]string{plain, "use coriolis+https://"}},
		{"coriolis -o", func(a string) []string {
			return []string{"-o", "username=admin,password_file=" + pw, "coriolis+http://" + a}
		},
			[]string{plain}},
		{"xapi", func(a string) []string { return []string{"--username", "root", "xapi+http://" + a} }, []string{plain, "use xapi+https://"}},
		{"ovirt", func(a string) []string { return []string{"--username", "admin@internal", "ovirt+http://" + a} }, []string{plain, "use ovirt+https://"}},
		{"kubevirt", func(a string) []string { return []string{"kubevirt+http://" + a + "/namespaces/vms"} }, []string{plain, "use kubevirt+https://"}},
		{"kubevirt standalone", func(a string) []string {
			return []string{"--token-file", pw, "kubevirt+http://" + a + "/api/export.kubevirt.io/v1beta1/namespaces/vms/virtualmachineexports/e"}
		}, []string{plain}},
		{"s3", func(a string) []string {
			return []string{"--s3-secret-key-file", key, "s3+http://" + a + "/bucket/prefix"}
		}, []string{plain, "use s3+https://"}},
		{"jdcloud", func(a string) []string {
			return []string{"--jdcloud-secret-key-file", key, "--oss-url", "https://b.s3.cn-north-1.jdcloud-oss.com", "jdcloud+http://" + a + "/v1/regions/cn-north-1"}
		}, []string{plain, "use jdcloud+https://"}},
		// The exports of JD Cloud are read from a second endpoint, with
		// signed requests too.
		{"jdcloud --oss-endpoint", func(a string) []string {
			return []string{"--jdcloud-secret-key-file", key, "--oss-url", "https://b.s3.cn-north-1.jdcloud-oss.com", "--oss-endpoint", "http://" + a,
				"jdcloud+https://127.0.0.1:1/v1/regions/cn-north-1"}
		}, []string{"--oss-endpoint", "plain http would send the signed requests"}},
		// No platform speaks anything but HTTPS to its API.
		{"nbd", func(a string) []string { return []string{"--username", "root", "xapi+nbd://" + a} }, []string{"want PLATFORM+https://"}},
		{"no transport", func(a string) []string { return []string{"--username", "admin", "coriolis://" + a} }, []string{"want PLATFORM+https://"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := startPlainListener(t)
			// Daemon mode: a refusal must come before the fork.
			args := append([]string{"--password-file", pw, "--state-dir", t.TempDir(), "--cache-dir", t.TempDir(), "--retries", "1"},
				tc.args(l.addr())...)
			code, out := runVmexportfs(t, append(args, t.TempDir())...)
			assert.Equal(t, 2, code, out)
			t.Logf("the user reads: %s", lastLine(out))
			for _, want := range tc.want {
				assert.Contains(t, lastLine(out), want)
			}
			assert.NotContains(t, out, password)
			conns, got := l.seen()
			assert.Zero(t, conns, "the command connected to the plain listener")
			assert.NotContains(t, string(got), password)
		})
	}
}
