package httprange

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"mime"
	"mime/quotedprintable"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/redact"
)

// trueByte is the byte at off of the test disks: a hash of the offset, so
// a byte from anywhere else is (almost always) told apart.
func trueByte(off int64) byte { return byte((uint64(off) * 0x9E3779B97F4A7C15) >> 56) }

func trueBytes(off, n int64) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = trueByte(off + int64(i))
	}
	return b
}

// trueDisk is an io.ReadSeeker of a disk of size bytes holding trueByte
// where alloc has data and zeros elsewhere, for http.ServeContent.
type trueDisk struct {
	size, pos int64
	alloc     *extent.Map // nil: all data
}

func (d *trueDisk) Read(p []byte) (int, error) {
	if d.pos >= d.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), d.size-d.pos))
	for i := range n {
		p[i] = trueByte(d.pos + int64(i))
	}
	if d.alloc != nil {
		d.alloc.ZeroHoles(p[:n], d.pos)
	}
	d.pos += int64(n)
	return n, nil
}

func (d *trueDisk) Seek(off int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		off += d.pos
	case io.SeekEnd:
		off += d.size
	}
	if off < 0 {
		return 0, errors.New("negative seek")
	}
	d.pos = off
	return off, nil
}

// want is what pieces read from a disk whose data is alloc (nil: all).
func want(alloc *extent.Map, p backend.Piece) []byte {
	b := trueBytes(p.Off, int64(len(p.Buf)))
	if alloc != nil {
		alloc.ZeroHoles(b, p.Off)
	}
	return b
}

// poisoned pieces hold the complement of the true bytes: a byte left
// unfilled never passes for a right one.
func poisoned(spec ...[2]int64) []backend.Piece {
	ps := make([]backend.Piece, len(spec))
	for i, s := range spec {
		ps[i] = backend.Piece{Off: s[0], Buf: trueBytes(s[0], s[1])}
		for j := range ps[i].Buf {
			ps[i].Buf[j] ^= 0xff
		}
	}
	return ps
}

// serveRanges serves a trueDisk with http.ServeContent, recording the
// Range header of every request.
type serveRanges struct {
	srv    *httptest.Server
	size   int64
	alloc  *extent.Map
	mu     chan struct{}
	ranges []string
	conns  atomic.Int32 // connections opened
}

func newServeRanges(t *testing.T, size int64, alloc *extent.Map) *serveRanges {
	s := &serveRanges{size: size, alloc: alloc, mu: make(chan struct{}, 1)}
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu <- struct{}{}
		s.ranges = append(s.ranges, r.Header.Get("Range"))
		<-s.mu
		http.ServeContent(w, r, "", time.Time{}, &trueDisk{size: s.size, alloc: s.alloc})
	}))
	s.srv.Config.ConnState = func(_ net.Conn, state http.ConnState) {
		if state == http.StateNew {
			s.conns.Add(1)
		}
	}
	t.Cleanup(s.srv.Close)
	return s
}

func (s *serveRanges) requests() []string {
	s.mu <- struct{}{}
	defer func() { <-s.mu }()
	return append([]string(nil), s.ranges...)
}

func (s *serveRanges) reset() {
	s.mu <- struct{}{}
	s.ranges = nil
	<-s.mu
}

// randomPieces makes n pieces in [0, size): runs of 1 to maxRun touching
// pieces of 1 to maxLen bytes, with gaps of 1 to maxGap bytes between runs.
func randomPieces(rng *rand.Rand, size int64, n, maxRun, maxLen, maxGap int) [][2]int64 {
	var spec [][2]int64
	off := rng.Int64N(int64(maxGap))
	for len(spec) < n {
		for range 1 + rng.IntN(maxRun) {
			l := 1 + rng.Int64N(int64(maxLen))
			if off+l > size || len(spec) == n {
				return spec
			}
			spec = append(spec, [2]int64{off, l})
			off += l
		}
		off += 1 + rng.Int64N(int64(maxGap))
	}
	return spec
}

// rangesOf is the Range headers a client must send for spec (a request
// for each header of at most maxRangeHeader bytes), computed apart from
// the code under test.
func rangesOf(spec [][2]int64, alloc *extent.Map) []string {
	var runs [][2]int64 // first, last
	for _, s := range spec {
		if alloc != nil && !alloc.Overlaps(s[0], s[1]) {
			continue
		}
		if len(runs) > 0 && runs[len(runs)-1][1]+1 == s[0] {
			runs[len(runs)-1][1] += s[1]
			continue
		}
		runs = append(runs, [2]int64{s[0], s[0] + s[1] - 1})
	}
	var hdrs []string
	var cur strings.Builder
	for _, r := range runs {
		spec := fmt.Sprintf("%d-%d", r[0], r[1])
		if cur.Len() > 0 && cur.Len()+1+len(spec) > maxRangeHeader {
			hdrs = append(hdrs, cur.String())
			cur.Reset()
		}
		if cur.Len() == 0 {
			cur.WriteString("bytes=" + spec)
		} else {
			cur.WriteString("," + spec)
		}
	}
	if cur.Len() > 0 {
		hdrs = append(hdrs, cur.String())
	}
	return hdrs
}

// TestReadRangesServeContent reads random piece sets from a real net/http
// server (http.ServeContent, as the Coriolis and KubeVirt exporters):
// byte-identical, in one request per call where the Range header fits,
// holes never asked for.
func TestReadRangesServeContent(t *testing.T) {
	const size = 64 << 20
	rng := rand.New(rand.NewPCG(1, 2))
	holes, err := extent.Normalize([]extent.Extent{{Off: 0, Len: 1 << 20}, {Off: 3 << 20, Len: 5 << 20}, {Off: 9<<20 + 17, Len: 100}, {Off: 20 << 20, Len: 44 << 20}}, size)
	require.NoError(t, err)
	for _, tc := range []struct {
		name     string
		alloc    *extent.Map
		spec     [][2]int64
		requests int
	}{
		{"two apart", nil, [][2]int64{{100, 10}, {5 << 20, 4096}}, 1},
		{"touching are one range", nil, [][2]int64{{100, 10}, {110, 20}, {130, 1}}, 1},
		{"random apart", nil, randomPieces(rng, size, 200, 1, 8192, 1<<18), 1},
		{"random touching", nil, randomPieces(rng, size, 300, 5, 4096, 1<<16), 1},
		{"one byte gaps", nil, randomPieces(rng, size, 100, 1, 10, 1), 1},
		{"holes", &holes, randomPieces(rng, 24<<20, 300, 3, 64<<10, 64<<10), 1},
		{"all in holes", &holes, [][2]int64{{1 << 20, 100}, {2 << 20, 4096}}, 0},
		{"all but one in holes", &holes, [][2]int64{{1 << 20, 100}, {2 << 20, 4096}, {4 << 20, 10}}, 1},
		{"many ranges", nil, randomPieces(rng, size, 5000, 1, 512, 8192), 1},
		{"very many ranges", nil, randomPieces(rng, size, 20000, 1, 64, 2048), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newServeRanges(t, size, tc.alloc)
			// Requests are counted: an answer of 20,000 parts can take
			// longer than fastPolicy's attempt on a busy machine, and a
			// retry would be one request (and connection) more.
			policy := fastPolicy()
			policy.AttemptTimeout = time.Minute
			c := &Client{HTTP: s.srv.Client(), Policy: policy}
			alloc := extent.Full(size)
			if tc.alloc != nil {
				alloc = *tc.alloc
			}
			d := c.Disk(s.srv.URL, size, alloc, DiskOptions{Name: "test disk", MultipleRanges: true})
			require.True(t, d.MultipleRanges())
			ps := poisoned(tc.spec...)
			require.NoError(t, d.ReadRanges(context.Background(), ps))
			for i, p := range ps {
				if !bytes.Equal(want(tc.alloc, p), p.Buf) {
					t.Fatalf("piece %d (%d bytes at %d): wrong bytes", i, len(p.Buf), p.Off)
				}
			}
			got, wantHdrs := s.requests(), rangesOf(tc.spec, tc.alloc)
			assert.Equal(t, wantHdrs, got, "the Range headers sent")
			if tc.requests > 0 {
				assert.Len(t, got, tc.requests)
			}
			for _, h := range got {
				assert.LessOrEqual(t, len(h), maxRangeHeader)
			}
			if tc.name == "very many ranges" {
				assert.Greater(t, len(got), 1, "split into requests of at most maxRangeHeader bytes of Range header")
			}
			assert.True(t, d.MultipleRanges(), "a server that answers several ranges keeps multi-range on")

			// The Client alone reads the same, holes and all.
			s.reset()
			ps = poisoned(tc.spec...)
			require.NoError(t, c.ReadRanges(context.Background(), s.srv.URL, size, ps))
			for i, p := range ps {
				if !bytes.Equal(want(tc.alloc, p), p.Buf) {
					t.Fatalf("client: piece %d (%d bytes at %d): wrong bytes", i, len(p.Buf), p.Off)
				}
			}
			assert.Equal(t, rangesOf(tc.spec, nil), s.requests())
			assert.EqualValues(t, 1, s.conns.Load(), "every answer read to its end: one connection carries all the requests")
		})
	}
}

func TestReadRangesOneRangeIsPlain(t *testing.T) {
	s := newServeRanges(t, 4096, nil)
	c := &Client{HTTP: s.srv.Client(), Policy: fastPolicy()}
	ps := poisoned([2]int64{10, 5}, [2]int64{15, 100})
	require.NoError(t, c.ReadRanges(context.Background(), s.srv.URL, 4096, ps))
	assert.Equal(t, []string{"bytes=10-114"}, s.requests())
	assert.Equal(t, trueBytes(15, 100), ps[1].Buf)
	// Nothing to read, nothing asked.
	s.reset()
	require.NoError(t, c.ReadRanges(context.Background(), s.srv.URL, 4096, nil))
	require.NoError(t, c.ReadRanges(context.Background(), s.srv.URL, 4096, []backend.Piece{{Off: 7}}))
	assert.Empty(t, s.requests())
}

func TestReadRangesInvalid(t *testing.T) {
	s := newServeRanges(t, 4096, nil)
	c := &Client{HTTP: s.srv.Client(), Policy: fastPolicy()}
	d := c.Disk(s.srv.URL, 4096, extent.Full(4096), DiskOptions{Name: "test disk", MultipleRanges: true})
	for _, tc := range []struct {
		name string
		spec [][2]int64
	}{
		{"overlapping", [][2]int64{{0, 10}, {5, 10}}},
		{"out of order", [][2]int64{{100, 10}, {0, 10}}},
		{"past the end", [][2]int64{{0, 10}, {4090, 10}}},
		{"negative", [][2]int64{{-1, 10}}},
		{"beyond", [][2]int64{{5000, 1}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.ErrorIs(t, c.ReadRanges(context.Background(), s.srv.URL, 4096, poisoned(tc.spec...)), backend.ErrInvalid)
			err := d.ReadRanges(context.Background(), poisoned(tc.spec...))
			require.ErrorIs(t, err, backend.ErrInvalid)
			assert.Contains(t, err.Error(), "test disk")
		})
	}
	assert.Empty(t, s.requests(), "refused before any request")
	require.NoError(t, d.Close())
	require.ErrorIs(t, d.ReadRanges(context.Background(), poisoned([2]int64{0, 1}, [2]int64{5, 1})), backend.ErrInvalid)
	assert.Empty(t, s.requests())
}

// The hostile answers below answer a request for mrSpec: three ranges,
// 100-109, 200-224 (two touching pieces) and 300-304, of a 4096-byte disk.
const mrSize = 4096

var mrSpec = [][2]int64{{100, 10}, {200, 20}, {220, 5}, {300, 5}}

const mrRange = "bytes=100-109,200-224,300-304"

// part is one part of a hand-made multipart answer.
type part struct {
	first, last int64
	cr          string // Content-Range; "" is the true one, "-" none
	headers     string // more header lines, each ending in CRLF
	body        []byte // nil: the true bytes
}

func okPart(first, last int64) part { return part{first: first, last: last} }

// multipartAnswer frames parts as a server does.
func multipartAnswer(boundary string, parts []part, closing bool) []byte {
	var b bytes.Buffer
	for _, p := range parts {
		fmt.Fprintf(&b, "\r\n--%s\r\n", boundary)
		switch p.cr {
		case "":
			fmt.Fprintf(&b, "Content-Range: bytes %d-%d/%d\r\n", p.first, p.last, mrSize)
		case "-":
		default:
			fmt.Fprintf(&b, "Content-Range: %s\r\n", p.cr)
		}
		b.WriteString("Content-Type: application/octet-stream\r\n")
		b.WriteString(p.headers)
		b.WriteString("\r\n")
		if p.body != nil {
			b.Write(p.body)
		} else {
			b.Write(trueBytes(p.first, p.last-p.first+1))
		}
	}
	if closing {
		fmt.Fprintf(&b, "\r\n--%s--\r\n", boundary)
	}
	return b.Bytes()[2:] // the first delimiter needs no CRLF before it
}

// writeMultipart writes a 206 multipart/byteranges answer of parts.
func writeMultipart(w http.ResponseWriter, parts []part, closing bool) {
	w.Header().Set("Content-Type", "multipart/byteranges; boundary=XyZ")
	w.WriteHeader(http.StatusPartialContent)
	w.Write(multipartAnswer("XyZ", parts, closing))
}

var trueParts = []part{okPart(100, 109), okPart(200, 224), okPart(300, 304)}

// hostile answers requests of several ranges with answer, and single
// ranges truthfully (for a Disk's fallback); it counts both.
type hostile struct {
	srv           *httptest.Server
	multi, single atomic.Int32
	badHeader     atomic.Value // string: a Range header the answer did not expect
}

func newHostile(t *testing.T, answer func(w http.ResponseWriter, r *http.Request)) *hostile {
	h := &hostile{}
	h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.Header.Get("Range"), ",") {
			h.multi.Add(1)
			if r.Header.Get("Accept-Encoding") != "identity" {
				h.badHeader.Store("Accept-Encoding " + r.Header.Get("Accept-Encoding"))
			}
			answer(w, r)
			return
		}
		h.single.Add(1)
		http.ServeContent(w, r, "", time.Time{}, &trueDisk{size: mrSize})
	}))
	t.Cleanup(h.srv.Close)
	return h
}

func checkTrue(t *testing.T, ps []backend.Piece) {
	t.Helper()
	for i, p := range ps {
		require.Equal(t, trueBytes(p.Off, int64(len(p.Buf))), p.Buf, "piece %d at %d", i, p.Off)
	}
}

func TestReadRangesHostile(t *testing.T) {
	qp := func(b []byte) []byte {
		var e bytes.Buffer
		w := quotedprintable.NewWriter(&e)
		w.Write(b)
		w.Close()
		return e.Bytes()
	}
	gz := func(b []byte) []byte {
		var z bytes.Buffer
		zw := gzip.NewWriter(&z)
		zw.Write(b)
		zw.Close()
		return z.Bytes()
	}
	const secret = "hunter2-password"
	// Faults that say nothing of how the server answers several ranges:
	// a Disk fails the read (after its retries) and keeps multi-range.
	transient := map[string]bool{"server error": true, "connection cut in a part": true, "stall in a part": true}
	for _, tc := range []struct {
		name   string
		answer func(w http.ResponseWriter, r *http.Request)
		want   string // in the error; "" when the answer is to be accepted
	}{
		{"true", func(w http.ResponseWriter, r *http.Request) { writeMultipart(w, trueParts, true) }, ""},
		{"out of order", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(200, 224), okPart(100, 109), okPart(300, 304)}, true)
		}, "the next range asked is 100-109"},
		{"overlapping", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), okPart(105, 224), okPart(300, 304)}, true)
		}, "part 2 is bytes 105-224"},
		{"outside the ranges", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), okPart(150, 160), okPart(200, 224), okPart(300, 304)}, true)
		}, "part 2 is bytes 150-160"},
		{"starting mid-range", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), okPart(205, 224), okPart(300, 304)}, true)
		}, "part 2 is bytes 205-224"},
		{"ending mid-range", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), okPart(200, 219), okPart(300, 304)}, true)
		}, "does not end where a range asked ends"},
		{"ending in a gap", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 150), okPart(200, 224), okPart(300, 304)}, true)
		}, "does not end where a range asked ends"},
		{"wrong total", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), {first: 200, last: 224, cr: "bytes 200-224/5000"}, okPart(300, 304)}, true)
		}, "total mismatch"},
		{"total unknown", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), {first: 200, last: 224, cr: "bytes 200-224/*"}, okPart(300, 304)}, true)
		}, "total unknown"},
		{"no Content-Range", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), {first: 200, last: 224, cr: "-"}, okPart(300, 304)}, true)
		}, "0 Content-Range headers"},
		{"two Content-Ranges", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), {first: 200, last: 224, headers: "Content-Range: bytes 200-224/4096\r\n"}, okPart(300, 304)}, true)
		}, "2 Content-Range headers"},
		{"garbage Content-Range, secret masked", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), {first: 200, last: 224, cr: "bytes " + secret + "\x1b[2J"}, okPart(300, 304)}, true)
		}, "malformed MIME header line"},
		{"unparseable Content-Range, secret masked", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), {first: 200, last: 224, cr: "bytes " + secret + "/4096"}, okPart(300, 304)}, true)
		}, "bad Content-Range"},
		{"connection cut in a part", func(w http.ResponseWriter, r *http.Request) {
			body := multipartAnswer("XyZ", trueParts, true)
			conn, bw, err := w.(http.Hijacker).Hijack()
			if err != nil {
				return
			}
			defer conn.Close()
			fmt.Fprintf(bw, "HTTP/1.1 206 Partial Content\r\nContent-Type: multipart/byteranges; boundary=XyZ\r\nContent-Length: %d\r\n\r\n", len(body))
			bw.Write(body[:bytes.Index(body, trueBytes(200, 25))+10])
			bw.Flush()
		}, "part 2 (bytes 200-224): read after 10 of 25 bytes: unexpected EOF"},
		{"stall in a part", func(w http.ResponseWriter, r *http.Request) {
			body := multipartAnswer("XyZ", trueParts, true)
			w.Header().Set("Content-Type", "multipart/byteranges; boundary=XyZ")
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(body[:bytes.Index(body, trueBytes(200, 25))+10])
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
			case <-time.After(5 * time.Second):
			}
		}, "part 2 (bytes 200-224): read after 10 of 25 bytes"},
		{"short part", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), {first: 200, last: 224, body: trueBytes(200, 20)}, okPart(300, 304)}, true)
		}, "short: 20 of 25 bytes"},
		{"long part", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), {first: 200, last: 224, body: trueBytes(200, 26)}, okPart(300, 304)}, true)
		}, "long: more than 25 bytes"},
		{"missing part", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), okPart(200, 224)}, true)
		}, "1 of the 3 ranges asked not served, from bytes 300-304"},
		{"extra part", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, append(trueParts[:3:3], okPart(300, 304)), true)
		}, "part 4 after the 3 ranges asked were served"},
		{"no parts", func(w http.ResponseWriter, r *http.Request) { writeMultipart(w, nil, true) }, "3 of the 3 ranges asked not served"},
		{"no boundary", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "multipart/byteranges")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(multipartAnswer("XyZ", trueParts, true))
		}, "without a boundary"},
		{"empty boundary", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", `multipart/byteranges; boundary=""`)
			w.WriteHeader(http.StatusPartialContent)
			w.Write(multipartAnswer("", trueParts, true))
		}, "without a boundary"},
		{"boundary RFC 2046 does not allow", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", `multipart/byteranges; boundary="a;b"`)
			w.WriteHeader(http.StatusPartialContent)
			w.Write(multipartAnswer("a;b", trueParts, true))
		}, "not one RFC 2046 allows"},
		{"without the closing boundary", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, trueParts, false)
		}, "part 3 (bytes 300-304): after its bytes: unexpected EOF"},
		{"cut in a part", func(w http.ResponseWriter, r *http.Request) {
			body := multipartAnswer("XyZ", trueParts, true)
			w.Header().Set("Content-Type", "multipart/byteranges; boundary=XyZ")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(body[:bytes.Index(body, trueBytes(200, 25))+10])
		}, "part 2 (bytes 200-224): read after 10 of 25 bytes: unexpected EOF"},
		{"quoted-printable part", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), {first: 200, last: 224, headers: "Content-Transfer-Encoding: quoted-printable\r\n", body: qp(trueBytes(200, 25))}, okPart(300, 304)}, true)
		}, `Content-Transfer-Encoding "quoted-printable"`},
		{"base64 part", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), {first: 200, last: 224, headers: "Content-Transfer-Encoding: base64\r\n"}, okPart(300, 304)}, true)
		}, `Content-Transfer-Encoding "base64"`},
		{"binary part", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), {first: 200, last: 224, headers: "Content-Transfer-Encoding: Binary\r\n"}, okPart(300, 304)}, true)
		}, ""},
		{"gzip part", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 109), {first: 200, last: 224, headers: "Content-Encoding: gzip\r\n", body: gz(trueBytes(200, 25))}, okPart(300, 304)}, true)
		}, `Content-Encoding "gzip"`},
		{"gzip answer", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Encoding", "gzip")
			w.Header().Set("Content-Type", "multipart/byteranges; boundary=XyZ")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(gz(multipartAnswer("XyZ", trueParts, true)))
		}, `Content-Encoding "gzip"`},
		{"multipart/mixed", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "multipart/mixed; boundary=XyZ")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(multipartAnswer("XyZ", trueParts, true))
		}, "not multipart/byteranges"},
		{"Content-Range on the multipart answer", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", "bytes 100-304/4096")
			writeMultipart(w, trueParts, true)
		}, "a Content-Range of its own"},
		{"preamble and epilogue", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "multipart/byteranges; boundary=XyZ")
			w.WriteHeader(http.StatusPartialContent)
			w.Write([]byte("This is a preamble.\r\n"))
			w.Write(multipartAnswer("XyZ", trueParts, true))
			w.Write([]byte("and an epilogue"))
		}, ""},
		{"endless epilogue", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, trueParts, true)
			w.Write(bytes.Repeat([]byte("x"), 200<<10))
		}, "answer longer than"},
		{"a part spanning two ranges", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 224), okPart(300, 304)}, true)
		}, ""},
		{"one part spanning all", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{okPart(100, 304)}, true)
		}, ""},
		{"a part spanning two ranges, short", func(w http.ResponseWriter, r *http.Request) {
			writeMultipart(w, []part{{first: 100, last: 224, body: trueBytes(100, 124)}, okPart(300, 304)}, true)
		}, "short: 124 of 125 bytes"},
		{"coalesced into one 206", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", "bytes 100-304/4096")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(trueBytes(100, 205))
		}, ""},
		{"coalesced, short", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", "bytes 100-304/4096")
			w.WriteHeader(http.StatusPartialContent)
			w.(http.Flusher).Flush()
			w.Write(trueBytes(100, 204))
		}, "short body: got 204 of 205 bytes"},
		{"coalesced, long", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", "bytes 100-304/4096")
			w.WriteHeader(http.StatusPartialContent)
			w.(http.Flusher).Flush()
			w.Write(trueBytes(100, 206))
		}, "long body"},
		{"coalesced, wrong total", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", "bytes 100-304/4097")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(trueBytes(100, 205))
		}, "total mismatch"},
		{"only the first range", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", "bytes 100-109/4096")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(trueBytes(100, 10))
		}, "one range 100-109 answering 3 ranges in bytes 100-304"},
		{"no Content-Range, not multipart", func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusPartialContent)
			w.Write(trueBytes(100, 205))
		}, "0 Content-Range headers"},
		{"server error", func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "disk on fire "+secret, http.StatusInternalServerError)
		}, "disk on fire"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHostile(t, tc.answer)
			secrets := &redact.Secrets{}
			secrets.Add(secret)
			c := &Client{HTTP: h.srv.Client(), Policy: fastPolicy(), Secrets: secrets}
			ps := poisoned(mrSpec...)
			err := c.ReadRanges(context.Background(), h.srv.URL, mrSize, ps)
			assert.Nil(t, h.badHeader.Load())
			if tc.want == "" {
				require.NoError(t, err)
				checkTrue(t, ps)
				assert.EqualValues(t, 1, h.multi.Load())
				return
			}
			require.Error(t, err)
			assert.ErrorIs(t, err, backend.ErrUnavailable)
			assert.Contains(t, err.Error(), tc.want)
			assert.NotContains(t, err.Error(), secret)
			assert.NotContains(t, err.Error(), "\x1b")
			assert.EqualValues(t, fastPolicy().Attempts, h.multi.Load(), "a bad answer is retried")
			assert.Zero(t, h.single.Load())

			// A Disk gets the right bytes all the same: a server whose
			// answers to several ranges are still wrong when the attempts
			// are used up is read one range a request; a 5xx is an error.
			h.multi.Store(0)
			d := c.Disk(h.srv.URL, mrSize, extent.Full(mrSize), DiskOptions{Name: "test disk", MultipleRanges: true})
			ps = poisoned(mrSpec...)
			err = d.ReadRanges(context.Background(), ps)
			if transient[tc.name] {
				require.ErrorIs(t, err, backend.ErrUnavailable)
				assert.Contains(t, err.Error(), "test disk")
				assert.True(t, d.MultipleRanges(), "a 5xx or a cut says nothing about several ranges")
				return
			}
			require.NoError(t, err)
			checkTrue(t, ps)
			assert.False(t, d.MultipleRanges())
			assert.EqualValues(t, fastPolicy().Attempts, h.multi.Load())
			assert.EqualValues(t, 3, h.single.Load(), "a request per run")
		})
	}
}

// TestReadRangesTransientBadAnswer: a bad answer once is retried with
// multi-range kept on.
func TestReadRangesTransientBadAnswer(t *testing.T) {
	var n atomic.Int32
	h := newHostile(t, func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1) == 1 {
			writeMultipart(w, []part{okPart(100, 109), okPart(200, 224)}, true)
			return
		}
		writeMultipart(w, trueParts, true)
	})
	c := &Client{HTTP: h.srv.Client(), Policy: fastPolicy()}
	d := c.Disk(h.srv.URL, mrSize, extent.Full(mrSize), DiskOptions{MultipleRanges: true})
	ps := poisoned(mrSpec...)
	require.NoError(t, d.ReadRanges(context.Background(), ps))
	checkTrue(t, ps)
	assert.True(t, d.MultipleRanges())
	assert.EqualValues(t, 2, h.multi.Load())
}

// TestReadRangesIgnored: a 200 to several ranges is not read (its body may
// be the whole disk): the Client says so, a Disk reads one range a request
// from then on.
func TestReadRangesIgnored(t *testing.T) {
	const huge = 1 << 30
	var sent atomic.Int64
	done := make(chan struct{}, 16)
	h := newHostile(t, func(w http.ResponseWriter, r *http.Request) {
		defer func() { done <- struct{}{} }()
		w.Header().Set("Content-Length", fmt.Sprint(huge))
		w.WriteHeader(http.StatusOK)
		chunk := make([]byte, 64<<10)
		for sent.Load() < huge {
			n, err := w.Write(chunk)
			sent.Add(int64(n))
			if err != nil {
				return
			}
		}
	})
	wait := func() {
		t.Helper()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the server is still sending the 200's body")
		}
	}
	c := &Client{HTTP: h.srv.Client(), Policy: fastPolicy()}
	err := c.ReadRanges(context.Background(), h.srv.URL, mrSize, poisoned(mrSpec...))
	require.ErrorIs(t, err, ErrRangesIgnored)
	require.ErrorIs(t, err, backend.ErrUnsupported)
	assert.EqualValues(t, 1, h.multi.Load(), "not retried")
	wait()
	assert.Less(t, sent.Load(), int64(64<<20), "the body was not read")

	sent.Store(0)
	d := c.Disk(h.srv.URL, mrSize, extent.Full(mrSize), DiskOptions{MultipleRanges: true})
	ps := poisoned(mrSpec...)
	require.NoError(t, d.ReadRanges(context.Background(), ps))
	checkTrue(t, ps)
	assert.False(t, d.MultipleRanges())
	assert.EqualValues(t, 2, h.multi.Load())
	assert.EqualValues(t, 3, h.single.Load())
	wait()
	assert.Less(t, sent.Load(), int64(64<<20), "the body was not read")
	// From then on, a run a request.
	ps = poisoned(mrSpec...)
	require.NoError(t, d.ReadRanges(context.Background(), ps))
	checkTrue(t, ps)
	assert.EqualValues(t, 2, h.multi.Load())
	assert.EqualValues(t, 6, h.single.Load())
}

// rangeCount is the number of ranges in a Range header.
func rangeCount(r *http.Request) int { return strings.Count(r.Header.Get("Range"), ",") + 1 }

// TestReadRangesRefused: a server (or proxy) that refuses many ranges a
// request gets half as many until it takes them; one that refuses even
// two is read a range a request.
func TestReadRangesRefused(t *testing.T) {
	spec := [][2]int64{{0, 10}, {100, 10}, {200, 10}, {300, 10}, {400, 10}, {500, 10}, {600, 10}, {700, 10}}
	for _, tc := range []struct {
		name       string
		status     int
		takes      int   // most ranges taken a request
		multi      []int // the ranges of the requests of several ranges, in order
		single     int32 // requests of one range
		stillMulti bool  // MultipleRanges after
		again      []int // a second read's requests of several ranges
	}{
		{"431 above 2", http.StatusRequestHeaderFieldsTooLarge, 2, []int{8, 4, 2, 2, 2, 2}, 0, true, []int{2, 2, 2, 2}},
		{"413 above 5", http.StatusRequestEntityTooLarge, 5, []int{8, 4, 4}, 0, true, []int{4, 4}},
		{"400 above 3", http.StatusBadRequest, 3, []int{8, 4, 2, 2, 2, 2}, 0, true, []int{2, 2, 2, 2}},
		{"416 always", http.StatusRequestedRangeNotSatisfiable, 1, []int{8, 4, 2}, 8, false, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var multi []int
			var single atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				n := rangeCount(r)
				if n == 1 {
					single.Add(1)
				} else {
					multi = append(multi, n) // requests are serial
				}
				if n > tc.takes {
					http.Error(w, "too many ranges", tc.status)
					return
				}
				http.ServeContent(w, r, "", time.Time{}, &trueDisk{size: mrSize})
			}))
			defer srv.Close()
			c := &Client{HTTP: srv.Client(), Policy: fastPolicy()}

			err := c.ReadRanges(context.Background(), srv.URL, mrSize, poisoned(spec...))
			var refused *RangesRefusedError
			require.ErrorAs(t, err, &refused)
			assert.Equal(t, 8, refused.Ranges)
			assert.Equal(t, tc.status, refused.Status.Code)
			assert.ErrorIs(t, err, backend.ErrUnsupported)
			assert.Equal(t, []int{8}, multi, "not retried")
			multi = nil

			d := c.Disk(srv.URL, mrSize, extent.Full(mrSize), DiskOptions{MultipleRanges: true})
			ps := poisoned(spec...)
			require.NoError(t, d.ReadRanges(context.Background(), ps))
			checkTrue(t, ps)
			assert.Equal(t, tc.multi, multi)
			assert.Equal(t, tc.single, single.Load())
			assert.Equal(t, tc.stillMulti, d.MultipleRanges())

			multi = nil
			single.Store(0)
			ps = poisoned(spec...)
			require.NoError(t, d.ReadRanges(context.Background(), ps))
			checkTrue(t, ps)
			assert.Equal(t, tc.again, multi, "the bound is kept")
		})
	}
}

// TestReadRangesDiskOptions: multi-range only where the platform's server
// does it, never on a query route; errors carry the disk's name and go
// through Explain.
func TestReadRangesDiskOptions(t *testing.T) {
	s := newServeRanges(t, mrSize, nil)
	c := &Client{HTTP: s.srv.Client(), Policy: fastPolicy()}
	off := c.Disk(s.srv.URL, mrSize, extent.Full(mrSize), DiskOptions{})
	assert.False(t, off.MultipleRanges())
	ps := poisoned(mrSpec...)
	require.NoError(t, off.ReadRanges(context.Background(), ps))
	checkTrue(t, ps)
	assert.Equal(t, []string{"bytes=100-109", "bytes=200-224", "bytes=300-304"}, s.requests())

	q := c.QueryDisk(s.srv.URL, mrSize, extent.Full(mrSize), DiskOptions{MultipleRanges: true})
	assert.False(t, q.MultipleRanges(), "a query route reads one range a request")
	assert.True(t, backend.MultipleRanges(c.Disk(s.srv.URL, mrSize, extent.Full(mrSize), DiskOptions{MultipleRanges: true})))

	explained := 0
	bad := c.Disk(s.srv.URL+"/gone", mrSize, extent.Full(mrSize), DiskOptions{Name: "named disk", MultipleRanges: true,
		Explain: func(err error) error { explained++; return fmt.Errorf("explained: %w", err) }})
	srvGone := httptest.NewServer(http.NotFoundHandler())
	defer srvGone.Close()
	bad.url = srvGone.URL
	err := bad.ReadRanges(context.Background(), poisoned(mrSpec...))
	require.ErrorIs(t, err, backend.ErrNotFound)
	assert.Contains(t, err.Error(), "explained: named disk: ")
	assert.Equal(t, 1, explained)
	assert.True(t, bad.MultipleRanges(), "a 404 says nothing about several ranges")
}

// TestRecordedKubeVirtAnswer: the real KubeVirt export server's answer to
// two ranges (bytes 0-9 and 1048576-1048585 of a 1 GiB sparse disk) is
// accepted, and the same answer to other ranges is not.
func TestRecordedKubeVirtAnswer(t *testing.T) {
	const dir = "testdata/kubevirt-exportserver"
	body, err := os.ReadFile(filepath.Join(dir, "get-multirange.b"))
	require.NoError(t, err)
	h, err := os.ReadFile(filepath.Join(dir, "get-multirange.h"))
	require.NoError(t, err)
	var ct string
	for _, l := range strings.Split(string(h), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.EqualFold(k, "content-type") {
			ct = strings.TrimSpace(v)
		}
	}
	mt, params, err := mime.ParseMediaType(ct)
	require.NoError(t, err)
	require.Equal(t, "multipart/byteranges", mt)
	const size = 1 << 30
	read := func(spec ...[2]int64) ([]backend.Piece, error) {
		ps := make([]backend.Piece, len(spec))
		var ranges []extent.Extent
		for i, s := range spec {
			ps[i] = backend.Piece{Off: s[0], Buf: bytes.Repeat([]byte{0xee}, int(s[1]))}
		}
		for _, r := range backend.PieceRuns(ps) {
			ranges = append(ranges, r.Extent)
		}
		return ps, readMultipartAnswer(bytes.NewReader(body), params["boundary"], size, ranges, ps)
	}
	ps, err := read([2]int64{0, 10}, [2]int64{1048576, 4}, [2]int64{1048580, 6})
	require.NoError(t, err)
	for _, p := range ps {
		assert.Equal(t, make([]byte, len(p.Buf)), p.Buf)
	}
	for _, spec := range [][][2]int64{
		{{0, 10}},
		{{0, 10}, {1048576, 11}},
		{{0, 9}, {1048576, 10}},
		{{0, 10}, {1048576, 10}, {2 << 20, 1}},
	} {
		_, err := read(spec...)
		assert.ErrorIs(t, err, errBadAnswer, "%v", spec)
	}
}

func TestBatch(t *testing.T) {
	var spec [][2]int64
	// More ranges than one header holds: each spec is 22 bytes.
	n := int64(2 * maxRangeHeader / 22)
	for i := range n {
		spec = append(spec, [2]int64{1_000_000_000 + i*1000, 10})
	}
	runs := backend.PieceRuns(poisoned(spec...))
	require.Len(t, runs, int(n))
	k := batch(runs, 0)
	ranges := make([]extent.Extent, k)
	for i := range ranges {
		ranges[i] = runs[i].Extent
	}
	hdr := rangeHeader(ranges)
	assert.LessOrEqual(t, len(hdr), maxRangeHeader)
	next := make([]extent.Extent, k+1)
	for i := range next {
		next[i] = runs[i].Extent
	}
	assert.Greater(t, len(rangeHeader(next)), maxRangeHeader, "as many as fit")
	assert.Equal(t, 7, batch(runs, 7))
	assert.Equal(t, 1, batch(runs[:1], 0))
	assert.Equal(t, "bytes=1000000000-1000000009,1000001000-1000001009", rangeHeader(ranges[:2]))
}

// FuzzMultipartAnswer parses answers to fuzzed ranges of a disk whose byte
// at off is trueByte(off). An answer is built from a script: its parts, each
// labelled with a range (one asked for, several coalesced, or any other)
// and a total, with or without Content-Range, duplicated headers,
// encodings, a missing CRLF before a delimiter, padding after one, a data
// length a few bytes off; a preamble, an epilogue, the close delimiter or
// not; read whole or a byte at a time, or failing. Each part's data is
// always the true bytes of the offsets it is labelled with: data that is
// not what its label says is a lie no client can see through, and raw
// fuzzed bytes would be nothing but that. Properties: the parser never
// panics, never reads far past what a true answer takes, accepts exactly
// the answers the script made right (a range asked at a time, in order,
// all of them, nothing else), and when it accepts, every piece holds the
// true bytes. A raw body, when given, replaces the script's: then only the
// first two properties can hold.
func FuzzMultipartAnswer(f *testing.F) {
	const size = 1 << 16
	const boundary = "97dc90bea7676ed37fc7736e86a01ed3aacaa7cdd9a8ad5f4028ef535c50"
	layouts := [][]byte{
		{10, 9},                         // one range
		{10, 9, 20, 29, 0, 4, 255, 255}, // touching pieces
		{0, 0, 1, 0, 1, 0, 1, 0},        // one-byte pieces a byte apart
		{200, 100, 5, 60, 7, 7, 0, 8, 90, 1, 3, 3},
	}
	// A part labelled with the next range asked, coalescing c more.
	next := func(c byte) []byte { return []byte{0, c << 2, 0, 0, 3, 0} }
	for _, layout := range layouts {
		_, ranges := fuzzPieces(layout, size)
		var true1, true2, hostile []byte
		for range ranges {
			true1 = append(true1, next(0)...)
		}
		for i := 0; i < len(ranges); i += 2 {
			true2 = append(true2, next(1)...)
		}
		f.Add(layout, true1, boundary, uint8(0), []byte(nil))
		f.Add(layout, true2, boundary, uint8(1), []byte(nil))
		f.Add(layout, true1, "B", uint8(2|1<<4|1<<5), []byte(nil)) // preamble, epilogue
		f.Add(layout, true1, boundary, uint8(3|1<<6), []byte(nil)) // no CRLF after the close delimiter
		f.Add(layout, true1, boundary, uint8(1<<3), []byte(nil))   // no close delimiter
		f.Add(layout, true1, boundary, uint8(4), []byte(nil))      // a timeout
		f.Add(layout, true1, "a;b", uint8(0), []byte(nil))         // a boundary RFC 2046 does not allow
		for _, bad := range [][]byte{
			{1, 0, 10, 9, 3, 0},  // bytes 10-19, explicitly
			{0, 0, 0, 0, 4, 0},   // a byte long
			{0, 0, 0, 0, 2, 0},   // a byte short
			{2, 0, 0, 0, 3, 0},   // total one more
			{4, 0, 0, 0, 3, 0},   // total *
			{8, 0, 0, 0, 3, 0},   // no Content-Range
			{16, 0, 0, 0, 3, 0},  // two
			{32, 0, 0, 0, 3, 4},  // quoted-printable
			{32, 0, 0, 0, 3, 7},  // gzip
			{32, 0, 0, 0, 3, 10}, // a line that is no header
			{40, 0, 0, 0, 3, 11}, // the Content-Range after the Content-Type: true
			{64, 0, 0, 0, 3, 0},  // no CRLF before the delimiter
			{128, 0, 0, 0, 3, 0}, // padding after the delimiter
			{0, 1, 0, 0, 3, 0},   // a range skipped
		} {
			hostile = append(append([]byte{}, true1...), bad...)
			f.Add(layout, hostile, boundary, uint8(0), []byte(nil))
			hostile = append(append([]byte{}, bad...), true1...)
			f.Add(layout, hostile, boundary, uint8(1), []byte(nil))
		}
		body, _ := scriptAnswer(true1, boundary, ranges, size, 0)
		f.Add(layout, []byte(nil), boundary, uint8(0), body)
		f.Add(layout, []byte(nil), boundary, uint8(2), body[:len(body)/2])
	}
	f.Fuzz(func(t *testing.T, layout, script []byte, boundary string, mode uint8, raw []byte) {
		pieces, ranges := fuzzPieces(layout, size)
		body, valid := scriptAnswer(script, boundary, ranges, size, mode)
		if len(raw) > 0 {
			body = raw
		}
		counted := &countingReader{r: bytes.NewReader(body)}
		var r io.Reader = counted
		switch mode & 7 % 5 {
		case 1:
			r = iotest.OneByteReader(r)
		case 2:
			r = iotest.HalfReader(r)
		case 3:
			r = iotest.DataErrReader(r)
		case 4:
			r = iotest.TimeoutReader(r)
		}
		err := readMultipartAnswer(r, boundary, size, ranges, pieces)
		var span int64
		if len(ranges) > 0 {
			span = ranges[len(ranges)-1].End() - ranges[0].Off
		}
		if limit := answerSlack + span + int64(len(ranges))*partFraming; counted.n > limit+1 {
			t.Fatalf("read %d bytes of an answer bound to %d", counted.n, limit)
		}
		if len(raw) > 0 {
			return
		}
		if valid && err != nil {
			t.Fatalf("refused a true answer: %v\n%q", err, body)
		}
		if !valid && err == nil {
			t.Fatalf("accepted a wrong answer\n%q", body)
		}
		if err != nil {
			return
		}
		for i, p := range pieces {
			if !bytes.Equal(p.Buf, trueBytes(p.Off, int64(len(p.Buf)))) {
				t.Fatalf("accepted wrong bytes in piece %d (%d bytes at %d)\n%q", i, len(p.Buf), p.Off, body)
			}
		}
	})
}

// partHeaders are the headers a script may add to a part, and whether a
// part with it is still one to accept.
var partHeaders = []struct {
	line string
	ok   bool
}{
	{"Content-Transfer-Encoding: binary", true},
	{"Content-Transfer-Encoding: 8bit", true},
	{"Content-Transfer-Encoding: 7bit", true},
	{"Content-Transfer-Encoding:  BINARY ", true},
	{"Content-Transfer-Encoding: quoted-printable", false},
	{"Content-Transfer-Encoding: base64", false},
	{"Content-Encoding: identity", true},
	{"Content-Encoding: gzip", false},
	{"Content-Type: text/plain", true},
	{"X-Junk: --B\t--", true},
	{"this line is no header", false},
	{"", false}, // the part's Content-Range (again, unless f&8 left it out)
	{"Content-Transfer-Encoding: binary\r\nContent-Transfer-Encoding: binary", false},
}

// scriptAnswer is the answer script describes to ranges of a disk of size
// bytes, 6 bytes a part, [f a b c d h]:
//
//   - f&1: labelled explicitly, bytes first = a<<8|b to first+c; else
//     with the range asked a&3 after the next one not yet served, coalescing
//     (a>>2)&3 more (past the last range asked: as explicitly);
//   - (f>>1)&3: its total is the size, one more, "*", or one less;
//   - f&8: no Content-Range; f&16: one more;
//   - f&32: partHeaders[h%len] added (the last: one more Content-Range);
//   - f&64: no CRLF before its delimiter (so the part before it runs on);
//   - f&128: padding (space and tab) after its delimiter, which RFC 2046
//     allows;
//   - d%7-3: how many bytes its data is longer than its label.
//
// mode&8: no close delimiter; mode&16: a preamble; mode&32: an epilogue;
// mode&64: no CRLF after the close delimiter. valid says whether the
// answer is one to accept (read by mode&7's reader).
func scriptAnswer(script []byte, boundary string, ranges []extent.Extent, size int64, mode uint8) ([]byte, bool) {
	valid := checkBoundary(boundary) == nil && mode&7%5 != 4
	var b bytes.Buffer
	if mode&16 != 0 {
		b.WriteString("A preamble, which is ignored.\r\n")
	}
	next := 0 // the first range not yet served, for valid
	for i := 0; i+6 <= len(script) && i < 6*256; i += 6 {
		f, a, bb, c, d, h := script[i], script[i+1], script[i+2], script[i+3], script[i+4], script[i+5]
		var first, last int64
		if k := next + int(a&3); f&1 == 0 && k < len(ranges) {
			first, last = ranges[k].Off, ranges[min(k+int(a>>2&3), len(ranges)-1)].End()-1
		} else {
			first = int64(a)<<8 | int64(bb)
			last = min(first+int64(c), size-1)
			if first > last {
				first = last
			}
		}
		if b.Len() > 0 && (f&64 == 0 || i == 0) {
			b.WriteString("\r\n")
		} else if b.Len() > 0 {
			valid = false // the part before runs on into this one
		}
		b.WriteString("--" + boundary)
		if f&128 != 0 {
			b.WriteString(" \t")
		}
		b.WriteString("\r\n")
		total := strconv.FormatInt(size, 10)
		switch f >> 1 & 3 {
		case 1:
			total, valid = strconv.FormatInt(size+1, 10), false
		case 2:
			total, valid = "*", false
		case 3:
			total, valid = strconv.FormatInt(size-1, 10), false
		}
		// The part's label, always that of its data: as many times as
		// the script says, one being right.
		cr := fmt.Sprintf("Content-Range: bytes %d-%d/%s\r\n", first, last, total)
		crs := 0
		if f&8 == 0 {
			b.WriteString(cr)
			crs++
		}
		if f&16 != 0 {
			b.WriteString(cr)
			crs++
		}
		b.WriteString("Content-Type: application/x-raw-disk-image\r\n")
		if f&32 != 0 {
			switch ph := partHeaders[int(h)%len(partHeaders)]; ph.line {
			case "":
				b.WriteString(cr)
				crs++
			default:
				b.WriteString(ph.line + "\r\n")
				valid = valid && ph.ok
			}
		}
		if crs != 1 {
			valid = false
		}
		b.WriteString("\r\n")
		n := last - first + 1 + int64(d%7) - 3
		if n != last-first+1 {
			valid = false
		}
		b.Write(trueBytes(first, max(n, 0)))
		// Where a true answer is: the next part begins at the next range
		// asked and ends at the end of one.
		if next < len(ranges) && first == ranges[next].Off {
			j := next
			for j < len(ranges) && ranges[j].End()-1 < last {
				j++
			}
			if j < len(ranges) && ranges[j].End()-1 == last {
				next = j + 1
				continue
			}
		}
		valid = false
	}
	if next < len(ranges) {
		valid = false
	}
	if mode&8 != 0 {
		valid = false
	} else {
		if b.Len() > 0 {
			b.WriteString("\r\n")
		}
		b.WriteString("--" + boundary + "--")
		if mode&64 == 0 || mode&32 != 0 {
			b.WriteString("\r\n")
		}
	}
	if mode&32 != 0 {
		b.WriteString("An epilogue, which is ignored too.")
	}
	return b.Bytes(), valid
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// fuzzPieces turns layout into poisoned pieces of a disk of size bytes, two
// bytes a piece (the gap before it, 0 for touching, and its length less
// one), at most 64, and the ranges they make.
func fuzzPieces(layout []byte, size int64) ([]backend.Piece, []extent.Extent) {
	var spec [][2]int64
	off := int64(0)
	for i := 0; i+1 < len(layout) && len(spec) < 64; i += 2 {
		off += int64(layout[i])
		n := int64(layout[i+1]) + 1
		if off+n > size {
			break
		}
		spec = append(spec, [2]int64{off, n})
		off += n
	}
	pieces := poisoned(spec...)
	var ranges []extent.Extent
	for _, r := range backend.PieceRuns(pieces) {
		ranges = append(ranges, r.Extent)
	}
	return pieces, ranges
}
