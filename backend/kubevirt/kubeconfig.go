package kubevirt

import (
	"context"
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

	exec        *execConfig // the user's exec credential plugin, if any
	execCluster execCluster
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
			Token       string      `yaml:"token"`
			TokenFile   string      `yaml:"tokenFile"`
			ClientCert  string      `yaml:"client-certificate"`
			ClientCertD string      `yaml:"client-certificate-data"`
			ClientKey   string      `yaml:"client-key"`
			ClientKeyD  string      `yaml:"client-key-data"`
			Exec        *execConfig `yaml:"exec"`
		} `yaml:"user"`
	} `yaml:"users"`
}

// DefaultKubeconfigPath is $KUBECONFIG's first entry, else ~/.kube/config
// (LoadKubeconfig("") merges every $KUBECONFIG entry).
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

// LoadKubeconfig reads and parses a kubeconfig. path "" means $KUBECONFIG,
// a list of files merged as kubectl merges them (missing files skipped; the
// first file to set current-context, and the first entry of each name,
// wins), else ~/.kube/config.
func LoadKubeconfig(path string) (Credentials, error) {
	if path == "" {
		if env := os.Getenv("KUBECONFIG"); env != "" {
			return loadMerged(filepath.SplitList(env))
		}
		path = DefaultKubeconfigPath()
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return Credentials{}, fmt.Errorf("read kubeconfig: %w", err)
	}
	return ParseKubeconfig(data, filepath.Dir(path))
}

func loadMerged(paths []string) (Credentials, error) {
	var merged kubeconfigFile
	seen := map[string]bool{}
	read := 0
	for _, p := range paths {
		if p == "" {
			continue
		}
		data, err := os.ReadFile(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return Credentials{}, fmt.Errorf("read kubeconfig: %w", err)
		}
		read++
		var kc kubeconfigFile
		if err := yaml.Unmarshal(data, &kc); err != nil {
			return Credentials{}, fmt.Errorf("parse kubeconfig %s: %w", p, err)
		}
		absolutize(&kc, filepath.Dir(p))
		if merged.CurrentContext == "" {
			merged.CurrentContext = kc.CurrentContext
		}
		for _, c := range kc.Clusters {
			if !seen["cluster/"+c.Name] {
				seen["cluster/"+c.Name] = true
				merged.Clusters = append(merged.Clusters, c)
			}
		}
		for _, c := range kc.Contexts {
			if !seen["context/"+c.Name] {
				seen["context/"+c.Name] = true
				merged.Contexts = append(merged.Contexts, c)
			}
		}
		for _, u := range kc.Users {
			if !seen["user/"+u.Name] {
				seen["user/"+u.Name] = true
				merged.Users = append(merged.Users, u)
			}
		}
	}
	if read == 0 {
		return Credentials{}, fmt.Errorf("read kubeconfig: none of $KUBECONFIG's files exists: %w", os.ErrNotExist)
	}
	return resolveKubeconfig(merged, "")
}

// absolutize makes a file's relative references absolute against its own
// directory, before it is merged with others.
func absolutize(kc *kubeconfigFile, baseDir string) {
	abs := func(p *string) {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(baseDir, *p)
		}
	}
	for i := range kc.Clusters {
		abs(&kc.Clusters[i].Cluster.CA)
	}
	for i := range kc.Users {
		u := &kc.Users[i].User
		abs(&u.TokenFile)
		abs(&u.ClientCert)
		abs(&u.ClientKey)
		if u.Exec != nil && strings.ContainsRune(u.Exec.Command, filepath.Separator) {
			abs(&u.Exec.Command) // a bare name is looked up in PATH
		}
	}
}

// ParseKubeconfig resolves the current context. Relative file references are
// resolved against baseDir, as kubectl does.
func ParseKubeconfig(data []byte, baseDir string) (Credentials, error) {
	var kc kubeconfigFile
	if err := yaml.Unmarshal(data, &kc); err != nil {
		return Credentials{}, fmt.Errorf("parse kubeconfig: %w", err)
	}
	absolutize(&kc, baseDir)
	return resolveKubeconfig(kc, baseDir)
}

func resolveKubeconfig(kc kubeconfigFile, baseDir string) (Credentials, error) {
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
		if u.User.Exec != nil && cred.Token == "" && len(cred.CertPEM) == 0 {
			cred.exec = u.User.Exec
			cred.execCluster = execCluster{Server: cred.Server, CAData: cred.CAPEM, Insecure: cred.Insecure}
			if err := cred.runExec(context.Background()); err != nil {
				return Credentials{}, err
			}
		}
		break
	}
	return cred, nil
}
