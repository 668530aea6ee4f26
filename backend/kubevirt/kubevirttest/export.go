package kubevirttest

import (
	"compress/gzip"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

const tokenName = "x-kubevirt-export-token"

// exportServer is one export pod: its own listener and rotatable certificate.
type exportServer struct {
	sim   *Server
	name  string
	files map[string]string // volume name -> file
	token func() (string, bool)
	ln    net.Listener
	http  *http.Server

	mu    sync.Mutex
	cert  tls.Certificate
	pem   []byte
	conns map[net.Conn]bool
}

func startExportServer(sim *Server, name string, files map[string]string, token func() (string, bool)) (*exportServer, error) {
	cert, pemBytes, err := newCert("virt-export-" + name + " CA")
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	e := &exportServer{sim: sim, name: name, files: files, token: token, ln: ln, cert: cert, pem: pemBytes, conns: map[net.Conn]bool{}}
	e.http = &http.Server{Handler: e, ErrorLog: log.New(io.Discard, "", 0), TLSConfig: &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		e.mu.Lock()
		defer e.mu.Unlock()
		c := e.cert
		return &c, nil
	}}, ConnState: e.track}
	go e.http.ServeTLS(ln, "", "") //nolint:errcheck // ends with close
	return e, nil
}

func (e *exportServer) close() { _ = e.http.Close() }

func (e *exportServer) url() string { return "https://" + e.ln.Addr().String() }

func (e *exportServer) certPEM() []byte {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.pem
}

func (e *exportServer) rotate() error {
	cert, pemBytes, err := newCert("virt-export-" + e.name + " CA")
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.cert, e.pem = cert, pemBytes
	// Established connections keep the old certificate; a real pod restart
	// drops them, so do the same.
	for c := range e.conns {
		_ = c.Close()
	}
	return nil
}

func (e *exportServer) track(c net.Conn, state http.ConnState) {
	e.mu.Lock()
	defer e.mu.Unlock()
	switch state {
	case http.StateNew:
		e.conns[c] = true
	case http.StateClosed, http.StateHijacked:
		delete(e.conns, c)
	}
}

func (e *exportServer) volumeNames() []string {
	names := make([]string, 0, len(e.files))
	for n := range e.files {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func (e *exportServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	e.sim.requests.Add(1)
	path := r.URL.Path
	// The external link goes through the export proxy, which strips this prefix.
	proxy := fmt.Sprintf("/api/%s/%s/namespaces/%s/virtualmachineexports/%s/", exportGroup, e.sim.opts.ExportVersion, e.sim.opts.Namespace, e.name)
	if strings.HasPrefix(path, proxy) {
		path = "/" + strings.TrimPrefix(path, proxy)
	}
	if path == "/exportready" {
		_, _ = io.WriteString(w, "OK")
		return
	}
	parts := strings.Split(strings.Trim(path, "/"), "/")
	if len(parts) != 3 {
		http.NotFound(w, r)
		return
	}
	file, ok := e.files[parts[1]]
	e.sim.mu.Lock()
	backup := e.sim.backup
	e.sim.mu.Unlock()
	var handler func(http.ResponseWriter, *http.Request, string)
	switch {
	case ok && parts[0] == "volumes" && parts[2] == "disk.img":
		handler = e.serveRaw
	case ok && parts[0] == "volumes" && parts[2] == "disk.img.gz":
		handler = e.serveGzip
	case ok && backup && parts[0] == "exports" && parts[2] == "map":
		handler = e.serveMap
	case ok && backup && parts[0] == "exports" && parts[2] == "data":
		handler = e.serveData
	default:
		http.NotFound(w, r)
		return
	}
	if !e.authorized(r) {
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	handler(w, r, file)
}

// authorized checks the query parameter first, then the header, and strips both.
func (e *exportServer) authorized(r *http.Request) bool {
	q := r.URL.Query()
	got := q.Get(tokenName)
	if got == "" {
		got = r.Header.Get(tokenName)
	}
	q.Del(tokenName)
	r.URL.RawQuery = q.Encode()
	r.Header.Del(tokenName)
	want, ok := e.token()
	return ok && got != "" && tokenEqual(got, want)
}

type countingWriter struct {
	http.ResponseWriter
	sim *Server
}

func (c countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.sim.diskBytes.Add(int64(n))
	return n, err
}

func (e *exportServer) serveRaw(w http.ResponseWriter, r *http.Request, file string) {
	f, err := os.Open(file)
	if err != nil {
		http.Error(w, "open failed", http.StatusInternalServerError)
		return
	}
	defer f.Close()
	http.ServeContent(countingWriter{w, e.sim}, r, "", time.Time{}, f)
}

func (e *exportServer) serveGzip(w http.ResponseWriter, r *http.Request, file string) {
	if r.Method != http.MethodGet {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	f, err := os.Open(file)
	if err != nil {
		http.Error(w, "open failed", http.StatusInternalServerError)
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "application/gzip")
	// Streamed: flushing the header first keeps net/http from adding a
	// Content-Length when the whole stream happens to fit its buffer.
	w.WriteHeader(http.StatusOK)
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
	gz := gzip.NewWriter(w)
	_, _ = io.Copy(gz, f)
	_ = gz.Close()
}

type mapExtent struct {
	Offset      uint64 `json:"offset"`
	Length      uint64 `json:"length"`
	Type        uint64 `json:"type"`
	Description string `json:"description"`
}

type mapPage struct {
	Extents    []mapExtent `json:"extents"`
	NextOffset *uint64     `json:"next_offset"`
}

func queryInt(r *http.Request, key string, def int64) (int64, error) {
	v := r.URL.Query().Get(key)
	if v == "" {
		return def, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("bad %s", key)
	}
	return n, nil
}

// serveMap reports data/hole extents per 64 KiB chunk, page_size extents per page.
func (e *exportServer) serveMap(w http.ResponseWriter, r *http.Request, file string) {
	e.sim.mapQueries.Add(1)
	f, err := os.Open(file)
	if err != nil {
		http.Error(w, "open failed", http.StatusInternalServerError)
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		http.Error(w, "stat failed", http.StatusInternalServerError)
		return
	}
	size := fi.Size()
	off, err1 := queryInt(r, "offset", 0)
	length, err2 := queryInt(r, "length", size)
	pageSize, err3 := queryInt(r, "page_size", 512)
	if lim := int64(e.sim.opts.MapPageLimit); lim > 0 && pageSize > lim {
		pageSize = lim
	}
	if err1 != nil || err2 != nil || err3 != nil || pageSize == 0 || off > size {
		http.Error(w, "bad query", http.StatusBadRequest)
		return
	}
	end := min(size, off+length)
	page := mapPage{Extents: []mapExtent{}}
	buf := make([]byte, chunk)
	for pos := off; pos < end; {
		n := min(int64(chunk), end-pos)
		desc, typ := "data", uint64(0)
		if data := dataFrom(f, pos, size); data >= pos+n {
			// Whole chunks in a hole are one hole, found without reading.
			desc, typ = "hole", 3
			if data < end {
				n = (data - pos) / chunk * chunk
			} else {
				n = end - pos
			}
		} else {
			if _, err := f.ReadAt(buf[:n], pos); err != nil && err != io.EOF {
				http.Error(w, "read failed", http.StatusInternalServerError)
				return
			}
			if allZero(buf[:n]) {
				desc, typ = "hole", 3
			}
		}
		last := len(page.Extents) - 1
		if last >= 0 && page.Extents[last].Description == desc {
			page.Extents[last].Length += uint64(n)
		} else {
			if int64(len(page.Extents)) == pageSize {
				next := uint64(pos)
				page.NextOffset = &next
				break
			}
			page.Extents = append(page.Extents, mapExtent{Offset: uint64(pos), Length: uint64(n), Type: typ, Description: desc})
		}
		pos += n
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(page)
}

func (e *exportServer) serveData(w http.ResponseWriter, r *http.Request, file string) {
	f, err := os.Open(file)
	if err != nil {
		http.Error(w, "open failed", http.StatusInternalServerError)
		return
	}
	defer f.Close()
	fi, _ := f.Stat()
	off, err1 := queryInt(r, "offset", 0)
	length, err2 := queryInt(r, "length", fi.Size())
	if err1 != nil || err2 != nil || off > fi.Size() {
		http.Error(w, "bad query", http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	_, _ = io.Copy(countingWriter{w, e.sim}, io.NewSectionReader(f, off, min(length, fi.Size()-off)))
}
