package kubevirttest

// ExportConns is how many client connections the export servers hold open
// now, for tests that check a client lets go of what it opened. A connection
// a client closed leaves the count a moment later, when its server sees it.
func (s *Server) ExportConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, e := range s.exports {
		e.srv.mu.Lock()
		n += len(e.srv.conns)
		e.srv.mu.Unlock()
	}
	return n
}
