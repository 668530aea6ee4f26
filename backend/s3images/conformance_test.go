package s3images_test

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/backendtest"
	"github.com/vmexportfs/vmexportfs/backend/qemutest"
	"github.com/vmexportfs/vmexportfs/backend/s3/s3test"
	"github.com/vmexportfs/vmexportfs/backend/s3images"
	"github.com/vmexportfs/vmexportfs/backend/testenv"
)

// TestConformance runs the backend contract suite against a real S3
// server: each VM is one image object (one disk, one snapshot: the object
// as it is), made by qemu-img from the suite's writes, so its clusters are
// what qemu allocates.
func TestConformance(t *testing.T) {
	testenv.RequireTool(t, "qemu-img")
	backendtest.Run(t, backendtest.Harness{
		New: func(t *testing.T) backendtest.Platform { return newPlatform(t) },
		Capabilities: backendtest.Capabilities{
			OneSnapshot: true, OneDisk: true, Granularity: 64 << 10,
			SizeUnit:   512,                                   // a QCOW2 image's size is whole sectors
			ListedDisk: func(string) string { return "disk" }, // an image's one disk
		},
	})
}

// platform keeps each VM's live disk in memory; a snapshot converts it
// with qemu-img and puts it in the bucket.
type platform struct {
	srv  *s3test.Server
	live map[string][]byte
	dir  string
}

func newPlatform(t *testing.T) *platform {
	return &platform{srv: s3test.Start(t, s3test.Options{Buckets: []string{bucket}}), live: map[string][]byte{}, dir: t.TempDir()}
}

func (p *platform) AddVM(t testing.TB, vm string, disks ...backendtest.DiskSpec) {
	require.Len(t, disks, 1, "an image is one disk")
	p.live[vm] = make([]byte, (disks[0].Size+511)/512*512)
}

func (p *platform) Write(t testing.TB, vm, _ string, off int64, data []byte) {
	copy(p.live[vm][off:], data)
}

func (p *platform) Discard(t testing.TB, vm, _ string, off, n int64) {
	clear(p.live[vm][off : off+n])
}

func (p *platform) Snapshot(t testing.TB, vm string) string {
	img, err := qemutest.QCOW2(p.dir, p.live[vm])
	require.NoError(t, err)
	data, err := os.ReadFile(img)
	require.NoError(t, err)
	c := p.srv.Client(t)
	require.NoError(t, c.Put(context.Background(), bucket, vm, bytes.NewReader(data), int64(len(data))))
	obj, err := c.Object(context.Background(), bucket, vm)
	require.NoError(t, err)
	etag := strings.Trim(obj.ETag(), `"`)
	if len(etag) > 16 {
		etag = etag[:16]
	}
	return "etag-" + etag
}

func (p *platform) Source(t testing.TB) backend.Source {
	s, err := s3images.New(context.Background(), s3images.Config{S3: p.srv.Config(), Bucket: bucket})
	require.NoError(t, err)
	return s
}
