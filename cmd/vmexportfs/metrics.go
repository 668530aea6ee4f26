package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/vmexportfs/vmexportfs/backend/meter"
	"github.com/vmexportfs/vmexportfs/fs"
)

// serveMetrics serves /metrics on addr (listening now, so a taken port
// fails the mount); stop ends it.
func serveMetrics(addr string, root *fs.Root, m *meter.Meter, logger *slog.Logger) (stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-addr: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		newMountCollector(root, m),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logger.Error("metrics server stopped", "err", err)
		}
	}()
	logger.Info("serving metrics", "url", "http://"+ln.Addr().String()+"/metrics")
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	}, nil
}

// mountCollector turns one scrape into the mount's counters, read then:
// nothing is kept between scrapes, so there is one source of truth (the
// meter, the tree and the cache) for the stats xattr and for Prometheus.
type mountCollector struct {
	root  *fs.Root
	meter *meter.Meter
	descs map[string]*prometheus.Desc
}

// metricHelp names and explains every metric; the labels of each follow
// the name.
var metricHelp = []struct {
	name, help string
	labels     []string
}{
	{"vmexportfs_backend_bytes_total", "Disk data bytes by where they came from: fetched from the platform (readahead included), or served to readers from the block cache or as holes answered locally.", []string{"platform", "kind"}},
	{"vmexportfs_read_bytes_total", "Bytes read from the disks by their files (raw and derived), every byte once.", []string{"platform"}},
	{"vmexportfs_reads_total", "Reads of the disks by their files.", []string{"platform"}},
	{"vmexportfs_kernel_read_requests_total", "READ requests the kernel sent for the disks' files: the reads its page cache did not answer.", []string{"platform"}},
	{"vmexportfs_page_cache_stored_bytes_total", "Bytes stored in the kernel's page cache ahead of readers that seek over holes.", []string{"platform"}},
	{"vmexportfs_disk_fetches_total", "Disk data reads asked of the platform.", []string{"platform"}},
	{"vmexportfs_disk_fetch_errors_total", "Disk data reads that failed after their retries.", []string{"platform"}},
	{"vmexportfs_backend_requests_total", "Requests sent to the platform, API calls included.", []string{"platform", "transport"}},
	{"vmexportfs_backend_request_failures_total", "Requests that got no usable answer (an error status, a cut connection).", []string{"platform", "transport"}},
	{"vmexportfs_backend_received_bytes_total", "Bytes of the platform's answers.", []string{"platform", "transport"}},
	{"vmexportfs_backend_request_duration_seconds", "How long requests took, until their answer was read.", []string{"platform", "transport"}},
	{"vmexportfs_backend_connections", "Connections to the platform open now.", []string{"platform", "transport"}},
	{"vmexportfs_backend_faults_total", "Failed attempts that were retried, by kind.", []string{"platform", "kind"}},
	{"vmexportfs_backend_retries_total", "Attempts made again after a fault.", []string{"platform"}},
	{"vmexportfs_backend_exhausted_total", "Operations that failed after all their attempts.", []string{"platform"}},
	{"vmexportfs_errors_total", "Errnos given to callers for backend failures.", []string{"platform", "errno"}},
	{"vmexportfs_open_resources", "What the mount holds now: disks, file handles, connections and what the platform counts (transfers).", []string{"platform", "resource"}},
	{"vmexportfs_snapshots_creating", "Snapshots being made by mkdir now.", []string{"platform"}},
	{"vmexportfs_cache_capacity_bytes", "The block cache's budget.", nil},
	{"vmexportfs_cache_resident_bytes", "Bytes in the block cache now.", nil},
	{"vmexportfs_cache_hits_total", "Block lookups answered from the cache.", nil},
	{"vmexportfs_cache_misses_total", "Block lookups that waited for a fetch.", nil},
	{"vmexportfs_cache_evictions_total", "Blocks evicted from the cache.", nil},
	{"vmexportfs_uptime_seconds", "Seconds since the mount.", []string{"platform"}},
}

func newMountCollector(root *fs.Root, m *meter.Meter) *mountCollector {
	c := &mountCollector{root: root, meter: m, descs: map[string]*prometheus.Desc{}}
	for _, h := range metricHelp {
		c.descs[h.name] = prometheus.NewDesc(h.name, h.help, h.labels, nil)
	}
	return c
}

func (c *mountCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}

func (c *mountCollector) Collect(ch chan<- prometheus.Metric) {
	doc := c.root.Document()
	mr := c.meter.Read()
	p := doc.Platform
	counter := func(name string, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(c.descs[name], prometheus.CounterValue, v, labels...)
	}
	gauge := func(name string, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(c.descs[name], prometheus.GaugeValue, v, labels...)
	}
	counter("vmexportfs_backend_bytes_total", float64(doc.Fetches.Bytes), p, "fetched")
	counter("vmexportfs_backend_bytes_total", float64(doc.Reads.CacheBytes), p, "cache")
	counter("vmexportfs_backend_bytes_total", float64(doc.Reads.HoleBytes), p, "hole")
	counter("vmexportfs_read_bytes_total", float64(doc.Reads.CacheBytes+doc.Reads.FetchBytes+doc.Reads.HoleBytes), p)
	counter("vmexportfs_reads_total", float64(doc.Reads.Reads), p)
	counter("vmexportfs_kernel_read_requests_total", float64(doc.Reads.ReadRequests), p)
	counter("vmexportfs_page_cache_stored_bytes_total", float64(doc.Reads.PageCacheBytes), p)
	counter("vmexportfs_disk_fetches_total", float64(doc.Fetches.Requests), p)
	counter("vmexportfs_disk_fetch_errors_total", float64(doc.Fetches.Errors), p)
	for _, t := range mr.Transports {
		counter("vmexportfs_backend_requests_total", float64(t.Requests), p, t.Name)
		counter("vmexportfs_backend_request_failures_total", float64(t.Failed), p, t.Name)
		counter("vmexportfs_backend_received_bytes_total", float64(t.BytesReceived), p, t.Name)
		gauge("vmexportfs_backend_connections", float64(t.ConnsOpen), p, t.Name)
		buckets := make(map[float64]uint64, len(meter.DurationBuckets))
		for i, ub := range meter.DurationBuckets {
			buckets[ub] = t.Durations.Cumulative[i]
		}
		ch <- prometheus.MustNewConstHistogram(c.descs["vmexportfs_backend_request_duration_seconds"],
			t.Durations.Count, t.Durations.SumSeconds, buckets, p, t.Name)
	}
	for _, kind := range meter.FaultKinds {
		counter("vmexportfs_backend_faults_total", float64(doc.Faults[kind]), p, kind)
	}
	counter("vmexportfs_backend_retries_total", float64(doc.Retries), p)
	counter("vmexportfs_backend_exhausted_total", float64(doc.GaveUp), p)
	for errno, n := range doc.Errors {
		counter("vmexportfs_errors_total", float64(n), p, errno)
	}
	for resource, n := range doc.Open {
		gauge("vmexportfs_open_resources", float64(n), p, resource)
	}
	gauge("vmexportfs_snapshots_creating", float64(len(doc.Creating)), p)
	gauge("vmexportfs_cache_capacity_bytes", float64(doc.Cache.CapacityBytes))
	gauge("vmexportfs_cache_resident_bytes", float64(doc.Cache.ResidentBytes))
	counter("vmexportfs_cache_hits_total", float64(doc.Cache.Hits))
	counter("vmexportfs_cache_misses_total", float64(doc.Cache.Misses))
	counter("vmexportfs_cache_evictions_total", float64(doc.Cache.Evictions))
	gauge("vmexportfs_uptime_seconds", doc.UptimeSeconds, p)
}
