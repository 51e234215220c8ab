package trivialsecwebhook

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// TestBreaker: the state machine of a route's breaker.
func TestBreaker(t *testing.T) {
	p := spoolPolicy{backoffMin: time.Second, backoffMax: 8 * time.Second}
	now := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)

	t.Run("opens_at_trips_in_a_row", func(t *testing.T) {
		var b breaker
		for i := 1; i < breakerTrips; i++ {
			if b.failed(now, p, 0, false) || b.open {
				t.Fatalf("open after %d failures, want %d", i, breakerTrips)
			}
		}
		if !b.failed(now, p, 0, false) || !b.open {
			t.Fatalf("closed after %d failures in a row", breakerTrips)
		}
		if !b.nextProbe.Equal(now.Add(time.Second)) {
			t.Errorf("first probe at %v, want backoff min after it opened", b.nextProbe.Sub(now))
		}
		if b.mayProbe(now.Add(999*time.Millisecond)) || !b.mayProbe(now.Add(time.Second)) {
			t.Error("the probe may go before its time, or not at it")
		}
	})

	t.Run("an_answer_between_failures", func(t *testing.T) {
		var b breaker
		for range 10 {
			for range breakerTrips - 1 {
				b.failed(now, p, 0, false)
			}
			if b.answered() != nil || b.failures != 0 {
				t.Fatal("answered: the count goes on")
			}
		}
		if b.open {
			t.Error("opened with never breakerTrips failures in a row")
		}
	})

	t.Run("retry_after_opens_at_once", func(t *testing.T) {
		var b breaker
		if !b.failed(now, p, 5*time.Second, false) {
			t.Fatal("a failure that asked for a wait did not open it")
		}
		if !b.nextProbe.Equal(now.Add(5 * time.Second)) {
			t.Errorf("next probe in %v, want the 5s asked", b.nextProbe.Sub(now))
		}
		var c breaker
		c.failed(now, p, time.Hour, false)
		if !c.nextProbe.Equal(now.Add(p.backoffMax)) {
			t.Errorf("next probe in %v, want backoff max", c.nextProbe.Sub(now))
		}
	})

	t.Run("probes_back_off", func(t *testing.T) {
		var b breaker
		b.failed(now, p, 5*time.Second, false)
		// Not the probe (an attempt under way as it opened): no later
		// probe, unless it asked.
		at := b.nextProbe
		if b.failed(now.Add(time.Second), p, 0, false); !b.nextProbe.Equal(at) {
			t.Errorf("an attempt under way moved the probe to %v", b.nextProbe.Sub(now))
		}
		if b.failed(now.Add(time.Second), p, 7*time.Second, false); !b.nextProbe.Equal(now.Add(8 * time.Second)) {
			t.Errorf("an attempt under way that asked 7s: probe in %v, want 8s", b.nextProbe.Sub(now))
		}
		// Each failed probe: rounds-th backoff, between min and
		// min·2^(rounds-1), at most max.
		for round := 2; round <= 6; round++ {
			t0 := b.nextProbe
			b.failed(t0, p, 0, true)
			wait := b.nextProbe.Sub(t0)
			ceiling := min(time.Second<<(round-1), p.backoffMax)
			if b.rounds != round || wait < p.backoffMin || wait > ceiling {
				t.Errorf("failed probe %d: round %d, wait %v, want 1s..%v", round-1, b.rounds, wait, ceiling)
			}
			if !b.open {
				t.Fatal("a failed probe closed it")
			}
		}
	})

	t.Run("an_answer_closes_it", func(t *testing.T) {
		var b breaker
		b.failed(now, p, time.Second, false)
		b.hold(dueItem{id: uuid.New()})
		b.hold(dueItem{id: uuid.New()})
		if got := b.answered(); len(got) != 2 {
			t.Errorf("answered returned %d entries that waited, want 2", len(got))
		}
		if b.open || b.failures != 0 || len(b.waiting) != 0 || b.mayProbe(now.Add(time.Hour)) {
			t.Errorf("after an answer: %+v", b)
		}
	})
}

// TestVerdictOf: what an attempt's outcome says of its route.
func TestVerdictOf(t *testing.T) {
	for _, tc := range []struct {
		o      outcome
		status int
		want   routeVerdict
	}{
		{taken, 200, routeUp},
		{refused, 404, routeUp},
		{refused, 422, routeUp},
		{failed, 500, routeDown},
		{failed, 502, routeDown}, // reverse_proxy's dial failure
		{failed, 504, routeDown}, // no answer within attempt_timeout
		{failed, 429, routeDown},
		{failed, 408, routeUnknown},
		{failed, 425, routeUnknown},
		{failed, 0, routeUnknown}, // nothing answered, or the entry did not read
		{waiting, 0, routeUnknown},
		{replayed, 0, routeUnknown},
	} {
		if got := verdictOf(tc.o, tc.status); got != tc.want {
			t.Errorf("outcome %d, status %d: %d, want %d", tc.o, tc.status, got, tc.want)
		}
	}
}

// switchUpstream is a service that refuses (it accepts each connection and
// closes it, after hold, without a byte: reverse_proxy fails with 502),
// or serves 200. It counts the connections it refused, when, and the most
// open at once; and the requests it served, when, and the most at once.
type switchUpstream struct {
	net.Listener
	refusing atomic.Bool
	hold     atomic.Int64 // ns a refused connection stays open

	mu        sync.Mutex
	refused   []time.Time
	open      int
	mostOpen  int
	served    []time.Time
	inServe   int
	mostServe int
	taken     map[string]int
}

func startSwitchUpstream(t testing.TB) *switchUpstream {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &switchUpstream{Listener: l, taken: map[string]int{}}
	u.refusing.Store(true)
	srv := &http.Server{Handler: http.HandlerFunc(u.serve), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(u) }()
	t.Cleanup(func() { _ = srv.Close() })
	return u
}

// Accept refuses connections while the upstream is refusing, and hands
// the others to the HTTP server.
func (u *switchUpstream) Accept() (net.Conn, error) {
	for {
		c, err := u.Listener.Accept()
		if err != nil || !u.refusing.Load() {
			return c, err
		}
		hold := time.Duration(u.hold.Load())
		u.mu.Lock()
		u.refused = append(u.refused, time.Now())
		u.open++
		u.mostOpen = max(u.mostOpen, u.open)
		u.mu.Unlock()
		go func() {
			if hold > 0 {
				time.Sleep(hold)
			}
			c.Close()
			u.mu.Lock()
			u.open--
			u.mu.Unlock()
		}()
	}
}

func (u *switchUpstream) serve(w http.ResponseWriter, r *http.Request) {
	u.mu.Lock()
	u.served = append(u.served, time.Now())
	u.inServe++
	u.mostServe = max(u.mostServe, u.inServe)
	u.taken[r.Header.Get("X-Trivialsec-Event-Id")]++
	u.mu.Unlock()
	time.Sleep(time.Millisecond) // long enough for attempts at once to overlap
	u.mu.Lock()
	u.inServe--
	u.mu.Unlock()
}

// reset forgets what was counted.
func (u *switchUpstream) reset() {
	u.mu.Lock()
	u.refused, u.mostOpen, u.served, u.mostServe = nil, u.open, nil, u.inServe
	u.mu.Unlock()
}

// mostWithin is the most of times within any span d.
func mostWithin(times []time.Time, d time.Duration) int {
	most := 0
	for i := range times {
		n := 0
		for _, b := range times[i:] {
			if b.Sub(times[i]) < d {
				n++
			}
		}
		most = max(most, n)
	}
	return most
}

// spoolMany sends n new deliveries, par at a time, of the event name
// given (report_created without one), each of which must be answered 202,
// and returns their event IDs.
func (g *spoolRig) spoolMany(n, par int, name ...string) []string {
	g.t.Helper()
	ids := make([]string, n)
	var next atomic.Int64
	var failed atomic.Value
	var wg sync.WaitGroup
	for range par {
		wg.Go(func() {
			for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
				d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
				for _, n := range name {
					d.name, d.claims["evn"] = n, n
				}
				ids[i] = d.eventID
				req, _ := http.NewRequest(http.MethodPost, g.url, strings.NewReader(d.body()))
				req.Header.Set("Authorization", d.authorization())
				resp, err := senderClient.Do(req)
				if err != nil {
					failed.Store(err.Error())
					return
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusAccepted {
					failed.Store(fmt.Sprintf("status %d, want 202", resp.StatusCode))
					return
				}
			}
		})
	}
	wg.Wait()
	if v := failed.Load(); v != nil {
		g.t.Fatal(v)
	}
	return ids
}

// summary is the admin API's summary.
func (g *spoolRig) summary() summaryAnswer {
	g.t.Helper()
	resp, err := senderClient.Get(g.admin + "/trivialsec_webhook/spool/summary")
	if err != nil {
		g.t.Fatal(err)
	}
	defer resp.Body.Close()
	var out summaryAnswer
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		g.t.Fatal(err)
	}
	return out
}

// breaker is the state of the one breaker the summary shows, or "" if it
// shows none.
func (g *spoolRig) breaker() breakerState {
	g.t.Helper()
	bs := g.summary().Breakers
	switch len(bs) {
	case 0:
		return breakerState{}
	case 1:
		return bs[0]
	}
	g.t.Fatalf("the summary shows %d breakers, want one route: %+v", len(bs), bs)
	return breakerState{}
}

// waitLong polls until ok, for at most d.
func (g *spoolRig) waitLong(d time.Duration, what string, ok func() bool) {
	g.t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			g.t.Fatalf("still not so after %v: %s; the breaker: %+v", d, what, g.breaker())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSpoolBreaker: with the service refusing and 1,000 deliveries due,
// the route's breaker opens, and the service then sees one probe at a
// time, no more often than the backoff lets them go; the entries that
// wait make no attempt and do not die. Once the service answers, a probe
// closes the breaker, and the backlog drains at no more than
// redrive_concurrency at once and redrive_rate a second, each delivered
// once. The summary and the metric show the breaker.
func TestSpoolBreaker(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		const n, rate = 1000, 250
		up := startSwitchUpstream(t)
		g := startSpoolRigTo(t, "spool {\n\t\t\t"+store+"backoff 100ms 400ms\n\t\t\tredrive_concurrency 4\n\t\t\tredrive_rate "+fmt.Sprint(rate)+"\n\t\t}", up.Addr().String())
		ids := g.spoolMany(n, 8)
		var open breakerState
		g.waitLong(30*time.Second, "the breaker opened", func() bool {
			open = g.breaker()
			return open.State == "open"
		})
		if open.Account != testAccount || open.Server != fmt.Sprintf(":%d", g.port) || open.Failures < breakerTrips || open.NextProbe.IsZero() || open.Waiting == 0 {
			t.Errorf("the summary shows %+v", open)
		}
		m := scrape(t, g.base+"/metrics")
		if got := m[`caddy_trivialsec_webhook_spool_breaker_open{account="`+testAccount+`"}`]; got != 1 {
			t.Errorf("spool_breaker_open = %v, want 1", got)
		}

		// From here on each refused connection stays open a while: two
		// attempts at once would overlap.
		const window = 3 * time.Second
		up.hold.Store(int64(20 * time.Millisecond))
		up.reset()
		start := time.Now()
		time.Sleep(window)
		up.mu.Lock()
		refused, most := append([]time.Time(nil), up.refused...), up.mostOpen
		up.mu.Unlock()
		// Probes go backoff min (100 ms) after the last one failed, at the
		// soonest: at most 10 a second, and one more at the edge.
		if got := mostWithin(refused, time.Second); got > 11 {
			t.Errorf("%d connections within a second while the breaker was open, want at most 11 (backoff min 100ms)", got)
		}
		if most > 1 {
			t.Errorf("%d connections at once while the breaker was open, want one probe at a time", most)
		}
		if len(refused) == 0 {
			t.Errorf("no probe within %v of backoff max 400ms", window)
		}
		dead, attempts := 0, 0
		listing := g.list()
		for _, l := range listing {
			attempts += l.Attempts
			if l.State == stateDead {
				dead++
			}
		}
		if len(listing) != n || dead != 0 {
			t.Errorf("%d entries, %d dead letters; want %d, none dead", len(listing), dead, n)
		}
		// Every entry made its first attempt inline; few more: those
		// before it opened (up to breakerTrips + redrive_concurrency - 1, more
		// at once while deliveries still arrived), and the probes.
		if more := attempts - n; more > 200 {
			t.Errorf("%d re-drives in %v of the service refusing: the entries that wait made attempts", more, time.Since(start))
		}
		t.Logf("open for %v: %d probes, %d re-drives in all, %d connections at once at most",
			time.Since(start).Round(time.Millisecond), len(refused), attempts-n, most)
		// A Redis store holds the turns it read, all waiting: it reads no
		// more of the account's (the others wait in the stream) while
		// they wait.
		if b := g.breaker(); store != "" && b.Waiting > 100 {
			t.Errorf("this instance holds %d entries waiting for the breaker: it read every turn", b.Waiting)
		}

		up.hold.Store(0)
		up.reset()
		up.refusing.Store(false)
		back := time.Now()
		g.waitLong(60*time.Second, "every delivery taken", func() bool {
			up.mu.Lock()
			defer up.mu.Unlock()
			return len(up.taken) >= n
		})
		drained := time.Since(back)
		g.drained()
		up.mu.Lock()
		served, mostServe := append([]time.Time(nil), up.served...), up.mostServe
		for _, id := range ids {
			if up.taken[id] != 1 {
				t.Errorf("event %s taken %d times", id, up.taken[id])
			}
		}
		up.mu.Unlock()
		// The limiter spaces starts 4 ms apart: any second holds at most
		// 250 of them, and a few more at its edges.
		if got := mostWithin(served, time.Second); got > rate+rate/10 {
			t.Errorf("%d re-drives within a second, want at most redrive_rate %d (+10%%)", got, rate)
		}
		if mostServe > 4 {
			t.Errorf("%d re-drives at once, want at most redrive_concurrency 4", mostServe)
		}
		t.Logf("drained %d in %v, at most %d a second, %d at once", len(served), drained.Round(time.Millisecond), mostWithin(served, time.Second), mostServe)
		if b := g.breaker(); b.State == "open" {
			t.Errorf("the breaker is still open: %+v", b)
		}
		m = scrape(t, g.base+"/metrics")
		if got, ok := m[`caddy_trivialsec_webhook_spool_breaker_open{account="`+testAccount+`"}`]; !ok || got != 0 {
			t.Errorf("spool_breaker_open = %v (exported: %v), want 0", got, ok)
		}
	})
}

// BenchmarkSpoolOutageDrain measures what the breakers save: 5,000
// deliveries spooled while the service refuses, which stays down 3 s
// more, then answers; the re-drives made meanwhile, and how long until
// every one is delivered, with the breakers and without, on each store.
// One outage each: it lasts longer than the default -benchtime, so the
// benchmark runs once (BENCHMARKS.md):
//
//	go test -run '^$' -bench SpoolOutageDrain -benchtime 1x .
func BenchmarkSpoolOutageDrain(b *testing.B) {
	b.Cleanup(func() { breakersOff.Store(false) })
	for _, off := range []bool{false, true} {
		for _, store := range []string{"file", "redis"} {
			name := "breaker"
			if off {
				name = "no_breaker"
			}
			b.Run(name+"/store="+store, func(b *testing.B) {
				spool := ""
				if store == "redis" {
					spool = "store redis " + testredis.Start(b).URL() + "\n\t\t\t"
				}
				breakersOff.Store(off)
				const n = 5000
				up := startSwitchUpstream(b)
				g := startSpoolRigTo(b, "spool {\n\t\t\t"+spool+"backoff 100ms 5s\n\t\t}", up.Addr().String())
				before := scrape(b, g.base+"/metrics")["caddy_trivialsec_webhook_spool_attempts_total"]
				began := time.Now()
				g.spoolMany(n, 8)
				spooled := time.Since(began)
				time.Sleep(3 * time.Second)
				during := scrape(b, g.base+"/metrics")["caddy_trivialsec_webhook_spool_attempts_total"] - before
				up.refusing.Store(false)
				back := time.Now()
				g.waitLong(5*time.Minute, "every delivery taken", func() bool {
					up.mu.Lock()
					defer up.mu.Unlock()
					return len(up.taken) >= n
				})
				b.ReportMetric(during, "redrives-in-outage")
				b.ReportMetric(spooled.Seconds(), "spooling-s")
				b.ReportMetric(time.Since(back).Seconds(), "drain-s")
			})
		}
	}
}

// TestSpoolBreakerLoneEntry: a route's only entry, held back by its open
// breaker with nothing else due, goes as the probe at the probe's time,
// again and again;
// once the service answers, it is delivered, and the breaker closes.
func TestSpoolBreakerLoneEntry(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		g := startSpoolRig(t, "spool {\n\t\t\t"+store+"backoff 50ms 100ms\n\t\t}")
		var down atomic.Bool
		down.Store(true)
		g.up.Answer(func(http.Header, *http.Request) int {
			if down.Load() {
				return http.StatusServiceUnavailable
			}
			return http.StatusOK
		})
		ids := g.deliverSpooled(1)
		// Probes fail, each time with a random wait of the breaker's and
		// another of the entry's: sooner or later the entry comes due
		// before the probe's time, and waits for it.
		g.waitFor("the breaker opened, and probes failed", func() bool {
			b := g.breaker()
			return b.State == "open" && b.Failures >= 12
		})
		down.Store(false)
		g.checkTakenOnce(ids)
		if b := g.breaker(); b.State != "closed" || b.Failures != 0 {
			t.Errorf("after the delivery: %+v", b)
		}
	})
}

// TestSpoolBreakerClosesEarly: an open breaker whose next probe is an hour
// away closes as soon as the service is seen back: a delivery that comes
// in is answered through the route, or an operator retries one delivery
// (the route is probed at once). The deliveries that waited go then, not
// in an hour.
func TestSpoolBreakerClosesEarly(t *testing.T) {
	for _, how := range []string{"a delivery answered", "an operator's retry"} {
		t.Run(how, func(t *testing.T) {
			eachStore(t, func(t *testing.T, store string) {
				g := startSpoolRig(t, "spool {\n\t\t\t"+store+"backoff 1h 2h\n\t\t\tredrive_concurrency 1\n\t\t}")
				g.up.Answer(func(http.Header, *http.Request) int { return http.StatusServiceUnavailable })
				ids := g.deliverSpooled(6)
				// Due now, one at a time: three fail, and the other
				// three wait for the breaker.
				if code := g.adminDo(http.MethodPost, "/trivialsec_webhook/spool/retry"); code != http.StatusOK {
					t.Fatalf("bulk retry: %d", code)
				}
				var waited []string
				g.waitFor("the breaker open, three entries waiting for it", func() bool {
					waited = nil
					for _, l := range g.list() {
						if l.Attempts == 1 {
							waited = append(waited, l.EventID)
						}
					}
					return g.breaker().State == "open" && len(waited) == 3
				})
				if b := g.breaker(); time.Until(b.NextProbe) < 30*time.Minute {
					t.Fatalf("the next probe is at %s: within the hour's backoff", b.NextProbe)
				}
				time.Sleep(100 * time.Millisecond)
				if n := len(g.up.Received()); n != 6+3 {
					t.Fatalf("the upstream saw %d requests, want 6 first attempts and 3 re-drives", n)
				}
				g.up.Answer(nil)
				switch how {
				case "a delivery answered":
					if _, status := g.deliver(); status != http.StatusOK {
						t.Fatalf("a new delivery: %d, want 200", status)
					}
				default:
					failed := slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return slices.Contains(waited, id) })
					if code := g.adminDo(http.MethodPost, "/trivialsec_webhook/spool/"+failed[0]+"/retry"); code != http.StatusAccepted {
						t.Fatalf("retry: %d", code)
					}
				}
				if _, err := g.up.WaitTaken(waited, 20*time.Second); err != nil {
					t.Fatal(err)
				}
				g.waitFor("the breaker closed", func() bool { return g.breaker().State == "closed" })
			})
		})
	}
}

// nopStore is a redriveStore that stores nothing: for the scheduler's
// breakers alone.
type nopStore struct{}

func (nopStore) take(*spoolMeta) (spoolRequest, []byte, error) { return spoolRequest{}, nil, nil }
func (nopStore) delivered(spoolMeta)                           {}
func (nopStore) failed(spoolMeta) error                        { return nil }
func (nopStore) log() *zap.Logger                              { return zap.NewNop() }

// TestBreakerRoutes: attempts through a route that a reload took away
// (their driver unregistered while they were under way) open no breaker,
// which nothing would ever close; an operator's retries bring a route's
// probe forward at most once a backoff min.
func TestBreakerRoutes(t *testing.T) {
	s := newScheduler(nopStore{}, false, spoolPolicy{backoffMin: time.Hour, backoffMax: 2 * time.Hour, concurrency: 16})
	old := &driver{key: ":443", account: "acme"}
	moved := &driver{key: ":8443", account: "acme"}
	s.register(old)
	s.register(moved)
	s.unregister(old)
	for range breakerTrips {
		s.settle("acme", old, uuid.New(), routeDown, 0, "502")
	}
	open := map[string]int{}
	s.openBreakers(open)
	if open["acme"] != 0 || len(s.routes) != 0 {
		t.Fatalf("%d open breakers of acme (%d routes) after failures through a route no driver serves", open["acme"], len(s.routes))
	}

	for range breakerTrips {
		s.settle("acme", moved, uuid.New(), routeDown, 0, "502")
	}
	b := s.routes[route{"acme", ":8443"}]
	if b == nil || !b.open || time.Until(b.nextProbe) < 30*time.Minute || !moved.held.Load() || old.held.Load() {
		t.Fatalf("the breaker of a served route: %+v; its driver held %v, the old one's %v", b, moved.held.Load(), old.held.Load())
	}
	late := &driver{key: ":8443", account: "acme"} // a reload's driver of the same route
	s.register(late)
	if !late.held.Load() {
		t.Fatal("a driver registered while its route's breaker is open is not held")
	}
	s.probeAccount("acme")
	if time.Until(b.nextProbe) > 0 {
		t.Fatalf("an operator's retry: the next probe is still at %v", b.nextProbe)
	}
	later := time.Now().Add(time.Hour)
	b.nextProbe = later // the probe went, and failed
	s.probeAccount("acme")
	if !b.nextProbe.Equal(later) {
		t.Fatal("a second retry within backoff min brought the probe forward again")
	}
}
