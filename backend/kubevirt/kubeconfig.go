package kubevirt

import (
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Credentials are what the backend needs from a kubeconfig to reach the API server.
type Credentials struct {
	Server    string
	Namespace string // the current context's namespace, "" if unset
	CAPEM     []byte // nil: system roots
	Insecure  bool   // insecure-skip-tls-verify
	Token     string // bearer token; never logged
	CertPEM   []byte // client certificate, optional
	KeyPEM    []byte
}

// String hides the token so Credentials can never leak it through %v.
func (c Credentials) String() string {
	return fmt.Sprintf("Credentials{Server:%s Namespace:%s token:%t}", c.Server, c.Namespace, c.Token != "")
}

type kubeconfigFile struct {
	CurrentContext string `yaml:"current-context"`
	Clusters       []struct {
		Name    string `yaml:"name"`
		Cluster struct {
			Server     string `yaml:"server"`
			CA         string `yaml:"certificate-authority"`
			CAData     string `yaml:"certificate-authority-data"`
			InsecureOK bool   `yaml:"insecure-skip-tls-verify"`
		} `yaml:"cluster"`
	} `yaml:"clusters"`
	Contexts []struct {
		Name    string `yaml:"name"`
		Context struct {
			Cluster   string `yaml:"cluster"`
			User      string `yaml:"user"`
			Namespace string `yaml:"namespace"`
		} `yaml:"context"`
	} `yaml:"contexts"`
	Users []struct {
		Name string `yaml:"name"`
		User struct {
			Token       string `yaml:"token"`
			TokenFile   string `yaml:"tokenFile"`
			ClientCert  string `yaml:"client-certificate"`
			ClientCertD string `yaml:"client-certificate-data"`
			ClientKey   string `yaml:"client-key"`
			ClientKeyD  string `yaml:"client-key-data"`
		} `yaml:"user"`
	} `yaml:"users"`
}

// DefaultKubeconfigPath is $KUBECONFIG (its first entry), else ~/.kube/config.
func DefaultKubeconfigPath() string {
	if env := os.Getenv("KUBECONFIG"); env != "" {
		return filepath.SplitList(env)[0]
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return ""
	}
	return filepath.Join(home, ".kube", "config")
}

// LoadKubeconfig reads and parses a kubeconfig; path "" means DefaultKubeconfigPath.
func LoadKubeconfig(path string) (Credentials, error) {
	if path == "" {
		path = DefaultKubeconfigPath()
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return Credentials{}, fmt.Errorf("read kubeconfig: %w", err)
	}
	return ParseKubeconfig(data, filepath.Dir(path))
}

// ParseKubeconfig resolves the current context. Relative file references are
// resolved against baseDir, as kubectl does.
func ParseKubeconfig(data []byte, baseDir string) (Credentials, error) {
	var kc kubeconfigFile
	if err := yaml.Unmarshal(data, &kc); err != nil {
		return Credentials{}, fmt.Errorf("parse kubeconfig: %w", err)
	}
	if kc.CurrentContext == "" {
		return Credentials{}, errors.New("parse kubeconfig: no current-context")
	}
	var cred Credentials
	var clusterName, userName string
	found := false
	for _, c := range kc.Contexts {
		if c.Name == kc.CurrentContext {
			clusterName, userName, cred.Namespace, found = c.Context.Cluster, c.Context.User, c.Context.Namespace, true
			break
		}
	}
	if !found {
		return Credentials{}, fmt.Errorf("parse kubeconfig: context %q not found", kc.CurrentContext)
	}
	read := func(what, data, file string) ([]byte, error) {
		if data != "" {
			b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(data))
			if err != nil {
				return nil, fmt.Errorf("parse kubeconfig: %s: %w", what, err)
			}
			return b, nil
		}
		if file == "" {
			return nil, nil
		}
		if !filepath.IsAbs(file) {
			file = filepath.Join(baseDir, file)
		}
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("parse kubeconfig: %s: %w", what, err)
		}
		return b, nil
	}
	found = false
	for _, c := range kc.Clusters {
		if c.Name != clusterName {
			continue
		}
		found = true
		cred.Server = c.Cluster.Server
		cred.Insecure = c.Cluster.InsecureOK
		ca, err := read("certificate-authority", c.Cluster.CAData, c.Cluster.CA)
		if err != nil {
			return Credentials{}, err
		}
		cred.CAPEM = ca
		break
	}
	if !found || cred.Server == "" {
		return Credentials{}, fmt.Errorf("parse kubeconfig: cluster %q not found or has no server", clusterName)
	}
	for _, u := range kc.Users {
		if u.Name != userName {
			continue
		}
		cred.Token = u.User.Token
		if cred.Token == "" && u.User.TokenFile != "" {
			tok, err := read("tokenFile", "", u.User.TokenFile)
			if err != nil {
				return Credentials{}, err
			}
			cred.Token = strings.TrimSpace(string(tok))
		}
		var err error
		if cred.CertPEM, err = read("client-certificate", u.User.ClientCertD, u.User.ClientCert); err != nil {
			return Credentials{}, err
		}
		if cred.KeyPEM, err = read("client-key", u.User.ClientKeyD, u.User.ClientKey); err != nil {
			return Credentials{}, err
		}
		break
	}
	return cred, nil
}
