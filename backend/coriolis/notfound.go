package coriolis

import (
	"errors"
	"fmt"

	"github.com/vmexportfs/vmexportfs/backend"
)

// notThisVM maps the exporter's answer for a snapshot id that exists under
// another VM (409, "VM id missmatch", which httprange reports as ErrExists)
// to ErrNotFound: the VM asked about has no such snapshot, and an open or a
// delete of it must not look like EEXIST.
func notThisVM(err error) error {
	if errors.Is(err, backend.ErrExists) {
		return fmt.Errorf("%w: the snapshot belongs to another VM (%v)", backend.ErrNotFound, err)
	}
	return err
}
