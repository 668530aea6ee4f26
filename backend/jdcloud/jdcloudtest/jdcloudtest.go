// Package jdcloudtest runs an in-process simulator of the JD Cloud vm
// OpenAPI as the jdcloud backend uses it, in the spirit of
// net/http/httptest: images made from instances (createImage, describeImage,
// describeImages, deleteImage) and their export to an OSS bucket
// (exportImage, imageTasks). Every request must carry a valid
// JDCLOUD2-HMAC-SHA256 signature. Images and exports advance with
// Options.Clock; a finished export writes the image's QCOW2 bytes into the
// bucket through Options.PutObject, which the test wires to its S3 server.
package jdcloudtest

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmexportfs/vmexportfs/backend/internal/testpki"
	"github.com/vmexportfs/vmexportfs/backend/jdcloud"
)

// The key pair every simulator accepts unless Options.Credentials says
// otherwise.
const (
	DefaultAccessKey = "JDSIMAK0000000000001"
	DefaultSecretKey = "jdcloud-sim-secret-4c1e"
	DefaultRegion    = "cn-north-1"
)

// Route names, for FailNext.
const (
	RouteCreateImage    = "createImage"
	RouteDescribeImage  = "describeImage"
	RouteDescribeImages = "describeImages"
	RouteExportImage    = "exportImage"
	RouteImageTasks     = "imageTasks"
	RouteDeleteImage    = "deleteImage"
)

// PublicImageID is a public image every simulator has, which exportImage
// must refuse.
const PublicImageID = "img-public000001"

const maxBody = 64 << 10

// Options configure a simulator.
type Options struct {
	Region      string            // default DefaultRegion
	Credentials map[string]string // access key → secret; nil: {DefaultAccessKey: DefaultSecretKey}
	// ImageDelay is how long a new image stays "creating"; ExportDuration
	// how long an export takes from submission to "finished" (the first
	// tenth "pending", then "running" with progress rising).
	ImageDelay, ExportDuration time.Duration
	// Skew is how far a request's x-jdcloud-date may be off; 0: jdcloud.DefaultSkew.
	Skew time.Duration
	// TaskIDAsString writes task ids as strings ("8023") instead of
	// integers, in exportImage and imageTasks alike; OldField names
	// exportImage's id "exportTaskId" (older versions) instead of "taskId".
	TaskIDAsString, OldField bool
	// PutObject stores a finished export's object; nil makes every export
	// fail when it would write. bucketURL is the export's ossUrl.
	PutObject func(ctx context.Context, bucketURL, key string, data io.Reader, size int64) error
	// ImageData names the QCOW2 file an instance's system disk exports as.
	ImageData func(instanceID string) (path string, err error)
	Clock     func() time.Time // default time.Now
	Logger    *slog.Logger     // nil discards
}

// Stats counts what clients did since Start.
type Stats struct {
	Requests        int // every request, signed or not
	BadSignatures   int // answered 401
	ExportsStarted  int // tasks created (a repeated clientToken creates none)
	ExportsFinished int
	ExportsFailed   int
	PutObjectCalls  int
}

// ImageInfo is an image as the test sees it.
type ImageInfo struct {
	ID, Name, InstanceID string
	Source               string // "private" or "public"
	Status               string // at the simulator's clock
	Created              time.Time
}

// TaskInfo is an export task as the test sees it.
type TaskInfo struct {
	ID                int
	ImageID           string
	Status            string
	Progress          int
	OSSURL, OSSObject string
	ClientToken       string
	ErrorInfo         string
	Created, Finished time.Time
}

// Server is a running simulator.
type Server struct {
	opts Options
	log  *slog.Logger
	ca   *testpki.CA
	ln   net.Listener
	srv  *http.Server
	done chan struct{}

	ctx    context.Context // canceled by Close: ends PutObject calls and the ticker
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	instances map[string]string // id → name
	images    map[string]*image
	tasks     map[int]*task
	tokens    map[string]int // clientToken → task
	taskSeq   int
	fail      map[string][]int // route → statuses to answer next
	stats     Stats
	closed    bool // no more export writers may start
	closeOnce sync.Once
}

type image struct {
	id, name, desc, instanceID, source string
	created                            time.Time
	deleted                            bool
}

type task struct {
	id                    int
	imageID, instanceID   string
	ossURL, object, token string
	created, finished     time.Time
	status, errorInfo     string
	writing               bool // PutObject under way
}

// Start listens on 127.0.0.1 with a fresh CA's certificate.
func Start(opts Options) (*Server, error) {
	if opts.Region == "" {
		opts.Region = DefaultRegion
	}
	if opts.Credentials == nil {
		opts.Credentials = map[string]string{DefaultAccessKey: DefaultSecretKey}
	}
	if opts.Clock == nil {
		opts.Clock = time.Now
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ca, err := testpki.NewCA("jdcloudtest CA")
	if err != nil {
		return nil, fmt.Errorf("jdcloudtest start: %w", err)
	}
	leaf, err := ca.Issue(testpki.Loopback())
	if err != nil {
		return nil, fmt.Errorf("jdcloudtest start: %w", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("jdcloudtest start: listen: %w", err)
	}
	s := &Server{
		opts: opts, log: log, ca: ca, ln: ln, done: make(chan struct{}),
		instances: map[string]string{}, images: map[string]*image{}, tasks: map[int]*task{},
		tokens: map[string]int{}, taskSeq: 8022, fail: map[string][]int{},
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.images[PublicImageID] = &image{id: PublicImageID, name: "Ubuntu 22.04 LTS 64位", source: "public", created: opts.Clock().Add(-24 * time.Hour)}
	s.srv = &http.Server{
		Handler:           http.HandlerFunc(s.serve),
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{leaf}, MinVersion: tls.VersionTLS12},
		ReadHeaderTimeout: 10 * time.Second,
		// Handshake failures of clients that distrust the CA are expected
		// in tests; keep them out of stderr.
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	go func() {
		defer close(s.done)
		if err := s.srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("jdcloud simulator serve", "err", err)
		}
	}()
	// Exports finish whether or not anyone polls, as in the cloud: a test
	// that waits on the bucket alone still sees the object.
	s.wg.Add(1)
	go s.tick()
	log.Info("jdcloud simulator started", "url", s.URL(), "region", opts.Region)
	return s, nil
}

// Close stops serving, cancels PutObject calls under way and waits for them.
func (s *Server) Close() error {
	var err error
	s.closeOnce.Do(func() {
		err = s.srv.Close()
		<-s.done
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		s.cancel()
		s.wg.Wait()
	})
	if err != nil {
		return fmt.Errorf("jdcloudtest close: %w", err)
	}
	return nil
}

// URL is https://127.0.0.1:PORT, standing for https://vm.jdcloud-api.com.
func (s *Server) URL() string { return "https://" + s.ln.Addr().String() }

// Region is the simulated region.
func (s *Server) Region() string { return s.opts.Region }

// CAPEM is the CA of the HTTPS certificate.
func (s *Server) CAPEM() []byte { return s.ca.PEM() }

// CAPool trusts the HTTPS CA only.
func (s *Server) CAPool() *x509.CertPool { return s.ca.Pool() }

// AddInstance adds a cloud-disk instance images can be made from.
func (s *Server) AddInstance(id, name string) error {
	if id == "" || strings.ContainsAny(id, "/:?#%") {
		return fmt.Errorf("jdcloudtest add instance: bad id %q", id)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.instances[id]; ok {
		return fmt.Errorf("jdcloudtest add instance: %s exists", id)
	}
	s.instances[id] = name
	return nil
}

// Images lists the images that are not deleted, by id.
func (s *Server) Images() []ImageInfo {
	now := s.opts.Clock()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []ImageInfo
	for _, im := range s.images {
		if !im.deleted {
			out = append(out, ImageInfo{ID: im.id, Name: im.name, InstanceID: im.instanceID, Source: im.source, Status: s.imageStatus(im, now), Created: im.created})
		}
	}
	slices.SortFunc(out, func(a, b ImageInfo) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// Tasks lists the export tasks, by id, advanced to the clock.
func (s *Server) Tasks() []TaskInfo {
	s.advance()
	now := s.opts.Clock()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []TaskInfo
	for _, id := range s.taskIDs() {
		t := s.tasks[id]
		st, p := s.taskState(t, now)
		out = append(out, TaskInfo{ID: t.id, ImageID: t.imageID, Status: st, Progress: p, OSSURL: t.ossURL, OSSObject: t.object,
			ClientToken: t.token, ErrorInfo: t.errorInfo, Created: t.created, Finished: t.finished})
	}
	return out
}

// Stats returns the counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

// FailNext makes the next signed request to route (a Route* name) answer
// status with the documented error body, before it does anything. Calls
// queue up.
func (s *Server) FailNext(route string, status int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fail[route] = append(s.fail[route], status)
}

// apiError is an answer's error; code is the HTTP status, as JD Cloud sends.
type apiError struct {
	code        int
	status, msg string
}

func errf(code int, status, format string, args ...any) *apiError {
	return &apiError{code: code, status: status, msg: fmt.Sprintf(format, args...)}
}

// statusName is the gRPC-style status JD Cloud pairs with an HTTP code.
func statusName(code int) string {
	switch code {
	case 400:
		return "INVALID_ARGUMENT"
	case 401:
		return "UNAUTHENTICATED"
	case 403:
		return "PERMISSION_DENIED"
	case 404:
		return "NOT_FOUND"
	case 409:
		return "ABORTED"
	case 429:
		return "RESOURCE_EXHAUSTED"
	case 500:
		return "INTERNAL"
	case 503:
		return "UNAVAILABLE"
	case 504:
		return "DEADLINE_EXCEEDED"
	}
	return "UNKNOWN"
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.stats.Requests++
	s.mu.Unlock()
	reqID := newRequestID()
	w.Header().Set(jdcloud.HeaderRequestID, reqID)
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil || len(body) > maxBody {
		s.answer(w, reqID, nil, errf(400, "INVALID_ARGUMENT", "request body unreadable or larger than %d bytes", maxBody))
		return
	}
	if aerr := s.authenticate(r, body); aerr != nil {
		s.mu.Lock()
		s.stats.BadSignatures++
		s.mu.Unlock()
		s.log.Debug("jdcloud simulator: bad signature", "method", r.Method, "path", r.URL.Path, "err", aerr.msg)
		s.answer(w, reqID, nil, aerr)
		return
	}
	s.advance()
	route, handle, aerr := s.route(r)
	if aerr == nil {
		aerr = s.injected(route)
	}
	if aerr != nil {
		s.answer(w, reqID, nil, aerr)
		return
	}
	result, aerr := handle(body)
	s.log.Debug("jdcloud simulator", "route", route, "method", r.Method, "path", r.URL.Path, "err", aerr)
	s.answer(w, reqID, result, aerr)
}

// authenticate checks the JDCLOUD2 signature, and that it was made for this
// region and the vm service (the gateway takes the key's scope as given).
func (s *Server) authenticate(r *http.Request, body []byte) *apiError {
	lookup := func(ak string) (string, bool) { sk, ok := s.opts.Credentials[ak]; return sk, ok }
	if err := jdcloud.Verify(r, body, lookup, s.opts.Clock(), s.opts.Skew); err != nil {
		// The message names the failure, never the secret (Verify's promise).
		return errf(401, "UNAUTHENTICATED", "%v", err)
	}
	region, service, err := jdcloud.Scope(r.Header.Get("Authorization"))
	if err != nil || service != jdcloud.ServiceVM || region != s.opts.Region {
		return errf(401, "UNAUTHENTICATED", "signature scope %s/%s is not %s/%s", region, service, s.opts.Region, jdcloud.ServiceVM)
	}
	return nil
}

func (s *Server) injected(route string) *apiError {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := s.fail[route]
	if len(q) == 0 {
		return nil
	}
	code := q[0]
	s.fail[route] = q[1:]
	return errf(code, statusName(code), "injected fault")
}

type handlerFunc func(body []byte) (any, *apiError)

// route matches /v1/regions/{regionId}/… on the decoded path, so that an
// action sent as ':' and as %3A land alike.
func (s *Server) route(r *http.Request) (string, handlerFunc, *apiError) {
	rest, ok := strings.CutPrefix(r.URL.Path, "/v1/regions/")
	if !ok {
		return "", nil, errf(404, "NOT_FOUND", "no such API %s", r.URL.Path)
	}
	region, rest, _ := strings.Cut(rest, "/")
	if region != s.opts.Region {
		return "", nil, errf(400, "INVALID_ARGUMENT", "region %s is not served here", region)
	}
	seg := strings.Split(rest, "/")
	q := r.URL.Query()
	method := func(m string) *apiError {
		if r.Method != m {
			return errf(405, "METHOD_NOT_ALLOWED", "%s is not allowed here", r.Method)
		}
		return nil
	}
	switch {
	case len(seg) == 1 && seg[0] == "images":
		return RouteDescribeImages, func([]byte) (any, *apiError) { return s.describeImages(q) }, method(http.MethodGet)
	case len(seg) == 1 && seg[0] == "imageTasks":
		return RouteImageTasks, func([]byte) (any, *apiError) { return s.imageTasks(q) }, method(http.MethodGet)
	case len(seg) == 2 && seg[0] == "images":
		if id, ok := strings.CutSuffix(seg[1], ":exportImage"); ok {
			return RouteExportImage, func(b []byte) (any, *apiError) { return s.exportImage(id, b) }, method(http.MethodPost)
		}
		switch r.Method {
		case http.MethodGet:
			return RouteDescribeImage, func([]byte) (any, *apiError) { return s.describeImage(seg[1]) }, nil
		case http.MethodDelete:
			return RouteDeleteImage, func([]byte) (any, *apiError) { return s.deleteImage(seg[1]) }, nil
		}
		return "", nil, method(http.MethodGet)
	case len(seg) == 2 && seg[0] == "instances":
		if id, ok := strings.CutSuffix(seg[1], ":createImage"); ok {
			return RouteCreateImage, func(b []byte) (any, *apiError) { return s.createImage(id, b) }, method(http.MethodPost)
		}
	}
	return "", nil, errf(404, "NOT_FOUND", "no such API %s %s", r.Method, r.URL.Path)
}

func (s *Server) answer(w http.ResponseWriter, reqID string, result any, aerr *apiError) {
	w.Header().Set("Content-Type", "application/json")
	out := map[string]any{"requestId": reqID}
	code := http.StatusOK
	if aerr != nil {
		code = aerr.code
		out["error"] = map[string]any{"code": aerr.code, "status": aerr.status, "message": aerr.msg}
	} else {
		out["result"] = result
	}
	b, err := json.Marshal(out)
	if err != nil {
		code, b = 500, []byte(`{"requestId":"`+reqID+`","error":{"code":500,"status":"INTERNAL","message":"encode"}}`)
	}
	w.WriteHeader(code)
	_, _ = w.Write(b)
}

// decodeBody reads a JSON body into v; unknown fields are an error, as the
// gateway's schema check makes them.
func decodeBody(b []byte, v any) *apiError {
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return errf(400, "INVALID_ARGUMENT", "request body: %v", err)
	}
	return nil
}

var imageName = regexp.MustCompile(`^[\p{Han}0-9A-Za-z_.-]{2,32}$`)

func (s *Server) createImage(instanceID string, body []byte) (any, *apiError) {
	var req jdcloud.CreateImageRequest
	if aerr := decodeBody(body, &req); aerr != nil {
		return nil, aerr
	}
	if !imageName.MatchString(req.Name) {
		return nil, errf(400, "INVALID_ARGUMENT", "name %q: 2-32 letters, digits, Chinese, '_', '-' or '.'", req.Name)
	}
	now := s.opts.Clock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.instances[instanceID]; !ok {
		return nil, errf(404, "NOT_FOUND", "instance %s not found", instanceID)
	}
	im := &image{id: newImageID(), name: req.Name, desc: req.Description, instanceID: instanceID, source: "private", created: now}
	s.images[im.id] = im
	return jdcloud.CreateImageResult{ImageID: im.id}, nil
}

func (s *Server) imageStatus(im *image, now time.Time) string {
	if im.instanceID != "" && now.Before(im.created.Add(s.opts.ImageDelay)) {
		return jdcloud.ImageCreating
	}
	return jdcloud.ImageReady
}

func (s *Server) imageJSON(im *image, now time.Time) map[string]any {
	m := map[string]any{
		"imageId": im.id, "name": im.name, "status": s.imageStatus(im, now), "imageSource": im.source,
		"createTime": im.created.In(jdcloud.ChinaTime).Format(jdcloud.TimeLayout),
		"platform":   "Other Linux", "osType": "linux", "rootDeviceType": "cloudDisk", "architecture": "x86_64",
		"systemDiskSizeGB": 40, "desc": im.desc, "launchPermission": "ownerOnly",
	}
	if im.instanceID != "" {
		m["instanceId"] = im.instanceID
	}
	return m
}

func (s *Server) describeImage(id string) (any, *apiError) {
	now := s.opts.Clock()
	s.mu.Lock()
	defer s.mu.Unlock()
	im, ok := s.images[id]
	if !ok || im.deleted {
		return nil, errf(404, "NOT_FOUND", "image %s not found", id)
	}
	return map[string]any{"image": s.imageJSON(im, now)}, nil
}

// describeImages filters by ids.N, imageSource and status; a page is
// pageNumber/pageSize as imageTasks.
func (s *Server) describeImages(q url.Values) (any, *apiError) {
	ids := indexed(q, "ids")
	src, status := q.Get("imageSource"), q.Get("status")
	page, size, aerr := paging(q)
	if aerr != nil {
		return nil, aerr
	}
	now := s.opts.Clock()
	s.mu.Lock()
	defer s.mu.Unlock()
	var all []*image
	for _, im := range s.images {
		if im.deleted || (len(ids) > 0 && !slices.Contains(ids, im.id)) || (src != "" && im.source != src) ||
			(status != "" && s.imageStatus(im, now) != status) {
			continue
		}
		all = append(all, im)
	}
	slices.SortFunc(all, func(a, b *image) int { return strings.Compare(a.id, b.id) })
	list := []map[string]any{}
	for _, im := range pageOf(all, page, size) {
		list = append(list, s.imageJSON(im, now))
	}
	return map[string]any{"images": list, "totalCount": len(all)}, nil
}

func (s *Server) deleteImage(id string) (any, *apiError) {
	now := s.opts.Clock()
	s.mu.Lock()
	defer s.mu.Unlock()
	im, ok := s.images[id]
	if !ok || im.deleted {
		return nil, errf(404, "NOT_FOUND", "image %s not found", id)
	}
	if im.source != "private" {
		return nil, errf(400, "FAILED_PRECONDITION", "image %s is not a private image", id)
	}
	for _, t := range s.tasks {
		if st, _ := s.taskState(t, now); t.imageID == id && st != jdcloud.TaskFinished && st != jdcloud.TaskFailed {
			return nil, errf(400, "FAILED_PRECONDITION", "image %s is being exported (task %d)", id, t.id)
		}
	}
	im.deleted = true
	return map[string]any{}, nil
}

var (
	ossPrefix = regexp.MustCompile(`^[A-Za-z0-9]{0,32}$`)
	// ossHost is a bucket's domain, internal or public: <bucket>.s3[-internal].<region>.jdcloud-oss.com.
	ossHost = regexp.MustCompile(`^([a-z0-9][a-z0-9-]{1,61}[a-z0-9])\.s3(?:-internal)?\.([a-z0-9-]+)\.jdcloud-oss\.com$`)
)

func (s *Server) exportImage(imageID string, body []byte) (any, *apiError) {
	var req jdcloud.ExportImageRequest
	if aerr := decodeBody(body, &req); aerr != nil {
		return nil, aerr
	}
	switch {
	case req.RoleName == "":
		return nil, errf(400, "INVALID_ARGUMENT", "roleName is required")
	case req.OSSURL == "":
		return nil, errf(400, "INVALID_ARGUMENT", "ossUrl is required")
	case !ossPrefix.MatchString(req.OSSPrefix):
		return nil, errf(400, "INVALID_ARGUMENT", "ossPrefix %q: at most 32 letters and digits", req.OSSPrefix)
	case len(req.ClientToken) > 64:
		return nil, errf(400, "INVALID_ARGUMENT", "clientToken is longer than 64 characters")
	}
	u, err := url.Parse(req.OSSURL)
	if err != nil || u.Scheme != "https" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
		return nil, errf(400, "INVALID_ARGUMENT", "ossUrl %q is not an https bucket domain", req.OSSURL)
	}
	m := ossHost.FindStringSubmatch(u.Host)
	if m == nil {
		return nil, errf(400, "INVALID_ARGUMENT", "ossUrl %q is not a JD Cloud OSS bucket domain", req.OSSURL)
	}
	if m[2] != s.opts.Region {
		return nil, errf(400, "CONFLICT", "bucket region %s is not the image's region %s", m[2], s.opts.Region)
	}
	now := s.opts.Clock()
	s.mu.Lock()
	defer s.mu.Unlock()
	// The same token is the same request: its task, whatever the body says.
	if id, ok := s.tokens[req.ClientToken]; ok && req.ClientToken != "" {
		return s.exportResult(id), nil
	}
	im, ok := s.images[imageID]
	if !ok || im.deleted {
		return nil, errf(404, "NOT_FOUND", "image %s not found", imageID)
	}
	if im.source != "private" {
		return nil, errf(400, "FAILED_PRECONDITION", "image %s is not a private image", imageID)
	}
	if st := s.imageStatus(im, now); st != jdcloud.ImageReady {
		return nil, errf(400, "FAILED_PRECONDITION", "image %s is %s, not ready", imageID, st)
	}
	s.taskSeq++
	obj := "exportImage_" + imageID
	if req.OSSPrefix != "" {
		obj = req.OSSPrefix + "_" + obj
	}
	t := &task{id: s.taskSeq, imageID: imageID, instanceID: im.instanceID, ossURL: req.OSSURL, object: obj,
		token: req.ClientToken, created: now, status: jdcloud.TaskPending}
	s.tasks[t.id] = t
	if req.ClientToken != "" {
		s.tokens[req.ClientToken] = t.id
	}
	s.stats.ExportsStarted++
	return s.exportResult(t.id), nil
}

func (s *Server) taskID(id int) any {
	if s.opts.TaskIDAsString {
		return strconv.Itoa(id)
	}
	return id
}

func (s *Server) exportResult(id int) map[string]any {
	if s.opts.OldField {
		return map[string]any{"exportTaskId": s.taskID(id)}
	}
	return map[string]any{"taskId": s.taskID(id)}
}

// taskState is the task's status and progress at now. Until the object is
// written the task is at most "running" at 99%: a finished task's object is
// always in the bucket.
func (s *Server) taskState(t *task, now time.Time) (string, int) {
	switch t.status {
	case jdcloud.TaskFinished:
		return t.status, 100
	case jdcloud.TaskFailed:
		return t.status, s.progress(t, t.finished)
	}
	d := s.opts.ExportDuration
	if el := now.Sub(t.created); el < d/10 {
		return jdcloud.TaskPending, 0
	}
	return jdcloud.TaskRunning, s.progress(t, now)
}

func (s *Server) progress(t *task, at time.Time) int {
	d := s.opts.ExportDuration
	if d <= 0 {
		return 99
	}
	return int(min(99, max(0, 100*at.Sub(t.created)/d)))
}

func (s *Server) imageTasks(q url.Values) (any, *apiError) {
	action, status := q.Get("taskAction"), q.Get("taskStatus")
	if action != "" && action != "ExportImage" && action != "ImportImage" {
		return nil, errf(400, "INVALID_ARGUMENT", "taskAction %q", action)
	}
	if status != "" && !slices.Contains([]string{jdcloud.TaskPending, jdcloud.TaskRunning, jdcloud.TaskFailed, jdcloud.TaskFinished}, status) {
		return nil, errf(400, "INVALID_ARGUMENT", "taskStatus %q", status)
	}
	ids := indexed(q, "taskIds")
	page, size, aerr := paging(q)
	if aerr != nil {
		return nil, aerr
	}
	now := s.opts.Clock()
	s.mu.Lock()
	defer s.mu.Unlock()
	var match []map[string]any
	for _, id := range s.taskIDs() {
		t := s.tasks[id]
		st, p := s.taskState(t, now)
		if action == "ImportImage" || (len(ids) > 0 && !slices.Contains(ids, strconv.Itoa(id))) || (status != "" && st != status) {
			continue
		}
		m := map[string]any{
			"taskId": s.taskID(id), "action": "ExportImage", "taskStatus": st, "progress": p,
			"errorInfo": t.errorInfo, "message": "", "imageId": t.imageID, "ossUrl": t.ossURL,
			"createdTime": t.created.In(jdcloud.ChinaTime).Format(jdcloud.TimeLayout), "finishedTime": "",
			"ossObject": "", "ossObjects": []string{},
		}
		if st == jdcloud.TaskFinished {
			m["ossObject"], m["ossObjects"] = t.object, []string{t.object}
		}
		if st == jdcloud.TaskFinished || st == jdcloud.TaskFailed {
			m["finishedTime"] = t.finished.In(jdcloud.ChinaTime).Format(jdcloud.TimeLayout)
		}
		match = append(match, m)
	}
	list := pageOf(match, page, size)
	if list == nil {
		list = []map[string]any{}
	}
	return map[string]any{"taskSet": list, "totalCount": len(match)}, nil
}

func (s *Server) taskIDs() []int {
	ids := make([]int, 0, len(s.tasks))
	for id := range s.tasks {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// advance starts writing the object of every export whose time is up. The
// write runs in its own goroutine, outside the lock (PutObject is the test's
// S3 client); writing marks the task so that it is written once.
func (s *Server) advance() {
	now := s.opts.Clock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	for _, t := range s.tasks {
		if t.status == jdcloud.TaskPending && !t.writing && !now.Before(t.created.Add(s.opts.ExportDuration)) {
			t.writing = true
			s.wg.Add(1) // under the lock, so that Close's Wait never races an Add
			go s.write(t)
		}
	}
}

func (s *Server) write(t *task) {
	defer s.wg.Done()
	err := s.putObject(t)
	s.mu.Lock()
	defer s.mu.Unlock()
	t.writing = false
	t.finished = s.opts.Clock()
	if err != nil {
		t.status, t.errorInfo = jdcloud.TaskFailed, "export failed: "+err.Error()
		s.stats.ExportsFailed++
		s.log.Warn("jdcloud simulator: export failed", "task", t.id, "err", err)
		return
	}
	t.status = jdcloud.TaskFinished
	s.stats.ExportsFinished++
}

func (s *Server) putObject(t *task) error {
	if s.opts.PutObject == nil || s.opts.ImageData == nil {
		return errors.New("no bucket writer configured")
	}
	path, err := s.opts.ImageData(t.instanceID)
	if err != nil {
		return fmt.Errorf("image data of %s: %w", t.instanceID, err)
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("image data: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("image data: %w", err)
	}
	s.mu.Lock()
	s.stats.PutObjectCalls++
	s.mu.Unlock()
	if err := s.opts.PutObject(s.ctx, t.ossURL, t.object, f, fi.Size()); err != nil {
		return fmt.Errorf("put %s: %w", t.object, err)
	}
	return nil
}

func (s *Server) tick() {
	defer s.wg.Done()
	every := min(max(s.opts.ExportDuration/20, 5*time.Millisecond), 250*time.Millisecond)
	tk := time.NewTicker(every)
	defer tk.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-tk.C:
			s.advance()
		}
	}
}

// indexed reads name.1, name.2, … as the SDK sends a list parameter.
func indexed(q url.Values, name string) []string {
	var out []string
	for i := 1; ; i++ {
		v, ok := q[name+"."+strconv.Itoa(i)]
		if !ok {
			return out
		}
		out = append(out, v...)
	}
}

// paging reads pageNumber (default 1) and pageSize (default 10, 10-100 as
// imageTasks documents).
func paging(q url.Values) (page, size int, aerr *apiError) {
	page, size = 1, 10
	if v := q.Get("pageNumber"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return 0, 0, errf(400, "INVALID_ARGUMENT", "pageNumber %q", v)
		}
		page = n
	}
	if v := q.Get("pageSize"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 10 || n > 100 {
			return 0, 0, errf(400, "INVALID_ARGUMENT", "pageSize %q is not 10-100", v)
		}
		size = n
	}
	return page, size, nil
}

func pageOf[T any](all []T, page, size int) []T {
	from := (page - 1) * size
	if from >= len(all) {
		return nil
	}
	return all[from:min(len(all), from+size)]
}

func newImageID() string { return "img-" + randomLower(10) }

func newRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func randomLower(n int) string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, n)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}
