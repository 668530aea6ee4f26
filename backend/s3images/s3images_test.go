package s3images_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/redact"
	"github.com/vmexportfs/vmexportfs/backend/s3/s3test"
	"github.com/vmexportfs/vmexportfs/backend/s3images"
)

const bucket = "vmimages"

// fixtures are the qemu-img-made images of testdata/qcow2 with the sha256
// of their qemu-img convert -O raw.
func fixtures(t *testing.T) map[string]string {
	f, err := os.Open("../../testdata/qcow2/SHA256SUMS")
	require.NoError(t, err)
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		require.Len(t, fields, 2)
		out[strings.TrimSuffix(fields[1], ".raw")+".qcow2"] = fields[0]
	}
	require.NotEmpty(t, out)
	return out
}

func put(t *testing.T, srv *s3test.Server, key string, data []byte) {
	require.NoError(t, srv.Client(t).Put(context.Background(), bucket, key, bytes.NewReader(data), int64(len(data))))
}

func readAll(t *testing.T, d backend.Disk) []byte {
	buf := make([]byte, d.Size())
	require.NoError(t, d.ReadAt(t.Context(), buf, 0))
	return buf
}

// TestBucketOfImages: every QCOW2 fixture (by magic, whatever its name)
// and a raw image (by name) under the prefix is a VM whose one snapshot
// reads as qemu-img convert -O raw; other objects are not VMs.
func TestBucketOfImages(t *testing.T) {
	srv := s3test.Start(t, s3test.Options{Buckets: []string{bucket}})
	want := fixtures(t)
	for name := range want {
		data, err := os.ReadFile(filepath.Join("../../testdata/qcow2", name))
		require.NoError(t, err)
		put(t, srv, "exports/"+strings.TrimSuffix(name, ".qcow2"), data) // no extension, as JD Cloud names them
	}
	raw := bytes.Repeat([]byte("raw image "), 1<<16)
	put(t, srv, "exports/plain.img", raw)
	put(t, srv, "exports/README.txt", []byte("not an image"))
	put(t, srv, "elsewhere/v3.qcow2", []byte("QFI\xfb outside the prefix"))

	secrets := &redact.Secrets{}
	cfg := s3images.Config{S3: srv.Config(), Bucket: bucket, Prefix: "exports/"}
	cfg.S3.Secrets = secrets
	src, err := s3images.New(context.Background(), cfg)
	require.NoError(t, err)
	defer src.Close()
	vms, err := src.VMs(t.Context())
	require.NoError(t, err)
	var names []string
	for _, vm := range vms {
		names = append(names, vm.Name)
	}
	assert.Len(t, vms, len(want)+1, "the fixtures and plain.img: %v", names)
	assert.NotContains(t, names, "README.txt")

	for _, vm := range vms {
		t.Run(vm.Name, func(t *testing.T) {
			snaps, err := src.Snapshots(t.Context(), vm.ID)
			require.NoError(t, err)
			require.Len(t, snaps, 1)
			assert.Equal(t, vm.Name, snaps[0].Name)
			assert.False(t, snaps[0].Created.IsZero(), "Last-Modified dates the snapshot")
			d, err := src.OpenDisk(t.Context(), backend.DiskRef{VM: vm.ID, Snapshot: snaps[0].ID, Disk: snaps[0].Disks[0].ID})
			require.NoError(t, err)
			defer d.Close()
			got := readAll(t, d)
			if vm.Name == "plain.img" {
				assert.Equal(t, raw, got)
				return
			}
			sum := sha256.Sum256(got)
			assert.Equal(t, want[vm.Name+".qcow2"], hex.EncodeToString(sum[:]), "qemu-img convert -O raw")
			assert.Less(t, d.Allocated().Bytes(), d.Size(), "holes are known")
		})
	}
}

// TestWrongSecret: a wrong secret key fails New with EACCES, and the error
// carries no secret.
func TestWrongSecret(t *testing.T) {
	srv := s3test.Start(t, s3test.Options{Buckets: []string{bucket}})
	cfg := s3images.Config{S3: srv.Config(), Bucket: bucket}
	cfg.S3.SecretKey = "wrong-secret-key-000000000000000000000000"
	cfg.S3.Secrets = &redact.Secrets{}
	_, err := s3images.New(context.Background(), cfg)
	require.ErrorIs(t, err, backend.ErrPermission)
	assert.NotContains(t, err.Error(), cfg.S3.SecretKey)
	assert.NotContains(t, err.Error(), srv.SecretKey())
}

// TestReplacedObject: an object replaced after it was listed is another
// snapshot; opening the old one is ENOENT, never the new bytes under the
// old maps.
func TestReplacedObject(t *testing.T) {
	srv := s3test.Start(t, s3test.Options{Buckets: []string{bucket}})
	put(t, srv, "a.img", bytes.Repeat([]byte{1}, 4096))
	src, err := s3images.New(context.Background(), s3images.Config{S3: srv.Config(), Bucket: bucket})
	require.NoError(t, err)
	vms, err := src.VMs(t.Context())
	require.NoError(t, err)
	require.Len(t, vms, 1)
	old, err := src.Snapshots(t.Context(), vms[0].ID)
	require.NoError(t, err)
	put(t, srv, "a.img", bytes.Repeat([]byte{2}, 4096))
	_, err = src.OpenDisk(t.Context(), backend.DiskRef{VM: vms[0].ID, Snapshot: old[0].ID, Disk: old[0].Disks[0].ID})
	assert.ErrorIs(t, err, backend.ErrNotFound)
	cur, err := src.Snapshots(t.Context(), vms[0].ID)
	require.NoError(t, err)
	assert.NotEqual(t, old[0].ID, cur[0].ID)
}
