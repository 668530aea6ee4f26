package ovirt

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
)

func TestDecodeExtents(t *testing.T) {
	const size = 1 << 20
	for _, tc := range []struct {
		name, in        string
		data, allocated string
		bad             bool
	}{
		{"all data", `[{"start":0,"length":1048576,"zero":false,"hole":false}]`, "0 1048576\n", "0 1048576\n", false},
		{"zero and hole", `[{"start":0,"length":65536,"zero":false},{"start":65536,"length":65536,"zero":true,"hole":false},{"start":131072,"length":917504,"zero":true,"hole":true}]`,
			"0 65536\n", "0 131072\n", false},
		{"missing fields are false", `[{"start":0,"length":1048576}]`, "0 1048576\n", "0 1048576\n", false},
		{"gap", `[{"start":0,"length":65536},{"start":131072,"length":917504}]`, "", "", true},
		{"overlap", `[{"start":0,"length":65536},{"start":0,"length":1048576}]`, "", "", true},
		{"short", `[{"start":0,"length":65536}]`, "", "", true},
		{"past the end", `[{"start":0,"length":2097152}]`, "", "", true},
		{"negative", `[{"start":0,"length":-1}]`, "", "", true},
		{"not a list", `{"start":0}`, "", "", true},
		{"truncated", `[{"start":0,"length":1048576}`, "", "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data, alloc, err := decodeExtents(strings.NewReader(tc.in), size)
			if tc.bad {
				require.Error(t, err)
				assert.ErrorIs(t, err, backend.ErrUnavailable)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.data, data.Format())
			assert.Equal(t, tc.allocated, alloc.Format())
		})
	}
}

func TestFlexScalars(t *testing.T) {
	var sd snapshotDisksJSON
	require.NoError(t, decodeEngine(strings.NewReader(`{"disk":[{"id":"d","image_id":"i","provisioned_size":"1073741824"},{"id":"e","image_id":"j","provisioned_size":2048}]}`), &sd))
	assert.EqualValues(t, 1<<30, sd.Disk[0].ProvisionedSize)
	assert.EqualValues(t, 2048, sd.Disk[1].ProvisionedSize)
	var snaps snapshotsJSON
	require.NoError(t, decodeEngine(strings.NewReader(`{"snapshot":[{"id":"a","date":1764590000000},{"id":"b","date":"2026-12-01T13:48:15.123+01:00"},{"id":"c","date":"junk"}]}`), &snaps))
	assert.Equal(t, int64(1764590000), snaps.Snapshot[0].Date.Unix())
	assert.Equal(t, "2026-12-01T12:48:15Z", snaps.Snapshot[1].Date.Format("2006-01-02T15:04:05Z07:00"))
	assert.True(t, snaps.Snapshot[2].Date.IsZero())
	var att attachmentsJSON
	require.NoError(t, decodeEngine(strings.NewReader(`{"disk_attachment":[{"id":"x","active":"true"},{"id":"y","active":false}]}`), &att))
	assert.True(t, bool(att.Attachment[0].Active))
	assert.False(t, bool(att.Attachment[1].Active))
	assert.ErrorIs(t, decodeEngine(strings.NewReader(`{"disk":[{"provisioned_size":"12x"}]}`), &sd), backend.ErrUnavailable)
	assert.ErrorIs(t, decodeEngine(strings.NewReader(`<html>`), &sd), backend.ErrUnavailable)
}

func TestDiskNames(t *testing.T) {
	infos := diskInfos([]snapshotDiskJSON{{ID: "1", Alias: "root"}, {ID: "2", Alias: "data"}, {ID: "3", Alias: "data"}, {ID: "4"}})
	var devs []string
	for _, i := range infos {
		devs = append(devs, i.Device)
	}
	assert.Equal(t, []string{"root", "2", "3", "4"}, devs, "an ambiguous or missing alias falls back to the id")
	for _, id := range []string{"", "a/b", "..", "a?b", "a%2f", strings.Repeat("x", 200)} {
		assert.False(t, safeID(id), id)
	}
	assert.True(t, safeID("123e4567-e89b-12d3-a456-426614174000"))
}
