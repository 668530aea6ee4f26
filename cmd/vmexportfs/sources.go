package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"sort"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/coriolis"
)

// platform is one kind of SOURCE: how it is written and how it is opened.
type platform struct {
	usage string
	open  func(ctx context.Context, cfg mountConfig, u *url.URL, logger *slog.Logger) (backend.Source, error)
}

// lookupPlatform is the registry of platforms, keyed by the prefix of the
// source URL's scheme ("coriolis" in coriolis+https://...).
func lookupPlatform(name string) (platform, bool) {
	switch name {
	case "coriolis":
		return platform{
			usage: "coriolis+https://HOST:5544   Coriolis OVM exporter (--username, --password-file or $" + passwordEnv + ", --ca-file)",
			open:  openCoriolis,
		}, true
	}
	return platform{}, false
}

func platformNames() []string {
	names := []string{"coriolis"}
	sort.Strings(names)
	return names
}

// openSource connects to the platform named by cfg.source; bad credentials or
// an untrusted certificate fail here, before anything is mounted.
func openSource(ctx context.Context, cfg mountConfig, logger *slog.Logger) (backend.Source, error) {
	name, u, err := splitSource(cfg.source)
	if err != nil {
		return nil, err
	}
	p, _ := lookupPlatform(name)
	src, err := p.open(ctx, cfg, u, logger)
	if err != nil {
		return nil, fmt.Errorf("connect to %s source %s: %w", name, u.Redacted(), err)
	}
	return src, nil
}

func openCoriolis(ctx context.Context, cfg mountConfig, u *url.URL, logger *slog.Logger) (backend.Source, error) {
	if cfg.username == "" {
		return nil, fmt.Errorf("%w: coriolis needs --username", errUsage)
	}
	password, err := cfg.password()
	if err != nil {
		return nil, err
	}
	pool, err := cfg.rootCAs()
	if err != nil {
		return nil, err
	}
	return coriolis.New(ctx, coriolis.Config{
		URL:                u.String(),
		Username:           cfg.username,
		Password:           password,
		RootCAs:            pool,
		InsecureSkipVerify: cfg.insecureSkipVerify,
		Policy:             cfg.policy(),
		Logger:             logger,
	})
}
