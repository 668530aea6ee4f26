package kubevirt

import (
	"encoding/json"
	"errors"
	"fmt"

	"go.yaml.in/yaml/v3"
)

// ExportStatus is the part of a VirtualMachineExport status the backend uses.
type ExportStatus struct {
	Phase          string       `json:"phase" yaml:"phase"`
	TokenSecretRef string       `json:"tokenSecretRef" yaml:"tokenSecretRef"`
	ServiceName    string       `json:"serviceName" yaml:"serviceName"`
	VMName         string       `json:"virtualMachineName" yaml:"virtualMachineName"`
	Links          *exportLinks `json:"links" yaml:"links"`
}

type exportLinks struct {
	Internal *exportLink `json:"internal" yaml:"internal"`
	External *exportLink `json:"external" yaml:"external"`
}

type exportLink struct {
	Cert    string         `json:"cert" yaml:"cert"`
	Volumes []exportVolume `json:"volumes" yaml:"volumes"`
	Backups []exportBackup `json:"backups" yaml:"backups"`
}

type exportVolume struct {
	Name    string `json:"name" yaml:"name"`
	Formats []struct {
		Format string `json:"format" yaml:"format"`
		URL    string `json:"url" yaml:"url"`
	} `json:"formats" yaml:"formats"`
}

type exportBackup struct {
	Name      string `json:"name" yaml:"name"`
	Endpoints []struct {
		Endpoint string `json:"endpoint" yaml:"endpoint"`
		URL      string `json:"url" yaml:"url"`
	} `json:"endpoints" yaml:"endpoints"`
}

// link picks the external link unless internal is asked for or there is no
// external one (no Ingress/Route for the proxy).
func (s ExportStatus) link(internal bool) (*exportLink, error) {
	if s.Phase != "Ready" || s.Links == nil {
		return nil, fmt.Errorf("export not ready (phase %q): %w", s.Phase, errNotReady)
	}
	if !internal && s.Links.External != nil {
		return s.Links.External, nil
	}
	if s.Links.Internal != nil {
		return s.Links.Internal, nil
	}
	return nil, fmt.Errorf("export has no links: %w", errNotReady)
}

var errNotReady = errors.New("export not ready")

// volumeNames are the export's disks: its volumes, then the backups of a
// VirtualMachineBackup export (named after the VM's volumes).
func (l *exportLink) volumeNames() []string {
	var names []string
	seen := map[string]bool{}
	for _, v := range l.Volumes {
		if v.Name != "" && !seen[v.Name] {
			seen[v.Name] = true
			names = append(names, v.Name)
		}
	}
	for _, b := range l.Backups {
		if b.Name != "" && !seen[b.Name] && l.backupURL(b.Name, "map") != "" && l.backupURL(b.Name, "data") != "" {
			seen[b.Name] = true
			names = append(names, b.Name)
		}
	}
	return names
}

func (l *exportLink) rawURL(vol string) string {
	for _, v := range l.Volumes {
		if v.Name != vol {
			continue
		}
		for _, f := range v.Formats {
			if f.Format == "raw" {
				return f.URL
			}
		}
	}
	return ""
}

func (l *exportLink) mapURL(vol string) string { return l.backupURL(vol, "map") }

// backupURL is a backup's map or data endpoint.
func (l *exportLink) backupURL(vol, endpoint string) string {
	for _, b := range l.Backups {
		if b.Name != vol {
			continue
		}
		for _, e := range b.Endpoints {
			if e.Endpoint == endpoint {
				return e.URL
			}
		}
	}
	return ""
}

// ParseExportStatus decodes an export's status from YAML or JSON, either the
// whole object (kubectl get vmexport -o yaml) or just its status.
func ParseExportStatus(data []byte) (ExportStatus, error) {
	var whole struct {
		Status *ExportStatus `yaml:"status"`
	}
	if err := yaml.Unmarshal(data, &whole); err != nil {
		return ExportStatus{}, fmt.Errorf("parse export status: %w", err)
	}
	if whole.Status != nil {
		return *whole.Status, nil
	}
	var st ExportStatus
	if err := yaml.Unmarshal(data, &st); err != nil {
		return ExportStatus{}, fmt.Errorf("parse export status: %w", err)
	}
	if st.Phase == "" && st.Links == nil {
		return ExportStatus{}, errors.New("parse export status: neither status nor phase/links found")
	}
	return st, nil
}

// mapPage is one page of the backup map route.
type mapPage struct {
	Extents []struct {
		Offset      uint64 `json:"offset"`
		Length      uint64 `json:"length"`
		Type        uint64 `json:"type"`
		Description string `json:"description"`
	} `json:"extents"`
	NextOffset *uint64 `json:"next_offset"`
}

// decodeMapPage decodes one map page and refuses one that cannot be paged
// through safely: an extent past maxBackupSize (its offset plus length
// would not fit the int64 offsets a map holds, or would overflow), or a
// next_offset before the end of an extent the page holds, or on a page
// without extents, from which the next page would start over what was
// read, so that paging repeats itself.
func decodeMapPage(data []byte) (mapPage, error) {
	var p mapPage
	if err := json.Unmarshal(data, &p); err != nil {
		return mapPage{}, fmt.Errorf("decode map page: %w", err)
	}
	var end uint64
	for i, e := range p.Extents {
		if e.Offset > maxBackupSize || e.Length > maxBackupSize-e.Offset {
			return mapPage{}, fmt.Errorf("decode map page: extent %d (%d+%d) ends past %d bytes", i, e.Offset, e.Length, uint64(maxBackupSize))
		}
		end = max(end, e.Offset+e.Length)
	}
	switch {
	case p.NextOffset == nil:
	case len(p.Extents) == 0:
		return mapPage{}, fmt.Errorf("decode map page: next_offset %d on a page without extents", *p.NextOffset)
	case *p.NextOffset < end || *p.NextOffset > maxBackupSize:
		return mapPage{}, fmt.Errorf("decode map page: next_offset %d before the end %d of the page's extents", *p.NextOffset, end)
	}
	return p, nil
}
