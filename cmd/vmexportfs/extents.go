package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/pflag"

	"github.com/vmexportfs/vmexportfs/fs"
)

const extentsSynopsis = "vmexportfs extents [--since BASE] PATH"

// extentsFlags are the flags of the extents command.
func extentsFlags(since *string) *pflag.FlagSet {
	f := pflag.NewFlagSet("vmexportfs extents", pflag.ContinueOnError)
	f.SetOutput(io.Discard)
	f.StringVar(since, "since", "", "print the extents changed since this older snapshot (name or id) instead of the allocated ones")
	return f
}

// runExtents prints a mounted file's extent map in full, however large: the
// xattr value is limited to 64 KiB, so it pages through the @<from> variants.
func runExtents(args []string, stdout io.Writer) error {
	var since string
	f := extentsFlags(&since)
	if err := f.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return writeUsage(stdout, extentsSynopsis, "Print a mounted disk file's extent map in full, one \"OFFSET LENGTH\" line an extent, however\nlarge (one extended attribute holds at most 64 KiB of it).", f)
		}
		return fmt.Errorf("%w: extents: %v", errUsage, err)
	}
	if f.NArg() != 1 {
		return fmt.Errorf("%w: extents: want one PATH: %s", errUsage, extentsSynopsis)
	}
	path := f.Arg(0)
	extents, err := fs.ReadMap(path, since)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(stdout)
	for _, e := range extents {
		fmt.Fprintf(w, "%d %d\n", e.Off, e.Len)
	}
	return w.Flush()
}
