package jdcloud

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// Limits on what a decoder reads. An image-task page holds at most 100 tasks
// of well under 1 KiB each and an image a few KiB, so the body bound is
// generous; the others keep a hostile answer from costing more than a few
// megabytes.
const (
	MaxResponseBytes = 4 << 20
	maxListLen       = 1000 // tasks, images or ossObjects in one answer
	maxIDLen         = 256
)

// ServiceVM is the service name the vm API is signed for.
const ServiceVM = "vm"

// Task statuses of imageTasks.
const (
	TaskPending  = "pending"
	TaskRunning  = "running"
	TaskFailed   = "failed"
	TaskFinished = "finished"
)

// ActionExportImage is the taskAction of an export. Some answers spell the
// action "ExportImageTask": IsExport accepts both.
const ActionExportImage = "ExportImage"

// TimeLayout is createdTime/finishedTime: "YYYY-MM-DD HH:MM:SS" with no zone.
const TimeLayout = "2006-01-02 15:04:05"

// ChinaTime is the zone TimeLayout values are read in. The API documents no
// zone for them; JD Cloud's console and API show Beijing time, so that is the
// assumption, and the simulator writes them the same way.
var ChinaTime = time.FixedZone("CST", 8*3600)

// ID is a task id, which answers give as a JSON integer (older SDKs:
// "exportTaskId": 8023) or a string ("taskId": "8023"). Both decode to the
// decimal string; null decodes to "".
type ID string

// UnmarshalJSON accepts a string or a non-negative integer, nothing else.
func (id *ID) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	switch {
	case string(b) == "null":
		*id = ""
		return nil
	case len(b) > 0 && b[0] == '"':
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return fmt.Errorf("jdcloud: task id: %w", err)
		}
		if len(s) > maxIDLen || !printable(s) {
			return fmt.Errorf("jdcloud: task id %.40q is not a usable id", s)
		}
		*id = ID(s)
		return nil
	default:
		n, err := strconv.ParseUint(string(b), 10, 63)
		if err != nil {
			return fmt.Errorf("jdcloud: task id %.40s is neither a string nor an integer", b)
		}
		*id = ID(strconv.FormatUint(n, 10))
		return nil
	}
}

// TaskInfo is one task of imageTasks (vm models/TaskInfo.go).
type TaskInfo struct {
	TaskID       ID       `json:"taskId"`
	Action       string   `json:"action"`
	TaskStatus   string   `json:"taskStatus"`
	Progress     int      `json:"progress"`
	ErrorInfo    string   `json:"errorInfo"`
	Message      string   `json:"message"`
	CreatedTime  string   `json:"createdTime"`
	FinishedTime string   `json:"finishedTime"`
	ImageID      string   `json:"imageId"`
	OSSURL       string   `json:"ossUrl"`
	OSSObject    string   `json:"ossObject"`
	OSSObjects   []string `json:"ossObjects"`
}

// UnmarshalJSON checks what a caller relies on: a progress of 0 to 100 and
// a bounded object list.
func (t *TaskInfo) UnmarshalJSON(b []byte) error {
	type plain TaskInfo
	var p plain
	if err := json.Unmarshal(b, &p); err != nil {
		return err
	}
	if p.Progress < 0 || p.Progress > 100 {
		return fmt.Errorf("jdcloud: task %s: progress %d is not 0-100", p.TaskID, p.Progress)
	}
	if len(p.OSSObjects) > maxListLen {
		return fmt.Errorf("jdcloud: task %s: %d ossObjects", p.TaskID, len(p.OSSObjects))
	}
	*t = TaskInfo(p)
	return nil
}

// IsExport says whether the task is an image export.
func (t TaskInfo) IsExport() bool {
	return t.Action == ActionExportImage || t.Action == ActionExportImage+"Task"
}

// Done says whether the task has stopped, successfully or not.
func (t TaskInfo) Done() bool { return t.TaskStatus == TaskFinished || t.TaskStatus == TaskFailed }

// Objects are the exported objects' keys: ossObjects when the answer has
// them (the system disk first), else ossObject.
func (t TaskInfo) Objects() []string {
	var out []string
	for _, o := range t.OSSObjects {
		if o != "" {
			out = append(out, o)
		}
	}
	if len(out) == 0 && t.OSSObject != "" {
		out = []string{t.OSSObject}
	}
	return out
}

// Created parses createdTime (zero when absent).
func (t TaskInfo) Created() (time.Time, error) { return ParseTime(t.CreatedTime) }

// Finished parses finishedTime (zero when absent).
func (t TaskInfo) Finished() (time.Time, error) { return ParseTime(t.FinishedTime) }

// ParseTime reads "YYYY-MM-DD HH:MM:SS" in ChinaTime, or RFC 3339 as other
// JD Cloud answers write times; "" is the zero time.
func ParseTime(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if t, err := time.ParseInLocation(TimeLayout, s, ChinaTime); err == nil {
		return t, nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("jdcloud: time %.40q: %w", s, err)
	}
	return t, nil
}

// ImageTasksResult is imageTasks' result.
type ImageTasksResult struct {
	TaskSet    []TaskInfo `json:"taskSet"`
	TotalCount int        `json:"totalCount"`
}

// ExportImageResult is exportImage's result. The task id arrives as
// "exportTaskId" (integer in older versions, sometimes a string) or
// "taskId" (string); TaskID holds whichever was sent.
type ExportImageResult struct {
	TaskID ID
}

// UnmarshalJSON accepts every variant; both fields with different values is
// an error rather than a guess.
func (r *ExportImageResult) UnmarshalJSON(b []byte) error {
	var v struct {
		ExportTaskID *ID `json:"exportTaskId"`
		TaskID       *ID `json:"taskId"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	var old, cur ID
	if v.ExportTaskID != nil {
		old = *v.ExportTaskID
	}
	if v.TaskID != nil {
		cur = *v.TaskID
	}
	switch {
	case old != "" && cur != "" && old != cur:
		return fmt.Errorf("jdcloud: exportImage answer names two tasks, %s and %s", old, cur)
	case cur != "":
		r.TaskID = cur
	case old != "":
		r.TaskID = old
	default:
		return errors.New("jdcloud: exportImage answer has no task id")
	}
	return nil
}

// ExportImageRequest is exportImage's body.
type ExportImageRequest struct {
	RoleName    string `json:"roleName"`
	OSSURL      string `json:"ossUrl"`
	OSSPrefix   string `json:"ossPrefix,omitempty"`
	ClientToken string `json:"clientToken,omitempty"`
	IsAllDisk   *bool  `json:"isAllDisk,omitempty"`
}

// CreateImageRequest is createImage's body (data disks are not modeled).
type CreateImageRequest struct {
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
}

// CreateImageResult is createImage's result.
type CreateImageResult struct {
	ImageID string `json:"imageId"`
}

// Image statuses the backend looks at (docs: virtual-machines/api/image_status).
const (
	ImageReady    = "ready"
	ImageCreating = "creating"
	ImageError    = "error"
)

// Image is the part of vm models/Image.go the backend uses. InstanceID is
// the model's "instanceId" (documented as 实例Id, the instance the image was
// made from). The model's creation time is "createTime"; "createdTime", as
// tasks spell it, is accepted too.
type Image struct {
	ImageID          string `json:"imageId"`
	Name             string `json:"name"`
	Status           string `json:"status"`
	ImageSource      string `json:"imageSource"` // public, shared, thirdparty, private, community
	InstanceID       string `json:"instanceId"`
	CreateTime       string `json:"createTime"`
	Platform         string `json:"platform"`
	OSType           string `json:"osType"`
	RootDeviceType   string `json:"rootDeviceType"` // localDisk, cloudDisk
	SizeMB           int64  `json:"sizeMB"`
	SystemDiskSizeGB int64  `json:"systemDiskSizeGB"`
	Desc             string `json:"desc"`
}

// UnmarshalJSON takes createdTime when createTime is absent.
func (im *Image) UnmarshalJSON(b []byte) error {
	type plain Image
	var v struct {
		plain
		CreatedTime string `json:"createdTime"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	if v.CreateTime == "" {
		v.CreateTime = v.CreatedTime
	}
	*im = Image(v.plain)
	return nil
}

// Created parses the creation time (zero when absent).
func (im Image) Created() (time.Time, error) { return ParseTime(im.CreateTime) }

// DescribeImageResult is describeImage's result.
type DescribeImageResult struct {
	Image Image `json:"image"`
}

// DescribeImagesResult is describeImages' result.
type DescribeImagesResult struct {
	Images     []Image `json:"images"`
	TotalCount int     `json:"totalCount"`
}

// ErrorDetail is an answer's "error" member (core/ErrorResponse.go).
type ErrorDetail struct {
	Code    int    `json:"code"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

// Error is a failed call: the HTTP status and the documented error body
// {"requestId", "error": {"code", "status", "message"}}.
type Error struct {
	HTTPStatus int
	RequestID  string
	ErrorDetail
}

// Error bounds every part it shows: the body is the server's, and a long
// or binary message must not flood a log.
func (e *Error) Error() string {
	s := fmt.Sprintf("jdcloud: HTTP %d", e.HTTPStatus)
	if e.Status != "" || e.Code != 0 {
		s += fmt.Sprintf(" %s (%d)", clip(e.Status, 64), e.Code)
	}
	if e.Message != "" {
		s += ": " + clip(e.Message, 200)
	}
	if e.RequestID != "" {
		s += " [request " + clip(e.RequestID, 64) + "]"
	}
	return s
}

func clip(s string, n int) string {
	if len(s) > n {
		s = s[:n] + "…"
	}
	return strings.ToValidUTF8(s, "?")
}

// envelope is every answer: requestId, then error or result.
type envelope struct {
	RequestID string          `json:"requestId"`
	Error     *ErrorDetail    `json:"error"`
	Result    json.RawMessage `json:"result"`
}

// Decode reads one answer of HTTP status httpStatus from r (at most
// MaxResponseBytes) into result, a pointer to one of the result types above,
// and returns its requestId. An error member, or a status outside 2xx,
// gives an *Error; a body that is not the documented shape, or a result of
// the wrong types, gives another error.
func Decode(r io.Reader, httpStatus int, result any) (requestID string, err error) {
	body, err := io.ReadAll(io.LimitReader(r, MaxResponseBytes+1))
	if err != nil {
		return "", fmt.Errorf("jdcloud: read answer: %w", err)
	}
	if len(body) > MaxResponseBytes {
		return "", fmt.Errorf("jdcloud: answer is larger than %d bytes", MaxResponseBytes)
	}
	var env envelope
	if err := decodeStrict(body, &env); err != nil {
		if httpStatus < 200 || httpStatus > 299 {
			// A proxy's HTML error page: the status is what there is.
			return "", &Error{HTTPStatus: httpStatus, ErrorDetail: ErrorDetail{Code: httpStatus, Message: snippet(body)}}
		}
		return "", fmt.Errorf("jdcloud: answer: %w", err)
	}
	if env.Error != nil || httpStatus < 200 || httpStatus > 299 {
		e := &Error{HTTPStatus: httpStatus, RequestID: env.RequestID}
		if env.Error != nil {
			e.ErrorDetail = *env.Error
		}
		return env.RequestID, e
	}
	if len(env.Result) == 0 || string(env.Result) == "null" {
		return env.RequestID, errors.New("jdcloud: answer has neither result nor error")
	}
	if result == nil {
		return env.RequestID, nil
	}
	if err := decodeStrict(env.Result, result); err != nil {
		return env.RequestID, fmt.Errorf("jdcloud: result: %w", err)
	}
	if err := checkBounds(result); err != nil {
		return env.RequestID, err
	}
	return env.RequestID, nil
}

// DecodeError reads an error answer alone: the *Error it describes, or nil
// when the body carries no error member and status is 2xx.
func DecodeError(body []byte, httpStatus int) error {
	_, err := Decode(bytes.NewReader(body), httpStatus, nil)
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	if httpStatus < 200 || httpStatus > 299 {
		return &Error{HTTPStatus: httpStatus, ErrorDetail: ErrorDetail{Code: httpStatus}}
	}
	return nil
}

// decodeStrict is json.Unmarshal that also refuses trailing data. Unknown
// fields are skipped: the API adds fields between versions.
func decodeStrict(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("data after the JSON value")
	}
	return nil
}

func checkBounds(result any) error {
	switch r := result.(type) {
	case *ImageTasksResult:
		if len(r.TaskSet) > maxListLen || r.TotalCount < 0 {
			return fmt.Errorf("jdcloud: imageTasks: %d tasks, totalCount %d", len(r.TaskSet), r.TotalCount)
		}
	case *DescribeImagesResult:
		if len(r.Images) > maxListLen || r.TotalCount < 0 {
			return fmt.Errorf("jdcloud: describeImages: %d images, totalCount %d", len(r.Images), r.TotalCount)
		}
	}
	return nil
}

func snippet(b []byte) string {
	s := strings.ToValidUTF8(string(b[:min(len(b), 200)]), "?")
	return strings.Join(strings.Fields(s), " ")
}

func printable(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return false
		}
	}
	return true
}
