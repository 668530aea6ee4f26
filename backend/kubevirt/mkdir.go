package kubevirt

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"time"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/redact"
)

// dnsLabel is what Kubernetes accepts as an object name (kept to a label so
// derived names such as <name>-export-token stay valid).
var dnsLabel = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$`)

func tokenSecretName(snapshot string) string { return snapshot + "-export-token" }

// CreateSnapshot creates a VirtualMachineSnapshot and an export of it (owned
// by the snapshot), and waits for both to be Ready. A snapshot of the VM that
// exists already without an export (taken by a scheduler, say) is adopted:
// only the export is made, and a failure leaves the snapshot as it was.
func (s *Source) CreateSnapshot(ctx context.Context, vmID, name string) (snap backend.Snapshot, err error) {
	if name == LiveSnapshot || !dnsLabel.MatchString(name) {
		return backend.Snapshot{}, fmt.Errorf("create snapshot %q: %w: want a lowercase DNS label other than %q", name, backend.ErrInvalid, LiveSnapshot)
	}
	// Where the cluster has VirtualMachineBackup, a directory is a backup:
	// it has a map (holes) and, from the second one, change tracking.
	if ok, err := s.hasBackupAPI(ctx); err != nil {
		return backend.Snapshot{}, fmt.Errorf("create snapshot %s/%s: %w", vmID, name, err)
	} else if ok {
		return s.createBackup(ctx, vmID, name)
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.ReadyTimeout)
	defer cancel()
	snapObj := map[string]any{
		"kind":     "VirtualMachineSnapshot",
		"metadata": map[string]any{"name": name},
		"spec": map[string]any{"source": map[string]any{
			"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": vmID}},
	}
	var created snapshotObject
	adopted := false
	err = s.kube(ctx, http.MethodPost, "snapshot.kubevirt.io", "virtualmachinesnapshots", "", snapObj, &created)
	if errors.Is(err, backend.ErrExists) {
		created, err = s.adoptable(ctx, vmID, name)
		adopted = err == nil
	}
	if err != nil {
		return backend.Snapshot{}, fmt.Errorf("create snapshot %s/%s: %w", vmID, name, err)
	}
	defer func() {
		if err == nil {
			return
		}
		// Half-made objects would block a retry with the same name; the
		// caller's context may be spent, so clean up on a short one of ours.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		derr := s.deleteExport(cctx, name)
		if !adopted && derr == nil {
			derr = s.DeleteSnapshot(cctx, vmID, name)
		}
		if derr != nil {
			s.logger.Warn("kubevirt: cleaning up after failed snapshot creation", "vm", vmID, "snapshot", name, "err", derr)
		}
	}()
	if adopted {
		s.logger.Info("kubevirt: exporting an existing snapshot", "vm", vmID, "snapshot", name)
	}
	s.mu.Lock()
	snapVersion := s.versions["snapshot.kubevirt.io"]
	s.mu.Unlock()
	owner := []map[string]any{{
		"apiVersion": "snapshot.kubevirt.io/" + snapVersion, "kind": "VirtualMachineSnapshot",
		"name": name, "uid": created.Metadata.UID,
	}}
	err = s.wait(ctx, "snapshot "+name+" readyToUse", func(ctx context.Context) (bool, error) {
		var cur snapshotObject
		if err := s.kube(ctx, http.MethodGet, "snapshot.kubevirt.io", "virtualmachinesnapshots", name, nil, &cur); err != nil {
			return false, err
		}
		return cur.Status != nil && cur.Status.ReadyToUse, nil
	})
	if err != nil {
		return backend.Snapshot{}, fmt.Errorf("create snapshot %s/%s: %w", vmID, name, err)
	}
	token := rand.Text()
	s.cfg.Secrets.AddRenewed(token)
	secret := map[string]any{
		"apiVersion": "v1", "kind": "Secret",
		"metadata":   map[string]any{"name": tokenSecretName(name), "ownerReferences": owner},
		"stringData": map[string]any{"token": token},
	}
	if err := s.kube(ctx, http.MethodPost, "", "secrets", "", secret, nil); err != nil {
		return backend.Snapshot{}, fmt.Errorf("create export token secret for %s: %w", name, err)
	}
	export := map[string]any{
		"kind":     "VirtualMachineExport",
		"metadata": map[string]any{"name": name, "ownerReferences": owner},
		"spec": map[string]any{
			"source":         map[string]any{"apiGroup": "snapshot.kubevirt.io", "kind": "VirtualMachineSnapshot", "name": name},
			"tokenSecretRef": tokenSecretName(name),
		},
	}
	if err := s.kube(ctx, http.MethodPost, "export.kubevirt.io", "virtualmachineexports", "", export, nil); err != nil {
		return backend.Snapshot{}, fmt.Errorf("create export of %s: %w", name, err)
	}
	var disks []backend.DiskInfo
	err = s.wait(ctx, "export "+name+" Ready", func(ctx context.Context) (bool, error) {
		var cur exportObject
		if err := s.kube(ctx, http.MethodGet, "export.kubevirt.io", "virtualmachineexports", name, nil, &cur); err != nil {
			return false, err
		}
		d, ok := disksOf(cur.Status, s.cfg.Internal)
		disks = d
		if cur.Status != nil && cur.Status.Phase != "" {
			backend.ReportProgress(ctx, "waiting for export "+name+" Ready: phase "+redact.Cut(s.cfg.Secrets.Peer([]byte(cur.Status.Phase)), 32))
		}
		return ok, nil
	})
	if err != nil {
		return backend.Snapshot{}, fmt.Errorf("create snapshot %s/%s: %w", vmID, name, err)
	}
	return backend.Snapshot{ID: name, Name: name, Created: created.Metadata.CreationTimestamp, Disks: disks}, nil
}

// adoptable returns an existing snapshot of vmID that has no export yet;
// anything else keeps the name taken (ErrExists).
func (s *Source) adoptable(ctx context.Context, vmID, name string) (snapshotObject, error) {
	var sn snapshotObject
	if err := s.kube(ctx, http.MethodGet, "snapshot.kubevirt.io", "virtualmachinesnapshots", name, nil, &sn); err != nil {
		return snapshotObject{}, err
	}
	if sn.Spec.Source.Name != vmID {
		return snapshotObject{}, fmt.Errorf("%w: snapshot %s belongs to %s", backend.ErrExists, name, sn.Spec.Source.Name)
	}
	err := s.kube(ctx, http.MethodGet, "export.kubevirt.io", "virtualmachineexports", name, nil, nil)
	switch {
	case err == nil:
		return snapshotObject{}, fmt.Errorf("%w: snapshot %s already has an export", backend.ErrExists, name)
	case !errors.Is(err, backend.ErrNotFound):
		return snapshotObject{}, err
	}
	return sn, nil
}

// wait polls until ready or ctx (bounded by ReadyTimeout) ends.
func (s *Source) wait(ctx context.Context, what string, ready func(ctx context.Context) (bool, error)) error {
	t := time.NewTicker(s.cfg.PollInterval)
	defer t.Stop()
	backend.ReportProgress(ctx, "waiting for "+what)
	for {
		ok, err := ready(ctx)
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("wait for %s: %w", what, err)
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w: not ready within %s", what, backend.ErrUnavailable, s.cfg.ReadyTimeout)
		case <-t.C:
		}
	}
}

// DeleteSnapshot deletes the export, the token secret and the snapshot.
func (s *Source) DeleteSnapshot(ctx context.Context, vmID, snapshotID string) error {
	if snapshotID == LiveSnapshot {
		return fmt.Errorf("delete snapshot %s/%s: %w: the live export is not a snapshot", vmID, snapshotID, backend.ErrInvalid)
	}
	var sn snapshotObject
	if err := s.kube(ctx, http.MethodGet, "snapshot.kubevirt.io", "virtualmachinesnapshots", snapshotID, nil, &sn); err != nil {
		if errors.Is(err, backend.ErrNotFound) && s.backupOf(ctx, vmID, snapshotID) == nil {
			if err := s.deleteBackup(ctx, snapshotID); err != nil {
				return fmt.Errorf("delete backup %s/%s: %w", vmID, snapshotID, err)
			}
			return nil
		}
		return fmt.Errorf("delete snapshot %s/%s: %w", vmID, snapshotID, err)
	}
	if sn.Spec.Source.Name != vmID {
		return fmt.Errorf("delete snapshot %s/%s: %w: snapshot belongs to %s", vmID, snapshotID, backend.ErrNotFound, sn.Spec.Source.Name)
	}
	if err := s.deleteExport(ctx, snapshotID); err != nil {
		return fmt.Errorf("delete snapshot %s/%s: %w", vmID, snapshotID, err)
	}
	err := s.kube(ctx, http.MethodDelete, "snapshot.kubevirt.io", "virtualmachinesnapshots", snapshotID, nil, nil)
	if err != nil && !errors.Is(err, backend.ErrNotFound) {
		return fmt.Errorf("delete snapshot %s/%s: %w", vmID, snapshotID, err)
	}
	return nil
}

// deleteExport deletes a snapshot's export and its token secret, if there.
func (s *Source) deleteExport(ctx context.Context, snapshotID string) error {
	for _, step := range []struct{ group, resource, name string }{
		{"export.kubevirt.io", "virtualmachineexports", snapshotID},
		{"", "secrets", tokenSecretName(snapshotID)},
	} {
		err := s.kube(ctx, http.MethodDelete, step.group, step.resource, step.name, nil, nil)
		if err != nil && !errors.Is(err, backend.ErrNotFound) {
			return fmt.Errorf("%s %s: %w", step.resource, step.name, err)
		}
	}
	return nil
}
