package kubevirt

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
)

// DefaultBackupConnectTimeout bounds the wait for a backup export's map
// while virt-launcher has not connected its tunnel (the server answers 503
// until then); the launcher's reconnect backoff grows to 5 minutes.
const DefaultBackupConnectTimeout = 6 * time.Minute

// extentKind reads a map extent's description: a comma-separated set of
// flags. "zero" reads as zeros (zero, dirty,zero, hole,zero); everything
// else is data: data, clean (unchanged since the checkpoint, not zeros),
// dirty, and anything unknown (an unknown word must not hide data).
// "dirty" marks a change since the backup's checkpoint.
func extentKind(desc string) (data, dirty bool) {
	data = true
	for _, w := range strings.Split(desc, ",") {
		switch strings.TrimSpace(w) {
		case "zero":
			data = false
		case "dirty":
			dirty = true
		}
	}
	return data, dirty
}

// backupMap is one disk's map as a backup export describes it.
type backupMap struct {
	size  int64
	alloc extent.Map // extents that hold data
	dirty extent.Map // extents changed since the checkpoint (incremental)
	incr  bool       // the map used incremental descriptions
}

// errLauncher is a 503 of a backup route: virt-launcher not connected yet.
var errLauncher = errors.New("backup source not connected")

// getMapPage fetches one page at off; a 503 is errLauncher.
func (c *exportConn) getMapPage(ctx context.Context, mapURL string, off int64, length int64) (mapPage, error) {
	u, err := url.Parse(mapURL)
	if err != nil {
		return mapPage{}, fmt.Errorf("backup map url: %w", backend.ErrInvalid)
	}
	q := u.Query()
	q.Set("offset", strconv.FormatInt(off, 10))
	if length >= 0 {
		q.Set("length", strconv.FormatInt(length, 10))
	}
	q.Set("page_size", strconv.Itoa(mapPageSize))
	u.RawQuery = q.Encode()
	resp, err := c.client().Do(ctx, func(ctx context.Context) (*http.Request, error) {
		return http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	})
	if err != nil {
		if se := (*httprange.StatusError)(nil); errors.As(err, &se) && se.Code == http.StatusServiceUnavailable {
			return mapPage{}, fmt.Errorf("%w: %w", errLauncher, err)
		}
		return mapPage{}, fmt.Errorf("backup map: %w", err)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxMapBody+1))
	resp.Body.Close()
	if err != nil {
		return mapPage{}, fmt.Errorf("backup map: %w: %w", backend.ErrUnavailable, err)
	}
	if len(body) > maxMapBody {
		return mapPage{}, fmt.Errorf("backup map: %w: page too large", backend.ErrInvalid)
	}
	p, err := decodeMapPage(body)
	if err != nil {
		return mapPage{}, fmt.Errorf("backup map: %w: %w", backend.ErrInvalid, err)
	}
	return p, nil
}

// firstMapPage waits, up to the connection's connect timeout, for the map
// to stop answering 503, logging progress.
func (c *exportConn) firstMapPage(ctx context.Context, mapURL, vol string, length int64) (mapPage, error) {
	limit := c.connectWait
	if limit <= 0 {
		limit = DefaultBackupConnectTimeout
	}
	start := time.Now()
	delay := time.Second
	for {
		p, err := c.getMapPage(ctx, mapURL, 0, length)
		if err == nil || !errors.Is(err, errLauncher) {
			if err == nil && time.Since(start) > time.Second {
				c.logger.Info("kubevirt: backup source connected", "export", c.name, "disk", vol, "waited", time.Since(start).Round(time.Second).String())
			}
			return p, err
		}
		waited := time.Since(start)
		if waited+delay > limit {
			return mapPage{}, fmt.Errorf("backup map of %s/%s: %w: virt-launcher not connected after %s (--backup-connect-timeout %s): %w",
				c.name, vol, backend.ErrUnavailable, waited.Round(time.Second), limit, err)
		}
		c.logger.Info("kubevirt: waiting for the backup source (virt-launcher) to connect", "export", c.name, "disk", vol,
			"waited", waited.Round(time.Second).String(), "limit", limit.String())
		select {
		case <-ctx.Done():
			return mapPage{}, ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, 15*time.Second)
	}
}

const maxBackupSize = 1 << 56

// readBackupMap pages through a backup map. size < 0: unknown, taken from
// the map's end (a backup export has no disk.img to HEAD).
func (c *exportConn) readBackupMap(ctx context.Context, mapURL, vol string, size int64) (backupMap, error) {
	var data, dirty []extent.Extent
	var out backupMap
	length := int64(-1)
	if size >= 0 {
		length = size
	}
	p, err := c.firstMapPage(ctx, mapURL, vol, length)
	if err != nil {
		return backupMap{}, err
	}
	end, cur := int64(0), int64(0)
	for page := 1; ; page++ {
		for _, e := range p.Extents {
			if e.Length > maxBackupSize || e.Offset > maxBackupSize || e.Offset != uint64(end) && size < 0 {
				return backupMap{}, fmt.Errorf("backup map: %w: extent %d+%d does not follow %d", backend.ErrInvalid, e.Offset, e.Length, end)
			}
			if size >= 0 && (e.Offset > uint64(size) || e.Length > uint64(size)-e.Offset) {
				return backupMap{}, fmt.Errorf("backup map: %w: extent %d+%d beyond size %d", backend.ErrInvalid, e.Offset, e.Length, size)
			}
			x := extent.Extent{Off: int64(e.Offset), Len: int64(e.Length)}
			end = max(end, x.Off+x.Len)
			isData, isDirty := extentKind(e.Description)
			if isData {
				data = append(data, x)
			}
			if isDirty {
				dirty = append(dirty, x)
			}
			if isDirty || strings.Contains(e.Description, "clean") {
				out.incr = true
			}
		}
		if p.NextOffset == nil {
			break
		}
		if *p.NextOffset <= uint64(cur) || *p.NextOffset < uint64(end) && size < 0 || *p.NextOffset > maxBackupSize || size >= 0 && *p.NextOffset > uint64(size) || len(p.Extents) == 0 {
			return backupMap{}, fmt.Errorf("backup map: %w: next_offset %d does not advance from %d", backend.ErrInvalid, *p.NextOffset, end)
		}
		if page == maxMapPages {
			return backupMap{}, fmt.Errorf("backup map: %w: more than %d pages", backend.ErrInvalid, maxMapPages)
		}
		off := int64(*p.NextOffset)
		cur = off
		ln := int64(-1)
		if size >= 0 {
			if off >= size {
				break
			}
			ln = size - off
		}
		if p, err = c.getMapPage(ctx, mapURL, off, ln); err != nil {
			return backupMap{}, err
		}
	}
	if size < 0 {
		size = end
	}
	out.size = size
	m, rep, err := extent.NormalizeReport(data, size)
	if err != nil {
		return backupMap{}, fmt.Errorf("backup map: %w: %w", backend.ErrInvalid, err)
	}
	if rep.Suspicious() {
		c.logger.Warn(fmt.Sprintf("kubevirt: chunk map normalized: %d unsorted/overlapping extents", rep.Unsorted+rep.Overlapping),
			"export", c.name, "unsorted", rep.Unsorted, "overlapping", rep.Overlapping, "extents", m.Len())
	}
	out.alloc = m
	if out.dirty, _, err = extent.NormalizeReport(dirty, size); err != nil {
		return backupMap{}, fmt.Errorf("backup map: %w: %w", backend.ErrInvalid, err)
	}
	return out, nil
}

// openBackupDisk opens a disk of a VirtualMachineBackup export: the size and
// holes from the map, reads through the data route.
func openBackupDisk(ctx context.Context, conn *exportConn, vol, mapURL, dataURL string, owned bool) (*backupDisk, error) {
	bm, err := conn.readBackupMap(ctx, mapURL, vol, -1)
	if err != nil {
		return nil, conn.explain(fmt.Errorf("open disk %s/%s: %w", conn.name, vol, err))
	}
	opts := httprange.DiskOptions{Name: "kubevirt: backup export " + conn.name, Explain: conn.explain}
	if owned {
		opts.OnClose = conn.closeIdle
	}
	return &backupDisk{Disk: conn.client().QueryDisk(dataURL, bm.size, bm.alloc, opts), dirty: bm.dirty, incremental: bm.incr}, nil
}

// backupDisk is a backup export's disk; dirty is what changed since the
// backup's checkpoint (incremental backups).
type backupDisk struct {
	*httprange.Disk
	dirty       extent.Map
	incremental bool
}

type backupObject struct {
	Metadata struct {
		Name              string            `json:"name"`
		UID               string            `json:"uid"`
		CreationTimestamp time.Time         `json:"creationTimestamp"`
		Annotations       map[string]string `json:"annotations"`
	} `json:"metadata"`
	Spec struct {
		Source typedRef `json:"source"`
	} `json:"spec"`
	Status *struct {
		Type           string `json:"type"`
		CheckpointName string `json:"checkpointName"`
	} `json:"status"`
}

// backupOf is ErrNotFound unless name is a VirtualMachineBackup of vmID
// (directly or through a VirtualMachineBackupTracker of it).
func (s *Source) backupOf(ctx context.Context, vmID, name string) error {
	_, err := s.getBackup(ctx, vmID, name)
	return err
}

func (s *Source) getBackup(ctx context.Context, vmID, name string) (backupObject, error) {
	var b backupObject
	if err := s.kube(ctx, http.MethodGet, "backup.kubevirt.io", "virtualmachinebackups", url.PathEscape(name), nil, &b); err != nil {
		return backupObject{}, fmt.Errorf("backup %s: %w", name, err)
	}
	if s.backupVM(ctx, b) != vmID {
		return backupObject{}, fmt.Errorf("backup %s is not a backup of %s: %w", name, vmID, backend.ErrNotFound)
	}
	return b, nil
}

// backupVM is the VM a backup is of: its source, or its tracker's.
func (s *Source) backupVM(ctx context.Context, b backupObject) string {
	switch b.Spec.Source.Kind {
	case "VirtualMachine":
		return b.Spec.Source.Name
	case "VirtualMachineBackupTracker":
		var tr trackerObject
		if err := s.kube(ctx, http.MethodGet, "backup.kubevirt.io", "virtualmachinebackuptrackers", url.PathEscape(b.Spec.Source.Name), nil, &tr); err != nil {
			return ""
		}
		if tr.Spec.Source.Kind == "VirtualMachine" {
			return tr.Spec.Source.Name
		}
	}
	return ""
}

type trackerObject struct {
	Metadata objectMeta `json:"metadata"`
	Spec     struct {
		Source typedRef `json:"source"`
	} `json:"spec"`
	Status *struct {
		LatestCheckpoint *struct {
			Name string `json:"name"`
		} `json:"latestCheckpoint"`
	} `json:"status"`
}

// backupSnapshots are the VM's VirtualMachineBackups that have a Ready
// export; a cluster without the backup API has none.
func (s *Source) backupSnapshots(ctx context.Context, vmID string, exports []exportObject) []backend.Snapshot {
	var l struct{ Items []backupObject }
	if err := s.kube(ctx, http.MethodGet, "backup.kubevirt.io", "virtualmachinebackups", "", nil, &l); err != nil {
		if !errors.Is(err, backend.ErrNotFound) {
			s.logger.Debug("kubevirt: cannot list VirtualMachineBackups", "err", err)
		}
		return nil
	}
	var out []backend.Snapshot
	for _, b := range l.Items {
		if s.backupVM(ctx, b) != vmID {
			continue
		}
		for _, e := range exports {
			if e.Spec.Source.Kind == "VirtualMachineBackup" && e.Spec.Source.Name == b.Metadata.Name {
				if disks, ok := disksOf(e.Status, s.cfg.Internal); ok {
					out = append(out, backend.Snapshot{ID: b.Metadata.Name, Name: b.Metadata.Name, Created: b.Metadata.CreationTimestamp, Disks: disks})
					break
				}
			}
		}
	}
	return out
}
