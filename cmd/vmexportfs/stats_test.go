package main

import (
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
	"github.com/vmexportfs/vmexportfs/backend/kubevirt/kubevirttest"
	"github.com/vmexportfs/vmexportfs/fs"
)

// mountStats reads the mount's stats document the way a user does, with
// getfattr.
func mountStats(t *testing.T, m *mounted) fs.Document {
	t.Helper()
	out := tool(t, "getfattr", "--only-values", "-n", "user.vmexport.stats", m.dir)
	var doc fs.Document
	require.NoError(t, json.Unmarshal([]byte(out), &doc), "%s", out)
	require.Equal(t, 1, doc.Version)
	return doc
}

func transportOf(doc fs.Document, name string) fs.TransportDoc {
	for _, tr := range doc.Transports {
		if tr.Name == name {
			return tr
		}
	}
	return fs.TransportDoc{}
}

// freeAddr is a loopback address nobody listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())
	return addr
}

// TestStatsCountWhatTheSimulatorServed copies a disk and reads
// user.vmexport.stats: every request and disk byte the Coriolis simulator
// counted is in it, holes were answered locally, and a second reading of
// the disk (its gzip file) is served from the cache without a fetch. Then
// /metrics, scraped and parsed with Prometheus' own text parser, says the
// same, with the declared types and no secret in any label.
func TestStatsCountWhatTheSimulatorServed(t *testing.T) {
	requireTools(t, "cp", "getfattr", "gzip")
	f, sid, source := copyFixture(t)
	addr := freeAddr(t)
	m := f.mount("--metrics-addr", addr)
	disk := m.path("vms", copyVM, "snapshots", sid, "disk.img")

	out := filepath.Join(t.TempDir(), "copy")
	tool(t, "cp", "--sparse=always", disk, out)
	require.Equal(t, sha256File(t, source), sha256File(t, out))
	written := allocatedBytes(copyWrites)

	// The copy is over when cp exits; its requests are all answered.
	doc := mountStats(t, m)
	sim := f.sim.Stats()
	t.Logf("simulator: %+v", sim)
	t.Logf("stats: reads %+v fetches %+v http %+v", doc.Reads, doc.Fetches, transportOf(doc, "http"))
	assert.Equal(t, "coriolis", doc.Platform)
	http1 := transportOf(doc, "http")
	assert.Equal(t, sim.DiskRequests+sim.APIRequests+sim.Logins, http1.Requests, "every request the simulator answered")
	assert.Equal(t, sim.DiskRequests-sim.DiskHeads, doc.Fetches.Requests, "disk reads (the HEADs give the disk's size at open)")
	assert.Equal(t, sim.DiskBytes, doc.Fetches.Bytes, "disk bytes")
	assert.GreaterOrEqual(t, http1.BytesReceived, sim.DiskBytes, "answers include the disk bytes")
	assert.Zero(t, http1.Failed)
	assert.Equal(t, http1.Requests, int64(http1.Duration.Count))
	assert.Equal(t, int64(0), doc.Fetches.Errors)
	assert.Zero(t, doc.Retries)
	// Everything fetched was written data (the simulator's 64 KiB granule
	// rounds the last extent); holes were never asked for.
	assert.GreaterOrEqual(t, doc.Fetches.Bytes, written)
	assert.Less(t, doc.Fetches.Bytes, written+int64(len(copyWrites))*64*kib)
	require.Len(t, doc.Disks, 1)
	d := doc.Disks[0]
	assert.Equal(t, copyVM, d.VM)
	assert.Equal(t, sid, d.Snapshot)
	assert.Equal(t, sim.DiskBytes, d.FetchedBytes)
	assert.Equal(t, d.CacheBytes+d.FetchBytes+d.HoleBytes, doc.Reads.CacheBytes+doc.Reads.FetchBytes+doc.Reads.HoleBytes)
	assert.GreaterOrEqual(t, d.CacheBytes+d.FetchBytes, written, "cp read every written byte")
	assert.Equal(t, int64(64<<20), doc.Cache.CapacityBytes)
	assert.Positive(t, doc.Open["connections"])

	// The gzip file reads the disk's data again, from the cache (its
	// holes it compresses without reading).
	tool(t, "gzip", "-t", disk+".gz")
	again := mountStats(t, m)
	assert.Equal(t, sim.DiskBytes, f.sim.Stats().DiskBytes, "nothing fetched again")
	assert.Equal(t, doc.Fetches.Bytes, again.Fetches.Bytes)
	assert.GreaterOrEqual(t, again.Reads.CacheBytes-doc.Reads.CacheBytes, written, "the written bytes came from the cache")
	assert.Greater(t, again.Cache.Hits, doc.Cache.Hits)

	// Prometheus.
	families := scrape(t, "http://"+addr+"/metrics")
	sim = f.sim.Stats()
	for name, typ := range map[string]dto.MetricType{
		"vmexportfs_backend_bytes_total":              dto.MetricType_COUNTER,
		"vmexportfs_backend_requests_total":           dto.MetricType_COUNTER,
		"vmexportfs_backend_request_duration_seconds": dto.MetricType_HISTOGRAM,
		"vmexportfs_backend_faults_total":             dto.MetricType_COUNTER,
		"vmexportfs_cache_hits_total":                 dto.MetricType_COUNTER,
		"vmexportfs_cache_resident_bytes":             dto.MetricType_GAUGE,
		"vmexportfs_open_resources":                   dto.MetricType_GAUGE,
		"vmexportfs_errors_total":                     dto.MetricType_COUNTER,
	} {
		if name == "vmexportfs_errors_total" {
			assert.NotContains(t, families, name, "no error, no series")
			continue
		}
		require.Contains(t, families, name)
		assert.Equal(t, typ, families[name].GetType(), name)
	}
	value := func(name string, labels map[string]string) float64 {
		t.Helper()
		for _, mt := range families[name].GetMetric() {
			if hasLabels(mt, labels) {
				switch {
				case mt.Counter != nil:
					return mt.Counter.GetValue()
				case mt.Gauge != nil:
					return mt.Gauge.GetValue()
				case mt.Histogram != nil:
					return float64(mt.Histogram.GetSampleCount())
				}
			}
		}
		t.Fatalf("no %s%v", name, labels)
		return 0
	}
	httpLabels := map[string]string{"platform": "coriolis", "transport": "http"}
	assert.Equal(t, float64(sim.DiskRequests+sim.APIRequests+sim.Logins), value("vmexportfs_backend_requests_total", httpLabels))
	assert.Equal(t, float64(sim.DiskRequests+sim.APIRequests+sim.Logins), value("vmexportfs_backend_request_duration_seconds", httpLabels))
	assert.Equal(t, float64(sim.DiskBytes), value("vmexportfs_backend_bytes_total", map[string]string{"platform": "coriolis", "kind": "fetched"}))
	assert.Equal(t, float64(again.Reads.CacheBytes), value("vmexportfs_backend_bytes_total", map[string]string{"kind": "cache"}))
	assert.Equal(t, 0.0, value("vmexportfs_backend_faults_total", map[string]string{"kind": "timeout"}))
	assert.Equal(t, float64(again.Cache.CapacityBytes), value("vmexportfs_cache_capacity_bytes", nil))
	h := families["vmexportfs_backend_request_duration_seconds"].GetMetric()[0].GetHistogram()
	require.NotEmpty(t, h.GetBucket())
	last := h.GetBucket()[len(h.GetBucket())-1]
	assert.LessOrEqual(t, last.GetCumulativeCount(), h.GetSampleCount())

	// No label may carry a secret or a URL: the password, the simulator's
	// address, a JWT (the Coriolis token).
	for name, fam := range families {
		for _, mt := range fam.GetMetric() {
			for _, lp := range mt.GetLabel() {
				v := lp.GetValue()
				assert.NotContains(t, v, simPassword, "%s %s", name, lp.GetName())
				assert.NotContains(t, v, "eyJ", "%s %s", name, lp.GetName())
				assert.NotContains(t, v, "://", "%s %s", name, lp.GetName())
				assert.NotContains(t, v, f.sim.URL()[len("https://"):], "%s %s", name, lp.GetName())
			}
		}
	}

	// What the stats command prints of it, for people.
	table := vmexportfs(t, "stats", m.dir)
	t.Logf("vmexportfs stats:\n%s", table)
	assert.Contains(t, table, "coriolis")
	assert.NotContains(t, table, simPassword)
}

func hasLabels(m *dto.Metric, want map[string]string) bool {
	found := 0
	for _, lp := range m.GetLabel() {
		if v, ok := want[lp.GetName()]; ok && v == lp.GetValue() {
			found++
		}
	}
	return found == len(want)
}

// scrape reads a Prometheus text exposition and parses it with the
// Prometheus text parser.
func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	require.NoError(t, err)
	return families
}

// TestStatsShowSnapshotBeingMade: a KubeVirt mkdir waits for its export to
// be ready; meanwhile the stats show it with the platform's phase, the log
// says how it goes at the set pace, and once mkdir returns it is gone from
// the stats.
func TestStatsShowSnapshotBeingMade(t *testing.T) {
	requireTools(t, "getfattr")
	f := newKVFixtureWith(t, kubevirttest.Options{ReadyDelay: 1500 * time.Millisecond})
	f.addVM(t, "vm-slow", kubevirttest.VolumeSpec{Name: "root", Size: 4 * mib})
	m := f.mount(t, "--progress-interval", "300ms")
	dir := m.path("vms", "vm-slow", "snapshots", "nightly")
	done := make(chan error, 1)
	go func() { done <- os.Mkdir(dir, 0o755) }()

	var seen fs.CreationDoc
	require.Eventually(t, func() bool {
		doc := mountStats(t, m)
		if len(doc.Creating) == 1 && strings.Contains(doc.Creating[0].State, "Ready") {
			seen = doc.Creating[0]
			return true
		}
		return false
	}, 10*time.Second, 100*time.Millisecond, "the stats show the snapshot being made")
	assert.Equal(t, "vm-slow", seen.VM)
	assert.Equal(t, "nightly", seen.Name)
	require.NoError(t, <-done)
	assert.True(t, m.logged("snapshot still being created"), "progress logged while waiting")
	assert.Contains(t, m.logs.String(), "waiting for")
	for _, line := range strings.Split(m.logs.String(), "\n") {
		if strings.Contains(line, "snapshot still being created") || strings.Contains(line, "snapshot created") {
			t.Log(line)
		}
	}
	assert.Empty(t, mountStats(t, m).Creating, "made: no longer being made")
	fi, err := os.Stat(dir)
	require.NoError(t, err)
	assert.True(t, fi.IsDir())
}

// TestStatsNotListed: the stats xattr is not among the mountpoint's listed
// xattrs, so cp -a and rsync -X of the mount never copy it.
func TestStatsNotListed(t *testing.T) {
	requireTools(t, "getfattr")
	f := newFixture(t, coriolistest.Options{})
	m := f.mount()
	out, err := toolErr("getfattr", "-d", "-m", "-", m.dir)
	require.NoError(t, err, out)
	assert.NotContains(t, out, "vmexport.stats")
	assert.Contains(t, tool(t, "getfattr", "--only-values", "-n", "user.vmexport.stats", m.dir), `"version":1`)
}

// TestStatsAndTimesOnEveryPlatform: on every platform a copy shows in the
// stats (the platform's bytes, the transport's requests, every written
// byte fetched, no errors), and the snapshot's directory and files carry
// the snapshot's time, never 1970.
func TestStatsAndTimesOnEveryPlatform(t *testing.T) {
	requireTools(t, "cp", "getfattr")
	forEachPlatform(t, copyPlatforms, func(t *testing.T, _ int, p simPlatform) {
		sid, source := newCopyDisk(t, p)
		m := mountSim(t, p)
		before := p.DiskBytes()
		snapDir := m.path("vms", copyVM, "snapshots", sid)
		disk := filepath.Join(snapDir, "disk.img")
		for _, path := range []string{snapDir, disk, disk + ".gz"} {
			var st syscall.Stat_t
			require.NoError(t, syscall.Stat(path, &st))
			mtime, ctime := time.Unix(st.Mtim.Unix()).UTC(), time.Unix(st.Ctim.Unix()).UTC()
			assert.Greater(t, mtime.Year(), 2000, "%s: mtime %v", path, mtime)
			assert.Equal(t, mtime, ctime, "%s", path)
			assert.WithinDuration(t, time.Now(), mtime, 24*time.Hour, "%s: a snapshot taken by this test", path)
		}
		out := filepath.Join(t.TempDir(), "copy")
		tool(t, "cp", "--sparse=always", disk, out)
		require.Equal(t, sha256File(t, source), sha256File(t, out))
		served := p.DiskBytes() - before

		doc := mountStats(t, m)
		t.Logf("served %d; stats: fetches %+v reads %+v transports %+v", served, doc.Fetches, doc.Reads, doc.Transports)
		assert.NotEqual(t, "unknown", doc.Platform)
		assert.Contains(t, p.MountArgs()[len(p.MountArgs())-1], doc.Platform+"+", "the platform is the source's scheme")
		assert.Zero(t, doc.Fetches.Errors)
		assert.Empty(t, doc.Errors)
		if p.Caps().allocationMap {
			assert.GreaterOrEqual(t, doc.Fetches.Bytes, allocatedBytes(copyWrites), "every written byte was fetched")
		}
		if p.Caps().readsAsServed {
			assert.Equal(t, served, doc.Fetches.Bytes, "what the simulator served is what the disk fetched")
		}
		var requests int64
		for _, tr := range doc.Transports {
			requests += tr.Requests
			assert.GreaterOrEqual(t, tr.ConnectionsOpened, tr.ConnectionsOpen)
		}
		assert.Positive(t, requests)
		require.Len(t, doc.Disks, 1)
		assert.Equal(t, tool(t, "getfattr", "--only-values", "-n", "user.vmexport.snapshot", snapDir), doc.Disks[0].Snapshot)
	})
}

// TestMetricsAddrTaken: a --metrics-addr that cannot be listened on fails
// the mount (exit 1, saying why) rather than mounting without metrics.
func TestMetricsAddrTaken(t *testing.T) {
	f := newFixture(t, coriolistest.Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	mnt := t.TempDir()
	args := append(append([]string{"-f"}, f.mountArgs()...), "--metrics-addr", ln.Addr().String(), "coriolis+"+f.sim.URL(), mnt)
	out, err := runTool(os.Args[0], args, asCommandEnv+"=1")
	require.Error(t, err, out)
	assert.Contains(t, err.Error(), "--metrics-addr")
	assert.Contains(t, err.Error(), "address already in use")
	assert.False(t, isMounted(t, mnt))
}
