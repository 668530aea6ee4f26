package main

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"

	"github.com/vmexportfs/vmexportfs/backend/coriolis"
	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
	"github.com/vmexportfs/vmexportfs/backend/platform"
	"github.com/vmexportfs/vmexportfs/backend/redact"
)

const (
	demoUser     = "admin"
	demoPassword = "demo-password" // of a throwaway loopback simulator, not a real secret
)

// runDemo starts the Coriolis simulator on loopback with sample VMs and
// mounts it through the same code path as a real platform: login, TLS
// verified against the simulator's own CA, password from a file.
func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer, secrets *redact.Secrets) error {
	cfg := mountConfig{secrets: secrets}
	var cacheSize, dataset, dataDir, envFile string
	var serveOnly bool
	var opts []string
	// The demo is a Coriolis mount: only its platform is registered.
	f := newMountFlags(&cfg, &cacheSize, &opts, []platform.Platform{coriolis.Platform()})
	f.Init("vmexportfs demo", 0)
	f.StringVar(&dataset, "dataset", "demo", "sample data: demo (two VMs, snapshots with changes) or bench (2 GiB with 512 MiB in 64 extents, and 1 GiB fully written)")
	f.StringVar(&dataDir, "data-dir", "", "where the simulator keeps its disk files (default: a temporary directory removed on exit)")
	f.BoolVar(&serveOnly, "serve-only", false, "run only the simulator, do not mount (MOUNTPOINT not needed)")
	f.StringVar(&envFile, "env-file", "", "write the simulator's URL, CA file, user and password file here as shell variables")
	if len(args) == 1 && (args[0] == "-h" || args[0] == "--help") {
		fmt.Fprintf(stdout, "Usage:\n  vmexportfs demo [flags] MOUNTPOINT\n  vmexportfs demo --serve-only [--env-file FILE]\n\nFlags:\n%s", f.FlagUsages())
		return nil
	}
	if err := f.Parse(args); err != nil {
		return fmt.Errorf("%w: demo: %v", errUsage, err)
	}
	if len(opts) > 0 {
		return fmt.Errorf("%w: demo: -o is for platform mounts", errUsage)
	}
	populate, ok := demoDatasets()[dataset]
	if !ok {
		return fmt.Errorf("%w: demo: --dataset %q: want demo or bench", errUsage, truncate(dataset, 20))
	}
	var err error
	if cfg.cacheSize, err = parseSize(cacheSize); err != nil || cfg.cacheSize < 4<<20 {
		return fmt.Errorf("%w: demo: --cache-size %q: want a size of at least 4M", errUsage, truncate(cacheSize, 20))
	}
	if _, err := parseLogLevel(cfg.logLevel); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	switch {
	case serveOnly && f.NArg() != 0:
		return fmt.Errorf("%w: demo --serve-only takes no MOUNTPOINT", errUsage)
	case !serveOnly && f.NArg() != 1:
		return fmt.Errorf("%w: usage: vmexportfs demo [flags] MOUNTPOINT", errUsage)
	case !serveOnly:
		cfg.mountpoint = f.Arg(0)
		if err := checkMountpoint(cfg.mountpoint); err != nil {
			return err
		}
	}
	if !cfg.foreground && !serveOnly && os.Getenv(readyFDEnv) == "" {
		logPath := cfg.logFile
		if logPath == "" {
			logPath = filepath.Join(os.TempDir(), "vmexportfs-demo.log")
		}
		if err := daemonize(ctx, logPath); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "vmexportfs demo mounted at %s (logs: %s). Try: ls %s/by-name; unmount: fusermount3 -u %s\n",
			cfg.mountpoint, logPath, cfg.mountpoint, cfg.mountpoint)
		return nil
	}
	logger, closeLog, err := newLogger(cfg, stderr)
	if err != nil {
		return err
	}
	defer closeLog()

	if dataDir == "" {
		if dataDir, err = os.MkdirTemp("", "vmexportfs-demo-"); err != nil {
			return notifyReady(cfg.secrets, fmt.Errorf("demo: %w", err))
		}
		defer os.RemoveAll(dataDir)
	} else if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return notifyReady(cfg.secrets, fmt.Errorf("demo: %w", err))
	}
	sim, err := coriolistest.Start(coriolistest.Options{
		Dir: filepath.Join(dataDir, "simulator"), Username: demoUser, Password: demoPassword,
		Logger: logger.With("component", "simulator"),
	})
	if err != nil {
		return notifyReady(cfg.secrets, fmt.Errorf("demo: start simulator: %w", err))
	}
	defer sim.Close()
	if err := populate(sim); err != nil {
		return notifyReady(cfg.secrets, fmt.Errorf("demo: sample data: %w", err))
	}
	passwordFile := filepath.Join(dataDir, "password")
	if err := os.WriteFile(passwordFile, []byte(demoPassword+"\n"), 0o600); err != nil {
		return notifyReady(cfg.secrets, fmt.Errorf("demo: %w", err))
	}
	if envFile != "" {
		env := fmt.Sprintf("VMEXPORTFS_DEMO_URL=%s\nVMEXPORTFS_DEMO_CA=%s\nVMEXPORTFS_DEMO_USER=%s\nVMEXPORTFS_DEMO_PASSWORD_FILE=%s\n",
			sim.URL(), sim.CAFile(), demoUser, passwordFile)
		if err := os.WriteFile(envFile, []byte(env), 0o600); err != nil {
			return fmt.Errorf("demo: --env-file: %w", err)
		}
	}
	if serveOnly {
		fmt.Fprintf(stderr, "vmexportfs demo: simulated Coriolis OVM exporter at %s (CA %s, user %s, password file %s); Ctrl-C stops it\n",
			sim.URL(), sim.CAFile(), demoUser, passwordFile)
		<-ctx.Done()
		return nil
	}

	cfg.source = "coriolis+" + sim.URL()
	cfg.username, cfg.passwordFile, cfg.caFile = demoUser, passwordFile, sim.CAFile()
	if cfg.stateDir == "" {
		cfg.stateDir = filepath.Join(dataDir, "state")
	}
	if cfg.cacheDir == "" {
		cfg.cacheDir = filepath.Join(dataDir, "cache")
	}
	src, err := openSource(ctx, cfg, logger)
	if err != nil {
		return notifyReady(cfg.secrets, err)
	}
	ready := func() {
		fmt.Fprintf(stderr, "vmexportfs demo: simulated Coriolis OVM exporter at %s mounted on %s\n"+
			"  try:  ls -l %[2]s/by-name/*/snapshots/*\n"+
			"        cp --sparse=always %[2]s/by-name/web01/snapshots/*/disk.img /tmp/\n"+
			"        getfattr -d -m - %[2]s/by-name/web01/snapshots/*/disk.img\n"+
			"  stop: fusermount3 -u %[2]s\n", sim.URL(), cfg.mountpoint)
		signalReady()
	}
	return notifyReady(cfg.secrets, serve(ctx, src, cfg, logger, ready))
}

// demoDatasets are the sample histories the demo can serve.
func demoDatasets() map[string]func(*coriolistest.Server) error {
	return map[string]func(*coriolistest.Server) error{
		"demo":  populateDemo,
		"bench": populateBench,
	}
}

// demoWriter writes reproducible pseudo-random data, so two demo runs serve
// the same bytes.
type demoWriter struct {
	sim *coriolistest.Server
	rng *rand.ChaCha8
	err error
}

func newDemoWriter(sim *coriolistest.Server, seed string) *demoWriter {
	var s [32]byte
	copy(s[:], seed)
	return &demoWriter{sim: sim, rng: rand.NewChaCha8(s)}
}

// write fills [off, off+n) of a disk with fresh data, in pieces so memory stays small.
func (w *demoWriter) write(vm, disk string, off, n int64) {
	const piece = 8 << 20
	buf := make([]byte, min(n, piece))
	for done := int64(0); done < n && w.err == nil; {
		chunk := buf[:min(n-done, piece)]
		w.rng.Read(chunk)
		w.err = w.sim.WriteDisk(vm, disk, off+done, chunk)
		done += int64(len(chunk))
	}
}

func (w *demoWriter) discard(vm, disk string, off, n int64) {
	if w.err == nil {
		w.err = w.sim.DiscardDisk(vm, disk, off, n)
	}
}

func (w *demoWriter) snapshot(vm string) {
	if w.err == nil {
		_, w.err = w.sim.TakeSnapshot(vm)
	}
}

func (w *demoWriter) addVM(spec coriolistest.VMSpec) {
	if w.err == nil {
		w.err = w.sim.AddVM(spec)
	}
}

const (
	mib = int64(1) << 20
	gib = int64(1) << 30
)

// populateDemo builds two VMs with histories that show every feature: a
// single-disk VM with three snapshots (changes crossing 2 MiB blocks, a
// discard, a snapshot without changes) and a multi-disk VM with a CD-ROM and a
// disk whose size is not a multiple of 2 MiB.
func populateDemo(sim *coriolistest.Server) error {
	w := newDemoWriter(sim, "vmexportfs demo")
	const web, webDisk = "0004fb00000600001a2b3c4d5e6f7001", "0004fb0000120000aa01.img"
	w.addVM(coriolistest.VMSpec{ID: web, FriendlyName: "web01", Disks: []coriolistest.DiskSpec{
		{Name: webDisk, Device: "xvda", Size: 1 * gib},
	}})
	w.write(web, webDisk, 0, 1*mib)        // boot sector and partition table
	w.write(web, webDisk, 100*mib, 48*mib) // a filesystem's metadata and files
	for off := 300 * mib; off < 900*mib; off += 50 * mib {
		w.write(web, webDisk, off, 256<<10) // scattered small files
	}
	w.snapshot(web)
	w.write(web, webDisk, 101*mib+512<<10, 3*mib) // crosses a 2 MiB block boundary
	w.discard(web, webDisk, 140*mib, 4*mib)
	w.write(web, webDisk, 600*mib+4096, 8*mib)
	w.snapshot(web)
	w.snapshot(web) // nothing changed since the previous one

	const db = "0004fb00000600001a2b3c4d5e6f7002"
	const dbRoot, dbData, dbISO = "0004fb0000120000db01.img", "0004fb0000120000db02.img", "0004fb0000150000iso1.iso"
	w.addVM(coriolistest.VMSpec{ID: db, FriendlyName: "db01", Disks: []coriolistest.DiskSpec{
		{Name: dbRoot, Device: "xvda", Size: 512 * mib},
		{Name: dbData, Device: "xvdb", Size: 1*gib + 15*mib + 512},
		{Name: dbISO, Device: "xvdc:cdrom", Size: 64 * mib, CDROM: true},
	}})
	w.write(db, dbRoot, 0, 32*mib)
	w.write(db, dbData, 0, 16*mib)
	w.write(db, dbData, 1*gib+15*mib-4096, 4096+512) // up to the unaligned end
	w.snapshot(db)
	w.write(db, dbData, 8*mib, 2*mib)
	w.write(db, dbRoot, 20*mib-1000, 3000) // unaligned rewrite
	w.snapshot(db)
	return w.err
}

// populateBench builds the images scripts/bench.sh measures.
func populateBench(sim *coriolistest.Server) error {
	w := newDemoWriter(sim, "vmexportfs bench")
	const sparseSize, extents, extentLen = 2 * gib, 64, 8 * mib
	w.addVM(coriolistest.VMSpec{ID: "sparse", FriendlyName: "sparse", Disks: []coriolistest.DiskSpec{
		{Name: "sparse.img", Device: "xvda", Size: sparseSize},
	}})
	for i := range int64(extents) {
		w.write("sparse", "sparse.img", i*(sparseSize/extents), extentLen)
	}
	w.snapshot("sparse")
	w.addVM(coriolistest.VMSpec{ID: "full", FriendlyName: "full", Disks: []coriolistest.DiskSpec{
		{Name: "full.img", Device: "xvda", Size: 1 * gib},
	}})
	w.write("full", "full.img", 0, 1*gib)
	w.snapshot("full")
	// A 5% change for the delta row of the benchmark.
	for i := range int64(extents) {
		w.write("sparse", "sparse.img", i*(sparseSize/extents), 1600<<10)
	}
	w.snapshot("sparse")
	return w.err
}
