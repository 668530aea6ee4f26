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

	"github.com/vmexportfs/vmexportfs/backend/httprange"
)

// TestMapNormalizedLog: a backup map with unsorted or overlapping extents is
// repaired with one warning; adjacent extents (split across pages) are
// merged silently.
func TestMapNormalizedLog(t *testing.T) {
	for _, tc := range []struct {
		name, page, want, line string
	}{
		{"unsorted and overlapping", `{"extents":[{"offset":8192,"length":4096,"description":"data"},{"offset":0,"length":4096,"description":"data"},{"offset":1024,"length":10,"description":"dirty"}]}`,
			"0 4096\n8192 4096\n", "chunk map normalized: 2 unsorted/overlapping extents"},
		{"adjacent", `{"extents":[{"offset":0,"length":4096,"description":"data"},{"offset":4096,"length":4096,"description":"data"}]}`,
			"0 8192\n", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if strings.HasSuffix(r.URL.Path, "/disk.img") {
					w.Header().Set("Content-Length", "1048576")
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
			conn := &exportConn{name: "e", logger: slog.New(slog.NewTextHandler(logs, nil)),
				policy: httprange.Policy{Attempts: 2, BaseDelay: time.Millisecond},
				status: func(context.Context) (ExportStatus, error) { return st, nil },
				token:  func(context.Context) (string, error) { return "tok", nil }}
			ctx := context.Background()
			require.NoError(t, newExportConn(ctx, conn, st))
			d, err := openExportDisk(ctx, conn, st, "v", true)
			require.NoError(t, err)
			assert.Equal(t, tc.want, d.Allocated().Format())
			if tc.line == "" {
				assert.NotContains(t, logs.String(), "normalized")
				return
			}
			assert.Equal(t, 1, strings.Count(logs.String(), tc.line), logs.String())
			assert.Contains(t, logs.String(), "export=e")
		})
	}
}
