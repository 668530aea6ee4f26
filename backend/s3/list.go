package s3

import (
	"context"
	"fmt"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/retry"
)

// ObjectInfo is one object of a listing.
type ObjectInfo struct {
	Key          string
	Size         int64
	ETag         string
	LastModified time.Time
}

// MaxList bounds a listing: a bucket is a place the user chose, but a huge
// or hostile one must not fill our memory.
const MaxList = 1_000_000

// List returns every object under prefix (recursively: "directories" are
// not objects), in the server's order. A listing cut off by an error is
// started again from the beginning, within the retry budget.
func (c *Client) List(ctx context.Context, bucket, prefix string) ([]ObjectInfo, error) {
	if err := checkNames(bucket, "", false); err != nil {
		return nil, fmt.Errorf("s3: list: %w", err)
	}
	op := fmt.Sprintf("s3: list %s prefix %q", bucket, c.secrets.Peer([]byte(prefix)))
	var out []ObjectInfo
	err := c.run(ctx, op, func(actx context.Context) *retry.Fault {
		out = out[:0]
		// Cancelling ends minio-go's listing goroutine if we stop early.
		lctx, cancel := context.WithCancel(actx)
		defer cancel()
		for obj := range c.minio.ListObjects(lctx, bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
			if obj.Err != nil {
				return c.minioFault(op, obj.Err)
			}
			if len(out) >= MaxList {
				return retry.Faultf(retry.Stop, "%w: more than %d objects", backend.ErrUnsupported, MaxList)
			}
			out = append(out, ObjectInfo{Key: obj.Key, Size: obj.Size, ETag: obj.ETag, LastModified: obj.LastModified})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}
