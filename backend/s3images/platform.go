package s3images

import (
	"context"
	"fmt"
	"net/url"
	"strings"

	"github.com/spf13/pflag"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/platform"
	"github.com/vmexportfs/vmexportfs/backend/s3"
)

// Environment variables holding the keys when no key file is given: the
// names every S3 tool reads.
const (
	AccessKeyEnv = "AWS_ACCESS_KEY_ID"
	SecretKeyEnv = "AWS_SECRET_ACCESS_KEY"
)

// sourceFlags are the values of the S3 flags of one command line.
type sourceFlags struct {
	keys   *platform.AccessKeys
	region string
}

// Platform describes s3+https://ENDPOINT/BUCKET[/PREFIX] sources: a bucket
// of exported images, each QCOW2 or raw object a VM with one snapshot.
func Platform() platform.Platform {
	return platform.Platform{
		Scheme: "s3",
		Usage: []platform.Usage{{
			Source: "s3+https://ENDPOINT/BUCKET[/PREFIX]",
			Text:   "a bucket of QCOW2 and raw images (--s3-access-key-file and --s3-secret-key-file, or $" + AccessKeyEnv + " and $" + SecretKeyEnv + "; --s3-region)",
		}},
		Flags: func(f *pflag.FlagSet) platform.Opener {
			v := &sourceFlags{keys: platform.NewAccessKeys(f, "s3", "the S3", AccessKeyEnv, SecretKeyEnv)}
			f.StringVar(&v.region, "s3-region", "us-east-1", "the bucket's region, as the SigV4 signature names it")
			return platform.Opener{Check: v.check, Open: v.open}
		},
		RefusedOptions: platform.RefusedKeyOptions("s3"),
	}
}

// splitSource is the endpoint, bucket and prefix of a source URL.
func splitSource(u *url.URL) (endpoint, bucket, prefix string, err error) {
	if u.Scheme != "https" || u.Host == "" || u.RawQuery != "" || u.User != nil {
		return "", "", "", fmt.Errorf("%w: s3 source: want s3+https://ENDPOINT/BUCKET[/PREFIX]", platform.ErrUsage)
	}
	bucket, prefix, _ = strings.Cut(strings.TrimPrefix(u.Path, "/"), "/")
	if bucket == "" {
		return "", "", "", fmt.Errorf("%w: s3 source: no bucket in the path", platform.ErrUsage)
	}
	if prefix != "" && !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	return "https://" + u.Host, bucket, prefix, nil
}

func (v *sourceFlags) check(u *url.URL, c platform.Common) error {
	if _, _, _, err := splitSource(u); err != nil {
		return err
	}
	return v.keys.Check()
}

func (v *sourceFlags) open(ctx context.Context, u *url.URL, c platform.Common) (backend.Source, error) {
	endpoint, bucket, prefix, err := splitSource(u)
	if err != nil {
		return nil, err
	}
	access, secret, err := v.keys.Read(c)
	if err != nil {
		return nil, err
	}
	roots, err := c.RootCAs()
	if err != nil {
		return nil, err
	}
	return New(ctx, Config{
		S3: s3.Config{Endpoint: endpoint, Region: v.region, AccessKey: access, SecretKey: secret,
			RootCAs: roots, InsecureSkipVerify: c.InsecureSkipVerify, Policy: c.Policy, Secrets: c.Secrets},
		Bucket: bucket, Prefix: prefix, Logger: c.Logger,
	})
}
