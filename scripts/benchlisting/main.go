// Command benchlisting lets `rclone mount :http:` reach one disk of the
// simulator for scripts/bench.sh: rclone's http backend needs an HTML
// directory listing, which no platform serves, so this serves a one-link
// listing and forwards every other request (Range included) to the disk URL
// with the bearer token from a header file. It listens on loopback only.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "benchlisting:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) != 4 {
		return fmt.Errorf("usage: benchlisting DISK_URL CA_FILE HEADER_FILE ADDR_FILE")
	}
	target, err := url.Parse(args[0])
	if err != nil {
		return err
	}
	caPEM, err := os.ReadFile(args[1])
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("%s: no certificate", args[1])
	}
	header, err := os.ReadFile(args[2])
	if err != nil {
		return err
	}
	name, value, ok := strings.Cut(strings.TrimSpace(string(header)), ":")
	if !ok {
		return fmt.Errorf("%s: want one 'Name: value' line", args[2])
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	proxy := &httputil.ReverseProxy{
		Transport: tr,
		Rewrite: func(r *httputil.ProxyRequest) {
			r.Out.URL = target
			r.Out.Host = target.Host
			r.Out.Header.Set(name, strings.TrimSpace(value))
		},
	}
	file := target.Path[strings.LastIndexByte(target.Path, '/')+1:]
	mux := http.NewServeMux()
	mux.HandleFunc("/{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		fmt.Fprintf(w, "<html><body><a href=%q>%s</a></body></html>\n", file, file)
	})
	mux.Handle("/"+file, proxy)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	if err := os.WriteFile(args[3], []byte("http://"+ln.Addr().String()+"/"), 0o600); err != nil {
		return err
	}
	return http.Serve(ln, mux)
}
