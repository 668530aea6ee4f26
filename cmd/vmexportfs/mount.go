package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/spf13/pflag"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
	"github.com/vmexportfs/vmexportfs/backend/meter"
	"github.com/vmexportfs/vmexportfs/backend/platform"
	"github.com/vmexportfs/vmexportfs/backend/redact"
	"github.com/vmexportfs/vmexportfs/cache"
	"github.com/vmexportfs/vmexportfs/fs"
)

const passwordEnv = platform.PasswordEnv

// mountConfig is everything the mount command was told.
type mountConfig struct {
	source, mountpoint string

	// Common to every platform (see platform.Common for why); a platform's
	// own flags live in its opener in platforms.
	username, passwordFile, caFile string
	insecureSkipVerify             bool

	platforms []registered // the registry, each platform's flags defined

	cacheSize         int64
	cacheDir          string
	stateDir          string
	listTTL           time.Duration
	readTimeout       time.Duration
	retries           int
	foreground        bool
	allowOther, debug bool
	readOnly          bool // mount ro: no mkdir or rmdir either
	logLevel, logFile string
	logFormat         string
	metricsAddr       string        // --metrics-addr; "" serves none
	progressInterval  time.Duration // how often a long mkdir is logged

	// meter counts the platform requests of this mount; set (newMeter)
	// once the source is known, before it is opened.
	meter *meter.Meter

	secrets *redact.Secrets // what the process knows and must never print
}

// newMountFlags builds the mount command line from the registry: the common
// flags, then every platform's own (cfg.platforms, their values kept by
// each platform's opener).
func newMountFlags(cfg *mountConfig, cacheSize *string, opts *[]string, registry []platform.Platform) *pflag.FlagSet {
	f := commonMountFlags(cfg, cacheSize, opts)
	cfg.platforms = registerPlatforms(f, registry)
	return f
}

// commonMountFlags are the flags of every mount, whatever the platform.
func commonMountFlags(cfg *mountConfig, cacheSize *string, opts *[]string) *pflag.FlagSet {
	f := pflag.NewFlagSet("vmexportfs", pflag.ContinueOnError)
	f.SetOutput(io.Discard)
	f.StringVar(&cfg.username, "username", "", "platform user name (Coriolis)")
	f.StringVar(&cfg.passwordFile, "password-file", "", "file holding the password (else $"+passwordEnv+"); never pass it in argv")
	f.StringVar(&cfg.caFile, "ca-file", "", "PEM CA bundle to verify the platform's TLS certificate (default: system roots)")
	f.BoolVar(&cfg.insecureSkipVerify, "insecure-skip-tls-verify", false, "DANGEROUS: do not verify the platform's TLS certificate")
	f.StringVar(cacheSize, "cache-size", "64M", "memory for cached disk blocks (more is not faster for copies: fresh pages cost more than refetching)")
	f.StringVar(&cfg.cacheDir, "cache-dir", "", "directory for derived-file indexes, in a "+sourceDirPattern+" directory per source")
	f.StringVar(&cfg.stateDir, "state-dir", "", "directory for the snapshot name map and the background log, in a "+sourceDirPattern+" directory per source")
	f.DurationVar(&cfg.listTTL, "list-ttl", 5*time.Second, "how long VM and snapshot listings are cached")
	f.DurationVar(&cfg.readTimeout, "read-timeout", 30*time.Second, "deadline of one backend request, body included")
	f.IntVar(&cfg.retries, "retries", 5, "tries of one backend request before a read fails with EIO")
	f.BoolVarP(&cfg.foreground, "foreground", "f", false, "stay in the foreground")
	f.BoolVar(&cfg.allowOther, "allow-other", false, "let other users see the mount (needs user_allow_other for non-root)")
	f.BoolVar(&cfg.debug, "debug", false, "log every FUSE request")
	f.BoolVar(&cfg.readOnly, "read-only", false, "mount read-only (-o ro): the kernel then refuses mkdir and rmdir too, so no snapshot can be made or deleted; "+
		"the default is rw only for them, as every other change is refused with EROFS either way")
	f.StringVar(&cfg.logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&cfg.logFormat, "log-format", "text", "text, or json: one JSON object a line, for log collectors")
	f.StringVar(&cfg.logFile, "log-file", "", "append logs to this file")
	f.StringVar(&cfg.metricsAddr, "metrics-addr", "", "serve Prometheus metrics on HOST:PORT/metrics (e.g. localhost:9464); off by default")
	f.DurationVar(&cfg.progressInterval, "progress-interval", fs.DefaultProgressInterval, "how often a snapshot that takes long to make is logged")
	f.StringArrayVarP(opts, "options", "o", nil, "mount options, comma separated (fstab style: username=,password_file=,ca_file=,allow_other,...)")
	return f
}

// parseMountArgs parses and validates everything that can be checked without
// touching the network, so that a bad invocation fails before anything starts.
func parseMountArgs(args []string, registry []platform.Platform) (mountConfig, error) {
	var cfg mountConfig
	var cacheSize string
	var opts []string
	f := newMountFlags(&cfg, &cacheSize, &opts, registry)
	if err := f.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return cfg, err
		}
		return cfg, fmt.Errorf("%w: %v (see vmexportfs --help)", errUsage, err)
	}
	mo, err := newOptionTable(cfg.platforms).parse(opts)
	if err != nil {
		return cfg, fmt.Errorf("%w: %v", errUsage, err)
	}
	for name, value := range mo.set {
		if err := f.Set(name, value); err != nil {
			return cfg, fmt.Errorf("%w: -o %s: %v", errUsage, name, err)
		}
	}
	cfg.allowOther = cfg.allowOther || mo.allowOther
	cfg.debug = cfg.debug || mo.debug
	cfg.readOnly = cfg.readOnly || mo.readOnly
	if f.NArg() != 2 {
		return cfg, fmt.Errorf("%w: want SOURCE MOUNTPOINT, got %d arguments (vmexportfs [flags] coriolis+https://HOST:5544 /mnt/vms)", errUsage, f.NArg())
	}
	cfg.source, cfg.mountpoint = f.Arg(0), f.Arg(1)
	if cfg.cacheSize, err = parseSize(cacheSize); err != nil {
		return cfg, fmt.Errorf("%w: --cache-size: %v", errUsage, err)
	}
	if cfg.cacheSize < 4<<20 {
		return cfg, fmt.Errorf("%w: --cache-size %s: at least 4M is needed", errUsage, cacheSize)
	}
	if cfg.retries < 1 || cfg.retries > 100 {
		return cfg, fmt.Errorf("%w: --retries %d: want 1 to 100", errUsage, cfg.retries)
	}
	if cfg.readTimeout <= 0 || cfg.listTTL < 0 {
		return cfg, fmt.Errorf("%w: --read-timeout must be positive and --list-ttl not negative", errUsage)
	}
	if _, err := parseLogLevel(cfg.logLevel); err != nil {
		return cfg, fmt.Errorf("%w: %v", errUsage, err)
	}
	if cfg.progressInterval < 100*time.Millisecond {
		return cfg, fmt.Errorf("%w: --progress-interval %s: want at least 100ms", errUsage, cfg.progressInterval)
	}
	if cfg.metricsAddr != "" {
		if _, _, err := net.SplitHostPort(cfg.metricsAddr); err != nil {
			return cfg, fmt.Errorf("%w: --metrics-addr %q: want HOST:PORT, e.g. localhost:9464", errUsage, truncate(cfg.metricsAddr, 40))
		}
	}
	if cfg.logFormat != "text" && cfg.logFormat != "json" {
		return cfg, fmt.Errorf("%w: --log-format %q: want text or json", errUsage, truncate(cfg.logFormat, 20))
	}
	p, _, err := splitSource(cfg.source, cfg.platforms)
	if err != nil {
		return cfg, fmt.Errorf("%w: %v", errUsage, err)
	}
	return cfg, checkForeignFlags(f, cfg.platforms, p)
}

// splitSource separates "coriolis+https://host:5544" into the platform and
// the URL the platform client is given.
func splitSource(source string, ps []registered) (registered, *url.URL, error) {
	u, err := url.Parse(source)
	if err != nil {
		return registered{}, nil, fmt.Errorf("source %q: not a URL", shownSource(source))
	}
	if u.User != nil {
		return registered{}, nil, fmt.Errorf("source: credentials in the URL are not accepted; use --username and --password-file")
	}
	name, scheme, ok := strings.Cut(u.Scheme, "+")
	if ok && scheme == "http" {
		return registered{}, nil, plainHTTP(u, name)
	}
	if !ok || scheme != "https" || u.Host == "" {
		return registered{}, nil, fmt.Errorf("source %q: want PLATFORM+https://HOST[:PORT][/PATH], e.g. coriolis+https://ovm:5544", shownSource(source))
	}
	i := slices.IndexFunc(ps, func(p registered) bool { return p.Scheme == name })
	if i < 0 {
		return registered{}, nil, fmt.Errorf("source %q: unknown platform %q (known: %s)", shownSource(source), name, strings.Join(schemes(ps), ", "))
	}
	u.Scheme = scheme
	return ps[i], u, nil
}

// shownSource is source as an error quotes it: at most 80 bytes, and with
// what a user:password@ part could hold masked, whether the URL parses or
// not (one that does not parse still holds the password typed into it).
func shownSource(source string) string {
	if at := strings.LastIndexByte(source, '@'); at >= 0 {
		start := 0
		if i := strings.Index(source, "://"); i >= 0 && i < at {
			start = i + 3
		} else if i := strings.IndexByte(source, ':'); i >= 0 && i < at {
			start = i + 1
		}
		source = source[:start] + redact.Mask + source[at:]
	}
	return truncate(source, 80)
}

// checkMountpoint fails early on a mountpoint that cannot be used.
func checkMountpoint(dir string) error {
	// The kernel may answer the stat from its cache even when the FUSE
	// server behind it is dead; the readdir cannot be.
	dead := func(err error) error {
		if errors.Is(err, syscall.ENOTCONN) {
			return fmt.Errorf("mountpoint %s: a dead FUSE mount is still there; run: fusermount3 -u %s", dir, dir)
		}
		return fmt.Errorf("mountpoint: %w", err)
	}
	st, err := os.Stat(dir)
	switch {
	case err != nil:
		return dead(err)
	case !st.IsDir():
		return fmt.Errorf("mountpoint %s: not a directory", dir)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return dead(err)
	}
	if len(entries) > 0 {
		return fmt.Errorf("mountpoint %s: not empty", dir)
	}
	return nil
}

func runMount(ctx context.Context, args []string, stdout, stderr io.Writer, secrets *redact.Secrets) error {
	cfg, err := parseMountArgs(args, platforms())
	if errors.Is(err, pflag.ErrHelp) {
		return printMountHelp(stdout, platforms())
	}
	if err != nil {
		return err
	}
	cfg.secrets = secrets
	if err := checkMountpoint(cfg.mountpoint); err != nil {
		return err
	}
	// The platform's own checks, before a daemon would report them as a
	// mere failure to mount.
	if _, _, err := checkSource(cfg, slog.New(slog.DiscardHandler)); err != nil {
		return err
	}
	if cfg.passwordFile != "" {
		if _, err := readSecretFile(cfg.passwordFile); err != nil {
			return err
		}
	}
	if !cfg.foreground && os.Getenv(readyFDEnv) == "" {
		logPath := cfg.logFile
		if logPath == "" {
			stateDir, _, err := dataDirs(cfg)
			if err != nil {
				return err
			}
			logPath = filepath.Join(stateDir, logFileName)
		}
		if err := daemonize(ctx, logPath); err != nil {
			return err
		}
		// The log's directory is named after a hash: without this line
		// nobody would find it.
		if abs, err := filepath.Abs(logPath); err == nil {
			logPath = abs
		}
		fmt.Fprintf(stderr, "vmexportfs: mounted %s; logging to %s\n", cfg.mountpoint, logPath)
		return nil
	}
	logger, closeLog, err := newLogger(cfg, stderr)
	if err != nil {
		return err
	}
	defer closeLog()
	if cfg.insecureSkipVerify {
		logger.Warn("TLS VERIFICATION IS OFF (--insecure-skip-tls-verify): anyone on the path can read and alter your disks")
	}
	cfg.meter = newMeter(cfg)
	src, err := openSource(ctx, cfg, logger)
	if err != nil {
		return notifyReady(cfg.secrets, err)
	}
	return notifyReady(cfg.secrets, serve(ctx, src, cfg, logger, nil))
}

// serve mounts src and blocks until ctx is done or the filesystem is
// unmounted from outside. ready, when not nil, is called once mounted.
func serve(ctx context.Context, src backend.Source, cfg mountConfig, logger *slog.Logger, ready func()) error {
	stateDir, cacheDir, err := dataDirs(cfg)
	if err != nil {
		return err
	}
	// Memory is the block cache plus in-flight FUSE requests and fetches
	// (up to 64 of 1 MiB each) plus bookkeeping: a soft limit there makes
	// the garbage collector keep to it instead of letting garbage double
	// the heap. GOMEMLIMIT, when set, wins.
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(cfg.cacheSize + memoryOverhead)
	}
	blocks := cache.New(cache.Options{Capacity: cfg.cacheSize, Logger: logger})
	// Closing the cache cancels every backend fetch; then the tree closes
	// its disks and the source its sessions. Once, and a second call does
	// not wait for the first (shutdown bounds that one).
	var root *fs.Root
	closeAll := firstCall(func() {
		blocks.Close()
		if root != nil {
			root.Close()
		}
		if err := src.Close(); err != nil {
			logger.Warn("closing the platform source failed", "err", err)
		}
	})
	defer closeAll()
	root, err = fs.NewRoot(src, fs.Options{
		Cache: blocks, StateDir: stateDir, CacheDir: cacheDir, ListTTL: cfg.listTTL, Logger: logger,
		Meter: cfg.meter, ProgressInterval: cfg.progressInterval,
	})
	if err != nil {
		return err
	}
	if cfg.metricsAddr != "" {
		stop, err := serveMetrics(cfg.metricsAddr, root, cfg.meter, logger)
		if err != nil {
			return err
		}
		defer stop()
	}
	server, err := fs.Mount(cfg.mountpoint, root, fs.MountOptions{AllowOther: cfg.allowOther, Debug: cfg.debug, ReadOnly: cfg.readOnly})
	if err != nil {
		return fmt.Errorf("mount %s: %w", cfg.mountpoint, err)
	}
	logger.Info("mounted", "source", cfg.source, "mountpoint", cfg.mountpoint, "goroutines", runtime.NumGoroutine())
	if ready != nil {
		ready()
	} else {
		signalReady(logger)
	}
	unmounted := make(chan struct{})
	go func() { server.Wait(); close(unmounted) }()
	// The kernel may keep the session after our mount is gone (a copy of it
	// in another mount namespace): the mount table says when to stop.
	var gone <-chan struct{}
	stopWatch := func() {}
	if w, err := watchMount(cfg.mountpoint, root.Activity, logger); err != nil {
		logger.Warn("not watching the mount table; the process ends with the FUSE session", "err", err)
	} else {
		gone, stopWatch = w.gone, w.stop
	}
	defer stopWatch()
	select {
	case <-unmounted:
		logger.Info("unmounted from outside", "mountpoint", cfg.mountpoint)
		shutdown(unmounted, closeAll, root, logger)
		return nil
	case <-gone:
		logger.Info("unmounted from outside", "mountpoint", cfg.mountpoint)
		shutdown(unmounted, closeAll, root, logger)
		return nil
	case <-ctx.Done():
	}
	// Unmount waits for the session to end, which the kernel may never do
	// (see above): wait for that or the mount table, whichever says first.
	go unmount(server, cfg.mountpoint, logger)
	select {
	case <-unmounted:
	case <-gone:
	}
	shutdown(unmounted, closeAll, root, logger)
	stopWatch()
	logger.Info("unmounted", "mountpoint", cfg.mountpoint, "goroutines", settledGoroutines())
	return nil
}

// memoryOverhead is the Go heap the daemon may use beyond its block cache:
// in-flight fetches and compressions, FUSE buffers, extent maps. It is the
// soft limit's, so it leaves room for what the runtime does not count
// (the binary's text, stacks): measured, building a gzip index of a 256 MiB
// disk peaks at cache + 103 MiB resident, under the documented cache +
// 128 MiB, where a limit of cache + 128 MiB peaked at cache + 141 MiB.
const memoryOverhead = 96 << 20

// settledGoroutines counts goroutines once exiting ones had a moment to go:
// after unmount it should be back near the count at mount time (the leak
// check of the load test reads it from the log).
func settledGoroutines() int {
	n := runtime.NumGoroutine()
	for range 20 {
		time.Sleep(10 * time.Millisecond)
		if m := runtime.NumGoroutine(); m >= n {
			break
		} else {
			n = m
		}
	}
	return n
}

// unmount detaches the mount even while files are open: a busy mount is
// lazily detached, so running copies finish on their open descriptors and the
// kernel ends the session when the last one closes.
func unmount(server *fuse.Server, dir string, logger *slog.Logger) {
	if err := server.Unmount(); err == nil {
		return
	} else {
		logger.Info("mount busy, detaching lazily", "mountpoint", dir, "err", err)
	}
	if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
		logger.Error("lazy unmount failed", "mountpoint", dir, "err", err)
	}
}

// logFileName is the background log's name in the source's state directory.
const logFileName = "vmexportfs.log"

// sourceDirPattern is how --help names a source's directory (sourceKey).
const sourceDirPattern = "HOST-HASH"

// dataDirs returns the per-source state and cache directories, created 0700.
// They are keyed by the source so two platforms never share a name map.
func dataDirs(cfg mountConfig) (stateDir, cacheDir string, err error) {
	stateRoot, cacheRoot := dataRoots(cfg.stateDir, cfg.cacheDir)
	key := sourceKey(cfg.source, cfg.username)
	stateDir = filepath.Join(stateRoot, key)
	cacheDir = filepath.Join(cacheRoot, key)
	for _, dir := range []string{stateDir, cacheDir} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return "", "", fmt.Errorf("create %s: %w", dir, err)
		}
		if err := os.Chmod(dir, 0o700); err != nil {
			return "", "", fmt.Errorf("chmod %s: %w", dir, err)
		}
	}
	return stateDir, cacheDir, nil
}

// dataRoots are the directories the per-source directories are made in:
// the flags', else under $XDG_STATE_HOME and $XDG_CACHE_HOME, else root's
// system directories, else the user's home's.
func dataRoots(stateFlag, cacheFlag string) (stateRoot, cacheRoot string) {
	home, _ := os.UserHomeDir()
	pick := func(flag, xdgEnv, rootDefault, homeSuffix string) string {
		switch {
		case flag != "":
			return flag
		case os.Getenv(xdgEnv) != "":
			return filepath.Join(os.Getenv(xdgEnv), "vmexportfs")
		case os.Geteuid() == 0:
			return rootDefault
		default:
			return filepath.Join(home, homeSuffix, "vmexportfs")
		}
	}
	return pick(stateFlag, "XDG_STATE_HOME", "/var/lib/vmexportfs", ".local/state"),
		pick(cacheFlag, "XDG_CACHE_HOME", "/var/cache/vmexportfs", ".cache")
}

// describeDataDefaults adds the defaults of the data flags to their usage,
// for help: the flags' own defaults are empty, as the directories depend on
// the user and the environment.
func describeDataDefaults(f *pflag.FlagSet, stateRoot, cacheRoot, logPath string) {
	f.Lookup("state-dir").Usage += " (default " + stateRoot + ")"
	f.Lookup("cache-dir").Usage += " (default " + cacheRoot + ")"
	f.Lookup("log-file").Usage += " (default: stderr with -f, else " + logPath + ", printed once mounted)"
}

// sourceKey names a source's directories: readable host plus a hash of the
// whole source, so that the name stays short and safe whatever the URL holds.
func sourceKey(source, user string) string {
	sum := sha256.Sum256([]byte(source + "\x00" + user))
	host := "source"
	if u, err := url.Parse(source); err == nil && u.Hostname() != "" {
		host = strings.Map(func(r rune) rune {
			if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' {
				return r
			}
			return '_'
		}, u.Hostname())
	}
	return truncate(host, 64) + "-" + hex.EncodeToString(sum[:6])
}

func readSecretFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read secret: %w", err)
	}
	secret := strings.TrimRight(string(b), "\r\n")
	if secret == "" {
		return "", fmt.Errorf("secret file %s is empty", path)
	}
	return secret, nil
}

// password reads the password from --password-file or the environment.
func (cfg mountConfig) password() (string, error) {
	if cfg.passwordFile != "" {
		return readSecretFile(cfg.passwordFile)
	}
	if pw := os.Getenv(passwordEnv); pw != "" {
		return pw, nil
	}
	return "", fmt.Errorf("no password: give --password-file FILE or set %s", passwordEnv)
}

func (cfg mountConfig) policy() httprange.Policy {
	return httprange.Policy{Attempts: cfg.retries, AttemptTimeout: cfg.readTimeout, Meter: cfg.meter}
}

// newMeter is the meter of a mount of cfg.source, labelled with its
// platform's scheme (never the URL).
func newMeter(cfg mountConfig) *meter.Meter {
	name := "unknown"
	if p, _, err := splitSource(cfg.source, cfg.platforms); err == nil {
		name = p.Scheme
	}
	return meter.New(name)
}

func parseLogLevel(s string) (slog.Level, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("--log-level %q: want debug, info, warn or error", truncate(s, 20))
	}
	return level, nil
}

func newLogger(cfg mountConfig, stderr io.Writer) (*slog.Logger, func(), error) {
	level, err := parseLogLevel(cfg.logLevel)
	if err != nil {
		return nil, nil, err
	}
	out, closeOut := stderr, func() {}
	if cfg.logFile != "" {
		f, err := os.OpenFile(cfg.logFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return nil, nil, fmt.Errorf("--log-file: %w", err)
		}
		out, closeOut = f, func() { f.Close() }
	}
	var h slog.Handler = slog.NewTextHandler(out, &slog.HandlerOptions{Level: level})
	if cfg.logFormat == "json" {
		h = slog.NewJSONHandler(out, &slog.HandlerOptions{Level: level})
	}
	return slog.New(cfg.secrets.Handler(h)), closeOut, nil
}

// printMountHelp derives the help from the registry: each platform's source
// forms and flags, and every -o spelling.
func printMountHelp(w io.Writer, registry []platform.Platform) error {
	var cfg mountConfig
	newMountFlags(&cfg, new(string), new([]string), registry)
	common := commonMountFlags(&mountConfig{}, new(string), new([]string))
	stateRoot, cacheRoot := dataRoots("", "")
	logPath := filepath.Join(stateRoot, sourceDirPattern, logFileName)
	describeDataDefaults(common, stateRoot, cacheRoot, logPath)
	fmt.Fprintf(w, "Usage:\n")
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	for _, c := range commands() {
		fmt.Fprintf(tw, "  vmexportfs %s\t%s\n", c.synopsis, c.summary)
	}
	tw.Flush()
	fmt.Fprintf(w, "  vmexportfs -V | --version\n\nvmexportfs help COMMAND (or COMMAND --help) tells more of a command.\n\nSources:\n")
	tw = tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	for _, p := range cfg.platforms {
		for _, u := range p.Usage {
			fmt.Fprintf(tw, "  %s\t%s\n", u.Source, u.Text)
		}
	}
	tw.Flush()
	fmt.Fprintf(w, "\nFlags:\n%s", common.FlagUsages())
	for _, p := range cfg.platforms {
		if p.flags.HasFlags() {
			fmt.Fprintf(w, "\nFlags of %s+ sources:\n%s", p.Scheme, p.flags.FlagUsages())
		}
	}
	fmt.Fprintf(w, "\nMount options (-o a=b,c or fstab; generic ones such as rw, nodev, _netdev are ignored):\n")
	line := " "
	for _, key := range newOptionTable(cfg.platforms).spellings() {
		if len(line)+1+len(key) > 100 {
			fmt.Fprintln(w, line)
			line = " "
		}
		line += " " + key
	}
	fmt.Fprintln(w, line)
	fmt.Fprintf(w, "\nFiles (%s: the source's host name and 12 hex digits of a hash of the source and user):\n", sourceDirPattern)
	tw = tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	fmt.Fprintf(tw, "  %s\tsnapshot names, first-seen times\n", filepath.Join(stateRoot, sourceDirPattern)+"/")
	fmt.Fprintf(tw, "  %s\tindexes of derived files\n", filepath.Join(cacheRoot, sourceDirPattern)+"/")
	fmt.Fprintf(tw, "  %s\tthe log of a background mount\n", logPath)
	return tw.Flush()
}
