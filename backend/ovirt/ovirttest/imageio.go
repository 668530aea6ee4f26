package ovirttest

import (
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// imageioVersion is the daemon the answers were recorded from.
const imageioVersion = "2.5.3"

// ticket is what the engine installed on the imageio daemon (and proxy)
// for one transfer: the ticket id in the URL is the only credential.
type ticket struct {
	id         string
	transferID string // what "Transfer=<id> expired" names
	v          view
	size       int64
	expires    time.Time
	conns      map[*connTrack]struct{} // connections that asked for this ticket, still open
	inflight   int                     // requests being served
	lastActive time.Time
	removed    bool // finalized or cancelled: in-flight reads stop
}

// connTrack follows one client connection across a hijack.
type connTrack struct {
	tickets map[*ticket]struct{}
}

// trackConn forgets a closed connection. The daemon and proxy call it.
func (s *Server) trackConn(ct *connTrack) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for tk := range ct.tickets {
		delete(tk.conns, ct)
	}
	clear(ct.tickets)
}

// rangeRE is imageio's Range syntax: one range, first mandatory (a suffix
// range parses but is refused), no spaces.
var rangeRE = regexp.MustCompile(`^bytes=(\d*)-(\d*)$`)

func (s *Server) imageioHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Server", "imageio/"+imageioVersion)
		s.serveImageio(w, r)
	})
}

// ioError is imageio's error answer: text/plain, one line. A 403 and a
// POST's 405 close the connection, as observed; the rest keep it.
func ioError(w http.ResponseWriter, status int, close bool, format string, args ...any) {
	msg := fmt.Sprintf(format, args...) + "\n"
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=UTF-8")
	h.Set("Content-Length", strconv.Itoa(len(msg)))
	if close {
		h.Set("Connection", "close")
	}
	w.WriteHeader(status)
	_, _ = w.Write([]byte(msg))
}

// ioJSON writes a JSON answer; imageio ends each with a newline.
func ioJSON(w http.ResponseWriter, body string) {
	body += "\n"
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write([]byte(body))
}

// serveImageio routes as imageio's server does: extents, checksum
// algorithms, checksum, then /images/(.*) takes everything else under
// /images/, so an unknown sub-path is an unknown ticket.
func (s *Server) serveImageio(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	var kind, id string
	switch {
	case p == "/info/":
		kind = "info"
	case strings.HasPrefix(p, "/images/"):
		rest := p[len("/images/"):]
		switch {
		case strings.HasSuffix(rest, "/extents"):
			kind, id = "extents", strings.TrimSuffix(rest, "/extents")
		case strings.HasSuffix(rest, "/checksum/algorithms"):
			kind, id = "algorithms", strings.TrimSuffix(rest, "/checksum/algorithms")
		case strings.HasSuffix(rest, "/checksum"):
			kind, id = "checksum", strings.TrimSuffix(rest, "/checksum")
		default:
			kind, id = "images", rest
		}
	default:
		ioError(w, http.StatusNotFound, false, "No handler for %s", pyRepr(p))
		return
	}
	allowed := map[string]string{"info": "GET", "extents": "GET", "algorithms": "GET", "checksum": "GET", "images": "OPTIONS GET PUT PATCH"}[kind]
	if !strings.Contains(" "+allowed+" ", " "+r.Method+" ") {
		if r.Method == http.MethodHead {
			// net/http drops a HEAD answer's body; the daemon sends it
			// (77 bytes here), which desynchronises clients that reuse the
			// connection.
			l, _ := r.Context().Value(listenerKey{}).(*listener)
			if l == nil {
				l = s.daemon
			}
			h := http.Header{"Server": {"imageio/" + imageioVersion}, "Content-Type": {"text/plain; charset=UTF-8"}}
			l.writeRaw(w, http.StatusMethodNotAllowed, h, fmt.Appendf(nil, "Method 'HEAD' not defined for %s\n", pyRepr(p)))
			return
		}
		ioError(w, http.StatusMethodNotAllowed, r.Method == http.MethodPost, "Method %s not defined for %s", pyRepr(r.Method), pyRepr(p))
		return
	}
	switch kind {
	case "info":
		ioJSON(w, fmt.Sprintf(`{"version": %q}`, imageioVersion))
		return
	case "algorithms":
		ioJSON(w, `{"algorithms": ["blake2b", "blake2s", "md5", "md5-sha1", "ripemd160", "sha1", "sha224", "sha256", "sha384", "sha3_224", "sha3_256", "sha3_384", "sha3_512", "sha512", "sha512_224", "sha512_256", "shake_128", "shake_256", "sm3"]}`)
		return
	}
	if id == "" {
		ioError(w, http.StatusBadRequest, false, "Ticket id is required")
		return
	}
	if kind == "images" && r.Method == http.MethodOptions && id == "*" {
		w.Header().Set("Allow", "OPTIONS,GET,PUT,PATCH")
		ioJSON(w, `{"features": ["checksum", "extents", "flush", "zero"]}`)
		return
	}
	tk, release, denied := s.openTicket(id, r)
	if denied != "" {
		ioError(w, http.StatusForbidden, true, "You are not allowed to access this resource: %s", denied)
		return
	}
	defer release()
	switch {
	case kind == "extents":
		s.serveExtents(w, r, tk)
	case kind == "checksum":
		s.serveChecksum(w, r)
	case r.Method == http.MethodOptions:
		w.Header().Set("Allow", "OPTIONS,GET")
		ioJSON(w, fmt.Sprintf(`{"features": ["checksum", "extents"], "max_readers": %d, "max_writers": %d}`, s.opts.MaxReaders, s.opts.MaxReaders))
	case r.Method == http.MethodGet:
		s.serveRead(w, r, tk)
	default: // PUT, PATCH: these tickets are read-only
		ioError(w, http.StatusForbidden, true, "You are not allowed to access this resource: Transfer=%s forbids write", tk.transferID)
	}
}

// openTicket checks the ticket and counts the request as activity on it
// (the engine's inactivity timer) and its connection as one of the
// ticket's. denied is the reason of a 403.
func (s *Server) openTicket(id string, r *http.Request) (*ticket, func(), string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tick()
	tk := s.tickets[id]
	if tk == nil {
		return nil, nil, "No such ticket " + id
	}
	now := s.opts.Clock()
	if !now.Before(tk.expires) {
		return nil, nil, fmt.Sprintf("Transfer=%s expired", tk.transferID)
	}
	if ct, ok := r.Context().Value(connKey{}).(*connTrack); ok && ct != nil {
		if _, seen := tk.conns[ct]; !seen {
			tk.conns[ct] = struct{}{}
			ct.tickets[tk] = struct{}{}
			s.stats.PeakConnections = max(s.stats.PeakConnections, len(tk.conns))
		}
	}
	tk.inflight++
	tk.lastActive = now
	return tk, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		tk.inflight--
		tk.lastActive = s.opts.Clock()
	}, ""
}

// serveRead is GET /images/<ticket> as imageio 2.5.3 answers it, broken
// open ranges at and past the end included.
func (s *Server) serveRead(w http.ResponseWriter, r *http.Request, tk *ticket) {
	h := w.Header()
	off, n := int64(0), tk.size
	spec, ranged := r.Header["Range"]
	if ranged {
		hdr := strings.Join(spec, ", ")
		m := rangeRE.FindStringSubmatch(hdr)
		if m == nil {
			ioError(w, http.StatusRequestedRangeNotSatisfiable, false, "Cannot satisfy range %s, invalid range or multiple ranges", pyRepr(hdr))
			return
		}
		if m[1] == "" {
			ioError(w, http.StatusRequestedRangeNotSatisfiable, false, "suffix-byte-range-spec not supported yet")
			return
		}
		first, err1 := strconv.ParseInt(m[1], 10, 64)
		if err1 != nil {
			ioError(w, http.StatusRequestedRangeNotSatisfiable, false, "Cannot satisfy range %s, invalid range or multiple ranges", pyRepr(hdr))
			return
		}
		off = first
		if m[2] == "" {
			n = tk.size - first // negative past the end, as imageio computes it
		} else {
			last, err := strconv.ParseInt(m[2], 10, 64)
			if err != nil {
				ioError(w, http.StatusRequestedRangeNotSatisfiable, false, "Cannot satisfy range %s, invalid range or multiple ranges", pyRepr(hdr))
				return
			}
			if first > last {
				ioError(w, http.StatusRequestedRangeNotSatisfiable, false, "Cannot satisfy range %s, first > last", pyRepr(hdr))
				return
			}
			n = last - first + 1
		}
		if off+n > tk.size {
			h.Set("Content-Range", fmt.Sprintf("bytes */%d", tk.size))
			ioError(w, http.StatusRequestedRangeNotSatisfiable, false, "Requested range out of allowed range")
			return
		}
	}
	h.Set("Content-Disposition", "attachment")
	if ranged {
		// With first past the size this is "bytes first-(size-1)/size",
		// as the daemon writes it before it fails.
		h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", off, off+n-1, tk.size))
	}
	if n < 0 {
		ioError(w, http.StatusBadRequest, false, "Requested %d bytes, available %d bytes", n, max(0, tk.size-off))
		return
	}
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Content-Length", strconv.FormatInt(n, 10))
	if ranged {
		w.WriteHeader(http.StatusPartialContent)
	} else {
		w.WriteHeader(http.StatusOK)
	}
	buf := make([]byte, min(n, 4<<20))
	for n > 0 {
		s.mu.Lock()
		gone := tk.removed
		s.mu.Unlock()
		if gone {
			// The engine removed the ticket: imageio aborts the
			// operation, the client sees the connection drop.
			panic(http.ErrAbortHandler)
		}
		b := buf[:min(n, int64(len(buf)))]
		if err := tk.v.read(b, off); err != nil {
			s.log.Error("imageio read", "ticket", tk.id, "err", err)
			panic(http.ErrAbortHandler)
		}
		k, err := w.Write(b)
		s.dataBytes.Add(int64(k))
		if err != nil {
			return
		}
		off, n = off+int64(k), n-int64(k)
	}
}

// serveExtents is GET /images/<ticket>/extents: the zero context only,
// these tickets are not dirty.
func (s *Server) serveExtents(w http.ResponseWriter, r *http.Request, tk *ticket) {
	ctx := "zero"
	if q := r.URL.Query(); q.Has("context") {
		ctx = q.Get("context")
	}
	switch ctx {
	case "zero":
	case "dirty":
		ioError(w, http.StatusNotFound, false, "Ticket does not support dirty extents")
		return
	default:
		ioError(w, http.StatusBadRequest, false, "Unsupported value %s for 'context', expecting one of ['dirty', 'zero']", pyRepr(ctx))
		return
	}
	var b strings.Builder
	b.WriteByte('[')
	for i, e := range tk.v.extents() {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, `{"start": %d, "length": %d, "zero": %t, "hole": %t}`, e.start, e.length, e.zero, e.hole)
	}
	b.WriteByte(']')
	s.mu.Lock()
	s.stats.ExtentsRequests++
	s.mu.Unlock()
	ioJSON(w, b.String())
}

// serveChecksum checks block_size as imageio does; the checksum itself is
// not simulated (imageio's default, blake2b, is not in Go's standard
// library, and nothing here needs it).
func (s *Server) serveChecksum(w http.ResponseWriter, r *http.Request) {
	if v := r.URL.Query().Get("block_size"); v != "" {
		bs, err := strconv.ParseInt(v, 10, 64)
		if err != nil || bs < 1<<20 || bs > 16<<20 {
			ioError(w, http.StatusBadRequest, false, "Block size out of allowed range: 1048576-16777216")
			return
		}
		if bs%4096 != 0 {
			ioError(w, http.StatusBadRequest, false, "Block size is not aligned to 4096")
			return
		}
	}
	ioError(w, http.StatusInternalServerError, false, "Checksum is not simulated")
}

// pyRepr quotes s as Python's repr does for plain strings, which is how
// imageio puts values in its messages.
func pyRepr(s string) string {
	if strings.Contains(s, "'") && !strings.Contains(s, `"`) {
		return `"` + s + `"`
	}
	return "'" + strings.ReplaceAll(strings.ReplaceAll(s, `\`, `\\`), "'", `\'`) + "'"
}
