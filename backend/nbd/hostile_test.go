package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/retry"
)

// fakeServer is an in-process NBD server: well-behaved by default, hostile
// through misbehave. It answers requests out of order, from a goroutine
// each, so the client's demultiplexing is exercised.
type fakeServer struct {
	t        *testing.T
	data     []byte
	xapi     bool // refuse STRUCTURED_REPLY and GO: EXPORT_NAME and simple replies, as xapi-nbd
	noZeroes bool // offer NBD_FLAG_NO_ZEROES
	// misbehave, when set, may answer a read itself (returning true); n
	// counts reads over all connections from 1.
	misbehave func(n int64, w *replyWriter, rq fakeReq) bool
	// status, when set, answers block status.
	status func(w *replyWriter, rq fakeReq)

	reads, conns atomic.Int64
	maxInFlight  atomic.Int64
	addr         string
}

type fakeReq struct {
	typ    uint16
	handle uint64
	off    uint64
	length uint32
}

type replyWriter struct {
	mu         sync.Mutex
	c          net.Conn
	structured bool
}

func (w *replyWriter) write(b ...[]byte) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, x := range b {
		_, _ = w.c.Write(x)
	}
}

func simpleHdr(errno uint32, handle uint64) []byte {
	b := make([]byte, 16)
	binary.BigEndian.PutUint32(b, magicSimple)
	binary.BigEndian.PutUint32(b[4:], errno)
	binary.BigEndian.PutUint64(b[8:], handle)
	return b
}

func chunkHdr(flags, typ uint16, handle uint64, n uint32) []byte {
	b := make([]byte, 20)
	binary.BigEndian.PutUint32(b, magicChunk)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], handle)
	binary.BigEndian.PutUint32(b[16:], n)
	return b
}

func dataChunk(flags uint16, handle, off uint64, data []byte) []byte {
	b := chunkHdr(flags, chunkOffsetData, handle, uint32(8+len(data)))
	b = binary.BigEndian.AppendUint64(b, off)
	return append(b, data...)
}

func holeChunk(flags uint16, handle, off uint64, n uint32) []byte {
	b := chunkHdr(flags, chunkOffsetHole, handle, 12)
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, n)
}

func errChunk(flags uint16, handle uint64, errno uint32, msg string) []byte {
	b := chunkHdr(flags, chunkErrBit|1, handle, uint32(6+len(msg)))
	b = binary.BigEndian.AppendUint32(b, errno)
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	return append(b, msg...)
}

func (s *fakeServer) start() {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(s.t, err)
	s.t.Cleanup(func() { l.Close() })
	s.addr = l.Addr().String()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.conns.Add(1)
			s.t.Cleanup(func() { c.Close() })
			go s.serve(c)
		}
	}()
}

func (s *fakeServer) serve(c net.Conn) {
	defer c.Close()
	var b []byte
	b = binary.BigEndian.AppendUint64(b, magicNBD)
	b = binary.BigEndian.AppendUint64(b, magicOpt)
	fl := uint16(flagFixedNewstyle)
	if s.noZeroes {
		fl |= flagNoZeroes
	}
	b = binary.BigEndian.AppendUint16(b, fl)
	c.Write(b)
	var cf [4]byte
	if _, err := io.ReadFull(c, cf[:]); err != nil {
		return
	}
	structured := false
	optReply := func(opt, rep uint32, data []byte) {
		var h []byte
		h = binary.BigEndian.AppendUint64(h, magicOptReply)
		h = binary.BigEndian.AppendUint32(h, opt)
		h = binary.BigEndian.AppendUint32(h, rep)
		h = binary.BigEndian.AppendUint32(h, uint32(len(data)))
		c.Write(append(h, data...))
	}
	tflags := uint16(tflagHasFlags | 2) // read-only
	for {
		var h [16]byte
		if _, err := io.ReadFull(c, h[:]); err != nil {
			return
		}
		opt := binary.BigEndian.Uint32(h[8:])
		data := make([]byte, binary.BigEndian.Uint32(h[12:]))
		if _, err := io.ReadFull(c, data); err != nil {
			return
		}
		switch {
		case opt == optStructuredRply && !s.xapi:
			structured = true
			optReply(opt, repAck, nil)
		case opt == optSetMetaContext && !s.xapi:
			d := binary.BigEndian.AppendUint32(nil, 7)
			optReply(opt, repMetaContext, append(d, metaAllocation...))
			optReply(opt, repAck, nil)
		case opt == optGo && !s.xapi:
			d := binary.BigEndian.AppendUint16(nil, infoExport)
			d = binary.BigEndian.AppendUint64(d, uint64(len(s.data)))
			d = binary.BigEndian.AppendUint16(d, tflags)
			optReply(opt, repInfo, d)
			optReply(opt, repAck, nil)
			s.transmit(c, structured)
			return
		case opt == optExportName:
			d := binary.BigEndian.AppendUint64(nil, uint64(len(s.data)))
			d = binary.BigEndian.AppendUint16(d, tflags)
			if !s.noZeroes {
				d = append(d, make([]byte, 124)...)
			}
			c.Write(d)
			s.transmit(c, structured)
			return
		default:
			optReply(opt, repErrUnsup, []byte("unsupported"))
		}
	}
}

func (s *fakeServer) transmit(c net.Conn, structured bool) {
	w := &replyWriter{c: c, structured: structured}
	var inFlight atomic.Int64
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		var h [28]byte
		if _, err := io.ReadFull(c, h[:]); err != nil {
			return
		}
		rq := fakeReq{typ: binary.BigEndian.Uint16(h[6:]), handle: binary.BigEndian.Uint64(h[8:]), off: binary.BigEndian.Uint64(h[16:]), length: binary.BigEndian.Uint32(h[24:])}
		if rq.typ == cmdDisc {
			return
		}
		n := inFlight.Add(1)
		for m := s.maxInFlight.Load(); n > m && !s.maxInFlight.CompareAndSwap(m, n); m = s.maxInFlight.Load() {
		}
		wg.Go(func() {
			time.Sleep(time.Duration(rand.N(2000)) * time.Microsecond) // out of order
			// Counted out before the answer goes: the client frees
			// its slot only once the answer arrived.
			inFlight.Add(-1)
			s.answer(w, rq)
		})
	}
}

func (s *fakeServer) answer(w *replyWriter, rq fakeReq) {
	if rq.typ == cmdBlockStatus && s.status != nil {
		s.status(w, rq)
		return
	}
	if rq.typ == cmdBlockStatus {
		b := chunkHdr(chunkFlagDone, chunkBlockStatus, rq.handle, 12)
		b = binary.BigEndian.AppendUint32(b, 7)
		b = binary.BigEndian.AppendUint32(b, rq.length)
		b = binary.BigEndian.AppendUint32(b, 0)
		w.write(b)
		return
	}
	if rq.typ != cmdRead || rq.off+uint64(rq.length) > uint64(len(s.data)) || rq.off%512 != 0 {
		w.write(simpleHdr(22, rq.handle)) // EINVAL, as xapi-nbd for unaligned reads
		return
	}
	n := s.reads.Add(1)
	if s.misbehave != nil && s.misbehave(n, w, rq) {
		return
	}
	d := s.data[rq.off : rq.off+uint64(rq.length)]
	if !w.structured {
		w.write(simpleHdr(0, rq.handle), d)
		return
	}
	// Two chunks, second first, the tail as a hole when it is zeros.
	half := uint32(len(d)/2) &^ 511
	var tail []byte
	if bytes.Count(d[half:], []byte{0}) == len(d[half:]) {
		tail = holeChunk(0, rq.handle, rq.off+uint64(half), uint32(len(d))-half)
	} else {
		tail = dataChunk(0, rq.handle, rq.off+uint64(half), d[half:])
	}
	w.write(tail, dataChunk(chunkFlagDone, rq.handle, rq.off, d[:half]))
}

func fakeData(size int) []byte {
	d := make([]byte, size)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range d {
		d[i] = byte(r.Uint32())
	}
	clear(d[size/2 : size/2+128<<10]) // a run of zeros for hole chunks
	return d
}

func newFake(t *testing.T, xapi bool) *fakeServer {
	s := &fakeServer{t: t, data: fakeData(4<<20 + 1536), xapi: xapi}
	s.start()
	return s
}

// TestFakeServer: the xapi dialect (no GO, no structured replies: the
// EXPORT_NAME fallback), and a structured server answering out of order,
// read concurrently under -race through several connections with several
// requests in flight each.
func TestFakeServer(t *testing.T) {
	for _, tc := range []struct {
		name           string
		xapi, noZeroes bool
	}{{"xapi", true, false}, {"xapi-nozeroes", true, true}, {"structured", false, true}} {
		t.Run(tc.name, func(t *testing.T) {
			s := &fakeServer{t: t, data: fakeData(4<<20 + 1536), xapi: tc.xapi, noZeroes: tc.noZeroes}
			s.start()
			cl, err := Dial(context.Background(), Options{Addr: s.addr, Export: "/vdi?session_id=OpaqueRef:x", Policy: fastPolicy})
			require.NoError(t, err)
			require.Equal(t, !tc.xapi, cl.Structured())
			require.Equal(t, !tc.xapi, cl.BlockStatus())
			var wg sync.WaitGroup
			for g := range 16 {
				wg.Go(func() {
					r := rand.New(rand.NewPCG(uint64(g), 9))
					for range 40 {
						off := r.IntN(len(s.data))
						n := 1 + r.IntN(min(len(s.data)-off, 300_000))
						p := make([]byte, n)
						if !assertNoErr(t, cl.ReadAt(context.Background(), p, int64(off))) {
							return
						}
						if !bytes.Equal(s.data[off:off+n], p) {
							t.Errorf("wrong bytes at [%d,+%d)", off, n)
							return
						}
					}
				})
			}
			wg.Wait()
			require.NoError(t, cl.Close())
			require.EqualValues(t, DefaultConnections, s.conns.Load(), "connections opened")
			require.Greater(t, s.maxInFlight.Load(), int64(1), "requests in flight on one connection")
			require.LessOrEqual(t, s.maxInFlight.Load(), int64(DefaultInFlight))
			require.ErrorIs(t, cl.ReadAt(context.Background(), make([]byte, 1), 0), backend.ErrUnavailable)
		})
	}
}

func assertNoErr(t *testing.T, err error) bool {
	if err != nil {
		t.Error(err)
		return false
	}
	return true
}

// hostile replies: each breaks one rule. Answered on every read, the read
// fails; answered once, the retry on a fresh connection returns the right
// bytes. Either way no wrong bytes come back.
var hostile = map[string]func(s *fakeServer, w *replyWriter, rq fakeReq){
	"short simple reply": func(s *fakeServer, w *replyWriter, rq fakeReq) {
		w.write(simpleHdr(0, rq.handle), s.data[rq.off:rq.off+uint64(rq.length)/2])
		w.c.Close()
	},
	"wrong handle": func(s *fakeServer, w *replyWriter, rq fakeReq) {
		w.write(simpleHdr(0, rq.handle+1000), s.data[rq.off:rq.off+uint64(rq.length)])
	},
	"bad magic": func(s *fakeServer, w *replyWriter, rq fakeReq) {
		b := simpleHdr(0, rq.handle)
		b[0] ^= 1
		w.write(b, s.data[rq.off:rq.off+uint64(rq.length)])
	},
	"wrong bytes then close": func(s *fakeServer, w *replyWriter, rq fakeReq) {
		w.write(simpleHdr(0, rq.handle), make([]byte, rq.length-1))
		w.c.Close()
	},
	"structured oversize chunk": func(s *fakeServer, w *replyWriter, rq fakeReq) {
		w.write(dataChunk(chunkFlagDone, rq.handle, rq.off, append(bytes.Clone(s.data[rq.off:rq.off+uint64(rq.length)]), make([]byte, 4096)...)))
	},
	"structured error mid-stream": func(s *fakeServer, w *replyWriter, rq fakeReq) {
		w.write(dataChunk(0, rq.handle, rq.off, s.data[rq.off:rq.off+uint64(rq.length)/2]), errChunk(chunkFlagDone, rq.handle, 5, "EIO"))
	},
	"structured overlapping chunks": func(s *fakeServer, w *replyWriter, rq fakeReq) {
		d := s.data[rq.off : rq.off+uint64(rq.length)]
		h := rq.length / 2
		w.write(dataChunk(0, rq.handle, rq.off, d[:h]), dataChunk(0, rq.handle, rq.off+uint64(h)-512, make([]byte, len(d)-int(h)+512)), chunkHdr(chunkFlagDone, chunkNone, rq.handle, 0))
	},
	"structured chunk outside request": func(s *fakeServer, w *replyWriter, rq fakeReq) {
		d := s.data[rq.off : rq.off+uint64(rq.length)]
		w.write(dataChunk(0, rq.handle, rq.off+512, d[512:]), dataChunk(chunkFlagDone, rq.handle, rq.off+uint64(rq.length), make([]byte, 512)))
	},
	"structured hole past request": func(s *fakeServer, w *replyWriter, rq fakeReq) {
		w.write(holeChunk(chunkFlagDone, rq.handle, rq.off, rq.length+512))
	},
	"structured incomplete": func(s *fakeServer, w *replyWriter, rq fakeReq) {
		d := s.data[rq.off : rq.off+uint64(rq.length)]
		w.write(dataChunk(0, rq.handle, rq.off, d[:len(d)-512]), chunkHdr(chunkFlagDone, chunkNone, rq.handle, 0))
	},
	"structured simple data reply": func(s *fakeServer, w *replyWriter, rq fakeReq) {
		w.write(simpleHdr(0, rq.handle), s.data[rq.off:rq.off+uint64(rq.length)])
	},
	"structured close mid-chunk": func(s *fakeServer, w *replyWriter, rq fakeReq) {
		c := dataChunk(chunkFlagDone, rq.handle, rq.off, s.data[rq.off:rq.off+uint64(rq.length)])
		w.write(c[:len(c)/2])
		w.c.Close()
	},
	"structured unknown chunk": func(s *fakeServer, w *replyWriter, rq fakeReq) {
		w.write(chunkHdr(chunkFlagDone, 77, rq.handle, 0))
	},
	"structured twice done": func(s *fakeServer, w *replyWriter, rq fakeReq) {
		c := dataChunk(chunkFlagDone, rq.handle, rq.off, s.data[rq.off:rq.off+uint64(rq.length)])
		w.write(c, c)
	},
	"simple EIO": func(s *fakeServer, w *replyWriter, rq fakeReq) {
		w.write(simpleHdr(5, rq.handle))
	},
}

func TestHostileServer(t *testing.T) {
	for name, bad := range hostile {
		for _, once := range []bool{false, true} {
			xapi := !bytes.HasPrefix([]byte(name), []byte("structured"))
			t.Run(name+map[bool]string{true: "/once", false: "/always"}[once], func(t *testing.T) {
				s := newFake(t, xapi)
				s.misbehave = func(n int64, w *replyWriter, rq fakeReq) bool {
					if once && n > 1 {
						return false
					}
					bad(s, w, rq)
					return true
				}
				cl, err := Dial(context.Background(), Options{Addr: s.addr, Connections: 2, Policy: fastPolicy})
				require.NoError(t, err)
				defer cl.Close()
				for _, r := range [][2]int{{0, 64 << 10}, {1000, 5000}, {3 << 20, 1 << 20}} {
					p := make([]byte, r[1])
					err := cl.ReadAt(context.Background(), p, int64(r[0]))
					if once {
						require.NoError(t, err)
						require.Equal(t, s.data[r[0]:r[0]+r[1]], p)
						continue
					}
					if err == nil && name == "structured twice done" {
						// The first answer was right; the second breaks
						// the connection, not the read.
						require.Equal(t, s.data[r[0]:r[0]+r[1]], p)
						continue
					}
					require.ErrorIs(t, err, backend.ErrUnavailable)
				}
			})
		}
	}
}

// TestServerErrors: EINVAL is the caller's fault, not retried.
func TestServerErrors(t *testing.T) {
	s := newFake(t, true)
	s.misbehave = func(n int64, w *replyWriter, rq fakeReq) bool {
		w.write(simpleHdr(22, rq.handle))
		return true
	}
	cl, err := Dial(context.Background(), Options{Addr: s.addr, Policy: fastPolicy})
	require.NoError(t, err)
	defer cl.Close()
	require.ErrorIs(t, cl.ReadAt(context.Background(), make([]byte, 512), 0), backend.ErrInvalid)
	require.EqualValues(t, 1, s.reads.Load(), "EINVAL retried")
}

// TestStall: a server that never answers costs the attempt, not the
// client: the read fails after the attempts, and Close does not hang.
func TestStall(t *testing.T) {
	s := newFake(t, true)
	s.misbehave = func(int64, *replyWriter, fakeReq) bool { return true }
	cl, err := Dial(context.Background(), Options{Addr: s.addr, Policy: retry.Policy{Attempts: 2, BaseDelay: time.Millisecond, AttemptTimeout: 100 * time.Millisecond}})
	require.NoError(t, err)
	err = cl.ReadAt(context.Background(), make([]byte, 4096), 0)
	require.ErrorIs(t, err, backend.ErrUnavailable)
	require.NoError(t, cl.Close())
}

// TestBlockStatus: the map comes from base:allocation (ZERO is left out,
// HOLE alone is not promised to read as zeros, so it stays data); a bad
// block status answer fails Dial instead of giving a wrong map.
func TestBlockStatus(t *testing.T) {
	type ext struct{ len, flags uint32 }
	for _, tc := range []struct {
		name string
		ctx  uint32
		exts []ext
		want []extent.Extent // nil: Dial fails
	}{
		{"map", 7, []ext{{1 << 20, 0}, {1 << 20, stateHole | stateZero}, {512, stateHole}, {1 << 20, stateZero}, {1<<20 + 1024, stateHole | stateZero}}, []extent.Extent{{Off: 0, Len: 1 << 20}, {Off: 2 << 20, Len: 512}}},
		{"last extent past the end", 7, []ext{{4096, 0}, {1 << 30, stateHole | stateZero}}, []extent.Extent{{Off: 0, Len: 4096}}},
		{"wrong context", 8, []ext{{1 << 20, 0}}, nil},
		{"zero-length extent", 7, []ext{{0, 0}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &fakeServer{t: t, data: make([]byte, 4<<20+1536)}
			s.status = func(w *replyWriter, rq fakeReq) {
				b := chunkHdr(chunkFlagDone, chunkBlockStatus, rq.handle, uint32(4+8*len(tc.exts)))
				b = binary.BigEndian.AppendUint32(b, tc.ctx)
				for _, e := range tc.exts {
					b = binary.BigEndian.AppendUint32(b, e.len)
					b = binary.BigEndian.AppendUint32(b, e.flags)
				}
				w.write(b)
			}
			s.start()
			cl, err := Dial(context.Background(), Options{Addr: s.addr, Policy: fastPolicy})
			if tc.want == nil {
				require.ErrorIs(t, err, backend.ErrUnavailable)
				return
			}
			require.NoError(t, err)
			defer cl.Close()
			require.Equal(t, tc.want, cl.Allocated().Extents())
		})
	}
}

// TestCancel: a read whose context ends gives up its connection; the next
// read works on a fresh one.
func TestCancel(t *testing.T) {
	s := newFake(t, false)
	s.misbehave = func(n int64, w *replyWriter, rq fakeReq) bool { return n == 1 } // never answers the first
	cl, err := Dial(context.Background(), Options{Addr: s.addr, Policy: fastPolicy})
	require.NoError(t, err)
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, cl.ReadAt(ctx, make([]byte, 4096), 0), context.DeadlineExceeded)
	p := make([]byte, 4096)
	require.NoError(t, cl.ReadAt(context.Background(), p, 0))
	require.Equal(t, s.data[:4096], p)
}
