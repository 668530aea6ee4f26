package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/pkg/xattr"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/testenv"
	"github.com/vmexportfs/vmexportfs/fs"
)

func ptr(v float64) *float64 { return &v }

// statsSample is a busy mount's document, as fs.Document renders it.
func statsSample() fs.Document {
	return fs.Document{
		Version: 1, Time: "2025-01-02T03:04:05Z", UptimeSeconds: 3725, Platform: "coriolis",
		Reads:   fs.ReadTotals{Reads: 12345, FetchBytes: 800 * mib, CacheBytes: 300 * mib, HoleBytes: 100 * mib, PageCacheBytes: 200 * mib, ReadRequests: 678},
		Fetches: fs.FetchTotals{Requests: 345, Bytes: gib, Errors: 0},
		Transports: []fs.TransportDoc{{
			Name: "http", Requests: 400, Failed: 3, BytesReceived: gib + gib/10,
			ConnectionsOpen: 4, ConnectionsOpened: 9,
			Duration: fs.DurationDoc{Count: 400, Sum: 8, P50: ptr(0.012), P99: ptr(0.080)},
		}},
		Faults:  map[string]int64{"timeout": 0, "connection": 2, "status": 1, "auth": 0, "protocol": 0},
		Retries: 3, GaveUp: 0,
		Errors: map[string]int64{"EIO": 1},
		Cache:  fs.CacheDoc{CapacityBytes: 64 * mib, ResidentBytes: 48 * mib, Hits: 900, Misses: 300, Evictions: 12},
		Open:   map[string]int64{"disks": 2, "files": 1, "connections": 4, "transfers": 1},
		Creating: []fs.CreationDoc{{
			VM: "vm-a", Name: "nightly", Started: "2025-01-02T03:03:23Z", ElapsedSeconds: 42,
			State: "waiting for export nightly Ready: phase Pending",
		}},
		Disks: []fs.DiskDoc{
			{VM: "vm-a", Snapshot: "snap-1", Disk: "disk-0", Open: true, Reads: 10000,
				CacheBytes: 200 * mib, FetchBytes: 700 * mib, HoleBytes: 100 * mib,
				Fetches: 300, FetchedBytes: 900 * mib, FetchErrors: 0},
			{VM: "vm-b", Snapshot: "snap-9", Disk: "disk-1", Open: false, Reads: 2345,
				CacheBytes: 100 * mib, FetchBytes: 100 * mib,
				Fetches: 45, FetchedBytes: 124 * mib, FetchErrors: 2},
		},
		Omitted: 7,
	}
}

// statsQuiet is a mount that has done nothing.
func statsQuiet() fs.Document {
	return fs.Document{
		Version: 1, UptimeSeconds: 5, Platform: "kubevirt",
		Faults: map[string]int64{"timeout": 0, "connection": 0, "status": 0, "auth": 0, "protocol": 0},
		Errors: map[string]int64{}, Open: map[string]int64{"disks": 0, "files": 0, "connections": 0},
		Creating: []fs.CreationDoc{}, Disks: []fs.DiskDoc{}, Transports: []fs.TransportDoc{},
	}
}

func renderString(mountpoint string, cur fs.Document, prev *fs.Document) string {
	var b bytes.Buffer
	renderStats(&b, mountpoint, cur, prev)
	return b.String()
}

// lineOf is the first line of out starting with label.
func lineOf(t *testing.T, out, label string) string {
	t.Helper()
	for l := range strings.SplitSeq(out, "\n") {
		if strings.HasPrefix(l, label) {
			return l
		}
	}
	t.Fatalf("no line %q in:\n%s", label, out)
	return ""
}

// labels are the first words of out's lines.
func labels(out string) []string {
	var l []string
	for line := range strings.SplitSeq(out, "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			l = append(l, f[0])
		}
	}
	return l
}

func TestStatsRender(t *testing.T) {
	out := renderString("/mnt/vms", statsSample(), nil)
	t.Log("\n" + out)

	cases := []struct {
		label string
		want  []string
	}{
		{"vmexportfs on", []string{"/mnt/vms", "platform coriolis", "up 1h02m"}},
		{"reads", []string{"12345 reads", "1.2 GiB served", "300.0 MiB from cache", "800.0 MiB waited for a fetch", "100.0 MiB holes"}},
		{"kernel", []string{"678 READs reached the mount", "200.0 MiB stored in its page cache"}},
		{"platform", []string{"345 disk reads", "1.0 GiB fetched", "0 errors"}},
		{"http", []string{"400 requests (3 failed)", "1.1 GiB received", "p50 12ms", "p99 80ms", "conns 4 open / 9 opened"}},
		{"rates", []string{"served -", "fetched -", "http -", "no previous sample"}},
		{"faults", []string{"timeout 0  connection 2  status 1  auth 0  protocol 0", "retries 3", "gave up 0"}},
		{"errors", []string{"EIO 1"}},
		{"cache", []string{"48.0 MiB of 64.0 MiB", "hits 900 (75.0%)", "misses 300", "evictions 12"}},
		{"open", []string{"disks 2  files 1  connections 4  transfers 1"}},
		{"creating", []string{"vm-a/nightly", "42s", "waiting for export nightly Ready: phase Pending"}},
		{"  VM ", []string{"SNAPSHOT", "DISK", "OPEN", "READS", "SERVED", "CACHE", "HOLES", "FETCHES", "FETCHED", "ERRORS"}},
		{"  vm-a ", []string{"snap-1", "disk-0", "yes", "10000", "1000.0 MiB", "200.0 MiB", "100.0 MiB", "300", "900.0 MiB"}},
		{"  vm-b ", []string{"snap-9", "disk-1", "no", "2345", "200.0 MiB", "0 B", "45", "124.0 MiB", " 2"}},
		{"  (7 more disks omitted", nil},
	}
	for _, c := range cases {
		t.Run(strings.TrimSpace(c.label), func(t *testing.T) {
			l := lineOf(t, out, c.label)
			for _, w := range c.want {
				assert.Contains(t, l, w)
			}
		})
	}
	assert.Contains(t, out, "\ndisks\n")
	// The disk table's columns line up.
	hdr, row := lineOf(t, out, "  VM "), lineOf(t, out, "  vm-a ")
	assert.Equal(t, strings.Index(hdr, "SNAPSHOT"), strings.Index(row, "snap-1"))
	assert.Equal(t, strings.Index(hdr, "ERRORS"), strings.LastIndex(row, " 0")+1)
}

func TestStatsRenderOmitsEmptySections(t *testing.T) {
	out := renderString("/mnt/q", statsQuiet(), nil)
	t.Log("\n" + out)
	for _, absent := range []string{"errors", "creating", "disks", "http"} {
		assert.NotContains(t, labels(out), absent)
	}
	assert.NotContains(t, out, "omitted")
	assert.Contains(t, lineOf(t, out, "cache"), "off")
	assert.Contains(t, lineOf(t, out, "reads"), "0 reads  0 B served")
	assert.Contains(t, lineOf(t, out, "open"), "disks 0  files 0  connections 0")

	// Zero counts in errors are no errors; omitted disks alone still show.
	d := statsQuiet()
	d.Errors = map[string]int64{"EIO": 0}
	d.Omitted = 3
	out = renderString("/mnt/q", d, nil)
	assert.NotContains(t, labels(out), "errors")
	assert.Contains(t, out, "disks\n  (3 more disks omitted")
	assert.NotContains(t, out, "  VM ")
}

func TestStatsRates(t *testing.T) {
	base := statsSample()
	later := func(dt float64, edit func(*fs.Document)) fs.Document {
		d := statsSample()
		d.UptimeSeconds = base.UptimeSeconds + dt
		d.Transports = []fs.TransportDoc{base.Transports[0]}
		if edit != nil {
			edit(&d)
		}
		return d
	}
	cases := []struct {
		name       string
		cur        fs.Document
		prev       *fs.Document
		want, lack []string
	}{
		{"first frame", base, nil, []string{"served -", "fetched -", "http -", "(no previous sample)"}, []string{"/s"}},
		{"100 MiB fetched in 10s", later(10, func(d *fs.Document) {
			d.Fetches.Bytes += 100 * mib
			d.Reads.FetchBytes += 50 * mib
			d.Reads.CacheBytes += 150 * mib
			d.Transports[0].Requests += 25
		}), &base, []string{"fetched 10.0 MiB/s", "served 20.0 MiB/s", "http 2.5 req/s", "(last 10s)"}, nil},
		{"nothing happened", later(2, nil), &base,
			[]string{"served 0 B/s", "fetched 0 B/s", "http 0.0 req/s", "(last 2s)"}, nil},
		// The rates use the mount's uptime, whatever the wall clock did.
		{"uptime not wall clock", later(0.5, func(d *fs.Document) {
			d.Time = "2030-01-01T00:00:00Z"
			d.Fetches.Bytes += mib
		}), &base, []string{"fetched 2.0 MiB/s", "(last 0.5s)"}, nil},
		{"same sample", base, &base, []string{"served -", "fetched -", "(no new sample)"}, []string{"/s"}},
		{"mount restarted", func() fs.Document { d := statsQuiet(); d.Transports = base.Transports; return d }(), &base,
			[]string{"served -", "(mount restarted)"}, []string{"/s"}},
		{"counter went back", later(10, func(d *fs.Document) { d.Fetches.Bytes = 0 }), &base,
			[]string{"fetched -", "served 0 B/s"}, nil},
		{"new transport", later(4, func(d *fs.Document) {
			d.Transports = append(d.Transports, fs.TransportDoc{Name: "nbd", Requests: 40})
		}), &base, []string{"nbd 10.0 req/s"}, nil},
		{"average since mount", base, &fs.Document{Version: 1},
			[]string{"fetched 281.5 KiB/s", "(average since mount)"}, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := lineOf(t, renderString("/m", c.cur, c.prev), "rates")
			t.Log(l)
			for _, w := range c.want {
				assert.Contains(t, l, w)
			}
			for _, w := range c.lack {
				assert.NotContains(t, l, w)
			}
		})
	}
}

// noRawControls fails if s has a byte a terminal could act on.
func noRawControls(t *testing.T, s string) {
	t.Helper()
	assert.True(t, utf8.ValidString(s), "invalid UTF-8 in %q", s)
	for _, r := range s {
		if r != '\n' {
			assert.True(t, unicode.IsPrint(r), "raw %U in %q", r, s)
		}
	}
}

func TestStatsHostileStrings(t *testing.T) {
	evil := "vm\x1b[2J\n\xff\xfe\u202eevil\u2028\u009b31m\t"
	d := statsSample()
	d.Platform = evil
	d.Disks[0].VM = evil
	d.Disks[0].Snapshot = strings.Repeat("s", 500)
	d.Disks[1].Disk = "\x00\x07"
	d.Creating[0].State = evil
	d.Creating[0].ID = evil
	d.Errors[evil] = 4
	d.Faults[evil] = 1
	d.Open[evil] = 2
	d.Transports = append(d.Transports, fs.TransportDoc{Name: evil})

	out := renderString("/mnt/\x1b]0;title\x07", d, &fs.Document{Version: 1})
	t.Log("\n" + out)
	noRawControls(t, out)
	assert.Contains(t, out, "platform vm?[2J????evil??31m?  up")
	assert.Contains(t, out, "  vm?[2J????evil??31m?  ssss")
	assert.Contains(t, out, strings.Repeat("s", 64)+"…")
	assert.NotContains(t, out, strings.Repeat("s", 65))
	// Each disk is still one row of the table.
	assert.Equal(t, 1, strings.Count(out, "snap-9"))
	assert.Len(t, strings.Split(strings.TrimSuffix(out[strings.Index(out, "\ndisks\n")+1:], "\n"), "\n"), 5)
}

func TestStatsSafeString(t *testing.T) {
	cases := []struct{ in, want string }{
		{"", ""},
		{"vm-a", "vm-a"},
		{"tab\there", "tab?here"},
		{"esc\x1b[31m", "esc?[31m"},
		{"bad\xffutf8", "bad?utf8"},
		{"bidi\u202eoverride", "bidi?override"},
		{"c1\u009bcsi", "c1?csi"},
		{"unicode ok: déjà vu 日本", "unicode ok: déjà vu 日本"},
		{strings.Repeat("é", 64), strings.Repeat("é", 64)},
		{strings.Repeat("é", 65), strings.Repeat("é", 64) + "…"},
	}
	for _, c := range cases {
		assert.Equal(t, c.want, safeString(c.in), "%q", c.in)
	}
	// The mountpoint the user gave is made safe but not cut.
	long := "/mnt/" + strings.Repeat("d", 200)
	assert.Equal(t, long, safePath(long))
	assert.Equal(t, "/mnt/?[2J", safePath("/mnt/\x1b[2J"))
}

func TestStatsHumanSizes(t *testing.T) {
	cases := []struct {
		in   float64
		want string
	}{
		{0, "0 B"},
		{1023, "1023 B"},
		{1024, "1.0 KiB"},
		{1536, "1.5 KiB"},
		{float64(mib) - 1, "1.0 MiB"},
		{float64(300 * mib), "300.0 MiB"},
		{float64(gib + gib/5), "1.2 GiB"},
		{float64(5 << 40), "5.0 TiB"},
		{math.MaxInt64, "8.0 EiB"},
		{-2048, "-2.0 KiB"},
		{math.Inf(1), "?"},
	}
	for _, c := range cases {
		assert.Equal(t, c.want, humanBytes(c.in), "%v", c.in)
	}
	durations := []struct {
		in   float64
		want string
	}{
		{0, "0s"}, {4.25, "4.2s"}, {42, "42s"}, {307, "5m07s"}, {3725, "1h02m"}, {273600, "3d04h"},
		{-1, "?"}, {1e300, ">10000d"},
	}
	for _, c := range durations {
		assert.Equal(t, c.want, fmtSeconds(c.in), "%v", c.in)
	}
	assert.Equal(t, "-", fmtLatency(nil))
	assert.Equal(t, "0.4ms", fmtLatency(ptr(0.0004)))
	assert.Equal(t, "12ms", fmtLatency(ptr(0.012)))
	assert.Equal(t, "2.5s", fmtLatency(ptr(2.5)))
}

func TestDecodeStats(t *testing.T) {
	valid, err := json.Marshal(statsSample())
	require.NoError(t, err)
	doc, err := decodeStats(valid)
	require.NoError(t, err)
	assert.Equal(t, statsSample(), doc)

	// Fields this command does not know are ignored.
	doc, err = decodeStats([]byte(`{"version":1,"platform":"x","new_thing":{"a":[1,2]}}`))
	require.NoError(t, err)
	assert.Equal(t, "x", doc.Platform)

	cases := []struct {
		name, in, msg string
	}{
		{"empty", ``, "not valid JSON"},
		{"garbage", "\x00\xff{{", "not valid JSON"},
		{"truncated", string(valid[:len(valid)/2]), "not valid JSON"},
		{"trailing", string(valid) + "}", "not valid JSON"},
		{"array", `[1,2]`, "not valid JSON"},
		{"null", `null`, "version 0"},
		{"no version", `{"platform":"x"}`, "version 0"},
		{"version 2", `{"version":2}`, "version 2, this vmexportfs knows version 1"},
		{"string version", `{"version":"1"}`, "not valid JSON"},
		{"wrong type", `{"version":1,"reads":{"reads":"many"}}`, "not valid JSON"},
		{"overflow", `{"version":1,"retries":1e40}`, "not valid JSON"},
		{"mount error", `{"version":1,"error":"stats could not be rendered\u001b[2J"}`, "mount reports: stats could not be rendered?[2J"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := decodeStats([]byte(c.in))
			require.Error(t, err)
			assert.Contains(t, err.Error(), c.msg)
		})
	}
}

func FuzzDecodeStats(f *testing.F) {
	valid, err := json.Marshal(statsSample())
	require.NoError(f, err)
	f.Add(valid)
	quiet, err := json.Marshal(statsQuiet())
	require.NoError(f, err)
	f.Add(quiet)
	f.Add([]byte(`{"version":1,"uptime_seconds":1e308,"disks":[{"vm":"\u001b\ud800"}],"faults":{"":-9223372036854775808}}`))
	f.Add([]byte(`{"version":1,"transports":[{"name":"http","duration_seconds":{"p50":-1e308,"p99":1e308}}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		doc, err := decodeStats(b)
		if err != nil {
			return
		}
		prev := statsSample()
		for _, p := range []*fs.Document{nil, &prev, &doc, {Version: 1}} {
			out := renderString("/m", doc, p)
			noRawControls(t, out)
			renderString("/m", prev, &doc)
		}
		var js bytes.Buffer
		require.NoError(t, json.Indent(&js, b, "", "  "))
		safe := terminalSafeJSON(js.Bytes())
		require.True(t, json.Valid(safe), "%q", safe)
		noRawControls(t, strings.NewReplacer("\t", "", "\r", "").Replace(string(safe)))
	})
}

func TestStatsTerminalSafeJSON(t *testing.T) {
	in := []byte("{\"vm\": \"a\u009bb\u202ec\xffd\x7fe😀\"}")
	out := terminalSafeJSON(in)
	assert.Equal(t, `{"vm": "a\u009bb\u202ec\ufffdd\u007fe😀"}`, string(out))
	var v map[string]string
	require.NoError(t, json.Unmarshal(out, &v))
	assert.Equal(t, "a\u009bb\u202ec\ufffdd\x7fe😀", v["vm"])
}

func TestStatsBadInvocations(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		name string
		args []string
		msg  string
	}{
		{"no arguments", nil, "want one MOUNTPOINT: vmexportfs stats [--watch"},
		{"two mountpoints", []string{dir, dir}, "want one MOUNTPOINT"},
		{"unknown flag", []string{"--bogus", dir}, "unknown flag"},
		{"interval too short", []string{"--watch", "--interval", "1ms", dir}, "at least 200ms"},
		{"interval not a duration", []string{"--watch", "--interval", "often", dir}, "--interval"},
		{"interval without watch", []string{"--interval", "1s", dir}, "only meaningful with --watch"},
		{"json with watch", []string{"--json", "--watch", dir}, "--json"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var out bytes.Buffer
			err := runStats(context.Background(), c.args, &out)
			require.ErrorIs(t, err, errUsage)
			assert.Contains(t, err.Error(), c.msg)
			assert.Empty(t, out.String())
		})
	}
	// Through run: exit status 2.
	var stdout, stderr bytes.Buffer
	assert.Equal(t, 2, run(context.Background(), []string{"stats"}, &stdout, &stderr))
	assert.Equal(t, "vmexportfs: usage: stats: want one MOUNTPOINT: vmexportfs stats [--watch [--interval D]] [--json] MOUNTPOINT\n", stderr.String())
}

func TestStatsHelp(t *testing.T) {
	for _, arg := range []string{"-h", "--help"} {
		var out bytes.Buffer
		require.NoError(t, runStats(context.Background(), []string{arg}, &out))
		assert.Contains(t, out.String(), "usage: vmexportfs stats")
		assert.Contains(t, out.String(), "--interval")
		assert.Contains(t, out.String(), "--json")
	}
}

func TestStatsNotAMount(t *testing.T) {
	dir := t.TempDir()
	for _, args := range [][]string{{dir}, {"--json", dir}, {"--watch", dir}} {
		var out bytes.Buffer
		err := runStats(context.Background(), args, &out)
		require.Error(t, err)
		assert.NotErrorIs(t, err, errUsage)
		assert.Equal(t, dir+": not a vmexportfs mount (no user.vmexport.stats)", err.Error())
		assert.Empty(t, out.String())
	}
	err := runStats(context.Background(), []string{dir + "/nope"}, &bytes.Buffer{})
	require.ErrorIs(t, err, syscall.ENOENT)
	assert.Equal(t, dir+"/nope: no such file or directory", err.Error())
}

// fakeMount is a directory with a stats xattr of its own, as a mount's
// root answers it; the filesystem of the test's temporary directories must
// have user xattrs.
func fakeMount(t *testing.T, doc []byte) string {
	t.Helper()
	dir := t.TempDir()
	if err := xattr.Set(dir, fs.StatsXattr, doc); err != nil {
		if errors.Is(err, syscall.ENOTSUP) || errors.Is(err, syscall.EOPNOTSUPP) {
			testenv.Missing(t, "user extended attributes on "+dir, "set TMPDIR to a filesystem that has them (ext4, xfs, tmpfs since Linux 6.6)")
		}
		require.NoError(t, err)
	}
	return dir
}

func TestStatsOnce(t *testing.T) {
	b, err := json.Marshal(statsSample())
	require.NoError(t, err)
	dir := fakeMount(t, b)

	var out bytes.Buffer
	require.NoError(t, runStats(context.Background(), []string{dir}, &out))
	assert.True(t, strings.HasPrefix(out.String(), "vmexportfs on "+dir+"  platform coriolis  up 1h02m\n"), out.String())
	assert.NotContains(t, out.String(), "\x1b")
	assert.Contains(t, lineOf(t, out.String(), "rates"), "(average since mount)")

	// --json: the document itself, indented, fields in the mount's order.
	out.Reset()
	require.NoError(t, runStats(context.Background(), []string{"--json", dir}, &out))
	assert.True(t, strings.HasPrefix(out.String(), "{\n  \"version\": 1,\n  \"time\": "), out.String())
	assert.True(t, strings.HasSuffix(out.String(), "}\n"))
	var back fs.Document
	require.NoError(t, json.Unmarshal(out.Bytes(), &back))
	assert.Equal(t, statsSample(), back)

	// A document that is not one.
	for _, bad := range []string{"garbage", `{"version":7}`} {
		require.NoError(t, xattr.Set(dir, fs.StatsXattr, []byte(bad)))
		for _, args := range [][]string{{dir}, {"--json", dir}} {
			err := runStats(context.Background(), args, &bytes.Buffer{})
			require.Error(t, err)
			assert.True(t, strings.HasPrefix(err.Error(), dir+": stats document"), err.Error())
		}
	}
}

func TestStatsWatch(t *testing.T) {
	doc := statsSample()
	set := func(t *testing.T, dir string, d fs.Document) {
		b, err := json.Marshal(d)
		require.NoError(t, err)
		require.NoError(t, xattr.Set(dir, fs.StatsXattr, b))
	}
	b, err := json.Marshal(doc)
	require.NoError(t, err)
	dir := fakeMount(t, b)

	t.Run("rates then stop", func(t *testing.T) {
		set(t, dir, doc)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var out syncBuffer
		done := make(chan error, 1)
		go func() { done <- runStats(ctx, []string{"--watch", "--interval", "200ms", dir}, &out) }()

		frames := func() []string { return strings.Split(out.String(), statsClear)[1:] }
		require.Eventually(t, func() bool { return len(frames()) >= 1 }, 5*time.Second, 10*time.Millisecond)
		assert.Contains(t, lineOf(t, frames()[0], "rates"), "(no previous sample)")

		next := doc
		next.UptimeSeconds += 10
		next.Fetches.Bytes += 100 * mib
		set(t, dir, next)
		require.Eventually(t, func() bool {
			f := frames()
			return strings.Contains(f[len(f)-1], "fetched 10.0 MiB/s")
		}, 5*time.Second, 10*time.Millisecond)

		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(5 * time.Second):
			t.Fatal("--watch did not stop when its context was done")
		}
		assert.True(t, strings.HasPrefix(out.String(), statsClear))
		for _, f := range frames() {
			assert.True(t, strings.HasPrefix(f, "vmexportfs on "+dir), f)
		}
	})

	t.Run("mount gone", func(t *testing.T) {
		set(t, dir, doc)
		var out syncBuffer
		done := make(chan error, 1)
		go func() { done <- runStats(context.Background(), []string{"--watch", "--interval", "200ms", dir}, &out) }()
		require.Eventually(t, func() bool { return strings.Contains(out.String(), "vmexportfs on") }, 5*time.Second, 10*time.Millisecond)
		require.NoError(t, xattr.Remove(dir, fs.StatsXattr))
		select {
		case err := <-done:
			require.Error(t, err)
			assert.Contains(t, err.Error(), "not a vmexportfs mount")
		case <-time.After(5 * time.Second):
			t.Fatal("--watch went on without its mount")
		}
	})
}
