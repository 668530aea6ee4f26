package ovirttest

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"
)

// clusterSize is qcow2's default cluster size, which is also what
// allocation and extents are tracked in (qemu-nbd --allocation-depth
// reports per cluster).
const clusterSize = 64 << 10

// What a layer holds for one cluster; absent from the map: unallocated,
// the backing chain shows through.
const (
	clData uint8 = 1 // written data, in the layer's file
	clZero uint8 = 2 // a qcow2 zero cluster (qemu-io write -z): reads as zeros, hides the backing
)

// layer is one qcow2 volume of a disk's chain. Its file is virtual-size
// long and sparse; only clusters in the map mean anything.
type layer struct {
	imageID  string
	path     string
	f        *os.File
	clusters map[int64]uint8
}

// disk is a qcow2 disk: a chain of layers, oldest first; the last is the
// active layer the VM writes to.
type disk struct {
	id, name string
	size     int64
	vm       *vm

	// mu guards layers and every layer's clusters and file contents. It is
	// taken after Server.mu, never before, so reads hold only mu.
	mu     sync.RWMutex
	layers []*layer
}

func newLayer(dir, imageID string, size int64) (*layer, error) {
	path := filepath.Join(dir, imageID+".layer")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("create layer: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("size layer: %w", err)
	}
	return &layer{imageID: imageID, path: path, f: f, clusters: map[int64]uint8{}}, nil
}

func (l *layer) remove() {
	_ = l.f.Close()
	_ = os.Remove(l.path)
}

// active is the layer the VM writes to. Callers hold d.mu.
func (d *disk) active() *layer { return d.layers[len(d.layers)-1] }

// indexOf is where l sits in the chain, -1 if it is gone. Callers hold d.mu.
func (d *disk) indexOf(l *layer) int {
	for i, x := range d.layers {
		if x == l {
			return i
		}
	}
	return -1
}

// view is what one image transfer opened: the chain up to and including
// top, or top alone when shallow (backing null).
type view struct {
	d       *disk
	top     *layer
	shallow bool
}

// chain is the layers the view reads, oldest first. Callers hold d.mu.
func (v view) chain() []*layer {
	if v.shallow {
		return []*layer{v.top}
	}
	i := v.d.indexOf(v.top)
	if i < 0 {
		return nil
	}
	return v.d.layers[:i+1]
}

// source is, for cluster c, the layer whose bytes the chain shows (nil:
// nothing allocated) and what that layer holds there.
func source(chain []*layer, c int64) (*layer, uint8) {
	for i := len(chain) - 1; i >= 0; i-- {
		if st, ok := chain[i].clusters[c]; ok {
			return chain[i], st
		}
	}
	return nil, 0
}

// readChain fills p with the chain's bytes at off, as qemu reads a qcow2
// chain: the topmost layer that allocated a cluster wins, zero clusters and
// unallocated clusters read as zeros. Runs of clusters from one layer are
// read with one ReadAt. Callers hold d.mu (read).
func readChain(chain []*layer, p []byte, off int64) error {
	for len(p) > 0 {
		c := off / clusterSize
		src, st := source(chain, c)
		// Extend over following clusters that come from the same place.
		end := (c + 1) * clusterSize
		for end < off+int64(len(p)) {
			s2, st2 := source(chain, end/clusterSize)
			if s2 != src || st2 != st {
				break
			}
			end += clusterSize
		}
		n := min(int64(len(p)), end-off)
		if src != nil && st == clData {
			if _, err := src.f.ReadAt(p[:n], off); err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("read layer %s: %w", src.imageID, err)
			}
		} else {
			clear(p[:n])
		}
		p, off = p[n:], off+n
	}
	return nil
}

// write puts data (nil: n zero bytes as a zero-write) into the active layer.
// A partial cluster not yet in the layer is first copied up from the
// backing chain, as qcow2 copy-on-write does; whole clusters of a
// zero-write become zero clusters. Callers hold d.mu (write).
func (d *disk) write(off int64, data []byte, n int64) error {
	if off < 0 || n < 0 || off+n > d.size {
		return fmt.Errorf("range %d+%d outside the disk (%d bytes)", off, n, d.size)
	}
	act := d.active()
	chain := d.layers
	buf := make([]byte, clusterSize)
	for c := off / clusterSize; n > 0 && c <= (off+n-1)/clusterSize; c++ {
		cs, ce := c*clusterSize, min((c+1)*clusterSize, d.size)
		lo, hi := max(cs, off), min(ce, off+n)
		if data == nil && lo == cs && hi == ce {
			if err := zeroRange(act.f, cs, ce-cs); err != nil {
				return err
			}
			act.clusters[c] = clZero
			continue
		}
		if act.clusters[c] != clData {
			// Copy-on-write: the cluster's current bytes (zeros for a zero
			// cluster) go into this layer before the partial write.
			b := buf[:ce-cs]
			if act.clusters[c] == clZero {
				clear(b)
			} else if err := readChain(chain, b, cs); err != nil {
				return err
			}
			if _, err := act.f.WriteAt(b, cs); err != nil {
				return fmt.Errorf("write layer: %w", err)
			}
			act.clusters[c] = clData
		}
		var part []byte
		if data == nil {
			part = make([]byte, hi-lo)
		} else {
			part = data[lo-off : hi-off]
		}
		if _, err := act.f.WriteAt(part, lo); err != nil {
			return fmt.Errorf("write layer: %w", err)
		}
	}
	return nil
}

// zeroRange punches a hole so a zero cluster costs no space; a file system
// without hole punching gets zeros written.
func zeroRange(f *os.File, off, n int64) error {
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err == nil {
		return nil
	}
	if _, err := f.WriteAt(make([]byte, n), off); err != nil {
		return fmt.Errorf("zero layer: %w", err)
	}
	return nil
}

// mergeDown folds layer i into its child i+1, as a snapshot removal does
// (blockCommit of the pair): the child keeps its identity and takes every
// cluster it did not allocate itself, so every remaining snapshot reads the
// same bytes as before. Callers hold d.mu (write); i is not the active layer.
func (d *disk) mergeDown(i int) error {
	parent, child := d.layers[i], d.layers[i+1]
	buf := make([]byte, clusterSize)
	for c, st := range parent.clusters {
		if _, ok := child.clusters[c]; ok {
			continue
		}
		if st == clData {
			cs := c * clusterSize
			b := buf[:min(clusterSize, d.size-cs)]
			if _, err := parent.f.ReadAt(b, cs); err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("merge read: %w", err)
			}
			if _, err := child.f.WriteAt(b, cs); err != nil {
				return fmt.Errorf("merge write: %w", err)
			}
		}
		child.clusters[c] = st
	}
	d.layers = append(d.layers[:i:i], d.layers[i+1:]...)
	parent.remove()
	return nil
}

// allocated is the bytes all layers hold, the disk's actual_size.
func (d *disk) allocated() int64 {
	d.mu.RLock()
	defer d.mu.RUnlock()
	var n int64
	for _, l := range d.layers {
		for c, st := range l.clusters {
			if st == clData {
				n += min(clusterSize, d.size-c*clusterSize)
			}
		}
	}
	return n
}

// extent is one run of the zero context of imageio's extents.
type extent struct {
	start, length int64
	zero, hole    bool
}

// extents are the view's zero extents as qemu-nbd with --allocation-depth
// reports them through imageio: data clusters zero:false; zero clusters
// zero:true hole:false; clusters no layer of the opened chain allocated
// zero:true hole:true. Neighbours of one kind merge.
func (v view) extents() []extent {
	v.d.mu.RLock()
	defer v.d.mu.RUnlock()
	chain := v.chain()
	var out []extent
	for c := int64(0); c*clusterSize < v.d.size; c++ {
		_, st := source(chain, c)
		e := extent{start: c * clusterSize, length: min(clusterSize, v.d.size-c*clusterSize), zero: st != clData, hole: st == 0}
		if k := len(out) - 1; k >= 0 && out[k].zero == e.zero && out[k].hole == e.hole {
			out[k].length += e.length
			continue
		}
		out = append(out, e)
	}
	return out
}

// read fills p from the view at off.
func (v view) read(p []byte, off int64) error {
	v.d.mu.RLock()
	defer v.d.mu.RUnlock()
	chain := v.chain()
	if chain == nil {
		return errors.New("the image is gone")
	}
	return readChain(chain, p, off)
}

// writeFile writes the view's bytes to path, sparse (unallocated and zero
// clusters are skipped), virtual size long.
func (v view) writeFile(path string) (err error) {
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("close: %w", cerr)
		}
		if err == nil {
			err = os.Rename(tmp, path)
		} else {
			_ = os.Remove(tmp)
		}
	}()
	if err := f.Truncate(v.d.size); err != nil {
		return fmt.Errorf("size: %w", err)
	}
	v.d.mu.RLock()
	defer v.d.mu.RUnlock()
	chain := v.chain()
	buf := make([]byte, clusterSize)
	for c := int64(0); c*clusterSize < v.d.size; c++ {
		if _, st := source(chain, c); st != clData {
			continue
		}
		b := buf[:min(clusterSize, v.d.size-c*clusterSize)]
		if err := readChain(chain, b, c*clusterSize); err != nil {
			return err
		}
		if _, err := f.WriteAt(b, c*clusterSize); err != nil {
			return fmt.Errorf("write: %w", err)
		}
	}
	return nil
}
