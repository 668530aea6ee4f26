package ovirt

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/platform"
)

// sourceFlags are the values of the oVirt flags of one command line.
type sourceFlags struct {
	snapshotTimeout time.Duration
	readers         int
}

// Platform describes ovirt+https://ENGINE sources for the command: the
// engine's SSO with the common --username (admin@internal) and password,
// TLS verified with --ca-file (the engine CA, which also signs imageio's
// certificates).
func Platform() platform.Platform {
	return platform.Platform{
		Scheme: "ovirt",
		Usage: []platform.Usage{{
			Source: "ovirt+https://ENGINE",
			Text:   "oVirt / RHV engine (--username USER@PROFILE, --password-file or $" + platform.PasswordEnv + ", --ca-file with the engine CA)",
		}},
		Flags: func(f *pflag.FlagSet) platform.Opener {
			v := &sourceFlags{}
			f.DurationVar(&v.snapshotTimeout, "ovirt-snapshot-timeout", DefaultSnapshotTimeout, "how long mkdir and rmdir wait for the engine to finish a snapshot")
			f.IntVar(&v.readers, "ovirt-readers", DefaultReaders, "connections a disk's reads use at most (imageio's max_readers bounds it too)")
			return platform.Opener{Check: v.check, Open: v.open}
		},
	}
}

func (v *sourceFlags) check(u *url.URL, c platform.Common) error {
	if u.Scheme != "https" || u.Host == "" || u.RawQuery != "" || u.User != nil ||
		(u.Path != "" && u.Path != "/" && strings.TrimSuffix(u.Path, "/") != "/ovirt-engine/api") {
		return fmt.Errorf("%w: ovirt source: want ovirt+https://ENGINE (no query or user in the URL)", platform.ErrUsage)
	}
	if err := c.CheckLogin("ovirt", "admin@internal"); err != nil {
		return err
	}
	if v.snapshotTimeout <= 0 {
		return fmt.Errorf("%w: --ovirt-snapshot-timeout %s: must be positive", platform.ErrUsage, v.snapshotTimeout)
	}
	if v.readers < 1 || v.readers > 64 {
		return fmt.Errorf("%w: --ovirt-readers %d: want 1 to 64", platform.ErrUsage, v.readers)
	}
	return nil
}

func (v *sourceFlags) open(ctx context.Context, u *url.URL, c platform.Common) (backend.Source, error) {
	password, pool, err := c.Credentials()
	if err != nil {
		return nil, err
	}
	return New(ctx, Config{
		URL: u.String(), Username: c.Username, Password: password,
		RootCAs: pool, InsecureSkipVerify: c.InsecureSkipVerify,
		SnapshotTimeout: v.snapshotTimeout, Readers: v.readers,
		Policy: c.Policy, Logger: c.Logger, Secrets: c.Secrets,
	})
}
