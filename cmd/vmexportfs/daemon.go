package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"

	"github.com/vmexportfs/vmexportfs/backend/redact"
)

// readyFDEnv tells a re-executed daemon which descriptor reports "mounted" (or
// the error that prevented it) to the parent, so that the parent, like every
// mount helper, returns only once the mount is usable, with its exit status.
const readyFDEnv = "VMEXPORTFS_READY_FD"

// daemonize re-executes the command in a new session and waits for it to
// report that the filesystem is mounted. The daemon's output goes to logPath:
// holding the caller's stdout or stderr open would block anyone (a shell
// pipeline, mount(8), a test) that waits for them to close.
func daemonize(ctx context.Context, logPath string) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("daemonize: %w", err)
	}
	logFile, err := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("daemonize: log file: %w", err)
	}
	defer logFile.Close()
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("daemonize: %w", err)
	}
	defer r.Close()
	cmd := exec.CommandContext(ctx, exe, os.Args[1:]...)
	cmd.Env = append(os.Environ(), readyFDEnv+"=3")
	cmd.ExtraFiles = []*os.File{w}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	// The daemon must outlive a cancelled parent context once it is mounted.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	if err := cmd.Start(); err != nil {
		w.Close()
		return fmt.Errorf("daemonize: %w", err)
	}
	w.Close()
	msg, _ := io.ReadAll(r)
	if string(msg) == "ok" {
		return cmd.Process.Release()
	}
	waitErr := cmd.Wait()
	if len(msg) > 0 {
		return errors.New(strings.TrimSpace(string(msg)))
	}
	return fmt.Errorf("daemon exited before mounting: %v", waitErr)
}

func readyPipe() *os.File {
	if os.Getenv(readyFDEnv) != "3" {
		return nil
	}
	return os.NewFile(3, "ready")
}

// signalReady tells a waiting parent that the mount is up, and systemd
// too when it runs the command as a Type=notify service.
func signalReady(logger *slog.Logger) {
	if f := readyPipe(); f != nil {
		f.WriteString("ok")
		f.Close()
		os.Unsetenv(readyFDEnv)
	}
	if err := notifySystemd("READY=1\nSTATUS=mounted"); err != nil {
		logger.Warn("could not tell systemd the mount is ready", "err", err)
	}
}

// notifySocketEnv is where systemd listens for a Type=notify service's
// state (sd_notify(3)): a datagram socket's path, or "@name" for an
// abstract one.
const notifySocketEnv = "NOTIFY_SOCKET"

// notifySystemd sends state ("READY=1", "STOPPING=1") to systemd's
// notification socket; without $NOTIFY_SOCKET it does nothing.
func notifySystemd(state string) error {
	name := os.Getenv(notifySocketEnv)
	if name == "" {
		return nil
	}
	if name[0] == '@' {
		name = "\x00" + name[1:]
	} else if name[0] != '/' {
		return fmt.Errorf("$%s %q: want an absolute path or @name", notifySocketEnv, redact.Cut(name, 64))
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("notify systemd: %w", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("notify systemd: %w", err)
	}
	return nil
}

// notifyReady passes a startup error, its secrets masked, to a waiting parent
// and returns it.
func notifyReady(secrets *redact.Secrets, err error) error {
	if err == nil {
		return nil
	}
	if f := readyPipe(); f != nil {
		f.WriteString(secrets.String(err.Error()))
		f.Close()
		os.Unsetenv(readyFDEnv)
	}
	return err
}
