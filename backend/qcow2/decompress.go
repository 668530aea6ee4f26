package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
)

// decompressors inflates compressed clusters: raw deflate (qemu's zlib
// type has no zlib header) or zstd. Decoders are reused, since a zstd
// decoder costs far more to make than a cluster costs to decode; at most
// as many are kept as may run at once.
type decompressors struct {
	zstd        bool
	clusterSize int64
	flate       sync.Pool // flate reader (io.ReadCloser + flate.Resetter)
	zstdIdle    chan *zstd.Decoder
}

func newDecompressors(useZstd bool, parallel int, clusterSize int64) *decompressors {
	return &decompressors{zstd: useZstd, clusterSize: clusterSize, zstdIdle: make(chan *zstd.Decoder, parallel)}
}

// decompress fills out (one cluster) from src, compressed data followed by
// whatever shares its last sector. Both qemu decoders demand a full
// cluster; more output than that is ignored, as qemu does.
func (d *decompressors) decompress(out, src []byte) error {
	if d.zstd {
		return d.unzstd(out, src)
	}
	return d.inflate(out, src)
}

func (d *decompressors) inflate(out, src []byte) error {
	r, _ := d.flate.Get().(io.ReadCloser)
	if r == nil {
		r = flate.NewReader(bytes.NewReader(src))
	} else if err := r.(flate.Resetter).Reset(bytes.NewReader(src), nil); err != nil {
		return fmt.Errorf("deflate: %w", err)
	}
	defer d.flate.Put(r)
	if _, err := io.ReadFull(r, out); err != nil {
		return fmt.Errorf("deflate: %w", short(err))
	}
	return nil
}

func (d *decompressors) unzstd(out, src []byte) error {
	var dec *zstd.Decoder
	select {
	case dec = <-d.zstdIdle:
	default:
		var err error
		// One cluster needs no more window than the cluster; the memory
		// bound stops a hostile frame header from asking for more.
		dec, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
			zstd.WithDecoderMaxMemory(uint64(max(4*d.clusterSize, 8<<20))))
		if err != nil {
			return fmt.Errorf("zstd: %w", err)
		}
	}
	defer func() {
		select {
		case d.zstdIdle <- dec:
		default:
			dec.Close()
		}
	}()
	if err := dec.Reset(bytes.NewReader(src)); err != nil {
		return fmt.Errorf("zstd: %w", err)
	}
	if _, err := io.ReadFull(dec, out); err != nil {
		return fmt.Errorf("zstd: %w", short(err))
	}
	return nil
}

// short names an early end of the compressed stream.
func short(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return errors.New("decompressed data shorter than a cluster")
	}
	return err
}

func (d *decompressors) close() {
	for {
		select {
		case dec := <-d.zstdIdle:
			dec.Close()
		default:
			return
		}
	}
}
