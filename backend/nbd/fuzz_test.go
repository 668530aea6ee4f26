package nbd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/bits"
	"testing"

	"github.com/vmexportfs/vmexportfs/backend"
)

// rwPair is a scripted server: reads come from the fuzz input, writes are
// dropped.
type rwPair struct {
	io.Reader
	io.Writer
}

func handshakeSeed(xapi bool) []byte {
	var b []byte
	b = binary.BigEndian.AppendUint64(b, magicNBD)
	b = binary.BigEndian.AppendUint64(b, magicOpt)
	b = binary.BigEndian.AppendUint16(b, flagFixedNewstyle|flagNoZeroes)
	rep := func(opt, typ uint32, d []byte) {
		b = binary.BigEndian.AppendUint64(b, magicOptReply)
		b = binary.BigEndian.AppendUint32(b, opt)
		b = binary.BigEndian.AppendUint32(b, typ)
		b = binary.BigEndian.AppendUint32(b, uint32(len(d)))
		b = append(b, d...)
	}
	if xapi {
		rep(optStructuredRply, repErrUnsup, nil)
		rep(optGo, repErrUnsup, nil)
		b = binary.BigEndian.AppendUint64(b, 1<<30)
		return binary.BigEndian.AppendUint16(b, 3)
	}
	rep(optStructuredRply, repAck, nil)
	rep(optSetMetaContext, repMetaContext, append([]byte{0, 0, 0, 9}, metaAllocation...))
	rep(optSetMetaContext, repAck, nil)
	d := binary.BigEndian.AppendUint16(nil, infoExport)
	d = binary.BigEndian.AppendUint64(d, 1<<30)
	d = binary.BigEndian.AppendUint16(d, 3)
	rep(optGo, repInfo, d)
	d = binary.BigEndian.AppendUint16(nil, infoBlockSize)
	d = binary.BigEndian.AppendUint32(d, 512)
	d = binary.BigEndian.AppendUint32(d, 4096)
	d = binary.BigEndian.AppendUint32(d, 1<<25)
	rep(optGo, repInfo, d)
	rep(optGo, repAck, nil)
	return b
}

// FuzzHandshake: any server greeting and option replies end in an error or
// a usable export description, never a panic or a huge allocation.
func FuzzHandshake(f *testing.F) {
	f.Add(handshakeSeed(false), false)
	f.Add(handshakeSeed(true), false)
	f.Add(handshakeSeed(true), true)
	f.Fuzz(func(t *testing.T, in []byte, structured bool) {
		_, info, err := negotiate(rwPair{bytes.NewReader(in), io.Discard}, negotiateConfig{export: "e", structured: structured}, nil)
		if err != nil {
			if !errors.Is(err, backend.ErrUnavailable) && !errors.Is(err, backend.ErrNotFound) && !errors.Is(err, backend.ErrPermission) && !errors.Is(err, backend.ErrUnsupported) {
				t.Fatalf("error wraps no backend error: %v", err)
			}
			return
		}
		if info.size < 0 || info.flags&tflagHasFlags == 0 {
			t.Fatalf("accepted %+v", info)
		}
		if info.minBlock != 0 && bits.OnesCount32(info.minBlock) != 1 {
			t.Fatalf("accepted minimum block %d", info.minBlock)
		}
		if !structured && (info.structured || info.hasMeta) {
			t.Fatalf("structured without asking: %+v", info)
		}
	})
}

// FuzzReplies: any transmission stream either completes the requests in
// flight exactly (a successful read has every byte covered once) or fails
// them, never panics.
func FuzzReplies(f *testing.F) {
	const off, n = 4096, 2048
	data := bytes.Repeat([]byte{0x5a}, n)
	f.Add(append(simpleHdr(0, 1), data...), false)
	f.Add(append(dataChunk(0, 1, off, data[:1024]), append(holeChunk(chunkFlagDone, 1, off+1024, 1024), errChunk(chunkFlagDone, 2, 5, "x")...)...), true)
	f.Add(append(dataChunk(chunkFlagDone, 1, off+1024, data[:1024]), dataChunk(chunkFlagDone, 1, off, data)...), true)
	bs := chunkHdr(chunkFlagDone, chunkBlockStatus, 2, 12)
	bs = append(bs, 0, 0, 0, 9, 0, 0, 8, 0, 0, 0, 0, 3)
	f.Add(bs, true)
	f.Fuzz(func(t *testing.T, in []byte, structured bool) {
		c := newConn(rwPair{bytes.NewReader(in), io.Discard}, io.NopCloser(nil), exportInfo{structured: structured, metaID: 9, hasMeta: true}, 4)
		read := &request{typ: cmdRead, off: off, length: n, buf: make([]byte, n), done: make(chan struct{})}
		status := &request{typ: cmdBlockStatus, off: 0, length: 1 << 20, done: make(chan struct{})}
		c.pending[1], c.pending[2] = read, status
		c.readLoop() // returns at the end of input, failing what is left
		for _, rq := range []*request{read, status} {
			select {
			case <-rq.done:
			default:
				t.Fatal("request neither completed nor failed")
			}
		}
		if read.err == nil && structured && read.got != n {
			t.Fatalf("read succeeded with %d of %d bytes", read.got, n)
		}
		if status.err == nil && len(status.exts) == 0 {
			t.Fatal("block status succeeded without extents")
		}
	})
}
