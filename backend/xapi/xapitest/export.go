package xapitest

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"time"
	"unicode/utf16"
)

// exportJob is what one export_raw_vdi answer streams, captured under the
// lock so the stream itself runs without it.
type exportJob struct {
	d          *vdi
	format     string // "raw" | "vhd"
	withBase   bool
	file       *os.File
	blocks     []int64 // 2 MiB blocks in the stream (vhd; raw+base: the non-zero ones), ascending
	parentUID  [16]byte
	parentName string
	taskRef    string
	now        time.Time
}

// serveExport is GET /export_raw_vdi. Authentication comes first (session
// in query or cookie, else HTTP Basic), then, on the master of a pool whose
// member alone sees the SR, a 302 to the member; then the 200 answer with
// no length: the body ends when the connection closes, as xapi's does.
func (s *Server) serveExport(h *host, w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", http.MethodGet)
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	param := func(name string) string {
		if v := r.URL.Query().Get(name); v != "" {
			return v
		}
		if c, err := r.Cookie(name); err == nil {
			return c.Value
		}
		return ""
	}
	readOnly, ok := s.exportAuth(param("session_id"), r)
	if !ok {
		w.Header().Set("WWW-Authenticate", `Basic realm="xapi"`)
		http.Error(w, "unauthorised", http.StatusUnauthorized)
		return
	}
	if readOnly {
		// export_raw_vdi needs the VM-admin role.
		http.Error(w, "RBAC_PERMISSION_DENIED", http.StatusForbidden)
		return
	}
	if !h.isMember && s.member != nil {
		s.mu.Lock()
		s.stats.Redirects++
		s.mu.Unlock()
		loc := s.member.url() + r.URL.Path
		if r.URL.RawQuery != "" {
			loc += "?" + r.URL.RawQuery
		}
		w.Header().Set("Location", loc)
		w.WriteHeader(http.StatusFound)
		return
	}
	job, status, msg := s.prepareExport(param("vdi"), param("format"), param("base"))
	if status != http.StatusOK {
		s.log.Debug("xapi simulator export refused", "status", status, "msg", msg)
		http.Error(w, msg, status)
		return
	}
	defer job.file.Close()
	s.streamExport(w, job)
}

// exportAuth checks the session ref, else HTTP Basic credentials (a
// temporary session in xapi, not counted here).
func (s *Server) exportAuth(ref string, r *http.Request) (readOnly, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ref != "" {
		sess := s.sessions[ref]
		if sess == nil {
			return false, false
		}
		return sess.readOnly, true
	}
	user, pw, basic := r.BasicAuth()
	if !basic {
		return false, false
	}
	if want, known := s.opts.Users[user]; !known || want != pw {
		return false, false
	}
	return slices.Contains(s.opts.ReadOnlyUsers, user), true
}

func (s *Server) prepareExport(vdiID, format, baseID string) (*exportJob, int, string) {
	if format == "" {
		format = "raw"
	}
	if format != "raw" && format != "vhd" {
		// tar and qcow2 exist on real xapi but not here; an unknown format
		// fails the task and answers 404 there.
		return nil, http.StatusNotFound, "unsupported format " + format
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.vdiByRefOrUUID(vdiID)
	if d == nil {
		return nil, http.StatusNotFound, "HANDLE_INVALID VDI " + vdiID
	}
	if d.typ != "user" || d.path == "" {
		return nil, http.StatusInternalServerError, "VDI_INCOMPATIBLE_TYPE " + d.ref + " " + d.typ
	}
	job := &exportJob{d: d, format: format, taskRef: newRef(), now: s.opts.Clock()}
	hi := epochOf(d)
	var blocks64 map[int64]bool
	if baseID != "" {
		base := s.vdiByRefOrUUID(baseID)
		if base == nil {
			return nil, http.StatusNotFound, "HANDLE_INVALID VDI " + baseID
		}
		if base.typ != "user" || base.path == "" {
			return nil, http.StatusInternalServerError, "VDI_INCOMPATIBLE_TYPE " + base.ref + " " + base.typ
		}
		if base.lin != d.lin {
			return nil, http.StatusInternalServerError, "VDI_INCOMPATIBLE_TYPE " + base.ref + " is not of the same disk"
		}
		lo := epochOf(base)
		if lo > hi {
			lo, hi = hi, lo
		}
		blocks64 = d.lin.changed(lo, hi)
		job.withBase = true
		job.parentUID = base.uid
		job.parentName = "/var/run/sr-mount/" + s.srUUID + "/" + base.uuid + ".vhd"
	} else {
		blocks64 = d.lin.written(hi)
	}
	seen := map[int64]bool{}
	for b := range blocks64 {
		blk := b * cbtBlockSize / vhdBlockSize
		if blk*vhdBlockSize < d.size && !seen[blk] {
			seen[blk] = true
			job.blocks = append(job.blocks, blk)
		}
	}
	slices.Sort(job.blocks)
	f, err := os.Open(d.path)
	if err != nil {
		return nil, http.StatusInternalServerError, "open disk: " + err.Error()
	}
	job.file = f
	key := format
	if job.withBase {
		key += "+base"
	}
	s.stats.ExportRequests[key]++
	return job, http.StatusOK, ""
}

// countingWriter adds what passes to the server's ExportBytes.
type countingWriter struct {
	w io.Writer
	s *Server
}

func (c countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.s.exportBytes.Add(int64(n))
	return n, err
}

// streamExport hijacks the connection and writes the status line, headers
// and body itself: xapi sends neither Content-Length nor chunked encoding,
// which net/http would add.
func (s *Server) streamExport(w http.ResponseWriter, job *exportJob) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		http.Error(w, "cannot hijack", http.StatusInternalServerError)
		return
	}
	conn, brw, err := hj.Hijack()
	if err != nil {
		s.log.Error("xapi simulator export hijack", "err", err)
		return
	}
	defer conn.Close()
	if !s.track(conn) {
		return
	}
	defer s.untrack(conn)
	ctype, ext := "application/octet-stream", "raw"
	if job.format == "vhd" {
		ctype, ext = "application/vhd", "vhd"
	}
	head := "HTTP/1.1 200 OK\r\n" +
		"Connection: close\r\n" +
		"Cache-Control: no-cache, no-store\r\n" +
		"task-id: " + job.taskRef + "\r\n" +
		"content-type: " + ctype + "\r\n" +
		"content-disposition: attachment; filename=\"" + job.d.uuid + "." + ext + "\"\r\n" +
		"\r\n"
	if _, err := brw.WriteString(head); err != nil {
		return
	}
	body := bufio.NewWriterSize(countingWriter{w: brw.Writer, s: s}, 256<<10)
	if job.format == "vhd" {
		err = writeVHD(body, job)
	} else {
		err = writeRaw(body, job)
	}
	if err == nil {
		err = body.Flush()
	}
	if err == nil {
		err = brw.Flush()
	}
	if err != nil && !errors.Is(err, io.ErrClosedPipe) {
		// The client going away mid-stream is ordinary.
		s.log.Debug("xapi simulator export stream", "vdi", job.d.uuid, "err", err)
	}
}

// writeRaw writes the disk; with a base only the changed 2 MiB blocks carry
// data and the rest is zeros.
func writeRaw(w io.Writer, job *exportJob) error {
	size := job.d.size
	if !job.withBase {
		_, err := io.Copy(w, io.NewSectionReader(job.file, 0, size))
		return err
	}
	zero := make([]byte, vhdBlockSize)
	want := map[int64]bool{}
	for _, b := range job.blocks {
		want[b] = true
	}
	for blk := int64(0); blk*vhdBlockSize < size; blk++ {
		n := min(int64(vhdBlockSize), size-blk*vhdBlockSize)
		var err error
		if want[blk] {
			_, err = io.Copy(w, io.NewSectionReader(job.file, blk*vhdBlockSize, n))
		} else {
			_, err = w.Write(zero[:n])
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// ---- VHD ----

// vhdEpoch is where VHD timestamps count from.
var vhdEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

const (
	vhdDynamic      = 3
	vhdDifferencing = 4
	vhdBATOffset    = 1536
)

// writeVHD streams a dynamic VHD (the snapshot's allocated blocks) or, with
// a base, a differencing one holding the blocks written since the base, laid
// out for forward-only readers: footer copy, header, BAT, [locator data],
// blocks in BAT order, footer.
func writeVHD(w io.Writer, job *exportJob) error {
	size := job.d.size
	entries := (size + vhdBlockSize - 1) / vhdBlockSize
	batBytes := (entries*4 + 511) / 512 * 512
	dataStart := vhdBATOffset + batBytes

	var footer []byte
	var header []byte
	locatorURL := "file://" + job.parentName
	if job.withBase {
		// As xapi's vhd-tool: creator "caml", timestamp 0, a fresh uid; the
		// parent is the base's on-host VHD, and the one MacX locator's data
		// goes out as zeros.
		footer = vhdFooter(vhdDifferencing, size, "caml", 0, newUID())
		header = vhdHeader(uint32(entries), job.parentUID, job.parentName, &vhdLocator{code: "MacX", sectors: 1, length: uint32(len(locatorURL)), offset: uint64(dataStart)})
		dataStart += 512
	} else {
		// "tap\0" (XenServer's blktap) makes qemu use the current size
		// rather than CHS geometry, so qemu-img shows the exact disk size.
		ts := job.now.Sub(vhdEpoch) / time.Second
		footer = vhdFooter(vhdDynamic, size, "tap\x00", uint32(max(ts, 0)), job.d.uid)
		header = vhdHeader(uint32(entries), [16]byte{}, "", nil)
	}
	bat := make([]byte, batBytes)
	for i := range bat {
		bat[i] = 0xff // absent entries; the padding is 0xFF too, as vhd-util writes
	}
	const blockSpan = 512 + vhdBlockSize
	for i, blk := range job.blocks {
		sector := (dataStart + int64(i)*blockSpan) / 512
		binary.BigEndian.PutUint32(bat[blk*4:], uint32(sector))
	}
	for _, part := range [][]byte{footer, header, bat} {
		if _, err := w.Write(part); err != nil {
			return err
		}
	}
	if job.withBase {
		if _, err := w.Write(make([]byte, 512)); err != nil {
			return err
		}
	}
	bitmap := make([]byte, 512)
	for i := range bitmap {
		bitmap[i] = 0xff
	}
	buf := make([]byte, vhdBlockSize)
	for _, blk := range job.blocks {
		clear(buf)
		// Sizes are whole blocks; were the file short, the rest stays zero.
		if _, err := job.file.ReadAt(buf, blk*vhdBlockSize); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read block %d: %w", blk, err)
		}
		if _, err := w.Write(bitmap); err != nil {
			return err
		}
		if _, err := w.Write(buf); err != nil {
			return err
		}
	}
	_, err := w.Write(footer)
	return err
}

type vhdLocator struct {
	code    string
	sectors uint32 // data space, in sectors as the spec says
	length  uint32
	offset  uint64
}

func vhdChecksum(b []byte) uint32 {
	var sum uint32
	for _, c := range b {
		sum += uint32(c)
	}
	return ^sum
}

func vhdFooter(diskType uint32, size int64, creator string, ts uint32, uid [16]byte) []byte {
	f := make([]byte, 512)
	copy(f[0:], "conectix")
	binary.BigEndian.PutUint32(f[8:], 2)
	binary.BigEndian.PutUint32(f[12:], 0x00010000)
	binary.BigEndian.PutUint64(f[16:], 512)
	binary.BigEndian.PutUint32(f[24:], ts)
	copy(f[28:32], creator)
	binary.BigEndian.PutUint32(f[32:], 0x00010000)
	copy(f[36:], "Wi2k")
	binary.BigEndian.PutUint64(f[40:], uint64(size))
	binary.BigEndian.PutUint64(f[48:], uint64(size))
	binary.BigEndian.PutUint32(f[56:], vhdGeometry(size))
	binary.BigEndian.PutUint32(f[60:], diskType)
	copy(f[68:84], uid[:])
	binary.BigEndian.PutUint32(f[64:], vhdChecksum(f))
	return f
}

// vhdGeometry is the spec's CHS algorithm: cylinders u16, heads u8,
// sectors per track u8.
func vhdGeometry(size int64) uint32 {
	total := size / 512
	if total > 65535*16*255 {
		total = 65535 * 16 * 255
	}
	var spt, heads, cth int64
	if total >= 65535*16*63 {
		spt, heads = 255, 16
		cth = total / spt
	} else {
		spt = 17
		cth = total / spt
		heads = max((cth+1023)/1024, 4)
		if cth >= heads*1024 || heads > 16 {
			spt, heads = 31, 16
			cth = total / spt
		}
		if cth >= heads*1024 {
			spt, heads = 63, 16
			cth = total / spt
		}
	}
	cyl := cth / heads
	return uint32(cyl)<<16 | uint32(heads)<<8 | uint32(spt)
}

func vhdHeader(entries uint32, parentUID [16]byte, parentName string, loc *vhdLocator) []byte {
	h := make([]byte, 1024)
	copy(h[0:], "cxsparse")
	binary.BigEndian.PutUint64(h[8:], ^uint64(0))
	binary.BigEndian.PutUint64(h[16:], vhdBATOffset)
	binary.BigEndian.PutUint32(h[24:], 0x00010000)
	binary.BigEndian.PutUint32(h[28:], entries)
	binary.BigEndian.PutUint32(h[32:], vhdBlockSize)
	copy(h[40:56], parentUID[:])
	// Parent timestamp (56) stays 0.
	name := utf16.Encode([]rune(parentName))
	for i, c := range name {
		if 64+2*i+2 > 576 {
			break
		}
		binary.BigEndian.PutUint16(h[64+2*i:], c)
	}
	if loc != nil {
		e := h[576:600]
		copy(e[0:4], loc.code)
		binary.BigEndian.PutUint32(e[4:], loc.sectors)
		binary.BigEndian.PutUint32(e[8:], loc.length)
		binary.BigEndian.PutUint64(e[16:], loc.offset)
	}
	binary.BigEndian.PutUint32(h[36:], vhdChecksum(h))
	return h
}

// track registers a hijacked connection so Close can end it; false when the
// server is closing.
func (s *Server) track(c net.Conn) bool {
	s.streamsMu.Lock()
	defer s.streamsMu.Unlock()
	if s.closed {
		return false
	}
	s.streams[c] = struct{}{}
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.streamsMu.Lock()
	defer s.streamsMu.Unlock()
	delete(s.streams, c)
}
