package main

import (
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/platform"
)

func TestParseMountOptions(t *testing.T) {
	tests := []struct {
		name    string
		lists   []string
		want    map[string]string
		allow   bool
		wantErr string
	}{
		{"empty", nil, map[string]string{}, false, ""},
		{"fstab", []string{"rw,username=admin,password_file=/etc/pw,ca_file=/etc/ca.pem,allow_other,_netdev,nofail"},
			map[string]string{"username": "admin", "password-file": "/etc/pw", "ca-file": "/etc/ca.pem"}, true, ""},
		{"several lists", []string{"cache_size=1G", "state_dir=/var/lib/x"},
			map[string]string{"cache-size": "1G", "state-dir": "/var/lib/x"}, false, ""},
		{"password refused", []string{"password=hunter2"}, nil, false, "secrets are not accepted"},
		{"unknown", []string{"frobnicate"}, nil, false, "unknown mount option"},
		{"unknown key's value not echoed", []string{"passwd=hunter2"}, nil, false, "unknown mount option"},
		{"missing value", []string{"username"}, nil, false, "needs a value"},
		{"empty value", []string{"username="}, nil, false, "needs a value"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mo, err := parseMountOptions(tt.lists)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				assert.NotContains(t, err.Error(), "hunter2")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, mo.set)
			assert.Equal(t, tt.allow, mo.allowOther)
		})
	}
}

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"4096", 4096, true}, {"256M", 256 << 20, true}, {"1G", 1 << 30, true},
		{"1GiB", 1 << 30, true}, {"1.5K", 1536, true}, {"2T", 2 << 40, true},
		{"", 0, false}, {"M", 0, false}, {"-1", 0, false}, {"1X", 0, false},
		{"9999999T", 0, false}, {"NaN", 0, false},
	}
	for _, tt := range tests {
		// The syntax; what the machine's memory allows is TestCacheSizeAboveMemory's.
		got, err := platform.ParseSize(tt.in)
		if !tt.ok {
			assert.Error(t, err, tt.in)
			continue
		}
		require.NoError(t, err, tt.in)
		assert.Equal(t, tt.want, got, tt.in)
	}
}

// FuzzParseMountOptions: accepted options render back (key=value with '_'
// for '-', allow_other, debug) to a list that parses to the same options,
// each value one the list gave its key; a refused option's value (a
// secret) is quoted in no error.
func FuzzParseMountOptions(f *testing.F) {
	f.Add("rw,username=a,password_file=/x,allow_other")
	f.Add("password=secret")
	f.Add("password=hunter22")
	f.Add(",,=,_=")
	f.Add("cache_size=1G,cache-size=2G,debug,log_file=/a=b")
	f.Add("rw,s3_secret_key=hunter22,token=x")
	f.Fuzz(func(t *testing.T, list string) {
		items := strings.Split(list, ",")
		mo, err := parseMountOptions([]string{list})
		if err != nil {
			for i, item := range items {
				key, value, _ := strings.Cut(item, "=")
				advice := defaultOptions.refused[strings.ReplaceAll(key, "_", "-")]
				// A value the refusal's own words hold proves nothing.
				if advice == "" || len(value) < 4 || strings.Contains("-o "+key+": secrets are not accepted as options; "+advice, value) {
					continue
				}
				others := strings.Join(slices.Delete(slices.Clone(items), i, i+1), ",")
				if !strings.Contains(others, value) {
					require.NotContains(t, err.Error(), value, "the value of -o %s", key)
				}
			}
			return
		}
		var again []string
		for k, v := range mo.set {
			require.True(t, flagOptions[k], "accepted %q", k)
			require.NotEmpty(t, v, "accepted %q with no value", k)
			given := slices.ContainsFunc(items, func(item string) bool {
				key, value, _ := strings.Cut(item, "=")
				return strings.ReplaceAll(key, "_", "-") == k && value == v
			})
			require.True(t, given, "%s=%q was not given", k, v)
			again = append(again, strings.ReplaceAll(k, "-", "_")+"="+v)
		}
		if mo.allowOther {
			again = append(again, "allow_other")
		}
		if mo.debug {
			again = append(again, "debug")
		}
		mo2, err := parseMountOptions([]string{strings.Join(again, ",")})
		require.NoError(t, err, "rendered %q of %q", again, list)
		require.Equal(t, mo, mo2, "rendered %q of %q", again, list)
	})
}

// FuzzParseSize: an accepted size is a byte count that reads back the same
// written as a plain number, and as many KiB with a K. The syntax only:
// what the machine's memory allows is TestCacheSizeAboveMemory's.
func FuzzParseSize(f *testing.F) {
	f.Add("256M")
	f.Add("1e300G")
	f.Add("9007199254740993")
	f.Add("1.5KiB")
	f.Fuzz(func(t *testing.T, s string) {
		v, err := platform.ParseSize(s)
		if err != nil {
			return
		}
		require.GreaterOrEqual(t, v, int64(0), "from %q", s)
		plain := strconv.FormatInt(v, 10)
		again, err := platform.ParseSize(plain)
		require.NoError(t, err, "%q, read from %q", plain, s)
		require.Equal(t, v, again, "%q, read from %q", plain, s)
		if v < 1<<40 {
			k, err := platform.ParseSize(plain + "K")
			require.NoError(t, err)
			require.Equal(t, v<<10, k, "%sK", plain)
		}
	})
}
