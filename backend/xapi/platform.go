package xapi

import (
	"context"
	"fmt"
	"net/url"

	"github.com/spf13/pflag"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/nbd"
	"github.com/vmexportfs/vmexportfs/backend/platform"
	"github.com/vmexportfs/vmexportfs/backend/vhdstream"
)

// DefaultSpillSize bounds what a mount streams into its cache directory
// when the pool has no NBD network.
const DefaultSpillSize = "16G"

// sourceFlags are the values of the XenServer flags of one command line.
type sourceFlags struct {
	cbt            bool
	rmdir          string
	nbdConnections int
	spillSize      string
}

// Platform describes xapi+https://POOL-MASTER sources for the command:
// login with the common --username and password, TLS verified with
// --ca-file.
func Platform() platform.Platform {
	return platform.Platform{
		Scheme: "xapi",
		Usage: []platform.Usage{{
			Source: "xapi+https://POOL-MASTER",
			Text:   "XenServer / XCP-ng pool (--username, --password-file or $" + platform.PasswordEnv + ", --ca-file)",
		}},
		Flags: func(f *pflag.FlagSet) platform.Opener {
			v := &sourceFlags{}
			f.BoolVar(&v.cbt, "xapi-cbt", true, "mkdir enables changed block tracking on the VM's disks first (idempotent), so deltas between snapshots are exact; false leaves the VM as it is")
			f.StringVar(&v.rmdir, "xapi-rmdir", string(RmdirDestroy), "what rmdir of a snapshot does: destroy (the snapshot VM and its disks) or data-destroy (free the data, keep the CBT metadata for other backup tools)")
			f.IntVar(&v.nbdConnections, "nbd-connections", nbd.DefaultConnections, fmt.Sprintf("NBD connections per open disk (1-%d; a host serves %d in all)", nbd.MaxConnections, nbd.MaxConnections))
			f.StringVar(&v.spillSize, "spill-size", DefaultSpillSize, "without an NBD network: how much disk data may be streamed into the cache directory in all")
			return platform.Opener{Check: v.check, Open: v.open}
		},
	}
}

func (v *sourceFlags) check(u *url.URL, c platform.Common) error {
	if u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
		return fmt.Errorf("%w: xapi source: want xapi+https://POOL-MASTER (no path, query or user in the URL)", platform.ErrUsage)
	}
	if err := c.CheckLogin("xapi", ""); err != nil {
		return err
	}
	switch RmdirMode(v.rmdir) {
	case RmdirDestroy, RmdirDataDestroy:
	default:
		return fmt.Errorf("%w: --xapi-rmdir %q: want destroy or data-destroy", platform.ErrUsage, cut(v.rmdir, 32))
	}
	if v.nbdConnections < 1 || v.nbdConnections > nbd.MaxConnections {
		return fmt.Errorf("%w: --nbd-connections %d: want 1 to %d", platform.ErrUsage, v.nbdConnections, nbd.MaxConnections)
	}
	if _, err := platform.ParseSize(v.spillSize); err != nil {
		return fmt.Errorf("%w: --spill-size: %w", platform.ErrUsage, err)
	}
	return nil
}

func (v *sourceFlags) open(ctx context.Context, u *url.URL, c platform.Common) (backend.Source, error) {
	password, pool, err := c.Credentials()
	if err != nil {
		return nil, err
	}
	spill, err := platform.ParseSize(v.spillSize)
	if err != nil {
		return nil, err
	}
	dir, err := c.CacheDir()
	if err != nil {
		return nil, err
	}
	return New(ctx, Config{
		URL: u.String(), Username: c.Username, Password: password,
		RootCAs: pool, InsecureSkipVerify: c.InsecureSkipVerify,
		EnableCBT: v.cbt, Rmdir: RmdirMode(v.rmdir), NBDConnections: v.nbdConnections,
		SpillDir: dir, SpillBudget: vhdstream.NewBudget(spill),
		Policy: c.Policy, Logger: c.Logger, Secrets: c.Secrets,
	})
}
