package xapitest

// The NBD half of the simulator: a server that speaks the dialect of
// xapi-nbd (xapi-project/nbd lib/server.ml, as run by xen-api ocaml/nbd),
// not the NBD protocol at large. Where xapi-nbd differs from what a modern
// server does, this server does what xapi-nbd does, because the point is to
// prove that a client copes with xapi-nbd:
//
//   - the handshake advertises FIXED_NEWSTYLE only (no NO_ZEROES), so
//     EXPORT_NAME is answered with the 124 zero bytes;
//   - only EXPORT_NAME, ABORT, LIST and STARTTLS are known; INFO, GO,
//     STRUCTURED_REPLY and the rest are "unsupported", so there are no
//     structured replies and no block status; LIST is refused by policy
//     (xapi-nbd offers no export list), which is what stops qemu-img;
//   - error replies to options carry no message;
//   - the command word is read as 32 bits, so a command with any flag set
//     is unknown (EINVAL), as is everything but READ, WRITE and DISC;
//   - requests on a connection are served one at a time, in order.
//
// Deliberate departures, each noted where it happens: reads past the end
// and reads over maxNBDRead get EINVAL (xapi-nbd sends a success header and
// then drops the connection), a refused WRITE's payload is consumed (xapi-nbd
// leaves it in the stream and loses sync). The limit of MaxConns, and that a
// connection over it is closed before the greeting, is this simulator's
// model of the dom0 limit (16 per host), not read from xapi-nbd's sources.

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"
)

// NBD protocol numbers (doc/proto.md of the NBD project); the client's copy
// lives unexported in backend/nbd.
const (
	nbdMagic         = 0x4e42444d41474943 // "NBDMAGIC"
	nbdOptMagic      = 0x49484156454f5054 // "IHAVEOPT"
	nbdOptReplyMagic = 0x0003e889045565a9
	nbdRequestMagic  = 0x25609513
	nbdSimpleMagic   = 0x67446698

	nbdFlagFixedNewstyle = 1 << 0 // handshake and client flags
	nbdFlagNoZeroes      = 1 << 1

	nbdOptExportName = 1
	nbdOptAbort      = 2
	nbdOptList       = 3
	nbdOptStartTLS   = 5

	nbdRepAck        = 1
	nbdRepErrUnsup   = 1<<31 + 1
	nbdRepErrPolicy  = 1<<31 + 2
	nbdRepErrInvalid = 1<<31 + 3
	nbdRepErrTLSReqd = 1<<31 + 5

	nbdTFlagHasFlags = 1 << 0
	nbdTFlagReadOnly = 1 << 1

	nbdCmdRead  = 0
	nbdCmdWrite = 1
	nbdCmdDisc  = 2

	nbdEPERM  = 1
	nbdEIO    = 5
	nbdEINVAL = 22

	// nbdSector is the block device's sector size: xapi-nbd refuses reads
	// that are not whole sectors.
	nbdSector = 512
	// maxNBDRead bounds one read; xapi-nbd has no bound, but a test server
	// must not allocate whatever a request asks for.
	maxNBDRead = 32 << 20
	// maxNBDOpt bounds an option's payload for the same reason; names are
	// at most 4096 bytes by the protocol.
	maxNBDOpt = 64 << 10
	// defaultNBDConns is xapi-nbd's limit of connections per host.
	defaultNBDConns = 16
	// nbdTLSTimeout bounds the TLS handshake so a client that sends
	// STARTTLS and then nothing does not hold a slot for ever.
	nbdTLSTimeout = 30 * time.Second
)

// nbdConfig configures an NBD server.
type nbdConfig struct {
	TLS      *tls.Config // nil: no TLS (network purpose insecure_nbd); else FORCEDTLS
	MaxConns int         // connections per host at once; default 16
	// Lookup is called on NBD_OPT_EXPORT_NAME with the export name as sent; it returns the disk bytes
	// and a release func the server calls when that connection ends. An error makes the server drop the connection.
	Lookup func(export string) (ra io.ReaderAt, size int64, release func(), err error)
	Logger *slog.Logger // nil discards
	// NoZeroes advertises NBD_FLAG_NO_ZEROES, as most NBD servers do but
	// xapi-nbd does not; when the client accepts it the 124 zero bytes
	// after EXPORT_NAME are left out.
	NoZeroes bool
}

// nbdStats counts what the server saw.
type nbdStats struct {
	Conns   int   // open now, from accept until close
	Peak    int   // most open at once
	Refused int   // connections closed at once because MaxConns were open
	Bytes   int64 // READ payload sent
}

// nbdServer is one host's xapi-nbd.
type nbdServer struct {
	cfg nbdConfig
	log *slog.Logger
	ln  net.Listener
	wg  sync.WaitGroup // the accept loop and every connection

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	st     nbdStats
}

// newNBDServer listens on 127.0.0.1:0 and serves in goroutines until Close.
func newNBDServer(cfg nbdConfig) (*nbdServer, error) {
	if cfg.Lookup == nil {
		return nil, errors.New("xapitest: nbd: no Lookup")
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = defaultNBDConns
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("xapitest: nbd: listen: %w", err)
	}
	s := &nbdServer{cfg: cfg, log: log.With("component", "xapi-nbd"), ln: ln, conns: make(map[net.Conn]struct{})}
	s.wg.Add(1)
	go s.acceptLoop()
	return s, nil
}

// Addr is the listening address, "127.0.0.1:PORT".
func (s *nbdServer) Addr() string { return s.ln.Addr().String() }

// Close stops listening, closes every connection (which ends the
// goroutines blocked on them) and waits for the goroutines. Calling it
// again is harmless.
func (s *nbdServer) Close() error {
	err := s.ln.Close()
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

func (s *nbdServer) stats() nbdStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st
}

func (s *nbdServer) acceptLoop() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			// Transient (EMFILE and the like): a test server can
			// afford to wait a little and try again.
			s.log.Warn("accept", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if !s.admit(c) {
			c.Close()
			continue
		}
		s.wg.Add(1)
		go s.serve(c)
	}
}

// admit registers c, or refuses it when the server is closed or MaxConns
// are open: xapi-nbd's dom0 cannot plug more disks, and a client learns it
// from a connection closed before the greeting.
func (s *nbdServer) admit(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if len(s.conns) >= s.cfg.MaxConns {
		s.st.Refused++
		s.log.Info("connection refused: too many", "remote", c.RemoteAddr(), "open", len(s.conns))
		return false
	}
	s.conns[c] = struct{}{}
	s.st.Conns = len(s.conns)
	s.st.Peak = max(s.st.Peak, s.st.Conns)
	return true
}

func (s *nbdServer) forget(c net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
	s.st.Conns = len(s.conns)
}

func (s *nbdServer) addBytes(n int) {
	s.mu.Lock()
	s.st.Bytes += int64(n)
	s.mu.Unlock()
}

// serve runs one connection to its end. Errors only end the connection:
// the client sees it closed, as it would with xapi-nbd.
func (s *nbdServer) serve(c net.Conn) {
	defer s.wg.Done()
	defer s.forget(c)
	defer c.Close()
	log := s.log.With("remote", c.RemoteAddr().String())
	if err := s.session(c, log); err != nil {
		log.Debug("connection ends", "err", err)
	}
}

// nbdSession is the state of one connection.
type nbdSession struct {
	s   *nbdServer
	log *slog.Logger
	rw  io.ReadWriter // the TCP connection, or the TLS one after STARTTLS
	tls bool          // STARTTLS done
}

var errNBDAbort = errors.New("client sent NBD_OPT_ABORT")

func (s *nbdServer) session(c net.Conn, log *slog.Logger) error {
	ss := &nbdSession{s: s, log: log, rw: c}
	hflags := uint16(nbdFlagFixedNewstyle)
	if s.cfg.NoZeroes {
		hflags |= nbdFlagNoZeroes
	}
	var g [18]byte
	binary.BigEndian.PutUint64(g[0:], nbdMagic)
	binary.BigEndian.PutUint64(g[8:], nbdOptMagic)
	binary.BigEndian.PutUint16(g[16:], hflags)
	if _, err := c.Write(g[:]); err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(c, cf[:]); err != nil {
		return fmt.Errorf("client flags: %w", err)
	}
	cflags := binary.BigEndian.Uint32(cf[:])
	if cflags&nbdFlagFixedNewstyle == 0 {
		// xapi-nbd only warns in NOTLS mode and goes on; in FORCEDTLS
		// mode it cannot ask for STARTTLS without fixed newstyle.
		if s.cfg.TLS != nil {
			return errors.New("client is not fixed newstyle and TLS is forced")
		}
		log.Warn("client does not report fixed newstyle")
	}
	noZeroes := s.cfg.NoZeroes && cflags&nbdFlagNoZeroes != 0

	export, err := ss.options(c)
	if err != nil {
		return err
	}
	ra, size, release, err := s.cfg.Lookup(export)
	if err != nil {
		// EXPORT_NAME has no error reply: the connection just ends.
		log.Info("export refused", "export", export, "err", err)
		return fmt.Errorf("lookup %q: %w", export, err)
	}
	if release != nil {
		defer release()
	}
	log.Debug("export opened", "export", export, "size", size, "tls", ss.tls)
	n := 10
	if !noZeroes {
		n += 124
	}
	d := make([]byte, n)
	binary.BigEndian.PutUint64(d, uint64(size))
	binary.BigEndian.PutUint16(d[8:], nbdTFlagHasFlags|nbdTFlagReadOnly)
	if _, err := ss.rw.Write(d); err != nil {
		return fmt.Errorf("export info: %w", err)
	}
	return ss.transmit(ra, size)
}

// options runs option haggling until EXPORT_NAME and returns its name.
func (ss *nbdSession) options(c net.Conn) (string, error) {
	forced := ss.s.cfg.TLS != nil
	for {
		opt, data, err := ss.readOpt()
		if err != nil {
			return "", err
		}
		ss.log.Debug("option", "opt", opt, "len", len(data), "tls", ss.tls)
		if forced && !ss.tls {
			// FORCEDTLS, before STARTTLS: xapi-nbd's negotiate_tls.
			switch opt {
			case nbdOptExportName:
				return "", errors.New("EXPORT_NAME over cleartext while TLS is forced")
			case nbdOptAbort:
				return "", fmt.Errorf("%w before TLS", errNBDAbort)
			case nbdOptStartTLS:
				if err := ss.optReply(opt, nbdRepAck); err != nil {
					return "", err
				}
				if err := ss.startTLS(c); err != nil {
					return "", err
				}
			default:
				if err := ss.optReply(opt, nbdRepErrTLSReqd); err != nil {
					return "", err
				}
			}
			continue
		}
		// xapi-nbd's generic_loop.
		switch opt {
		case nbdOptExportName:
			return string(data), nil
		case nbdOptAbort:
			// ACK, best effort, then close.
			_ = ss.optReply(opt, nbdRepAck)
			return "", errNBDAbort
		case nbdOptStartTLS:
			// A second STARTTLS is invalid; without TLS configured
			// (network purpose insecure_nbd) it is refused by policy.
			rep := uint32(nbdRepErrPolicy)
			if ss.tls {
				rep = nbdRepErrInvalid
			}
			err = ss.optReply(opt, rep)
		case nbdOptList:
			// xapi-nbd offers no list: "Denied by server for option 3".
			err = ss.optReply(opt, nbdRepErrPolicy)
		default:
			err = ss.optReply(opt, nbdRepErrUnsup)
		}
		if err != nil {
			return "", err
		}
	}
}

func (ss *nbdSession) readOpt() (uint32, []byte, error) {
	var h [16]byte
	if _, err := io.ReadFull(ss.rw, h[:]); err != nil {
		return 0, nil, fmt.Errorf("option header: %w", err)
	}
	if binary.BigEndian.Uint64(h[:]) != nbdOptMagic {
		return 0, nil, errors.New("bad option magic")
	}
	opt := binary.BigEndian.Uint32(h[8:])
	n := binary.BigEndian.Uint32(h[12:])
	if n > maxNBDOpt {
		return 0, nil, fmt.Errorf("option %d with %d bytes of data", opt, n)
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(ss.rw, data); err != nil {
		return 0, nil, fmt.Errorf("option %d data: %w", opt, err)
	}
	return opt, data, nil
}

// optReply sends a reply without data: xapi-nbd's error replies carry no
// message.
func (ss *nbdSession) optReply(opt, rep uint32) error {
	var b [20]byte
	binary.BigEndian.PutUint64(b[0:], nbdOptReplyMagic)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], rep)
	if _, err := ss.rw.Write(b[:]); err != nil {
		return fmt.Errorf("option reply: %w", err)
	}
	return nil
}

// startTLS runs the server side of the TLS handshake on the TCP
// connection; the options go on over TLS.
func (ss *nbdSession) startTLS(c net.Conn) error {
	tc := tls.Server(c, ss.s.cfg.TLS)
	if err := c.SetDeadline(time.Now().Add(nbdTLSTimeout)); err != nil {
		return fmt.Errorf("tls: %w", err)
	}
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("tls handshake: %w", err)
	}
	if err := c.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("tls: %w", err)
	}
	ss.rw = tc
	ss.tls = true
	return nil
}

// transmit serves requests one at a time, in order, until DISC or the end
// of the connection. A client may pipeline: its requests wait in the
// socket and are answered in turn.
func (ss *nbdSession) transmit(ra io.ReaderAt, size int64) error {
	br := bufio.NewReaderSize(ss.rw, 64<<10)
	var buf []byte // header and data of one reply, reused
	var h [28]byte
	for {
		if _, err := io.ReadFull(br, h[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil // client went away without DISC: fine
			}
			return fmt.Errorf("request: %w", err)
		}
		if binary.BigEndian.Uint32(h[:]) != nbdRequestMagic {
			return errors.New("bad request magic")
		}
		// One 32-bit word, as xapi-nbd reads it: flags make a command
		// unknown.
		cmd := binary.BigEndian.Uint32(h[4:])
		handle := binary.BigEndian.Uint64(h[8:])
		off := binary.BigEndian.Uint64(h[16:])
		n := binary.BigEndian.Uint32(h[24:])

		var errno uint32
		var data []byte
		switch cmd {
		case nbdCmdRead:
			switch {
			case off%nbdSector != 0 || n%nbdSector != 0:
				errno = nbdEINVAL
			case off > uint64(size) || uint64(n) > uint64(size)-off:
				// xapi-nbd: success header, then a dropped connection.
				errno = nbdEINVAL
			case n > maxNBDRead:
				errno = nbdEINVAL
			default:
				if cap(buf) < 16+int(n) {
					buf = make([]byte, 16+int(n))
				}
				data = buf[16 : 16+int(n)]
				if m, err := ra.ReadAt(data, int64(off)); m < len(data) {
					ss.log.Warn("read failed", "off", off, "len", n, "err", err)
					errno, data = nbdEIO, nil
				}
			}
		case nbdCmdWrite:
			// xapi-nbd answers EPERM on a read-only disk and leaves the
			// payload in the stream; it is consumed here so that a test
			// of the refusal can go on using the connection.
			if _, err := io.CopyN(io.Discard, br, int64(n)); err != nil {
				return fmt.Errorf("write payload: %w", err)
			}
			errno = nbdEPERM
		case nbdCmdDisc:
			return nil
		default:
			// FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS, any flag set:
			// xapi-nbd's "unknown command, returning EINVAL".
			errno = nbdEINVAL
		}
		if errno != 0 {
			ss.log.Debug("request refused", "cmd", cmd, "off", off, "len", n, "errno", errno)
		}
		if cap(buf) < 16 {
			buf = make([]byte, 16)
		}
		rep := buf[:16+len(data)]
		binary.BigEndian.PutUint32(rep[0:], nbdSimpleMagic)
		binary.BigEndian.PutUint32(rep[4:], errno)
		binary.BigEndian.PutUint64(rep[8:], handle)
		if _, err := ss.rw.Write(rep); err != nil {
			return fmt.Errorf("reply: %w", err)
		}
		ss.s.addBytes(len(data))
	}
}
