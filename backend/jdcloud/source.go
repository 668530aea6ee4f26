package jdcloud

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
	"github.com/vmexportfs/vmexportfs/backend/qcow2"
	"github.com/vmexportfs/vmexportfs/backend/redact"
	"github.com/vmexportfs/vmexportfs/backend/retry"
	"github.com/vmexportfs/vmexportfs/backend/s3"
)

// SourceConfig is a JD Cloud region's API and the bucket its exports land
// in.
type SourceConfig struct {
	// API is https://vm.jdcloud-api.com/v1/regions/REGION (the region is
	// read from the path).
	API         string
	Credentials Credentials
	// OSSURL is the bucket's domain as exportImage is given it,
	// https://BUCKET.s3[-internal].REGION.jdcloud-oss.com; the bucket's
	// name is its first label.
	OSSURL string
	// OSSEndpoint is where the objects are read, path-style; "" is the
	// public endpoint of OSSURL's region (an export written through the
	// internal one is read from outside JD Cloud through the public one).
	OSSEndpoint string
	// ExportRole is the roleName exportImage needs (a role allowing the VM
	// service to write the bucket); without it mkdir is not offered.
	ExportRole string
	// OSSPrefix starts the names of the objects mkdir's exports write.
	OSSPrefix string
	// DeleteImage makes rmdir delete the snapshot's image too, not only
	// its exported object.
	DeleteImage bool
	// PollInterval is how often mkdir's image and export are looked at
	// (default 10 s: an export takes minutes).
	PollInterval       time.Duration
	RootCAs            *x509.CertPool
	InsecureSkipVerify bool
	Policy             retry.Policy
	Logger             *slog.Logger
	Secrets            *redact.Secrets
}

// Source lists a region's finished image exports as snapshots, under the
// instance each image was made from (or the image itself where it records
// none), and reads each export's QCOW2 object through the qcow2 reader.
type Source struct {
	cfg    SourceConfig
	api    *url.URL
	region string
	bucket string
	http   *httprange.Client
	s3     *s3.Client
	logger *slog.Logger

	mu     sync.Mutex
	images map[string]Image // by id: what an image says of itself does not change
	known  map[string]bool  // VMs listed once: one whose last export was deleted has none, it is not unknown
	jobs   map[string]*job  // mkdir's images not yet exporting, by image id
	stop   chan struct{}
	wg     sync.WaitGroup
}

// job is a snapshot mkdir is making: the image first, then its export,
// which imageTasks shows from then on.
type job struct {
	vm, name, imageID string
	state             string
	created           time.Time
}

var (
	_ backend.Source          = (*Source)(nil)
	_ backend.SnapshotDeleter = (*Source)(nil)
	_ backend.SnapshotCreator = (*Source)(nil)
)

// Errors of the configuration.
var errConfig = errors.New("jdcloud: configuration")

// NewSource checks the configuration and lists once, so wrong keys fail
// the mount.
func NewSource(ctx context.Context, cfg SourceConfig) (*Source, error) {
	api, err := url.Parse(cfg.API)
	if err != nil || api.Scheme != "https" || api.Host == "" || api.User != nil || api.RawQuery != "" {
		return nil, fmt.Errorf("%w: %w: want https://vm.jdcloud-api.com/v1/regions/REGION", errConfig, backend.ErrInvalid)
	}
	parts := strings.Split(strings.Trim(api.Path, "/"), "/")
	if len(parts) != 3 || parts[0] != "v1" || parts[1] != "regions" || parts[2] == "" {
		return nil, fmt.Errorf("%w: %w: the API URL's path must be /v1/regions/REGION", errConfig, backend.ErrInvalid)
	}
	bucket, ossRegion, endpoint, err := parseOSS(cfg.OSSURL, cfg.OSSEndpoint)
	if err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	cfg.Secrets.Add(cfg.Credentials.SecretKey)
	cfg.Secrets.Add(cfg.Credentials.SessionToken)
	s := &Source{cfg: cfg, api: api, region: parts[2], bucket: bucket, logger: cfg.Logger, images: map[string]Image{}, known: map[string]bool{},
		jobs: map[string]*job{}, stop: make(chan struct{})}
	if s.cfg.PollInterval <= 0 {
		s.cfg.PollInterval = 10 * time.Second
	}
	if ossRegion != s.region {
		s.logger.Warn("jdcloud: the bucket is in another region than the API; exports to it fail (CONFLICT)", "api_region", s.region, "bucket_region", ossRegion)
	}
	tlsConfig := &tls.Config{RootCAs: cfg.RootCAs, InsecureSkipVerify: cfg.InsecureSkipVerify, MinVersion: tls.VersionTLS12}
	s.http = &httprange.Client{
		HTTP: &http.Client{Transport: httprange.NewTransport(tlsConfig, cfg.Policy.Meter)}, Auth: signer{s},
		Policy: cfg.Policy, Logger: cfg.Logger, Secrets: cfg.Secrets,
	}
	if s.s3, err = s3.New(ctx, s3.Config{
		Endpoint: endpoint, Region: ossRegion, AccessKey: cfg.Credentials.AccessKey, SecretKey: cfg.Credentials.SecretKey,
		RootCAs: cfg.RootCAs, InsecureSkipVerify: cfg.InsecureSkipVerify, Policy: cfg.Policy, Logger: cfg.Logger, Secrets: cfg.Secrets,
	}); err != nil {
		return nil, err
	}
	if _, err := s.exports(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// parseOSS reads the bucket and region from a bucket domain, and the
// endpoint to read it from.
func parseOSS(ossURL, endpoint string) (bucket, region, readFrom string, err error) {
	u, perr := url.Parse(ossURL)
	if perr != nil || u.Scheme != "https" || u.User != nil || (u.Path != "" && u.Path != "/") {
		return "", "", "", fmt.Errorf("%w: %w: --oss-url: want https://BUCKET.s3.REGION.jdcloud-oss.com", errConfig, backend.ErrInvalid)
	}
	labels := strings.Split(u.Hostname(), ".")
	if len(labels) != 5 || (labels[1] != "s3" && labels[1] != "s3-internal") || labels[3]+"."+labels[4] != "jdcloud-oss.com" || labels[0] == "" {
		return "", "", "", fmt.Errorf("%w: %w: --oss-url: want https://BUCKET.s3.REGION.jdcloud-oss.com", errConfig, backend.ErrInvalid)
	}
	bucket, region = labels[0], labels[2]
	if endpoint == "" {
		endpoint = "https://s3." + region + ".jdcloud-oss.com"
	}
	if e, perr := url.Parse(endpoint); perr != nil || e.Scheme != "https" || e.Host == "" || e.User != nil {
		// Checked with the flags, not when the first read fails.
		return "", "", "", fmt.Errorf("%w: %w: --oss-endpoint: want https://HOST[:PORT]; plain http would send the signed requests and the disks in cleartext", errConfig, backend.ErrInvalid)
	}
	return bucket, region, endpoint, nil
}

// signer signs every API request, its body included.
type signer struct{ s *Source }

func (a signer) Authorize(_ context.Context, req *http.Request) error {
	var body []byte
	if req.GetBody != nil {
		rc, err := req.GetBody()
		if err != nil {
			return fmt.Errorf("jdcloud: sign: %w", err)
		}
		body, err = io.ReadAll(rc)
		rc.Close()
		if err != nil {
			return fmt.Errorf("jdcloud: sign: %w", err)
		}
	}
	return Sign(req, body, a.s.cfg.Credentials, a.s.region, "vm", time.Now().UTC(), rand.Text())
}

// Renew has nothing to renew: keys do not expire.
func (signer) Renew(context.Context) error { return nil }

// get calls the API and decodes its result.
func (s *Source) get(ctx context.Context, route string, q url.Values, out any) error {
	return s.call(ctx, http.MethodGet, route, q, nil, out)
}

// call sends one API request (JSON body, when given) and decodes its result.
func (s *Source) call(ctx context.Context, method, route string, q url.Values, body, out any) error {
	var payload []byte
	if body != nil {
		var err error
		if payload, err = json.Marshal(body); err != nil {
			return fmt.Errorf("jdcloud: %s %s: %w", method, route, err)
		}
	}
	u := s.api.JoinPath(route)
	u.RawPath = EscapePath(u.Path) // ':' as %3A, as it is signed
	u.RawQuery = EncodeQuery(q)
	resp, err := s.http.Do(ctx, func(ctx context.Context) (*http.Request, error) {
		req, err := http.NewRequestWithContext(ctx, method, u.String(), bytes.NewReader(payload))
		if err != nil {
			return nil, err
		}
		req.Header.Set("Accept", "application/json")
		if body != nil {
			req.Header.Set("Content-Type", "application/json")
			// The API's clientToken and createImage's name make a repeat harmless.
			req.Header.Set("Idempotency-Key", "jdcloud")
		}
		return req, nil
	})
	if err != nil {
		return fmt.Errorf("jdcloud: %s %s: %w", method, route, err)
	}
	defer resp.Body.Close()
	if _, err := Decode(resp.Body, resp.StatusCode, out); err != nil {
		return fmt.Errorf("jdcloud: %s %s: %w: %w", method, route, backend.ErrUnavailable, err)
	}
	return nil
}

// export is one export of an image: finished (its object in the bucket)
// or still running.
type export struct {
	task    TaskInfo
	object  s3.ObjectInfo // zero while running
	image   Image
	pending string // what is still being done, "" when ready
}

// maxTasks bounds the listing of a region's tasks.
const maxTasks = 10000

// exports are the region's exports whose object the bucket holds, those
// still running, and mkdir's images not yet exporting: one per image (the
// newest ready one, else the newest running one).
func (s *Source) exports(ctx context.Context) ([]export, error) {
	// The jobs first: a job ends once its task exists, so one that ends
	// while the tasks are listed is seen as one or the other, not neither.
	s.mu.Lock()
	jobs := make([]job, 0, len(s.jobs))
	for _, j := range s.jobs {
		jobs = append(jobs, *j)
	}
	s.mu.Unlock()
	var tasks []TaskInfo
	for page := 1; ; page++ {
		var res ImageTasksResult
		q := url.Values{"taskAction": {"ExportImage"}, "pageNumber": {strconv.Itoa(page)}, "pageSize": {"100"}}
		if err := s.get(ctx, "imageTasks", q, &res); err != nil {
			return nil, err
		}
		tasks = append(tasks, res.TaskSet...)
		if len(res.TaskSet) == 0 || len(tasks) >= res.TotalCount || len(tasks) >= maxTasks {
			break
		}
	}
	objs, err := s.s3.List(ctx, s.bucket, "")
	if err != nil {
		return nil, fmt.Errorf("jdcloud: list the bucket %s: %w", s.bucket, err)
	}
	byKey := map[string]s3.ObjectInfo{}
	for _, o := range objs {
		byKey[o.Key] = o
	}
	byImage := map[string]export{}
	for _, t := range tasks {
		if !t.IsExport() || t.ImageID == "" {
			continue
		}
		e := export{task: t}
		switch t.TaskStatus {
		case TaskFinished:
			keys := t.Objects()
			if len(keys) == 0 {
				continue
			}
			obj, ok := byKey[keys[0]] // the system disk; isAllDisk exports are not split yet
			if !ok {
				continue // deleted (rmdir), or in another bucket
			}
			e.object = obj
		case TaskPending, TaskRunning:
			e.pending = fmt.Sprintf("exporting %d%%", min(max(t.Progress, 0), 99))
		default:
			continue // failed: there is nothing to read
		}
		if old, ok := byImage[t.ImageID]; ok && (old.pending == "" && e.pending != "" || old.task.CreatedTime > t.CreatedTime && (old.pending == "") == (e.pending == "")) {
			continue
		}
		byImage[t.ImageID] = e
	}
	for _, j := range jobs {
		if _, ok := byImage[j.imageID]; !ok {
			byImage[j.imageID] = export{task: TaskInfo{ImageID: j.imageID}, image: Image{ImageID: j.imageID, Name: j.name, InstanceID: j.vm}, pending: j.state}
		}
	}
	var out []export
	for id, e := range byImage {
		if e.image.ImageID == "" {
			img, err := s.image(ctx, id)
			if err != nil && !errors.Is(err, backend.ErrNotFound) {
				return nil, err
			}
			e.image = img
		}
		out = append(out, e)
	}
	return out, nil
}

// image describes an image once.
func (s *Source) image(ctx context.Context, id string) (Image, error) {
	s.mu.Lock()
	img, ok := s.images[id]
	s.mu.Unlock()
	if ok || id == "" {
		return img, nil
	}
	var res DescribeImageResult
	if err := s.get(ctx, "images/"+url.PathEscape(id), nil, &res); err != nil {
		if errors.Is(err, backend.ErrNotFound) {
			return Image{ImageID: id}, fmt.Errorf("jdcloud: image %s: %w", id, backend.ErrNotFound)
		}
		return Image{}, err
	}
	s.mu.Lock()
	s.images[id] = res.Image
	s.mu.Unlock()
	return res.Image, nil
}

// vmOf is the VM an export is shown under: its image's instance, else the
// image.
func vmOf(e export) string {
	if e.image.InstanceID != "" {
		return e.image.InstanceID
	}
	return e.task.ImageID
}

// VMs lists the instances (or images) that have exports.
func (s *Source) VMs(ctx context.Context) ([]backend.VM, error) {
	exps, err := s.exports(ctx)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []backend.VM
	for _, e := range exps {
		id := vmOf(e)
		if id == "" || seen[id] {
			continue
		}
		seen[id] = true
		s.mu.Lock()
		s.known[id] = true
		s.mu.Unlock()
		name := ""
		if e.image.InstanceID == "" {
			name = e.image.Name
		}
		out = append(out, backend.VM{ID: id, Name: name})
	}
	return out, nil
}

// snapshotID names an export by its image: the same while mkdir makes
// it, while it exports and once it is ready.
func snapshotID(e export) string { return "image-" + e.task.ImageID }

// Snapshots are a VM's exports, oldest first, named after their images.
func (s *Source) Snapshots(ctx context.Context, vmID string) ([]backend.Snapshot, error) {
	exps, err := s.exports(ctx)
	if err != nil {
		return nil, err
	}
	// Oldest first; JD Cloud's times have seconds, and its task ids rise,
	// so they order exports made within one.
	slices.SortStableFunc(exps, func(a, b export) int {
		if c := strings.Compare(a.task.FinishedTime, b.task.FinishedTime); c != 0 && a.pending == "" && b.pending == "" {
			return c
		}
		ai, aerr := strconv.ParseInt(string(a.task.TaskID), 10, 64)
		bi, berr := strconv.ParseInt(string(b.task.TaskID), 10, 64)
		if aerr == nil && berr == nil && ai != bi {
			return cmp.Compare(ai, bi)
		}
		return strings.Compare(a.task.ImageID, b.task.ImageID)
	})
	var out []backend.Snapshot
	for _, e := range exps {
		if vmOf(e) != vmID {
			continue
		}
		created, _ := e.task.Finished()
		if e.pending != "" {
			created, _ = e.task.Created()
		}
		name := e.image.Name
		if name == "" {
			name = path.Base(e.object.Key)
		}
		out = append(out, backend.Snapshot{ID: snapshotID(e), Name: name, Created: created, Pending: e.pending,
			Disks: []backend.DiskInfo{{ID: "disk", Device: "disk"}}})
	}
	s.mu.Lock()
	known := s.known[vmID] || len(out) > 0
	s.known[vmID] = known
	s.mu.Unlock()
	if !known {
		return nil, fmt.Errorf("jdcloud: vm %q: %w", redact.Cut(vmID, 64), backend.ErrNotFound)
	}
	return out, nil
}

// find is the export of a snapshot of a VM.
func (s *Source) find(ctx context.Context, vmID, snapID string) (export, error) {
	exps, err := s.exports(ctx)
	if err != nil {
		return export{}, err
	}
	i := slices.IndexFunc(exps, func(e export) bool { return vmOf(e) == vmID && snapshotID(e) == snapID })
	if i < 0 {
		return export{}, fmt.Errorf("jdcloud: snapshot %q of %q: %w", redact.Cut(snapID, 64), redact.Cut(vmID, 64), backend.ErrNotFound)
	}
	return exps[i], nil
}

// OpenDisk reads an export's QCOW2 object through the qcow2 reader.
func (s *Source) OpenDisk(ctx context.Context, ref backend.DiskRef) (backend.Disk, error) {
	e, err := s.find(ctx, ref.VM, ref.Snapshot)
	if err != nil {
		return nil, err
	}
	if e.pending != "" {
		return nil, fmt.Errorf("jdcloud: snapshot %s: %w: still being made (%s)", ref.Snapshot, backend.ErrUnavailable, e.pending)
	}
	if ref.Disk != "disk" {
		return nil, fmt.Errorf("jdcloud: disk %q: %w", redact.Cut(ref.Disk, 64), backend.ErrNotFound)
	}
	obj, err := s.s3.Object(ctx, s.bucket, e.object.Key)
	if err != nil {
		return nil, err
	}
	if strings.Trim(obj.ETag(), `"`) != strings.Trim(e.object.ETag, `"`) {
		return nil, fmt.Errorf("jdcloud: %s: %w: the object was written again since it was listed", e.object.Key, backend.ErrNotFound)
	}
	img, err := qcow2.Open(ctx, obj, qcow2.Options{Logger: s.logger, Name: s.bucket + "/" + e.object.Key})
	if err != nil {
		return nil, fmt.Errorf("jdcloud: export %s: %w", e.task.TaskID, err)
	}
	return img, nil
}

// DeleteSnapshot deletes the exported object, and its image where
// DeleteImage says so (by default the image stays: it is the user's, and
// exporting it again needs it).
func (s *Source) DeleteSnapshot(ctx context.Context, vmID, snapshotID string) error {
	e, err := s.find(ctx, vmID, snapshotID)
	if err != nil {
		return err
	}
	if e.pending != "" {
		s.mu.Lock()
		j := s.jobs[e.task.ImageID]
		if j != nil && strings.HasPrefix(j.state, "failed") {
			delete(s.jobs, e.task.ImageID) // a failed mkdir: nothing was exported
			s.mu.Unlock()
			return nil
		}
		s.mu.Unlock()
		return fmt.Errorf("jdcloud: snapshot %s: %w: still being made (%s); delete it once it is ready", snapshotID, backend.ErrUnsupported, e.pending)
	}
	if err := s.s3.Remove(ctx, s.bucket, e.object.Key); err != nil {
		return fmt.Errorf("jdcloud: delete the export %s: %w", e.object.Key, err)
	}
	s.logger.Info("jdcloud: export deleted", "object", e.object.Key, "task", string(e.task.TaskID))
	if s.cfg.DeleteImage {
		if err := s.call(ctx, http.MethodDelete, "images/"+e.task.ImageID, nil, nil, nil); err != nil {
			return fmt.Errorf("jdcloud: the export is deleted, its image %s is not: %w", e.task.ImageID, err)
		}
		s.logger.Info("jdcloud: image deleted", "image", e.task.ImageID)
	}
	return nil
}

// Close stops following mkdir's jobs (the platform finishes them; a later
// mount lists their exports).
func (s *Source) Close() error {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	s.wg.Wait()
	return nil
}

// imageNameOK is JD Cloud's rule for image names: 2 to 32 letters,
// digits, '-' and '_', not starting with either.
func imageNameOK(name string) bool {
	if len(name) < 2 || len(name) > 32 || name[0] == '-' || name[0] == '_' {
		return false
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// CreateSnapshot makes an image of the instance and returns at once with
// the snapshot pending: following it (image ready, then exportImage, whose
// task the listing shows with its progress) goes on in the background.
func (s *Source) CreateSnapshot(ctx context.Context, vmID, name string) (backend.Snapshot, error) {
	if s.cfg.ExportRole == "" {
		return backend.Snapshot{}, fmt.Errorf("jdcloud: mkdir needs --jdcloud-export-role (the role exportImage writes the bucket with): %w", backend.ErrUnsupported)
	}
	if !imageNameOK(name) {
		return backend.Snapshot{}, fmt.Errorf("jdcloud: image name %q: %w: 2 to 32 letters, digits, '-' or '_'", redact.Cut(name, 40), backend.ErrInvalid)
	}
	if snaps, err := s.Snapshots(ctx, vmID); err == nil && slices.ContainsFunc(snaps, func(sn backend.Snapshot) bool { return sn.Name == name }) {
		return backend.Snapshot{}, fmt.Errorf("jdcloud: %s already has a snapshot %q: %w", vmID, name, backend.ErrExists)
	}
	var img CreateImageResult
	if err := s.call(ctx, http.MethodPost, "instances/"+vmID+":createImage", nil, CreateImageRequest{Name: name}, &img); err != nil {
		return backend.Snapshot{}, err
	}
	if img.ImageID == "" {
		return backend.Snapshot{}, fmt.Errorf("jdcloud: createImage of %s: %w: no image id", vmID, backend.ErrUnavailable)
	}
	j := &job{vm: vmID, name: name, imageID: img.ImageID, state: "creating the image", created: time.Now()}
	s.mu.Lock()
	s.jobs[j.imageID] = j
	s.known[vmID] = true
	s.mu.Unlock()
	s.logger.Info("jdcloud: image requested; it is exported once ready", "vm", vmID, "image", j.imageID, "name", name)
	s.wg.Add(1)
	go s.follow(j)
	return backend.Snapshot{ID: "image-" + j.imageID, Name: name, Created: j.created, Pending: j.state,
		Disks: []backend.DiskInfo{{ID: "disk", Device: "disk"}}}, nil
}

// follow waits for a job's image and starts its export; from then on the
// task carries the snapshot's state.
func (s *Source) follow(j *job) {
	defer s.wg.Done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-s.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	setState := func(state string) {
		s.mu.Lock()
		j.state = state
		s.mu.Unlock()
	}
	fail := func(err error) {
		s.logger.Error("jdcloud: mkdir's snapshot failed", "vm", j.vm, "image", j.imageID, "err", err.Error())
		setState("failed: " + redact.Cut(err.Error(), 200))
	}
	for {
		var d DescribeImageResult
		err := s.get(ctx, "images/"+url.PathEscape(j.imageID), nil, &d)
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			s.logger.Warn("jdcloud: image not described; trying again", "image", j.imageID, "err", err.Error())
		case d.Image.Status == ImageReady:
			setState("starting the export")
			var res ExportImageResult
			sum := sha256.Sum256([]byte("vmexportfs\x00" + j.imageID))
			req := ExportImageRequest{RoleName: s.cfg.ExportRole, OSSURL: s.cfg.OSSURL, OSSPrefix: s.cfg.OSSPrefix, ClientToken: hex.EncodeToString(sum[:16])}
			if err := s.call(ctx, http.MethodPost, "images/"+j.imageID+":exportImage", nil, req, &res); err != nil {
				fail(err)
				return
			}
			s.logger.Info("jdcloud: export started", "vm", j.vm, "image", j.imageID, "task", string(res.TaskID))
			s.mu.Lock()
			delete(s.jobs, j.imageID) // the task shows it now
			s.mu.Unlock()
			return
		case d.Image.Status == ImageError:
			fail(fmt.Errorf("the image %s failed", j.imageID))
			return
		}
		t := time.NewTimer(s.cfg.PollInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}
