package main

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/vmexportfs/vmexportfs/backend/redact"
)

func runVersion(_ context.Context, args []string, stdout, _ io.Writer, _ *redact.Secrets) error {
	operands, done, err := parseOperands("version", args, stdout)
	switch {
	case err != nil || done:
		return err
	case len(operands) > 0:
		return fmt.Errorf("%w: version takes no arguments", errUsage)
	}
	info, ok := debug.ReadBuildInfo()
	_, err = fmt.Fprintln(stdout, versionLine(info, ok))
	return err
}

// versionLine is what the binary knows of its build: the module's version
// (a tag, or a pseudo-version from the commit, as the go command stamps
// it), the commit, its time and whether the tree had changes, and the
// toolchain and platform.
func versionLine(info *debug.BuildInfo, ok bool) string {
	if !ok || info == nil {
		return fmt.Sprintf("vmexportfs (no build information) %s %s/%s", runtime.Version(), runtime.GOOS, runtime.GOARCH)
	}
	version := info.Main.Version
	if version == "" || version == "(devel)" {
		version = "devel"
	}
	settings := map[string]string{}
	for _, s := range info.Settings {
		settings[s.Key] = s.Value
	}
	var vcs []string
	if rev := settings["vcs.revision"]; rev != "" {
		vcs = append(vcs, "commit "+rev)
	}
	if t := settings["vcs.time"]; t != "" {
		vcs = append(vcs, t)
	}
	if settings["vcs.modified"] == "true" {
		vcs = append(vcs, "modified")
	}
	line := "vmexportfs " + version
	if len(vcs) > 0 {
		line += " (" + strings.Join(vcs, ", ") + ")"
	}
	goVersion := info.GoVersion
	if goVersion == "" {
		goVersion = runtime.Version()
	}
	return line + " " + goVersion + " " + runtime.GOOS + "/" + runtime.GOARCH
}
