package testkit

import (
	"fmt"
	"testing"
)

// ClosedPort is a loopback port kept bound, and not listening, from
// ReservePort until Close: connections to it are refused, as to a service
// that is down, and no one is handed it meanwhile. A port FreePort returned
// is closed at once: any later FreePort, in this process or another one
// running tests at the same time, may return it again (about one time in
// 7,000 on Linux), and a Caddy started on it would then answer in place of
// the service that is down, the way a test's own Caddy proxying to itself
// refuses the delivery it reserved as a replay.
type ClosedPort struct {
	Addr string // 127.0.0.1:port
	Port int
	hold *hold // nil where the platform cannot hold a port
}

// ReservePort reserves a loopback port nothing listens on.
func ReservePort() (*ClosedPort, error) {
	h, port, err := holdPort()
	if err != nil {
		return nil, err
	}
	return &ClosedPort{Addr: fmt.Sprintf("127.0.0.1:%d", port), Port: port, hold: h}, nil
}

// Close gives the port up. A listener Listen opened is not closed.
func (p *ClosedPort) Close() {
	if p.hold != nil {
		p.hold.close()
	}
}

// ClosedAddr is a loopback address nothing listens on, and that no FreePort
// returns, until the test ends: a service that is down.
func ClosedAddr(t testing.TB) string {
	t.Helper()
	p, err := ReservePort()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p.Addr
}
