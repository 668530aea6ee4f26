package jdcloud

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestExportImageResultVariants(t *testing.T) {
	for body, want := range map[string]ID{
		`{"requestId":"r","result":{"exportTaskId":8023}}`:                 "8023",
		`{"requestId":"r","result":{"exportTaskId":"8023"}}`:               "8023",
		`{"requestId":"r","result":{"taskId":"task-abc"}}`:                 "task-abc",
		`{"requestId":"r","result":{"taskId":8023,"exportTaskId":8023}}`:   "8023",
		`{"requestId":"r","result":{"taskId":"8023","exportTaskId":null}}`: "8023",
		`{"requestId":"r","result":{"taskId":"8023","newField":[1,2]}}`:    "8023",
	} {
		var res ExportImageResult
		rid, err := Decode(strings.NewReader(body), 200, &res)
		require.NoError(t, err, body)
		assert.Equal(t, "r", rid)
		assert.Equal(t, want, res.TaskID, body)
	}
	for _, body := range []string{
		`{"result":{}}`,
		`{"result":{"taskId":"1","exportTaskId":2}}`,
		`{"result":{"exportTaskId":80.5}}`,
		`{"result":{"exportTaskId":-1}}`,
		`{"result":{"exportTaskId":1e3}}`,
		`{"result":{"exportTaskId":true}}`,
		`{"result":{"taskId":{"id":1}}}`,
		`{"result":{"taskId":"a\u0000b"}}`,
		`{"result":{"taskId":"1"}} {"again":1}`,
		`{"requestId":"r"}`,
	} {
		var res ExportImageResult
		_, err := Decode(strings.NewReader(body), 200, &res)
		assert.Error(t, err, body)
	}
}

func TestDecodeTasks(t *testing.T) {
	body := `{"requestId":"r","result":{"taskSet":[
		{"taskId":8023,"action":"ExportImage","taskStatus":"finished","progress":100,"createdTime":"2026-03-01 16:00:00",
		 "finishedTime":"2026-03-01 16:10:00","imageId":"img-1","ossUrl":"https://b.s3-internal.cn-east-2.jdcloud-oss.com",
		 "ossObject":"123_exportImage_img-1","ossObjects":["123_exportImage_img-1","123_exportImage_img-1_data1"]},
		{"taskId":"8024","action":"ExportImageTask","taskStatus":"running","progress":40,"ossObjects":null}],"totalCount":2}}`
	var res ImageTasksResult
	_, err := Decode(strings.NewReader(body), 200, &res)
	require.NoError(t, err)
	require.Len(t, res.TaskSet, 2)
	a, b := res.TaskSet[0], res.TaskSet[1]
	assert.Equal(t, ID("8023"), a.TaskID)
	assert.True(t, a.IsExport() && a.Done())
	assert.Equal(t, []string{"123_exportImage_img-1", "123_exportImage_img-1_data1"}, a.Objects())
	created, err := a.Created()
	require.NoError(t, err)
	assert.Equal(t, time.Date(2026, 3, 1, 8, 0, 0, 0, time.UTC), created.UTC(), "createdTime is Beijing time")
	assert.Equal(t, ID("8024"), b.TaskID)
	assert.True(t, b.IsExport())
	assert.False(t, b.Done())
	assert.Empty(t, b.Objects())

	single := TaskInfo{OSSObject: "x_exportImage_img-1"}
	assert.Equal(t, []string{"x_exportImage_img-1"}, single.Objects())

	for _, bad := range []string{
		`{"result":{"taskSet":[{"taskId":1,"progress":101}]}}`,
		`{"result":{"taskSet":[{"taskId":1,"progress":"50"}]}}`,
		`{"result":{"taskSet":[{"taskId":1,"ossObjects":"x"}]}}`,
		`{"result":{"taskSet":{"taskId":1}}}`,
		`{"result":{"taskSet":[],"totalCount":-1}}`,
		`{"result":{"taskSet":[{"taskId":1,"createdTime":5}]}}`,
	} {
		var res ImageTasksResult
		_, err := Decode(strings.NewReader(bad), 200, &res)
		assert.Error(t, err, bad)
	}
	_, err = ParseTime("yesterday")
	assert.Error(t, err)
	tm, err := ParseTime("2026-03-01T08:00:00Z")
	require.NoError(t, err)
	assert.Equal(t, created.Unix(), tm.Unix())
}

func TestDecodeErrorShapes(t *testing.T) {
	body := `{"requestId":"req-1","error":{"code":400,"status":"CONFLICT","message":"oss region mismatch"}}`
	_, err := Decode(strings.NewReader(body), 400, &ExportImageResult{})
	var e *Error
	require.ErrorAs(t, err, &e)
	assert.Equal(t, Error{HTTPStatus: 400, RequestID: "req-1", ErrorDetail: ErrorDetail{Code: 400, Status: "CONFLICT", Message: "oss region mismatch"}}, *e)
	assert.Equal(t, "jdcloud: HTTP 400 CONFLICT (400): oss region mismatch [request req-1]", e.Error())

	// An error member wins over a 200.
	require.ErrorAs(t, DecodeError([]byte(`{"error":{"code":500,"status":"INTERNAL","message":"x"}}`), 200), &e)
	assert.Equal(t, "INTERNAL", e.Status)
	assert.NoError(t, DecodeError([]byte(`{"requestId":"r","result":{}}`), 200))

	// A gateway's HTML page: the status alone, the body shortened.
	require.ErrorAs(t, DecodeError([]byte("<html>"+strings.Repeat("x", 5000)+"</html>"), 502), &e)
	assert.Equal(t, 502, e.HTTPStatus)
	assert.Less(t, len(e.Error()), 300)

	// Wrong types in the error body are not an API error.
	_, err = Decode(strings.NewReader(`{"error":{"code":"400"}}`), 200, &ExportImageResult{})
	require.Error(t, err)
	assert.False(t, errors.As(err, &e))

	_, err = Decode(strings.NewReader(`{"result":"`+strings.Repeat("x", MaxResponseBytes)+`"}`), 200, &ExportImageResult{})
	assert.ErrorContains(t, err, "larger than")
}

func TestDecodeImage(t *testing.T) {
	var res DescribeImageResult
	_, err := Decode(strings.NewReader(`{"result":{"image":{"imageId":"img-1","name":"n","status":"ready","imageSource":"private",
		"instanceId":"i-1","createdTime":"2026-03-01 16:00:00","sizeMB":100,"systemDisk":{"diskCategory":"cloud"}}}}`), 200, &res)
	require.NoError(t, err)
	assert.Equal(t, "i-1", res.Image.InstanceID)
	assert.Equal(t, "2026-03-01 16:00:00", res.Image.CreateTime, "createdTime when createTime is absent")

	var list DescribeImagesResult
	_, err = Decode(strings.NewReader(`{"result":{"images":[{"imageId":"img-1","createTime":"2026-03-01 16:00:00","createdTime":"x"}],"totalCount":1}}`), 200, &list)
	require.NoError(t, err)
	assert.Equal(t, "2026-03-01 16:00:00", list.Images[0].CreateTime)

	_, err = Decode(strings.NewReader(`{"result":{"image":{"imageId":1}}}`), 200, &res)
	assert.Error(t, err)
}
