package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
	"github.com/vmexportfs/vmexportfs/backend/ovirt/ovirttest"
	"github.com/vmexportfs/vmexportfs/backend/xapi/xapitest"
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

// throughCounter replaces the host of the source (the last argument) with
// a counting relay on host and returns the new arguments and the relay.
// The relay counts connections: one per handshake the client attempts,
// since a client reaches the server's certificate only through one.
func throughCounter(t *testing.T, args []string, host string) ([]string, *byteRelay) {
	t.Helper()
	src := args[len(args)-1]
	u, err := url.Parse(src)
	require.NoError(t, err, src)
	r := startRelayOn(t, host, u.Host)
	u.Host = r.ln.Addr().String()
	return append(append([]string{}, args[:len(args)-1]...), u.String()), r
}

// foreignCA writes the PEM of a CA that signed none of the simulators'
// certificates.
func foreignCA(t *testing.T) (path string, pemBytes []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "someone else's CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	pemBytes = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	path = filepath.Join(t.TempDir(), "foreign-ca.pem")
	require.NoError(t, os.WriteFile(path, pemBytes, 0o600))
	return path, pemBytes
}

// withFlag returns args with the value of flag replaced.
func withFlag(t *testing.T, args []string, flag, value string) []string {
	t.Helper()
	out := append([]string{}, args...)
	for i := range out[:len(out)-1] {
		if out[i] == flag {
			out[i+1] = value
			return out
		}
	}
	t.Fatalf("no %s in %q", flag, args)
	return nil
}

// TestUntrustedCertificateFailsAtOnce: a server whose certificate does not
// verify fails the mount on the first handshake, on every platform, with
// what x509 said and what to do about it: no retries (the same certificate
// would come back), no "backend unavailable".
func TestUntrustedCertificateFailsAtOnce(t *testing.T) {
	requireRoot(t)
	caFile, caPEM := foreignCA(t)
	for _, tc := range []struct {
		name  string
		host  string // where the relay listens
		setup func(t *testing.T) []string
		want  []string
	}{
		{"coriolis, unknown authority", "127.0.0.1", func(t *testing.T) []string {
			f := newFixture(t, coriolistest.Options{})
			return withFlag(t, append(f.mountArgs(), "coriolis+"+f.sim.URL()), "--ca-file", caFile)
		}, []string{"x509: certificate signed by unknown authority", "pass --ca-file with the platform's CA"}},
		// The simulator's certificate is for localhost, 127.0.0.1 and ::1.
		{"coriolis, name mismatch", "127.0.0.2", func(t *testing.T) []string {
			f := newFixture(t, coriolistest.Options{})
			return append(f.mountArgs(), "coriolis+"+f.sim.URL())
		}, []string{"x509: certificate is valid for", "not 127.0.0.2", "reach the server by a name its certificate is valid for"}},
		{"xapi", "127.0.0.1", func(t *testing.T) []string {
			return withFlag(t, newXapi(t, xapitest.Options{}).MountArgs(), "--ca-file", caFile)
		}, []string{"x509: certificate signed by unknown authority", "pass --ca-file with the platform's CA"}},
		{"ovirt", "127.0.0.1", func(t *testing.T) []string {
			return withFlag(t, newOVirt(t, ovirttest.Options{}).MountArgs(), "--ca-file", caFile)
		}, []string{"x509: certificate signed by unknown authority", "pass --ca-file with the platform's CA"}},
		{"s3", "127.0.0.1", func(t *testing.T) []string {
			return withFlag(t, newS3Platform(t).MountArgs(), "--ca-file", caFile)
		}, []string{"x509: certificate signed by unknown authority", "pass --ca-file with the platform's CA"}},
		{"jdcloud", "127.0.0.1", func(t *testing.T) []string {
			return withFlag(t, newJDCloud(t).MountArgs(), "--ca-file", caFile)
		}, []string{"x509: certificate signed by unknown authority", "pass --ca-file with the platform's CA"}},
		// The API server's CA comes from the kubeconfig, not --ca-file.
		{"kubevirt", "127.0.0.1", func(t *testing.T) []string {
			f := newKVFixture(t)
			kc, err := os.ReadFile(f.kubeconfig)
			require.NoError(t, err)
			good := base64.StdEncoding.EncodeToString(f.sim.CAPEM())
			require.Contains(t, string(kc), good)
			require.NoError(t, os.WriteFile(f.kubeconfig, []byte(strings.ReplaceAll(string(kc), good, base64.StdEncoding.EncodeToString(caPEM))), 0o600))
			return f.mountArgs()
		}, []string{"x509: certificate signed by unknown authority", "the kubeconfig's certificate-authority must be the API server's CA"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args, relay := throughCounter(t, tc.setup(t), tc.host)
			code, out := runVmexportfs(t, append(append([]string{"-f"}, args...), t.TempDir())...)
			assert.Equal(t, 1, code, out)
			msg := lastLine(out)
			t.Logf("the user reads: %s", msg)
			for _, want := range tc.want {
				assert.Contains(t, msg, want)
			}
			assert.NotContains(t, msg, "backend unavailable")
			assert.NotContains(t, out, "retry: retrying")
			assert.EqualValues(t, 1, relay.conns.Load(), "TLS handshakes the server saw:\n%s", out)
		})
	}
}
