package kubevirt

import (
	"context"
	"fmt"
	"net/url"
	"time"

	"github.com/spf13/pflag"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/platform"
)

// sourceFlags are the values of the KubeVirt flags of one command line.
type sourceFlags struct {
	kubeconfig   string
	internal     bool
	readyTimeout time.Duration
	tokenFile    string
	exportStatus string
	volumes      []string
	connectWait  time.Duration
	serverName   string
}

// Platform describes kubevirt+https://… sources for the command: a namespace
// through the API server, or one export without API access (standalone).
// The API server's credentials come from the kubeconfig; the common
// --ca-file verifies a standalone export server, and the common
// --insecure-skip-tls-verify is refused (export servers are verified against
// their status certificate).
func Platform() platform.Platform {
	return platform.Platform{
		Scheme: "kubevirt",
		Usage: []platform.Usage{
			{Source: "kubevirt+https://API-SERVER/namespaces/NS", Text: "KubeVirt VirtualMachineExports (--kubeconfig, --kubevirt-internal)"},
			{Source: "kubevirt+https://.../virtualmachineexports/NAME", Text: "one export, no API access (--token-file, --export-status or --ca-file and --kubevirt-volume)"},
		},
		Flags: func(f *pflag.FlagSet) platform.Opener {
			v := &sourceFlags{}
			f.StringVar(&v.kubeconfig, "kubeconfig", "", "kubeconfig for the API server's token and CA (default $KUBECONFIG, then ~/.kube/config)")
			f.BoolVar(&v.internal, "kubevirt-internal", false, "use the exports' in-cluster links instead of the external ones")
			f.DurationVar(&v.readyTimeout, "ready-timeout", 2*time.Minute, "how long mkdir waits for the snapshot and its export to be Ready")
			f.StringVar(&v.tokenFile, "token-file", "", "standalone: file holding the export token")
			f.StringVar(&v.exportStatus, "export-status", "", "standalone: file with the export's status (kubectl get vmexport NAME -o yaml); re-read on certificate errors")
			f.StringArrayVar(&v.volumes, "kubevirt-volume", nil, "standalone without --export-status: a volume name of the export (repeatable)")
			f.DurationVar(&v.connectWait, "backup-connect-timeout", DefaultBackupConnectTimeout, "how long a backup export's map may answer 503 (virt-launcher not connected yet) before opening its disk fails")
			f.StringVar(&v.serverName, "tls-server-name", "", "verify export servers' certificates against this name (kubectl port-forward: the pod's service DNS name, such as virt-export-NAME.NS.svc)")
			return platform.Opener{Check: v.check, Open: v.open}
		},
		RefusedOptions: map[string]string{"token": "use token_file=FILE"},
	}
}

// check refuses what cannot work, before anything starts.
func (v *sourceFlags) check(u *url.URL, c platform.Common) error {
	su, err := ParseSourceURL(u.String())
	if err != nil {
		return fmt.Errorf("%w: %v", platform.ErrUsage, err)
	}
	if v.connectWait <= 0 {
		return fmt.Errorf("%w: --backup-connect-timeout %s: must be positive", platform.ErrUsage, v.connectWait)
	}
	if v.readyTimeout <= 0 {
		return fmt.Errorf("%w: --ready-timeout %s: must be positive", platform.ErrUsage, v.readyTimeout)
	}
	if c.InsecureSkipVerify {
		return fmt.Errorf("%w: kubevirt: --insecure-skip-tls-verify is not supported; export servers are verified against their status certificate", platform.ErrUsage)
	}
	if su.Standalone() && v.tokenFile == "" {
		return fmt.Errorf("%w: kubevirt standalone mode needs --token-file", platform.ErrUsage)
	}
	return nil
}

// open connects and makes the platform check the credentials: the API
// server's for a namespace, the export server's for a standalone export.
func (v *sourceFlags) open(ctx context.Context, u *url.URL, c platform.Common) (backend.Source, error) {
	su, err := ParseSourceURL(u.String())
	if err != nil {
		return nil, fmt.Errorf("%w: %v", platform.ErrUsage, err)
	}
	if su.Standalone() {
		s, err := NewStandalone(StandaloneConfig{
			ExportURL:            su.ExportURL,
			TokenFile:            v.tokenFile,
			CAFile:               c.CAFile,
			ExportStatusFile:     v.exportStatus,
			Volumes:              v.volumes,
			Internal:             v.internal,
			BackupConnectTimeout: v.connectWait,
			TLSServerName:        v.serverName,
			Policy:               c.Policy,
			Logger:               c.Logger,
			Secrets:              c.Secrets,
		})
		if err != nil {
			return nil, err
		}
		// Fail the mount, not the first read, on a token or CA the export
		// server refuses.
		if err := platform.ProbeFirstDisk(ctx, s); err != nil {
			s.Close()
			return nil, err
		}
		return s, nil
	}
	s, err := New(Config{
		APIServer:            su.APIServer,
		Namespace:            su.Namespace,
		Kubeconfig:           v.kubeconfig,
		Internal:             v.internal,
		ReadyTimeout:         v.readyTimeout,
		BackupConnectTimeout: v.connectWait,
		TLSServerName:        v.serverName,
		Policy:               c.Policy,
		Logger:               c.Logger,
		Secrets:              c.Secrets,
	})
	if err != nil {
		return nil, err
	}
	// Fail the mount, not the first ls, on a wrong token or CA.
	if _, err := s.VMs(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}
