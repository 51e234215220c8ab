//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package testkit

import "net"

// hold is nothing here: the port is free once FreePort returns it, as
// before ReservePort.
type hold struct{}

func holdPort() (*hold, int, error) {
	port, err := FreePort()
	return nil, port, err
}

func (h *hold) close() {}

// Listen listens on the port.
func (p *ClosedPort) Listen() (net.Listener, error) { return net.Listen("tcp", p.Addr) }
