// Package s3test starts a real S3 server for tests: versitygw v1.8.0 (the
// server the recorded probes in testdata/s3-versitygw came from), with its
// posix backend in a temporary directory, TLS from a fresh test CA, SigV4
// and region cn-east-2, bound to 127.0.0.1.
//
// versitygw lives in its own Go module (./gateway, as a go.mod tool) so that
// its heavy dependencies never reach the main module. The binary is built by
// `go tool -n`, which links it once into Go's build cache and prints its
// path: later test processes reuse it in a fraction of a second.
package s3test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmexportfs/vmexportfs/backend/internal/testpki"
	"github.com/vmexportfs/vmexportfs/backend/retry"
	"github.com/vmexportfs/vmexportfs/backend/s3"
	"github.com/vmexportfs/vmexportfs/backend/testenv"
)

// Region is the region the server runs in, as the recordings did.
const Region = "cn-east-2"

// Default keys; like the recorder's, they are throwaway.
const (
	DefaultAccessKey = "RS3TESTACCESSKEY0001"
	DefaultSecretKey = "s3test-secret-9f2c1e7b5a3d4c6e8f0a1b2c3d4e5f60"
)

// Options configures a server.
type Options struct {
	Buckets              []string // made empty at start
	AccessKey, SecretKey string   // "" means the defaults
	// NoKeepAlive starts versitygw without --keep-alive (its default): every
	// answer then has Connection: close.
	NoKeepAlive bool
}

// Server is a running versitygw.
type Server struct {
	endpoint string
	ak, sk   string
	ca       *testpki.CA
	cmd      *exec.Cmd
	done     chan struct{}
	logs     *lockedWriter // versitygw's output, for failure messages
	once     sync.Once
}

// binary is the built versitygw, shared by every Start of a test process:
// asking go again costs a quarter second each time, for nothing.
var binary struct {
	once    sync.Once
	path    string
	err     error
	missing string // what the machine lacks to build it
}

func buildBinary() (path, missing string, err error) {
	binary.once.Do(func() {
		goCmd, lerr := exec.LookPath("go")
		if lerr != nil {
			cand := filepath.Join(runtime.GOROOT(), "bin", "go")
			if _, serr := os.Stat(cand); serr != nil {
				binary.missing = "the go command (it builds versitygw)"
				return
			}
			goCmd = cand
		}
		_, self, _, _ := runtime.Caller(0)
		dir := filepath.Join(filepath.Dir(self), "gateway")
		cmd := exec.Command(goCmd, "tool", "-n", "github.com/versity/versitygw/cmd/versitygw")
		cmd.Dir = dir
		// The gateway is its own module: no workspace, no inherited
		// -mod=vendor or the like from the caller's flags.
		cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, rerr := cmd.Output()
		if rerr != nil {
			binary.err = fmt.Errorf("s3test: build versitygw in %s: %w: %s", dir, rerr, strings.TrimSpace(stderr.String()))
			return
		}
		binary.path = strings.TrimSpace(string(out))
	})
	return binary.path, binary.missing, binary.err
}

// Start runs a server for the test and stops it when the test ends. It
// fails the test if versitygw cannot be built or started, or if the go
// command that builds it is missing (a skip only with testenv's opt-out).
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	bin, missing, err := buildBinary()
	if missing != "" {
		testenv.Missing(t, missing, "install Go 1.26 or newer and put it in PATH")
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	if opts.AccessKey == "" {
		opts.AccessKey = DefaultAccessKey
	}
	if opts.SecretKey == "" {
		opts.SecretKey = DefaultSecretKey
	}

	// versitygw chdir()s into its root: every path it gets is absolute.
	dir, err := filepath.Abs(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(dir, "root")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	// The posix backend's buckets are its root's directories.
	for _, b := range opts.Buckets {
		if err := os.Mkdir(filepath.Join(root, b), 0o700); err != nil {
			t.Fatalf("s3test: bucket %q: %v", b, err)
		}
	}
	ca, err := testpki.NewCA("s3test CA")
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := writeLeaf(ca, certFile, keyFile); err != nil {
		t.Fatal(err)
	}

	s := &Server{ak: opts.AccessKey, sk: opts.SecretKey, ca: ca, done: make(chan struct{}), logs: &lockedWriter{}}
	// A port can be taken between finding it free and versitygw binding
	// it; a few tries make that race harmless.
	var lastErr error
	for try := 0; try < 5; try++ {
		port, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		addr := net.JoinHostPort("127.0.0.1", fmt.Sprint(port))
		args := []string{"--port", addr, "--region", Region, "--cert", certFile, "--key", keyFile, "--quiet"}
		if !opts.NoKeepAlive {
			args = append(args, "--keep-alive")
		}
		args = append(args, "posix", root)
		if lastErr = s.run(bin, args, addr); lastErr == nil {
			break
		}
	}
	if lastErr != nil {
		t.Fatalf("s3test: start versitygw: %v", lastErr)
	}
	t.Cleanup(s.Close)
	return s
}

func (s *Server) run(bin string, args []string, addr string) error {
	s.logs.reset()
	s.done = make(chan struct{})
	cmd := exec.Command(bin, args...)
	// The keys go in the environment, never argv (visible in ps).
	env := []string{"ROOT_ACCESS_KEY_ID=" + s.ak, "ROOT_SECRET_ACCESS_KEY=" + s.sk}
	for _, kv := range os.Environ() {
		// Our own settings win; any VGW_ setting of the caller's would
		// change the server the recordings describe.
		if !strings.HasPrefix(kv, "VGW_") && !strings.HasPrefix(kv, "ROOT_") {
			env = append(env, kv)
		}
	}
	cmd.Env = env
	cmd.Stdout = s.logs
	cmd.Stderr = s.logs
	if err := cmd.Start(); err != nil {
		return err
	}
	s.cmd = cmd
	go func() {
		_ = cmd.Wait()
		close(s.done)
	}()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-s.done:
			return fmt.Errorf("versitygw exited: %s", s.logsText())
		default:
		}
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			s.endpoint = "https://" + addr
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.kill()
	return fmt.Errorf("versitygw did not listen on %s within 30s: %s", addr, s.logsText())
}

func (s *Server) logsText() string {
	s.logs.mu.Lock()
	defer s.logs.mu.Unlock()
	return strings.TrimSpace(s.logs.w.String())
}

type lockedWriter struct {
	mu sync.Mutex
	w  bytes.Buffer
}

func (l *lockedWriter) reset() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.w.Reset()
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func (s *Server) kill() {
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Kill()
		<-s.done
	}
}

// Close stops the server; Start registers it with t.Cleanup.
func (s *Server) Close() { s.once.Do(s.kill) }

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func writeLeaf(ca *testpki.CA, certFile, keyFile string) error {
	leaf, err := ca.Issue(testpki.Loopback())
	if err != nil {
		return err
	}
	var certPEM []byte
	for _, der := range leaf.Certificate {
		certPEM = append(certPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	key, ok := leaf.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return errors.New("s3test: unexpected key type")
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(certFile, certPEM, 0o600); err != nil {
		return err
	}
	return os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600)
}

func (s *Server) Endpoint() string       { return s.endpoint }
func (s *Server) CAPEM() []byte          { return s.ca.PEM() }
func (s *Server) CAPool() *x509.CertPool { return s.ca.Pool() }
func (s *Server) Region() string         { return Region }
func (s *Server) AccessKey() string      { return s.ak }
func (s *Server) SecretKey() string      { return s.sk }

// Config is a client configuration for this server, with a quick retry
// policy so that tests of failures stay fast.
func (s *Server) Config() s3.Config {
	return s3.Config{
		Endpoint:  s.endpoint,
		Region:    Region,
		AccessKey: s.ak,
		SecretKey: s.sk,
		RootCAs:   s.CAPool(),
		Policy:    retry.Policy{Attempts: 3, BaseDelay: 5 * time.Millisecond, MaxDelay: 50 * time.Millisecond},
	}
}

// Client is a client of this server with Config.
func (s *Server) Client(t testing.TB) *s3.Client {
	t.Helper()
	c, err := s3.New(context.Background(), s.Config())
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// HTTPClient trusts the server's CA, for tests that send raw requests.
func (s *Server) HTTPClient() *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: s.CAPool(), MinVersion: tls.VersionTLS12}
	return &http.Client{Transport: tr}
}
