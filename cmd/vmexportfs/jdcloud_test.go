package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/jdcloud"
	"github.com/vmexportfs/vmexportfs/backend/jdcloud/jdcloudtest"
	"github.com/vmexportfs/vmexportfs/backend/s3/s3test"
)

// TestJDCloudMkdirShowsProgress mounts the JD Cloud simulator with its
// exports in a real S3 server: an export made in the console is a snapshot
// whose disk.img copies as qemu-img's raw of the QCOW2; mkdir returns at
// once with the directory empty and user.vmexport.state saying what is
// being done, and its disk.img appears once the export is finished; rmdir
// deletes the exported object.
func TestJDCloudMkdirShowsProgress(t *testing.T) {
	requireRoot(t)
	requireTools(t, "cp", "getfattr", "mkdir", "rmdir")
	const region, fixture = "cn-east-2", "../../testdata/qcow2/v3-64k"
	srv := s3test.Start(t, s3test.Options{Buckets: []string{"exports"}})
	client := srv.Client(t)
	sim, err := jdcloudtest.Start(jdcloudtest.Options{
		Region: region, Credentials: map[string]string{srv.AccessKey(): srv.SecretKey()},
		ImageDelay: 300 * time.Millisecond, ExportDuration: 2 * time.Second,
		ImageData: func(string) (string, error) { return fixture + ".qcow2", nil },
		PutObject: func(ctx context.Context, _, key string, data io.Reader, size int64) error {
			return client.Put(ctx, "exports", key, data, size)
		},
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sim.Close() })
	require.NoError(t, sim.AddInstance("i-web01", "web01"))

	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, data, 0o600))
		return p
	}
	caFile := write("ca.pem", append(append([]byte{}, sim.CAPEM()...), srv.CAPEM()...))
	akFile, skFile := write("ak", []byte(srv.AccessKey()+"\n")), write("sk", []byte(srv.SecretKey()+"\n"))
	ossURL := "https://exports.s3." + region + ".jdcloud-oss.com"
	api := sim.URL() + "/v1/regions/" + region

	// An export made outside the mount, as in the console.
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(sim.CAPEM())
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	creds := jdcloud.Credentials{AccessKey: srv.AccessKey(), SecretKey: srv.SecretKey()}
	call := func(method, route string, body, out any) {
		var payload []byte
		if body != nil {
			payload, err = json.Marshal(body)
			require.NoError(t, err)
		}
		req, err := http.NewRequest(method, api+"/"+route, bytes.NewReader(payload))
		require.NoError(t, err)
		req.Header.Set("Content-Type", "application/json")
		require.NoError(t, jdcloud.Sign(req, payload, creds, region, "vm", time.Now().UTC(), rand.Text()))
		resp, err := hc.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		_, err = jdcloud.Decode(resp.Body, resp.StatusCode, out)
		require.NoError(t, err, "%s %s", method, route)
	}
	var img jdcloud.CreateImageResult
	call(http.MethodPost, "instances/i-web01:createImage", jdcloud.CreateImageRequest{Name: "web01-console"}, &img)
	require.Eventually(t, func() bool {
		var d jdcloud.DescribeImageResult
		call(http.MethodGet, "images/"+img.ImageID, nil, &d)
		return d.Image.Status == jdcloud.ImageReady
	}, 10*time.Second, 20*time.Millisecond)
	var ex jdcloud.ExportImageResult
	call(http.MethodPost, "images/"+img.ImageID+":exportImage", jdcloud.ExportImageRequest{RoleName: "r", OSSURL: ossURL, OSSPrefix: "console"}, &ex)
	require.Eventually(t, func() bool { return sim.Stats().ExportsFinished == 1 }, 10*time.Second, 20*time.Millisecond)

	mnt := filepath.Join(t.TempDir(), "mnt")
	require.NoError(t, os.Mkdir(mnt, 0o755))
	m := startCommand(t, "-f", "--jdcloud-access-key-file", akFile, "--jdcloud-secret-key-file", skFile, "--ca-file", caFile,
		"--oss-url", ossURL, "--oss-endpoint", srv.Endpoint(), "--jdcloud-export-role", "vmexportfs-export",
		"--jdcloud-poll-interval", "100ms", "--list-ttl", "100ms", "--state-dir", t.TempDir(), "--cache-dir", t.TempDir(),
		"jdcloud+"+api, mnt)
	m.dir = mnt
	want := fixtureRawSum(t, "v3-64k")
	snaps := m.path("vms", "i-web01", "snapshots")
	assert.Equal(t, "web01-console\n", tool(t, "ls", snaps))
	copied := filepath.Join(t.TempDir(), "copy")
	tool(t, "cp", "--sparse=always", filepath.Join(snaps, "web01-console", "disk.img"), copied)
	assert.Equal(t, want, sha256File(t, copied))
	assert.Equal(t, "ready", tool(t, "getfattr", "--only-values", "-n", "user.vmexport.state", filepath.Join(snaps, "web01-console")))

	start := time.Now()
	nightly := filepath.Join(snaps, "web01-nightly")
	tool(t, "mkdir", nightly)
	assert.Less(t, time.Since(start), 2*time.Second, "mkdir returned before the export finished")
	state := tool(t, "getfattr", "--only-values", "-n", "user.vmexport.state", nightly)
	assert.NotEqual(t, "ready", state)
	assert.Empty(t, strings.TrimSpace(tool(t, "ls", nightly)), "no files while %q", state)
	seen := map[string]bool{}
	require.Eventually(t, func() bool {
		s := tool(t, "getfattr", "--only-values", "-n", "user.vmexport.state", nightly)
		seen[strings.TrimRight(s, "0123456789%")] = true
		return s == "ready"
	}, 30*time.Second, 50*time.Millisecond, "never ready")
	assert.True(t, seen["exporting "], "the export's progress was shown: %v", seen)
	require.Eventually(t, func() bool { return strings.Contains(tool(t, "ls", nightly), "disk.img") }, 5*time.Second, 100*time.Millisecond)
	tool(t, "cp", "--sparse=always", filepath.Join(nightly, "disk.img"), copied)
	assert.Equal(t, want, sha256File(t, copied))

	tool(t, "rmdir", filepath.Join(snaps, "web01-console"))
	assert.Equal(t, "web01-nightly\n", tool(t, "ls", snaps))
}

// fixtureRawSum is the sha256 of qemu-img convert -O raw of a fixture.
func fixtureRawSum(t *testing.T, name string) string {
	f, err := os.Open("../../testdata/qcow2/SHA256SUMS")
	require.NoError(t, err)
	defer f.Close()
	for sc := bufio.NewScanner(f); sc.Scan(); {
		if fields := strings.Fields(sc.Text()); len(fields) == 2 && fields[1] == name+".raw" {
			return fields[0]
		}
	}
	t.Fatalf("no sum for %s", name)
	return ""
}
