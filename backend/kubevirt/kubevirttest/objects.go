package kubevirttest

// The JSON shapes of the Kubernetes objects the simulator serves: only the
// fields the backend reads, spelled as the real API spells them.

type OwnerReference struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Name       string `json:"name"`
	UID        string `json:"uid"`
}

type ObjectMeta struct {
	Name              string            `json:"name"`
	Namespace         string            `json:"namespace,omitempty"`
	UID               string            `json:"uid,omitempty"`
	CreationTimestamp string            `json:"creationTimestamp,omitempty"`
	Annotations       map[string]string `json:"annotations,omitempty"`
	OwnerReferences   []OwnerReference  `json:"ownerReferences,omitempty"`
}

type TypedRef struct {
	APIGroup string `json:"apiGroup,omitempty"`
	Kind     string `json:"kind"`
	Name     string `json:"name"`
}

type VolumeRef struct {
	Name string `json:"name"`
}

type VirtualMachine struct {
	APIVersion string     `json:"apiVersion"`
	Kind       string     `json:"kind"`
	Metadata   ObjectMeta `json:"metadata"`
	Spec       struct {
		Template struct {
			Spec struct {
				Volumes []VolumeRef `json:"volumes"`
			} `json:"spec"`
		} `json:"template"`
	} `json:"spec"`
}

type VirtualMachineSnapshot struct {
	APIVersion string     `json:"apiVersion"`
	Kind       string     `json:"kind"`
	Metadata   ObjectMeta `json:"metadata"`
	Spec       struct {
		Source TypedRef `json:"source"`
	} `json:"spec"`
	Status *struct {
		ReadyToUse bool   `json:"readyToUse"`
		Phase      string `json:"phase,omitempty"`
	} `json:"status,omitempty"`
}

type Format struct {
	Format string `json:"format"`
	URL    string `json:"url"`
}

type Volume struct {
	Name    string   `json:"name"`
	Formats []Format `json:"formats"`
}

type Endpoint struct {
	Endpoint string `json:"endpoint"`
	URL      string `json:"url"`
}

type Backup struct {
	Name      string     `json:"name"`
	Endpoints []Endpoint `json:"endpoints"`
}

type ExportLink struct {
	Cert    string   `json:"cert"`
	Volumes []Volume `json:"volumes,omitempty"`
	Backups []Backup `json:"backups,omitempty"`
}

type ExportStatus struct {
	Phase          string `json:"phase,omitempty"`
	TokenSecretRef string `json:"tokenSecretRef,omitempty"`
	ServiceName    string `json:"serviceName,omitempty"`
	Links          *struct {
		Internal *ExportLink `json:"internal,omitempty"`
		External *ExportLink `json:"external,omitempty"`
	} `json:"links,omitempty"`
}

type VirtualMachineExport struct {
	APIVersion string     `json:"apiVersion"`
	Kind       string     `json:"kind"`
	Metadata   ObjectMeta `json:"metadata"`
	Spec       struct {
		Source         TypedRef `json:"source"`
		TokenSecretRef string   `json:"tokenSecretRef,omitempty"`
	} `json:"spec"`
	Status *ExportStatus `json:"status,omitempty"`
}

type Secret struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   ObjectMeta        `json:"metadata"`
	Data       map[string][]byte `json:"data,omitempty"`
	StringData map[string]string `json:"stringData,omitempty"`
}

type list[T any] struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Items      []T    `json:"items"`
}
