package trivialsecwebhook

import (
	"cmp"
	"container/heap"
	"slices"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"
)

// A breaker per route: when the re-drives through a route fail as a
// service that is down fails (an error from the handlers, reverse_proxy's
// dial failure among them; no answer within attempt_timeout; a 5xx; a
// 429), its other due entries wait instead of each making an attempt of
// its own, and one of them at a time goes through as a probe, backing off
// as an entry does. When an attempt through it is answered again, the
// entries that waited are due at once, and drain at redrive_concurrency
// and redrive_rate.
//
// A route is an account and the server its handler is on (the server's
// listen addresses: driver.key), the pair driverFor picks a driver by; so
// a breaker outlives the drivers of a config, and a reload. It is this
// instance's view of the route: with the Redis store, each instance keeps
// its own.
//
// Closed, it counts the route's failures in a row, and opens at
// breakerTrips of them, or at once on a failure that asked for a wait
// (Retry-After): that is the service speaking of itself, not of one
// delivery. Open, the route's due entries wait (hold), in the order they
// came due: no attempt, no backoff of their own, no dead letter (an entry
// dies only on a failed attempt past max_age). When the probe time comes
// and no probe is in flight, the earliest one goes (probe); a failed probe
// opens it again for a longer wait (the spool's backoff, and at least the
// Retry-After it carried, up to backoff's max), and has its own failed
// attempt's treatment. An attempt through the route that is answered
// (taken, or refused: the service answered) closes it; one whose outcome
// says nothing of the route (the store did not answer, a Caddy stop,
// a held delivery's check) lets the next probe go at once. Attempts under
// way as it opens end as they do.

// breakerTrips is how many failures in a row open a route's breaker: not
// one, so that a delivery the service fails on by itself (a 500 for that
// payload) does not hold back the route's others at each of its retries;
// few, so that an outage costs few attempts (up to breakerTrips +
// redrive_concurrency - 1) before the probes alone go.
const breakerTrips = 3

// breakerShown is how long the summary shows a closed breaker after the
// last attempt through its route.
const breakerShown = 10 * time.Minute

// breakersOff turns the breakers off: for the benchmark that measures what
// they save (BenchmarkSpoolOutageDrain), nothing else.
var breakersOff atomic.Bool

// route is a route re-drives go through: an account, and the key of its
// handler's server.
type route struct{ account, server string }

// routeVerdict is what an attempt says of its route.
type routeVerdict int

const (
	routeUnknown routeVerdict = iota // nothing: it did not reach the handlers after the module, or ended on its own
	routeUp                          // they answered: 2xx, 3xx, or a refusal (4xx but 408, 425 and 429)
	routeDown                        // they failed: an error, no answer in time, a 5xx, a 429
)

// verdictOf is what an attempt's judged outcome (judge) says of its route.
func verdictOf(o outcome, status int) routeVerdict {
	switch {
	case o == taken || o == refused:
		return routeUp
	case o == failed && (status >= 500 || status == 429):
		return routeDown
	}
	return routeUnknown
}

// breaker is a route's breaker. Its fields are the scheduler's, under s.mu.
type breaker struct {
	open      bool
	failures  int       // failures in a row
	rounds    int       // open: 1, and one more for each failed probe (the backoff's attempt number)
	openedAt  time.Time // open: since when
	nextProbe time.Time // open: when the next probe may go
	probing   bool      // a probe is in flight: probe
	probe     uuid.UUID
	waiting   []dueItem // open: the due entries held back, in the order they came due
	used      time.Time // when the last attempt through the route ended
	asked     time.Time // when an operator's retry last brought the probe forward (probeAccount)
}

// failed records a failure of an attempt through the route, at now; asked
// is the wait it asked for (Retry-After), probe whether it was the
// breaker's probe. It reports whether the breaker opened.
func (b *breaker) failed(now time.Time, p spoolPolicy, asked time.Duration, probe bool) (opened bool) {
	b.failures++
	switch {
	case !b.open && (b.failures >= breakerTrips || asked > 0):
		b.open, b.openedAt, b.rounds = true, now, 1
		b.nextProbe = now.Add(p.backoff(b.rounds, asked))
		return true
	case b.open && probe:
		b.rounds++
		b.nextProbe = now.Add(p.backoff(b.rounds, asked))
	case b.open && asked > 0:
		// An attempt under way as it opened: its Retry-After holds too.
		b.nextProbe = later(b.nextProbe, now.Add(p.backoff(1, asked)))
	}
	return false
}

// answered records an attempt through the route that was answered. It
// returns the entries that waited (some may be stale: dispatch checks
// them), and closes the breaker, if it was open.
func (b *breaker) answered() []dueItem {
	b.failures = 0
	if !b.open {
		return nil
	}
	waited := b.waiting
	b.open, b.rounds, b.waiting, b.nextProbe, b.openedAt = false, 0, nil, time.Time{}, time.Time{}
	return waited
}

// mayProbe reports whether a probe may go at now: open, none in flight,
// its time come.
func (b *breaker) mayProbe(now time.Time) bool {
	return b.open && !b.probing && !now.Before(b.nextProbe)
}

// hold makes a due entry wait for the breaker.
func (b *breaker) hold(it dueItem) { b.waiting = append(b.waiting, it) }

// later is the later of two times.
func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// gate says whether the route of d holds m back (held), and if not,
// whether m goes as the probe of its open breaker (probe, else nil): the
// probe's time has come, none is in flight, and no entry of the route
// waits longer (those go first, through s.probe, which drops the stale
// ones from the head of the list). Call with s.mu held.
func (s *scheduler) gate(m *spoolMeta, d *driver, now time.Time) (probe *breaker, held bool) {
	b := s.routes[route{m.Account, d.key}]
	if b == nil || !b.open {
		return nil, false
	}
	if b.mayProbe(now) && len(b.waiting) == 0 {
		return b, false
	}
	return b, true
}

// probe starts the probe of each open breaker whose time has come, with
// the entry of its route that has waited longest, within
// redrive_concurrency and redrive_rate, and returns how long until the
// next probe time of a breaker with entries waiting. An entry whose route
// changed meanwhile (a reload) is due again, for dispatch to send it its
// own way. Call with s.mu held.
func (s *scheduler) probe(now time.Time) time.Duration {
	wait := time.Hour
	for r, b := range s.routes {
		if !b.open || b.probing || len(b.waiting) == 0 {
			continue
		}
		if !b.mayProbe(now) {
			wait = min(wait, b.nextProbe.Sub(now))
			continue
		}
		if len(s.inflight) >= s.policy.workers() || s.halted.Err() != nil {
			return time.Hour // a worker that finishes wakes the loop
		}
		for len(b.waiting) > 0 {
			it := b.waiting[0]
			m, ok := s.entries[it.id]
			if !ok || m.gen != it.gen || m.State != statePending || s.inflight[it.id] {
				b.waiting = b.waiting[1:]
				continue
			}
			d := s.driverFor(m)
			if d == nil || d.key != r.server {
				b.waiting = b.waiting[1:]
				heap.Push(&s.due, it)
				continue
			}
			if s.limiter != nil {
				if delay := s.reserve(now); delay > 0 {
					return min(wait, delay)
				}
			}
			b.waiting = b.waiting[1:]
			b.probing, b.probe = true, it.id
			s.start(m, d)
			break
		}
	}
	return wait
}

// waitingOn is how many entries wait for b: those of its list still due
// (an entry delivered, deleted, retried through the admin API or handed to
// another instance meanwhile is not). Call with s.mu held.
func (s *scheduler) waitingOn(b *breaker) int {
	n := 0
	for _, it := range b.waiting {
		if m, ok := s.entries[it.id]; ok && m.gen == it.gen && m.State == statePending && !s.inflight[it.id] {
			n++
		}
	}
	return n
}

// settle records what an attempt at the entry id through d said of its
// route (verdict; asked: the Retry-After of a failure; failure: what
// failed), and wakes the re-drive loop: a breaker closed, or its probe
// ended. With no d (a dead letter made without an attempt) there is no
// route.
func (s *scheduler) settle(account string, d *driver, id uuid.UUID, verdict routeVerdict, asked time.Duration, failure string) {
	if d == nil || breakersOff.Load() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	r := route{account, d.key}
	b := s.routes[r]
	if b == nil {
		if verdict == routeUnknown || !s.routed(r) {
			return // nothing to say, or a route a reload took away (forget)
		}
		b = new(breaker)
		s.routes[r] = b
	}
	probe := b.probing && b.probe == id
	if probe {
		b.probing, b.probe = false, uuid.Nil
	}
	now := time.Now()
	b.used = now
	switch verdict {
	case routeDown:
		if b.failed(now, s.policy, asked, probe) {
			s.hold(r, true)
			s.store.log().Warn("spool: a route's re-drives fail: its due deliveries wait, and one at a time goes through as a probe until one is answered",
				zap.String("account", r.account), zap.String("server", r.server), zap.String("last_error", failure),
				zap.Int("failures", b.failures), zap.Time("next_probe", b.nextProbe))
		}
	case routeUp:
		openedAt := b.openedAt
		waited := s.waitingOn(b)
		if b.open {
			s.hold(r, false)
			for _, it := range b.answered() {
				heap.Push(&s.due, it)
			}
			s.store.log().Info("spool: a route answers re-drives again: the deliveries that waited are due",
				zap.String("account", r.account), zap.String("server", r.server),
				zap.Duration("open_for", now.Sub(openedAt)), zap.Int("waiting", waited))
		} else {
			b.answered()
		}
	}
	s.signal()
}

// answeredInline closes the breaker of d's route, if it is open: a
// delivery that just came in was answered through the route as it arrived
// (serveFallback), so the service is back, and the entries that waited are
// due. Each delivery calls it: unless its route's breaker is open, it
// reads one atomic of its driver.
func (s *scheduler) answeredInline(d *driver) {
	if d != nil && d.held.Load() {
		s.settle(d.account, d, uuid.Nil, routeUp, 0, "")
	}
}

// hold marks the drivers of r as held back by its open breaker, or not.
// Call with s.mu held.
func (s *scheduler) hold(r route, open bool) {
	for _, d := range s.drivers[r.account] {
		if d.key == r.server {
			d.held.Store(open)
		}
	}
}

// probeAccount lets the next probe of each open breaker of account's
// routes go at once: an operator retried one of its entries through the
// admin API, to see whether the service is back (probeNow). The probe is
// the entry of the route that has waited longest; at most one a backoff
// min.
func (s *scheduler) probeAccount(account string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	for r, b := range s.routes {
		// At most one probe brought forward per backoff min: retries
		// of many entries by ID must not hammer a service that is down.
		if r.account == account && b.open && now.Sub(b.asked) >= s.policy.backoffMin {
			b.nextProbe, b.asked = now, now
			s.signal()
		}
	}
}

// routed reports whether a registered driver serves r. Call with s.mu
// held.
func (s *scheduler) routed(r route) bool {
	for _, d := range s.drivers[r.account] {
		if d.key == r.server {
			return true
		}
	}
	return false
}

// forget drops the breaker of a route no driver serves any more (a reload
// moved the account's handler to another server, or dropped it): the
// entries that waited for it are due, to go their own way. Call with s.mu
// held.
func (s *scheduler) forget(r route) {
	if s.routed(r) {
		return
	}
	if b := s.routes[r]; b != nil {
		for _, it := range b.waiting {
			heap.Push(&s.due, it)
		}
		delete(s.routes, r)
	}
}

// heldBack reports whether m's route has its breaker open: m waits for
// it when due (unless it goes as the probe). Call with s.mu held.
func (s *scheduler) heldBack(m *spoolMeta) bool {
	if len(s.routes) == 0 {
		return false
	}
	d := s.driverFor(m)
	if d == nil {
		return false
	}
	b := s.routes[route{m.Account, d.key}]
	return b != nil && b.open
}

// stalled reports whether entries of account wait for an open breaker:
// a shared store reads no more of its turns meanwhile (they would wait
// too). Call with s.mu held.
func (s *scheduler) stalled(account string) bool {
	for r, b := range s.routes {
		if r.account == account && b.open && s.waitingOn(b) > 0 {
			return true
		}
	}
	return false
}

// breakers is the state of the breakers of the routes s re-drives through:
// those open, and those closed that an attempt went through within
// breakerShown.
func (s *scheduler) breakers() []breakerState {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []breakerState
	for r, b := range s.routes {
		if !b.open && now.Sub(b.used) > breakerShown {
			continue
		}
		st := breakerState{Account: r.account, Server: r.server, State: "closed", Failures: b.failures}
		if b.open {
			st.State, st.NextProbe, st.Waiting = "open", b.nextProbe, s.waitingOn(b)
		}
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b breakerState) int {
		return cmp.Or(cmp.Compare(a.Account, b.Account), cmp.Compare(a.Server, b.Server))
	})
	return out
}

// openBreakers adds to open, for each account s re-drives for, how many of
// its routes have their breaker open (0 when none).
func (s *scheduler) openBreakers(open map[string]int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for account := range s.drivers {
		if _, ok := open[account]; !ok {
			open[account] = 0
		}
	}
	for r, b := range s.routes {
		if b.open {
			open[r.account]++
		}
	}
}
