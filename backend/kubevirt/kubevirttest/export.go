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

	"github.com/vmexportfs/vmexportfs/backend/internal/testpki"
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
	// backup is set for a VirtualMachineBackup export: only the map and
	// data routes exist.
	backup  *backupState
	created time.Time

	mu    sync.Mutex
	cert  tls.Certificate
	pem   []byte
	conns map[net.Conn]bool
}

func startExportServer(sim *Server, name string, files map[string]string, token func() (string, bool)) (*exportServer, error) {
	cert, pemBytes, err := exportCert(sim, name)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	e := &exportServer{sim: sim, name: name, files: files, token: token, ln: ln, cert: cert, pem: pemBytes, conns: map[net.Conn]bool{}, created: time.Now()}
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

// exportCert is an export server's certificate: loopback names, or the
// pod's service DNS names only with PodOnly.
func exportCert(sim *Server, name string) (tls.Certificate, []byte, error) {
	if sim.opts.PodOnly {
		svc := "virt-export-" + name + "." + sim.opts.Namespace + ".svc"
		return newCertFor("virt-export-"+name+" CA", testpki.Leaf{DNSNames: []string{svc, svc + ".cluster.local"}})
	}
	return newCert("virt-export-" + name + " CA")
}

func (e *exportServer) rotate() error {
	cert, pemBytes, err := exportCert(e.sim, e.name)
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
	if strings.HasPrefix(path, proxy) && !e.sim.opts.PodOnly {
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
	case ok && e.backup != nil && parts[0] == "exports" && parts[2] == "map":
		vol := parts[1]
		handler = func(w http.ResponseWriter, r *http.Request, file string) { e.serveBackupMap(w, r, vol, file) }
	case ok && e.backup != nil && parts[0] == "exports" && parts[2] == "data":
		handler = e.serveBackupData
	case e.backup != nil:
		http.NotFound(w, r)
		return
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

// authorized tries the query parameter, then the header (either may match,
// so a wrong query token with the right header passes), and strips both. As
// on the real server, an empty token file accepts requests with no token.
func (e *exportServer) authorized(r *http.Request) bool {
	q := r.URL.Query()
	fromQuery := q.Get(tokenName)
	fromHeader := r.Header.Get(tokenName)
	q.Del(tokenName)
	r.URL.RawQuery = q.Encode()
	r.Header.Del(tokenName)
	want, ok := e.token()
	return ok && (tokenEqual(fromQuery, want) || tokenEqual(fromHeader, want))
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

// openFile opens a volume's file, answering 500 when it cannot.
func openFile(w http.ResponseWriter, file string) (*os.File, bool) {
	f, err := os.Open(file)
	if err != nil {
		http.Error(w, "open failed", http.StatusInternalServerError)
		return nil, false
	}
	return f, true
}

// openSized is openFile with the file's size, answering 500 when it cannot
// stat it.
func openSized(w http.ResponseWriter, file string) (*os.File, int64, bool) {
	f, ok := openFile(w, file)
	if !ok {
		return nil, 0, false
	}
	fi, err := f.Stat()
	if err != nil {
		_ = f.Close()
		http.Error(w, "stat failed", http.StatusInternalServerError)
		return nil, 0, false
	}
	return f, fi.Size(), true
}

func (e *exportServer) serveRaw(w http.ResponseWriter, r *http.Request, file string) {
	f, ok := openFile(w, file)
	if !ok {
		return
	}
	defer f.Close()
	// The real server's type comes from the file extension.
	w.Header().Set("Content-Type", "application/x-raw-disk-image")
	http.ServeContent(countingWriter{w, e.sim}, r, "", time.Time{}, f)
}

func (e *exportServer) serveGzip(w http.ResponseWriter, r *http.Request, file string) {
	if r.Method != http.MethodGet {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	f, ok := openFile(w, file)
	if !ok {
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "application/x-gzip")
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

// add puts the n bytes at pos on the page, merged into the last extent when
// it has the same description. It is false, with NextOffset at pos, when
// that takes a new extent and the page already holds pageSize.
func (p *mapPage) add(pos, n int64, typ uint64, desc string, pageSize uint64) bool {
	last := len(p.Extents) - 1
	if last >= 0 && p.Extents[last].Description == desc {
		p.Extents[last].Length += uint64(n)
		return true
	}
	if uint64(len(p.Extents)) == pageSize {
		next := uint64(pos)
		p.NextOffset = &next
		return false
	}
	p.Extents = append(p.Extents, mapExtent{Offset: uint64(pos), Length: uint64(n), Type: typ, Description: desc})
	return true
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
	f, size, ok := openSized(w, file)
	if !ok {
		return
	}
	defer f.Close()
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
			desc, typ = "hole,zero", 3
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
				desc, typ = "hole,zero", 3
			}
		}
		if !page.add(pos, n, typ, desc, uint64(pageSize)) {
			break
		}
		pos += n
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(page)
}

func (e *exportServer) serveData(w http.ResponseWriter, r *http.Request, file string) {
	f, size, ok := openSized(w, file)
	if !ok {
		return
	}
	defer f.Close()
	off, err1 := queryInt(r, "offset", 0)
	length, err2 := queryInt(r, "length", size)
	if err1 != nil || err2 != nil || off > size {
		http.Error(w, "bad query", http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	_, _ = io.Copy(countingWriter{w, e.sim}, io.NewSectionReader(f, off, min(length, size-off)))
}
