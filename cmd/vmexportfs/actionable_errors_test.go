package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/coriolis/coriolistest"
	"github.com/vmexportfs/vmexportfs/backend/ovirt/ovirttest"
	"github.com/vmexportfs/vmexportfs/backend/xapi/xapitest"
)

// TestLoginRefusedSaysWhy: wrong credentials fail the mount with the
// platform's own words, as words (not a JSON body quoted again), one line
// of sane length, and without the credentials given or the right ones.
func TestLoginRefusedSaysWhy(t *testing.T) {
	requireRoot(t)
	const wrong = "wrong-credential-5eb1"
	wrongFile := filepath.Join(t.TempDir(), "wrong")
	require.NoError(t, os.WriteFile(wrongFile, []byte(wrong+"\n"), 0o600))
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T) (args, secrets []string)
		want  string // the server's words
	}{
		{"coriolis", func(t *testing.T) ([]string, []string) {
			f := newFixture(t, coriolistest.Options{})
			return withFlag(t, append(f.mountArgs(), "coriolis+"+f.sim.URL()), "--password-file", wrongFile), []string{simPassword}
		}, "permission denied: status 401: Not Authorized: failed to login: Response code: 401"},
		{"ovirt SSO", func(t *testing.T) ([]string, []string) {
			return withFlag(t, newOVirt(t, ovirttest.Options{}).MountArgs(), "--password-file", wrongFile), []string{ovirttest.DefaultPassword}
		}, "permission denied: Cannot authenticate user 'admin@internal': The username or password is incorrect"},
		{"xapi session", func(t *testing.T) ([]string, []string) {
			return withFlag(t, newXapi(t, xapitest.Options{}).MountArgs(), "--password-file", wrongFile), []string{xapitest.DefaultPassword}
		}, "permission denied: Authentication failure (SESSION_AUTHENTICATION_FAILED)"},
		{"kubevirt token", func(t *testing.T) ([]string, []string) {
			f := newKVFixture(t)
			kc := strings.ReplaceAll(string(f.sim.Kubeconfig()), f.sim.Token(), wrong)
			require.NoError(t, os.WriteFile(f.kubeconfig, []byte(kc), 0o600))
			return f.mountArgs(), []string{f.sim.Token()}
		}, "credentials refused (5 attempts): permission denied: status 401: Unauthorized"},
		{"s3 access denied", func(t *testing.T) ([]string, []string) {
			s := newS3Platform(t)
			return withFlag(t, s.MountArgs(), "--s3-secret-key-file", wrongFile), []string{s.srv.SecretKey()}
		}, "permission denied: status 403 SignatureDoesNotMatch: The request signature we calculated does not match"},
		{"jdcloud signature", func(t *testing.T) ([]string, []string) {
			p := newJDCloud(t)
			return withFlag(t, p.MountArgs(), "--jdcloud-secret-key-file", wrongFile), []string{p.creds.SecretKey}
		}, "permission denied: status 401: jdcloud verify: access key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args, secrets := tc.setup(t)
			code, out := runVmexportfs(t, append(append([]string{"-f"}, args...), t.TempDir())...)
			assert.Equal(t, 1, code, out)
			msg := lastLine(out)
			t.Logf("the user reads: %s", msg)
			assert.Contains(t, msg, "vmexportfs: connect to ")
			assert.Contains(t, msg, tc.want)
			assert.NotContains(t, msg, `\"`, "a quoted JSON body")
			assert.NotContains(t, msg, `{"`, "a JSON body")
			assert.NotContains(t, msg, "backend unavailable", "a refusal is not an outage")
			assert.Less(t, len(msg), 600)
			for _, secret := range append(secrets, wrong) {
				assert.NotContains(t, out, secret)
			}
		})
	}
}

// TestMissingUsername: a platform that logs in with a user refuses a mount
// without one as a bad invocation (exit 2) naming the flag, before it
// daemonizes.
func TestMissingUsername(t *testing.T) {
	pw := filepath.Join(t.TempDir(), "password")
	require.NoError(t, os.WriteFile(pw, []byte("pw\n"), 0o600))
	// Were the invocation taken, the mount would fail later (exit 1):
	// nothing listens at port 1.
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"coriolis", []string{"coriolis+https://127.0.0.1:1"}, "coriolis needs --username"},
		{"xapi", []string{"xapi+https://127.0.0.1:1"}, "xapi needs --username"},
		{"ovirt", []string{"ovirt+https://127.0.0.1:1"}, "ovirt needs --username (such as admin@internal)"},
		{"foreground", []string{"-f", "coriolis+https://127.0.0.1:1"}, "coriolis needs --username"},
		{"empty --username", []string{"--username", "", "coriolis+https://127.0.0.1:1"}, "coriolis needs --username"},
		{"empty -o username=", []string{"-o", "username=", "coriolis+https://127.0.0.1:1"}, "-o username: needs a value (username=...)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"--password-file", pw, "--retries", "1", "--state-dir", t.TempDir(), "--cache-dir", t.TempDir()}, tc.args...)
			args = append(args, t.TempDir())
			code, out := runVmexportfs(t, args...)
			assert.Equal(t, 2, code, out)
			assert.Equal(t, "vmexportfs: usage: "+tc.want, lastLine(out))
		})
	}
}
