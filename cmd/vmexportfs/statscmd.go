package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/pkg/xattr"
	"github.com/spf13/pflag"

	"github.com/vmexportfs/vmexportfs/backend/meter"
	"github.com/vmexportfs/vmexportfs/fs"
)

const (
	statsIntervalDefault = 2 * time.Second
	statsIntervalMin     = 200 * time.Millisecond
	// statsClear moves the cursor home and clears the screen.
	statsClear = "\x1b[H\x1b[2J"
	// statsMaxRunes is how much of a string from the document is shown.
	statsMaxRunes = 64
)

const statsSynopsis = "vmexportfs stats [--watch [--interval D]] [--json] MOUNTPOINT"

// statsFlags are the flags of the stats command.
func statsFlags(watch *bool, interval *time.Duration, asJSON *bool) *pflag.FlagSet {
	f := pflag.NewFlagSet("vmexportfs stats", pflag.ContinueOnError)
	f.SetOutput(io.Discard)
	f.BoolVarP(watch, "watch", "w", false, "redraw the table every interval, with rates since the previous one")
	f.DurationVar(interval, "interval", statsIntervalDefault, "how often --watch redraws (at least 200ms)")
	f.BoolVar(asJSON, "json", false, "print the stats document itself (indented JSON) once, instead of the table")
	return f
}

// runStats prints a mount's stats document as a table: once, refreshed
// every interval with --watch, or as the document itself with --json.
func runStats(ctx context.Context, args []string, stdout io.Writer) error {
	watch, interval, asJSON := new(bool), new(time.Duration), new(bool)
	f := statsFlags(watch, interval, asJSON)
	if err := f.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			_, werr := fmt.Fprintf(stdout, "usage: %s\n\nWhat a mounted vmexportfs is doing, from its %s xattr.\n\n%s", statsSynopsis, fs.StatsXattr, f.FlagUsages())
			return werr
		}
		return fmt.Errorf("%w: stats: %v", errUsage, err)
	}
	if f.NArg() != 1 {
		return fmt.Errorf("%w: stats: want one MOUNTPOINT: %s", errUsage, statsSynopsis)
	}
	if f.Changed("interval") {
		if !*watch {
			return fmt.Errorf("%w: stats: --interval is only meaningful with --watch", errUsage)
		}
		if *interval < statsIntervalMin {
			return fmt.Errorf("%w: stats: --interval %v: at least %v", errUsage, *interval, statsIntervalMin)
		}
	}
	if *watch && *asJSON {
		return fmt.Errorf("%w: stats: --json prints the document once; it does not go with --watch", errUsage)
	}
	mountpoint := f.Arg(0)

	if *asJSON {
		raw, _, err := readStats(mountpoint)
		if err != nil {
			return err
		}
		var buf bytes.Buffer
		if err := json.Indent(&buf, raw, "", "  "); err != nil { // decodeStats accepted it: cannot happen
			return fmt.Errorf("%s: stats document: %v", safePath(mountpoint), err)
		}
		buf.WriteByte('\n')
		_, err = stdout.Write(terminalSafeJSON(buf.Bytes()))
		return err
	}

	if !*watch {
		_, doc, err := readStats(mountpoint)
		if err != nil {
			return err
		}
		// Once, the rates are averaged over the whole uptime: against a
		// document of zero counters at uptime zero.
		var buf bytes.Buffer
		renderStats(&buf, mountpoint, doc, &fs.Document{Version: fs.DocumentVersion})
		_, err = stdout.Write(buf.Bytes())
		return err
	}
	return watchStats(ctx, mountpoint, *interval, stdout)
}

// watchStats redraws the table every interval until ctx is done.
func watchStats(ctx context.Context, mountpoint string, interval time.Duration, stdout io.Writer) error {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	var cur, prev *fs.Document
	for {
		if ctx.Err() != nil {
			return nil
		}
		_, doc, err := readStats(mountpoint)
		if err != nil {
			if ctx.Err() != nil { // interrupted while reading
				return nil
			}
			return err
		}
		// A document of the same uptime (the one a size query measured,
		// answered again) is no new sample: the rates stay those against
		// the one before.
		if cur == nil || doc.UptimeSeconds != cur.UptimeSeconds {
			prev, cur = cur, &doc
		}
		var buf bytes.Buffer
		buf.WriteString(statsClear)
		renderStats(&buf, mountpoint, *cur, prev)
		if _, err := stdout.Write(buf.Bytes()); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// readStats reads and decodes the stats document of a mountpoint; raw is
// the document as the mount gave it.
func readStats(mountpoint string) (raw []byte, doc fs.Document, err error) {
	raw, err = xattr.Get(mountpoint, fs.StatsXattr)
	if err != nil {
		name := safePath(mountpoint)
		if isNoXattr(err) {
			return nil, fs.Document{}, fmt.Errorf("%s: not a vmexportfs mount (no %s)", name, fs.StatsXattr)
		}
		var xe *xattr.Error
		if errors.As(err, &xe) {
			err = xe.Err
		}
		return nil, fs.Document{}, fmt.Errorf("%s: %w", name, err)
	}
	doc, err = decodeStats(raw)
	if err != nil {
		return nil, fs.Document{}, fmt.Errorf("%s: %w", safePath(mountpoint), err)
	}
	return raw, doc, nil
}

// isNoXattr is true for the errors of a file that has no such xattr, or a
// filesystem that has none at all.
func isNoXattr(err error) bool {
	return errors.Is(err, xattr.ENOATTR) || errors.Is(err, syscall.ENODATA) ||
		errors.Is(err, syscall.ENOTSUP) || errors.Is(err, syscall.EOPNOTSUPP)
}

// decodeStats parses a stats document, refusing what is not one of the
// version this command knows. Fields it does not know are ignored (they are
// added without a new version).
func decodeStats(b []byte) (fs.Document, error) {
	var d struct {
		fs.Document
		// Error is what a mount says when it could not render its counters.
		Error string `json:"error"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		return fs.Document{}, fmt.Errorf("stats document is not valid JSON: %v", err)
	}
	if d.Version != fs.DocumentVersion {
		return fs.Document{}, fmt.Errorf("stats document version %d, this vmexportfs knows version %d", d.Version, fs.DocumentVersion)
	}
	if d.Error != "" {
		return fs.Document{}, fmt.Errorf("mount reports: %s", safeString(d.Error))
	}
	return d.Document, nil
}

// renderStats writes the table of a document. prev is the document the
// rates are against: nil shows "-" for every rate (the first frame of
// --watch); a document of uptime zero gives the averages since the mount.
func renderStats(w io.Writer, mountpoint string, cur fs.Document, prev *fs.Document) {
	var b strings.Builder
	line := func(label, format string, a ...any) {
		fmt.Fprintf(&b, "%-11s %s\n", label, fmt.Sprintf(format, a...))
	}

	fmt.Fprintf(&b, "vmexportfs on %s  platform %s  up %s\n",
		safePath(mountpoint), safeString(orDash(cur.Platform)), fmtSeconds(cur.UptimeSeconds))

	r := cur.Reads
	waited, cached, holes := float64(r.FetchBytes), float64(r.CacheBytes), float64(r.HoleBytes)
	line("reads", "%d reads  %s served: %s from cache, %s waited for a fetch, %s holes",
		r.Reads, humanBytes(waited+cached+holes), humanBytes(cached), humanBytes(waited), humanBytes(holes))
	line("kernel", "%d READs reached the mount  %s stored in its page cache ahead of readers",
		r.ReadRequests, humanBytes(float64(r.PageCacheBytes)))

	line("platform", "%d disk reads  %s fetched  %d errors", cur.Fetches.Requests, humanBytes(float64(cur.Fetches.Bytes)), cur.Fetches.Errors)

	for _, t := range cur.Transports {
		failed := ""
		if t.Failed != 0 {
			failed = fmt.Sprintf(" (%d failed)", t.Failed)
		}
		line(safeLabel(t.Name), "%d requests%s  %s received  p50 %s p99 %s  conns %d open / %d opened",
			t.Requests, failed, humanBytes(float64(t.BytesReceived)),
			fmtLatency(t.Duration.P50), fmtLatency(t.Duration.P99), t.ConnectionsOpen, t.ConnectionsOpened)
	}

	renderRates(&b, cur, prev)

	var faults []string
	for _, k := range orderedKeys(cur.Faults, meter.FaultKinds) {
		faults = append(faults, fmt.Sprintf("%s %d", safeString(k), cur.Faults[k]))
	}
	line("faults", "%s   retries %d  gave up %d", orDash(strings.Join(faults, "  ")), cur.Retries, cur.GaveUp)

	var errs []string
	for _, k := range orderedKeys(cur.Errors, nil) {
		if cur.Errors[k] != 0 {
			errs = append(errs, fmt.Sprintf("%s %d", safeString(k), cur.Errors[k]))
		}
	}
	if len(errs) > 0 {
		line("errors", "%s", strings.Join(errs, "  "))
	}

	c := cur.Cache
	if c == (fs.CacheDoc{}) {
		line("cache", "off")
	} else {
		ratio := ""
		if lookups := float64(c.Hits) + float64(c.Misses); lookups > 0 && c.Hits >= 0 && c.Misses >= 0 {
			ratio = fmt.Sprintf(" (%.1f%%)", 100*float64(c.Hits)/lookups)
		}
		line("cache", "%s of %s   hits %d%s  misses %d  evictions %d",
			humanBytes(float64(c.ResidentBytes)), humanBytes(float64(c.CapacityBytes)), c.Hits, ratio, c.Misses, c.Evictions)
	}

	var open []string
	for _, k := range orderedKeys(cur.Open, []string{"disks", "files", "connections"}) {
		open = append(open, fmt.Sprintf("%s %d", safeString(k), cur.Open[k]))
	}
	if len(open) > 0 {
		line("open", "%s", strings.Join(open, "  "))
	}

	for i, cr := range cur.Creating {
		label := ""
		if i == 0 {
			label = "creating"
		}
		id := ""
		if cr.ID != "" {
			id = " [" + safeString(cr.ID) + "]"
		}
		line(label, "%s/%s%s  %s  %s", safeString(orDash(cr.VM)), safeString(orDash(cr.Name)), id,
			fmtSeconds(cr.ElapsedSeconds), safeString(orDefault(cr.State, "starting")))
	}

	if len(cur.Disks) > 0 || cur.Omitted != 0 {
		b.WriteString("disks\n")
	}
	if len(cur.Disks) > 0 {
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "  VM\tSNAPSHOT\tDISK\tOPEN\tREADS\tSERVED\tCACHE\tHOLES\tFETCHES\tFETCHED\tERRORS")
		for _, d := range cur.Disks {
			open := "no"
			if d.Open {
				open = "yes"
			}
			served := float64(d.CacheBytes) + float64(d.FetchBytes) + float64(d.HoleBytes)
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%d\t%s\t%d\n",
				safeString(orDash(d.VM)), safeString(orDash(d.Snapshot)), safeString(orDash(d.Disk)), open,
				d.Reads, humanBytes(served), humanBytes(float64(d.CacheBytes)), humanBytes(float64(d.HoleBytes)),
				d.Fetches, humanBytes(float64(d.FetchedBytes)), d.FetchErrors)
		}
		tw.Flush()
	}
	if cur.Omitted != 0 {
		fmt.Fprintf(&b, "  (%d more disks omitted to fit the stats xattr; the totals above count them)\n", cur.Omitted)
	}
	io.WriteString(w, b.String())
}

// renderRates writes the rates line: the counters' differences over the
// difference of uptime (the mount's clock, not this command's).
func renderRates(b *strings.Builder, cur fs.Document, prev *fs.Document) {
	window := "no previous sample"
	dt := math.NaN()
	if prev != nil {
		dt = cur.UptimeSeconds - prev.UptimeSeconds
		switch {
		case dt < 0:
			window = "mount restarted"
		case !(dt > 0):
			window = "no new sample"
		case prev.UptimeSeconds == 0:
			window = "average since mount"
		default:
			window = "last " + fmtSeconds(dt)
		}
	}
	rate := func(now, before int64) (float64, bool) {
		d := float64(now) - float64(before)
		if prev == nil || !(dt > 0) || d < 0 || math.IsInf(d/dt, 0) {
			return 0, false
		}
		return d / dt, true
	}
	byteRate := func(now, before int64) string {
		v, ok := rate(now, before)
		if !ok {
			return "-"
		}
		return humanBytes(v) + "/s"
	}
	var p fs.Document
	if prev != nil {
		p = *prev
	}
	served := func(r fs.ReadTotals) int64 { return sat(sat(r.CacheBytes, r.FetchBytes), r.HoleBytes) }
	parts := []string{
		"served " + byteRate(served(cur.Reads), served(p.Reads)),
		"fetched " + byteRate(cur.Fetches.Bytes, p.Fetches.Bytes),
	}
	for _, t := range cur.Transports {
		var before int64
		for _, pt := range p.Transports {
			if pt.Name == t.Name {
				before = pt.Requests
				break
			}
		}
		s := "-"
		if v, ok := rate(t.Requests, before); ok {
			s = fmt.Sprintf("%.1f req/s", v)
		}
		parts = append(parts, safeLabel(t.Name)+" "+s)
	}
	fmt.Fprintf(b, "%-11s %s   (%s)\n", "rates", strings.Join(parts, "  "), window)
}

// sat adds without wrapping around.
func sat(a, b int64) int64 {
	s := a + b
	switch {
	case a > 0 && b > 0 && s < 0:
		return math.MaxInt64
	case a < 0 && b < 0 && s >= 0:
		return math.MinInt64
	}
	return s
}

// orderedKeys are a map's keys: those of first that it has, in that order,
// then the rest sorted.
func orderedKeys(m map[string]int64, first []string) []string {
	var keys, rest []string
	for _, k := range first {
		if _, ok := m[k]; ok {
			keys = append(keys, k)
		}
	}
	for k := range m {
		if !slices.Contains(first, k) {
			rest = append(rest, k)
		}
	}
	slices.Sort(rest)
	return append(keys, rest...)
}

// humanBytes is a size in binary units, one decimal from KiB on.
func humanBytes(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "?"
	}
	sign := ""
	if v < 0 {
		sign, v = "-", -v
	}
	if v < 1024 {
		return fmt.Sprintf("%s%.0f B", sign, v)
	}
	units := []string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	i := 0
	for v /= 1024; v >= 1024 && i < len(units)-1; i++ {
		v /= 1024
	}
	// 1023.96 KiB rounds to "1024.0 KiB": show it as the next unit.
	if v >= 1023.95 && i < len(units)-1 {
		v, i = v/1024, i+1
	}
	return fmt.Sprintf("%s%.1f %s", sign, v, units[i])
}

// fmtSeconds is a duration for a person: 42s, 5m07s, 1h02m, 3d04h.
func fmtSeconds(s float64) string {
	switch {
	case math.IsNaN(s) || s < 0:
		return "?"
	case s >= 1e4*86400: // beyond a number of days worth showing
		return ">10000d"
	case s < 10:
		return strconv.FormatFloat(math.Floor(s*10)/10, 'f', -1, 64) + "s"
	}
	n := int64(s)
	switch {
	case n < 60:
		return fmt.Sprintf("%ds", n)
	case n < 3600:
		return fmt.Sprintf("%dm%02ds", n/60, n%60)
	case n < 86400:
		return fmt.Sprintf("%dh%02dm", n/3600, n%3600/60)
	}
	return fmt.Sprintf("%dd%02dh", n/86400, n%86400/3600)
}

// fmtLatency is a request duration (seconds); nil before any request.
func fmtLatency(p *float64) string {
	if p == nil || math.IsNaN(*p) || *p < 0 {
		return "-"
	}
	v := *p
	switch {
	case v < 0.01:
		return fmt.Sprintf("%.1fms", v*1000)
	case v < 1:
		return fmt.Sprintf("%.0fms", v*1000)
	case v < 1e6:
		return fmt.Sprintf("%.1fs", v)
	}
	return ">1e6s"
}

func orDash(s string) string { return orDefault(s, "-") }

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// safeLabel is a string from the document used as a line's label.
func safeLabel(s string) string { return safeString(orDash(s)) }

// safeString makes a string from the document safe to print to a terminal:
// invalid UTF-8 and every rune that is not printable (control characters,
// escapes, bidi overrides, line separators, tabs) turn into '?', and it is
// cut to statsMaxRunes runes with "…".
func safeString(s string) string { return sanitize(s, statsMaxRunes) }

// safePath is the mountpoint the user gave, made as safe, cut only if absurd.
func safePath(s string) string { return sanitize(s, 1024) }

func sanitize(s string, limit int) string {
	var b strings.Builder
	n := 0
	for i, r := range s {
		if n == limit {
			if i < len(s) {
				b.WriteString("…")
			}
			break
		}
		n++
		if r == utf8.RuneError || !unicode.IsPrint(r) {
			b.WriteByte('?')
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// terminalSafeJSON escapes, in valid JSON, the runes a terminal could act
// on that encoding/json leaves raw (C1 controls, bidi overrides; invalid
// UTF-8 becomes \ufffd). Outside strings JSON is printable ASCII and
// whitespace, so every such rune is inside a string, where \u escapes mean
// the same.
func terminalSafeJSON(b []byte) []byte {
	out := make([]byte, 0, len(b))
	for len(b) > 0 {
		r, size := utf8.DecodeRune(b)
		switch {
		case r == 0x7f: // DEL is the one ASCII control JSON allows raw
			out = append(out, `\u007f`...)
		case r < utf8.RuneSelf:
			out = append(out, b[0])
		case r == utf8.RuneError && size == 1:
			out = append(out, `\ufffd`...)
		case !unicode.IsPrint(r):
			if r1, r2 := utf16.EncodeRune(r); r1 != unicode.ReplacementChar {
				out = fmt.Appendf(out, `\u%04x\u%04x`, r1, r2)
			} else {
				out = fmt.Appendf(out, `\u%04x`, r)
			}
		default:
			out = append(out, b[:size]...)
		}
		b = b[size:]
	}
	return out
}
