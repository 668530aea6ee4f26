package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"

	"github.com/vmexportfs/vmexportfs/backend"
)

// Protocol constants (NBD protocol, doc/proto.md of the NBD project).
const (
	magicNBD      = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt      = 0x49484156454f5054 // "IHAVEOPT"
	magicOptReply = 0x0003e889045565a9
	magicRequest  = 0x25609513
	magicSimple   = 0x67446698
	magicChunk    = 0x668e33ef

	flagFixedNewstyle = 1 << 0 // handshake flags (server) and client flags
	flagNoZeroes      = 1 << 1

	optExportName     = 1
	optStartTLS       = 5
	optGo             = 7
	optStructuredRply = 8
	optSetMetaContext = 10

	repAck         = 1
	repInfo        = 3
	repMetaContext = 4
	repErrBit      = 1 << 31
	repErrUnsup    = repErrBit + 1
	repErrPolicy   = repErrBit + 2
	repErrUnknown  = repErrBit + 6
	repErrTLSReqd  = repErrBit + 5

	infoExport    = 0
	infoBlockSize = 3

	tflagHasFlags = 1 << 0

	cmdRead        = 0
	cmdDisc        = 2
	cmdBlockStatus = 7

	chunkFlagDone    = 1 << 0
	chunkNone        = 0
	chunkOffsetData  = 1
	chunkOffsetHole  = 2
	chunkBlockStatus = 5
	chunkErrBit      = 1 << 15

	stateHole = 1 << 0
	stateZero = 1 << 1

	metaAllocation = "base:allocation"

	// defaultAlign is the alignment every read uses at least: xapi-nbd
	// answers EINVAL to reads not aligned to 512 bytes without saying so.
	defaultAlign = 512
	// maxOptReply bounds what we accept in one option reply; real ones are
	// tens of bytes, and a hostile server must not make us allocate more.
	maxOptReply = 64 << 10
	// maxErrMsg bounds an error chunk's message (the spec says 4096).
	maxErrMsg = 4096
)

// exportInfo is what negotiation learned about the export and connection.
type exportInfo struct {
	size       int64
	flags      uint16 // transmission flags
	minBlock   uint32 // 0 when not advertised
	maxBlock   uint32 // 0 when not advertised
	structured bool   // NBD_OPT_STRUCTURED_REPLY acknowledged
	metaID     uint32 // context id of base:allocation
	hasMeta    bool   // base:allocation selected: block status works
}

// protoError is a violation of the protocol by the server: the connection
// cannot be trusted any more.
type protoError struct{ msg string }

func (e *protoError) Error() string { return "nbd: protocol violation: " + e.msg }
func (e *protoError) Unwrap() error { return backend.ErrUnavailable }

func violation(format string, args ...any) error {
	return &protoError{msg: fmt.Sprintf(format, args...)}
}

// refusal is an option the server answered with an error reply.
type refusal struct {
	opt, rep uint32
	msg      string
}

func (e *refusal) Error() string {
	return fmt.Sprintf("nbd: server refused option %d (reply %#x): %q", e.opt, e.rep, e.msg)
}

func (e *refusal) Unwrap() error {
	switch e.rep {
	case repErrUnknown:
		return backend.ErrNotFound
	case repErrPolicy, repErrTLSReqd:
		return backend.ErrPermission
	case repErrUnsup:
		return backend.ErrUnsupported
	}
	return backend.ErrUnavailable
}

// negotiateConfig is what the handshake needs from the options.
type negotiateConfig struct {
	export     string
	tls        bool // send STARTTLS; the connection is refused if the server will not
	structured bool // ask for structured replies and base:allocation
}

// ErrHangUp is a server closing a connection before its greeting, which is
// how xapi-nbd refuses one beyond its host's 16: the host is full, for now.
var ErrHangUp = errors.New("server hung up before its greeting (xapi-nbd does when its host serves 16 connections)")

// negotiate runs the fixed newstyle handshake on rw. startTLS, called after
// the server acknowledged NBD_OPT_STARTTLS, returns the TLS stream that
// carries the rest. It takes an io.ReadWriter, not a net.Conn, so the fuzz
// target can drive it with bytes.
func negotiate(rw io.ReadWriter, cfg negotiateConfig, startTLS func() (io.ReadWriter, error)) (io.ReadWriter, exportInfo, error) {
	var info exportInfo
	var hdr [18]byte
	if n, err := io.ReadFull(rw, hdr[:]); err != nil {
		if n == 0 && errors.Is(err, io.EOF) {
			return nil, info, fmt.Errorf("nbd: greeting: %w: %w", backend.ErrUnavailable, ErrHangUp)
		}
		return nil, info, fmt.Errorf("nbd: greeting: %w: %w", backend.ErrUnavailable, err)
	}
	if binary.BigEndian.Uint64(hdr[0:]) != magicNBD {
		return nil, info, violation("no NBDMAGIC in greeting")
	}
	if binary.BigEndian.Uint64(hdr[8:]) != magicOpt {
		// Oldstyle servers send the size here; they cannot do TLS nor
		// export names, so they are not supported.
		return nil, info, violation("not a newstyle server")
	}
	sflags := binary.BigEndian.Uint16(hdr[16:])
	if sflags&flagFixedNewstyle == 0 {
		return nil, info, violation("server is not fixed newstyle")
	}
	cflags := uint32(flagFixedNewstyle)
	noZeroes := sflags&flagNoZeroes != 0
	if noZeroes {
		cflags |= flagNoZeroes
	}
	if err := writeU32(rw, cflags); err != nil {
		return nil, info, err
	}

	if cfg.tls {
		if err := sendOpt(rw, optStartTLS, nil); err != nil {
			return nil, info, err
		}
		rep, _, err := readOptReply(rw, optStartTLS)
		if err != nil {
			return nil, info, err
		}
		if rep != repAck {
			// Never go on in clear: TLS was asked for.
			return nil, info, fmt.Errorf("nbd: STARTTLS: %w: reply %#x", backend.ErrPermission, rep)
		}
		if rw, err = startTLS(); err != nil {
			return nil, info, err
		}
	}

	if cfg.structured {
		if err := sendOpt(rw, optStructuredRply, nil); err != nil {
			return nil, info, err
		}
		rep, _, err := readOptReply(rw, optStructuredRply)
		if err != nil {
			return nil, info, err
		}
		// Any error (xapi-nbd: unsupported) means simple replies.
		info.structured = rep == repAck
		if rep != repAck && rep&repErrBit == 0 {
			return nil, info, violation("reply %d to STRUCTURED_REPLY", rep)
		}
	}
	if info.structured {
		if err := setMetaContext(rw, cfg.export, &info); err != nil {
			return nil, info, err
		}
	}

	err := optGoInfo(rw, cfg.export, &info)
	var ref *refusal
	if errors.As(err, &ref) && ref.rep == repErrUnsup {
		// xapi-nbd: straight to EXPORT_NAME, nothing in between (it
		// refuses LIST, which is what qemu's fallback sends first).
		err = exportName(rw, cfg.export, noZeroes, &info)
	}
	if err != nil {
		return nil, info, err
	}
	if info.flags&tflagHasFlags == 0 {
		return nil, info, violation("transmission flags without NBD_FLAG_HAS_FLAGS")
	}
	if info.size < 0 {
		return nil, info, violation("export size %d", uint64(info.size))
	}
	return rw, info, nil
}

func writeU32(w io.Writer, v uint32) error {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	return writeAll(w, b[:])
}

func writeAll(w io.Writer, b []byte) error {
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("nbd: write: %w: %w", backend.ErrUnavailable, err)
	}
	return nil
}

func sendOpt(w io.Writer, opt uint32, data []byte) error {
	b := make([]byte, 16+len(data))
	binary.BigEndian.PutUint64(b[0:], magicOpt)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], uint32(len(data)))
	copy(b[16:], data)
	return writeAll(w, b)
}

// readOptReply reads one option reply to opt and returns its type and
// data; an error reply is returned as such (the data is its message), since
// whether it is fatal depends on the option.
func readOptReply(r io.Reader, opt uint32) (uint32, []byte, error) {
	var h [20]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, fmt.Errorf("nbd: option reply: %w: %w", backend.ErrUnavailable, err)
	}
	if binary.BigEndian.Uint64(h[0:]) != magicOptReply {
		return 0, nil, violation("bad option reply magic")
	}
	if got := binary.BigEndian.Uint32(h[8:]); got != opt {
		return 0, nil, violation("reply to option %d while %d was asked", got, opt)
	}
	rep := binary.BigEndian.Uint32(h[12:])
	n := binary.BigEndian.Uint32(h[16:])
	if n > maxOptReply {
		return 0, nil, violation("option reply of %d bytes", n)
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(r, data); err != nil {
		return 0, nil, fmt.Errorf("nbd: option reply: %w: %w", backend.ErrUnavailable, err)
	}
	if rep == repAck && n != 0 {
		return 0, nil, violation("ACK with %d bytes", n)
	}
	return rep, data, nil
}

func nameData(export string, extra int) []byte {
	b := make([]byte, 4, 4+len(export)+extra)
	binary.BigEndian.PutUint32(b, uint32(len(export)))
	return append(b, export...)
}

// setMetaContext selects base:allocation; a server without it leaves
// block status off.
func setMetaContext(rw io.ReadWriter, export string, info *exportInfo) error {
	d := nameData(export, 8+len(metaAllocation))
	d = binary.BigEndian.AppendUint32(d, 1)
	d = binary.BigEndian.AppendUint32(d, uint32(len(metaAllocation)))
	d = append(d, metaAllocation...)
	if err := sendOpt(rw, optSetMetaContext, d); err != nil {
		return err
	}
	for {
		rep, data, err := readOptReply(rw, optSetMetaContext)
		if err != nil {
			return err
		}
		switch {
		case rep == repAck:
			return nil
		case rep == repMetaContext:
			if len(data) < 4 {
				return violation("short META_CONTEXT reply")
			}
			if string(data[4:]) == metaAllocation {
				info.metaID = binary.BigEndian.Uint32(data)
				info.hasMeta = true
			}
		case rep&repErrBit != 0:
			info.hasMeta = false
			return nil // no block status, reads still work
		default:
			return violation("reply %d to SET_META_CONTEXT", rep)
		}
	}
}

// optGoInfo is NBD_OPT_GO asking for block size constraints.
func optGoInfo(rw io.ReadWriter, export string, info *exportInfo) error {
	d := nameData(export, 4)
	d = binary.BigEndian.AppendUint16(d, 1)
	d = binary.BigEndian.AppendUint16(d, infoBlockSize)
	if err := sendOpt(rw, optGo, d); err != nil {
		return err
	}
	gotExport := false
	for {
		rep, data, err := readOptReply(rw, optGo)
		if err != nil {
			return err
		}
		switch {
		case rep == repAck:
			if !gotExport {
				return violation("GO acknowledged without NBD_INFO_EXPORT")
			}
			return checkBlockSizes(info)
		case rep == repInfo:
			if len(data) < 2 {
				return violation("short INFO reply")
			}
			switch binary.BigEndian.Uint16(data) {
			case infoExport:
				if len(data) != 12 {
					return violation("NBD_INFO_EXPORT of %d bytes", len(data))
				}
				info.size = int64(binary.BigEndian.Uint64(data[2:]))
				info.flags = binary.BigEndian.Uint16(data[10:])
				gotExport = true
			case infoBlockSize:
				if len(data) != 14 {
					return violation("NBD_INFO_BLOCK_SIZE of %d bytes", len(data))
				}
				info.minBlock = binary.BigEndian.Uint32(data[2:])
				info.maxBlock = binary.BigEndian.Uint32(data[10:])
			}
		case rep&repErrBit != 0:
			return &refusal{opt: optGo, rep: rep, msg: string(data)}
		default:
			return violation("reply %d to GO", rep)
		}
	}
}

func checkBlockSizes(info *exportInfo) error {
	if info.minBlock == 0 && info.maxBlock == 0 {
		return nil
	}
	if info.minBlock == 0 || bits.OnesCount32(info.minBlock) != 1 || info.minBlock > 64<<10 {
		return violation("minimum block size %d", info.minBlock)
	}
	if info.maxBlock < info.minBlock {
		return violation("maximum block size %d below minimum %d", info.maxBlock, info.minBlock)
	}
	return nil
}

// exportName is the old way in: no reply header, and a server that does
// not know the export just closes the connection.
func exportName(rw io.ReadWriter, export string, noZeroes bool, info *exportInfo) error {
	if err := sendOpt(rw, optExportName, []byte(export)); err != nil {
		return err
	}
	n := 10
	if !noZeroes {
		n += 124
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(rw, b); err != nil {
		return fmt.Errorf("nbd: EXPORT_NAME %q: %w (closed: unknown export?): %w", export, backend.ErrUnavailable, err)
	}
	info.size = int64(binary.BigEndian.Uint64(b))
	info.flags = binary.BigEndian.Uint16(b[8:])
	info.minBlock, info.maxBlock = 0, 0
	return nil
}

// errnoError is an NBD error the server returned for one request: the
// connection stays good.
type errnoError struct {
	errno uint32
	msg   string
}

func (e *errnoError) Error() string {
	if e.msg != "" {
		return fmt.Sprintf("nbd: server error %d: %q", e.errno, e.msg)
	}
	return fmt.Sprintf("nbd: server error %d", e.errno)
}

func (e *errnoError) Unwrap() error {
	switch e.errno {
	case 1: // NBD_EPERM
		return backend.ErrPermission
	case 22, 75: // NBD_EINVAL, NBD_EOVERFLOW
		return backend.ErrInvalid
	case 95: // NBD_ENOTSUP
		return backend.ErrUnsupported
	}
	return backend.ErrUnavailable // EIO, ENOMEM, ESHUTDOWN, unknown
}

// retryable says whether a server error is worth another attempt.
func (e *errnoError) retryable() bool {
	switch e.errno {
	case 1, 22, 75, 95:
		return false
	}
	return true
}
