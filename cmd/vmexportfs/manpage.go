package main

import (
	"context"
	"fmt"
	"io"
	"runtime/debug"
	"strings"

	"github.com/vmexportfs/vmexportfs/backend/redact"
)

func runMan(_ context.Context, args []string, stdout, _ io.Writer, _ *redact.Secrets) error {
	operands, done, err := parseOperands("man", args, stdout)
	switch {
	case err != nil || done:
		return err
	case len(operands) > 0:
		return fmt.Errorf("%w: man takes no arguments", errUsage)
	}
	info, ok := debug.ReadBuildInfo()
	_, err = io.WriteString(stdout, manPage(specs(), info, ok))
	return err
}

// manPage is vmexportfs(1) in roff (man(7) macros), from the same
// definitions as --help: the commands, their flags, the platforms' source
// forms and the -o spellings.
func manPage(cs []commandSpec, info *debug.BuildInfo, ok bool) string {
	var b strings.Builder
	date, version := "", "vmexportfs"
	if ok && info != nil {
		for _, s := range info.Settings {
			if s.Key == "vcs.time" && len(s.Value) >= 10 {
				date = s.Value[:10]
			}
		}
		if v := info.Main.Version; v != "" && v != "(devel)" {
			version += " " + v
		}
	}
	fmt.Fprintf(&b, ".TH VMEXPORTFS 1 %s %s \"User Commands\"\n.nh\n.ad l\n", roffQuote(date), roffQuote(version))
	b.WriteString(".SH NAME\nvmexportfs \\- mount the disk snapshots of a virtualization platform as sparse files\n")
	b.WriteString(".SH SYNOPSIS\n")
	for i, c := range cs {
		if i > 0 {
			b.WriteString(".br\n")
		}
		fmt.Fprintf(&b, ".B vmexportfs\n%s\n", roffText(c.synopsis))
	}
	b.WriteString(".br\n.B vmexportfs\n\\-V | \\-\\-version\n")
	b.WriteString(".SH DESCRIPTION\n" + roffText(
		"vmexportfs mounts the disk snapshots of a platform (Coriolis, KubeVirt, XenServer, oVirt, an S3 "+
			"bucket of images, JD Cloud image exports) as files: MOUNTPOINT/vms/VM/snapshots/SNAPSHOT/disk.img "+
			"(the raw disk, sparse), disk.img.gz, disk.vhd and delta-from-BASE.vhd, and MOUNTPOINT/by-name/NAME "+
			"links to the VMs. Copy them with cp --sparse=always, rsync, tar or qemu-img. mkdir in a "+
			"snapshots directory takes a snapshot, rmdir deletes it; everything else is read-only.") + "\n")
	b.WriteString(".SH COMMANDS\n")
	for _, c := range cs {
		fmt.Fprintf(&b, ".TP\n.B %s\n%s\n", c.name, roffText(c.summary+"."))
	}
	b.WriteString(".SH OPTIONS\n")
	for _, c := range cs {
		if len(c.flags) == 0 {
			continue
		}
		fmt.Fprintf(&b, ".SS %s\n", roffQuote("vmexportfs "+c.synopsis))
		writeManFlags(&b, c.flags)
		for _, sec := range c.sections {
			fmt.Fprintf(&b, ".SS %s\n", roffQuote(sec.title))
			writeManFlags(&b, sec.flags)
		}
	}
	b.WriteString(".SH SOURCES\n")
	var cfg mountConfig
	newMountFlags(&cfg, new(string), new([]string), platforms())
	for _, p := range cfg.platforms {
		for _, u := range p.Usage {
			fmt.Fprintf(&b, ".TP\n.B %s\n%s\n", roffText(u.Source), roffText(u.Text))
		}
	}
	b.WriteString(".SH \"MOUNT OPTIONS\"\n" + roffText("Every flag that makes sense in /etc/fstab has an -o spelling ("+
		"-o a=b,c, or the options of an fstab line of type fuse.vmexportfs); generic mount options "+
		"such as rw, nodev, nosuid, _netdev and noauto are accepted and ignored. The spellings:") + "\n.PP\n")
	b.WriteString(roffText(strings.Join(newOptionTable(cfg.platforms).spellings(), " ")) + "\n")
	b.WriteString(".SH FILES\n")
	for _, f := range [][2]string{
		{"/var/lib/vmexportfs/" + sourceDirPattern + "/", "the state of a source (snapshot names, first-seen times) as root; " +
			"else under $XDG_STATE_HOME/vmexportfs or ~/.local/state/vmexportfs; --state-dir DIR gives DIR/" + sourceDirPattern +
			". " + sourceDirPattern + " is the source's host name and 12 hex digits of a hash of the source and user."},
		{"/var/cache/vmexportfs/" + sourceDirPattern + "/", "indexes of derived files, as root; else under $XDG_CACHE_HOME/vmexportfs or ~/.cache/vmexportfs, or --cache-dir."},
		{"/var/lib/vmexportfs/" + sourceDirPattern + "/" + logFileName, "the log of a mount in the background (without -f and --log-file); the mount prints its path once mounted."},
	} {
		fmt.Fprintf(&b, ".TP\n.I %s\n%s\n", roffText(f[0]), roffText(f[1]))
	}
	b.WriteString(".SH \"EXIT STATUS\"\n.TP\n.B 0\nmounted (or the command did what it was asked)\n" +
		".TP\n.B 1\ncould not mount, or the command failed; the message says why\n.TP\n.B 2\nbad invocation\n")
	b.WriteString(".SH \"SEE ALSO\"\n.BR fusermount3 (1),\n.BR mount.fuse3 (8),\n.BR getfattr (1)\n")
	return b.String()
}

func writeManFlags(b *strings.Builder, flags []flagSpec) {
	for _, fl := range flags {
		var names []string
		for _, n := range fl.names() {
			names = append(names, `\fB`+roffEscape(n)+`\fR`)
		}
		tag := strings.Join(names, ", ")
		if fl.value != "" {
			tag += ` \fI` + roffEscape(fl.value) + `\fR`
		}
		text := fl.usage
		if fl.def != "" {
			text += " (default " + fl.def + ")"
		}
		if len(fl.choices) > 0 {
			text += "; one of: " + strings.Join(fl.choices, ", ")
		}
		fmt.Fprintf(b, ".TP\n%s\n%s\n", tag, roffText(text))
	}
}

// roffEscape makes text literal in roff: backslashes printed, and every
// '-' a minus sign, so that flags copied from the page work.
func roffEscape(s string) string {
	return strings.NewReplacer(`\`, `\e`, `-`, `\-`).Replace(s)
}

// roffText is text for a line of its own: escaped, and no line of it taken
// for a request.
func roffText(s string) string {
	var lines []string
	for line := range strings.Lines(roffEscape(s)) {
		line = strings.TrimSuffix(line, "\n")
		if strings.HasPrefix(line, ".") || strings.HasPrefix(line, "'") {
			line = `\&` + line
		}
		lines = append(lines, line)
	}
	return strings.Join(lines, "\n")
}

func roffQuote(s string) string { return `"` + strings.ReplaceAll(roffEscape(s), `"`, `\(dq`) + `"` }
