package coriolis

import (
	"context"
	"net/url"

	"github.com/spf13/pflag"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/platform"
)

// Platform describes coriolis+https://HOST:5544 sources for the command. The
// exporter logs in with the common --username and password (--password-file
// or $VMEXPORTFS_PASSWORD) and is verified with the common --ca-file, so it
// has no flags of its own.
func Platform() platform.Platform {
	return platform.Platform{
		Scheme: "coriolis",
		Usage: []platform.Usage{{
			Source: "coriolis+https://HOST:5544",
			Text:   "Coriolis OVM exporter (--username, --password-file or $" + platform.PasswordEnv + ", --ca-file)",
		}},
		Flags: func(*pflag.FlagSet) platform.Opener {
			return platform.Opener{Check: checkSource, Open: openSource}
		},
	}
}

// checkSource refuses a mount without a user or a password before anything
// starts.
func checkSource(_ *url.URL, c platform.Common) error {
	return c.CheckLogin("coriolis", "")
}

// openSource logs in once, so a wrong password or an untrusted certificate
// fails the mount.
func openSource(ctx context.Context, u *url.URL, c platform.Common) (backend.Source, error) {
	password, pool, err := c.Credentials()
	if err != nil {
		return nil, err
	}
	return New(ctx, Config{
		URL:                u.String(),
		Username:           c.Username,
		Password:           password,
		RootCAs:            pool,
		InsecureSkipVerify: c.InsecureSkipVerify,
		Policy:             c.Policy,
		Logger:             c.Logger,
		Secrets:            c.Secrets,
	})
}
