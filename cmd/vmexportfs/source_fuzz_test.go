package main

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// FuzzSplitSource: an accepted source renders back (PLATFORM+URL) to one
// that splits to the same platform and URL, without credentials, and a
// password put into any source is refused and quoted in no error.
func FuzzSplitSource(f *testing.F) {
	for _, s := range []string{"coriolis+https://ovm:5544", "kubevirt+https://api:6443/namespaces/vms", "xapi+https://pool/",
		"s3+https://s3.example/bucket/prefix", "coriolis+https://h:bad", "vmware+https://h", "coriolis+https://h/%zz", "https://h", ""} {
		f.Add(s)
	}
	var cfg mountConfig
	newMountFlags(&cfg, new(string), new([]string), platforms())
	ps := cfg.platforms
	f.Fuzz(func(t *testing.T, source string) {
		const secret = "Pw0rdFuzzSecret"
		if i := strings.Index(source, "://"); i >= 0 && !strings.ContainsAny(source[:i], "/?#") {
			_, _, err := splitSource(source[:i+3]+"user:"+secret+"@"+source[i+3:], ps)
			require.Error(t, err, "credentials accepted")
			require.NotContains(t, err.Error(), secret)
		}
		p, u, err := splitSource(source, ps)
		if err != nil {
			return
		}
		require.Nil(t, u.User)
		require.Contains(t, []string{"https", "http"}, u.Scheme)
		again := p.Scheme + "+" + u.String()
		p2, u2, err := splitSource(again, ps)
		require.NoError(t, err, "the rendering %q of %q", again, source)
		require.Equal(t, p.Scheme, p2.Scheme)
		require.Equal(t, u.String(), u2.String(), "the rendering %q of %q", again, source)
	})
}
