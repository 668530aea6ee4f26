package ovirt

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/redact"
)

// The engine's JSON, as much of it as this backend reads. The runtime
// writer emits numbers, booleans and ISO dates; older engines and the
// documentation have strings and epoch milliseconds: both are accepted.

type vmJSON struct {
	ID   string `json:"id"`
	Name string `json:"name"`
}

type vmsJSON struct {
	VM []vmJSON `json:"vm"`
}

type attachmentJSON struct {
	ID     string   `json:"id"`
	Active flexBool `json:"active"`
	Disk   struct {
		ID string `json:"id"`
	} `json:"disk"`
}

type attachmentsJSON struct {
	Attachment []attachmentJSON `json:"disk_attachment"`
}

type snapshotJSON struct {
	ID          string   `json:"id"`
	Description string   `json:"description"`
	Date        flexTime `json:"date"`
	Type        string   `json:"snapshot_type"`
	Status      string   `json:"snapshot_status"`
}

type snapshotsJSON struct {
	Snapshot []snapshotJSON `json:"snapshot"`
}

// snapshotDiskJSON is a disk as a snapshot holds it: id is the disk's,
// image_id the disk snapshot's (what an image transfer names).
type snapshotDiskJSON struct {
	ID              string  `json:"id"`
	ImageID         string  `json:"image_id"`
	Name            string  `json:"name"`
	Alias           string  `json:"alias"`
	ProvisionedSize flexInt `json:"provisioned_size"`
}

type snapshotDisksJSON struct {
	Disk []snapshotDiskJSON `json:"disk"`
}

type transferJSON struct {
	ID          string `json:"id"`
	Phase       string `json:"phase"`
	TransferURL string `json:"transfer_url"`
	ProxyURL    string `json:"proxy_url"`
}

// faultJSON is the engine's error answer.
type faultJSON struct {
	Reason string `json:"reason"`
	Detail string `json:"detail"`
}

// flexInt is an int64 sent as a number or a string.
type flexInt int64

func (x *flexInt) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(bytes.TrimSpace(b)), `"`)
	if s == "null" || s == "" {
		return nil
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return fmt.Errorf("integer %q: %w", cut(s, 32), err)
	}
	*x = flexInt(v)
	return nil
}

// flexBool is a boolean sent as true/false or "true"/"false".
type flexBool bool

func (x *flexBool) UnmarshalJSON(b []byte) error {
	switch strings.Trim(string(bytes.TrimSpace(b)), `"`) {
	case "true":
		*x = true
	case "false", "null", "":
		*x = false
	default:
		return fmt.Errorf("boolean %q", cut(string(b), 32))
	}
	return nil
}

// flexTime is an ISO date or epoch milliseconds (number or string); what
// cannot be read is the zero time (a date is not worth failing a listing).
type flexTime struct{ time.Time }

func (t *flexTime) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(bytes.TrimSpace(b)), `"`)
	if ms, err := strconv.ParseInt(s, 10, 64); err == nil {
		if ms > 0 {
			t.Time = time.UnixMilli(ms).UTC()
		}
		return nil
	}
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02T15:04:05.999-07:00", "2006-01-02T15:04:05.999Z0700"} {
		if v, err := time.Parse(layout, s); err == nil {
			t.Time = v.UTC()
			return nil
		}
	}
	return nil
}

func cut(s string, n int) string { return redact.Cut(s, n) }

// maxEngineAnswer bounds one engine answer.
const maxEngineAnswer = 64 << 20

// decodeEngine reads one engine JSON answer into out.
func decodeEngine(r io.Reader, out any) error {
	b, err := io.ReadAll(io.LimitReader(r, maxEngineAnswer+1))
	if err != nil {
		return fmt.Errorf("%w: reading the answer: %w", backend.ErrUnavailable, err)
	}
	if len(b) > maxEngineAnswer {
		return fmt.Errorf("%w: answer over %d bytes", backend.ErrUnavailable, maxEngineAnswer)
	}
	if err := json.Unmarshal(b, out); err != nil {
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		switch {
		case errors.As(err, &se):
			return fmt.Errorf("%w: malformed JSON at byte %d", backend.ErrUnavailable, se.Offset)
		case errors.As(err, &te):
			return fmt.Errorf("%w: unexpected JSON: %s where %s was expected (field %s)", backend.ErrUnavailable, te.Value, te.Type, cut(te.Field, 64))
		}
		return fmt.Errorf("%w: unexpected JSON: %s", backend.ErrUnavailable, cut(err.Error(), 200))
	}
	return nil
}

// maxExtents bounds an extents answer: a million extents per TiB of a
// 64 TiB disk would be a map of 1 GB; beyond this the server is hostile.
const maxExtents = 16 << 20

// imageExtent is one element of imageio's extents list.
type imageExtent struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
	Zero   bool  `json:"zero"`
	Hole   bool  `json:"hole"`
}

// decodeExtents reads imageio's `extents?context=zero` answer for an image
// of size bytes, element by element (an answer of millions is not held as
// text), and checks it covers [0, size) contiguously. It returns the
// extents that hold data (not zero) and those the opened chain allocates
// (not hole): for a shallow transfer of one layer, what that layer
// changed.
func decodeExtents(r io.Reader, size int64) (data, allocated extent.Map, err error) {
	dec := json.NewDecoder(io.LimitReader(r, 64*maxExtents))
	tok, err := dec.Token()
	if err != nil {
		return extent.Map{}, extent.Map{}, fmt.Errorf("%w: extents: %w", backend.ErrUnavailable, err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '[' {
		return extent.Map{}, extent.Map{}, fmt.Errorf("%w: extents: not a JSON list", backend.ErrUnavailable)
	}
	var dataExts, allocExts []extent.Extent
	var pos int64
	for n := 0; dec.More(); n++ {
		if n == maxExtents {
			return extent.Map{}, extent.Map{}, fmt.Errorf("%w: extents: more than %d", backend.ErrUnavailable, maxExtents)
		}
		var e imageExtent
		if err := dec.Decode(&e); err != nil {
			return extent.Map{}, extent.Map{}, fmt.Errorf("%w: extents: element %d: %w", backend.ErrUnavailable, n, err)
		}
		if e.Start != pos || e.Length <= 0 || e.Length > size-pos {
			return extent.Map{}, extent.Map{}, fmt.Errorf("%w: extents: element %d (start %d, length %d) does not continue at %d inside %d bytes", backend.ErrUnavailable, n, e.Start, e.Length, pos, size)
		}
		if !e.Zero {
			dataExts = appendMerged(dataExts, extent.Extent{Off: e.Start, Len: e.Length})
		}
		if !e.Hole {
			allocExts = appendMerged(allocExts, extent.Extent{Off: e.Start, Len: e.Length})
		}
		pos += e.Length
	}
	if _, err := dec.Token(); err != nil {
		return extent.Map{}, extent.Map{}, fmt.Errorf("%w: extents: %w", backend.ErrUnavailable, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return extent.Map{}, extent.Map{}, fmt.Errorf("%w: extents: more after the list", backend.ErrUnavailable)
	}
	if pos != size {
		return extent.Map{}, extent.Map{}, fmt.Errorf("%w: extents cover %d bytes of a %d-byte image", backend.ErrUnavailable, pos, size)
	}
	if data, err = extent.Normalize(dataExts, size); err != nil {
		return extent.Map{}, extent.Map{}, fmt.Errorf("%w: extents: %w", backend.ErrUnavailable, err)
	}
	if allocated, err = extent.Normalize(allocExts, size); err != nil {
		return extent.Map{}, extent.Map{}, fmt.Errorf("%w: extents: %w", backend.ErrUnavailable, err)
	}
	return data, allocated, nil
}

func appendMerged(exts []extent.Extent, e extent.Extent) []extent.Extent {
	if k := len(exts) - 1; k >= 0 && exts[k].Off+exts[k].Len == e.Off {
		exts[k].Len += e.Len
		return exts
	}
	return append(exts, e)
}

// imageOptions is imageio's OPTIONS answer.
type imageOptions struct {
	Features   []string `json:"features"`
	MaxReaders int      `json:"max_readers"`
}
