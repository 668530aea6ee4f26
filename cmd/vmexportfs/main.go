// Command vmexportfs mounts the disk snapshots of a virtualization platform as
// a read-only FUSE filesystem of sparse, extent-aware files.
//
//	vmexportfs [flags] SOURCE MOUNTPOINT     mount a platform
//	vmexportfs demo [flags] MOUNTPOINT       mount a built-in simulator with sample VMs
//	vmexportfs extents [--since BASE] PATH   print a file's extent map in full
//	vmexportfs stats [--watch] MOUNTPOINT    what a mount is doing
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmexportfs/vmexportfs/backend/redact"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run dispatches a subcommand and turns its error into a one-line message and
// an exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	// Every secret the process learns is added here, and every line it
	// prints or logs passes through it.
	secrets := &redact.Secrets{}
	var err error
	switch {
	case len(args) > 0 && args[0] == "demo":
		err = runDemo(ctx, args[1:], stdout, stderr, secrets)
	case len(args) > 0 && args[0] == "extents":
		err = runExtents(args[1:], stdout)
	case len(args) > 0 && args[0] == "stats":
		err = runStats(ctx, args[1:], stdout)
	default:
		err = runMount(ctx, args, stdout, stderr, secrets)
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintln(stderr, "vmexportfs:", secrets.String(err.Error()))
		return 2
	default:
		fmt.Fprintln(stderr, "vmexportfs:", secrets.String(err.Error()))
		return 1
	}
}
