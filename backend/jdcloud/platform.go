package jdcloud

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

// Environment variables holding the keys when no key file is given.
const (
	AccessKeyEnv = "JDCLOUD_ACCESS_KEY"
	SecretKeyEnv = "JDCLOUD_SECRET_KEY"
)

// sourceFlags are the values of the JD Cloud flags of one command line.
type sourceFlags struct {
	keys                  *platform.AccessKeys
	ossURL, ossEndpoint   string
	exportRole, ossPrefix string
	poll                  time.Duration
	deleteImage           bool
}

// Platform describes jdcloud+https://vm.jdcloud-api.com/v1/regions/REGION
// sources: a region's image exports in one OSS bucket.
func Platform() platform.Platform {
	return platform.Platform{
		Scheme: "jdcloud",
		Usage: []platform.Usage{{
			Source: "jdcloud+https://vm.jdcloud-api.com/v1/regions/REGION",
			Text:   "JD Cloud image exports (--oss-url https://BUCKET.s3.REGION.jdcloud-oss.com, --jdcloud-access-key-file and --jdcloud-secret-key-file or $" + AccessKeyEnv + " and $" + SecretKeyEnv + ")",
		}},
		Flags: func(f *pflag.FlagSet) platform.Opener {
			v := &sourceFlags{keys: platform.NewAccessKeys(f, "jdcloud", "the JD Cloud", AccessKeyEnv, SecretKeyEnv)}
			f.StringVar(&v.ossURL, "oss-url", "", "the bucket the exports are written to, https://BUCKET.s3[-internal].REGION.jdcloud-oss.com")
			f.StringVar(&v.ossEndpoint, "oss-endpoint", "", "where the exports are read, path-style (default the public endpoint of --oss-url's region)")
			f.StringVar(&v.exportRole, "jdcloud-export-role", "", "the role exportImage writes the bucket with; mkdir needs it")
			f.StringVar(&v.ossPrefix, "jdcloud-oss-prefix", "vmexportfs", "the prefix of the objects mkdir's exports write (letters and digits, at most 32)")
			f.DurationVar(&v.poll, "jdcloud-poll-interval", 10*time.Second, "how often mkdir's image is looked at until it can be exported")
			f.BoolVar(&v.deleteImage, "jdcloud-rmdir-image", false, "rmdir deletes the snapshot's image too, not only its exported object")
			return platform.Opener{Check: v.check, Open: v.open}
		},
		RefusedOptions: platform.RefusedKeyOptions("jdcloud"),
	}
}

func (v *sourceFlags) check(u *url.URL, _ platform.Common) error {
	if u.Scheme != "https" || u.Host == "" || u.User != nil || u.RawQuery != "" || !strings.HasPrefix(strings.Trim(u.Path, "/"), "v1/regions/") {
		return fmt.Errorf("%w: jdcloud source: want jdcloud+https://vm.jdcloud-api.com/v1/regions/REGION", platform.ErrUsage)
	}
	if v.ossURL == "" {
		return fmt.Errorf("%w: jdcloud needs --oss-url, the bucket of the exports", platform.ErrUsage)
	}
	if _, _, _, err := parseOSS(v.ossURL, v.ossEndpoint); err != nil {
		return fmt.Errorf("%w: %w", platform.ErrUsage, err)
	}
	if len(v.ossPrefix) > 32 || strings.IndexFunc(v.ossPrefix, func(r rune) bool { return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9') }) >= 0 {
		return fmt.Errorf("%w: --jdcloud-oss-prefix %q: at most 32 letters and digits", platform.ErrUsage, v.ossPrefix)
	}
	if v.poll <= 0 {
		return fmt.Errorf("%w: --jdcloud-poll-interval must be positive", platform.ErrUsage)
	}
	return v.keys.Check()
}

func (v *sourceFlags) open(ctx context.Context, u *url.URL, c platform.Common) (backend.Source, error) {
	access, secret, err := v.keys.Read(c)
	if err != nil {
		return nil, err
	}
	roots, err := c.RootCAs()
	if err != nil {
		return nil, err
	}
	return NewSource(ctx, SourceConfig{
		API: u.String(), Credentials: Credentials{AccessKey: access, SecretKey: secret},
		OSSURL: v.ossURL, OSSEndpoint: v.ossEndpoint, ExportRole: v.exportRole, OSSPrefix: v.ossPrefix, PollInterval: v.poll, DeleteImage: v.deleteImage,
		RootCAs: roots, InsecureSkipVerify: c.InsecureSkipVerify,
		Policy: c.Policy, Logger: c.Logger, Secrets: c.Secrets,
	})
}
