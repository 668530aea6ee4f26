package coriolis

import (
	"encoding/json"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func FuzzDecodeVMs(f *testing.F) {
	f.Add(`[{"friendly_name":"a","name":"vm","disks":[{"name":"d","device_name":"xvda","mode":"w"},{"name":"c","device_name":"xvdb:cdrom","mode":"r"}],"snapshots":["x","x"]}]`)
	f.Add(`[{"name":"../..","disks":null}] trailing`)
	f.Add(`[{"name":"a"}] ]`)
	f.Fuzz(func(t *testing.T, s string) {
		// The listing is decoded one VM at a time; encoding/json decoding
		// the whole array is what it must agree with.
		var vms []apiVM
		errStream := decodeJSON(strings.NewReader(s), vmSink(func(v apiVM) { vms = append(vms, v) }))
		var whole []apiVM
		errWhole := decodeJSON(strings.NewReader(s), &whole)
		if (errStream == nil) != (errWhole == nil) {
			t.Fatalf("streamed: %v, whole: %v", errStream, errWhole)
		}
		requireRefusedUnlessJSON(t, s, errStream)
		// Where encoding/json reads the listing, the stream reads the same.
		var ref []apiVM
		if json.Unmarshal([]byte(s), &ref) == nil {
			require.NoError(t, errStream, "refused what encoding/json reads: %.200q", s)
			if len(ref) > 0 || len(vms) > 0 {
				require.Equal(t, ref, vms)
			}
		}
		if errStream != nil {
			return
		}
		if !reflect.DeepEqual(vms, whole) && (len(vms) > 0 || len(whole) > 0) {
			t.Fatalf("streamed %+v, whole %+v", vms, whole)
		}
		for _, v := range vms {
			bv := v.toBackend()
			for _, d := range bv.Disks {
				if strings.HasSuffix(d.Device, ":cdrom") {
					t.Fatalf("cdrom disk listed: %+v", d)
				}
			}
			orderSnapshots(v, []apiSnapshot{{ID: "x"}, {ID: "y"}})
		}
	})
}

func FuzzDecodeSnapshot(f *testing.F) {
	f.Add(`{"id":"s","vm_id":"v","disks":[{"name":"d","snapshot_id":"s","chunks":[{"start":0,"length":10}]}]}`, int64(100))
	f.Add(`{"id":"s","vmID":"v","disks":[{"name":"d","snapshotID":"s","chunks":[{"start":-1,"length":1e30}]}]}`, int64(1))
	f.Fuzz(func(t *testing.T, s string, size int64) {
		var snap apiSnapshot
		err := decodeJSON(strings.NewReader(s), &snap)
		requireRefusedUnlessJSON(t, s, err)
		if err != nil {
			return
		}
		snap.toBackend(apiVM{})
		for _, d := range snap.Disks {
			m, err := chunkMap(d.Chunks, size)
			if err != nil {
				continue
			}
			for _, e := range m.Extents() {
				if e.Off < 0 || e.Len <= 0 || e.Off > math.MaxInt64-e.Len || e.End() > size {
					t.Fatalf("accepted bad extent %+v for size %d", e, size)
				}
			}
		}
	})
}

func FuzzDecodeLogin(f *testing.F) {
	f.Add(`{"token":"eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjQxMDI0NDQ4MDB9.x"}`)
	f.Add(`{"token":""}`)
	f.Add(`{"token":"x"} ]`)
	f.Fuzz(func(t *testing.T, s string) {
		var ans, ref loginAnswer
		err := decodeJSON(strings.NewReader(s), &ans)
		refErr := json.Unmarshal([]byte(s), &ref)
		require.Equal(t, refErr == nil, err == nil, "decoded: %v, encoding/json: %v", err, refErr)
		if err != nil {
			return
		}
		require.Equal(t, ref, ans)
		now := time.Unix(1_700_000_000, 0)
		at, err := tokenRenewal(ans.Token, now)
		if err != nil {
			if len(ans.Token) > 8 && strings.Contains(err.Error(), ans.Token) {
				t.Fatalf("error quotes the token: %v", err)
			}
			return
		}
		if !at.After(now) {
			t.Fatalf("renewal %v not after now", at)
		}
	})
}
