//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package testkit

import (
	"context"
	"net"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// hold is a TCP socket bound with SO_REUSEPORT, never listening. Binding
// port 0 never picks a port a socket is bound to, whatever its options, so
// no FreePort returns it; an explicit bind with SO_REUSEPORT by this user
// (Listen) shares it. With no listener, the kernel refuses connections.
type hold struct {
	once sync.Once
	fd   int
}

func holdPort() (*hold, int, error) {
	// Close-on-exec before any fork can copy it: the tests start Caddy
	// processes, which would keep the port bound after Close.
	syscall.ForkLock.RLock()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err == nil {
		unix.CloseOnExec(fd)
	}
	syscall.ForkLock.RUnlock()
	if err != nil {
		return nil, 0, err
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
		unix.Close(fd)
		return nil, 0, err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		unix.Close(fd)
		return nil, 0, err
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		unix.Close(fd)
		return nil, 0, err
	}
	return &hold{fd: fd}, sa.(*unix.SockaddrInet4).Port, nil
}

func (h *hold) close() { h.once.Do(func() { unix.Close(h.fd) }) }

// Listen listens on the port, which stays reserved once the listener is
// closed, until Close.
func (p *ClosedPort) Listen() (net.Listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) {
			err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); cerr != nil {
			return cerr
		}
		return err
	}}
	return lc.Listen(context.Background(), "tcp", p.Addr)
}
