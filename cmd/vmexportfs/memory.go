package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// meminfoPath is where Linux says how much memory the machine has.
const meminfoPath = "/proc/meminfo"

// checkMemory refuses a --cache-size the machine cannot hold. The soft
// memory limit is the cache plus the daemon's overhead, so a cache beyond
// physical memory is no limit at all: the heap grows until the kernel's OOM
// killer ends the mount. When meminfo cannot be read (no /proc) the size is
// taken as given, as before this check.
func checkMemory(size int64) error {
	f, err := os.Open(meminfoPath)
	if err != nil {
		return nil
	}
	defer f.Close()
	total, err := memTotal(f)
	if err != nil {
		return nil
	}
	if size > total {
		want, have := byteSize(size), byteSize(total)
		if want == have { // just above: the units would hide the difference
			want, have = strconv.FormatInt(size, 10)+" bytes", strconv.FormatInt(total, 10)+" bytes"
		}
		return fmt.Errorf("%s is more than this machine's memory (%s, MemTotal in %s); the block cache must fit in memory (the default 64M is enough for copies)",
			want, have, meminfoPath)
	}
	return nil
}

// memTotal reads MemTotal, in bytes, from text in /proc/meminfo's format
// ("MemTotal:       24684084 kB").
func memTotal(meminfo io.Reader) (int64, error) {
	sc := bufio.NewScanner(meminfo)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "MemTotal:")
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) != 2 || fields[1] != "kB" {
			return 0, fmt.Errorf("meminfo: MemTotal %q: want a number of kB", truncate(rest, 40))
		}
		kib, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil || kib <= 0 || kib > 1<<43 {
			return 0, fmt.Errorf("meminfo: MemTotal %q: want a number of kB", truncate(rest, 40))
		}
		return kib << 10, nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("meminfo: %w", err)
	}
	return 0, fmt.Errorf("meminfo: no MemTotal line")
}

// byteSize prints n with a binary unit, as --cache-size takes them.
func byteSize(n int64) string {
	const units = "KMGTPE"
	if n < 1<<10 {
		return strconv.FormatInt(n, 10) + " B"
	}
	v, i := float64(n)/(1<<10), 0
	for v >= 1<<10 && i < len(units)-1 {
		v, i = v/(1<<10), i+1
	}
	return strconv.FormatFloat(v, 'f', 1, 64) + " " + units[i:i+1] + "iB"
}
