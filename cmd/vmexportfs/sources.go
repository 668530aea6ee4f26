package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"sort"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/coriolis"
	"github.com/vmexportfs/vmexportfs/backend/kubevirt"
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
	case "kubevirt":
		return platform{
			usage: "kubevirt+https://API-SERVER/namespaces/NS        KubeVirt VirtualMachineExports (--kubeconfig, --kubevirt-internal)\n" +
				"  kubevirt+https://.../virtualmachineexports/NAME   one export, no API access (--token-file, --export-status or --ca-file and --kubevirt-volume)",
			open: openKubevirt,
		}, true
	}
	return platform{}, false
}

func platformNames() []string {
	names := []string{"coriolis", "kubevirt"}
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
	cfg.secrets.Add(password)
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
		Secrets:            cfg.secrets,
	})
}

func openKubevirt(ctx context.Context, cfg mountConfig, u *url.URL, logger *slog.Logger) (backend.Source, error) {
	su, err := kubevirt.ParseSourceURL(u.String())
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	if cfg.insecureSkipVerify {
		return nil, fmt.Errorf("%w: kubevirt: --insecure-skip-tls-verify is not supported; export servers are verified against their status certificate", errUsage)
	}
	if su.Standalone() {
		if cfg.tokenFile == "" {
			return nil, fmt.Errorf("%w: kubevirt standalone mode needs --token-file", errUsage)
		}
		src, err := kubevirt.NewStandalone(kubevirt.StandaloneConfig{
			ExportURL:        su.ExportURL,
			TokenFile:        cfg.tokenFile,
			CAFile:           cfg.caFile,
			ExportStatusFile: cfg.exportStatus,
			Volumes:          cfg.kubevirtVolumes,
			Internal:         cfg.kubevirtInternal,
			Policy:           cfg.policy(),
			Logger:           logger,
			Secrets:          cfg.secrets,
		})
		if err != nil {
			return nil, err
		}
		// Fail the mount, not the first read, on a token or CA the export
		// server refuses.
		if err := probeFirstDisk(ctx, src); err != nil {
			return nil, err
		}
		return src, nil
	}
	src, err := kubevirt.New(kubevirt.Config{
		APIServer:    su.APIServer,
		Namespace:    su.Namespace,
		Kubeconfig:   cfg.kubeconfig,
		Internal:     cfg.kubevirtInternal,
		ReadyTimeout: cfg.readyTimeout,
		Policy:       cfg.policy(),
		Logger:       logger,
		Secrets:      cfg.secrets,
	})
	if err != nil {
		return nil, err
	}
	// Fail the mount, not the first ls, on a wrong token or CA.
	if _, err := src.VMs(ctx); err != nil {
		return nil, err
	}
	return src, nil
}

// probeFirstDisk opens the first disk the source lists, which makes the
// platform check our credentials on its data server.
func probeFirstDisk(ctx context.Context, src backend.Source) error {
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
				_, err := src.OpenDisk(ctx, backend.DiskRef{VM: vm.ID, Snapshot: sn.ID, Disk: d.ID})
				return err
			}
		}
	}
	return nil
}
