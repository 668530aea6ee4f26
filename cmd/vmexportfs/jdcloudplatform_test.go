package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/jdcloud"
	"github.com/vmexportfs/vmexportfs/backend/jdcloud/jdcloudtest"
	"github.com/vmexportfs/vmexportfs/backend/qemutest"
	"github.com/vmexportfs/vmexportfs/backend/s3/s3test"
)

// jdRegion is the S3 server's region, which the simulated API shares.
const jdRegion = "cn-east-2"

// jdcloudPlatform is the JD Cloud simulator exporting into a real S3
// server (versitygw), which the mount reads through a byte-counting relay.
// A snapshot is an export made through the API, as the console makes one,
// of an image of the instance's disk as it is then (qemu-img converts the
// live bytes).
type jdcloudPlatform struct {
	sim     *jdcloudtest.Server
	srv     *s3test.Server
	relay   *byteRelay
	creds   jdcloud.Credentials
	files   map[string]string // ak, sk, ca
	dir     string
	cache   string
	mu      sync.Mutex
	live    map[string][]byte
	made    string            // the QCOW2 the simulator last asked for
	images  map[string]string // snapshot name → its QCOW2
	n       int
	byVM    map[string][]string // snapshot names, oldest first
	ossURL  string
	stateDr string
}

func newJDCloud(t *testing.T) *jdcloudPlatform {
	t.Helper()
	requireRoot(t)
	requireTools(t, "qemu-img")
	srv := s3test.Start(t, s3test.Options{Buckets: []string{"exports"}})
	client := srv.Client(t)
	p := &jdcloudPlatform{srv: srv, dir: t.TempDir(), cache: t.TempDir(), stateDr: t.TempDir(), live: map[string][]byte{},
		images: map[string]string{}, byVM: map[string][]string{}, files: map[string]string{},
		creds: jdcloud.Credentials{AccessKey: srv.AccessKey(), SecretKey: srv.SecretKey()}, ossURL: "https://exports.s3." + jdRegion + ".jdcloud-oss.com"}
	sim, err := jdcloudtest.Start(jdcloudtest.Options{
		Region: jdRegion, Credentials: map[string]string{p.creds.AccessKey: p.creds.SecretKey},
		ImageDelay: 20 * time.Millisecond, ExportDuration: 200 * time.Millisecond,
		ImageData: p.imageData,
		PutObject: func(ctx context.Context, _, key string, data io.Reader, size int64) error {
			return client.Put(ctx, "exports", key, data, size)
		},
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sim.Close() })
	p.sim = sim
	p.relay = startRelay(t, hostPort(srv.Endpoint()))
	for name, data := range map[string][]byte{"ak": []byte(p.creds.AccessKey + "\n"), "sk": []byte(p.creds.SecretKey + "\n"),
		"ca": append(append([]byte{}, sim.CAPEM()...), srv.CAPEM()...)} {
		path := filepath.Join(p.dir, name)
		require.NoError(t, os.WriteFile(path, data, 0o600))
		p.files[name] = path
	}
	return p
}

// imageData converts an instance's live disk for the simulator's export.
func (p *jdcloudPlatform) imageData(instance string) (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	img, err := qemutest.QCOW2(p.dir, p.live[instance])
	if err == nil {
		p.made = img
	}
	return img, err
}

// export images the instance and exports the image as the console does,
// waiting for both.
func (p *jdcloudPlatform) export(t *testing.T, instance, name string) {
	t.Helper()
	require.NoError(t, p.sim.Console(p.creds.AccessKey).Export(t.Context(), instance, name, p.ossURL, "console"))
}

func (p *jdcloudPlatform) Caps() caps { return caps{allocationMap: true} }

func (p *jdcloudPlatform) AddVM(t *testing.T, vm string, disks ...diskSpec) {
	require.Len(t, disks, 1, "an export is the system disk")
	require.NoError(t, p.sim.AddInstance(vm, vm))
	p.mu.Lock()
	p.live[vm] = make([]byte, (disks[0].size+511)/512*512)
	p.mu.Unlock()
}

func (p *jdcloudPlatform) Write(t *testing.T, vm, _ string, off, n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := int64(0); i < n; i++ {
		p.live[vm][off+i] = byte((off+i)*5/3 + 3)
	}
}

func (p *jdcloudPlatform) Discard(t *testing.T, vm, _ string, off, n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	clear(p.live[vm][off : off+n])
}

// Snapshot exports the instance and returns the image's name, which the
// mount shows.
func (p *jdcloudPlatform) Snapshot(t *testing.T, vm string) string {
	name := fmt.Sprintf("%s-%03d", vm, len(p.byVM[vm])+1)
	p.export(t, vm, name)
	p.mu.Lock()
	p.images[name] = p.made
	p.mu.Unlock()
	p.byVM[vm] = append(p.byVM[vm], name)
	return name
}

func (p *jdcloudPlatform) Snapshots(t *testing.T, vm string) []string { return p.byVM[vm] }

// Reference is qemu-img convert -O raw of the exported QCOW2.
func (p *jdcloudPlatform) Reference(t *testing.T, vm, snapshot, _ string) string {
	raw, err := qemutest.Raw(t.TempDir(), p.images[snapshot])
	require.NoError(t, err)
	return raw
}

func (p *jdcloudPlatform) MountArgs() []string {
	return []string{"--jdcloud-access-key-file", p.files["ak"], "--jdcloud-secret-key-file", p.files["sk"], "--ca-file", p.files["ca"],
		"--oss-url", p.ossURL, "--oss-endpoint", "https://" + p.relay.addr(), "--jdcloud-export-role", "vmexportfs-export",
		"--jdcloud-poll-interval", "50ms", "--state-dir", p.stateDr, "--cache-dir", p.cache,
		"jdcloud+" + p.sim.URL() + "/v1/regions/" + jdRegion}
}

func (p *jdcloudPlatform) CacheDir() string { return p.cache }

func (p *jdcloudPlatform) DiskBytes() int64 { return p.relay.served.Load() }
