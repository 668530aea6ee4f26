package kubevirttest

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
)

// The direct helpers a test drives the simulator with, in the shape of every
// simulator's (coriolistest has the same verbs): WriteDisk, DiscardDisk,
// TakeSnapshot, Snapshots, SnapshotData.

// DiscardDisk zeroes [off, off+n) of a VM's live volume, as a guest's TRIM
// does. The simulator's snapshots and backup maps go by content (an all-zero
// 64 KiB chunk is a hole), so to a client a discarded range and a zeroed one
// are the same.
func (s *Server) DiscardDisk(vm, vol string, off, n int64) error {
	f, err := os.OpenFile(s.vmPath(vm, vol), os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("discard disk: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("discard disk: %w", err)
	}
	if off < 0 || n < 0 || off+n > fi.Size() {
		return fmt.Errorf("discard disk: [%d, %d) outside the %d-byte volume %s", off, off+n, fi.Size(), vol)
	}
	zeros := make([]byte, min(n, 1<<20))
	for done := int64(0); done < n; {
		m := min(n-done, int64(len(zeros)))
		if _, err := f.WriteAt(zeros[:m], off+done); err != nil {
			return fmt.Errorf("discard disk: %w", err)
		}
		done += m
	}
	return nil
}

// TakeSnapshot backs vm up the way a user with kubectl, or a scheduler, does:
// a VirtualMachineSnapshot called name, a token Secret <name>-export-token and
// a VirtualMachineExport called name of the snapshot, both owned by it (so
// deleting the snapshot deletes them) — the objects `mkdir
// snapshots/<name>` makes through a mount. Like objects made through the API
// they turn Ready once Options.ReadyDelay has passed.
func (s *Server) TakeSnapshot(vm, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	secret := name + "-export-token"
	if _, dup := s.secrets[secret]; dup {
		return fmt.Errorf("take snapshot: secret %q: %w", secret, errExists)
	}
	if _, dup := s.exports[name]; dup {
		return fmt.Errorf("take snapshot: export %q: %w", name, errExists)
	}
	var sn VirtualMachineSnapshot
	sn.Metadata.Name = name
	sn.Spec.Source = TypedRef{APIGroup: vmGroup, Kind: "VirtualMachine", Name: vm}
	st, err := s.addSnapshot(sn)
	if err != nil {
		return fmt.Errorf("take snapshot: %w", err)
	}
	owner := []OwnerReference{{APIVersion: snapshotGroup + "/v1beta1", Kind: "VirtualMachineSnapshot", Name: name, UID: st.obj.Metadata.UID}}
	s.secrets[secret] = &Secret{APIVersion: "v1", Kind: "Secret",
		Metadata: ObjectMeta{Name: secret, Namespace: s.opts.Namespace, UID: s.nextUID(), CreationTimestamp: s.now(), OwnerReferences: owner},
		Data:     map[string][]byte{"token": []byte(randomToken())}}
	var e VirtualMachineExport
	e.Metadata = ObjectMeta{Name: name, OwnerReferences: owner}
	e.Spec.Source = TypedRef{APIGroup: snapshotGroup, Kind: "VirtualMachineSnapshot", Name: name}
	e.Spec.TokenSecretRef = secret
	if _, err := s.createExport(e); err != nil {
		_ = s.delete("virtualmachinesnapshots", name) // and, owned by it, the secret
		return fmt.Errorf("take snapshot: %w", err)
	}
	return nil
}

// Snapshots are the names of vm's VirtualMachineSnapshots, oldest first (by
// when they were taken, not by their creationTimestamp, which has seconds).
func (s *Server) Snapshots(vm string) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.vms[vm]; !ok {
		return nil, fmt.Errorf("snapshots: vm %q: %w", vm, errNotFound)
	}
	var snaps []*snapState
	for _, sn := range s.snaps {
		if sn.obj.Spec.Source.Name == vm {
			snaps = append(snaps, sn)
		}
	}
	slices.SortFunc(snaps, func(a, b *snapState) int { return a.created.Compare(b.created) })
	names := make([]string, len(snaps))
	for i, sn := range snaps {
		names[i] = sn.obj.Metadata.Name
	}
	return names, nil
}

// SnapshotData is the path of the simulator's immutable copy of one volume
// in a snapshot: what its export serves, the reference a test checks copies
// against.
func (s *Server) SnapshotData(snapshot, vol string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sn, ok := s.snaps[snapshot]
	if !ok {
		return "", fmt.Errorf("snapshot %q: %w", snapshot, errNotFound)
	}
	vm, ok := s.vms[sn.obj.Spec.Source.Name]
	if !ok || !slices.ContainsFunc(vm.volumes, func(v VolumeSpec) bool { return v.Name == vol }) {
		return "", fmt.Errorf("snapshot %q: volume %q: %w", snapshot, vol, errNotFound)
	}
	return filepath.Join(sn.dir, vol+".img"), nil
}
