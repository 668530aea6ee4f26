// Package platform is the seam between the command and the platform
// packages. Each platform package describes itself with a Platform: the
// scheme of its sources, its usage lines, its own flags and how to open a
// source from their values. The command keeps one registry line per platform
// and derives from the registry its flags, its -o mount options, the Sources
// of --help and the lookup of a source's scheme, so adding a platform touches
// its own package and that line, never the filesystem, the cache or the
// command's common code.
package platform

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/url"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/pflag"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
	"github.com/vmexportfs/vmexportfs/backend/redact"
)

// ErrUsage marks an error of the invocation (the command exits with status
// 2): a missing or conflicting flag, a malformed source URL.
var ErrUsage = errors.New("usage")

// PasswordEnv is the environment variable holding the password when no
// --password-file is given.
const PasswordEnv = "VMEXPORTFS_PASSWORD"

// Platform describes one kind of source. It is a value built afresh by the
// platform package's Platform function: no package state, no init.
type Platform struct {
	// Scheme is the prefix of the source URL's scheme: "coriolis" for
	// coriolis+https://HOST:5544. Lower case, unique in the registry.
	Scheme string
	// Usage are the source forms shown under "Sources:" in --help.
	Usage []Usage
	// Flags registers the platform's own flags on f, with their help text,
	// and returns the Opener that reads their values once f is parsed. The
	// values live in the Opener (a closure), never in the command. Every
	// flag also has an -o spelling, its name with '_' for '-'
	// (kubevirt_internal=true for --kubevirt-internal), so a platform
	// registers only flags that make sense in fstab. A flag's name must not
	// clash with a common flag or another platform's (the command panics at
	// start, and its tests check the registry); shorthands are for common
	// flags only.
	Flags func(f *pflag.FlagSet) Opener
	// RefusedOptions are -o keys refused whatever the source, with the
	// advice given instead: secrets, which would be world-readable in
	// /proc/<pid>/cmdline ("token": "use token_file=FILE").
	RefusedOptions map[string]string
}

// Usage is one source form in --help: the source as written and what it is.
type Usage struct {
	Source string // kubevirt+https://API-SERVER/namespaces/NS
	Text   string // what it mounts, and the flags it takes
}

// Opener opens the sources of a platform from the values of its flags.
type Opener struct {
	// Check validates the source URL and the flags' values without touching
	// the network or the filesystem, so that a bad invocation fails before
	// the command daemonizes; nil when there is nothing to check. Its
	// errors wrap ErrUsage. c.Logger discards at that point.
	Check func(u *url.URL, c Common) error
	// Open connects to the source at u (the scheme's platform prefix
	// removed: https://HOST:5544), once Check passed, and checks the
	// credentials, so that they fail the mount rather than the first ls.
	// Every secret it learns is added to c.Secrets before it can reach an
	// error or a log line.
	Open func(ctx context.Context, u *url.URL, c Common) (backend.Source, error)
}

// Common is what every platform gets from the command's common flags. They
// are common because every platform has a use for them, or will: any
// platform speaks TLS (--ca-file, --insecure-skip-tls-verify), most log in
// with a user and a password (Coriolis, XenServer, oVirt), the user is part
// of the key of the state directory (two users of one platform never share a
// snapshot name map), and the password's file is checked before the command
// daemonizes. A platform that cannot honour one refuses it in Check.
type Common struct {
	Username string // --username; "" when not given
	// Password returns the password of --password-file, else of
	// $VMEXPORTFS_PASSWORD; the caller adds it to Secrets. Only platforms
	// that log in with a password call it.
	Password func() (string, error)
	// CAFile is --ca-file, a PEM bundle of the CAs that sign the platform's
	// certificates; "" means the system roots (see RootCAs).
	CAFile             string
	InsecureSkipVerify bool             // --insecure-skip-tls-verify, already logged loudly
	Policy             httprange.Policy // --retries, --read-timeout
	Logger             *slog.Logger     // never nil; its lines are redacted
	Secrets            *redact.Secrets  // what the process knows and must never print
	// CacheDir returns the mount's cache directory (--cache-dir, keyed by
	// the source), creating it: where a platform that must keep disk data
	// locally (a stream it cannot read at random) puts it. Only Open may
	// call it.
	CacheDir func() (string, error)
}

// CheckLogin refuses, before the command daemonizes, a mount of a platform
// that logs in with a user and a password when either is missing: name is
// the platform's, example a user to suggest ("" for none).
func (c Common) CheckLogin(name, example string) error {
	if c.Username == "" {
		if example != "" {
			return fmt.Errorf("%w: %s needs --username (such as %s)", ErrUsage, name, example)
		}
		return fmt.Errorf("%w: %s needs --username", ErrUsage, name)
	}
	if c.Password == nil {
		return fmt.Errorf("%w: %s needs a password", ErrUsage, name)
	}
	if _, err := c.Password(); err != nil {
		return fmt.Errorf("%w: %s: %w", ErrUsage, name, err)
	}
	return nil
}

// RootCAs reads CAFile; nil (the system roots) when it is not given.
func (c Common) RootCAs() (*x509.CertPool, error) {
	if c.CAFile == "" {
		return nil, nil
	}
	pem, err := os.ReadFile(c.CAFile)
	if err != nil {
		return nil, fmt.Errorf("--ca-file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--ca-file %s: no PEM certificate in it", c.CAFile)
	}
	return pool, nil
}

// Credentials are what a platform that logs in with a password needs: the
// password, already registered with Secrets, and the CAs (RootCAs).
func (c Common) Credentials() (password string, roots *x509.CertPool, err error) {
	if password, err = c.Password(); err != nil {
		return "", nil, err
	}
	c.Secrets.Add(password)
	if roots, err = c.RootCAs(); err != nil {
		return "", nil, err
	}
	return password, roots, nil
}

// ProbeFirstDisk opens (and closes) the first disk src lists, which makes a
// platform whose data server is not the one that lists check the
// credentials there.
func ProbeFirstDisk(ctx context.Context, src backend.Source) error {
	vms, err := src.VMs(ctx)
	if err != nil {
		return err
	}
	for _, vm := range vms {
		snaps, err := src.Snapshots(ctx, vm.ID)
		if err != nil {
			return err
		}
		for _, sn := range snaps {
			for _, d := range sn.Disks {
				disk, err := src.OpenDisk(ctx, backend.DiskRef{VM: vm.ID, Snapshot: sn.ID, Disk: d.ID})
				if err != nil {
					return err
				}
				_ = disk.Close() // the probe is done; a failed release is not the credentials' fault
				return nil
			}
		}
	}
	return nil
}

// ParseSize reads a byte count such as 256M, 1.5GiB or 4096.
func ParseSize(s string) (int64, error) {
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
		return 0, fmt.Errorf("size %q: want a number with an optional K, M, G or T suffix", redact.Cut(s, 32))
	}
	bytes := v * mult
	if math.IsNaN(bytes) || bytes < 0 || bytes >= math.MaxInt64 {
		return 0, fmt.Errorf("size %q: out of range", redact.Cut(s, 32))
	}
	return int64(bytes), nil
}

// AccessKeys are the flags of a platform that signs with an access key and
// a secret key (S3, JD Cloud): --NAME-access-key-file and
// --NAME-secret-key-file, each key else from its environment variable,
// never from the command line.
type AccessKeys struct {
	name                   string // the flags' prefix: "s3", "jdcloud"
	accessEnv, secretEnv   string
	accessFile, secretFile string
}

// NewAccessKeys defines the two flags on f; what names the keys' owner in
// their help ("the S3", "the JD Cloud").
func NewAccessKeys(f *pflag.FlagSet, name, what, accessEnv, secretEnv string) *AccessKeys {
	k := &AccessKeys{name: name, accessEnv: accessEnv, secretEnv: secretEnv}
	f.StringVar(&k.accessFile, name+"-access-key-file", "", "file holding "+what+" access key (else $"+accessEnv+")")
	f.StringVar(&k.secretFile, name+"-secret-key-file", "", "file holding "+what+" secret key (else $"+secretEnv+"); never on the command line")
	return k
}

// RefusedKeyOptions are the -o spellings of the keys themselves, for the
// Platform's RefusedOptions of the AccessKeys named name.
func RefusedKeyOptions(name string) map[string]string {
	return map[string]string{
		name + "_secret_key": "use " + name + "_secret_key_file=FILE",
		name + "_access_key": "use " + name + "_access_key_file=FILE",
	}
}

// Check refuses key files that are not there and a missing secret key.
func (k *AccessKeys) Check() error {
	for _, file := range []string{k.accessFile, k.secretFile} {
		if file == "" {
			continue
		}
		if _, err := os.Stat(file); err != nil {
			return fmt.Errorf("%w: %w", ErrUsage, err)
		}
	}
	if k.secretFile == "" && os.Getenv(k.secretEnv) == "" {
		return fmt.Errorf("%w: %s needs --%s-secret-key-file or $%s", ErrUsage, k.name, k.name, k.secretEnv)
	}
	return nil
}

// Read reads both keys and registers the secret one with c.Secrets.
func (k *AccessKeys) Read(c Common) (access, secret string, err error) {
	if secret, err = key(k.secretFile, k.secretEnv); err != nil {
		return "", "", fmt.Errorf("--%s-secret-key-file: %w", k.name, err)
	}
	c.Secrets.Add(secret)
	if access, err = key(k.accessFile, k.accessEnv); err != nil {
		return "", "", fmt.Errorf("--%s-access-key-file: %w", k.name, err)
	}
	return access, secret, nil
}

// key reads a credential from file, else from the environment variable env.
func key(file, env string) (string, error) {
	if file == "" {
		return os.Getenv(env), nil
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}
