package httprange

import (
	"bytes"
	"compress/gzip"
	"context"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/extent"
)

// TestReadQuery: an ?offset=&length= route ignores Range and answers 200,
// with or without Content-Length; every answer but exactly the bytes asked
// for is a fault, retried, and never reaches the caller.
func TestReadQuery(t *testing.T) {
	data := bytes.Repeat([]byte("0123456789abcdef"), 4096)
	size := int64(len(data))
	for _, tc := range []struct {
		name  string
		serve func(w http.ResponseWriter, off, n int64, attempt int32)
		ok    bool // the first answer is good
	}{
		{name: "200 no length", ok: true, serve: func(w http.ResponseWriter, off, n int64, _ int32) {
			w.WriteHeader(200)
			w.(http.Flusher).Flush()
			_, _ = w.Write(data[off : off+n])
		}},
		{name: "200 with length", ok: true, serve: func(w http.ResponseWriter, off, n int64, _ int32) {
			w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
			_, _ = w.Write(data[off : off+n])
		}},
		{name: "long body", serve: func(w http.ResponseWriter, off, n int64, _ int32) {
			w.WriteHeader(200)
			w.(http.Flusher).Flush()
			_, _ = w.Write(data[off : off+n+1])
		}},
		{name: "short body", serve: func(w http.ResponseWriter, off, n int64, _ int32) {
			w.WriteHeader(200)
			w.(http.Flusher).Flush()
			_, _ = w.Write(data[off : off+n-1])
		}},
		{name: "whole disk (length ignored)", serve: func(w http.ResponseWriter, _, _ int64, _ int32) {
			w.WriteHeader(200)
			w.(http.Flusher).Flush()
			_, _ = w.Write(data)
		}},
		{name: "gzip", serve: func(w http.ResponseWriter, off, n int64, _ int32) {
			w.Header().Set("Content-Encoding", "gzip")
			gz := gzip.NewWriter(w)
			_, _ = gz.Write(data[off : off+n])
			_ = gz.Close()
		}},
		{name: "multipart", serve: func(w http.ResponseWriter, off, n int64, _ int32) {
			w.Header().Set("Content-Type", "multipart/byteranges; boundary=x")
			_, _ = w.Write(data[off : off+n])
		}},
		{name: "503 launcher", serve: func(w http.ResponseWriter, off, n int64, _ int32) {
			http.Error(w, "Backup source (virt-launcher) not connected via tunnel", 503)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var calls atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				attempt := calls.Add(1)
				off, _ := strconv.ParseInt(r.URL.Query().Get("offset"), 10, 64)
				n, _ := strconv.ParseInt(r.URL.Query().Get("length"), 10, 64)
				if attempt > 1 { // the retry gets a good answer
					w.WriteHeader(200)
					w.(http.Flusher).Flush()
					_, _ = w.Write(data[off : off+n])
					return
				}
				tc.serve(w, off, n, attempt)
			}))
			defer srv.Close()
			c := &Client{Policy: Policy{Attempts: 3, BaseDelay: time.Millisecond, MaxDelay: time.Millisecond}}
			p := make([]byte, 1000)
			require.NoError(t, c.ReadQuery(context.Background(), srv.URL+"/exports/d/data", size, p, 4097))
			assert.Equal(t, data[4097:5097], p)
			if tc.ok {
				assert.Equal(t, int32(1), calls.Load())
			} else {
				assert.Equal(t, int32(2), calls.Load(), "the fault is retried")
			}
		})
	}
	t.Run("always wrong is an error", func(t *testing.T) {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(200)
			w.(http.Flusher).Flush()
			_, _ = w.Write(data)
		}))
		defer srv.Close()
		c := &Client{Policy: Policy{Attempts: 2, BaseDelay: time.Millisecond, MaxDelay: time.Millisecond}}
		d := c.QueryDisk(srv.URL, size, extent.Full(size), DiskOptions{Name: "t"})
		err := d.ReadAt(context.Background(), make([]byte, 10), 0)
		require.ErrorIs(t, err, backend.ErrUnavailable)
		assert.Contains(t, err.Error(), "long body")
	})
}
