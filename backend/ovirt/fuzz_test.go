package ovirt

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// FuzzDecodeEngine: an engine answer decodes exactly when encoding/json
// reads it; a refusal is an outage (ErrUnavailable) whose message stays
// short whatever the answer holds; each disk of a snapshot is shown once,
// under its id, by a name.
func FuzzDecodeEngine(f *testing.F) {
	for _, seed := range []string{
		`{"vm":[{"id":"a","name":"web"}]}`,
		`{"snapshot":[{"id":"s","description":"x","date":1764590000000,"snapshot_type":"regular","snapshot_status":"ok"}]}`,
		`{"disk":[{"id":"d","image_id":"i","provisioned_size":"1073741824"}]}`,
		`{"disk":[{"id":"d","alias":"x"},{"id":"e","alias":"x"},{"id":"f"}]}`,
		`{"disk":[{"id":"d","provisioned_size":11111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111}]}`,
		`{"id":"t","phase":"transferring","transfer_url":"https://h:54322/images/x"}`,
		`{"reason":"Operation Failed","detail":"[Cannot ...]"}`,
		`{"vm":{"id":1}}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		check := func(out, ref any) {
			err := decodeEngine(bytes.NewReader(raw), out)
			refErr := json.Unmarshal(raw, ref)
			require.Equal(t, refErr == nil, err == nil, "decoded: %v, encoding/json: %v", err, refErr)
			if err != nil {
				require.ErrorIs(t, err, backend.ErrUnavailable)
				require.LessOrEqual(t, len(err.Error()), 600, "%.100s", err)
				return
			}
			require.Equal(t, ref, out)
		}
		check(&vmsJSON{}, &vmsJSON{})
		check(&snapshotsJSON{}, &snapshotsJSON{})
		check(&transferJSON{}, &transferJSON{})
		var disks snapshotDisksJSON
		check(&disks, &snapshotDisksJSON{})
		infos := diskInfos(disks.Disk)
		require.Len(t, infos, len(disks.Disk))
		for i, d := range disks.Disk {
			require.Equal(t, d.ID, infos[i].ID)
			if d.ID != "" || d.name() != "" {
				require.NotEmpty(t, infos[i].Device, "disk %+v", d)
			}
		}
	})
}

// FuzzDecodeExtents: an extents answer is accepted exactly when
// encoding/json reads it as a list of extents that covers the image from 0
// to its size without gaps or overlaps, and then data and allocated are the
// union of its extents that are not zero and not holes.
func FuzzDecodeExtents(f *testing.F) {
	f.Add([]byte(`[{"start":0,"length":65536,"zero":false,"hole":false},{"start":65536,"length":983040,"zero":true,"hole":true}]`), int64(1<<20))
	f.Add([]byte(`[{"start":0,"length":1048576}]`), int64(1<<20))
	f.Add([]byte(`[]`), int64(0))
	f.Add([]byte(`[{"start":0,"length":4096,"zero":true},{"start":4096,"length":4096,"hole":true}]`), int64(8192))
	f.Add([]byte(`[{"start":0,"length":4096,"zero":true},{"start":4096,"length":4096,"hole":true}] ]`), int64(8192))
	f.Add([]byte(`[{"start":0,"length":4096},{"start":4096,"length":4096}]{}`), int64(8192))
	f.Fuzz(func(t *testing.T, raw []byte, size int64) {
		if size < 0 || size > 1<<50 {
			return
		}
		data, alloc, err := decodeExtents(bytes.NewReader(raw), size)
		var ref []imageExtent
		refErr := json.Unmarshal(raw, &ref)
		var wantData, wantAlloc []extent.Extent
		pos := int64(0)
		for _, e := range ref {
			if e.Start != pos || e.Length <= 0 || e.Length > size-pos {
				refErr = errors.Join(refErr, errors.New("not contiguous from 0"))
				break
			}
			pos += e.Length
			if !e.Zero {
				wantData = append(wantData, extent.Extent{Off: e.Start, Len: e.Length})
			}
			if !e.Hole {
				wantAlloc = append(wantAlloc, extent.Extent{Off: e.Start, Len: e.Length})
			}
		}
		if pos != size {
			refErr = errors.Join(refErr, errors.New("short of the size"))
		}
		require.Equal(t, refErr == nil, err == nil, "decoded: %v, reference: %v", err, refErr)
		if err != nil {
			require.ErrorIs(t, err, backend.ErrUnavailable)
			return
		}
		want, err := extent.Normalize(wantData, size)
		require.NoError(t, err)
		require.Equal(t, want.Extents(), data.Extents())
		want, err = extent.Normalize(wantAlloc, size)
		require.NoError(t, err)
		require.Equal(t, want.Extents(), alloc.Extents())
	})
}
