package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/pflag"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/platform"
)

// fakePlatform is a third platform that no common code knows of: one flag,
// one refused secret option, and an Open that reports what it was given.
func fakePlatform() platform.Platform {
	return platform.Platform{
		Scheme: "fake",
		Usage:  []platform.Usage{{Source: "fake+https://HOST/POOL", Text: "a platform of the test only (--fake-pool)"}},
		Flags: func(f *pflag.FlagSet) platform.Opener {
			pool := f.String("fake-pool", "", "the pool to mount")
			return platform.Opener{
				Check: func(u *url.URL, c platform.Common) error {
					if *pool == "" {
						return errors.Join(platform.ErrUsage, errors.New("fake needs --fake-pool"))
					}
					return nil
				},
				Open: func(_ context.Context, u *url.URL, c platform.Common) (backend.Source, error) {
					return nil, errors.New("opened " + u.String() + " pool " + *pool + " user " + c.Username)
				},
			}
		},
		RefusedOptions: map[string]string{"fake_secret": "use fake_secret_file=FILE"},
	}
}

// flagValue is a valid value for a flag of this type, to set it through -o.
func flagValue(t *testing.T, fl *pflag.Flag) string {
	switch fl.Value.Type() {
	case "bool":
		return "true"
	case "duration":
		return "90s"
	case "int":
		return "3"
	case "string", "stringArray":
		return "some-value"
	}
	t.Fatalf("--%s: no test value for type %s", fl.Name, fl.Value.Type())
	return ""
}

// TestHelpDerivedFromRegistry: every platform's source forms and flags are in
// --help, and every platform flag has its -o spelling, which sets it.
func TestHelpDerivedFromRegistry(t *testing.T) {
	var help bytes.Buffer
	require.Equal(t, 0, run(context.Background(), []string{"--help"}, &help, &help))
	var cfg mountConfig
	newMountFlags(&cfg, new(string), new([]string), platforms())
	require.Len(t, cfg.platforms, len(platforms()))
	for _, p := range cfg.platforms {
		require.NotEmpty(t, p.Usage, p.Scheme)
		for _, u := range p.Usage {
			assert.True(t, strings.HasPrefix(u.Source, p.Scheme+"+https://"), u.Source)
			assert.Regexp(t, `(?m)^  `+regexp.QuoteMeta(u.Source)+` +`+regexp.QuoteMeta(u.Text)+`$`, help.String())
		}
		p.flags.VisitAll(func(fl *pflag.Flag) {
			assert.Regexp(t, `(?m)^      --`+fl.Name+`[ \[]`, help.String(), p.Scheme)
			assert.Contains(t, help.String(), fl.Usage, p.Scheme)
			key := strings.ReplaceAll(fl.Name, "-", "_")
			assert.True(t, flagOptions[fl.Name], "-o %s", key)
			assert.Regexp(t, `\s`+key+`=\s`, help.String())
			source := p.Scheme + "+https://h/namespaces/n"
			got, err := parseMountArgs([]string{"-o", key + "=" + flagValue(t, fl), source, "/mnt"}, platforms())
			require.NoError(t, err, "-o %s", key)
			var set *pflag.Flag
			for _, q := range got.platforms {
				if q.Scheme == p.Scheme {
					set = q.flags.Lookup(fl.Name)
				}
			}
			require.NotNil(t, set)
			assert.True(t, set.Changed, "-o %s sets --%s", key, fl.Name)
		})
	}
	for key := range defaultOptions.refused {
		_, err := parseMountOptions([]string{key + "=hunter2"})
		assert.ErrorContains(t, err, "secrets are not accepted", key)
	}
}

// TestRegistryInjectable: a platform added to a registry gets its flag, its
// -o spelling, its refused secret, its --help lines and its source scheme,
// without any change to the command's common code.
func TestRegistryInjectable(t *testing.T) {
	registry := append(platforms(), fakePlatform())

	var help bytes.Buffer
	require.NoError(t, printMountHelp(&help, registry))
	assert.Regexp(t, `(?m)^  fake\+https://HOST/POOL +a platform of the test only \(--fake-pool\)$`, help.String())
	assert.Contains(t, help.String(), "Flags of fake+ sources:\n      --fake-pool string   the pool to mount")
	assert.Contains(t, help.String(), " fake_pool= ")

	cfg, err := parseMountArgs([]string{"--username", "u", "-o", "fake_pool=p1,rw", "fake+https://h:8443/x", "/mnt"}, registry)
	require.NoError(t, err)
	_, err = openSource(context.Background(), cfg, slog.New(slog.DiscardHandler))
	assert.EqualError(t, err, "connect to fake source https://h:8443/x: opened https://h:8443/x pool p1 user u")

	cfg, err = parseMountArgs([]string{"fake+https://h", "/mnt"}, registry)
	require.NoError(t, err)
	_, _, err = checkSource(cfg, slog.New(slog.DiscardHandler))
	assert.ErrorIs(t, err, errUsage)
	assert.ErrorContains(t, err, "--fake-pool")

	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"-o", "fake_secret=hunter2", "fake+https://h", "/mnt"}, "secrets are not accepted as options; use fake_secret_file=FILE"},
		{[]string{"--fake-pool", "p", "coriolis+https://h", "/mnt"}, "--fake-pool (-o fake_pool=) is for fake+ sources, not coriolis+"},
		{[]string{"-o", "fake_pool=p", "kubevirt+https://h/namespaces/n", "/mnt"}, "is for fake+ sources, not kubevirt+"},
		{[]string{"--kubeconfig", "kc", "fake+https://h", "/mnt"}, "--kubeconfig (-o kubeconfig=) is for kubevirt+ sources, not fake+"},
	} {
		_, err := parseMountArgs(tc.args, registry)
		assert.ErrorIs(t, err, errUsage, tc.args)
		assert.ErrorContains(t, err, tc.msg, tc.args)
		assert.NotContains(t, err.Error(), "hunter2")
	}

	// Without its registry line, the platform does not exist.
	_, err = parseMountArgs([]string{"fake+https://h", "/mnt"}, platforms())
	assert.ErrorContains(t, err, "unknown platform \"fake\" (known: coriolis, jdcloud, kubevirt, ovirt, s3, xapi)")
	_, err = parseMountArgs([]string{"--fake-pool", "p", "coriolis+https://h", "/mnt"}, platforms())
	assert.ErrorContains(t, err, "unknown flag: --fake-pool")
	_, err = parseMountOptions([]string{"fake_pool=p"})
	assert.ErrorContains(t, err, "unknown mount option")
}

// TestRegistryContradictions: a registry that contradicts itself or the
// common flags fails at start, not on some invocation.
func TestRegistryContradictions(t *testing.T) {
	open := func(context.Context, *url.URL, platform.Common) (backend.Source, error) { return nil, nil }
	clash := func(name string) platform.Platform {
		return platform.Platform{Scheme: "clash", Flags: func(f *pflag.FlagSet) platform.Opener {
			f.String(name, "", "clashes")
			return platform.Opener{Open: open}
		}}
	}
	for _, tc := range []struct {
		name     string
		registry []platform.Platform
		panic    string
	}{
		{"scheme twice", []platform.Platform{fakePlatform(), fakePlatform()}, `platform "fake" registered twice`},
		{"common flag", []platform.Platform{clash("username")}, "flag --username clashes"},
		{"another's flag", []platform.Platform{fakePlatform(), clash("fake-pool")}, "flag --fake-pool clashes"},
		{"generic option", []platform.Platform{clash("nodev")}, "flag --nodev clashes"},
		{"refused common", []platform.Platform{clash("password")}, "flag --password clashes"},
		{"scheme with +", []platform.Platform{{Scheme: "a+b", Flags: fakePlatform().Flags}}, "want a lower-case scheme"},
		{"flag and refused -o", []platform.Platform{fakePlatform(), clash("fake-secret")}, "-o fake-secret is both a flag and refused"},
		{"no Open", []platform.Platform{{Scheme: "noopen", Flags: func(*pflag.FlagSet) platform.Opener { return platform.Opener{} }}}, "no Open"},
	} {
		msg := func() (msg string) {
			defer func() { msg = fmt.Sprint(recover()) }()
			var cfg mountConfig
			newMountFlags(&cfg, new(string), new([]string), tc.registry)
			newOptionTable(cfg.platforms)
			return ""
		}()
		assert.Contains(t, msg, tc.panic, tc.name)
	}
}

// TestForeignFlagIsUsageError: a flag of another platform than the source's
// is a usage error (exit 2), not silently ignored.
func TestForeignFlagIsUsageError(t *testing.T) {
	mnt := t.TempDir()
	for _, args := range [][]string{
		{"--kubeconfig", "kc", "--username", "u", "coriolis+https://h", mnt},
		{"-o", "kubevirt_internal=true", "--username", "u", "coriolis+https://h", mnt},
	} {
		var stdout, stderr bytes.Buffer
		assert.Equal(t, 2, run(context.Background(), args, &stdout, &stderr), stderr.String())
		assert.Contains(t, stderr.String(), "is for kubevirt+ sources, not coriolis+")
	}
}

// TestREADMEFlagTables: each row of README's flag tables names flags that
// exist and -o spellings that are accepted, and a flag with an -o spelling
// lists it.
func TestREADMEFlagTables(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	require.NoError(t, err)
	var cfg mountConfig
	f := newMountFlags(&cfg, new(string), new([]string), platforms())
	table := newOptionTable(cfg.platforms)
	documented := map[string]bool{}
	flagRe := regexp.MustCompile("--([a-z0-9-]+)")
	spellingRe := regexp.MustCompile("`([a-z0-9_]+)=?")
	rows := 0
	for _, line := range strings.Split(string(readme), "\n") {
		if !strings.HasPrefix(line, "| `-") {
			continue
		}
		rows++
		cells := strings.Split(line, "|")
		require.GreaterOrEqual(t, len(cells), 4, line)
		spellings := map[string]bool{}
		for _, m := range spellingRe.FindAllStringSubmatch(cells[2], -1) {
			spellings[m[1]] = true
			name := strings.ReplaceAll(m[1], "_", "-")
			assert.True(t, table.flags[name] || name == "allow-other" || name == "debug" || name == "ro", "README: -o %s", m[1])
		}
		names := flagRe.FindAllStringSubmatch(cells[1], -1)
		require.NotEmpty(t, names, line)
		for _, m := range names {
			name := m[1]
			documented[name] = true
			assert.NotNil(t, f.Lookup(name), "README: --%s", name)
			if table.flags[name] {
				assert.True(t, spellings[strings.ReplaceAll(name, "-", "_")], "README: --%s lists its -o spelling", name)
			}
		}
	}
	require.GreaterOrEqual(t, rows, 20)
	f.VisitAll(func(fl *pflag.Flag) {
		if fl.Name != "options" {
			assert.True(t, documented[fl.Name], "--%s is in a README flag table", fl.Name)
		}
	})
}
