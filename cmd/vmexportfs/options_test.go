package main

import (
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

func FuzzParseMountOptions(f *testing.F) {
	f.Add("rw,username=a,password_file=/x,allow_other")
	f.Add("password=secret")
	f.Add(",,=,_=")
	f.Fuzz(func(t *testing.T, list string) {
		mo, err := parseMountOptions([]string{list})
		if err != nil {
			return
		}
		for k, v := range mo.set {
			if !flagOptions[k] || v == "" {
				t.Fatalf("accepted %q=%q", k, v)
			}
		}
	})
}

func FuzzParseSize(f *testing.F) {
	f.Add("256M")
	f.Add("1e300G")
	f.Fuzz(func(t *testing.T, s string) {
		if v, err := parseSize(s); err == nil && v < 0 {
			t.Fatalf("negative size %d from %q", v, s)
		}
	})
}
