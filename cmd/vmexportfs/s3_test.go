package main

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/s3/s3test"
)

// s3Mount is a real S3 server (versitygw) with the qcow2 fixtures under
// exports/, and the files a mount of it needs.
type s3Mount struct {
	srv                   *s3test.Server
	accessFile, secretKey string
	caFile                string
	want                  map[string]string // fixture name → sha256 of qemu-img convert -O raw
}

func newS3Mount(t *testing.T) *s3Mount {
	t.Helper()
	requireRoot(t)
	srv := s3test.Start(t, s3test.Options{Buckets: []string{"vmimages"}})
	dir := t.TempDir()
	m := &s3Mount{srv: srv, accessFile: filepath.Join(dir, "access"), secretKey: filepath.Join(dir, "secret"), caFile: filepath.Join(dir, "ca.pem"), want: map[string]string{}}
	require.NoError(t, os.WriteFile(m.accessFile, []byte(srv.AccessKey()+"\n"), 0o600))
	require.NoError(t, os.WriteFile(m.secretKey, []byte(srv.SecretKey()+"\n"), 0o600))
	require.NoError(t, os.WriteFile(m.caFile, srv.CAPEM(), 0o600))
	sums, err := os.ReadFile("../../testdata/qcow2/SHA256SUMS")
	require.NoError(t, err)
	client := srv.Client(t)
	for sc := bufio.NewScanner(bytes.NewReader(sums)); sc.Scan(); {
		f := strings.Fields(sc.Text())
		name := strings.TrimSuffix(f[1], ".raw")
		data, err := os.ReadFile(filepath.Join("../../testdata/qcow2", name+".qcow2"))
		require.NoError(t, err)
		require.NoError(t, client.Put(context.Background(), "vmimages", "exports/"+name+".qcow2", bytes.NewReader(data), int64(len(data))))
		m.want[name+".qcow2"] = f[0]
	}
	return m
}

func (m *s3Mount) args(secretFile string) []string {
	return []string{"--s3-access-key-file", m.accessFile, "--s3-secret-key-file", secretFile, "--s3-region", m.srv.Region(),
		"--ca-file", m.caFile, "--state-dir", "", "s3+" + m.srv.Endpoint() + "/vmimages/exports"}
}

// TestS3Bucket mounts a real S3 bucket of qemu-img-made QCOW2 images: each
// is a VM whose disk.img copies (cp --sparse, qemu-img convert) to exactly
// qemu-img convert -O raw of the object, with its holes reported, and its
// disk.img.gz passes gzip -t.
func TestS3Bucket(t *testing.T) {
	requireTools(t, "cp", "qemu-img", "gzip")
	m := newS3Mount(t)
	dir := filepath.Join(t.TempDir(), "mnt")
	require.NoError(t, os.Mkdir(dir, 0o755))
	args := m.args(m.secretKey)
	args[len(args)-2] = t.TempDir() // --state-dir
	mnt := startCommand(t, append(append([]string{"-f", "--cache-dir", t.TempDir()}, args...), dir)...)
	mnt.dir = dir
	names := strings.Fields(tool(t, "ls", mnt.path("by-name")))
	require.Len(t, names, len(m.want), "one VM per image")
	for name, want := range m.want {
		t.Run(name, func(t *testing.T) {
			snaps := strings.Fields(tool(t, "ls", mnt.path("by-name", name, "snapshots")))
			require.Equal(t, []string{name}, snaps, "one snapshot, named after the object")
			img := mnt.path("by-name", name, "snapshots", name, "disk.img")
			out := filepath.Join(t.TempDir(), "copy")
			tool(t, "cp", "--sparse=always", img, out)
			assert.Equal(t, want, sha256File(t, out), "cp --sparse")
			converted := filepath.Join(t.TempDir(), "converted")
			tool(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", img, converted)
			assert.Equal(t, want, sha256File(t, converted), "qemu-img convert")
			var st syscall.Stat_t
			require.NoError(t, syscall.Stat(img, &st))
			assert.Less(t, st.Blocks*512, st.Size, "st_blocks counts only allocated clusters")
			tool(t, "gzip", "-t", mnt.path("by-name", name, "snapshots", name, "disk.img.gz"))
		})
	}
}

// TestS3WrongSecret: a wrong secret key fails the mount (exit 1) with a
// line that says the credentials were refused and holds no secret.
func TestS3WrongSecret(t *testing.T) {
	m := newS3Mount(t)
	bad := filepath.Join(t.TempDir(), "bad")
	require.NoError(t, os.WriteFile(bad, []byte("wrong-secret-key-0000000000000000000000"), 0o600))
	dir := t.TempDir()
	args := m.args(bad)
	args[len(args)-2] = t.TempDir()
	out, err := runTool(os.Args[0], append(append([]string{"-f"}, args...), dir), asCommandEnv+"=1")
	require.Error(t, err, out)
	assert.Contains(t, err.Error(), "exit status 1")
	assert.Contains(t, err.Error(), "permission denied")
	for _, secret := range []string{"wrong-secret-key-0000000000000000000000", m.srv.SecretKey()} {
		assert.NotContains(t, err.Error()+out, secret)
	}
}
