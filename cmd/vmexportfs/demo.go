package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mathrand "math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/pflag"

	"github.com/vmexportfs/vmexportfs/backend/coriolis"
	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
	"github.com/vmexportfs/vmexportfs/backend/kubevirt"
	"github.com/vmexportfs/vmexportfs/backend/kubevirt/kubevirttest"
	"github.com/vmexportfs/vmexportfs/backend/ovirt"
	"github.com/vmexportfs/vmexportfs/backend/ovirt/ovirttest"
	"github.com/vmexportfs/vmexportfs/backend/platform"
	"github.com/vmexportfs/vmexportfs/backend/redact"
	"github.com/vmexportfs/vmexportfs/backend/xapi"
	"github.com/vmexportfs/vmexportfs/backend/xapi/xapitest"
)

const (
	demoLogName  = "vmexportfs-demo.log" // in the temporary directory
	demoUser     = "admin"
	demoPassword = "demo-password" // of a throwaway loopback simulator, not a real secret
)

// demoPlatform is a platform whose simulator the demo can mount: the values
// of --platform, the first the default.
type demoPlatform struct {
	name     string                   // --platform's value, the platform's scheme
	about    string                   // what is simulated, for --help
	platform func() platform.Platform // its registry line: the demo mounts through it
	// start runs the simulator in dataDir with the sample data written by
	// populate and returns how to mount it.
	start func(dataDir string, populate func(demoTarget) error, logger *slog.Logger) (*demoSim, error)
}

func demoPlatforms() []demoPlatform {
	return []demoPlatform{
		{"coriolis", "a Coriolis OVM exporter", coriolis.Platform, startCoriolisDemo},
		{"kubevirt", "a KubeVirt cluster's API server and export servers", kubevirt.Platform, startKubeVirtDemo},
		{"xapi", "a XenServer pool master: XenAPI JSON-RPC, export_raw_vdi and an xapi-nbd NBD server", xapi.Platform, startXapiDemo},
		{"ovirt", "an oVirt engine (REST, SSO) with its imageio daemon and proxy", ovirt.Platform, startOVirtDemo},
	}
}

func demoPlatformNames() []string {
	var names []string
	for _, d := range demoPlatforms() {
		names = append(names, d.name)
	}
	return names
}

// demoSim is a running simulator and what a mount of it is given, as a user
// would give it: the source and the credential and CA flags.
type demoSim struct {
	source string
	flags  [][2]string // flag name, value
	env    []string    // --env-file's shell variables, NAME=value
	about  string      // what listens where, and the credentials' files
	close  func() error
}

// demoOptions are what the demo's command line says.
type demoOptions struct {
	cfg                                                mountConfig
	cacheSize, dataset, dataDir, envFile, platformName string
	serveOnly                                          bool
	opts                                               []string
}

// newDemoFlags defines the demo's command line: the mount's flags, those
// the demo gives itself hidden, and the demo's own.
func newDemoFlags(o *demoOptions) *pflag.FlagSet {
	demos := demoPlatforms()
	var registry []platform.Platform
	for _, d := range demos {
		registry = append(registry, d.platform())
	}
	f := newMountFlags(&o.cfg, &o.cacheSize, &o.opts, registry)
	f.Init("vmexportfs demo", 0)
	// The demo gives each platform's own flags, the credentials and the CA
	// itself, and takes no -o.
	for _, p := range o.cfg.platforms {
		p.flags.VisitAll(func(fl *pflag.Flag) { _ = f.MarkHidden(fl.Name) })
	}
	for _, name := range []string{"username", "password-file", "ca-file", "insecure-skip-tls-verify", "options"} {
		_ = f.MarkHidden(name)
	}
	f.Lookup("state-dir").Usage = "directory for the snapshot name map (default DATA-DIR/state)"
	f.Lookup("cache-dir").Usage = "directory for derived-file indexes (default DATA-DIR/cache)"
	f.Lookup("read-only").Usage = "mount read-only: mkdir and rmdir cannot make or delete snapshots"
	f.Lookup("log-file").Usage = "append logs to this file (default: stderr with -f, else " + filepath.Join(os.TempDir(), demoLogName) + ")"
	f.StringVar(&o.platformName, "platform", demos[0].name, "the platform to simulate: "+strings.Join(demoPlatformNames(), ", "))
	f.StringVar(&o.dataset, "dataset", "demo", "sample data: demo (two VMs, snapshots with changes), bench (2 GiB with 512 MiB in 64 extents, and 1 GiB fully written), scale (1 TiB and 2 GiB disks with the same 1 GiB written, 16 fully written 128 MiB disks) or vms-100k (100,000 VMs of one snapshot)")
	f.StringVar(&o.dataDir, "data-dir", "", "where the simulator keeps its disk files (default: a temporary directory removed on exit)")
	f.BoolVar(&o.serveOnly, "serve-only", false, "run only the simulator, do not mount (MOUNTPOINT not needed)")
	f.StringVar(&o.envFile, "env-file", "", "write how to reach the simulator (source URL, CA, credentials' files) here as shell variables")
	return f
}

// printDemoHelp is the demo's --help: the platforms it simulates and its flags.
func printDemoHelp(w io.Writer, f *pflag.FlagSet) error {
	fmt.Fprintf(w, "Usage:\n  vmexportfs demo [--platform NAME] [flags] MOUNTPOINT\n  vmexportfs demo [--platform NAME] --serve-only [--env-file FILE]\n\nPlatforms:\n")
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	for i, d := range demoPlatforms() {
		def := ""
		if i == 0 {
			def = " (default)"
		}
		fmt.Fprintf(tw, "  %s\t%s%s\n", d.name, d.about, def)
	}
	tw.Flush()
	_, err := fmt.Fprintf(w, "\nFlags:\n%s", f.FlagUsages())
	return err
}

// runDemo starts a platform's simulator on loopback with sample VMs and
// mounts it through the same code path as a real platform: the platform's
// registry line, credentials from files, TLS verified against the
// simulator's own CA.
func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer, secrets *redact.Secrets) error {
	o := &demoOptions{cfg: mountConfig{secrets: secrets}}
	f := newDemoFlags(o)
	cfg := &o.cfg
	demos := demoPlatforms()
	if err := f.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return printDemoHelp(stdout, f)
		}
		return fmt.Errorf("%w: demo: %v", errUsage, err)
	}
	if len(o.opts) > 0 {
		return fmt.Errorf("%w: demo: -o is for platform mounts", errUsage)
	}
	var given string
	f.VisitAll(func(fl *pflag.Flag) {
		if fl.Hidden && fl.Changed && given == "" {
			given = fl.Name
		}
	})
	i := slices.IndexFunc(demos, func(d demoPlatform) bool { return d.name == o.platformName })
	if i < 0 {
		return fmt.Errorf("%w: demo: --platform %q: want one of %s", errUsage, truncate(o.platformName, 20), strings.Join(demoPlatformNames(), ", "))
	}
	demo := demos[i]
	j := slices.IndexFunc(cfg.platforms, func(p registered) bool { return p.Scheme == demo.name })
	if err := checkForeignFlags(f, cfg.platforms, cfg.platforms[j]); err != nil {
		return err
	}
	if given != "" {
		return fmt.Errorf("%w: demo: --%s is not a demo flag: the demo gives the simulator's address, credentials and CA itself", errUsage, given)
	}
	populate, ok := demoDatasets()[o.dataset]
	if !ok {
		return fmt.Errorf("%w: demo: --dataset %q: want demo, bench, scale or vms-100k", errUsage, truncate(o.dataset, 20))
	}
	var err error
	if cfg.cacheSize, err = parseSize(o.cacheSize); err != nil {
		return fmt.Errorf("%w: demo: --cache-size: %v", errUsage, err)
	}
	if cfg.cacheSize < 4<<20 {
		return fmt.Errorf("%w: demo: --cache-size %q: want a size of at least 4M", errUsage, truncate(o.cacheSize, 20))
	}
	if _, err := parseLogLevel(cfg.logLevel); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	switch {
	case o.serveOnly && f.NArg() != 0:
		return fmt.Errorf("%w: demo --serve-only takes no MOUNTPOINT", errUsage)
	case !o.serveOnly && f.NArg() != 1:
		return fmt.Errorf("%w: demo: want one MOUNTPOINT: vmexportfs demo [--platform NAME] [flags] MOUNTPOINT", errUsage)
	case !o.serveOnly:
		cfg.mountpoint = f.Arg(0)
		if err := checkMountpoint(cfg.mountpoint); err != nil {
			return err
		}
	}
	if !cfg.foreground && !o.serveOnly && os.Getenv(readyFDEnv) == "" {
		logPath := cfg.logFile
		if logPath == "" {
			logPath = filepath.Join(os.TempDir(), demoLogName)
		}
		if err := daemonize(ctx, logPath); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "vmexportfs demo (%s) mounted on %s (logs: %s)\n%s", demo.name, cfg.mountpoint, logPath, demoHint(cfg.mountpoint))
		return nil
	}
	logger, closeLog, err := newLogger(*cfg, stderr)
	if err != nil {
		return err
	}
	defer closeLog()

	if o.dataDir == "" {
		if o.dataDir, err = os.MkdirTemp("", "vmexportfs-demo-"); err != nil {
			return notifyReady(cfg.secrets, fmt.Errorf("demo: %w", err))
		}
		defer os.RemoveAll(o.dataDir)
	} else if err := os.MkdirAll(o.dataDir, 0o700); err != nil {
		return notifyReady(cfg.secrets, fmt.Errorf("demo: %w", err))
	}
	sim, err := demo.start(o.dataDir, populate, logger)
	if err != nil {
		return notifyReady(cfg.secrets, fmt.Errorf("demo: %w", err))
	}
	defer sim.close()
	if o.envFile != "" {
		env := strings.Join(append([]string{"VMEXPORTFS_DEMO_SOURCE=" + sim.source}, sim.env...), "\n") + "\n"
		if err := os.WriteFile(o.envFile, []byte(env), 0o600); err != nil {
			return fmt.Errorf("demo: --env-file: %w", err)
		}
	}
	if o.serveOnly {
		fmt.Fprintf(stderr, "vmexportfs demo: %s; Ctrl-C stops it\n", sim.about)
		<-ctx.Done()
		return nil
	}

	cfg.source = sim.source
	for _, fl := range sim.flags {
		if err := f.Set(fl[0], fl[1]); err != nil {
			return notifyReady(cfg.secrets, fmt.Errorf("demo: --%s: %w", fl[0], err))
		}
	}
	if cfg.stateDir == "" {
		cfg.stateDir = filepath.Join(o.dataDir, "state")
	}
	if cfg.cacheDir == "" {
		cfg.cacheDir = filepath.Join(o.dataDir, "cache")
	}
	cfg.meter = newMeter(*cfg)
	src, err := openSource(ctx, *cfg, logger)
	if err != nil {
		return notifyReady(cfg.secrets, err)
	}
	ready := func() {
		fmt.Fprintf(stderr, "vmexportfs demo: %s, mounted on %s\n%s", sim.about, cfg.mountpoint, demoHint(cfg.mountpoint))
		signalReady(logger)
	}
	return notifyReady(cfg.secrets, serve(ctx, src, *cfg, logger, ready))
}

// demoHint is what to try on a fresh demo mount, each line a command that
// works as printed: web01 has three snapshots, each with a disk.img, so the
// copy names each copy after its snapshot (one cp of them all to a
// directory would refuse to overwrite its own just-copied file).
func demoHint(mountpoint string) string {
	if abs, err := filepath.Abs(mountpoint); err == nil {
		mountpoint = abs // still right after a cd
	}
	m := shellWord(mountpoint)
	return fmt.Sprintf("  try:  ls -l %[1]s/by-name/*/snapshots/*\n"+
		"        for s in %[1]s/by-name/web01/snapshots/*; do cp --sparse=always \"$s/disk.img\" \"/tmp/web01-${s##*/}.img\"; done\n"+
		"        getfattr -d -m - %[1]s/by-name/web01/snapshots/*/disk.img\n"+
		"  stop: fusermount3 -u %[1]s\n", m)
}

// shellWord quotes s for a POSIX shell when it holds more than letters,
// digits and punctuation the shell leaves alone.
func shellWord(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./+:,@%=-") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// startCoriolisDemo runs the Coriolis simulator, logging in with a user and
// a password file.
func startCoriolisDemo(dataDir string, populate func(demoTarget) error, logger *slog.Logger) (*demoSim, error) {
	sim, err := coriolistest.Start(coriolistest.Options{
		Dir: filepath.Join(dataDir, "simulator"), Username: demoUser, Password: demoPassword,
		Logger: logger.With("component", "simulator"),
	})
	if err != nil {
		return nil, fmt.Errorf("start simulator: %w", err)
	}
	if err := populate(coriolisTarget{sim}); err != nil {
		sim.Close()
		return nil, fmt.Errorf("sample data: %w", err)
	}
	passwordFile := filepath.Join(dataDir, "password")
	if err := os.WriteFile(passwordFile, []byte(demoPassword+"\n"), 0o600); err != nil {
		sim.Close()
		return nil, err
	}
	return &demoSim{
		source: "coriolis+" + sim.URL(),
		flags:  [][2]string{{"username", demoUser}, {"password-file", passwordFile}, {"ca-file", sim.CAFile()}},
		env: []string{"VMEXPORTFS_DEMO_URL=" + sim.URL(), "VMEXPORTFS_DEMO_CA=" + sim.CAFile(),
			"VMEXPORTFS_DEMO_USER=" + demoUser, "VMEXPORTFS_DEMO_PASSWORD_FILE=" + passwordFile},
		about: fmt.Sprintf("simulated Coriolis OVM exporter at %s (CA %s, user %s, password file %s)",
			sim.URL(), sim.CAFile(), demoUser, passwordFile),
		close: sim.Close,
	}, nil
}

// demoNamespace is the KubeVirt demo's namespace.
const demoNamespace = "demo"

// startKubeVirtDemo runs the KubeVirt simulator: its API server and an
// export server per export, each with its own CA. The mount reads the API
// server's address, token and CA from a kubeconfig, and each export
// server's CA from the export's status, as on a cluster; each VM is also
// exported live (snapshots/live).
func startKubeVirtDemo(dataDir string, populate func(demoTarget) error, _ *slog.Logger) (*demoSim, error) {
	sim, err := kubevirttest.Start(kubevirttest.Options{Dir: filepath.Join(dataDir, "simulator"), Namespace: demoNamespace})
	if err != nil {
		return nil, fmt.Errorf("start simulator: %w", err)
	}
	sim.SetBackupRoutes(true) // allocated extents: holes are never fetched
	target := newKubeVirtTarget(sim)
	err = populate(target)
	for _, vm := range target.order {
		if err != nil {
			break
		}
		err = sim.CreateLiveExport(vm+"-live", vm, vm+"-live-token", rand.Text())
	}
	if err != nil {
		sim.Close()
		return nil, fmt.Errorf("sample data: %w", err)
	}
	kubeconfig := filepath.Join(dataDir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, sim.Kubeconfig(), 0o600); err != nil {
		sim.Close()
		return nil, err
	}
	return &demoSim{
		source: "kubevirt+" + sim.URL() + "/namespaces/" + demoNamespace,
		flags:  [][2]string{{"kubeconfig", kubeconfig}},
		env:    []string{"VMEXPORTFS_DEMO_KUBECONFIG=" + kubeconfig},
		about:  fmt.Sprintf("simulated KubeVirt API server at %s, namespace %s (kubeconfig %s)", sim.URL(), demoNamespace, kubeconfig),
		close:  sim.Close,
	}, nil
}

// startXapiDemo runs the XenServer simulator: JSON-RPC on its pool master,
// data over its NBD server (TLS, with its own self-signed certificate, as
// hosts have), CBT on every disk so deltas come from changed blocks.
func startXapiDemo(dataDir string, populate func(demoTarget) error, logger *slog.Logger) (*demoSim, error) {
	sim, err := xapitest.Start(xapitest.Options{Dir: filepath.Join(dataDir, "simulator"), Logger: logger.With("component", "simulator")})
	if err != nil {
		return nil, fmt.Errorf("start simulator: %w", err)
	}
	target := newXapiTarget(sim)
	if err := populate(target); err != nil {
		sim.Close()
		return nil, fmt.Errorf("sample data: %w", err)
	}
	passwordFile := filepath.Join(dataDir, "password")
	caFile := filepath.Join(dataDir, "pool-ca.pem")
	for path, data := range map[string][]byte{passwordFile: []byte(xapitest.DefaultPassword + "\n"), caFile: sim.CAPEM()} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			sim.Close()
			return nil, err
		}
	}
	return &demoSim{
		source: "xapi+" + sim.URL(),
		flags:  [][2]string{{"username", xapitest.DefaultUser}, {"password-file", passwordFile}, {"ca-file", caFile}},
		env: []string{"VMEXPORTFS_DEMO_URL=" + sim.URL(), "VMEXPORTFS_DEMO_CA=" + caFile,
			"VMEXPORTFS_DEMO_USER=" + xapitest.DefaultUser, "VMEXPORTFS_DEMO_PASSWORD_FILE=" + passwordFile,
			"VMEXPORTFS_DEMO_SNAPSHOT_FILES=" + strings.Join(target.files, " ")},
		about: fmt.Sprintf("simulated XenServer pool master at %s (CA %s, user %s, password file %s; NBD at %s)",
			sim.URL(), caFile, xapitest.DefaultUser, passwordFile, sim.NBDAddr()),
		close: sim.Close,
	}, nil
}

// xapiTarget keeps the demo's VM ids as VM uuids and gives disks their
// VBD position in order; CD-ROMs are left to the simulator's own empty
// drive. Snapshots are named <name>-1, <name>-2, ...
type xapiTarget struct {
	sim     *xapitest.Server
	names   map[string]string   // vm id -> name
	devices map[string]string   // disk id -> userdevice
	disks   map[string][]string // vm id -> its disk ids
	snaps   map[string]int
	files   []string // vm=snapshot-uuid:userdevice:path of every snapshot disk, for the benchmark
}

func newXapiTarget(sim *xapitest.Server) *xapiTarget {
	return &xapiTarget{sim: sim, names: map[string]string{}, devices: map[string]string{}, disks: map[string][]string{}, snaps: map[string]int{}}
}

func (x *xapiTarget) addVM(vm demoVM) error {
	spec := xapitest.VMSpec{UUID: vm.id, Name: vm.name}
	for _, d := range vm.disks {
		if d.cdrom {
			continue
		}
		x.devices[d.id] = strconv.Itoa(len(spec.Disks))
		x.disks[vm.id] = append(x.disks[vm.id], d.id)
		spec.Disks = append(spec.Disks, xapitest.DiskSpec{Userdevice: x.devices[d.id], Size: d.size})
	}
	x.names[vm.id] = vm.name
	if _, err := x.sim.AddVM(spec); err != nil {
		return err
	}
	return x.sim.EnableCBT(vm.id)
}

func (x *xapiTarget) writeDisk(vm, disk string, off int64, p []byte) error {
	return x.sim.WriteDisk(vm, x.devices[disk], off, p)
}

func (x *xapiTarget) discardDisk(vm, disk string, off, n int64) error {
	return x.sim.DiscardDisk(vm, x.devices[disk], off, n)
}

func (x *xapiTarget) takeSnapshot(vm string) error {
	x.snaps[vm]++
	id, err := x.sim.TakeSnapshot(vm, fmt.Sprintf("%s-%d", x.names[vm], x.snaps[vm]))
	if err != nil {
		return err
	}
	for _, disk := range x.disks[vm] {
		path, err := x.sim.SnapshotData(id, x.devices[disk])
		if err != nil {
			return err
		}
		x.files = append(x.files, x.names[vm]+"-"+strconv.Itoa(x.snaps[vm])+":"+disk+":"+path)
	}
	return nil
}

// startOVirtDemo runs the oVirt simulator: the engine (SSO, REST) and an
// imageio daemon and proxy, all signed by one engine CA.
func startOVirtDemo(dataDir string, populate func(demoTarget) error, logger *slog.Logger) (*demoSim, error) {
	sim, err := ovirttest.Start(ovirttest.Options{Dir: filepath.Join(dataDir, "simulator"), Logger: logger.With("component", "simulator")})
	if err != nil {
		return nil, fmt.Errorf("start simulator: %w", err)
	}
	target := newOVirtTarget(sim)
	if err := populate(target); err != nil {
		sim.Close()
		return nil, fmt.Errorf("sample data: %w", err)
	}
	passwordFile := filepath.Join(dataDir, "password")
	caFile := filepath.Join(dataDir, "engine-ca.pem")
	for path, data := range map[string][]byte{passwordFile: []byte(ovirttest.DefaultPassword + "\n"), caFile: sim.CAPEM()} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			sim.Close()
			return nil, err
		}
	}
	return &demoSim{
		source: "ovirt+" + sim.URL(),
		flags:  [][2]string{{"username", ovirttest.DefaultUser}, {"password-file", passwordFile}, {"ca-file", caFile}},
		env: []string{"VMEXPORTFS_DEMO_URL=" + sim.URL(), "VMEXPORTFS_DEMO_CA=" + caFile,
			"VMEXPORTFS_DEMO_USER=" + ovirttest.DefaultUser, "VMEXPORTFS_DEMO_PASSWORD_FILE=" + passwordFile},
		about: fmt.Sprintf("simulated oVirt engine at %s (CA %s, user %s, password file %s; imageio at %s)",
			sim.URL(), caFile, ovirttest.DefaultUser, passwordFile, sim.DaemonURL()),
		close: sim.Close,
	}, nil
}

// ovirtTarget keeps the demo's ids as VM and disk ids and its devices as
// the disks' aliases; CD-ROMs are left out. Snapshots are described
// <name>-1, <name>-2, ...
type ovirtTarget struct {
	sim   *ovirttest.Server
	names map[string]string // vm id -> name
	snaps map[string]int
}

func newOVirtTarget(sim *ovirttest.Server) *ovirtTarget {
	return &ovirtTarget{sim: sim, names: map[string]string{}, snaps: map[string]int{}}
}

func (o *ovirtTarget) addVM(vm demoVM) error {
	spec := ovirttest.VMSpec{ID: vm.id, Name: vm.name}
	for _, d := range vm.disks {
		if !d.cdrom {
			spec.Disks = append(spec.Disks, ovirttest.DiskSpec{ID: d.id, Name: d.device, Size: d.size})
		}
	}
	o.names[vm.id] = vm.name
	_, err := o.sim.AddVM(spec)
	return err
}

func (o *ovirtTarget) writeDisk(vm, disk string, off int64, p []byte) error {
	return o.sim.WriteDisk(vm, disk, off, p)
}

func (o *ovirtTarget) discardDisk(vm, disk string, off, n int64) error {
	return o.sim.DiscardDisk(vm, disk, off, n)
}

func (o *ovirtTarget) takeSnapshot(vm string) error {
	o.snaps[vm]++
	_, err := o.sim.TakeSnapshot(vm, fmt.Sprintf("%s-%d", o.names[vm], o.snaps[vm]))
	return err
}

// demoTarget is a simulator the sample data is written to, in the verbs
// every platform's simulator has.
type demoTarget interface {
	addVM(vm demoVM) error
	writeDisk(vm, disk string, off int64, p []byte) error
	discardDisk(vm, disk string, off, n int64) error
	takeSnapshot(vm string) error
}

// demoVM is a sample VM: ids as Coriolis has them (the platform's hex ids),
// a friendly name, which KubeVirt uses as the VirtualMachine's name.
type demoVM struct {
	id, name string
	disks    []demoDisk
}

type demoDisk struct {
	id, device string // the platform's disk id; the device, KubeVirt's volume name
	size       int64
	cdrom      bool // not snapshotted; KubeVirt exports have none
}

type coriolisTarget struct{ sim *coriolistest.Server }

func (c coriolisTarget) addVM(vm demoVM) error {
	spec := coriolistest.VMSpec{ID: vm.id, FriendlyName: vm.name}
	for _, d := range vm.disks {
		spec.Disks = append(spec.Disks, coriolistest.DiskSpec{Name: d.id, Device: d.device, Size: d.size, CDROM: d.cdrom})
	}
	return c.sim.AddVM(spec)
}

func (c coriolisTarget) writeDisk(vm, disk string, off int64, p []byte) error {
	return c.sim.WriteDisk(vm, disk, off, p)
}

func (c coriolisTarget) discardDisk(vm, disk string, off, n int64) error {
	return c.sim.DiscardDisk(vm, disk, off, n)
}

func (c coriolisTarget) takeSnapshot(vm string) error {
	_, err := c.sim.TakeSnapshot(vm)
	return err
}

// kubevirtTarget names VMs by their friendly names and volumes by their
// devices; snapshots are <vm>-1, <vm>-2, ... (names are per namespace).
type kubevirtTarget struct {
	sim   *kubevirttest.Server
	vms   map[string]string // demo id -> VirtualMachine name
	vols  map[string]string // demo disk id -> volume name
	snaps map[string]int    // snapshots taken per VM
	order []string          // VirtualMachine names, as added
}

func newKubeVirtTarget(sim *kubevirttest.Server) *kubevirtTarget {
	return &kubevirtTarget{sim: sim, vms: map[string]string{}, vols: map[string]string{}, snaps: map[string]int{}}
}

func (k *kubevirtTarget) addVM(vm demoVM) error {
	var vols []kubevirttest.VolumeSpec
	for _, d := range vm.disks {
		if !d.cdrom {
			vols = append(vols, kubevirttest.VolumeSpec{Name: d.device, Size: d.size})
			k.vols[d.id] = d.device
		}
	}
	k.vms[vm.id] = vm.name
	k.order = append(k.order, vm.name)
	return k.sim.AddVM(vm.name, vols)
}

func (k *kubevirtTarget) writeDisk(vm, disk string, off int64, p []byte) error {
	return k.sim.WriteDisk(k.vms[vm], k.vols[disk], off, p)
}

func (k *kubevirtTarget) discardDisk(vm, disk string, off, n int64) error {
	return k.sim.DiscardDisk(k.vms[vm], k.vols[disk], off, n)
}

func (k *kubevirtTarget) takeSnapshot(vm string) error {
	k.snaps[vm]++
	return k.sim.TakeSnapshot(k.vms[vm], fmt.Sprintf("%s-%d", k.vms[vm], k.snaps[vm]))
}

// demoDatasets are the sample histories the demo can serve.
func demoDatasets() map[string]func(demoTarget) error {
	return map[string]func(demoTarget) error{
		"demo":     populateDemo,
		"bench":    populateBench,
		"scale":    populateScale,
		"vms-100k": func(sim demoTarget) error { return populateVMs(sim, 100_000) },
	}
}

// demoWriter writes reproducible pseudo-random data, so two demo runs serve
// the same bytes.
type demoWriter struct {
	sim demoTarget
	rng *mathrand.ChaCha8
	err error
}

func newDemoWriter(sim demoTarget, seed string) *demoWriter {
	var s [32]byte
	copy(s[:], seed)
	return &demoWriter{sim: sim, rng: mathrand.NewChaCha8(s)}
}

// write fills [off, off+n) of a disk with fresh data, in pieces so memory stays small.
func (w *demoWriter) write(vm, disk string, off, n int64) {
	const piece = 8 << 20
	buf := make([]byte, min(n, piece))
	for done := int64(0); done < n && w.err == nil; {
		chunk := buf[:min(n-done, piece)]
		w.rng.Read(chunk)
		w.err = w.sim.writeDisk(vm, disk, off+done, chunk)
		done += int64(len(chunk))
	}
}

func (w *demoWriter) discard(vm, disk string, off, n int64) {
	if w.err == nil {
		w.err = w.sim.discardDisk(vm, disk, off, n)
	}
}

func (w *demoWriter) snapshot(vm string) {
	if w.err == nil {
		w.err = w.sim.takeSnapshot(vm)
	}
}

func (w *demoWriter) addVM(vm demoVM) {
	if w.err == nil {
		w.err = w.sim.addVM(vm)
	}
}

const (
	mib = int64(1) << 20
	gib = int64(1) << 30
)

// The demo dataset's db01 and its root disk, whose snapshots TestDemoPlatforms
// copies, and web01 and its disk, which the demo's hint copies.
const (
	demoDB, demoDBRoot   = "0004fb00000600001a2b3c4d5e6f7002", "0004fb0000120000db01.img"
	demoWeb, demoWebDisk = "0004fb00000600001a2b3c4d5e6f7001", "0004fb0000120000aa01.img"
)

// populateDemo builds two VMs with histories that show every feature: a
// single-disk VM with three snapshots (changes crossing 2 MiB blocks, a
// discard, a snapshot without changes) and a multi-disk VM with a CD-ROM and a
// disk whose size is not a multiple of 2 MiB.
func populateDemo(sim demoTarget) error {
	w := newDemoWriter(sim, "vmexportfs demo")
	const web, webDisk = demoWeb, demoWebDisk
	w.addVM(demoVM{id: web, name: "web01", disks: []demoDisk{
		{id: webDisk, device: "xvda", size: 1 * gib},
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

	const db, dbRoot = demoDB, demoDBRoot
	const dbData, dbISO = "0004fb0000120000db02.img", "0004fb0000150000iso1.iso"
	w.addVM(demoVM{id: db, name: "db01", disks: []demoDisk{
		{id: dbRoot, device: "xvda", size: 512 * mib},
		{id: dbData, device: "xvdb", size: 1*gib + 15*mib + 512},
		{id: dbISO, device: "xvdc:cdrom", size: 64 * mib, cdrom: true},
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

// The scale dataset, for scripts/bench-scale.sh: the same 1 GiB written, in
// 64 extents spread evenly, on a 1 TiB disk and on a 2 GiB one; and
// readerDisks fully written disks for many readers at once.
const (
	scaleWritten, scaleExtents  = 1 * gib, 64
	readerDisks, readerDiskSize = 16, 128 * mib
)

func populateScale(sim demoTarget) error {
	w := newDemoWriter(sim, "vmexportfs scale")
	for _, d := range []struct {
		vm   string
		size int64
	}{{"tib", 1 << 40}, {"two-gib", 2 * gib}} {
		w.addVM(demoVM{id: d.vm, name: d.vm, disks: []demoDisk{{id: d.vm + ".img", device: "xvda", size: d.size}}})
		for i := range int64(scaleExtents) {
			w.write(d.vm, d.vm+".img", i*(d.size/scaleExtents), scaleWritten/scaleExtents)
		}
		w.snapshot(d.vm)
	}
	for i := range readerDisks {
		vm := fmt.Sprintf("reader-%02d", i)
		w.addVM(demoVM{id: vm, name: vm, disks: []demoDisk{{id: vm + ".img", device: "xvda", size: readerDiskSize}}})
		w.write(vm, vm+".img", 0, readerDiskSize)
		w.snapshot(vm)
	}
	return w.err
}

// populateVMs makes n VMs of one snapshot each, a 1 MiB disk with 64 KiB
// written: a large estate, for the listing rows of scripts/bench-scale.sh.
func populateVMs(sim demoTarget, n int) error {
	w := newDemoWriter(sim, "vmexportfs vms")
	for i := range n {
		vm := fmt.Sprintf("vm-%06d", i)
		w.addVM(demoVM{id: vm, name: vm, disks: []demoDisk{{id: vm + ".img", device: "xvda", size: 1 * mib}}})
		w.write(vm, vm+".img", 0, 64<<10)
		w.snapshot(vm)
	}
	return w.err
}

// populateBench builds the images scripts/bench.sh measures.
func populateBench(sim demoTarget) error {
	w := newDemoWriter(sim, "vmexportfs bench")
	const sparseSize, extents, extentLen = 2 * gib, 64, 8 * mib
	w.addVM(demoVM{id: "sparse", name: "sparse", disks: []demoDisk{
		{id: "sparse.img", device: "xvda", size: sparseSize},
	}})
	for i := range int64(extents) {
		w.write("sparse", "sparse.img", i*(sparseSize/extents), extentLen)
	}
	w.snapshot("sparse")
	w.addVM(demoVM{id: "full", name: "full", disks: []demoDisk{
		{id: "full.img", device: "xvda", size: 1 * gib},
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
