package main

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/spf13/pflag"

	"github.com/vmexportfs/vmexportfs/backend/platform"
)

// mountOptions is what `-o a=b,c` may say. mount(8) and mount.fuse3 pass the
// fstab options this way, so every long flag that makes sense in fstab has
// an -o spelling with '_' for '-'.
type mountOptions struct {
	set        map[string]string // flag name (with '-') → value
	allowOther bool
	debug      bool
	readOnly   bool // ro
}

// Generic mount(8) options that carry no meaning for a FUSE daemon; they are
// accepted so that an fstab line with them mounts.
var ignoredMountOptions = map[string]bool{
	"rw": true, "dev": true, "nodev": true, "suid": true, "nosuid": true,
	"exec": true, "noexec": true, "auto": true, "noauto": true, "user": true, "nouser": true,
	"users": true, "_netdev": true, "nofail": true, "defaults": true, "atime": true,
	"noatime": true, "relatime": true, "diratime": true, "nodiratime": true, "async": true,
}

// commonOptions are the common long flags that have an -o spelling; every
// platform flag has one too (see optionTable).
var commonOptions = []string{
	"username", "password-file", "ca-file", "cache-size", "state-dir", "cache-dir", "list-ttl",
	"log-level", "log-file", "log-format", "read-timeout", "retries", "metrics-addr", "progress-interval",
}

// commonRefused are the secrets of the common flags, which must never be
// given on a command line: argv is world-readable in /proc/<pid>/cmdline.
var commonRefused = map[string]string{
	"password": "use password_file=FILE or the " + passwordEnv + " environment variable",
}

// optionTable is what -o accepts, derived from the common flags and the
// registry: flag names (with '-') that -o sets, and refused keys with the
// advice given instead.
type optionTable struct {
	flags   map[string]bool
	refused map[string]string
}

func newOptionTable(ps []registered) optionTable {
	t := optionTable{flags: map[string]bool{}, refused: map[string]string{}}
	for _, name := range commonOptions {
		t.flags[name] = true
	}
	maps.Copy(t.refused, commonRefused)
	for _, p := range ps {
		p.flags.VisitAll(func(fl *pflag.Flag) { t.flags[fl.Name] = true })
		for key, advice := range p.RefusedOptions {
			t.refused[strings.ReplaceAll(key, "_", "-")] = advice
		}
	}
	for key := range t.refused {
		if t.flags[key] {
			panic(fmt.Sprintf("-o %s is both a flag and refused", key))
		}
	}
	return t
}

// defaultOptions is the option table of the registry.
var defaultOptions = func() optionTable {
	var cfg mountConfig
	newMountFlags(&cfg, new(string), new([]string), platforms())
	return newOptionTable(cfg.platforms)
}()

// flagOptions are the -o keys that map onto long flags, for the registry.
var flagOptions = defaultOptions.flags

// parseMountOptions parses the comma-separated lists given with -o, for the
// registry.
func parseMountOptions(lists []string) (mountOptions, error) {
	return defaultOptions.parse(lists)
}

// parse parses the comma-separated lists given with -o.
func (t optionTable) parse(lists []string) (mountOptions, error) {
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
			case t.refused[name] != "":
				return mountOptions{}, fmt.Errorf("-o %s: secrets are not accepted as options; %s", key, t.refused[name])
			case name == "allow-other" && !hasValue:
				mo.allowOther = true
			case name == "debug" && !hasValue:
				mo.debug = true
			case name == "ro" && !hasValue: // mount -r, fstab's ro
				mo.readOnly = true
			case ignoredMountOptions[name] && !hasValue:
			case t.flags[name]:
				if !hasValue || value == "" {
					return mountOptions{}, fmt.Errorf("-o %s: needs a value (%s=...)", key, key)
				}
				mo.set[name] = value
			default:
				return mountOptions{}, fmt.Errorf("-o %q: unknown mount option", truncate(key, 64))
			}
		}
	}
	return mo, nil
}

// spellings are the -o keys, sorted, for --help.
func (t optionTable) spellings() []string {
	var keys []string
	for name := range t.flags {
		keys = append(keys, strings.ReplaceAll(name, "-", "_")+"=")
	}
	keys = append(keys, "allow_other", "debug", "ro")
	slices.Sort(keys)
	return keys
}

// parseSize reads a --cache-size such as 256M, 1.5GiB or 4096, no more than
// the machine's memory (see checkMemory).
func parseSize(s string) (int64, error) {
	n, err := platform.ParseSize(s)
	if err != nil {
		return 0, err
	}
	return n, checkMemory(n)
}

// errUsage marks a bad invocation (exit status 2); platforms' checks wrap
// the same error.
var errUsage = platform.ErrUsage

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
