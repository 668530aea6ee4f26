package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/qemutest"
	"github.com/vmexportfs/vmexportfs/backend/s3/s3test"
)

// s3Platform is a bucket of images in a real S3 server (versitygw): a VM is
// one QCOW2 object, made by qemu-img from the live disk at each snapshot,
// which replaces the object (a bucket keeps one version of an image). The
// mount reaches the server through a TCP relay that counts the bytes the
// server sends (TLS and HTTP framing included), since SigV4 signs the
// host and an HTTP proxy would have to re-sign.
type s3Platform struct {
	srv      *s3test.Server
	relay    *byteRelay
	files    *s3Mount
	dir      string
	cacheDir string
	live     map[string][]byte
	images   map[string]string // VM → the QCOW2 its object holds
}

func newS3Platform(t *testing.T) *s3Platform {
	t.Helper()
	requireTools(t, "qemu-img")
	m := newS3Mount(t)
	return &s3Platform{srv: m.srv, relay: startRelay(t, hostPort(m.srv.Endpoint())), files: m, dir: t.TempDir(), cacheDir: t.TempDir(), live: map[string][]byte{}, images: map[string]string{}}
}

func hostPort(endpoint string) string { return endpoint[len("https://"):] }

func (s *s3Platform) Caps() caps {
	// One snapshot per image: no delta between two of them.
	return caps{allocationMap: true, oneSnapshot: true}
}

func (s *s3Platform) AddVM(t *testing.T, vm string, disks ...diskSpec) {
	require.Len(t, disks, 1, "an image in a bucket is one disk")
	s.live[vm] = make([]byte, (disks[0].size+511)/512*512)
}

func (s *s3Platform) Write(t *testing.T, vm, _ string, off, n int64) {
	// Deterministic, different at every offset, not compressible to zero.
	for i := int64(0); i < n; i++ {
		s.live[vm][off+i] = byte((off+i)*7/3 + 1)
	}
}

func (s *s3Platform) Discard(t *testing.T, vm, _ string, off, n int64) {
	clear(s.live[vm][off : off+n])
}

// Snapshot converts the live disk and puts it as object vm; its name, the
// object's, is what the mount shows.
func (s *s3Platform) Snapshot(t *testing.T, vm string) string {
	img, err := qemutest.QCOW2(s.dir, s.live[vm])
	require.NoError(t, err)
	s.images[vm] = img
	data, err := os.ReadFile(img)
	require.NoError(t, err)
	require.NoError(t, s.srv.Client(t).Put(context.Background(), "vmimages", "exports/"+vm, bytes.NewReader(data), int64(len(data))))
	return vm
}

func (s *s3Platform) Snapshots(t *testing.T, vm string) []string { return []string{vm} }

// Reference is qemu-img convert -O raw of the object as the bucket has it.
func (s *s3Platform) Reference(t *testing.T, vm, _, _ string) string {
	raw, err := qemutest.Raw(t.TempDir(), s.images[vm])
	require.NoError(t, err)
	return raw
}

func (s *s3Platform) MountArgs() []string {
	return []string{"--s3-access-key-file", s.files.accessFile, "--s3-secret-key-file", s.files.secretKey,
		"--s3-region", s.srv.Region(), "--ca-file", s.files.caFile, "--state-dir", s.dir, "--cache-dir", s.cacheDir,
		"s3+https://" + s.relay.addr() + "/vmimages/exports"}
}

func (s *s3Platform) CacheDir() string { return s.cacheDir }

func (s *s3Platform) DiskBytes() int64 { return s.relay.served.Load() }

// byteRelay forwards TCP to a server and counts the connections and what
// the server sends.
type byteRelay struct {
	ln     net.Listener
	conns  atomic.Int64
	served atomic.Int64
	wg     sync.WaitGroup
}

func startRelay(t *testing.T, target string) *byteRelay {
	return startRelayOn(t, "127.0.0.1", target)
}

// startRelayOn listens on host (a loopback address), on a free port.
func startRelayOn(t *testing.T, host, target string) *byteRelay {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	require.NoError(t, err)
	r := &byteRelay{ln: ln}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			r.conns.Add(1)
			r.wg.Add(1)
			go func() {
				defer r.wg.Done()
				defer c.Close()
				up, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer up.Close()
				go func() { _, _ = io.Copy(up, c); up.(*net.TCPConn).CloseWrite() }()
				_, _ = io.Copy(countingWriter{c, &r.served}, up)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return r
}

func (r *byteRelay) addr() string { return r.ln.Addr().String() }

// countingWriter counts as it writes: kept-alive connections last the
// whole mount.
type countingWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	return n, err
}
