package kubevirt

import (
	"context"
	"encoding/pem"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
)

// TestHostileMap checks that a map that cannot be trusted never hides data:
// the disk is treated as fully allocated, with a warning.
func TestHostileMap(t *testing.T) {
	const size = 1 << 20
	for _, tc := range []struct {
		name   string
		page   string
		status int
		want   string // extent.Format of Allocated, "" when an error is expected
		err    error
	}{
		{name: "good", page: `{"extents":[{"offset":0,"length":4096,"description":"data"},{"offset":4096,"length":1044480,"description":"zero"}],"next_offset":null}`, want: "0 4096\n"},
		// clean extents hold data (unchanged since the checkpoint), not zeros.
		{name: "dirty and clean are data", page: `{"extents":[{"offset":8192,"length":4096,"description":"dirty"},{"offset":0,"length":8192,"description":"clean"}]}`, want: "0 12288\n"},
		{name: "zero kinds are holes", page: `{"extents":[{"offset":0,"length":4096,"type":2,"description":"zero"},{"offset":4096,"length":4096,"type":3,"description":"dirty,zero"},{"offset":8192,"length":4096,"type":3,"description":"hole,zero"},{"offset":12288,"length":4096,"type":0,"description":"clean"}]}`, want: "12288 4096\n"},
		{name: "past end", page: `{"extents":[{"offset":0,"length":99999999,"description":"data"}]}`, want: extent.Full(size).Format()},
		{name: "overflow", page: `{"extents":[{"offset":18446744073709551615,"length":1,"description":"data"}]}`, want: extent.Full(size).Format()},
		{name: "next offset stuck", page: `{"extents":[],"next_offset":0}`, want: extent.Full(size).Format()},
		{name: "not json", page: `<html>`, want: extent.Full(size).Format()},
		// The raw route took the token, so a 401 on the map is an outage, not
		// a permission problem, and never an empty map.
		{name: "unauthorized after accepted", status: 401, err: backend.ErrUnavailable},
		{name: "forbidden", status: 403, err: backend.ErrPermission},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.Header.Get(tokenHeader) != "tok" {
					w.WriteHeader(http.StatusUnauthorized)
					return
				}
				if strings.HasSuffix(r.URL.Path, "/disk.img") {
					w.Header().Set("Content-Length", "1048576")
					return
				}
				if tc.status != 0 {
					w.WriteHeader(tc.status)
					return
				}
				_, _ = io.WriteString(w, tc.page)
			}))
			defer srv.Close()
			cert := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}))
			st, err := ParseExportStatus([]byte(`{"phase":"Ready","links":{"internal":{"cert":` + jsonString(cert) + `,
				"volumes":[{"name":"v","formats":[{"format":"raw","url":"` + srv.URL + `/volumes/v/disk.img"}]}],
				"backups":[{"name":"v","endpoints":[{"endpoint":"map","url":"` + srv.URL + `/exports/v/map"}]}]}}}`))
			require.NoError(t, err)
			logs := &syncBuffer{}
			token := "tok"
			if tc.status == 401 || tc.status == 403 {
				token = "wrong"
			}
			conn := &exportConn{name: "e", logger: slog.New(slog.NewTextHandler(logs, nil)),
				policy: httprange.Policy{Attempts: 2, BaseDelay: time.Millisecond},
				status: func(context.Context) (ExportStatus, error) { return st, nil },
				token:  func(context.Context) (string, error) { return token, nil }}
			ctx := context.Background()
			require.NoError(t, newExportConn(ctx, conn, st))
			if tc.status == 401 || tc.status == 403 {
				// HEAD passes only with the right token; fake a good HEAD.
				token = "tok"
				require.NoError(t, conn.Renew(ctx))
			}
			d, err := openExportDisk(ctx, conn, st, "v", true)
			if tc.err != nil {
				require.ErrorIs(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, d.Allocated().Format())
			if tc.want == extent.Full(size).Format() {
				assert.Contains(t, logs.String(), "backup map rejected")
			}
		})
	}
}

func jsonString(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)
	return `"` + r.Replace(s) + `"`
}
