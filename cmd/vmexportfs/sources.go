package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"slices"
	"strings"

	"github.com/spf13/pflag"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/coriolis"
	"github.com/vmexportfs/vmexportfs/backend/jdcloud"
	"github.com/vmexportfs/vmexportfs/backend/kubevirt"
	"github.com/vmexportfs/vmexportfs/backend/ovirt"
	"github.com/vmexportfs/vmexportfs/backend/platform"
	"github.com/vmexportfs/vmexportfs/backend/s3images"
	"github.com/vmexportfs/vmexportfs/backend/xapi"
)

// platforms is the registry: one line per platform. Everything the command
// knows of a platform (its scheme, its flags and their -o spellings, its
// usage in --help, how to open it) comes from there.
func platforms() []platform.Platform {
	return []platform.Platform{
		coriolis.Platform(),
		kubevirt.Platform(),
		xapi.Platform(),
		ovirt.Platform(),
		s3images.Platform(),
		jdcloud.Platform(),
	}
}

// registered is a platform of one command line, its flags defined.
type registered struct {
	platform.Platform
	opener platform.Opener // holds the values of the platform's flags
	flags  *pflag.FlagSet  // the platform's own flags, also defined on the command line
}

// registerPlatforms defines every platform's flags on f, sorted by scheme. A
// registry that contradicts itself or the common flags (a duplicate scheme,
// a flag defined twice) is a programming error, and panics.
func registerPlatforms(f *pflag.FlagSet, registry []platform.Platform) []registered {
	var out []registered
	for _, p := range registry {
		if p.Scheme == "" || p.Scheme != strings.ToLower(p.Scheme) || strings.ContainsAny(p.Scheme, "+:/ ") || p.Flags == nil {
			panic(fmt.Sprintf("platform %q: want a lower-case scheme without '+', ':' or '/', and Flags", p.Scheme))
		}
		if slices.ContainsFunc(out, func(r registered) bool { return r.Scheme == p.Scheme }) {
			panic(fmt.Sprintf("platform %q registered twice", p.Scheme))
		}
		own := pflag.NewFlagSet(p.Scheme, pflag.ContinueOnError)
		own.SetOutput(io.Discard)
		opener := p.Flags(own)
		if opener.Open == nil {
			panic(fmt.Sprintf("platform %q: Flags returned no Open", p.Scheme))
		}
		own.VisitAll(func(fl *pflag.Flag) {
			if f.Lookup(fl.Name) != nil || fl.Shorthand != "" || ignoredMountOptions[fl.Name] || commonRefused[fl.Name] != "" {
				panic(fmt.Sprintf("platform %q: flag --%s clashes with a common flag, another platform's or a mount option", p.Scheme, fl.Name))
			}
		})
		f.AddFlagSet(own)
		out = append(out, registered{Platform: p, opener: opener, flags: own})
	}
	slices.SortFunc(out, func(a, b registered) int { return strings.Compare(a.Scheme, b.Scheme) })
	return out
}

func schemes(ps []registered) []string {
	var names []string
	for _, p := range ps {
		names = append(names, p.Scheme)
	}
	return names
}

// checkForeignFlags refuses a flag of another platform than the source's:
// it would be ignored, which is never what the user meant.
func checkForeignFlags(f *pflag.FlagSet, ps []registered, source registered) error {
	for _, p := range ps {
		if p.Scheme == source.Scheme {
			continue
		}
		var err error
		p.flags.VisitAll(func(fl *pflag.Flag) {
			if err == nil && f.Changed(fl.Name) {
				err = fmt.Errorf("%w: --%s (-o %s=) is for %s+ sources, not %s+", errUsage,
					fl.Name, strings.ReplaceAll(fl.Name, "-", "_"), p.Scheme, source.Scheme)
			}
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// plainHTTP refuses a source over plain http, whatever the platform: each
// logs in or signs its requests (a password, a token, an access key's
// signatures, which whoever sees them can replay), and the disks would
// cross the network unauthenticated. There is no opt-in.
func plainHTTP(u *url.URL, name string) error {
	fixed := *u
	fixed.Scheme = name + "+https"
	return fmt.Errorf("source %s+http://%s: plain http would send the password, token or keys in cleartext; use %s",
		name, truncate(u.Host, 80), truncate(fixed.Redacted(), 120))
}

// common is what every platform gets from the common flags.
func (cfg mountConfig) common(logger *slog.Logger) platform.Common {
	return platform.Common{
		Username:           cfg.username,
		Password:           cfg.password,
		CAFile:             cfg.caFile,
		InsecureSkipVerify: cfg.insecureSkipVerify,
		Policy:             cfg.policy(),
		Logger:             logger,
		Secrets:            cfg.secrets,
		CacheDir: func() (string, error) {
			_, cacheDir, err := dataDirs(cfg)
			return cacheDir, err
		},
	}
}

// checkSource runs the source platform's checks of its URL and flags, which
// touch neither the network nor the filesystem.
func checkSource(cfg mountConfig, logger *slog.Logger) (registered, *url.URL, error) {
	p, u, err := splitSource(cfg.source, cfg.platforms)
	if err != nil {
		return registered{}, nil, err
	}
	if p.opener.Check != nil {
		if err := p.opener.Check(u, cfg.common(logger)); err != nil {
			return registered{}, nil, err
		}
	}
	return p, u, nil
}

// openSource connects to the platform named by cfg.source; bad credentials or
// an untrusted certificate fail here, before anything is mounted.
func openSource(ctx context.Context, cfg mountConfig, logger *slog.Logger) (backend.Source, error) {
	p, u, err := checkSource(cfg, logger)
	if err != nil {
		return nil, err
	}
	src, err := p.opener.Open(ctx, u, cfg.common(logger))
	if err != nil {
		return nil, fmt.Errorf("connect to %s source %s: %w", p.Scheme, u.Redacted(), err)
	}
	return src, nil
}
