package ovirt

import (
	"bytes"
	"testing"
)

// FuzzDecodeEngine: no engine answer makes the decoder panic.
func FuzzDecodeEngine(f *testing.F) {
	for _, seed := range []string{
		`{"vm":[{"id":"a","name":"web"}]}`,
		`{"snapshot":[{"id":"s","description":"x","date":1764590000000,"snapshot_type":"regular","snapshot_status":"ok"}]}`,
		`{"disk":[{"id":"d","image_id":"i","provisioned_size":"1073741824"}]}`,
		`{"id":"t","phase":"transferring","transfer_url":"https://h:54322/images/x"}`,
		`{"reason":"Operation Failed","detail":"[Cannot ...]"}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		var vms vmsJSON
		_ = decodeEngine(bytes.NewReader(raw), &vms)
		var snaps snapshotsJSON
		_ = decodeEngine(bytes.NewReader(raw), &snaps)
		var disks snapshotDisksJSON
		if decodeEngine(bytes.NewReader(raw), &disks) == nil {
			_ = diskInfos(disks.Disk)
		}
		var tj transferJSON
		_ = decodeEngine(bytes.NewReader(raw), &tj)
	})
}

// FuzzDecodeExtents: an accepted extents answer always yields maps inside
// the image, data within what the chain allocates or zero.
func FuzzDecodeExtents(f *testing.F) {
	f.Add([]byte(`[{"start":0,"length":65536,"zero":false,"hole":false},{"start":65536,"length":983040,"zero":true,"hole":true}]`), int64(1<<20))
	f.Add([]byte(`[{"start":0,"length":1048576}]`), int64(1<<20))
	f.Add([]byte(`[]`), int64(0))
	f.Fuzz(func(t *testing.T, raw []byte, size int64) {
		if size < 0 || size > 1<<50 {
			return
		}
		data, alloc, err := decodeExtents(bytes.NewReader(raw), size)
		if err != nil {
			return
		}
		for _, e := range append(data.Extents(), alloc.Extents()...) {
			if e.Off < 0 || e.Len <= 0 || e.Off+e.Len > size {
				t.Fatalf("extent %+v outside a %d-byte image", e, size)
			}
		}
	})
}
