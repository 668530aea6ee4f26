package coriolis

import (
	"context"
	"net"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmexportfs/vmexportfs/backend"
	"github.com/vmexportfs/vmexportfs/backend/httprange"
)

// TestNewRefusesPlainHTTP: the login body carries the password, so a
// client of an http:// URL is never made, and nothing is sent.
func TestNewRefusesPlainHTTP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var accepted atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Close() // the client's login then fails at once
		}
	}()
	_, err = New(context.Background(), Config{URL: "http://" + ln.Addr().String(), Username: testUser, Password: testPass,
		Policy: httprange.Policy{Attempts: 1}})
	ln.Close()
	<-done
	// New returns only after its login's connection was accepted, when it
	// made one.
	assert.Zero(t, accepted.Load(), "connections to the plain-http server")
	require.ErrorIs(t, err, backend.ErrInvalid)
	assert.Contains(t, err.Error(), "plain http would send the password in cleartext; use https")
	assert.NotContains(t, err.Error(), testPass)
}
