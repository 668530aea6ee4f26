package xapitest

import "net"

// AdvertiseNBD makes VDI.get_nbd_info answer addr ("host:port") instead of
// the NBD server's own address, as a pool whose NBD network is reached
// through something in between does: tests put a fault proxy there. The
// certificate and subject stay the server's, so a client that verifies
// them still talks TLS to the real server through the proxy. "" restores
// the server's own address.
func (s *Server) AdvertiseNBD(addr string) {
	if addr == "" {
		s.advertised.Store(nil)
		return
	}
	s.advertised.Store(&addr)
}

// nbdEndpoint is the address and port get_nbd_info returns.
func (s *Server) nbdEndpoint() (host, port string) {
	addr := s.nbd.Addr()
	if a := s.advertised.Load(); a != nil {
		addr = *a
	}
	host, port, _ = net.SplitHostPort(addr)
	return host, port
}
