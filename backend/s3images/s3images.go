// Package s3images is the s3+ platform: a bucket (and prefix) of exported
// disk images. Every QCOW2 object (by its magic) and every raw image (by
// its name, .img or .raw) under the prefix is a VM with one snapshot, the
// object as it is now; a QCOW2 object is read through the qcow2 reader,
// so its holes are never fetched.
package s3images

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"path"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/qcow2"
	"github.com/vmexportfs/vmexportfs/backend/redact"
	"github.com/vmexportfs/vmexportfs/backend/s3"
)

// Config is a bucket and the prefix of its images.
type Config struct {
	S3     s3.Config
	Bucket string
	Prefix string // "" or ending in "/": the "directory" of the images
	Logger *slog.Logger
}

// Source lists and opens the images of one bucket prefix.
type Source struct {
	cfg    Config
	client *s3.Client
	logger *slog.Logger

	mu    sync.Mutex
	kinds map[string]kind // by key and ETag: what the object's first bytes said
}

// kind is what an object holds.
type kind int

const (
	notImage kind = iota
	rawImage
	qcow2Image
)

// probeBytes is how much of an object is read to tell a QCOW2 image.
const probeBytes = 512

// maxImages bounds a listing: more objects than this under one prefix is
// not a folder of exports.
const maxImages = 100000

var _ backend.Source = (*Source)(nil)

// New connects and lists the prefix once, so wrong keys, a wrong region or
// an untrusted certificate fail the mount.
func New(ctx context.Context, cfg Config) (*Source, error) {
	if cfg.Bucket == "" || strings.ContainsAny(cfg.Bucket, "/?#") {
		return nil, fmt.Errorf("s3images: bucket %q: %w", cut(cfg.Bucket), backend.ErrInvalid)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	cfg.S3.Logger = cfg.Logger
	client, err := s3.New(ctx, cfg.S3)
	if err != nil {
		return nil, err
	}
	s := &Source{cfg: cfg, client: client, logger: cfg.Logger, kinds: map[string]kind{}}
	if _, err := s.images(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// Close has nothing to release: S3 has no session.
func (s *Source) Close() error { return nil }

// image is one listed image object.
type image struct {
	info s3.ObjectInfo
	kind kind
}

// vmID is the VM id of an object: its key under the prefix, escaped into
// one path segment.
func (s *Source) vmID(key string) string {
	return url.PathEscape(strings.TrimPrefix(key, s.cfg.Prefix))
}

// snapshotID ties the one snapshot to the object's content: a replaced
// object is another snapshot, so nothing known of the old one is reused.
func snapshotID(info s3.ObjectInfo) string {
	etag := strings.Trim(info.ETag, `"`)
	if len(etag) > 16 {
		etag = etag[:16]
	}
	return "etag-" + etag
}

// images lists the prefix and keeps the image objects.
func (s *Source) images(ctx context.Context) ([]image, error) {
	objs, err := s.client.List(ctx, s.cfg.Bucket, s.cfg.Prefix)
	if err != nil {
		return nil, fmt.Errorf("s3images: list %s/%s: %w", s.cfg.Bucket, s.cfg.Prefix, err)
	}
	if len(objs) > maxImages {
		return nil, fmt.Errorf("s3images: %s/%s: %w: more than %d objects", s.cfg.Bucket, s.cfg.Prefix, backend.ErrUnavailable, maxImages)
	}
	var out []image
	for _, o := range objs {
		if strings.HasSuffix(o.Key, "/") || o.Size <= 0 {
			continue
		}
		k, err := s.kindOf(ctx, o)
		if err != nil {
			s.logger.Warn("s3images: object skipped", "key", cut(o.Key), "err", err.Error())
			continue
		}
		if k != notImage {
			out = append(out, image{info: o, kind: k})
		}
	}
	return out, nil
}

// kindOf tells an image by its magic (QCOW2) or its name (raw), reading
// the first bytes of each object once per ETag.
func (s *Source) kindOf(ctx context.Context, o s3.ObjectInfo) (kind, error) {
	cacheKey := o.Key + "\x00" + o.ETag
	s.mu.Lock()
	k, ok := s.kinds[cacheKey]
	s.mu.Unlock()
	if ok {
		return k, nil
	}
	obj, err := s.client.Object(ctx, s.cfg.Bucket, o.Key)
	if err != nil {
		return notImage, err
	}
	first := make([]byte, min(probeBytes, obj.Size()))
	if err := obj.ReadAt(ctx, first, 0); err != nil {
		return notImage, err
	}
	switch ext := strings.ToLower(path.Ext(o.Key)); {
	case qcow2.Probe(first):
		k = qcow2Image
	case ext == ".img" || ext == ".raw":
		k = rawImage
	default:
		k = notImage
	}
	s.mu.Lock()
	s.kinds[cacheKey] = k
	s.mu.Unlock()
	return k, nil
}

// VMs lists one VM per image object.
func (s *Source) VMs(ctx context.Context) ([]backend.VM, error) {
	imgs, err := s.images(ctx)
	if err != nil {
		return nil, err
	}
	var out []backend.VM
	for _, im := range imgs {
		out = append(out, backend.VM{ID: s.vmID(im.info.Key), Name: path.Base(im.info.Key)})
	}
	return out, nil
}

// find is the listed image of a VM id.
func (s *Source) find(ctx context.Context, vmID string) (image, error) {
	imgs, err := s.images(ctx)
	if err != nil {
		return image{}, err
	}
	i := slices.IndexFunc(imgs, func(im image) bool { return s.vmID(im.info.Key) == vmID })
	if i < 0 {
		return image{}, fmt.Errorf("s3images: image %q: %w", cut(vmID), backend.ErrNotFound)
	}
	return imgs[i], nil
}

// diskID is the one disk of an image's snapshot.
const diskID = "disk"

// Snapshots is the image as it is now: one snapshot, named after the
// object, dated by its Last-Modified.
func (s *Source) Snapshots(ctx context.Context, vmID string) ([]backend.Snapshot, error) {
	im, err := s.find(ctx, vmID)
	if err != nil {
		return nil, err
	}
	return []backend.Snapshot{{
		ID: snapshotID(im.info), Name: path.Base(im.info.Key), Created: im.info.LastModified,
		Disks: []backend.DiskInfo{{ID: diskID, Device: diskID}},
	}}, nil
}

// OpenDisk opens the object pinned to the listed ETag: a QCOW2 through the
// reader, a raw image as it is (every byte data: S3 cannot say where the
// holes are).
func (s *Source) OpenDisk(ctx context.Context, ref backend.DiskRef) (backend.Disk, error) {
	im, err := s.find(ctx, ref.VM)
	if err != nil {
		return nil, err
	}
	if ref.Snapshot != snapshotID(im.info) || ref.Disk != diskID {
		return nil, fmt.Errorf("s3images: %s/%s/%s: %w (the object was replaced?)", cut(ref.VM), cut(ref.Snapshot), cut(ref.Disk), backend.ErrNotFound)
	}
	obj, err := s.client.Object(ctx, s.cfg.Bucket, im.info.Key)
	if err != nil {
		return nil, err
	}
	if strings.Trim(obj.ETag(), `"`) != strings.Trim(im.info.ETag, `"`) {
		return nil, fmt.Errorf("s3images: %s: %w: replaced since it was listed", cut(im.info.Key), backend.ErrNotFound)
	}
	name := s.cfg.Bucket + "/" + im.info.Key
	if im.kind == rawImage {
		return &rawDisk{Object: obj}, nil
	}
	img, err := qcow2.Open(ctx, obj, qcow2.Options{Logger: s.logger, Name: name})
	if err != nil {
		if errors.Is(err, backend.ErrUnsupported) {
			s.logger.Warn("s3images: image not readable", "object", cut(name), "err", err.Error())
		}
		return nil, fmt.Errorf("s3images: %s: %w", cut(name), err)
	}
	return img, nil
}

// rawDisk is a raw image object: all data.
type rawDisk struct {
	*s3.Object
	closed atomic.Bool
}

func (d *rawDisk) Allocated() extent.Map { return extent.Full(d.Size()) }

func (d *rawDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if d.closed.Load() {
		return fmt.Errorf("s3images: %w: disk closed", backend.ErrUnavailable)
	}
	return d.Object.ReadAt(ctx, p, off)
}

func (d *rawDisk) Close() error {
	d.closed.Store(true)
	return nil
}

func cut(s string) string { return redact.Cut(s, 120) }
