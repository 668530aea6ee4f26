package httprange

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"mime"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// maxRangeHeader bounds the Range header of one request, in bytes: the
// ranges of a call that would not fit go in further requests, one after
// another. Go's http.Server (the Coriolis and KubeVirt exporters) refuses
// request headers past its MaxHeaderBytes, 1 MiB by default, and a proxy on
// the way may allow far less (nginx's default is 8 KiB a header line): a
// server that refuses a long header answers 400, 413 or 431, and the Disk
// then halves the ranges it puts in a request. 256 KiB holds 6,000 ranges
// or more: a cache fetch of 64 MiB of a disk written every other 4 KiB
// block (8,192 extents) is one request, not three in a row each costing
// the exporter's fixed half second at a million extents.
const maxRangeHeader = 256 << 10

// An answer to several ranges may spend, besides the bytes of the
// requested span, at most partFraming bytes on each part's framing (its
// boundary line and headers: http.ServeContent spends about 150) and
// answerSlack on a preamble and an epilogue: what is more is not an answer
// to what was asked, and is not read on.
const (
	partFraming = 8 << 10
	answerSlack = 64 << 10
)

// ErrRangesIgnored is a server's answer of status 200 to a request of
// several ranges: the whole resource (perhaps the whole disk), which is not
// read. The server does not do several ranges a request; a Disk then reads
// each run of touching pieces with a request of its own.
var ErrRangesIgnored = fmt.Errorf("%w: the server ignored a request of several ranges (status 200, the whole resource)", backend.ErrUnsupported)

// RangesRefusedError is a server's refusal (416, 400, 413 or 431) of a
// request of several ranges, all inside the resource: it, or a proxy on the
// way, does not take that many ranges or so long a header. A Disk then
// puts half as many ranges in a request, down to one.
type RangesRefusedError struct {
	Ranges      int          // in the refused request
	HeaderBytes int          // the length of its Range header
	Status      *StatusError // the answer, made safe
}

func (e *RangesRefusedError) Error() string {
	return fmt.Sprintf("request of %d ranges (a %d-byte Range header) refused: %v", e.Ranges, e.HeaderBytes, e.Status)
}

// Unwrap is backend.ErrUnsupported: the server does not take this request.
func (e *RangesRefusedError) Unwrap() error { return backend.ErrUnsupported }

// errBadAnswer marks an answer to several ranges, framed by the server as
// it meant to, that is not the answer asked for: parts out of order or
// missing, a part of other bytes or length, an encoding, another media
// type, a malformed part, a body that ends (cleanly) before it should. A
// cut connection or a timeout (the body's read fails) is not one. A Disk
// that still gets such an answer when a read's attempts are used up (a
// server that answers only the first range, a proxy that mangles
// multipart) reads with a request per run from then on: single ranges are
// checked as strictly.
var errBadAnswer = errors.New("answer to several ranges not as asked")

// mismatch is an errBadAnswer of the given text.
func mismatch(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{errBadAnswer}, args...)...)
}

// maskedError is an error whose message quoted what a server sent, made
// safe. It wraps what the error was (errBadAnswer, the transport's error),
// not the error itself, whose message is not.
type maskedError struct {
	text  string
	kinds []error
}

func (e *maskedError) Error() string   { return e.text }
func (e *maskedError) Unwrap() []error { return e.kinds }

// answerFault makes the fault of a failed read of an answer to several
// ranges, its text made safe: the parser's errors quote the server.
// transport is the error the body's own reads returned, if any.
func (c *Client) answerFault(err, transport error) *attemptError {
	m := &maskedError{text: c.Secrets.Peer([]byte(err.Error()))}
	if errors.Is(err, errBadAnswer) {
		m.kinds = append(m.kinds, errBadAnswer)
	}
	if transport != nil {
		m.kinds = append(m.kinds, transport)
	}
	return &attemptError{Kind: retryable, Err: m}
}

// checkPieces refuses pieces out of order, overlapping, or not inside a
// resource of size bytes.
func checkPieces(pieces []backend.Piece, size int64) error {
	for i, p := range pieces {
		if n := int64(len(p.Buf)); p.Off < 0 || size < 0 || p.Off > size || n > size-p.Off {
			return fmt.Errorf("%w: piece %d: %d bytes at %d of a %d-byte resource", backend.ErrInvalid, i, n, p.Off, size)
		}
	}
	return backend.CheckPieces(pieces)
}

// batch is how many of runs, from the first, one request carries: at most
// maxRanges (0: no such bound), and no more than a Range header of
// maxRangeHeader bytes holds; at least one.
func batch(runs []backend.PieceRun, maxRanges int) int {
	n := len("bytes=")
	for i, r := range runs {
		if maxRanges > 0 && i == maxRanges {
			return i
		}
		l := rangeSpecLen(r.Extent)
		if i > 0 {
			l++ // the comma
			if n+l > maxRangeHeader {
				return i
			}
		}
		n += l
	}
	return len(runs)
}

func rangeSpecLen(e extent.Extent) int {
	return len(strconv.FormatInt(e.Off, 10)) + 1 + len(strconv.FormatInt(e.End()-1, 10))
}

// rangeHeader is the Range header asking for ranges.
func rangeHeader(ranges []extent.Extent) string {
	b := []byte("bytes=")
	for i, e := range ranges {
		if i > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendInt(b, e.Off, 10)
		b = append(b, '-')
		b = strconv.AppendInt(b, e.End()-1, 10)
	}
	return string(b)
}

// ReadRanges fills pieces with bytes of url, a resource of size bytes, or
// returns an error; the pieces' contents are unspecified after an error.
// Pieces are in increasing order of Off and do not overlap; touching pieces
// are one range. One range is a plain Range request (ReadRangeVec); several
// go in one request (Range: bytes=a-b,c-d,...) answered with
// multipart/byteranges, in as many requests as keep each Range header
// within maxRangeHeader. A server that ignores several ranges (200) gives
// an error wrapping ErrRangesIgnored, one that refuses them a
// *RangesRefusedError: the caller decides what to do instead (a Disk reads
// with fewer ranges a request).
func (c *Client) ReadRanges(ctx context.Context, rawURL string, size int64, pieces []backend.Piece) error {
	if err := checkPieces(pieces, size); err != nil {
		return fmt.Errorf("read ranges: %w", err)
	}
	for runs := backend.PieceRuns(pieces); len(runs) > 0; {
		k := batch(runs, 0)
		if err := c.readRuns(ctx, rawURL, size, runs[:k]); err != nil {
			return err
		}
		runs = runs[k:]
	}
	return nil
}

// readRuns fills runs, checked and within one Range header, with one
// request.
func (c *Client) readRuns(ctx context.Context, rawURL string, size int64, runs []backend.PieceRun) error {
	if len(runs) == 1 {
		bufs := make([][]byte, len(runs[0].Pieces))
		for i, p := range runs[0].Pieces {
			bufs[i] = p.Buf
		}
		return c.ReadRangeVec(ctx, rawURL, size, bufs, runs[0].Off)
	}
	ranges := make([]extent.Extent, len(runs))
	var pieces []backend.Piece
	for i, r := range runs {
		ranges[i] = r.Extent
		pieces = append(pieces, r.Pieces...)
	}
	hdr := rangeHeader(ranges)
	op := fmt.Sprintf("read %s: %d ranges in bytes %d-%d", redactString(rawURL), len(ranges), ranges[0].Off, ranges[len(ranges)-1].End()-1)
	return c.retry(ctx, func() string { return op }, func(actx context.Context) *attemptError {
		// A fresh request each attempt: one is not reusable once sent.
		req, err := http.NewRequestWithContext(actx, http.MethodGet, rawURL, nil)
		if err != nil {
			return &attemptError{Kind: final, Err: fmt.Errorf("%w: build request: %w", backend.ErrInvalid, err)}
		}
		req.Header.Set("Range", hdr)
		// A transparently decompressed body would not match the ranges.
		req.Header.Set("Accept-Encoding", "identity")
		resp, aerr := c.send(actx, req)
		if aerr != nil {
			return aerr
		}
		// Closing a body not read to its end drops the connection rather
		// than drain it: a 200's whole disk is never read.
		defer resp.Body.Close()
		return c.checkRanges(resp, size, ranges, pieces, len(hdr))
	})
}

// checkRanges reads an answer to a request of several ranges into pieces,
// detecting every way it can differ from what was asked, as checkRange does
// for one range: nothing unchecked reaches the caller. What is accepted:
//
//   - 206 multipart/byteranges (readMultipartAnswer), with no
//     Content-Range of its own (RFC 9110 §15.3.7.2: it goes in the parts);
//   - 206 of one range from the first byte asked to the last, not
//     multipart: the server coalesced all the ranges (RFC 9110 §14.6); the
//     bytes between them are read and dropped.
//
// Neither may be encoded (Content-Encoding other than identity). A 200 (the
// whole resource) is not read: ErrRangesIgnored. 416, 400, 413 and 431 are
// a *RangesRefusedError, not retried: the same request meets the same
// limit. Other statuses are checkRange's.
func (c *Client) checkRanges(resp *http.Response, size int64, ranges []extent.Extent, pieces []backend.Piece, headerLen int) *attemptError {
	switch resp.StatusCode {
	case http.StatusPartialContent:
	case http.StatusOK:
		return &attemptError{Kind: final, Err: fmt.Errorf("%w: %d ranges asked", ErrRangesIgnored, len(ranges))}
	case http.StatusRequestedRangeNotSatisfiable, http.StatusBadRequest, http.StatusRequestEntityTooLarge, http.StatusRequestHeaderFieldsTooLarge:
		return &attemptError{Kind: final, Err: &RangesRefusedError{Ranges: len(ranges), HeaderBytes: headerLen, Status: c.statusError(resp).(*StatusError)}}
	default:
		return &attemptError{Kind: classify(resp.StatusCode, true), Err: c.statusError(resp)}
	}
	if ce := resp.Header.Get("Content-Encoding"); !identityEncoding(ce) || resp.Uncompressed {
		return c.answerFault(mismatch("Content-Encoding %q", ce), nil)
	}
	ct := resp.Header.Get("Content-Type")
	if !isMultipart(ct) {
		return c.checkCoalesced(resp, size, ranges, pieces)
	}
	mt, params, err := mime.ParseMediaType(ct)
	if err != nil {
		return c.answerFault(mismatch("Content-Type %q: %w", ct, err), nil)
	}
	if mt != "multipart/byteranges" {
		return c.answerFault(mismatch("Content-Type %q, not multipart/byteranges", ct), nil)
	}
	if cr := resp.Header.Values("Content-Range"); len(cr) > 0 {
		// Which of the two would be the truth?
		return c.answerFault(mismatch("a multipart answer with a Content-Range of its own (%q)", strings.Join(cr, ", ")), nil)
	}
	body := &bodyErrs{r: resp.Body}
	if err := readMultipartAnswer(body, params["boundary"], size, ranges, pieces); err != nil {
		return c.answerFault(body.judge(err), body.err)
	}
	return nil
}

// bodyErrs records the first error other than io.EOF that a body's reads
// returned: a fault of the transport (a cut connection, a timeout), not of
// what the server framed.
type bodyErrs struct {
	r   io.Reader
	err error
}

func (b *bodyErrs) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err != nil && err != io.EOF && b.err == nil {
		b.err = err
	}
	return n, err
}

// judge marks err, a failed read of an answer to several ranges, as a bad
// answer (errBadAnswer) when the body came whole: then the server framed
// what it sent that way (a part cut short, a malformed header line, no
// close delimiter before the end).
func (b *bodyErrs) judge(err error) error {
	if b.err == nil && !errors.Is(err, errBadAnswer) {
		return fmt.Errorf("%w: %w", errBadAnswer, err)
	}
	return err
}

// checkCoalesced reads a 206 of a single range answering several: the
// server coalesced them all, so it must run from the first range's first
// byte to the last range's last byte, and be exactly that long.
func (c *Client) checkCoalesced(resp *http.Response, size int64, ranges []extent.Extent, pieces []backend.Piece) *attemptError {
	crs := resp.Header.Values("Content-Range")
	if len(crs) != 1 {
		return c.answerFault(mismatch("%d Content-Range headers on a single-part answer", len(crs)), nil)
	}
	first, last, total, err := ParseContentRange(crs[0])
	if err != nil {
		return c.answerFault(mismatch("bad Content-Range %q: %w", crs[0], err), nil)
	}
	if total != size {
		return c.answerFault(mismatch("Content-Range total mismatch: %s, size %d", totalText(total), size), nil)
	}
	from, to := ranges[0].Off, ranges[len(ranges)-1].End()-1
	if first != from || last != to {
		// An answer of only the first range is common: servers that do
		// not do several ranges.
		return c.answerFault(mismatch("one range %d-%d answering %d ranges in bytes %d-%d", first, last, len(ranges), from, to), nil)
	}
	n := last - first + 1
	if resp.ContentLength >= 0 && resp.ContentLength != n {
		return c.answerFault(mismatch("Content-Length mismatch: got %d, asked %d", resp.ContentLength, n), nil)
	}
	f := filler{pieces: pieces}
	body := &bodyErrs{r: resp.Body}
	if got, err := f.fill(body, first, last+1); err != nil {
		if err == io.EOF {
			return c.answerFault(body.judge(fmt.Errorf("short body: got %d of %d bytes", got, n)), body.err)
		}
		return c.answerFault(body.judge(fmt.Errorf("read body after %d of %d bytes: %w", got, n, err)), body.err)
	}
	var extra [1]byte
	if m, _ := io.ReadFull(resp.Body, extra[:]); m > 0 {
		return c.answerFault(mismatch("long body: more than %d bytes", n), nil)
	}
	return nil
}

// readMultipartAnswer reads body, a multipart/byteranges answer with the
// given boundary to a request of ranges (ascending, not overlapping) of a
// resource of size bytes, into pieces, which lie end to end in the ranges
// and cover them. It returns nil only when every byte of every piece came
// from the answer; its errors quote the answer, for the caller to make safe.
// Those that say the answer is not what was asked wrap errBadAnswer.
//
// Each part needs one Content-Range, bytes first-last/size. Parts come in
// the order of the ranges; a part begins at the first range not yet served
// and ends at the end of a range: of that one, or of a later one when the
// server coalesced several and the bytes between them (RFC 9110 §14.6), which
// are read and dropped. Each part is exactly its length, no part comes after
// the last range is served, and the close delimiter ends the answer after
// all of them. Parts are read raw (NextRawPart: NextPart would decode a
// quoted-printable part without a word); a part encoded in any way
// (Content-Encoding other than identity, Content-Transfer-Encoding other
// than binary, 8bit or 7bit) is refused. Other part headers (Content-Type)
// say nothing about the bytes and are not looked at. A preamble and an
// epilogue (RFC 2046) are read and dropped, within the answer's bound.
func readMultipartAnswer(body io.Reader, boundary string, size int64, ranges []extent.Extent, pieces []backend.Piece) error {
	if err := checkCover(ranges, pieces, size); err != nil {
		return err
	}
	if err := checkBoundary(boundary); err != nil {
		return err
	}
	// How much a true answer can be: the span of the ranges (a part may
	// carry a gap), each range's framing, a preamble and an epilogue.
	var limit int64 = answerSlack
	if len(ranges) > 0 {
		limit = addCapped(limit, ranges[len(ranges)-1].End()-ranges[0].Off)
		limit = addCapped(limit, int64(len(ranges))*partFraming)
	}
	bounded := &boundedReader{r: body, left: limit, limit: limit}
	mr := multipart.NewReader(bounded, boundary)
	f := filler{pieces: pieces}
	next := 0 // the first range not yet served
	for nth := 1; ; nth++ {
		part, err := mr.NextRawPart()
		if err == io.EOF { // not a wrapped EOF: that is a body cut before the close delimiter
			break
		}
		if err != nil {
			return fmt.Errorf("part %d: %w", nth, err)
		}
		if next == len(ranges) {
			return mismatch("part %d after the %d ranges asked were served", nth, len(ranges))
		}
		first, last, err := partRange(part.Header, size)
		if err != nil {
			return fmt.Errorf("part %d: %w", nth, err)
		}
		if first != ranges[next].Off {
			return mismatch("part %d is bytes %d-%d; the next range asked is %d-%d", nth, first, last, ranges[next].Off, ranges[next].End()-1)
		}
		j := next
		for j < len(ranges) && ranges[j].End()-1 < last {
			j++
		}
		if j == len(ranges) || ranges[j].End()-1 != last {
			return mismatch("part %d is bytes %d-%d: it does not end where a range asked ends", nth, first, last)
		}
		n := last - first + 1
		got, err := f.fill(part, first, last+1)
		switch {
		case err == io.EOF: // the boundary came early
			return mismatch("part %d (bytes %d-%d): short: %d of %d bytes", nth, first, last, got, n)
		case err != nil:
			return fmt.Errorf("part %d (bytes %d-%d): read after %d of %d bytes: %w", nth, first, last, got, n, err)
		}
		var extra [1]byte
		switch m, err := part.Read(extra[:]); {
		case m > 0:
			return mismatch("part %d (bytes %d-%d): long: more than %d bytes", nth, first, last, n)
		case err != io.EOF:
			// multipart's part reader gives nothing only with an error:
			// io.EOF at the boundary, else a cut or a transport's error.
			if err == nil {
				err = io.ErrNoProgress
			}
			return fmt.Errorf("part %d (bytes %d-%d): after its bytes: %w", nth, first, last, err)
		}
		next = j + 1
	}
	if next < len(ranges) {
		return mismatch("%d of the %d ranges asked not served, from bytes %d-%d", len(ranges)-next, len(ranges), ranges[next].Off, ranges[next].End()-1)
	}
	// The rest of the epilogue (multipart may have read some ahead), read
	// so that the connection can carry the next request.
	if _, err := io.Copy(io.Discard, bounded); err != nil {
		return fmt.Errorf("after the close delimiter: %w", err)
	}
	return nil
}

// checkCover makes sure pieces lie end to end in ranges and cover them,
// ranges being ascending, apart and inside size: what the parser relies on
// to fill every piece, whoever calls it.
func checkCover(ranges []extent.Extent, pieces []backend.Piece, size int64) error {
	i := 0
	prevEnd := int64(0)
	for k, r := range ranges {
		if r.Len <= 0 || r.Off < prevEnd || r.Off > size || r.Len > size-r.Off {
			return fmt.Errorf("%w: range %d (%d bytes at %d) empty, out of order or outside %d bytes", backend.ErrInvalid, k, r.Len, r.Off, size)
		}
		for pos := r.Off; pos < r.End(); i++ {
			if i == len(pieces) || pieces[i].Off != pos || int64(len(pieces[i].Buf)) > r.End()-pos {
				return fmt.Errorf("%w: the pieces do not lie end to end in range %d (bytes %d-%d)", backend.ErrInvalid, k, r.Off, r.End()-1)
			}
			pos += int64(len(pieces[i].Buf))
			if len(pieces[i].Buf) == 0 {
				return fmt.Errorf("%w: an empty piece in range %d", backend.ErrInvalid, k)
			}
		}
		prevEnd = r.End()
	}
	if i != len(pieces) {
		return fmt.Errorf("%w: %d pieces outside the ranges", backend.ErrInvalid, len(pieces)-i)
	}
	return nil
}

// checkBoundary refuses a boundary RFC 2046 §5.1.1 does not allow: 1 to 70
// characters of its set, not ending in a space.
func checkBoundary(b string) error {
	if b == "" {
		return mismatch("multipart answer without a boundary")
	}
	if len(b) > 70 || b[len(b)-1] == ' ' || strings.TrimLeft(b, "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? ") != "" {
		return mismatch("boundary %q is not one RFC 2046 allows", b)
	}
	return nil
}

// partRange is the range a part's headers say it carries, with the checks
// of readMultipartAnswer.
func partRange(h textproto.MIMEHeader, size int64) (first, last int64, err error) {
	if ce := h.Values("Content-Encoding"); len(ce) > 0 && !identityEncoding(strings.Join(ce, ",")) {
		return 0, 0, mismatch("Content-Encoding %q", strings.Join(ce, ", "))
	}
	switch cte := h.Values("Content-Transfer-Encoding"); {
	case len(cte) > 1:
		return 0, 0, mismatch("%d Content-Transfer-Encoding headers", len(cte))
	case len(cte) == 1:
		switch strings.ToLower(strings.TrimSpace(cte[0])) {
		case "binary", "8bit", "7bit": // the bytes as they are
		default:
			return 0, 0, mismatch("Content-Transfer-Encoding %q", cte[0])
		}
	}
	crs := h.Values("Content-Range")
	if len(crs) != 1 {
		return 0, 0, mismatch("%d Content-Range headers", len(crs))
	}
	first, last, total, err := ParseContentRange(crs[0])
	if err != nil {
		return 0, 0, mismatch("bad Content-Range %q: %w", crs[0], err)
	}
	if total != size {
		return 0, 0, mismatch("Content-Range total mismatch: %s, size %d", totalText(total), size)
	}
	return first, last, nil
}

// filler fills pieces, in order, from answers carrying runs of the
// resource's bytes.
type filler struct {
	pieces []backend.Piece
	i      int // the first piece not yet filled
}

// fill reads bytes [off, end) of the resource from r: those of the pieces
// lying there into them, the others (gaps between ranges) dropped. It
// returns how many bytes it read, and io.EOF when r ended early. Pieces
// before off are filled already; none straddles off or end (the callers
// check that off and end are bounds of ranges).
func (f *filler) fill(r io.Reader, off, end int64) (int64, error) {
	pos := off
	for ; f.i < len(f.pieces) && f.pieces[f.i].Off < end; f.i++ {
		p := f.pieces[f.i]
		if p.Off < pos || int64(len(p.Buf)) > end-p.Off {
			return pos - off, fmt.Errorf("%w: piece at %d straddles bytes %d-%d", backend.ErrInvalid, p.Off, off, end-1)
		}
		if m, err := io.CopyN(io.Discard, r, p.Off-pos); err != nil {
			return pos - off + m, err
		}
		pos = p.Off
		m, err := readFull(r, p.Buf)
		pos += int64(m)
		if err != nil {
			return pos - off, err
		}
	}
	m, err := io.CopyN(io.Discard, r, end-pos)
	return pos - off + m, err
}

// readFull is io.ReadFull, except that it returns io.EOF whenever r ends
// before p is full, and any other error as it is: a part that ends early
// is told from a body cut short (io.ErrUnexpectedEOF from multipart or the
// transport).
func readFull(r io.Reader, p []byte) (int, error) {
	n, idle := 0, 0
	for n < len(p) {
		m, err := r.Read(p[n:])
		n += m
		switch {
		case n == len(p):
			return n, nil // an error with the last bytes comes back at the next Read
		case err != nil:
			return n, err
		case m > 0:
			idle = 0
		default:
			// io.ReadFull gives up after as many empty Reads.
			if idle++; idle == 100 {
				return n, io.ErrNoProgress
			}
		}
	}
	return n, nil
}

// boundedReader reads at most limit bytes of an answer; reading past them
// is an errBadAnswer.
type boundedReader struct {
	r           io.Reader
	left, limit int64
}

func (b *boundedReader) Read(p []byte) (int, error) {
	if b.left <= 0 {
		// Is there more? A true answer ends here.
		var one [1]byte
		if m, err := b.r.Read(one[:]); m > 0 {
			return 0, mismatch("answer longer than the %d bytes the ranges asked and their framing can take", b.limit)
		} else if err != nil {
			return 0, err
		}
		return 0, nil
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.r.Read(p)
	b.left -= int64(n)
	return n, err
}

func addCapped(a, b int64) int64 {
	if b > math.MaxInt64-a {
		return math.MaxInt64
	}
	return a + b
}
