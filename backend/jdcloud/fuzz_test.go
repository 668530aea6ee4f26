package jdcloud

import (
	"errors"
	"strings"
	"testing"
)

func FuzzDecodeTask(f *testing.F) {
	f.Add(`{"requestId":"r","result":{"taskSet":[{"taskId":8023,"action":"ExportImage","taskStatus":"finished","progress":100,"ossObject":"a","ossObjects":["a","b"]}],"totalCount":1}}`, 200)
	f.Add(`{"result":{"taskSet":[{"taskId":"8023","progress":-1}]}}`, 200)
	f.Add(`{"result":{"exportTaskId":"8023"}}`, 200)
	f.Fuzz(func(t *testing.T, s string, status int) {
		var res ImageTasksResult
		if _, err := Decode(strings.NewReader(s), status, &res); err == nil {
			if len(res.TaskSet) > maxListLen || res.TotalCount < 0 {
				t.Fatalf("unbounded answer accepted: %d tasks, total %d", len(res.TaskSet), res.TotalCount)
			}
			for _, tk := range res.TaskSet {
				if tk.Progress < 0 || tk.Progress > 100 {
					t.Fatalf("progress %d accepted", tk.Progress)
				}
				for _, o := range tk.Objects() {
					if o == "" {
						t.Fatal("empty object key")
					}
				}
				_, _ = tk.Created()
			}
		}
		var ex ExportImageResult
		if _, err := Decode(strings.NewReader(s), status, &ex); err == nil && ex.TaskID == "" {
			t.Fatal("exportImage answer accepted without a task id")
		}
	})
}

func FuzzDecodeError(f *testing.F) {
	f.Add(`{"requestId":"r","error":{"code":400,"status":"CONFLICT","message":"m"}}`, 400)
	f.Add(`<html>bad gateway</html>`, 502)
	f.Add(`{"error":null,"result":{}}`, 200)
	f.Fuzz(func(t *testing.T, s string, status int) {
		err := DecodeError([]byte(s), status)
		if status < 200 || status > 299 {
			var e *Error
			if !errors.As(err, &e) || e.HTTPStatus != status {
				t.Fatalf("status %d gave %v", status, err)
			}
		}
		if err != nil && len(err.Error()) > 600 {
			t.Fatalf("error message of %d bytes", len(err.Error()))
		}
	})
}
