package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/internal/testpki"
	"github.com/vmexportfs/vmexportfs/backend/retry"
	"github.com/vmexportfs/vmexportfs/backend/testenv"
)

// fastPolicy keeps failing tests quick.
var fastPolicy = retry.Policy{Attempts: 3, BaseDelay: time.Millisecond, MaxDelay: 5 * time.Millisecond, AttemptTimeout: 10 * time.Second}

// sparseImage writes a raw image with random data in some ranges and holes
// elsewhere; it returns the path, the content and the data ranges.
func sparseImage(t *testing.T) (string, []byte, []extent.Extent) {
	t.Helper()
	const size = 9<<20 + 3*4096
	content := make([]byte, size)
	data := []extent.Extent{{Off: 0, Len: 64 << 10}, {Off: 1 << 20, Len: 3<<20 + 4096}, {Off: 7 << 20, Len: 512 << 10}, {Off: size - 8192, Len: 8192}}
	path := filepath.Join(t.TempDir(), "disk.raw")
	f, err := os.Create(path)
	require.NoError(t, err)
	defer f.Close()
	require.NoError(t, f.Truncate(size))
	for _, e := range data {
		_, _ = rand.Read(content[e.Off:e.End()])
		_, err := f.WriteAt(content[e.Off:e.End()], e.Off)
		require.NoError(t, err)
	}
	return path, content, data
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startServer runs a server in the foreground until the test ends and
// waits for its port.
func startServer(t *testing.T, bin string, args ...string) {
	t.Helper()
	testenv.RequireTool(t, bin)
	var out bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, cmd.Start())
	var once sync.Once
	t.Cleanup(func() {
		once.Do(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		if t.Failed() {
			t.Logf("%s output:\n%s", bin, out.String())
		}
	})
	addr := ""
	for i, a := range args {
		if (a == "-p" || a == "--port") && i+1 < len(args) {
			addr = "127.0.0.1:" + args[i+1]
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not listen on %s: %v\n%s", bin, addr, err, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// writePKI writes the files nbdkit and qemu-nbd read from a certificate
// directory and returns the directory and the CA.
func writePKI(t *testing.T) (string, *testpki.CA) {
	t.Helper()
	ca, err := testpki.NewCA("nbd test CA")
	require.NoError(t, err)
	leaf, err := ca.Issue(testpki.Loopback())
	require.NoError(t, err)
	dir := t.TempDir()
	key, err := x509.MarshalPKCS8PrivateKey(leaf.PrivateKey)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "ca-cert.pem"), ca.PEM(), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "server-cert.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Certificate[0]}), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "server-key.pem"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}), 0o600))
	return dir, ca
}

// checkDisk reads the whole disk in uneven pieces, concurrently, and
// compares with content by checksum, then checks the allocation map.
func checkDisk(t *testing.T, cl *Client, content []byte, data []extent.Extent, wantStatus bool) {
	t.Helper()
	ctx := context.Background()
	require.Equal(t, int64(len(content)), cl.Size())
	got := make([]byte, len(content))
	// Unaligned piece sizes exercise widening and trimming; many at once
	// exercise the pool.
	const piece = 777_777
	var wg sync.WaitGroup
	errs := make(chan error, len(content)/piece+1)
	for off := 0; off < len(content); off += piece {
		n := min(piece, len(content)-off)
		wg.Go(func() { errs <- cl.ReadAt(ctx, got[off:off+n], int64(off)) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.Equal(t, sha256.Sum256(content), sha256.Sum256(got), "bytes read differ from the image")

	// Small unaligned reads at edges.
	for _, r := range [][2]int{{1, 1}, {511, 2}, {4095, 4098}, {len(content) - 1, 1}, {len(content) - 1000, 1000}} {
		p := make([]byte, r[1])
		require.NoError(t, cl.ReadAt(ctx, p, int64(r[0])))
		require.Equal(t, content[r[0]:r[0]+r[1]], p, "read [%d,+%d)", r[0], r[1])
	}
	require.ErrorIs(t, cl.ReadAt(ctx, make([]byte, 2), int64(len(content)-1)), backend.ErrInvalid)

	require.Equal(t, wantStatus, cl.BlockStatus(), "block status negotiated")
	m := cl.Allocated()
	if !wantStatus {
		require.Equal(t, extent.Full(cl.Size()), m)
		return
	}
	// Every data range must be in the map; the map may be coarser (file
	// system blocks), but must leave out most of the holes.
	for _, e := range data {
		require.True(t, m.Contains(e.Off, e.Len), "data %v not in map %v", e, m.Extents())
	}
	require.Less(t, m.Bytes(), cl.Size()/2, "holes not reported: %v", m.Extents())
}

func TestNbdkit(t *testing.T) {
	path, content, data := sparseImage(t)
	for _, tc := range []struct {
		name       string
		args       []string
		structured bool
	}{
		{"sr", nil, true},
		{"no-sr", []string{"--no-sr"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			port := freePort(t)
			args := append([]string{"-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", strconv.Itoa(port), "-r"}, tc.args...)
			startServer(t, "nbdkit", append(args, "file", "file="+path)...)
			cl, err := Dial(context.Background(), Options{Addr: fmt.Sprintf("127.0.0.1:%d", port), Policy: fastPolicy})
			require.NoError(t, err)
			defer cl.Close()
			require.Equal(t, tc.structured, cl.Structured())
			checkDisk(t, cl, content, data, tc.structured)
		})
	}
}

func TestNbdkitClientNoStructured(t *testing.T) {
	path, content, data := sparseImage(t)
	port := freePort(t)
	startServer(t, "nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", strconv.Itoa(port), "-r", "file", "file="+path)
	cl, err := Dial(context.Background(), Options{Addr: fmt.Sprintf("127.0.0.1:%d", port), NoStructured: true, Connections: 2, InFlight: 2, Policy: fastPolicy})
	require.NoError(t, err)
	defer cl.Close()
	checkDisk(t, cl, content, data, false)
}

func TestQemuNbd(t *testing.T) {
	path, content, data := sparseImage(t)
	port := freePort(t)
	startServer(t, "qemu-nbd", "-f", "raw", "-r", "-t", "-e", "16", "-b", "127.0.0.1", "-p", strconv.Itoa(port), "-x", "disk0", path)
	cl, err := Dial(context.Background(), Options{Addr: fmt.Sprintf("127.0.0.1:%d", port), Export: "disk0", Policy: fastPolicy})
	require.NoError(t, err)
	defer cl.Close()
	require.True(t, cl.Structured())
	checkDisk(t, cl, content, data, true)

	// An unknown export is not found, and not retried.
	_, err = Dial(context.Background(), Options{Addr: fmt.Sprintf("127.0.0.1:%d", port), Export: "nope", Policy: fastPolicy})
	require.ErrorIs(t, err, backend.ErrNotFound)
}

func tlsConfig(ca *testpki.CA, name string) *tls.Config {
	return &tls.Config{RootCAs: ca.Pool(), ServerName: name}
}

func TestNbdkitTLS(t *testing.T) {
	path, content, data := sparseImage(t)
	dir, ca := writePKI(t)
	for _, sr := range []bool{true, false} {
		t.Run(fmt.Sprintf("sr=%v", sr), func(t *testing.T) {
			port := freePort(t)
			args := []string{"-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", strconv.Itoa(port), "-r", "--tls=require", "--tls-certificates=" + dir}
			if !sr {
				args = append(args, "--no-sr")
			}
			startServer(t, "nbdkit", append(args, "file", "file="+path)...)
			addr := fmt.Sprintf("127.0.0.1:%d", port)
			cl, err := Dial(context.Background(), Options{Addr: addr, TLS: tlsConfig(ca, "localhost"), Policy: fastPolicy})
			require.NoError(t, err)
			checkDisk(t, cl, content, data, sr)
			require.NoError(t, cl.Close())
			require.Error(t, cl.ReadAt(context.Background(), make([]byte, 512), 0), "read after Close")
			refusals(t, addr, ca)
		})
	}
}

// refusals: a CA that did not sign the server's certificate, the system
// pool, a name the certificate does not carry, and no TLS at all.
func refusals(t *testing.T, addr string, ca *testpki.CA) {
	t.Helper()
	other, err := testpki.NewCA("other CA")
	require.NoError(t, err)
	for name, cfg := range map[string]*tls.Config{
		"wrong CA":    tlsConfig(other, "localhost"),
		"system pool": {ServerName: "localhost"},
		"wrong name":  tlsConfig(ca, "xapi.example"),
	} {
		start := time.Now()
		_, err := Dial(context.Background(), Options{Addr: addr, TLS: cfg, Policy: fastPolicy})
		require.ErrorIs(t, err, backend.ErrPermission, name)
		var cv *tls.CertificateVerificationError
		require.True(t, errors.As(err, &cv), "%s: %v", name, err)
		require.Less(t, time.Since(start), 2*time.Second, "%s retried", name)
	}
	// Without TLS the server refuses every option: no export.
	_, err = Dial(context.Background(), Options{Addr: addr, Policy: fastPolicy})
	require.Error(t, err)
	// TLS 1.1 is not allowed by the client whatever the config says.
	_, err = Dial(context.Background(), Options{Addr: addr, TLS: &tls.Config{RootCAs: ca.Pool(), ServerName: "localhost", MaxVersion: tls.VersionTLS11}, Policy: fastPolicy})
	require.Error(t, err)
}

func TestQemuNbdTLS(t *testing.T) {
	path, content, data := sparseImage(t)
	dir, ca := writePKI(t)
	port := freePort(t)
	startServer(t, "qemu-nbd", "-f", "raw", "-r", "-t", "-e", "16", "-b", "127.0.0.1", "-p", strconv.Itoa(port), "-x", "disk0",
		"--object", "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir="+dir, "--tls-creds", "tls0", path)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	cl, err := Dial(context.Background(), Options{Addr: addr, Export: "disk0", TLS: tlsConfig(ca, "localhost"), Policy: fastPolicy})
	require.NoError(t, err)
	defer cl.Close()
	checkDisk(t, cl, content, data, true)
	other, err := testpki.NewCA("other CA")
	require.NoError(t, err)
	_, err = Dial(context.Background(), Options{Addr: addr, Export: "disk0", TLS: tlsConfig(other, "localhost"), Policy: fastPolicy})
	require.ErrorIs(t, err, backend.ErrPermission)
	_, err = Dial(context.Background(), Options{Addr: addr, Export: "disk0", TLS: tlsConfig(ca, "xapi.example"), Policy: fastPolicy})
	require.ErrorIs(t, err, backend.ErrPermission)
}

// TestHostLimit: clients sharing a host limit never hold more connections
// than it allows, and still read.
func TestHostLimit(t *testing.T) {
	path, content, data := sparseImage(t)
	port := freePort(t)
	startServer(t, "nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", strconv.Itoa(port), "-r", "file", "file="+path)
	host := NewHostLimit(3)
	var cls []*Client
	for range 3 {
		cl, err := Dial(context.Background(), Options{Addr: fmt.Sprintf("127.0.0.1:%d", port), Host: host, Connections: 1, Policy: fastPolicy})
		require.NoError(t, err)
		cls = append(cls, cl)
	}
	require.Len(t, host.sem, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := Dial(ctx, Options{Addr: fmt.Sprintf("127.0.0.1:%d", port), Host: host, Policy: fastPolicy})
	require.Error(t, err, "a fourth connection past the host limit")
	checkDisk(t, cls[0], content, data, true)
	for _, cl := range cls {
		require.NoError(t, cl.Close())
	}
	require.Len(t, host.sem, 0)
}
