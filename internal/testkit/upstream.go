package testkit

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"
)

// Upstream is the service behind Caddy in the spool's tests. It records
// every request it answers, answers as the test says, and can go down (its
// port closed: connections refused) and come back on the same port. The
// port stays reserved while it is down, until Close: no FreePort returns
// it, so no Caddy a test starts meanwhile takes the service's place.
type Upstream struct {
	Addr string // host:port, the same across Down and Up

	port     *ClosedPort
	mu       sync.Mutex
	server   *http.Server
	listener net.Listener // the server's: closed by Down itself, as Serve may not have taken it yet
	answer   func(http.Header, *http.Request) int
	received []Received
}

// Received is one request the upstream answered.
type Received struct {
	EventID string // the body's event_id
	Body    string
	Header  http.Header
	Status  int // what the upstream answered
}

// StartUpstream starts an upstream on a free loopback port, answering 200.
func StartUpstream() (*Upstream, error) {
	port, err := ReservePort()
	if err != nil {
		return nil, err
	}
	u := &Upstream{Addr: port.Addr, port: port}
	if err := u.Up(); err != nil {
		port.Close()
		return nil, err
	}
	return u, nil
}

// Answer sets how the upstream answers: the status fn returns, after
// whatever fn waits for, with the response headers fn sets. nil answers 200.
func (u *Upstream) Answer(fn func(header http.Header, r *http.Request) int) {
	u.mu.Lock()
	u.answer = fn
	u.mu.Unlock()
}

// Up starts listening again, on the same port.
func (u *Upstream) Up() error {
	var l net.Listener
	var err error
	for range 50 { // the port was just closed; give the kernel a moment
		if l, err = u.port.Listen(); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: http.HandlerFunc(u.serve), ReadHeaderTimeout: 10 * time.Second}
	u.mu.Lock()
	u.server, u.listener = srv, l
	u.mu.Unlock()
	go func() { _ = srv.Serve(l) }()
	return nil
}

// Down closes the port and every connection: Caddy's dials are refused.
func (u *Upstream) Down() {
	u.mu.Lock()
	srv, l := u.server, u.listener
	u.server, u.listener = nil, nil
	u.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
		// A Close before Serve took the listener leaves it open (Serve
		// then returns without closing it).
		_ = l.Close()
	}
}

func (u *Upstream) serve(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return
	}
	u.mu.Lock()
	answer := u.answer
	u.mu.Unlock()
	status := http.StatusOK
	if answer != nil {
		status = answer(w.Header(), r)
	}
	var fields struct {
		EventID string `json:"event_id"`
	}
	_ = json.Unmarshal(body, &fields)
	u.mu.Lock()
	u.received = append(u.received, Received{EventID: fields.EventID, Body: string(body), Header: r.Header.Clone(), Status: status})
	u.mu.Unlock()
	w.WriteHeader(status)
}

// Received returns what the upstream answered so far.
func (u *Upstream) Received() []Received {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]Received(nil), u.received...)
}

// Taken counts, per event ID, the requests the upstream answered 2xx.
func (u *Upstream) Taken() map[string]int {
	taken := make(map[string]int)
	for _, r := range u.Received() {
		if r.Status/100 == 2 {
			taken[r.EventID]++
		}
	}
	return taken
}

// WaitTaken waits until every one of ids was answered 2xx at least once,
// and returns the counts; or gives up after timeout.
func (u *Upstream) WaitTaken(ids []string, timeout time.Duration) (map[string]int, error) {
	deadline := time.Now().Add(timeout)
	for {
		taken := u.Taken()
		missing := 0
		for _, id := range ids {
			if taken[id] == 0 {
				missing++
			}
		}
		if missing == 0 {
			return taken, nil
		}
		if time.Now().After(deadline) {
			return taken, fmt.Errorf("%d of %d deliveries did not arrive within %s", missing, len(ids), timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Close stops the upstream for good, and gives its port up.
func (u *Upstream) Close() {
	u.Down()
	u.port.Close()
}
