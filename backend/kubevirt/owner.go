package kubevirt

import (
	"context"
	"fmt"
	"net/http"
	"net/url"

	"github.com/vmexportfs/vmexportfs/backend"
)

// vmExists is ErrNotFound when the namespace has no VirtualMachine vmID, so
// an unknown VM is not listed as one without snapshots.
func (s *Source) vmExists(ctx context.Context, vmID string) error {
	if err := s.kube(ctx, http.MethodGet, "kubevirt.io", "virtualmachines", url.PathEscape(vmID), nil, nil); err != nil {
		return fmt.Errorf("vm %s: %w", vmID, err)
	}
	return nil
}

// snapshotOf is ErrNotFound unless snapshotID is a VirtualMachineSnapshot of
// vmID ("live" is the VM's own export, checked by its source). Snapshot names
// are unique in the namespace, not per VM: an export found by snapshot name
// alone may be another VM's, whose disks must not be served as this VM's.
func (s *Source) snapshotOf(ctx context.Context, vmID, snapshotID string) error {
	if snapshotID == LiveSnapshot {
		return nil
	}
	var sn snapshotObject
	if err := s.kube(ctx, http.MethodGet, "snapshot.kubevirt.io", "virtualmachinesnapshots", url.PathEscape(snapshotID), nil, &sn); err != nil {
		return fmt.Errorf("snapshot %s: %w", snapshotID, err)
	}
	if sn.Spec.Source.Kind != "VirtualMachine" || sn.Spec.Source.Name != vmID {
		return fmt.Errorf("snapshot %s is not a snapshot of %s: %w", snapshotID, vmID, backend.ErrNotFound)
	}
	return nil
}
