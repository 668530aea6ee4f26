package jdcloudtest

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend/jdcloud"
)

const region = "cn-east-2"

var bucketURL = "https://export-bucket.s3-internal." + region + ".jdcloud-oss.com"

// fakeClock moves only when told.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// bucket is the test's stand-in for OSS: what PutObject stored.
type bucket struct {
	mu    sync.Mutex
	puts  []put
	fail  error
	calls int
}

type put struct {
	bucketURL, key string
	data           []byte
	size           int64
}

func (b *bucket) PutObject(_ context.Context, bucketURL, key string, data io.Reader, size int64) error {
	buf, err := io.ReadAll(data)
	if err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls++
	if b.fail != nil {
		return b.fail
	}
	b.puts = append(b.puts, put{bucketURL, key, buf, size})
	return nil
}

func (b *bucket) snapshot() []put {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]put(nil), b.puts...)
}

type env struct {
	t     *testing.T
	srv   *Server
	clock *fakeClock
	bkt   *bucket
	http  *http.Client
	cred  jdcloud.Credentials
	qcow  []byte
}

func start(t *testing.T, mod func(*Options)) *env {
	t.Helper()
	e := &env{t: t, clock: &fakeClock{t: time.Date(2026, 3, 1, 8, 0, 0, 0, time.UTC)}, bkt: &bucket{},
		cred: jdcloud.Credentials{AccessKey: DefaultAccessKey, SecretKey: DefaultSecretKey}}
	// Not a real QCOW2 (the simulator only copies bytes): its magic and a
	// recognizable body.
	e.qcow = append([]byte("QFI\xfb\x00\x00\x00\x03"), bytes.Repeat([]byte("disk"), 1000)...)
	path := filepath.Join(t.TempDir(), "disk.qcow2")
	require.NoError(t, os.WriteFile(path, e.qcow, 0o600))
	opts := Options{
		Region: region, ImageDelay: 30 * time.Second, ExportDuration: 10 * time.Minute, Clock: e.clock.Now,
		PutObject: e.bkt.PutObject,
		ImageData: func(id string) (string, error) {
			if id != "i-vm1" {
				return "", os.ErrNotExist
			}
			return path, nil
		},
	}
	if mod != nil {
		mod(&opts)
	}
	srv, err := Start(opts)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, srv.Close()) })
	e.srv = srv
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: srv.CAPool()}}
	t.Cleanup(tr.CloseIdleConnections)
	e.http = &http.Client{Transport: tr, Timeout: 10 * time.Second}
	require.NoError(t, srv.AddInstance("i-vm1", "web"))
	return e
}

// call sends one signed request as the backend will: query sorted, JSON
// body, Content-Type signed.
func (e *env) call(method, path string, query url.Values, body any) (int, []byte) {
	e.t.Helper()
	return e.callWith(e.cred, method, path, query, body, nil)
}

func (e *env) callWith(cred jdcloud.Credentials, method, path string, query url.Values, body any, tweak func(*http.Request)) (int, []byte) {
	e.t.Helper()
	var raw []byte
	if body != nil {
		var err error
		raw, err = json.Marshal(body)
		require.NoError(e.t, err)
	}
	req, err := http.NewRequest(method, e.srv.URL()+"/v1/regions/"+region+"/"+path, bytes.NewReader(raw))
	require.NoError(e.t, err)
	req.URL.RawQuery = jdcloud.EncodeQuery(query)
	req.Header.Set("Content-Type", "application/json")
	require.NoError(e.t, jdcloud.Sign(req, raw, cred, region, jdcloud.ServiceVM, e.clock.Now(), "nonce-"+strconv.FormatInt(time.Now().UnixNano(), 36)))
	if tweak != nil {
		tweak(req)
	}
	resp, err := e.http.Do(req)
	require.NoError(e.t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(e.t, err)
	return resp.StatusCode, b
}

func decode[T any](t *testing.T, code int, body []byte) T {
	t.Helper()
	var v T
	_, err := jdcloud.Decode(bytes.NewReader(body), code, &v)
	require.NoError(t, err, "%s", body)
	return v
}

func apiErr(t *testing.T, code int, body []byte) *jdcloud.Error {
	t.Helper()
	var e *jdcloud.Error
	_, err := jdcloud.Decode(bytes.NewReader(body), code, &struct{}{})
	require.ErrorAs(t, err, &e, "%d %s", code, body)
	assert.NotEmpty(t, e.RequestID)
	assert.Equal(t, code, e.Code, "error.code is the HTTP status")
	return e
}

func (e *env) createImage(name string) string {
	e.t.Helper()
	code, body := e.call(http.MethodPost, "instances/i-vm1:createImage", nil, jdcloud.CreateImageRequest{Name: name})
	return decode[jdcloud.CreateImageResult](e.t, code, body).ImageID
}

func (e *env) readyImage() string {
	e.t.Helper()
	id := e.createImage("web-image")
	e.clock.Add(time.Minute)
	return id
}

func (e *env) export(imageID string, req jdcloud.ExportImageRequest) (int, []byte) {
	e.t.Helper()
	if req.RoleName == "" {
		req.RoleName = "image-export"
	}
	if req.OSSURL == "" {
		req.OSSURL = bucketURL
	}
	return e.call(http.MethodPost, "images/"+imageID+":exportImage", nil, req)
}

func (e *env) task(id jdcloud.ID) jdcloud.TaskInfo {
	e.t.Helper()
	code, body := e.call(http.MethodGet, "imageTasks", url.Values{"taskAction": {"ExportImage"}, "taskIds.1": {string(id)}}, nil)
	res := decode[jdcloud.ImageTasksResult](e.t, code, body)
	require.Len(e.t, res.TaskSet, 1, "%s", body)
	assert.Equal(e.t, 1, res.TotalCount)
	return res.TaskSet[0]
}

func TestCreateImageBecomesReady(t *testing.T) {
	e := start(t, nil)
	id := e.createImage("web-image")
	assert.Regexp(t, `^img-[a-z0-9]{10}$`, id)

	code, body := e.call(http.MethodGet, "images/"+id, nil, nil)
	im := decode[jdcloud.DescribeImageResult](t, code, body).Image
	assert.Equal(t, jdcloud.ImageCreating, im.Status)
	assert.Equal(t, "i-vm1", im.InstanceID)
	assert.Equal(t, "private", im.ImageSource)
	created, err := im.Created()
	require.NoError(t, err)
	assert.True(t, created.Equal(e.clock.Now()), "%v", created)

	e.clock.Add(30 * time.Second)
	code, body = e.call(http.MethodGet, "images/"+id, nil, nil)
	assert.Equal(t, jdcloud.ImageReady, decode[jdcloud.DescribeImageResult](t, code, body).Image.Status)

	code, body = e.call(http.MethodGet, "images", url.Values{"imageSource": {"private"}}, nil)
	list := decode[jdcloud.DescribeImagesResult](t, code, body)
	require.Len(t, list.Images, 1)
	assert.Equal(t, id, list.Images[0].ImageID)
	code, body = e.call(http.MethodGet, "images", url.Values{"ids.1": {PublicImageID}, "ids.2": {id}}, nil)
	assert.Equal(t, 2, decode[jdcloud.DescribeImagesResult](t, code, body).TotalCount)

	code, body = e.call(http.MethodPost, "instances/i-nope:createImage", nil, jdcloud.CreateImageRequest{Name: "x1"})
	assert.Equal(t, "NOT_FOUND", apiErr(t, code, body).Status)
	code, body = e.call(http.MethodPost, "instances/i-vm1:createImage", nil, jdcloud.CreateImageRequest{Name: "x"})
	assert.Equal(t, "INVALID_ARGUMENT", apiErr(t, code, body).Status)

	code, body = e.call(http.MethodDelete, "images/"+id, nil, nil)
	require.Equal(t, http.StatusOK, code, "%s", body)
	code, body = e.call(http.MethodGet, "images/"+id, nil, nil)
	assert.Equal(t, 404, apiErr(t, code, body).HTTPStatus)
	assert.Len(t, e.srv.Images(), 1, "the public image stays")
}

func TestExportAdvancesAndWritesTheObjectOnce(t *testing.T) {
	e := start(t, nil)
	img := e.readyImage()
	code, body := e.export(img, jdcloud.ExportImageRequest{OSSPrefix: "123"})
	id := decode[jdcloud.ExportImageResult](t, code, body).TaskID
	require.NotEmpty(t, id)

	tk := e.task(id)
	assert.Equal(t, jdcloud.TaskPending, tk.TaskStatus)
	assert.True(t, tk.IsExport())
	assert.Empty(t, tk.Objects(), "no object before the export finishes")
	assert.Equal(t, img, tk.ImageID)
	assert.Equal(t, bucketURL, tk.OSSURL)

	last := -1
	for range 4 {
		e.clock.Add(2 * time.Minute)
		tk = e.task(id)
		assert.Equal(t, jdcloud.TaskRunning, tk.TaskStatus)
		assert.Greater(t, tk.Progress, last)
		last = tk.Progress
	}
	assert.Empty(t, e.bkt.snapshot())

	e.clock.Add(2 * time.Minute)
	require.Eventually(t, func() bool { return e.task(id).TaskStatus == jdcloud.TaskFinished }, 5*time.Second, 10*time.Millisecond)
	tk = e.task(id)
	assert.Equal(t, 100, tk.Progress)
	want := "123_exportImage_" + img
	assert.Equal(t, want, tk.OSSObject)
	assert.Equal(t, []string{want}, tk.Objects())
	fin, err := tk.Finished()
	require.NoError(t, err)
	assert.True(t, fin.Equal(e.clock.Now()), "%v", fin)

	// Polling more never writes again.
	e.clock.Add(time.Hour)
	e.task(id)
	puts := e.bkt.snapshot()
	require.Len(t, puts, 1)
	assert.Equal(t, put{bucketURL, want, e.qcow, int64(len(e.qcow))}, puts[0])
	st := e.srv.Stats()
	assert.Equal(t, 1, st.ExportsStarted)
	assert.Equal(t, 1, st.ExportsFinished)
	assert.Equal(t, 1, st.PutObjectCalls)
	assert.Zero(t, st.BadSignatures)

	tasks := e.srv.Tasks()
	require.Len(t, tasks, 1)
	assert.Equal(t, string(id), strconv.Itoa(tasks[0].ID))
	assert.Equal(t, jdcloud.TaskFinished, tasks[0].Status)

	code, body = e.call(http.MethodGet, "imageTasks", url.Values{"taskAction": {"ExportImage"}, "taskStatus": {"running"}}, nil)
	assert.Empty(t, decode[jdcloud.ImageTasksResult](t, code, body).TaskSet)
}

func TestExportFinishesWithoutPolling(t *testing.T) {
	e := start(t, func(o *Options) { o.ExportDuration = 0 })
	code, body := e.export(e.readyImage(), jdcloud.ExportImageRequest{})
	decode[jdcloud.ExportImageResult](t, code, body)
	require.Eventually(t, func() bool { return len(e.bkt.snapshot()) == 1 }, 5*time.Second, 5*time.Millisecond)
	assert.True(t, strings.HasPrefix(e.bkt.snapshot()[0].key, "exportImage_img-"), "no prefix: no leading '_'")
}

func TestFailedWriteFailsTheTask(t *testing.T) {
	e := start(t, func(o *Options) { o.ExportDuration = time.Second })
	e.bkt.fail = io.ErrUnexpectedEOF
	code, body := e.export(e.readyImage(), jdcloud.ExportImageRequest{})
	id := decode[jdcloud.ExportImageResult](t, code, body).TaskID
	e.clock.Add(time.Second)
	require.Eventually(t, func() bool { return e.task(id).TaskStatus == jdcloud.TaskFailed }, 5*time.Second, 10*time.Millisecond)
	tk := e.task(id)
	assert.Contains(t, tk.ErrorInfo, "unexpected EOF")
	assert.Empty(t, tk.Objects())
	assert.Equal(t, 1, e.srv.Stats().ExportsFailed)
}

func TestSameClientTokenIsTheSameTask(t *testing.T) {
	e := start(t, nil)
	img := e.readyImage()
	code, body := e.export(img, jdcloud.ExportImageRequest{ClientToken: "tok-1"})
	a := decode[jdcloud.ExportImageResult](t, code, body).TaskID
	code, body = e.export(img, jdcloud.ExportImageRequest{ClientToken: "tok-1", OSSPrefix: "other"})
	b := decode[jdcloud.ExportImageResult](t, code, body).TaskID
	assert.Equal(t, a, b)
	code, body = e.export(img, jdcloud.ExportImageRequest{ClientToken: "tok-2"})
	c := decode[jdcloud.ExportImageResult](t, code, body).TaskID
	assert.NotEqual(t, a, c)
	assert.Equal(t, 2, e.srv.Stats().ExportsStarted)

	code, body = e.export(img, jdcloud.ExportImageRequest{ClientToken: strings.Repeat("t", 65)})
	assert.Equal(t, "INVALID_ARGUMENT", apiErr(t, code, body).Status)
}

func TestBadSignatureIs401(t *testing.T) {
	e := start(t, nil)
	for name, tc := range map[string]struct {
		cred  jdcloud.Credentials
		tweak func(*http.Request)
	}{
		"wrong secret":   {cred: jdcloud.Credentials{AccessKey: DefaultAccessKey, SecretKey: "guess"}},
		"unknown key":    {cred: jdcloud.Credentials{AccessKey: "AKNOBODY", SecretKey: DefaultSecretKey}},
		"unsigned":       {cred: e.cred, tweak: func(r *http.Request) { r.Header.Del("Authorization") }},
		"tampered query": {cred: e.cred, tweak: func(r *http.Request) { r.URL.RawQuery = "pageSize=100" }},
		"stale": {cred: e.cred, tweak: func(r *http.Request) {
			require.NoError(t, jdcloud.Sign(r, nil, e.cred, region, jdcloud.ServiceVM, e.clock.Now().Add(-time.Hour), "n"))
		}},
		"other service": {cred: e.cred, tweak: func(r *http.Request) {
			require.NoError(t, jdcloud.Sign(r, nil, e.cred, region, "oss", e.clock.Now(), "n"))
		}},
	} {
		t.Run(name, func(t *testing.T) {
			code, body := e.callWith(tc.cred, http.MethodGet, "imageTasks", nil, nil, tc.tweak)
			assert.Equal(t, http.StatusUnauthorized, code)
			er := apiErr(t, code, body)
			assert.Equal(t, "UNAUTHENTICATED", er.Status)
			assert.NotContains(t, string(body), DefaultSecretKey)
		})
	}
	assert.Equal(t, 6, e.srv.Stats().BadSignatures)
}

func TestExportErrors(t *testing.T) {
	e := start(t, nil)
	for name, tc := range map[string]struct {
		image  string
		req    jdcloud.ExportImageRequest
		code   int
		status string
	}{
		"bucket in another region": {image: "ready", req: jdcloud.ExportImageRequest{OSSURL: "https://other-bucket.s3-internal.cn-north-1.jdcloud-oss.com"}, code: 400, status: "CONFLICT"},
		"not ready":                {image: "creating", code: 400, status: "FAILED_PRECONDITION"},
		"public image":             {image: PublicImageID, code: 400, status: "FAILED_PRECONDITION"},
		"unknown image":            {image: "img-unknown0000", code: 404, status: "NOT_FOUND"},
		"no role":                  {image: "ready", req: jdcloud.ExportImageRequest{RoleName: "", OSSURL: bucketURL}, code: 400, status: "INVALID_ARGUMENT"},
		"long prefix":              {image: "ready", req: jdcloud.ExportImageRequest{OSSPrefix: strings.Repeat("a", 33)}, code: 400, status: "INVALID_ARGUMENT"},
		"prefix not alnum":         {image: "ready", req: jdcloud.ExportImageRequest{OSSPrefix: "a_b"}, code: 400, status: "INVALID_ARGUMENT"},
		"not a bucket":             {image: "ready", req: jdcloud.ExportImageRequest{OSSURL: "http://other-bucket.s3-internal." + region + ".jdcloud-oss.com"}, code: 400, status: "INVALID_ARGUMENT"},
	} {
		t.Run(name, func(t *testing.T) {
			img := tc.image
			switch img {
			case "ready":
				img = e.readyImage()
			case "creating":
				img = e.createImage("still-baking")
			}
			var code int
			var body []byte
			if name == "no role" {
				code, body = e.call(http.MethodPost, "images/"+img+":exportImage", nil, map[string]string{"ossUrl": bucketURL})
			} else {
				code, body = e.export(img, tc.req)
			}
			er := apiErr(t, code, body)
			assert.Equal(t, tc.code, er.HTTPStatus)
			assert.Equal(t, tc.status, er.Status)
		})
	}
	assert.Zero(t, e.srv.Stats().ExportsStarted)
}

func TestTaskIDVariantsDecode(t *testing.T) {
	for name, tc := range map[string]struct {
		asString, old bool
		want          string // the field as sent
	}{
		"newer taskId string":      {asString: true, want: `"taskId":"8023"`},
		"older exportTaskId int":   {old: true, want: `"exportTaskId":8023`},
		"exportTaskId as a string": {asString: true, old: true, want: `"exportTaskId":"8023"`},
		"taskId int":               {want: `"taskId":8023`},
	} {
		t.Run(name, func(t *testing.T) {
			e := start(t, func(o *Options) { o.TaskIDAsString, o.OldField = tc.asString, tc.old })
			code, body := e.export(e.readyImage(), jdcloud.ExportImageRequest{})
			assert.Contains(t, string(body), tc.want)
			id := decode[jdcloud.ExportImageResult](t, code, body).TaskID
			assert.Equal(t, jdcloud.ID("8023"), id)
			assert.Equal(t, id, e.task(id).TaskID)
		})
	}
}

func TestFailNextAndEscapedColon(t *testing.T) {
	e := start(t, nil)
	img := e.readyImage()
	e.srv.FailNext(RouteExportImage, 500)
	code, body := e.export(img, jdcloud.ExportImageRequest{})
	assert.Equal(t, "INTERNAL", apiErr(t, code, body).Status)
	assert.Zero(t, e.srv.Stats().ExportsStarted)

	// The signer sends %3A; a client that sends ':' bare reaches the same route.
	raw, _ := json.Marshal(jdcloud.ExportImageRequest{RoleName: "r", OSSURL: bucketURL})
	code, body = e.callWith(e.cred, http.MethodPost, "images/"+img+":exportImage", nil, nil, func(r *http.Request) {
		require.Equal(t, "/v1/regions/"+region+"/images/"+img+"%3AexportImage", r.URL.EscapedPath())
		r.URL.RawPath = ""
		r.Body = io.NopCloser(bytes.NewReader(raw))
		r.ContentLength = int64(len(raw))
		require.NoError(t, jdcloud.Sign(r, raw, e.cred, region, jdcloud.ServiceVM, e.clock.Now(), "n2"))
		r.URL.RawPath = ""
	})
	decode[jdcloud.ExportImageResult](t, code, body)

	e.srv.FailNext(RouteImageTasks, 503)
	code, body = e.call(http.MethodGet, "imageTasks", nil, nil)
	assert.Equal(t, "UNAVAILABLE", apiErr(t, code, body).Status)
	code, body = e.call(http.MethodGet, "imageTasks", nil, nil)
	assert.Len(t, decode[jdcloud.ImageTasksResult](t, code, body).TaskSet, 1)

	code, body = e.call(http.MethodGet, "imageTasks", url.Values{"pageSize": {"5"}}, nil)
	assert.Equal(t, "INVALID_ARGUMENT", apiErr(t, code, body).Status)
}

func TestClientMustTrustTheCA(t *testing.T) {
	e := start(t, nil)
	_, err := http.Get(e.srv.URL() + "/v1/regions/" + region + "/images")
	require.Error(t, err)
	assert.Contains(t, string(e.srv.CAPEM()), "BEGIN CERTIFICATE")
}
