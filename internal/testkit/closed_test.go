package testkit

import (
	"errors"
	"net"
	"net/http"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// refused says whether a connection to addr is refused, as to a service
// that is down.
func refused(t *testing.T, addr string) bool {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err == nil {
		c.Close()
		return false
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}

// TestReservePortHeld: a reserved port refuses connections, is never handed
// out by FreePort, nor taken by a listener without SO_REUSEPORT (a Caddy
// test's or anyone's), until Close; Listen takes it, and it is held again
// once that listener is closed.
func TestReservePortHeld(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the kernel's choice of a port is Linux's here")
	}
	p, err := ReservePort()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	check := func(when string) {
		t.Helper()
		if !refused(t, p.Addr) {
			t.Fatalf("%s: a connection to the reserved port was not refused", when)
		}
		if l, err := net.Listen("tcp", p.Addr); err == nil {
			l.Close()
			t.Fatalf("%s: another listener took the reserved port", when)
		}
		// Port 0 binds are where a reused port came from: about one in
		// 7,000 on Linux hands a just-closed port out again.
		for range 20000 {
			port, err := FreePort()
			if err != nil {
				t.Fatal(err)
			}
			if port == p.Port {
				t.Fatalf("%s: FreePort returned the reserved port", when)
			}
		}
	}
	check("reserved")
	l, err := p.Listen()
	if err != nil {
		t.Fatal(err)
	}
	if refused(t, p.Addr) {
		t.Fatal("the listener on the reserved port refuses connections")
	}
	l.Close()
	check("listened on, then closed")
	p.Close()
	if l, err := net.Listen("tcp", p.Addr); err != nil {
		t.Fatalf("the port is still held after Close: %v", err)
	} else {
		l.Close()
	}
}

// TestUpstreamDownKeepsItsPort: an upstream that is down refuses
// connections and keeps its port from anyone else, and answers again on
// it once up.
func TestUpstreamDownKeepsItsPort(t *testing.T) {
	u, err := StartUpstream()
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	for range 2 {
		u.Down()
		if !refused(t, u.Addr) {
			t.Fatal("a connection to the upstream that is down was not refused")
		}
		if l, err := net.Listen("tcp", u.Addr); err == nil {
			l.Close()
			t.Fatal("another listener took the port of the upstream that is down")
		}
		if err := u.Up(); err != nil {
			t.Fatal(err)
		}
		// A new connection each time: one kept from before Down is closed.
		client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
		resp, err := client.Post("http://"+u.Addr+"/", "application/json", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("upstream up: %d", resp.StatusCode)
		}
	}
}
