package main

import (
	"bufio"
	"fmt"
	"io"

	"github.com/spf13/pflag"

	"github.com/vmexportfs/vmexportfs/fs"
)

// runExtents prints a mounted file's extent map in full, however large: the
// xattr value is limited to 64 KiB, so it pages through the @<from> variants.
func runExtents(args []string, stdout io.Writer) error {
	f := pflag.NewFlagSet("vmexportfs extents", pflag.ContinueOnError)
	f.SetOutput(io.Discard)
	since := f.String("since", "", "print the extents changed since this older snapshot (name or id) instead of the allocated ones")
	if err := f.Parse(args); err != nil {
		return fmt.Errorf("%w: extents: %v", errUsage, err)
	}
	if f.NArg() != 1 {
		return fmt.Errorf("%w: usage: vmexportfs extents [--since BASE] PATH", errUsage)
	}
	extents, err := fs.ReadMap(f.Arg(0), *since)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(stdout)
	for _, e := range extents {
		fmt.Fprintf(w, "%d %d\n", e.Off, e.Len)
	}
	return w.Flush()
}
