package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/pkg/xattr"
	"github.com/spf13/pflag"

	"github.com/vmexportfs/vmexportfs/fs"
)

const extentsSynopsis = "vmexportfs extents [--since BASE] PATH"

// The attributes of a snapshot directory that tell which snapshots a disk
// file's VM has (README, "Chunk maps as extended attributes").
const (
	snapshotIDXattr    = "user.vmexport.snapshot"
	snapshotStateXattr = "user.vmexport.state"
)

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
		return explainMapError(path, since, err)
	}
	w := bufio.NewWriter(stdout)
	for _, e := range extents {
		fmt.Fprintf(w, "%d %d\n", e.Off, e.Len)
	}
	return w.Flush()
}

// explainMapError says why a map could not be read, in the terms of the
// command line: the attribute names ReadMap pages through (name@offset) mean
// nothing to the user, and "no data available" for --since most often means
// a base that does not exist.
func explainMapError(path, since string, err error) error {
	var xe *xattr.Error
	if !errors.As(err, &xe) {
		return fmt.Errorf("extents: %w", err)
	}
	switch {
	case !isNoXattr(xe.Err):
		return fmt.Errorf("extents %s: %w", path, xe.Err)
	case !isDiskFile(path):
		return fmt.Errorf("extents %s: not a disk file of a vmexportfs mount", path)
	case since == "":
		return fmt.Errorf("extents %s: the mount gives no extent map", path)
	}
	names, ids, ok := vmSnapshots(path)
	if ok && !slices.Contains(names, since) && !slices.Contains(ids, since) {
		return fmt.Errorf("extents --since %s: unknown base snapshot %q: this VM's snapshots are %s", since, since, listNames(names))
	}
	return fmt.Errorf("extents --since %s: the platform does not say what changed between this snapshot and %q", since, since)
}

func isDiskFile(path string) bool {
	_, err := xattr.Get(path, snapshotIDXattr)
	return err == nil
}

// vmSnapshots lists the snapshots of the VM a disk file belongs to, by name
// and id: the file is in its snapshot's directory, or in a directory of one
// of the snapshot's disks, and the directory above that holds them all.
func vmSnapshots(path string) (names, ids []string, ok bool) {
	dir := filepath.Dir(path)
	for range 2 {
		if _, err := xattr.Get(dir, snapshotStateXattr); err != nil {
			dir = filepath.Dir(dir)
			continue
		}
		parent := filepath.Dir(dir)
		entries, err := os.ReadDir(parent)
		if err != nil {
			return nil, nil, false
		}
		for _, e := range entries {
			names = append(names, e.Name())
			if id, err := xattr.Get(filepath.Join(parent, e.Name()), snapshotIDXattr); err == nil {
				ids = append(ids, string(id))
			}
		}
		return names, ids, true
	}
	return nil, nil, false
}

// listNames shows at most a few names: a VM may have hundreds of snapshots.
func listNames(names []string) string {
	const most = 8
	if len(names) == 0 {
		return "none"
	}
	if len(names) > most {
		return strings.Join(names[:most], ", ") + fmt.Sprintf(" and %d more", len(names)-most)
	}
	return strings.Join(names, ", ")
}
