package kubevirt

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// BackupTTL is the ttlDuration of the VirtualMachineBackups mkdir makes: the
// controller completes the backup and removes its export after it, and the
// directory goes with the export.
const BackupTTL = 8 * time.Hour

// Annotations mkdir puts on a backup it makes: the backup (and checkpoint)
// an incremental backup's changes are counted from. The API records only
// the checkpoint a backup creates, not the one it started from.
const (
	annBaseBackup     = "vmexportfs.io/base-backup"
	annBaseCheckpoint = "vmexportfs.io/base-checkpoint"
)

var _ backend.DeltaOpener = (*Source)(nil)

func trackerName(vmID string) string {
	n := vmID + "-vmexportfs"
	if len(n) > 63 {
		n = n[:63]
	}
	return n
}

// hasBackupAPI reports (once answered) whether the cluster serves
// VirtualMachineBackup (KubeVirt v1.8+ with the feature on).
func (s *Source) hasBackupAPI(ctx context.Context) (bool, error) {
	err := s.kube(ctx, http.MethodGet, "backup.kubevirt.io", "virtualmachinebackups", "", nil, nil)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, backend.ErrNotFound):
		return false, nil
	}
	return false, err
}

// createBackup makes a Pull-mode VirtualMachineBackup of vmID through the
// VM's tracker (full the first time, then incremental from the tracker's
// latest checkpoint) and waits for its export.
func (s *Source) createBackup(ctx context.Context, vmID, name string) (snap backend.Snapshot, err error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.ReadyTimeout)
	defer cancel()
	if err := s.vmExists(ctx, vmID); err != nil {
		return backend.Snapshot{}, fmt.Errorf("create backup %s/%s: %w", vmID, name, err)
	}
	tracker := trackerName(vmID)
	var tr trackerObject
	err = s.kube(ctx, http.MethodGet, "backup.kubevirt.io", "virtualmachinebackuptrackers", url.PathEscape(tracker), nil, &tr)
	if errors.Is(err, backend.ErrNotFound) {
		err = s.kube(ctx, http.MethodPost, "backup.kubevirt.io", "virtualmachinebackuptrackers", "", map[string]any{
			"kind": "VirtualMachineBackupTracker", "metadata": map[string]any{"name": tracker},
			"spec": map[string]any{"source": map[string]any{"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": vmID}},
		}, &tr)
	}
	if err != nil {
		return backend.Snapshot{}, fmt.Errorf("create backup %s/%s: tracker: %w", vmID, name, err)
	}
	if tr.Spec.Source.Name != vmID {
		return backend.Snapshot{}, fmt.Errorf("create backup %s/%s: %w: tracker %s belongs to %s", vmID, name, backend.ErrExists, tracker, tr.Spec.Source.Name)
	}
	checkpoint, base := "", ""
	if tr.Status != nil && tr.Status.LatestCheckpoint != nil {
		checkpoint = tr.Status.LatestCheckpoint.Name
	}
	if checkpoint != "" {
		var l struct{ Items []backupObject }
		if err := s.kube(ctx, http.MethodGet, "backup.kubevirt.io", "virtualmachinebackups", "", nil, &l); err != nil {
			return backend.Snapshot{}, fmt.Errorf("create backup %s/%s: %w", vmID, name, err)
		}
		for _, b := range l.Items {
			if b.Status != nil && b.Status.CheckpointName == checkpoint {
				base = b.Metadata.Name
			}
		}
	}
	token := rand.Text()
	s.cfg.Secrets.AddRenewed(token)
	if err := s.kube(ctx, http.MethodPost, "", "secrets", "", map[string]any{
		"apiVersion": "v1", "kind": "Secret",
		"metadata":   map[string]any{"name": tokenSecretName(name)},
		"stringData": map[string]any{"token": token},
	}, nil); err != nil {
		return backend.Snapshot{}, fmt.Errorf("create backup token secret for %s: %w", name, err)
	}
	defer func() {
		if err == nil {
			return
		}
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if derr := s.deleteBackup(cctx, name); derr != nil {
			s.logger.Warn("kubevirt: cleaning up after failed backup creation", "vm", vmID, "backup", name, "err", derr)
		}
	}()
	var created backupObject
	if err := s.kube(ctx, http.MethodPost, "backup.kubevirt.io", "virtualmachinebackups", "", map[string]any{
		"kind": "VirtualMachineBackup",
		"metadata": map[string]any{"name": name, "annotations": map[string]any{
			annBaseBackup: base, annBaseCheckpoint: checkpoint}},
		"spec": map[string]any{
			"source":         map[string]any{"apiGroup": "backup.kubevirt.io", "kind": "VirtualMachineBackupTracker", "name": tracker},
			"mode":           "Pull",
			"tokenSecretRef": tokenSecretName(name),
			"ttlDuration":    BackupTTL.String(),
		},
	}, &created); err != nil {
		return backend.Snapshot{}, fmt.Errorf("create backup %s/%s: %w", vmID, name, err)
	}
	kind := "full"
	if base != "" {
		kind = "incremental from " + base
	}
	s.logger.Info("kubevirt: backup created", "vm", vmID, "backup", name, "kind", kind)
	var disks []backend.DiskInfo
	err = s.wait(ctx, "export of backup "+name+" Ready", func(ctx context.Context) (bool, error) {
		exports, err := s.listExports(ctx)
		if err != nil {
			return false, err
		}
		for _, e := range exports {
			if e.Spec.Source.Kind == "VirtualMachineBackup" && e.Spec.Source.Name == name {
				d, ok := disksOf(e.Status, s.cfg.Internal)
				disks = d
				return ok, nil
			}
		}
		return false, nil
	})
	if err != nil {
		return backend.Snapshot{}, fmt.Errorf("create backup %s/%s: %w", vmID, name, err)
	}
	return backend.Snapshot{ID: name, Name: name, Created: created.Metadata.CreationTimestamp, Disks: disks}, nil
}

// deleteBackup deletes a backup (its export is the backup's), the export
// if it outlived it, and the token secret.
func (s *Source) deleteBackup(ctx context.Context, name string) error {
	if exports, err := s.listExports(ctx); err == nil {
		for _, e := range exports {
			if e.Spec.Source.Kind == "VirtualMachineBackup" && e.Spec.Source.Name == name {
				if err := s.kube(ctx, http.MethodDelete, "export.kubevirt.io", "virtualmachineexports", e.Metadata.Name, nil, nil); err != nil && !errors.Is(err, backend.ErrNotFound) {
					return err
				}
			}
		}
	}
	for _, step := range []struct{ group, resource, name string }{
		{"backup.kubevirt.io", "virtualmachinebackups", name},
		{"", "secrets", tokenSecretName(name)},
	} {
		err := s.kube(ctx, http.MethodDelete, step.group, step.resource, step.name, nil, nil)
		if err != nil && !errors.Is(err, backend.ErrNotFound) {
			return fmt.Errorf("%s %s: %w", step.resource, step.name, err)
		}
	}
	return nil
}

// OpenDelta gives an incremental backup's dirty extents (dirty and
// dirty,zero: the changes since its checkpoint) when base is the backup
// that checkpoint came from; any other pair is ErrUnsupported (the fs then
// makes a larger, still exact, delta), and ErrNotFound when either is gone.
func (s *Source) OpenDelta(ctx context.Context, ref, base backend.DiskRef) (backend.Disk, extent.Map, error) {
	if ref.VM != base.VM {
		return nil, extent.Map{}, fmt.Errorf("open delta: %w: different VMs", backend.ErrUnsupported)
	}
	for _, r := range []backend.DiskRef{base, ref} {
		if _, err := s.findExport(ctx, r.VM, r.Snapshot); err != nil {
			return nil, extent.Map{}, fmt.Errorf("open delta: %w", err)
		}
	}
	b, err := s.getBackup(ctx, ref.VM, ref.Snapshot)
	if err != nil || b.Metadata.Annotations[annBaseBackup] != base.Snapshot || base.Snapshot == "" {
		return nil, extent.Map{}, fmt.Errorf("open delta %s since %s: %w: not an incremental backup from it", ref.Snapshot, base.Snapshot, backend.ErrUnsupported)
	}
	if bb, err := s.getBackup(ctx, base.VM, base.Snapshot); err != nil || bb.Status == nil || b.Metadata.Annotations[annBaseCheckpoint] != bb.Status.CheckpointName {
		return nil, extent.Map{}, fmt.Errorf("open delta %s since %s: %w: checkpoint does not match", ref.Snapshot, base.Snapshot, backend.ErrUnsupported)
	}
	d, err := s.OpenDisk(ctx, ref)
	if err != nil {
		return nil, extent.Map{}, err
	}
	bd, ok := d.(*backupDisk)
	if !ok || !bd.incremental {
		_ = d.Close()
		return nil, extent.Map{}, fmt.Errorf("open delta %s since %s: %w: the export's map is not incremental", ref.Snapshot, base.Snapshot, backend.ErrUnsupported)
	}
	return d, bd.dirty, nil
}
