package kubevirt

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
)

// execConfig is a kubeconfig user's exec credential plugin
// (client.authentication.k8s.io), the way EKS, GKE and many OpenShift
// users log in.
type execConfig struct {
	APIVersion string   `yaml:"apiVersion"`
	Command    string   `yaml:"command"`
	Args       []string `yaml:"args"`
	Env        []struct {
		Name  string `yaml:"name"`
		Value string `yaml:"value"`
	} `yaml:"env"`
	InstallHint        string `yaml:"installHint"`
	ProvideClusterInfo bool   `yaml:"provideClusterInfo"`
}

type execCluster struct {
	Server   string
	CAData   []byte
	Insecure bool
}

const execTimeout = 2 * time.Minute

// runExec runs the plugin (non-interactively) and takes its token or client
// certificate.
func (c *Credentials) runExec(ctx context.Context) error {
	e := c.exec
	apiVersion := e.APIVersion
	if apiVersion == "" {
		apiVersion = "client.authentication.k8s.io/v1"
	}
	switch apiVersion {
	case "client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1":
	default:
		return fmt.Errorf("kubeconfig exec plugin %s: %w: apiVersion %q not supported", e.Command, backend.ErrInvalid, apiVersion)
	}
	spec := map[string]any{"interactive": false}
	if e.ProvideClusterInfo {
		spec["cluster"] = map[string]any{"server": c.execCluster.Server, "certificate-authority-data": c.execCluster.CAData,
			"insecure-skip-tls-verify": c.execCluster.Insecure}
	}
	info, _ := json.Marshal(map[string]any{"apiVersion": apiVersion, "kind": "ExecCredential", "spec": spec})
	ctx, cancel := context.WithTimeout(ctx, execTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.Command, e.Args...)
	cmd.Env = append(os.Environ(), "KUBERNETES_EXEC_INFO="+string(info))
	for _, kv := range e.Env {
		cmd.Env = append(cmd.Env, kv.Name+"="+kv.Value)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		hint := ""
		if e.InstallHint != "" {
			hint = " (" + strings.TrimSpace(e.InstallHint) + ")"
		}
		return fmt.Errorf("kubeconfig exec plugin %s: %w: %v%s: %s", e.Command, backend.ErrPermission, err, hint, firstLine(stderr.String()))
	}
	var out struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Status     *struct {
			Token                 string `json:"token"`
			ClientCertificateData string `json:"clientCertificateData"`
			ClientKeyData         string `json:"clientKeyData"`
		} `json:"status"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &out); err != nil {
		return fmt.Errorf("kubeconfig exec plugin %s: %w: output is not an ExecCredential: %v", e.Command, backend.ErrInvalid, err)
	}
	if out.Kind != "ExecCredential" || out.Status == nil || out.Status.Token == "" && out.Status.ClientCertificateData == "" {
		return fmt.Errorf("kubeconfig exec plugin %s: %w: ExecCredential without a token or client certificate", e.Command, backend.ErrInvalid)
	}
	if out.APIVersion != apiVersion {
		return fmt.Errorf("kubeconfig exec plugin %s: %w: answered %q, asked %q", e.Command, backend.ErrInvalid, out.APIVersion, apiVersion)
	}
	c.Token = out.Status.Token
	if out.Status.ClientCertificateData != "" {
		c.CertPEM, c.KeyPEM = []byte(out.Status.ClientCertificateData), []byte(out.Status.ClientKeyData)
	}
	return nil
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	if len(s) > 200 {
		s = s[:200]
	}
	return s
}
