package main

// End-to-end tests of the XenServer backend that the common platform tables
// cannot express: CBT against its VHD-table fallback, the spill of a pool
// without NBD, the host's 16 NBD connections, sessions, rmdir modes and the
// NBD data path under faults. Each mounts the real command on the
// simulator and checks the bytes against the simulator's own files.

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/xapi/xapitest"
)

// cbtGranule is one bit of VDI.list_changed_blocks.
const cbtGranule = 64 * kib

// The change tests' disk: 16 MiB, written before the base snapshot at
// 64 KiB-aligned places inside 2 MiB blocks (never a whole block), so a map
// at 64 KiB and one at 2 MiB differ.
const changeDiskSize = 16 * mib

var changeBefore = []extent.Extent{
	{Off: 1*mib + 64*kib, Len: 128 * kib},
	{Off: 6*mib + 192*kib, Len: 64 * kib},
	{Off: 10*mib + 320*kib, Len: 256 * kib},
}

// changeBetween are the writes between the base and the target: inside a
// 2 MiB block written before, the same 64 KiB block again, a new one across
// the 4 MiB block boundary, an unaligned 8 KiB spanning two 64 KiB blocks,
// and the disk's last block.
var changeBetween = []extent.Extent{
	{Off: 1*mib + 512*kib, Len: 64 * kib},
	{Off: 6*mib + 192*kib, Len: 64 * kib},
	{Off: 4*mib - 64*kib, Len: 128 * kib},
	{Off: 13*mib + 64*kib - 4*kib, Len: 8 * kib},
	{Off: changeDiskSize - 64*kib, Len: 64 * kib},
}

// touchedBlocks is the test's own answer to "what changed": the blocks of
// gran bytes that writes touch, merged, clipped to size. It knows nothing
// of the backend.
func touchedBlocks(writes []extent.Extent, gran, size int64) []extent.Extent {
	set := map[int64]bool{}
	for _, w := range writes {
		for b := w.Off / gran; b <= (w.End()-1)/gran; b++ {
			set[b] = true
		}
	}
	var blocks []int64
	for b := range set {
		blocks = append(blocks, b)
	}
	slices.Sort(blocks)
	var out []extent.Extent
	for _, b := range blocks {
		off, end := b*gran, min((b+1)*gran, size)
		if k := len(out) - 1; k >= 0 && out[k].End() == off {
			out[k].Len = end - out[k].Off
			continue
		}
		out = append(out, extent.Extent{Off: off, Len: end - off})
	}
	return out
}

// writeAll writes fresh bytes at each extent of a live disk.
func writeAll(t *testing.T, p *xapiPlatform, vm, disk string, writes []extent.Extent) {
	t.Helper()
	for _, w := range writes {
		p.Write(t, vm, disk, w.Off, w.Len)
	}
}

// changedMap reads user.vmexport.changed.<base> of target's disk.img as a
// backup script does, parsed as the map it claims to be.
func changedMap(t *testing.T, disk, base string, size int64) []extent.Extent {
	t.Helper()
	out := tool(t, "getfattr", "--only-values", "-n", "user.vmexport.changed."+base, disk)
	m, err := extent.Parse(out, size)
	require.NoError(t, err, "the changed map parses: %q", out)
	return m.Extents()
}

// checkDeltaChain applies target's delta-from-<base>.vhd to base's disk.vhd
// with libvhdi, as a restore does, and compares the result with the
// simulator's file of target.
func checkDeltaChain(t *testing.T, m *mounted, vm, base, target, reference string) {
	t.Helper()
	chain := t.TempDir()
	snaps := m.path("vms", vm, "snapshots")
	tool(t, "cp", filepath.Join(snaps, base, "disk.vhd"), filepath.Join(chain, base+".vhd"))
	delta := filepath.Join(chain, "delta.vhd")
	tool(t, "cp", filepath.Join(snaps, target, "delta-from-"+base+".vhd"), delta)
	assert.Contains(t, tool(t, "vhdiinfo", delta), "Parent filename\t\t: "+base+".vhd")
	applied := t.TempDir()
	tool(t, "vhdimount", delta, applied)
	defer toolErr("fusermount3", "-u", applied)
	assert.Equal(t, sha256File(t, reference), sha256Range(t, filepath.Join(applied, "vhdi2"), 0, fileSize(t, reference)),
		"%s disk.vhd + delta-from-%s.vhd is %s", base, base, target)
}

// TestXapiChangedIsCBT: with CBT on both snapshots the changed map is
// list_changed_blocks' 64 KiB blocks, asked before NBD attaches the target
// (xapi refuses a plugged-in one), and the delta built from it restores the
// target exactly.
func TestXapiChangedIsCBT(t *testing.T) {
	requireTools(t, "getfattr", "vhdiinfo", "vhdimount", "fusermount3")
	p := newXapi(t, xapitest.Options{})
	const vm = "vm-cbt"
	p.AddVM(t, vm, diskSpec{"xvda", changeDiskSize})
	writeAll(t, p, vm, "xvda", changeBefore)
	a := p.Snapshot(t, vm) // enables CBT first
	writeAll(t, p, vm, "xvda", changeBetween)
	b := p.Snapshot(t, vm)
	p.Write(t, vm, "xvda", 0, 64*kib) // after B: no map may show it

	want := touchedBlocks(changeBetween, cbtGranule, changeDiskSize)
	require.NotEqual(t, formatExtents(want), formatExtents(touchedBlocks(changeBetween, xapiBlock, changeDiskSize)),
		"the writes must tell 64 KiB blocks from 2 MiB ones")

	// A fresh mount, B's disk never read: CBT can compare it.
	m := mountSim(t, p)
	disk := m.path("vms", vm, "snapshots", b, "disk.img")
	got := changedMap(t, disk, a, changeDiskSize)
	assert.Equal(t, formatExtents(want), formatExtents(got), "changed since %s: the 64 KiB blocks written between the snapshots", a)
	assert.True(t, m.logged("changed blocks from CBT"), "the log says the map is CBT's")
	// The positive check above saw the log this far; absence needs no wait.
	assert.NotContains(t, m.logs.String(), "VHD delta's block table", "no fallback was needed")

	checkDeltaChain(t, m, vm, a, b, p.Reference(t, vm, b, "xvda"))
	st := p.sim.Stats()
	t.Logf("list_changed_blocks calls %d, while attached %d; changed %d bytes in %d extents", st.ChangedBlocksCalls, st.ChangedWhileAttached, extentBytes(got), len(got))
	assert.Positive(t, st.ChangedBlocksCalls)
	assert.Zero(t, st.ChangedWhileAttached, "list_changed_blocks is never asked about a disk the mount holds over NBD")
}

func extentBytes(es []extent.Extent) int64 {
	var n int64
	for _, e := range es {
		n += e.Len
	}
	return n
}

// TestXapiCBTFallback: where CBT cannot answer (XenServer 7.1 has no CBT
// calls; a VM snapshotted with CBT never enabled) the changed map comes from
// the block table of export_raw_vdi?format=vhd&base=, whole 2 MiB blocks,
// still exact enough for a delta that restores the target; and mkdir still
// snapshots.
func TestXapiCBTFallback(t *testing.T) {
	requireTools(t, "getfattr", "vhdiinfo", "vhdimount", "fusermount3")
	cases := []struct {
		name  string
		opts  xapitest.Options
		flags []string
		// snapshot takes a snapshot behind the mount's back.
		snapshot func(t *testing.T, p *xapiPlatform, vm, name string) string
		warn     string // what the log says at mkdir; "" nothing
	}{
		{
			name: "XenServer 7.1 (MESSAGE_METHOD_UNKNOWN)", opts: xapitest.Options{NoCBT: true},
			// p.Snapshot does not enable CBT with NoCBT.
			snapshot: func(t *testing.T, p *xapiPlatform, vm, _ string) string { return p.Snapshot(t, vm) },
			warn:     "cannot enable changed block tracking",
		},
		{
			name: "CBT never enabled", flags: []string{"--xapi-cbt=false"},
			snapshot: func(t *testing.T, p *xapiPlatform, vm, name string) string {
				_, err := p.sim.TakeSnapshot(vm, name) // no EnableCBT
				require.NoError(t, err)
				return name
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newXapi(t, tc.opts, tc.flags...)
			const vm = "vm-fallback"
			p.AddVM(t, vm, diskSpec{"xvda", changeDiskSize})
			writeAll(t, p, vm, "xvda", changeBefore)
			a := tc.snapshot(t, p, vm, "base")
			writeAll(t, p, vm, "xvda", changeBetween)
			b := tc.snapshot(t, p, vm, "next")
			ids := p.Snapshots(t, vm)
			require.Len(t, ids, 2)

			m := mountSim(t, p)
			got := changedMap(t, m.path("vms", vm, "snapshots", b, "disk.img"), a, changeDiskSize)
			want := touchedBlocks(changeBetween, xapiBlock, changeDiskSize)
			assert.Equal(t, formatExtents(want), formatExtents(got), "changed since %s: the 2 MiB blocks written between the snapshots", a)
			assert.True(t, m.logged("changed blocks from the VHD delta's block table"), "the log names the VHD block table")
			assert.NotContains(t, m.logs.String(), "changed blocks from CBT")
			assert.Zero(t, p.sim.Stats().ChangedBlocksCalls, "list_changed_blocks is not asked about disks without CBT")
			checkDeltaChain(t, m, vm, a, b, p.Reference(t, vm, ids[1], "xvda"))

			// mkdir still snapshots, and its disk holds the live data.
			tool(t, "mkdir", m.path("vms", vm, "snapshots", "x"))
			ids = p.Snapshots(t, vm)
			require.Len(t, ids, 3)
			assert.Equal(t, sha256File(t, p.Reference(t, vm, ids[2], "xvda")), sha256String(tool(t, "cat", m.path("vms", vm, "snapshots", "x", "disk.img"))))
			if tc.warn != "" {
				assert.True(t, m.logged(tc.warn), "mkdir warns: %s", tc.warn)
			} else {
				// mkdir's last line is there, so an earlier one would be too.
				require.True(t, m.logged("snapshot taken"))
				logs := m.logs.String()
				assert.NotContains(t, logs, "changed block tracking enabled", "--xapi-cbt=false leaves CBT alone")
				assert.NotContains(t, logs, "cannot enable changed block tracking", "--xapi-cbt=false leaves CBT alone")
			}
		})
	}
}

// TestXapiSpill: a pool without an NBD network. The mount says so loudly,
// streams each disk once into the spill, serves disk.img and disk.img.gz
// byte-identically from it, and fails reads beyond --spill-size with EIO
// naming the flag while a disk that fits still copies.
func TestXapiSpill(t *testing.T) {
	requireTools(t, "cp", "zcat", "sha256sum")
	p := newXapi(t, xapitest.Options{NBD: xapitest.NBDNone})
	const big, small = "vm-spill", "vm-small"
	p.AddVM(t, big, diskSpec{"xvda", 16 * mib})
	bigWrites := []extent.Extent{{Off: 0, Len: 3 * mib}, {Off: 5*mib + 64*kib, Len: 2 * mib}, {Off: 10 * mib, Len: 3 * mib}}
	writeAll(t, p, big, "xvda", bigWrites) // 8 MiB of data
	bigSnap := p.Snapshot(t, big)
	p.AddVM(t, small, diskSpec{"xvda", 8 * mib})
	p.Write(t, small, "xvda", 2*mib+128*kib, 512*kib)
	smallSnap := p.Snapshot(t, small)
	bigWant := sha256File(t, p.Reference(t, big, bigSnap, "xvda"))
	smallWant := sha256File(t, p.Reference(t, small, smallSnap, "xvda"))

	m := mountSim(t, p)
	require.True(t, m.logged("NO NETWORK OF THIS POOL HAS THE PURPOSE nbd"), "the mount says there is no NBD network")
	line := logLine(m.logs.String(), "NO NETWORK OF THIS POOL")
	assert.Contains(t, line, "WARN", "loudly: a warning")
	assert.Contains(t, line, "--spill-size", "and names the budget")

	before := p.sim.Stats().ExportRequests["vhd"]
	out := t.TempDir()
	dir := m.path("vms", big, "snapshots", bigSnap)
	tool(t, "cp", "--sparse=always", filepath.Join(dir, "disk.img"), filepath.Join(out, "disk.img"))
	assert.Equal(t, bigWant, sha256File(t, filepath.Join(out, "disk.img")), "disk.img")
	tool(t, "cp", "--sparse=always", filepath.Join(dir, "disk.img.gz"), filepath.Join(out, "disk.img.gz"))
	assert.Equal(t, bigWant+"  -\n", tool(t, "sh", "-c", `zcat "$1" | sha256sum`, "sh", filepath.Join(out, "disk.img.gz")), "disk.img.gz")
	tool(t, "cp", filepath.Join(dir, "disk.img"), filepath.Join(out, "again"))
	assert.Equal(t, bigWant, sha256File(t, filepath.Join(out, "again")), "disk.img read again")
	streams := p.sim.Stats().ExportRequests["vhd"] - before
	t.Logf("3 reads of one disk (disk.img twice, disk.img.gz): %d VHD streams", streams)
	assert.Equal(t, 1, streams, "the disk is streamed once per mount")
	m.stop(t)

	// 3 MiB of budget: the small disk (one 2 MiB block) fits, the big one's
	// 8 MiB do not.
	m = mountSim(t, p, "--spill-size", "3M")
	smallDisk := m.path("vms", small, "snapshots", smallSnap, "disk.img")
	tool(t, "cp", smallDisk, filepath.Join(out, "small"))
	assert.Equal(t, smallWant, sha256File(t, filepath.Join(out, "small")), "a disk within --spill-size")
	_, err := toolErr("cp", m.path("vms", big, "snapshots", bigSnap, "disk.img"), filepath.Join(out, "big"))
	require.Error(t, err, "a disk beyond --spill-size cannot be served")
	assert.Contains(t, err.Error(), "Input/output error")
	// The startup warning names --spill-size too: look for the failure's line.
	if assert.True(t, m.logged("is used up"), "the log says the spill budget is used up") {
		assert.Contains(t, logLine(m.logs.String(), "is used up"), "--spill-size", "and names --spill-size")
	}
	tool(t, "cp", smallDisk, filepath.Join(out, "small2"))
	assert.Equal(t, smallWant, sha256File(t, filepath.Join(out, "small2")), "the disk that fits still copies after the other failed")
}

// logLine is the first line of logs holding word.
func logLine(logs, word string) string {
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, word) {
			return l
		}
	}
	return ""
}

// TestXapiConnectionCap reads six disks of one VM at once: 6 × 4 NBD
// connections would be 24, and the host serves 16, so the mount must share
// them and never be hung up on; then, idle, it unplugs every disk.
func TestXapiConnectionCap(t *testing.T) {
	requireTools(t, "dd")
	p := newXapi(t, xapitest.Options{})
	const vm = "vm-six"
	// userdevice 3 is the VM's CD drive (as on a real pool), so the sixth
	// disk is xvdg.
	disks := []string{"xvda", "xvdb", "xvdc", "xvde", "xvdf", "xvdg"}
	var specs []diskSpec
	for _, d := range disks {
		specs = append(specs, diskSpec{d, 16 * mib})
	}
	p.AddVM(t, vm, specs...)
	for i, d := range disks {
		p.Write(t, vm, d, int64(i)*mib, 6*mib)
		p.Write(t, vm, d, 12*mib+int64(i)*64*kib, 2*mib)
	}
	snap := p.Snapshot(t, vm)
	m := mountSim(t, p)

	out := t.TempDir()
	errs := make([]error, len(disks))
	var wg sync.WaitGroup
	for i, d := range disks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dst := filepath.Join(out, d)
			if _, err := toolErr("dd", "if="+m.path("vms", vm, "snapshots", snap, d, "disk.img"), "of="+dst, "bs=1M", "status=none"); err != nil {
				errs[i] = err
			}
		}()
	}
	wg.Wait()
	for i, d := range disks {
		if assert.NoError(t, errs[i], d) {
			assert.Equal(t, sha256File(t, p.Reference(t, vm, snap, d)), sha256File(t, filepath.Join(out, d)), d)
		}
	}
	st := p.sim.Stats()
	t.Logf("6 disks read at once: peak %d NBD connections, %d refused, %d MiB over NBD", st.PeakNBDConns, st.NBDRefused, st.NBDBytes>>20)
	assert.LessOrEqual(t, st.PeakNBDConns, 16, "never more than the host's 16")
	assert.Positive(t, st.PeakNBDConns)
	// A refusal means the mount dialed while the host still counted 16 of
	// its connections, such as ones it had just closed but the host had not
	// yet let go of.
	assert.Zero(t, st.NBDRefused, "the host never had to hang up on the mount")

	// Idle for longer than the 2 s after a disk's last read: nothing plugged in.
	time.Sleep(3 * time.Second)
	assert.Zero(t, p.sim.Stats().NBDConns, "idle disks are unplugged from dom0")
	select {
	case <-m.done:
		t.Fatal("the mount exited")
	default:
	}
	assert.Contains(t, tool(t, "ls", m.path("vms", vm, "snapshots", snap)), "xvdg", "the mount is still up")
}

// TestXapiSessions: a mount survives its session being dropped (an xapi
// restart), logs out every session it made at unmount, and a wrong password
// fails the mount without printing the password.
func TestXapiSessions(t *testing.T) {
	p := newXapi(t, xapitest.Options{})
	const vm = "vm-sess"
	p.AddVM(t, vm, diskSpec{"xvda", 8 * mib})
	p.Write(t, vm, "xvda", 1*mib, 3*mib)
	snap := p.Snapshot(t, vm)
	want := sha256File(t, p.Reference(t, vm, snap, "xvda"))

	m := mountSim(t, p)
	assert.Contains(t, tool(t, "ls", m.path("vms", vm, "snapshots")), snap)
	p.sim.InvalidateSessions()
	dst := filepath.Join(t.TempDir(), "disk.img")
	tool(t, "cp", m.path("vms", vm, "snapshots", snap, "disk.img"), dst)
	assert.Equal(t, want, sha256File(t, dst), "copy after the session was dropped")
	assert.True(t, m.logged("logging in again"), "the log says it logged in again")
	m.stop(t)
	st := p.sim.Stats()
	t.Logf("logins %d, logouts %d, live sessions after unmount %d", st.Logins, st.Logouts, st.Sessions)
	assert.GreaterOrEqual(t, st.Logins, 2, "a second login after the drop")
	assert.GreaterOrEqual(t, st.Logouts, 1)
	assert.Zero(t, st.Sessions, "every session is logged out at unmount")

	const wrongPassword = "not-the-xapi-password-4d1b"
	pw := filepath.Join(t.TempDir(), "pw")
	require.NoError(t, os.WriteFile(pw, []byte(wrongPassword+"\n"), 0o600))
	outText, err := runTool(os.Args[0], []string{"-f", "--username", xapitest.DefaultUser, "--password-file", pw,
		"--ca-file", p.caFile, "--state-dir", t.TempDir(), "--cache-dir", t.TempDir(), "--retries", "1",
		"xapi+" + p.sim.URL(), t.TempDir()}, asCommandEnv+"=1")
	require.Error(t, err, "a wrong password fails the mount")
	var exit *exec.ExitError
	require.ErrorAs(t, err, &exit)
	assert.NotZero(t, exit.ExitCode())
	msg := outText + err.Error()
	t.Logf("wrong password: exit %d: %s", exit.ExitCode(), strings.TrimSpace(msg))
	assert.True(t, containsAny(msg, []string{"SESSION_AUTHENTICATION_FAILED", "ermission denied"}), "the message says why: %s", msg)
	assert.NotContains(t, msg, wrongPassword)
	assert.NotContains(t, msg, xapitest.DefaultPassword)
	assert.Zero(t, p.sim.Stats().Sessions, "a failed login leaves no session")
}

// xapiRPC is the test's own XenAPI JSON-RPC client, to see the pool's
// records as another tool would, not through the backend under test.
type xapiRPC struct {
	t       *testing.T
	url     string
	hc      *http.Client
	session string
}

func newXapiRPC(t *testing.T, sim *xapitest.Server) *xapiRPC {
	t.Helper()
	c := &xapiRPC{t: t, url: sim.URL() + "/jsonrpc", hc: &http.Client{
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: sim.CAPool(), MinVersion: tls.VersionTLS12}},
		Timeout:   30 * time.Second,
	}}
	require.NoError(t, c.raw("session.login_with_password", &c.session, xapitest.DefaultUser, xapitest.DefaultPassword, "1.0", "vmexportfs-test"))
	t.Cleanup(func() { _ = c.raw("session.logout", nil, c.session) })
	return c
}

func (c *xapiRPC) raw(method string, out any, params ...any) error {
	body, err := json.Marshal(map[string]any{"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
	if err != nil {
		return err
	}
	resp, err := c.hc.Post(c.url, "application/json", bytes.NewReader(body))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var ans struct {
		Result json.RawMessage `json:"result"`
		Error  *struct {
			Message string   `json:"message"`
			Data    []string `json:"data"`
		} `json:"error"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&ans); err != nil {
		return fmt.Errorf("%s: %w", method, err)
	}
	if ans.Error != nil {
		return fmt.Errorf("%s: %s %v", method, ans.Error.Message, ans.Error.Data)
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(ans.Result, out)
}

// call runs method with the session first.
func (c *xapiRPC) call(method string, out any, params ...any) {
	c.t.Helper()
	require.NoError(c.t, c.raw(method, out, append([]any{c.session}, params...)...))
}

type rpcVM struct {
	UUID      string   `json:"uuid"`
	NameLabel string   `json:"name_label"`
	VBDs      []string `json:"VBDs"`
}

type rpcVBD struct {
	VDI  string `json:"VDI"`
	Type string `json:"type"`
}

type rpcVDI struct {
	UUID string `json:"uuid"`
	Type string `json:"type"`
}

// snapshotVDIs are the disk VDI refs of the VM with that uuid.
func (c *xapiRPC) snapshotVDIs(uuid string) []string {
	c.t.Helper()
	var vms map[string]rpcVM
	c.call("VM.get_all_records", &vms)
	var vbds map[string]rpcVBD
	c.call("VBD.get_all_records", &vbds)
	var out []string
	for _, v := range vms {
		if v.UUID != uuid {
			continue
		}
		for _, ref := range v.VBDs {
			if b := vbds[ref]; b.Type == "Disk" {
				out = append(out, b.VDI)
			}
		}
	}
	require.NotEmpty(c.t, out, "snapshot %s has disks", uuid)
	return out
}

// TestXapiRmdirModes: rmdir of a snapshot whose disk the mount has just read
// (so holds over NBD) detaches it and then destroys the snapshot VM and its
// VDIs, or, with --xapi-rmdir=data-destroy, frees the data and keeps the CBT
// metadata. Either way the snapshot leaves the mount.
func TestXapiRmdirModes(t *testing.T) {
	cases := []struct {
		name  string
		flags []string
		// check says what the pool holds of the snapshot's VDIs afterwards.
		check func(t *testing.T, vdis map[string]rpcVDI, snapVDIs []string, vms map[string]rpcVM, snapUUID string)
	}{
		{"destroy (default)", nil, func(t *testing.T, vdis map[string]rpcVDI, snapVDIs []string, vms map[string]rpcVM, snapUUID string) {
			for _, ref := range snapVDIs {
				_, ok := vdis[ref]
				assert.False(t, ok, "VDI %s is destroyed", ref)
			}
			for _, v := range vms {
				assert.NotEqual(t, snapUUID, v.UUID, "the snapshot VM is destroyed")
			}
		}},
		{"data-destroy", []string{"--xapi-rmdir", "data-destroy"}, func(t *testing.T, vdis map[string]rpcVDI, snapVDIs []string, _ map[string]rpcVM, _ string) {
			for _, ref := range snapVDIs {
				if assert.Contains(t, vdis, ref, "VDI %s is kept", ref) {
					assert.Equal(t, "cbt_metadata", vdis[ref].Type, "VDI %s keeps only its CBT metadata", ref)
				}
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newXapi(t, xapitest.Options{})
			const vm = "vm-rm"
			p.AddVM(t, vm, diskSpec{"xvda", 8 * mib}, diskSpec{"xvdb", 8 * mib})
			p.Write(t, vm, "xvda", 0, 2*mib)
			p.Write(t, vm, "xvdb", 3*mib, 1*mib)
			rpc := newXapiRPC(t, p.sim)
			m := mountSim(t, p, tc.flags...)
			snaps := m.path("vms", vm, "snapshots")
			tool(t, "mkdir", filepath.Join(snaps, "s1"))
			ids := p.Snapshots(t, vm)
			require.Len(t, ids, 1)
			snapVDIs := rpc.snapshotVDIs(ids[0])
			require.Len(t, snapVDIs, 2)

			for _, d := range []string{"xvda", "xvdb"} {
				assert.Equal(t, sha256File(t, p.Reference(t, vm, ids[0], d)), sha256String(tool(t, "cat", filepath.Join(snaps, "s1", d, "disk.img"))), d)
			}
			// Within the 2 s after the last read the disks are still plugged in.
			require.Positive(t, p.sim.Stats().NBDConns, "the test must rmdir a snapshot the mount holds over NBD")
			tool(t, "rmdir", filepath.Join(snaps, "s1"))
			assert.Zero(t, p.sim.Stats().NBDConns, "the mount closed its connections to the snapshot's disks")
			assert.NotContains(t, tool(t, "ls", snaps), "s1", "the snapshot leaves the mount")
			assert.Empty(t, p.Snapshots(t, vm), "no snapshot of the VM holds data")

			var vdis map[string]rpcVDI
			rpc.call("VDI.get_all_records", &vdis)
			var vms map[string]rpcVM
			rpc.call("VM.get_all_records", &vms)
			tc.check(t, vdis, snapVDIs, vms, ids[0])
		})
	}
}

// nbdFault is what the NBD fault proxy does to one connection.
type nbdFault int

const (
	nbdNoFault nbdFault = iota
	nbdReset            // RST after a random number of server bytes
	nbdStall            // stop forwarding for longer than --read-timeout
	nbdFlip             // flip one server byte after the TLS handshake
	nbdRefuse           // close at once, before the greeting
)

func (f nbdFault) String() string {
	return [...]string{"none", "reset", "stall", "flip", "refuse"}[f]
}

// nbdFaultWords are what the log says of each fault: it must when the fault
// made a copy fail, and some copy's log must even when retries hid it.
var nbdFaultWords = map[nbdFault][]string{
	nbdReset:  {"connection reset", "EOF", "broken pipe"},
	nbdStall:  {"deadline exceeded", "timeout"},
	nbdFlip:   {"bad record MAC"}, // TLS caught the flipped byte
	nbdRefuse: {"hung up before its greeting"},
}

// flipAfter is where flips start in the server's bytes: past the NBD
// greeting, the STARTTLS reply and the TLS handshake (a 2048-bit RSA
// certificate: about 2 KiB), so what is flipped is a TLS record of the data
// phase, which only TLS's integrity check can catch.
const flipAfter = 16 * kib

// stallFor is longer than the tests' --read-timeout of 1 s.
const stallFor = 3 * time.Second

// nbdProxy forwards TCP between the mount and the simulator's NBD server
// and faults connections with a probability.
type nbdProxy struct {
	ln     net.Listener
	target string
	done   chan struct{}
	wg     sync.WaitGroup

	mu    sync.Mutex
	rng   *rand.Rand
	fault nbdFault
	prob  float64

	conns    atomic.Int64
	injected [5]atomic.Int64 // by fault
}

func startNBDProxy(t *testing.T, target string, seed uint64) *nbdProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &nbdProxy{ln: ln, target: target, done: make(chan struct{}), rng: rand.New(rand.NewPCG(seed, 0x7e57))}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() {
		close(p.done)
		ln.Close()
		p.wg.Wait()
	})
	return p
}

func (p *nbdProxy) addr() string { return p.ln.Addr().String() }

// set makes each new connection get fault with probability prob.
func (p *nbdProxy) set(fault nbdFault, prob float64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.fault, p.prob = fault, prob
}

// draw decides a new connection's fault and the byte count it strikes at.
func (p *nbdProxy) draw() (nbdFault, int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.fault == nbdNoFault || p.rng.Float64() >= p.prob {
		return nbdNoFault, 0
	}
	switch p.fault {
	case nbdFlip:
		return nbdFlip, flipAfter + p.rng.Int64N(1*mib)
	case nbdRefuse:
		return nbdRefuse, 0
	default: // anywhere: in the handshake, between replies, mid-reply
		return p.fault, p.rng.Int64N(2 * mib)
	}
}

func (p *nbdProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.conns.Add(1)
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.serve(c.(*net.TCPConn))
		}()
	}
}

func (p *nbdProxy) serve(client *net.TCPConn) {
	defer client.Close()
	fault, at := p.draw()
	if fault == nbdRefuse {
		p.injected[fault].Add(1)
		return
	}
	srv, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer srv.Close()
	// The test's end, or this function's, closes both ends.
	finished := make(chan struct{})
	defer close(finished)
	p.wg.Add(2)
	go func() {
		defer p.wg.Done()
		select {
		case <-p.done:
		case <-finished:
		}
		client.Close()
		srv.Close()
	}()
	go func() {
		defer p.wg.Done()
		// The client's bytes pass untouched; its end ends both.
		_, _ = io.Copy(srv, client)
		srv.Close()
		client.Close()
	}()
	buf := make([]byte, 32*kib)
	var sent int64
	for {
		n, err := srv.Read(buf)
		if n > 0 {
			chunk := buf[:n]
			if fault != nbdNoFault && sent+int64(n) > at {
				cut := at - sent
				switch fault {
				case nbdReset:
					_, _ = client.Write(chunk[:cut])
					p.injected[fault].Add(1)
					_ = client.SetLinger(0) // RST, not FIN
					return
				case nbdStall:
					_, _ = client.Write(chunk[:cut])
					p.injected[fault].Add(1)
					select {
					case <-time.After(stallFor):
					case <-p.done:
					}
					return
				case nbdFlip:
					chunk[cut] ^= 0x20
					p.injected[fault].Add(1)
					fault = nbdNoFault // one byte per connection
				}
			}
			if _, werr := client.Write(chunk); werr != nil {
				return
			}
			sent += int64(n)
		}
		if err != nil {
			return
		}
	}
}

// TestXapiNBDFaults copies a disk through a TCP proxy in front of the NBD
// server that resets, stalls, corrupts (under TLS) or refuses connections,
// on a fresh mount each time: a copy is byte-identical, or fails with EIO
// and the log says why, after which the same mount copies correctly once
// the faults stop. A wrong byte fails the test.
func TestXapiNBDFaults(t *testing.T) {
	requireTools(t, "cp")
	p := newXapi(t, xapitest.Options{})
	const vm = "vm-nbdf"
	p.AddVM(t, vm, diskSpec{"xvda", 8 * mib})
	writeAll(t, p, vm, "xvda", []extent.Extent{{Off: 0, Len: 2*mib + 64*kib}, {Off: 3*mib + 128*kib, Len: 1 * mib}, {Off: 6 * mib, Len: 2 * mib}})
	snap := p.Snapshot(t, vm)
	want := sha256File(t, p.Reference(t, vm, snap, "xvda"))
	proxy := startNBDProxy(t, p.sim.NBDAddr(), 11)
	p.sim.AdvertiseNBD(proxy.addr())

	faults := []nbdFault{nbdReset, nbdStall, nbdFlip, nbdRefuse}
	copies := envInt(t, "VMEXPORTFS_XAPI_FAULT_COPIES", 24)
	var tally copyTally
	// explained: some copy's log under this fault names it, even where the
	// retries hid it from cp (a flip must show TLS catching it).
	explained := map[nbdFault]bool{}
	for i := range copies {
		fault := faults[i%len(faults)]
		m := mountSim(t, p, "--read-timeout", "1s", "--retries", "4")
		tally.faultedCopy(t, m, m.path("vms", vm, "snapshots", snap, "disk.img"), want, fmt.Sprintf("copy %d (%s)", i, fault), nbdFaultWords[fault],
			func() { proxy.set(fault, 0.3) }, func() { proxy.set(nbdNoFault, 0) })
		m.stop(t)
		explained[fault] = explained[fault] || containsAny(m.logs.String(), nbdFaultWords[fault])
	}
	var counts []string
	for _, f := range faults {
		counts = append(counts, fmt.Sprintf("%s %d", f, proxy.injected[f].Load()))
	}
	t.Logf("%d faulted copies: %s; %d connections through the proxy, faults injected: %s",
		copies, tally, proxy.conns.Load(), strings.Join(counts, ", "))
	assert.Zero(t, tally.wrong)
	for _, f := range faults {
		assert.Positive(t, proxy.injected[f].Load(), "%s was injected", f)
		assert.True(t, explained[f], "a log of the %s copies says %q", f, nbdFaultWords[f])
	}
	assert.Zero(t, p.sim.Stats().NBDRefused)
}
