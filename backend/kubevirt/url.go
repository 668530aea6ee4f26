package kubevirt

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// SourceURL is a parsed source address. Exactly one form is set: the API
// form (APIServer, Namespace) or the standalone form (ExportURL, Export).
type SourceURL struct {
	APIServer string // https://host[:port][/prefix]
	Namespace string
	ExportURL string // https://…/virtualmachineexports/<export>
	Export    string
}

// Standalone reports whether the URL names one export rather than a namespace.
func (u SourceURL) Standalone() bool { return u.ExportURL != "" }

// ParseSourceURL accepts kubevirt+https://API/namespaces/NS and
// kubevirt+https://…/virtualmachineexports/EXPORT, with or without the
// "kubevirt+" prefix.
func ParseSourceURL(raw string) (SourceURL, error) {
	s := strings.TrimPrefix(raw, "kubevirt+")
	u, err := url.Parse(s)
	if err != nil {
		// A url.Error quotes the whole address, a password in it included.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return SourceURL{}, fmt.Errorf("parse source url: %w", err)
	}
	if u.Scheme != "https" || u.Host == "" {
		return SourceURL{}, fmt.Errorf("parse source url: want kubevirt+https://HOST/…, got scheme %q", u.Scheme)
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return SourceURL{}, fmt.Errorf("parse source url: credentials, query and fragment are not allowed")
	}
	parts := strings.Split(strings.Trim(u.Path, "/"), "/")
	n := len(parts)
	valid := func(name string) bool {
		return name != "" && name != "." && name != ".." && !strings.ContainsAny(name, "/?#%")
	}
	switch {
	case n >= 2 && parts[n-2] == "virtualmachineexports":
		if !valid(parts[n-1]) {
			return SourceURL{}, fmt.Errorf("parse source url: bad export name %q", parts[n-1])
		}
		u.Path = "/" + strings.Join(parts, "/")
		return SourceURL{ExportURL: u.String(), Export: parts[n-1]}, nil
	case n >= 2 && parts[n-2] == "namespaces":
		if !valid(parts[n-1]) {
			return SourceURL{}, fmt.Errorf("parse source url: bad namespace %q", parts[n-1])
		}
		u.Path = strings.Join(parts[:n-2], "/")
		if u.Path != "" {
			u.Path = "/" + u.Path
		}
		return SourceURL{APIServer: u.String(), Namespace: parts[n-1]}, nil
	}
	return SourceURL{}, fmt.Errorf("parse source url: path must end in /namespaces/NS or /virtualmachineexports/EXPORT")
}

// rootURL is https://host/volumes/<vol>/disk.img for a raw URL built under an
// export URL's path: the path the export pod serves.
func rootURL(raw, vol string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return ""
	}
	u.Path, u.RawPath = "/volumes/"+url.PathEscape(vol)+"/disk.img", ""
	return u.String()
}
