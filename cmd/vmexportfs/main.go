// Command vmexportfs mounts the disk snapshots of a virtualization platform as
// a read-only FUSE filesystem of sparse, extent-aware files.
//
//	vmexportfs [mount] [flags] SOURCE MOUNTPOINT   mount a platform
//	vmexportfs demo [flags] MOUNTPOINT             mount a built-in simulator with sample VMs
//	vmexportfs extents [--since BASE] PATH         print a file's extent map in full
//	vmexportfs stats [--watch] MOUNTPOINT          what a mount is doing
//	vmexportfs version | help | completion | man   about the command itself
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

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
	err := dispatch(ctx, args, stdout, stderr, secrets)
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

func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer, secrets *redact.Secrets) error {
	if len(args) > 0 {
		if args[0] == "-V" || args[0] == "--version" {
			return runVersion(ctx, args[1:], stdout, stderr, secrets)
		}
		if c, ok := lookupCommand(args[0]); ok {
			return c.run(ctx, args[1:], stdout, stderr, secrets)
		}
	}
	// mount(8) runs the command as `vmexportfs SOURCE MOUNTPOINT -o ...`:
	// mounting is the command without a name.
	return runMount(ctx, args, stdout, stderr, secrets)
}

// What a command's operands are, for shell completion.
const (
	operandFiles    = "files"
	operandCommands = "commands"
	operandShells   = "shells"
	operandNone     = ""
)

// command is a subcommand. Its flags come from the definitions its run
// parses, so that help, shell completion and the man page follow them.
type command struct {
	name     string
	synopsis string // after "vmexportfs "
	summary  string
	flags    func() *pflag.FlagSet
	operands string // operandFiles, ...
	run      func(ctx context.Context, args []string, stdout, stderr io.Writer, secrets *redact.Secrets) error
}

func commands() []command {
	return []command{
		{"mount", "[mount] [flags] SOURCE MOUNTPOINT", "mount a platform's snapshots (the default command)",
			func() *pflag.FlagSet { return newMountFlags(&mountConfig{}, new(string), new([]string), platforms()) },
			operandFiles, runMount},
		{"demo", "demo [--platform NAME] [flags] MOUNTPOINT", "mount a built-in simulator of a platform, with sample VMs",
			func() *pflag.FlagSet { return newDemoFlags(&demoOptions{}) },
			operandFiles, runDemo},
		{"extents", "extents [--since BASE] PATH", "print a disk file's extent map in full",
			func() *pflag.FlagSet { return extentsFlags(new(string)) },
			operandFiles, func(_ context.Context, args []string, stdout, _ io.Writer, _ *redact.Secrets) error {
				return runExtents(args, stdout)
			}},
		{"stats", "stats [--watch [--interval D]] [--json] MOUNTPOINT", "what a mount is doing",
			func() *pflag.FlagSet { return statsFlags(new(bool), new(time.Duration), new(bool)) },
			operandFiles, func(ctx context.Context, args []string, stdout, _ io.Writer, _ *redact.Secrets) error {
				return runStats(ctx, args, stdout)
			}},
		{"version", "version", "print the version (also -V, --version)",
			func() *pflag.FlagSet { return noFlags("version") }, operandNone, runVersion},
		{"help", "help [COMMAND]", "print the help of vmexportfs or of a command (also COMMAND --help)",
			func() *pflag.FlagSet { return noFlags("help") }, operandCommands, runHelp},
		{"completion", "completion bash|zsh|fish", "print the shell completion script for bash, zsh or fish",
			func() *pflag.FlagSet { return noFlags("completion") }, operandShells, runCompletion},
		{"man", "man", "print the man page (roff; man -l <(vmexportfs man) shows it)",
			func() *pflag.FlagSet { return noFlags("man") }, operandNone, runMan},
	}
}

func lookupCommand(name string) (command, bool) {
	cs := commands()
	i := slices.IndexFunc(cs, func(c command) bool { return c.name == name })
	if i < 0 {
		return command{}, false
	}
	return cs[i], true
}

func commandNames() []string {
	var names []string
	for _, c := range commands() {
		names = append(names, c.name)
	}
	return names
}

// noFlags is the flag set of a command without flags: it still knows
// -h and --help.
func noFlags(name string) *pflag.FlagSet {
	f := pflag.NewFlagSet("vmexportfs "+name, pflag.ContinueOnError)
	f.SetOutput(io.Discard)
	return f
}

// parseOperands parses the command line of a command without flags: done
// is true when it asked for help, which is then printed.
func parseOperands(name string, args []string, stdout io.Writer) (operands []string, done bool, err error) {
	c, _ := lookupCommand(name)
	f := c.flags()
	if err := f.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return nil, true, writeUsage(stdout, "vmexportfs "+c.synopsis, c.summary+".", f)
		}
		return nil, false, fmt.Errorf("%w: %s: %v", errUsage, name, err)
	}
	return f.Args(), false, nil
}

// writeUsage is a command's --help: its synopsis, what it does, its flags.
func writeUsage(w io.Writer, synopsis, about string, f *pflag.FlagSet) error {
	_, err := fmt.Fprintf(w, "usage: %s\n\n%s\n", synopsis, about)
	if err == nil && f.HasAvailableFlags() {
		_, err = fmt.Fprintf(w, "\n%s", f.FlagUsages())
	}
	return err
}

// runHelp prints the help of the command named, which is its --help; without
// a name, the mount's, which lists every command.
func runHelp(ctx context.Context, args []string, stdout, stderr io.Writer, secrets *redact.Secrets) error {
	operands, done, err := parseOperands("help", args, stdout)
	switch {
	case err != nil || done:
		return err
	case len(operands) == 0:
		return printMountHelp(stdout, platforms())
	case len(operands) > 1:
		return fmt.Errorf("%w: help: want at most one COMMAND", errUsage)
	}
	c, ok := lookupCommand(operands[0])
	if !ok {
		return fmt.Errorf("%w: help: unknown command %q (commands: %s)", errUsage, truncate(operands[0], 40), strings.Join(commandNames(), ", "))
	}
	return c.run(ctx, []string{"--help"}, stdout, stderr, secrets)
}
