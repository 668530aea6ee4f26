package main

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// mountOptions is what `-o a=b,c` may say. mount(8) and mount.fuse3 pass the
// fstab options this way, so every long flag that makes sense in fstab has
// an -o spelling with '_' for '-'.
type mountOptions struct {
	set        map[string]string // flag name (with '-') → value
	allowOther bool
	debug      bool
}

// Generic mount(8) options that carry no meaning for a FUSE daemon; they are
// accepted so that an fstab line with them mounts.
var ignoredMountOptions = map[string]bool{
	"rw": true, "ro": true, "dev": true, "nodev": true, "suid": true, "nosuid": true,
	"exec": true, "noexec": true, "auto": true, "noauto": true, "user": true, "nouser": true,
	"users": true, "_netdev": true, "nofail": true, "defaults": true, "atime": true,
	"noatime": true, "relatime": true, "diratime": true, "nodiratime": true, "async": true,
}

// flagOptions are the -o keys that map onto long flags.
var flagOptions = map[string]bool{
	"username": true, "password-file": true, "ca-file": true, "cache-size": true,
	"state-dir": true, "cache-dir": true, "list-ttl": true, "log-level": true, "log-file": true,
	"read-timeout": true, "retries": true,
	"kubeconfig": true, "token-file": true, "export-status": true, "kubevirt-internal": true, "kubevirt-volume": true, "ready-timeout": true,
}

// secretOptions must never be given on a command line: argv is world-readable
// in /proc/<pid>/cmdline.
var secretOptions = map[string]string{
	"password": "use password_file=FILE or the VMEXPORTFS_PASSWORD environment variable",
	"token":    "use token_file=FILE",
}

// parseMountOptions parses the comma-separated lists given with -o.
func parseMountOptions(lists []string) (mountOptions, error) {
	mo := mountOptions{set: map[string]string{}}
	for _, list := range lists {
		for _, item := range strings.Split(list, ",") {
			if item == "" {
				continue
			}
			key, value, hasValue := strings.Cut(item, "=")
			name := strings.ReplaceAll(key, "_", "-")
			if key == "_netdev" {
				name = key
			}
			switch {
			case secretOptions[name] != "":
				return mountOptions{}, fmt.Errorf("-o %s: secrets are not accepted as options; %s", key, secretOptions[name])
			case name == "allow-other" && !hasValue:
				mo.allowOther = true
			case name == "debug" && !hasValue:
				mo.debug = true
			case ignoredMountOptions[name] && !hasValue:
			case flagOptions[name]:
				if !hasValue || value == "" {
					return mountOptions{}, fmt.Errorf("-o %s: needs a value (%s=...)", key, key)
				}
				mo.set[name] = value
			default:
				return mountOptions{}, fmt.Errorf("-o %q: unknown mount option", truncate(item, 64))
			}
		}
	}
	return mo, nil
}

// parseSize reads a byte count such as 256M, 1.5GiB or 4096.
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "i")
	mult := float64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'k', 'K':
			mult = 1 << 10
		case 'm', 'M':
			mult = 1 << 20
		case 'g', 'G':
			mult = 1 << 30
		case 't', 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			t = t[:n-1]
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || t == "" {
		return 0, fmt.Errorf("size %q: want a number with an optional K, M, G or T suffix", truncate(s, 32))
	}
	bytes := v * mult
	if math.IsNaN(bytes) || bytes < 0 || bytes >= math.MaxInt64 {
		return 0, fmt.Errorf("size %q: out of range", truncate(s, 32))
	}
	return int64(bytes), nil
}

var errUsage = errors.New("usage")

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
