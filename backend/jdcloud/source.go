package jdcloud

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
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
	OSSEndpoint        string
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
}

var (
	_ backend.Source          = (*Source)(nil)
	_ backend.SnapshotDeleter = (*Source)(nil)
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
	s := &Source{cfg: cfg, api: api, region: parts[2], bucket: bucket, logger: cfg.Logger, images: map[string]Image{}, known: map[string]bool{}}
	if ossRegion != s.region {
		s.logger.Warn("jdcloud: the bucket is in another region than the API; exports to it fail (CONFLICT)", "api_region", s.region, "bucket_region", ossRegion)
	}
	tlsConfig := &tls.Config{RootCAs: cfg.RootCAs, InsecureSkipVerify: cfg.InsecureSkipVerify, MinVersion: tls.VersionTLS12}
	s.http = &httprange.Client{
		HTTP: &http.Client{Transport: httprange.NewTransport(tlsConfig)}, Auth: signer{s},
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
	return bucket, region, endpoint, nil
}

// signer signs every API request (they carry no body: the listing is all
// GETs).
type signer struct{ s *Source }

func (a signer) Authorize(_ context.Context, req *http.Request) error {
	return Sign(req, nil, a.s.cfg.Credentials, a.s.region, "vm", time.Now().UTC(), rand.Text())
}

// Renew has nothing to renew: keys do not expire.
func (signer) Renew(context.Context) error { return nil }

// get calls the API and decodes its result.
func (s *Source) get(ctx context.Context, route string, q url.Values, out any) error {
	u := s.api.JoinPath(route)
	u.RawQuery = EncodeQuery(q)
	resp, err := s.http.Do(ctx, func(ctx context.Context) (*http.Request, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
		if err == nil {
			req.Header.Set("Accept", "application/json")
		}
		return req, err
	})
	if err != nil {
		return fmt.Errorf("jdcloud: GET %s: %w", route, err)
	}
	defer resp.Body.Close()
	if _, err := Decode(resp.Body, resp.StatusCode, out); err != nil {
		return fmt.Errorf("jdcloud: GET %s: %w: %w", route, backend.ErrUnavailable, err)
	}
	return nil
}

// export is one finished export whose object is in the bucket.
type export struct {
	task   TaskInfo
	object s3.ObjectInfo
	image  Image
}

// maxTasks bounds the listing of a region's tasks.
const maxTasks = 10000

// exports are the finished exports whose object the bucket holds.
func (s *Source) exports(ctx context.Context) ([]export, error) {
	var tasks []TaskInfo
	for page := 1; ; page++ {
		var res ImageTasksResult
		q := url.Values{"taskAction": {"ExportImage"}, "taskStatus": {TaskFinished}, "pageNumber": {strconv.Itoa(page)}, "pageSize": {"100"}}
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
	var out []export
	for _, t := range tasks {
		if !t.IsExport() || t.TaskStatus != TaskFinished {
			continue
		}
		keys := t.Objects()
		if len(keys) == 0 {
			continue
		}
		obj, ok := byKey[keys[0]] // the system disk; isAllDisk exports are not split yet
		if !ok {
			continue // deleted (rmdir), or not in this bucket
		}
		img, err := s.image(ctx, t.ImageID)
		if err != nil && !errors.Is(err, backend.ErrNotFound) {
			return nil, err
		}
		out = append(out, export{task: t, object: obj, image: img})
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

// snapshotID names an export; the object's ETag is in it, so an object
// written again is another snapshot.
func snapshotID(e export) string {
	etag := strings.Trim(e.object.ETag, `"`)
	if len(etag) > 12 {
		etag = etag[:12]
	}
	return "task-" + string(e.task.TaskID) + "-" + etag
}

// Snapshots are a VM's exports, oldest first, named after their images.
func (s *Source) Snapshots(ctx context.Context, vmID string) ([]backend.Snapshot, error) {
	exps, err := s.exports(ctx)
	if err != nil {
		return nil, err
	}
	var out []backend.Snapshot
	for _, e := range exps {
		if vmOf(e) != vmID {
			continue
		}
		created, _ := e.task.Finished()
		name := e.image.Name
		if name == "" {
			name = path.Base(e.object.Key)
		}
		out = append(out, backend.Snapshot{ID: snapshotID(e), Name: name, Created: created, Disks: []backend.DiskInfo{{ID: "disk", Device: "disk"}}})
	}
	s.mu.Lock()
	known := s.known[vmID] || len(out) > 0
	s.known[vmID] = known
	s.mu.Unlock()
	if !known {
		return nil, fmt.Errorf("jdcloud: vm %q: %w", redact.Cut(vmID, 64), backend.ErrNotFound)
	}
	slices.SortStableFunc(out, func(a, b backend.Snapshot) int { return a.Created.Compare(b.Created) })
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

// DeleteSnapshot deletes the exported object (the image stays: it is the
// user's, and exporting it again needs it).
func (s *Source) DeleteSnapshot(ctx context.Context, vmID, snapshotID string) error {
	e, err := s.find(ctx, vmID, snapshotID)
	if err != nil {
		return err
	}
	if err := s.s3.Remove(ctx, s.bucket, e.object.Key); err != nil {
		return fmt.Errorf("jdcloud: delete the export %s: %w", e.object.Key, err)
	}
	s.logger.Info("jdcloud: export deleted", "object", e.object.Key, "task", string(e.task.TaskID))
	return nil
}

// Close has no session to end.
func (s *Source) Close() error { return nil }
