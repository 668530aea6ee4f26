package jdcloud_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/jdcloud"
	"github.com/vmexportfs/vmexportfs/backend/jdcloud/jdcloudtest"
	"github.com/vmexportfs/vmexportfs/backend/redact"
	"github.com/vmexportfs/vmexportfs/backend/s3/s3test"
)

const fixture = "../../testdata/qcow2/v3-64k"

// region is the S3 server's: the bucket and the API share it.
const region = "cn-east-2"

// cloud is the JD Cloud simulator writing its exports into a real S3
// server, and an admin that calls the API as a user's console would.
type cloud struct {
	sim   *jdcloudtest.Server
	srv   *s3test.Server
	pool  *x509.CertPool
	creds jdcloud.Credentials
}

func newCloud(t *testing.T) *cloud {
	return newCloudWith(t, func(string) (string, error) { return fixture + ".qcow2", nil })
}

// newCloudWith exports the QCOW2 file imageData names for an instance.
func newCloudWith(t *testing.T, imageData func(instance string) (string, error)) *cloud {
	srv := s3test.Start(t, s3test.Options{Buckets: []string{"exports"}})
	creds := jdcloud.Credentials{AccessKey: srv.AccessKey(), SecretKey: srv.SecretKey()}
	client := srv.Client(t)
	sim, err := jdcloudtest.Start(jdcloudtest.Options{
		Region: region, Credentials: map[string]string{creds.AccessKey: creds.SecretKey},
		ImageDelay: 20 * time.Millisecond, ExportDuration: 100 * time.Millisecond,
		ImageData: imageData,
		PutObject: func(ctx context.Context, _, key string, data io.Reader, size int64) error {
			return client.Put(ctx, "exports", key, data, size)
		},
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sim.Close() })
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(sim.CAPEM())
	pool.AppendCertsFromPEM(srv.CAPEM())
	return &cloud{sim: sim, srv: srv, pool: pool, creds: creds}
}

func (c *cloud) api() string { return c.sim.URL() + "/v1/regions/" + region }

// export makes an image of instance and exports it as the console does,
// waiting for it.
func (c *cloud) export(t *testing.T, instance, name string) {
	require.NoError(t, c.sim.Console(c.creds.AccessKey).Export(t.Context(), instance, name, "https://exports.s3."+region+".jdcloud-oss.com", "vm"))
}

func (c *cloud) source(t *testing.T) *jdcloud.Source {
	src, err := jdcloud.NewSource(context.Background(), jdcloud.SourceConfig{
		API: c.api(), Credentials: c.creds, OSSURL: "https://exports.s3." + region + ".jdcloud-oss.com",
		OSSEndpoint: c.srv.Endpoint(), RootCAs: c.pool, Secrets: &redact.Secrets{},
		ExportRole: "vmexportfs-export", OSSPrefix: "vmx", PollInterval: 10 * time.Millisecond,
	})
	require.NoError(t, err)
	return src
}

func fixtureSum(t *testing.T) string {
	f, err := os.Open("../../testdata/qcow2/SHA256SUMS")
	require.NoError(t, err)
	defer f.Close()
	for sc := bufio.NewScanner(f); sc.Scan(); {
		if fields := strings.Fields(sc.Text()); fields[1] == "v3-64k.raw" {
			return fields[0]
		}
	}
	t.Fatal("no sum for v3-64k")
	return ""
}

// TestExportsAsSnapshots: finished exports are snapshots of the instance
// their image was made from, read as the raw disk qemu-img makes of the
// QCOW2 object; rmdir deletes the object.
func TestExportsAsSnapshots(t *testing.T) {
	c := newCloud(t)
	require.NoError(t, c.sim.AddInstance("i-web01", "web01"))
	c.export(t, "i-web01", "web01-monday")
	c.export(t, "i-web01", "web01-tuesday")
	src := c.source(t)
	vms, err := src.VMs(t.Context())
	require.NoError(t, err)
	require.Len(t, vms, 1)
	assert.Equal(t, "i-web01", vms[0].ID)
	snaps, err := src.Snapshots(t.Context(), "i-web01")
	require.NoError(t, err)
	require.Len(t, snaps, 2)
	assert.Equal(t, []string{"web01-monday", "web01-tuesday"}, []string{snaps[0].Name, snaps[1].Name})
	d, err := src.OpenDisk(t.Context(), backend.DiskRef{VM: "i-web01", Snapshot: snaps[1].ID, Disk: "disk"})
	require.NoError(t, err)
	buf := make([]byte, d.Size())
	require.NoError(t, d.ReadAt(t.Context(), buf, 0))
	sum := sha256.Sum256(buf)
	assert.Equal(t, fixtureSum(t), hex.EncodeToString(sum[:]), "the export reads as qemu-img convert -O raw")
	assert.Less(t, d.Allocated().Bytes(), d.Size())
	require.NoError(t, d.Close())

	require.NoError(t, src.DeleteSnapshot(t.Context(), "i-web01", snaps[0].ID))
	left, err := src.Snapshots(t.Context(), "i-web01")
	require.NoError(t, err)
	require.Len(t, left, 1)
	assert.Equal(t, snaps[1].ID, left[0].ID)
	assert.ErrorIs(t, src.DeleteSnapshot(t.Context(), "i-web01", snaps[0].ID), backend.ErrNotFound)
}

// TestWrongKeys: a wrong secret fails NewSource with EACCES, without the
// secret in the error.
func TestWrongKeys(t *testing.T) {
	c := newCloud(t)
	_, err := jdcloud.NewSource(context.Background(), jdcloud.SourceConfig{
		API: c.api(), Credentials: jdcloud.Credentials{AccessKey: c.creds.AccessKey, SecretKey: "wrong-secret-0000000000"},
		OSSURL: "https://exports.s3." + region + ".jdcloud-oss.com", OSSEndpoint: c.srv.Endpoint(), RootCAs: c.pool, Secrets: &redact.Secrets{},
	})
	require.ErrorIs(t, err, backend.ErrPermission)
	assert.NotContains(t, err.Error(), "wrong-secret-0000000000")
	assert.NotContains(t, err.Error(), c.creds.SecretKey)
}

// TestMkdirPending: CreateSnapshot returns at once with the snapshot
// pending; the listing shows it creating the image, then exporting with
// its progress, then ready, when it reads as the instance's disk.
func TestMkdirPending(t *testing.T) {
	c := newCloud(t)
	require.NoError(t, c.sim.AddInstance("i-db01", "db01"))
	c.export(t, "i-db01", "db01-first") // so the instance is listed
	src, err := jdcloud.NewSource(context.Background(), jdcloud.SourceConfig{
		API: c.api(), Credentials: c.creds, OSSURL: "https://exports.s3." + region + ".jdcloud-oss.com",
		OSSEndpoint: c.srv.Endpoint(), RootCAs: c.pool, Secrets: &redact.Secrets{},
		ExportRole: "vmexportfs-export", OSSPrefix: "vmx", PollInterval: 10 * time.Millisecond,
	})
	require.NoError(t, err)
	defer src.Close()
	_, err = src.CreateSnapshot(t.Context(), "i-db01", "bad name!")
	assert.ErrorIs(t, err, backend.ErrInvalid)
	sn, err := src.CreateSnapshot(t.Context(), "i-db01", "db01-nightly")
	require.NoError(t, err)
	assert.NotEmpty(t, sn.Pending, "returned before the export")
	_, err = src.CreateSnapshot(t.Context(), "i-db01", "db01-nightly")
	assert.ErrorIs(t, err, backend.ErrExists)

	states := map[string]bool{}
	deadline := time.Now().Add(20 * time.Second)
	for {
		snaps, err := src.Snapshots(t.Context(), "i-db01")
		require.NoError(t, err)
		var got *backend.Snapshot
		for i := range snaps {
			if snaps[i].ID == sn.ID {
				got = &snaps[i]
			}
		}
		require.NotNil(t, got, "the pending snapshot is listed: %+v", snaps)
		if got.Pending == "" {
			break
		}
		states[strings.TrimRight(got.Pending, "0123456789%")] = true
		if d, err := src.OpenDisk(t.Context(), backend.DiskRef{VM: "i-db01", Snapshot: sn.ID, Disk: "disk"}); err == nil {
			// Unless the export finished between the listing and the
			// open (a busy machine's 10 ms), a pending snapshot is not
			// read.
			d.Close()
			snaps, err := src.Snapshots(t.Context(), "i-db01")
			require.NoError(t, err)
			for _, s := range snaps {
				if s.ID == sn.ID {
					assert.Empty(t, s.Pending, "a pending snapshot is not read")
				}
			}
		}
		require.True(t, time.Now().Before(deadline), "never ready; states %v", states)
		time.Sleep(20 * time.Millisecond)
	}
	assert.True(t, states["exporting "], "the export's progress was shown: %v", states)
	d, err := src.OpenDisk(t.Context(), backend.DiskRef{VM: "i-db01", Snapshot: sn.ID, Disk: "disk"})
	require.NoError(t, err)
	defer d.Close()
	buf := make([]byte, d.Size())
	require.NoError(t, d.ReadAt(t.Context(), buf, 0))
	sum := sha256.Sum256(buf)
	assert.Equal(t, fixtureSum(t), hex.EncodeToString(sum[:]))
}

// TestRmdirImage: with DeleteImage, rmdir deletes the image as well as the
// exported object.
func TestRmdirImage(t *testing.T) {
	c := newCloud(t)
	require.NoError(t, c.sim.AddInstance("i-app", "app"))
	c.export(t, "i-app", "app-once")
	src, err := jdcloud.NewSource(context.Background(), jdcloud.SourceConfig{
		API: c.api(), Credentials: c.creds, OSSURL: "https://exports.s3." + region + ".jdcloud-oss.com",
		OSSEndpoint: c.srv.Endpoint(), RootCAs: c.pool, Secrets: &redact.Secrets{}, DeleteImage: true,
	})
	require.NoError(t, err)
	snaps, err := src.Snapshots(t.Context(), "i-app")
	require.NoError(t, err)
	require.Len(t, snaps, 1)
	private := func() int {
		n := 0
		for _, im := range c.sim.Images() {
			if im.Source == "private" {
				n++
			}
		}
		return n
	}
	require.Equal(t, 1, private())
	require.NoError(t, src.DeleteSnapshot(t.Context(), "i-app", snaps[0].ID))
	assert.Zero(t, private(), "the image is deleted too")
	left, err := src.Snapshots(t.Context(), "i-app")
	require.NoError(t, err)
	assert.Empty(t, left)
}
