package fs

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"syscall"

	"github.com/pkg/xattr"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

const (
	xattrVM       = "user.vmexport.vm"
	xattrSnapshot = "user.vmexport.snapshot"
	// xattrState is a snapshot directory's state: "ready", or what the
	// platform is still doing to make it ("exporting 43%").
	xattrState         = "user.vmexport.state"
	xattrDisk          = "user.vmexport.disk"
	xattrExtents       = "user.vmexport.extents"
	xattrChangedPrefix = "user.vmexport.changed."
	// xattrSizeMax is the kernel's XATTR_SIZE_MAX.
	xattrSizeMax = 64 << 10
)

// xattrValue copies val into dest with getxattr(2) conventions.
func xattrValue(val, dest []byte) (uint32, syscall.Errno) {
	if len(val) > xattrSizeMax {
		return 0, syscall.E2BIG
	}
	if len(dest) == 0 {
		return uint32(len(val)), 0
	}
	if len(dest) < len(val) {
		return uint32(len(val)), syscall.ERANGE
	}
	return uint32(copy(dest, val)), 0
}

// xattrList renders names with listxattr(2) conventions.
func xattrList(names []string, dest []byte) (uint32, syscall.Errno) {
	var b []byte
	for _, n := range names {
		b = append(b, n...)
		b = append(b, 0)
	}
	return xattrValue(b, dest)
}

// splitPage splits "name@from" into name and from; a name without a numeric
// suffix is not paged. The suffix is read only as ReadMap writes it
// (decimal digits, no sign, no leading zero), so one attribute name has one
// meaning: "changed.x@+5" or "changed.x@05" is the base "x@+5" or "x@05",
// not the base "x" paged from 5.
func splitPage(attr string) (string, int64, bool) {
	i := strings.LastIndexByte(attr, '@')
	if i < 0 {
		return attr, 0, false
	}
	digits := attr[i+1:]
	if digits == "" || strings.Trim(digits, "0123456789") != "" || len(digits) > 1 && digits[0] == '0' {
		return attr, 0, false
	}
	from, err := strconv.ParseInt(digits, 10, 64)
	if err != nil {
		return attr, 0, false
	}
	return attr[:i], from, true
}

// page formats the extents ending after from, whole lines only, within one
// xattr value; "" means there are no more.
func page(m extent.Map, from int64) []byte {
	var b []byte
	for _, e := range m.Extents() {
		if e.End() <= from {
			continue
		}
		line := strconv.FormatInt(e.Off, 10) + " " + strconv.FormatInt(e.Len, 10) + "\n"
		if len(b)+len(line) > xattrSizeMax {
			break
		}
		b = append(b, line...)
	}
	return b
}

func (f *diskFile) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	switch attr {
	case xattrVM:
		return xattrValue([]byte(f.vm), dest)
	case xattrSnapshot:
		return xattrValue([]byte(f.ref.Snapshot), dest)
	case xattrDisk:
		return xattrValue([]byte(f.ref.Disk), dest)
	}
	name, from, paged := splitPage(attr)
	var m extent.Map
	switch {
	case name == xattrExtents:
		data, err := f.v.Data(ctx)
		if err != nil {
			return 0, f.st.toErrno(ctx, "getxattr "+name, f.path, err)
		}
		m = data
	case strings.HasPrefix(name, xattrChangedPrefix):
		changed, errno := f.changedSince(ctx, strings.TrimPrefix(name, xattrChangedPrefix))
		if errno != 0 {
			return 0, errno
		}
		m = changed
	default:
		return 0, syscall.ENODATA
	}
	if paged {
		return xattrValue(page(m, from), dest)
	}
	val := capped{limit: xattrSizeMax}
	if _, err := m.WriteTo(&val); err != nil {
		f.st.log.Warn("fs: extent map too large for one xattr; use `vmexportfs extents` (pages with "+name+"@<offset>)",
			"path", f.path, "attr", name, "extents", m.Len())
		return 0, syscall.E2BIG
	}
	return xattrValue(val.buf, dest)
}

// capped collects at most limit bytes and fails a write past that, so a map
// of millions of extents is refused without being formatted whole.
type capped struct {
	buf   []byte
	limit int
}

var errCapped = errors.New("value over the xattr size limit")

func (c *capped) Write(p []byte) (int, error) {
	if len(c.buf)+len(p) > c.limit {
		return 0, errCapped
	}
	c.buf = append(c.buf, p...)
	return len(p), nil
}

// changedSince answers for a base given by shown name or by id.
func (f *diskFile) changedSince(ctx context.Context, base string) (extent.Map, syscall.Errno) {
	ct, ok := f.v.(changeTracker)
	if !ok || base == "" {
		return extent.Map{}, syscall.ENODATA
	}
	baseID := base
	if l, err := f.st.listSnapshots(ctx, f.vm); err == nil {
		if e := l.lookup(base); e != nil {
			baseID = e.snap.ID
		}
	}
	if baseID == f.ref.Snapshot {
		// Nothing changes between a snapshot and itself; platforms differ in
		// whether they accept the question.
		return extent.Map{}, 0
	}
	m, err := ct.ChangedSince(ctx, baseID)
	switch {
	case errors.Is(err, backend.ErrUnsupported), errors.Is(err, backend.ErrNotFound):
		return extent.Map{}, syscall.ENODATA
	case err != nil:
		return extent.Map{}, f.st.toErrno(ctx, "getxattr changed."+base, f.path, err)
	}
	return m, 0
}

func (f *diskFile) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	names := []string{xattrVM, xattrSnapshot, xattrDisk, xattrExtents}
	// Only the immediately older base is listed so cp -a / rsync -X stay light.
	if f.e.prev != nil {
		if ct, ok := f.v.(changeTracker); ok && ct.TracksChanges(ctx) {
			// The name shown in the tree, which is what users pass back.
			base := f.e.prevName
			if base == "" {
				base = f.e.prev.ID
			}
			names = append(names, xattrChangedPrefix+base)
		}
	}
	return xattrList(names, dest)
}

// ReadMap reads a mounted disk file's data extents (since == "") or the
// extents changed since the snapshot named or numbered since, paging through
// the xattrs so maps of any size work.
func ReadMap(path string, since string) ([]extent.Extent, error) {
	name := xattrExtents
	if since != "" {
		name = xattrChangedPrefix + since
	}
	var out []extent.Extent
	var from int64
	for {
		b, err := xattr.Get(path, name+"@"+strconv.FormatInt(from, 10))
		if err != nil {
			return nil, fmt.Errorf("read map %s of %s: %w", name, path, err)
		}
		if len(b) == 0 {
			return out, nil
		}
		m, err := extent.Parse(string(b), math.MaxInt64)
		if err != nil {
			return nil, fmt.Errorf("read map %s of %s: %w", name, path, err)
		}
		exts := m.Extents()
		if len(exts) == 0 || exts[len(exts)-1].End() <= from {
			return nil, fmt.Errorf("read map %s of %s: page at %d does not advance", name, path, from)
		}
		out = append(out, exts...)
		from = exts[len(exts)-1].End()
	}
}
