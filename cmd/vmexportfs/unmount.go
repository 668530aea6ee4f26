package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmexportfs/vmexportfs/fs"
)

// Why the process could outlive its unmount: go-fuse's Server.Wait returns
// only once the kernel ends the FUSE session, and the kernel ends it only
// when the last reference to the filesystem goes. A successful
// `fusermount3 -u` removes the mount from our mount namespace, but a copy of
// it in another namespace (any process that called unshare(CLONE_NEWNS)
// after we mounted: `unshare -m`, sandboxes, container runtimes, services
// with private mounts) is not busy in ours and keeps the session alive: the
// process went on serving nobody, and retrying the backend for reads whose
// readers were long gone, for as long as that namespace lived. And what ran
// after Wait (closing the block cache, which is what cancels its fetches)
// could not run before it, while FUSE requests still running waited for
// exactly those fetches.
//
// So the mount is watched in our own namespace: once it is gone there and
// no process there has one of its files open (a lazy unmount lets running
// copies finish), the process stops: it cancels every backend fetch
// (retries and backoff included), gives what is still running
// shutdownGrace, logs what it abandons and exits, which ends the FUSE
// session wherever else it was still mounted.

// shutdownGrace bounds how long the process waits, once unmounted, for FUSE
// requests and backend fetches to notice they were cancelled.
const shutdownGrace = time.Second

// mountWatch reports when a mount is gone from this process's mount
// namespace and no process there has a file of it open.
type mountWatch struct {
	gone chan struct{} // closed then
	stop func()        // ends the watch and waits for its goroutine
}

// watchMount starts watching the mount at dir, identified by its device
// number (a bind mount of it in our namespace counts as the mount).
// activity reports the files open on the filesystem.
func watchMount(dir string, activity func() (openFiles, inflight int64), logger *slog.Logger) (*mountWatch, error) {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return nil, fmt.Errorf("watch mount: stat %s: %w", dir, err)
	}
	dev := fmt.Sprintf("%d:%d", unix.Major(st.Dev), unix.Minor(st.Dev))
	ids, err := mountIDs(dev)
	if err != nil || len(ids) == 0 {
		return nil, fmt.Errorf("watch mount: %s (device %s) not found in /proc/self/mountinfo: %v", dir, dev, err)
	}
	// The mount table signals every change with POLLPRI; a pipe wakes the
	// poll to stop.
	mi, err := unix.Open("/proc/self/mountinfo", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("watch mount: %w", err)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		unix.Close(mi)
		return nil, fmt.Errorf("watch mount: %w", err)
	}
	w := &mountWatch{gone: make(chan struct{})}
	done := make(chan struct{})
	var stopped atomic.Bool
	w.stop = func() {
		if stopped.CompareAndSwap(false, true) {
			unix.Close(p[1])
		}
		<-done
	}
	go func() {
		defer close(done)
		defer unix.Close(mi)
		defer unix.Close(p[0])
		detached := false
		var scanned time.Time
		for {
			// Once detached, what ends it (the last close, the last
			// opener's exit) makes no mount table event: look often.
			timeout := 1000
			if detached {
				timeout = 200
			}
			fds := []unix.PollFd{{Fd: int32(mi), Events: unix.POLLPRI}, {Fd: int32(p[0]), Events: unix.POLLIN}}
			if _, err := unix.Poll(fds, timeout); err != nil && !errors.Is(err, unix.EINTR) {
				logger.Warn("cannot watch the mount table; the process ends with the FUSE session", "err", err)
				return
			}
			if fds[1].Revents != 0 {
				return
			}
			if !detached {
				now, err := mountIDs(dev)
				if err != nil {
					logger.Warn("cannot read the mount table; the process ends with the FUSE session", "err", err)
					return
				}
				if len(now) > 0 {
					for id := range now {
						ids[id] = true // a bind mount made since: its files count too
					}
					continue
				}
				detached = true
				open, _ := activity()
				logger.Info("mount gone from this mount namespace", "mountpoint", dir, "open_files", open)
			}
			open, _ := activity()
			if open == 0 {
				close(w.gone)
				return
			}
			// A lazy unmount leaves running copies their files. Handles
			// no process here holds are reads in flight for readers that
			// are gone (the kernel releases a file only after them), or
			// opens through a copy of the mount in another namespace,
			// which keeps the session alive out of our sight.
			if time.Since(scanned) < time.Second {
				continue // the scan reads every process's fdinfo: not too often
			}
			scanned = time.Now()
			if !openedBy(ids) {
				logger.Info("files still open on the filesystem are not open in any process of this mount namespace: stopping",
					"mountpoint", dir, "open_files", open)
				close(w.gone)
				return
			}
		}
	}()
	return w, nil
}

// mountIDs returns the mount IDs of the mounts of device dev ("major:minor")
// in this process's mount namespace.
func mountIDs(dev string) (map[string]bool, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	ids := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// mount ID, parent ID, major:minor, root, mount point, ...
		f := bytes.Fields(sc.Bytes())
		if len(f) > 2 && string(f[2]) == dev {
			ids[string(f[0])] = true
		}
	}
	return ids, sc.Err()
}

// openedBy reports whether any process has a file descriptor on one of the
// mounts ids (its fdinfo names the mount). A lazily detached mount keeps its
// ID, so this finds the copies still running on it.
func openedBy(ids map[string]bool) bool {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return true // cannot tell: keep serving
	}
	for _, pe := range procs {
		if pe.Name()[0] < '0' || pe.Name()[0] > '9' {
			continue
		}
		dir := "/proc/" + pe.Name() + "/fdinfo/"
		fds, err := os.ReadDir(dir)
		if err != nil {
			continue // gone, or not ours to look at
		}
		for _, fe := range fds {
			b, err := os.ReadFile(dir + fe.Name())
			if err != nil {
				continue
			}
			for line := range bytes.Lines(b) {
				if id, ok := bytes.CutPrefix(line, []byte("mnt_id:")); ok && ids[string(bytes.TrimSpace(id))] {
					return true
				}
			}
		}
	}
	return false
}

// shutdown stops what outlives the mount. closeAll cancels every backend
// fetch (through the block cache) and must be safe to call twice. It waits
// for the fetches and for the FUSE requests still running (the kernel's end
// of the session, unmounted, says when none is left), at most
// shutdownGrace, then abandons them with a log line. A session the kernel
// keeps for a copy of the mount in another namespace has nothing of ours
// left to wait for once no file operation runs: our exit ends it.
func shutdown(unmounted <-chan struct{}, closeAll func(), root *fs.Root, logger *slog.Logger) {
	if err := notifySystemd("STOPPING=1"); err != nil {
		logger.Warn("could not tell systemd the mount is stopping", "err", err)
	}
	closed := make(chan struct{})
	go func() { closeAll(); close(closed) }()
	deadline := time.NewTimer(shutdownGrace)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for unmounted != nil || closed != nil {
		select {
		case <-unmounted:
			unmounted = nil
		case <-closed:
			closed = nil
		case <-tick.C:
			if _, inflight := root.Activity(); closed == nil && inflight == 0 {
				logger.Info("FUSE session still held by the kernel (a copy of the mount in another mount namespace?); exiting ends it")
				return
			}
		case <-deadline.C:
			open, inflight := root.Activity()
			logger.Warn("exiting with work abandoned",
				"fuse_session_ended", unmounted == nil,
				"file_operations_running", inflight, "open_files", open,
				"backend_fetches_stopped", closed == nil, "waited", shutdownGrace)
			return
		}
	}
}

// firstCall returns f to be run once: the first call runs it, later and
// concurrent calls return at once (without waiting for it to finish).
func firstCall(f func()) func() {
	var called atomic.Bool
	return func() {
		if called.CompareAndSwap(false, true) {
			f()
		}
	}
}
