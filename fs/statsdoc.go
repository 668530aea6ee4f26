package fs

import (
	"encoding/json"
	"math"
	"time"

	"github.com/vmexportfs/vmexportfs/backend/meter"
)

// Document is the stats document of user.vmexport.stats: one JSON object,
// for people (vmexportfs stats) and for scripts. Counters are cumulative
// since the mount; "open" and "cache.resident_bytes" are now.
type Document struct {
	Version       int     `json:"version"`
	Time          string  `json:"time"` // RFC 3339, when rendered
	UptimeSeconds float64 `json:"uptime_seconds"`
	Platform      string  `json:"platform"`

	Reads      ReadTotals       `json:"reads"`
	Fetches    FetchTotals      `json:"fetches"`
	Transports []TransportDoc   `json:"transports"`
	Faults     map[string]int64 `json:"faults"` // failed attempts, by kind (meter.FaultKinds)
	Retries    int64            `json:"retries"`
	GaveUp     int64            `json:"gave_up"` // operations that used up their attempts
	Errors     map[string]int64 `json:"errors"`  // errnos given for backend failures
	Cache      CacheDoc         `json:"cache"`
	Open       map[string]int64 `json:"open"` // disks, files, connections, and what the platform holds
	Creating   []CreationDoc    `json:"creating"`
	Disks      []DiskDoc        `json:"disks"`
	Omitted    int              `json:"disks_omitted,omitempty"` // disks left out to fit the xattr
}

// ReadTotals split every byte read from the disks (by all their files) by
// what answered it.
type ReadTotals struct {
	Reads      int64 `json:"reads"`
	CacheBytes int64 `json:"cache_bytes"`
	FetchBytes int64 `json:"fetch_bytes"`
	HoleBytes  int64 `json:"hole_bytes"`
	// PageCacheBytes were put in the kernel's page cache ahead of a
	// reader that skips holes; they are counted in the three above too.
	PageCacheBytes int64 `json:"page_cache_bytes"`
	// ReadRequests are the READs the kernel sent: what the page cache
	// did not answer.
	ReadRequests int64 `json:"read_requests"`
}

// FetchTotals are the disk reads made on the platform.
type FetchTotals struct {
	Requests int64 `json:"requests"`
	Bytes    int64 `json:"bytes"`
	Errors   int64 `json:"errors"`
}

// TransportDoc is one transport's requests (API calls included).
type TransportDoc struct {
	Name              string      `json:"name"`
	Requests          int64       `json:"requests"`
	Failed            int64       `json:"failed"`
	BytesReceived     int64       `json:"bytes_received"`
	ConnectionsOpen   int64       `json:"connections_open"`
	ConnectionsOpened int64       `json:"connections_opened"`
	Duration          DurationDoc `json:"duration_seconds"`
}

// DurationDoc summarizes request durations; quantiles are estimates from
// the histogram's buckets, null before any request.
type DurationDoc struct {
	Count uint64   `json:"count"`
	Sum   float64  `json:"sum"`
	P50   *float64 `json:"p50"`
	P99   *float64 `json:"p99"`
}

// CacheDoc is the block cache.
type CacheDoc struct {
	CapacityBytes int64 `json:"capacity_bytes"`
	ResidentBytes int64 `json:"resident_bytes"`
	Hits          int64 `json:"hits"`   // block lookups answered from the cache
	Misses        int64 `json:"misses"` // block lookups that waited for a fetch
	Evictions     int64 `json:"evictions"`
}

// CreationDoc is a snapshot being made.
type CreationDoc struct {
	VM             string  `json:"vm"`
	Name           string  `json:"name"`
	ID             string  `json:"id,omitempty"`
	Started        string  `json:"started"`
	ElapsedSeconds float64 `json:"elapsed_seconds"`
	State          string  `json:"state"`
}

// DiskDoc is one disk (ids, as the platform gives them).
type DiskDoc struct {
	VM             string `json:"vm"`
	Snapshot       string `json:"snapshot"`
	Disk           string `json:"disk"`
	Open           bool   `json:"open"`
	Reads          int64  `json:"reads"`
	CacheBytes     int64  `json:"cache_bytes"`
	FetchBytes     int64  `json:"fetch_bytes"`
	HoleBytes      int64  `json:"hole_bytes"`
	PageCacheBytes int64  `json:"page_cache_bytes"`
	ReadRequests   int64  `json:"read_requests"`
	Fetches        int64  `json:"fetches"`
	FetchedBytes   int64  `json:"fetched_bytes"`
	FetchErrors    int64  `json:"fetch_errors"`
}

// DocumentVersion changes when a field changes meaning or goes.
const DocumentVersion = 1

// Document gathers the mount's counters: the tree's, the cache's and the
// platform meter's.
func (r *Root) Document() Document { return r.st.document() }

func (st *state) document() Document {
	now := time.Now()
	mr := st.meter.Read()
	doc := Document{
		Version: DocumentVersion, Time: now.UTC().Format(time.RFC3339Nano),
		UptimeSeconds: now.Sub(st.started).Seconds(), Platform: mr.Platform,
		Faults: map[string]int64{}, Retries: mr.Retries, GaveUp: mr.Exhausted, Errors: st.meters.errnoCounts(),
		Open:       map[string]int64{"disks": int64(st.pool.count()), "files": st.openFiles.Load(), "connections": 0},
		Transports: []TransportDoc{}, Creating: []CreationDoc{},
		Disks: st.meters.diskDocs(st.pool.openRefs()),
	}
	for _, k := range meter.FaultKinds {
		doc.Faults[k] = mr.Faults[k]
	}
	for _, t := range mr.Transports {
		doc.Transports = append(doc.Transports, TransportDoc{
			Name: t.Name, Requests: t.Requests, Failed: t.Failed, BytesReceived: t.BytesReceived,
			ConnectionsOpen: t.ConnsOpen, ConnectionsOpened: t.ConnsOpened,
			Duration: DurationDoc{Count: t.Durations.Count, Sum: t.Durations.SumSeconds,
				P50: quantile(t.Durations, 0.5), P99: quantile(t.Durations, 0.99)},
		})
		doc.Open["connections"] += t.ConnsOpen
	}
	for name, n := range mr.Held {
		doc.Open[name] = n
	}
	if st.cache != nil {
		cs := st.cache.Stats()
		doc.Cache = CacheDoc{CapacityBytes: cs.Capacity, ResidentBytes: cs.ResidentBytes, Hits: cs.Hits, Misses: cs.Misses, Evictions: cs.Evictions}
	}
	for _, c := range st.creations.list() {
		doc.Creating = append(doc.Creating, CreationDoc{
			VM: c.vm, Name: c.name, ID: c.id, Started: c.started.UTC().Format(time.RFC3339),
			ElapsedSeconds: math.Round(now.Sub(c.started).Seconds()*10) / 10, State: c.state,
		})
	}
	for _, d := range doc.Disks {
		doc.Reads.Reads += d.Reads
		doc.Reads.CacheBytes += d.CacheBytes
		doc.Reads.FetchBytes += d.FetchBytes
		doc.Reads.HoleBytes += d.HoleBytes
		doc.Reads.PageCacheBytes += d.PageCacheBytes
		doc.Reads.ReadRequests += d.ReadRequests
		doc.Fetches.Requests += d.Fetches
		doc.Fetches.Bytes += d.FetchedBytes
		doc.Fetches.Errors += d.FetchErrors
	}
	return doc
}

func quantile(h meter.HistogramReading, q float64) *float64 {
	v := h.Quantile(q)
	if math.IsNaN(v) {
		return nil
	}
	return &v
}

// Render is the document as JSON of at most limit bytes: the disks that
// fetched least are left out (and counted in disks_omitted) until it fits.
// The totals always cover every disk.
func (d Document) Render(limit int) []byte {
	all := d.Disks
	for keep := len(all); ; {
		d.Disks = all[:keep]
		d.Omitted = len(all) - keep
		b, err := json.Marshal(d)
		if err != nil { // only plain types: cannot happen
			return []byte(`{"version":1,"error":"stats could not be rendered"}`)
		}
		if len(b) <= limit || keep == 0 {
			return b
		}
		// Cut in proportion to the excess, at least one disk per try.
		per := len(b) / max(keep, 1)
		keep = max(0, keep-max(1, (len(b)-limit)/max(per, 1)+1))
	}
}
