package trivialsecwebhook

import (
	"bytes"
	"cmp"
	"container/heap"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/google/uuid"
	"go.uber.org/zap"
	"golang.org/x/time/rate"
)

// A re-drive sends a spooled delivery through its server's routes again, as
// if it had just arrived: same method, URI, host, headers, body and client
// address. Its context carries a mark that only this package can make
// (redriveKey is unexported, and a context value never comes from the
// network); the handler of the same account passes a marked request on to
// the handlers after it, with the event's placeholders set, without
// checking it again, and records on the mark what those handlers did. The
// re-drive is judged by that record alone, never by what the server as a
// whole answered: a route that no longer reaches the handler, or an error
// page that `handle_errors` answers 200, is not a delivery.

// redriveKey is the context key of the mark.
type redriveKey struct{}

// redrive is the mark, and what the handler of its account records on it.
// The handlers run in the goroutine of send, which reads it after them.
type redrive struct {
	account string
	ev      event

	// A delivery held while the Redis replay store did not answer is
	// checked first, with the token of the reservation tried then (check,
	// token); replayed says it was a copy.
	check      bool
	checked    bool // the check passed: the reservation is the entry's
	token      string
	replayed   bool
	unanswered bool // the replay store did not answer the check: again soon
	expired    bool // held past exp + leeway: it cannot be checked any more
	moved      bool // into the handler's spool (moveHeld)
	// The store it comes from, and its metadata: an entry of a store other
	// than the handler's spool (held beside a Redis spool) moves into it.
	from redriveStore
	meta *spoolMeta

	reached bool   // the handler of the account passed it on
	status  int    // the first final status the handlers after it wrote; 0: none
	asked   string // the Retry-After they wrote with it (statusWriter)
	err     error  // what they returned
}

// redriveOf returns the mark of a re-driven request, or nil.
func redriveOf(r *http.Request) *redrive {
	rd, _ := r.Context().Value(redriveKey{}).(*redrive)
	return rd
}

// scheduler re-drives the entries of a store: a heap of when each is due, the
// handlers able to send them, and at most redrive_concurrency attempts at once (and redrive_rate starts a second).
// Both stores use it; what is stored, and how, is theirs (redriveStore).
type scheduler struct {
	store redriveStore
	// shared: the store is shared with other instances (Redis). entries
	// then holds only the entries this instance holds, and a dead letter
	// leaves it. Otherwise (file) entries is every entry of the store.
	shared bool

	mu       sync.Mutex
	policy   spoolPolicy
	entries  map[uuid.UUID]*spoolMeta
	tally    spoolStats // what entries holds, kept as it changes
	due      dueHeap
	drivers  map[string][]*driver // account -> handlers able to re-drive, newest last
	parked   map[string][]dueItem // account -> due entries waiting for a ready handler
	orphans  map[string]bool      // accounts with no handler, whose waiting entries were logged
	inflight map[uuid.UUID]bool
	routes   map[route]*breaker // the breakers of the routes it re-drives through (spool_breaker.go)
	wake     chan struct{}
	landed   chan struct{} // poked when an attempt ends: a worker is free (the Redis store reads more)

	// halted ends dispatching (finish), stopped everything else, the
	// attempts in flight included (stop); stopped halts too.
	halt     context.CancelFunc
	halted   context.Context
	stop     context.CancelFunc
	stopped  context.Context
	workers  sync.WaitGroup
	attempts sync.WaitGroup // the attempts in flight
	grace    time.Duration  // how long finish waits for them; 0: attempt_timeout
	limiter  *rate.Limiter  // redrive_rate; nil: no limit
	oldest   uuid.UUID      // a waiting entry none waits longer than, while it waits (oldestWaiting)
	noneWait bool           // the last scan found none waiting, and none has since
}

// redriveStore is what the scheduler needs of a store.
type redriveStore interface {
	// take reads what an attempt at m sends. A shared store first makes
	// sure this instance still holds m: errNotHeld if not (another took it
	// over, or it was deleted or retried meanwhile), errStoreDown if the
	// store does not answer.
	take(m *spoolMeta) (spoolRequest, []byte, error)
	// delivered deletes an entry the next handler took.
	delivered(m spoolMeta)
	// failed saves the outcome of a failed attempt: m as it is now.
	failed(m spoolMeta) error
	log() *zap.Logger
}

// What take may fail with, besides the entry being unreadable (which
// counts as a failed attempt).
var (
	errNotHeld   = errors.New("the entry is no longer this instance's to deliver")
	errStoreDown = errors.New("the spool store does not answer")
)

func newScheduler(store redriveStore, shared bool, policy spoolPolicy) *scheduler {
	s := &scheduler{
		store:    store,
		shared:   shared,
		policy:   policy,
		entries:  make(map[uuid.UUID]*spoolMeta),
		drivers:  make(map[string][]*driver),
		parked:   make(map[string][]dueItem),
		orphans:  make(map[string]bool),
		inflight: make(map[uuid.UUID]bool),
		routes:   make(map[route]*breaker),
		wake:     make(chan struct{}, 1),
		landed:   make(chan struct{}, 1),
	}
	s.stopped, s.stop = context.WithCancel(context.Background())
	s.halted, s.halt = context.WithCancel(s.stopped) // a stop halts too
	s.setLimit(policy.rate)
	return s
}

// setGrace sets how long the attempts in flight have to finish when the
// store stops: the grace period of the HTTP servers of the config that
// started last (grace_period), 0 for none.
func (s *scheduler) setGrace(d time.Duration) {
	s.mu.Lock()
	s.grace = d
	s.mu.Unlock()
}

// finish stops dispatching, and lets the attempts in flight end: a service
// that has read a delivery answers, and its answer is recorded, rather
// than the delivery being made again later (by another instance, with a
// shared store). It waits at most the grace period, or attempt_timeout
// (each attempt's own bound) without one; then it stops the store's loops,
// cutting short what is still in flight, which stays in the spool.
func (s *scheduler) finish() {
	s.halt()
	s.mu.Lock() // dispatch starts nothing once halted, under s.mu
	wait := s.grace
	if wait <= 0 {
		wait = s.policy.attemptTimeout
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() {
		s.attempts.Wait()
		close(done)
	}()
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		s.mu.Lock()
		n := len(s.inflight)
		s.mu.Unlock()
		s.store.log().Warn("spool: re-drives still under way at the end of the grace period are cut short: they stay in the spool, and are delivered again",
			zap.Int("cut", n), zap.Duration("waited", wait))
	}
	s.stop()
}

// setPolicy applies the Spool settings of the config that uses the store
// last.
func (s *scheduler) setPolicy(p spoolPolicy) {
	s.mu.Lock()
	if p.rate != s.policy.rate {
		s.setLimit(p.rate)
	}
	s.policy = p
	s.mu.Unlock()
	s.signal() // more room, or a rate no longer limited
}

// setLimit makes the limiter of redrive_rate: one start at a time, spaced
// evenly. Call with s.mu held, or before the scheduler runs.
func (s *scheduler) setLimit(perSecond float64) {
	s.limiter = nil
	if perSecond > 0 {
		s.limiter = rate.NewLimiter(rate.Limit(perSecond), 1)
	}
}

// schedule adds an entry to the index, due at m.NextAttempt, or puts it
// in place of the one there. Call with s.mu held.
func (s *scheduler) schedule(m spoolMeta) {
	if old, ok := s.entries[m.EventID]; ok {
		s.unindex(old)
		m.gen = old.gen + 1
	}
	s.entries[m.EventID] = &m
	s.tally.add(m.State, m.Size, 1)
	s.noteWaiting(&m)
	heap.Push(&s.due, dueItem{at: m.NextAttempt, id: m.EventID, gen: m.gen})
	s.signal()
}

// unindex takes an entry out of the index. Call with s.mu held.
func (s *scheduler) unindex(m *spoolMeta) {
	delete(s.entries, m.EventID)
	m.gen++ // its heap item, if any, is stale now
	s.tally.add(m.State, m.Size, -1)
}

// restate changes the state of an entry of the index. Call with s.mu held.
func (s *scheduler) restate(m *spoolMeta, state string) {
	s.tally.add(m.State, m.Size, -1)
	m.State = state
	s.tally.add(m.State, m.Size, 1)
	s.noteWaiting(m)
}

// noteWaiting keeps s.oldest as the index changes: an entry that waits
// (not a dead letter) and was spooled before it takes its place. Call with
// s.mu held.
func (s *scheduler) noteWaiting(m *spoolMeta) {
	if m.State == stateDead {
		return
	}
	if cur, ok := s.entries[s.oldest]; !ok || cur.State == stateDead || m.SpooledAt.Before(cur.SpooledAt) {
		s.oldest, s.noneWait = m.EventID, false
	}
}

// oldestWaiting is when the entry that has waited longest (not a dead
// letter) was spooled, zero if none waits: s.oldest while it waits, else a
// scan of the index (10 ms for 100,000 entries), which happens when that
// entry is delivered or dies, not again while none waits. Call with s.mu
// held.
func (s *scheduler) oldestWaiting() time.Time {
	if m, ok := s.entries[s.oldest]; ok && m.State != stateDead {
		return m.SpooledAt
	}
	if s.noneWait {
		return time.Time{}
	}
	var oldest *spoolMeta
	for _, m := range s.entries {
		if m.State != stateDead && (oldest == nil || m.SpooledAt.Before(oldest.SpooledAt)) {
			oldest = m
		}
	}
	if oldest == nil {
		s.noneWait = true
		return time.Time{}
	}
	s.oldest = oldest.EventID
	return oldest.SpooledAt
}

// drop takes an entry out of the index if it is still there under turn
// (always, for the file store), and returns it. An attempt in flight lands
// on nothing.
func (s *scheduler) drop(id uuid.UUID, turn string) (spoolMeta, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.entries[id]
	if !ok || m.turn != turn {
		return spoolMeta{}, false
	}
	s.unindex(m)
	return *m, true
}

// pause waits d, or until the store stops; it reports whether it may go on.
func (s *scheduler) pause(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-s.stopped.Done():
		return false
	case <-t.C:
		return true
	}
}

// signal wakes the re-drive loop. It never blocks.
func (s *scheduler) signal() { poke(s.wake) }

// poke wakes the loop that waits on ch, a channel of capacity 1, unless it
// is woken already.
func poke(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// driver is a handler's server, able to run a request through the routes
// once the config it belongs to has started. It is told so by Caddy's
// "started" event.
type driver struct {
	server  *caddyhttp.Server
	key     string // serverKey(server), made once
	account string
	ready   atomic.Bool
	sched   *scheduler
	// held: its route's breaker is open (spool_breaker.go). Each delivery
	// through the driver's handler reads it, without s.mu.
	held atomic.Bool
}

// serverKey names the server a delivery arrived on, in its entry, so that
// it is re-driven through the same server: its listen addresses, which no
// two servers share, and which stay the same across reloads and restarts
// when Caddy's generated names (srv0, srv1, ...) may not.
func serverKey(s *caddyhttp.Server) string { return strings.Join(s.Listen, " ") }

// Handle marks the driver ready: its config's apps have started. The
// account's entries that waited for a handler are due again.
func (d *driver) Handle(context.Context, caddy.Event) error {
	d.ready.Store(true)
	s := d.sched
	s.mu.Lock()
	for _, it := range s.parked[d.account] {
		if m, ok := s.entries[it.id]; ok && m.State == stateParked {
			s.restate(m, statePending)
		}
		heap.Push(&s.due, it)
	}
	delete(s.parked, d.account)
	delete(s.orphans, d.account)
	s.mu.Unlock()
	s.signal()
	return nil
}

// register adds a handler's driver for its account.
func (s *scheduler) register(d *driver) {
	d.sched = s
	s.mu.Lock()
	defer s.mu.Unlock()
	s.drivers[d.account] = append(s.drivers[d.account], d)
	if b := s.routes[route{d.account, d.key}]; b != nil && b.open {
		d.held.Store(true)
	}
}

// unregister removes it, when its config is cleaned up.
func (s *scheduler) unregister(d *driver) {
	s.mu.Lock()
	defer s.mu.Unlock()
	account := d.account
	ds := s.drivers[account]
	for i := range ds {
		if ds[i] == d {
			s.drivers[account] = append(ds[:i:i], ds[i+1:]...)
			break
		}
	}
	if len(s.drivers[account]) == 0 {
		delete(s.drivers, account)
	}
	s.forget(route{account, d.key})
	// Entries that waited for it (a config that never started: its
	// "started" event never comes) are due again, to wait for another
	// handler, or to be parked.
	for _, it := range s.parked[account] {
		heap.Push(&s.due, it)
	}
	delete(s.parked, account)
	s.signal()
}

// driverFor returns the driver to re-drive m through: the newest ready one
// of its account on the server it arrived on, or, when no handler of the
// account is on that server any more, the newest ready one on another.
// nil: none is ready yet, or the account has no handler. Call with s.mu
// held.
func (s *scheduler) driverFor(m *spoolMeta) *driver {
	ds := s.drivers[m.Account]
	var other *driver
	for i := len(ds) - 1; i >= 0; i-- {
		switch {
		case m.Server != "" && ds[i].key == m.Server:
			if ds[i].ready.Load() {
				return ds[i]
			}
			return nil // its own server's handler is on its way: wait for it
		case other == nil && ds[i].ready.Load():
			other = ds[i]
		}
	}
	return other
}

// serves reports whether a ready handler serves the account. Call with
// s.mu held.
func (s *scheduler) serves(account string) bool {
	for _, d := range s.drivers[account] {
		if d.ready.Load() {
			return true
		}
	}
	return false
}

// redriveLoop hands due entries to re-drive workers, at most
// redrive_concurrency at once and redrive_rate a second, until the store
// is destroyed. An entry whose account has no ready handler waits until one
// registers.
func (s *scheduler) redriveLoop() {
	defer s.workers.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		wait := s.dispatch(time.Now())
		timer.Reset(wait)
		select {
		case <-s.halted.Done():
			return
		case <-s.wake:
		case <-timer.C:
		}
	}
}

// dispatch starts the entries due at now, and returns how long to wait for
// the next one. A due entry with no ready handler to take it waits (it is
// parked) until one is ready; when its account has no handler at all, it is
// "parked" in the listing, and at its max_age it becomes a dead letter. A
// due entry whose route's breaker is open waits for it, and the breaker's
// probes go first (spool_breaker.go).
func (s *scheduler) dispatch(now time.Time) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	wait := s.probe(now)
	for s.due.Len() > 0 {
		it := s.due[0]
		m, ok := s.entries[it.id]
		if !ok || m.gen != it.gen || (m.State != statePending && m.State != stateParked) || s.inflight[it.id] {
			heap.Pop(&s.due)
			continue
		}
		if it.at.After(now) {
			return min(wait, it.at.Sub(now))
		}
		if len(s.inflight) >= s.policy.workers() || s.halted.Err() != nil {
			return time.Hour // a worker that finishes wakes the loop
		}
		d := s.driverFor(m)
		if d == nil && (s.shared || len(s.drivers[m.Account]) > 0 || now.Before(m.SpooledAt.Add(s.policy.maxAge))) {
			heap.Pop(&s.due)
			s.park(m, it)
			continue
		}
		var probe *breaker // the breaker m is the probe of
		if d != nil {
			var held bool
			if probe, held = s.gate(m, d, now); held {
				heap.Pop(&s.due)
				probe.hold(it)
				if !probe.probing && probe.nextProbe.After(now) {
					wait = min(wait, probe.nextProbe.Sub(now)) // its probe's time
				}
				continue
			}
		}
		if d != nil && s.limiter != nil {
			if delay := s.reserve(now); delay > 0 {
				return min(wait, delay)
			}
		}
		heap.Pop(&s.due)
		if probe != nil {
			probe.probing, probe.probe = true, it.id
		}
		s.start(m, d) // with no driver: a dead letter
	}
	return wait
}

// reserve takes a turn of redrive_rate for an attempt at now, or says how
// long to wait for one (and takes none). Call with s.mu held, and a
// limiter.
func (s *scheduler) reserve(now time.Time) time.Duration {
	// An attempt waits for its turn (a dead letter made without one does
	// not).
	r := s.limiter.ReserveN(now, 1)
	if wait := r.DelayFrom(now); wait > 0 {
		r.CancelAt(now)
		return wait
	}
	return 0
}

// start starts an attempt at m through d. Call with s.mu held, m out of
// the heap.
func (s *scheduler) start(m *spoolMeta, d *driver) {
	if m.State == stateParked {
		s.restate(m, statePending)
	}
	s.inflight[m.EventID] = true
	s.workers.Add(1)
	s.attempts.Add(1)
	go s.attempt(*m, d)
}

// park makes a due entry wait for a ready handler of its account. When the
// account has no handler at all, the entry is parked in the listing, is due
// again at its max_age (when it becomes a dead letter), and the first one
// says so at ERROR. Call with s.mu held.
func (s *scheduler) park(m *spoolMeta, it dueItem) {
	s.parked[m.Account] = append(s.parked[m.Account], it)
	if len(s.drivers[m.Account]) > 0 || s.shared {
		// Its handler is not ready yet: it will be. (An instance of a
		// shared store hands an account it no longer serves back to the
		// others: renew.)
		return
	}
	if m.State != stateParked {
		s.restate(m, stateParked)
	}
	heap.Push(&s.due, dueItem{at: m.SpooledAt.Add(s.policy.maxAge), id: m.EventID, gen: m.gen})
	if !s.orphans[m.Account] && !caddy.Exiting() {
		s.orphans[m.Account] = true
		s.store.log().Error("spool: deliveries of an account that no trivialsec_webhook handler of the running config serves are waiting: "+
			"serve the account again, or delete them through the admin API; at max_age they become dead letters",
			zap.String("account", m.Account), zap.Duration("max_age", s.policy.maxAge))
	}
}

// storeDownWait is how long an entry waits when its store did not answer
// before an attempt: not an attempt, no backoff.
const storeDownWait = time.Second

// attempt re-drives one entry through d and records what came of it. With
// no d (its account has no handler, and its max_age passed) it makes the
// entry a dead letter without an attempt.
//
// The entry stays in s.inflight until land has put its outcome in the
// index, heap item and all: dispatch drops the heap items of entries in
// flight.
func (s *scheduler) attempt(m spoolMeta, d *driver) {
	defer s.workers.Done()
	defer s.attempts.Done()
	defer s.signal() // a worker is free
	landed := false
	defer func() {
		if !landed { // Caddy is stopping, or the store panicked
			s.mu.Lock()
			delete(s.inflight, m.EventID)
			s.mu.Unlock()
		}
	}()
	s.mu.Lock()
	policy := s.policy
	s.mu.Unlock()

	var o outcome
	var status int
	var failure string
	var asked time.Duration // Retry-After
	var verdict routeVerdict
	// What the attempt says of its route goes to the route's breaker, the
	// probe's too, whichever way the attempt ends: before the deferred
	// calls above, which run after it; and before a failure lands, so that
	// the worker it frees finds the breaker open, if it opened.
	settled := false
	defer func() {
		if !settled {
			s.settle(m.Account, d, m.EventID, verdict, asked, failure)
		}
	}()
	if d == nil {
		o, failure = refused, fmt.Sprintf("no trivialsec_webhook handler of the running config serves account %q", m.Account)
	} else {
		req, body, err := s.store.take(&m)
		switch {
		case errors.Is(err, errNotHeld):
			s.land(m, true, time.Time{})
			landed = true
			return
		case errors.Is(err, errStoreDown):
			s.land(m, false, time.Now().Add(storeDownWait))
			landed = true
			return
		case err != nil:
			o, failure = failed, err.Error()
		default:
			o, status, failure, asked, verdict = s.send(&m, d, req, body, policy.attemptTimeout)
		}
		if o == waiting { // not an attempt: checked again soon, without backing off
			m.LastError = failure
			s.land(m, false, time.Now().Add(storeDownWait))
			landed = true
			return
		}
		if s.stopped.Err() != nil && o != taken && o != replayed && o != moved {
			// Cut short by the stop (reverse_proxy answers a cancelled
			// request 499, which would read as a refusal): not an attempt,
			// the entry stays as it is. What the handlers took, or a check
			// settled, is recorded.
			verdict = routeUnknown
			return
		}
		spoolAttempts.Inc()
		m.Attempts++
	}
	now := time.Now()
	log := s.store.log().With(zap.String("event_id", m.EventID.String()), zap.String("event_name", m.EventName),
		zap.Int("attempts", m.Attempts))
	if o == replayed || o == moved {
		s.store.delivered(m)
		s.land(m, true, time.Time{})
		landed = true
		if o == replayed {
			refusedCounters[reasonReplayed].Inc()
			log.Warn("spool: a delivery held while the replay store did not answer is a copy of one accepted before: dropped")
		}
		return
	}
	if o == taken {
		s.store.delivered(m)
		s.land(m, true, time.Time{})
		landed = true
		spoolRedelivered.Inc()
		log.Info("spool: redelivered", zap.Int("status", status), zap.Duration("spooled_for", now.Sub(m.SpooledAt)))
		return
	}

	m.LastError = failure
	dead := true
	if o == failed {
		m.NextAttempt, dead = policy.retryAt(now, m.SpooledAt, m.Attempts, asked)
	}
	if dead {
		m.State, m.NextAttempt = stateDead, time.Time{}
	}
	if err := s.store.failed(m); err != nil {
		log.Error("spool: the outcome of an attempt could not be saved", zap.Error(err))
	}
	s.settle(m.Account, d, m.EventID, verdict, asked, failure)
	settled = true
	s.land(m, false, m.NextAttempt)
	landed = true
	if dead {
		spoolDeadLettered.Inc()
		log.Error("spool: dead letter: kept, and not retried until an operator retries or deletes it",
			zap.String("last_error", failure), zap.Time("spooled_at", m.SpooledAt))
		return
	}
	log.Warn("spool: attempt failed, will retry", zap.String("last_error", failure), zap.Time("next_attempt", m.NextAttempt))
}

// land ends an attempt at m: the index drops the entry (remove, or a dead
// letter of a shared store), or takes m's outcome, due again at next if it
// is pending. An entry that a newer turn replaced meanwhile (a Redis
// entry retried through the admin API) keeps its own schedule.
func (s *scheduler) land(m spoolMeta, remove bool, next time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.inflight, m.EventID)
	poke(s.landed)
	cur, ok := s.entries[m.EventID]
	switch {
	case !ok:
		return
	case cur.turn != m.turn:
		next = cur.NextAttempt
	case remove || (m.State == stateDead && s.shared):
		s.unindex(cur)
		return
	default:
		s.restate(cur, m.State)
		cur.Attempts, cur.LastError, cur.NextAttempt = m.Attempts, m.LastError, m.NextAttempt
		cur.Unchecked, cur.ReplayToken = m.Unchecked, m.ReplayToken
	}
	cur.gen++
	if cur.State == statePending {
		heap.Push(&s.due, dueItem{at: next, id: cur.EventID, gen: cur.gen})
	}
}

// send runs one entry through its server's routes and says what came of
// it, with the status, what failed ("" when it was taken), the wait the
// service asked for, and what it says of the route. It is judged
// by what the handler of the entry's account and the handlers after it
// did (judge), as the first attempt was: a request that never reached that
// handler failed, whatever the server answered.
func (s *scheduler) send(m *spoolMeta, d *driver, req spoolRequest, body []byte, timeout time.Duration) (o outcome, status int, failure string, asked time.Duration, verdict routeVerdict) {
	rd := &redrive{account: m.Account, ev: m.event(), check: m.Unchecked, token: m.ReplayToken, from: s.store, meta: m}
	ctx, cancel := context.WithTimeout(context.WithValue(s.stopped, redriveKey{}, rd), timeout)
	defer cancel()
	r, err := req.build(ctx, body)
	if err != nil {
		return failed, 0, err.Error(), 0, routeUnknown
	}
	defer func() {
		p := recover()
		if p == nil {
			return
		}
		// A handler panicked: reverse_proxy does (http.ErrAbortHandler)
		// when the upstream breaks off an answer it had begun. A 2xx begun
		// reached the service; anything else is tried again.
		logPanic(s.store.log(), p)
		failure = fmt.Sprintf("the handlers panicked: %v", p)
		// What the route is worth is unknown: an answer begun and broken
		// off neither opens nor closes its breaker.
		o, status, verdict = failed, 0, routeUnknown
		if rd.reached && rd.status != 0 {
			o, status, _ = judge(rd.status, nil)
		}
		if o == taken {
			failure = ""
		}
	}()
	w := &discardWriter{header: make(http.Header)}
	d.server.ServeHTTP(w, r)
	if rd.checked {
		// Its reservation is in the replay store now: not checked again
		// (a check after exp + leeway could not tell, nor one against a
		// memory store that holds its own reservation).
		m.Unchecked, m.ReplayToken = false, ""
	}
	switch {
	case rd.replayed:
		return replayed, 0, "a copy of a delivery accepted before", 0, routeUnknown
	case rd.expired:
		return refused, 0, "held while the replay store did not answer, and not checked before its token's exp + leeway, after which no check can tell a copy: retry it (vouching for it) or delete it", 0, routeUnknown
	case rd.unanswered:
		return waiting, 0, rd.err.Error(), 0, routeUnknown
	case rd.moved:
		return moved, 0, "", 0, routeUnknown
	}
	if !rd.reached {
		// The path, not the query: last_error is listed by the admin API,
		// and a query may carry a key.
		return failed, 0, fmt.Sprintf("the route no longer reaches the trivialsec_webhook handler of account %q (%s %s%s: server %s answered %d)",
			m.Account, req.Method, req.Host, r.URL.Path, d.server.Name(), cmp.Or(w.status, http.StatusOK)), 0, routeUnknown
	}
	o, status, err = judge(rd.status, rd.err)
	if o != taken {
		failure = describeFailure(status, err)
	}
	return o, status, failure, retryAfter(status, err, rd.asked, time.Now()), verdictOf(o, status)
}

// dueItem is when a pending entry is due.
type dueItem struct {
	at  time.Time
	id  uuid.UUID
	gen int
}

type dueHeap []dueItem

func (h dueHeap) Len() int           { return len(h) }
func (h dueHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h dueHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *dueHeap) Push(x any)        { *h = append(*h, x.(dueItem)) }
func (h *dueHeap) Pop() any {
	old := *h
	e := old[len(old)-1]
	*h = old[:len(old)-1]
	return e
}

// describeFailure says what an attempt failed with: the error the next
// handler returned, if any, and the status.
func describeFailure(status int, err error) string {
	if status == 0 {
		return err.Error()
	}
	if err != nil {
		return fmt.Sprintf("%d: %v", status, err)
	}
	return fmt.Sprintf("%d %s", status, http.StatusText(status))
}

// event is the verified event an entry holds, for the placeholders.
func (m *spoolMeta) event() event {
	ev := event{ID: m.EventID, Name: m.EventName, Timestamp: m.Timestamp, nameIndex: eventIndex([]byte(m.EventName))}
	ev.token = verifiedToken{EventID: m.EventID, IssuedAt: m.IssuedAt, ExpiresAt: m.ExpiresAt}
	if m.Endpoint != nil {
		ev.token.Endpoint, ev.token.hasEndpoint = *m.Endpoint, true
	}
	return ev
}

// build makes the request again, in ctx.
func (q *spoolRequest) build(ctx context.Context, body []byte) (*http.Request, error) {
	u, err := url.ParseRequestURI(q.RequestURI)
	if err != nil {
		return nil, fmt.Errorf("the spooled request's URI does not parse: %v", err)
	}
	major, minor, ok := http.ParseHTTPVersion(q.Proto)
	if !ok {
		major, minor = 1, 1
	}
	r := &http.Request{
		Method:        q.Method,
		URL:           u,
		RequestURI:    q.RequestURI,
		Proto:         q.Proto,
		ProtoMajor:    major,
		ProtoMinor:    minor,
		Header:        q.Header,
		Host:          q.Host,
		RemoteAddr:    q.RemoteAddr,
		Body:          io.NopCloser(bytes.NewReader(body)),
		ContentLength: int64(len(body)),
	}
	if r.Header == nil {
		r.Header = make(http.Header)
	}
	if q.TLS != nil {
		r.TLS = &tls.ConnectionState{HandshakeComplete: true, ServerName: q.TLS.ServerName, Version: q.TLS.Version}
	}
	return r.WithContext(ctx), nil
}

// discardWriter is where a re-drive's answer goes, as the server as a
// whole writes it: nowhere, but for its status, which only a failure's
// message tells. What counts is what the handler of the account recorded
// (statusWriter).
type discardWriter struct {
	header http.Header
	status int
}

func (w *discardWriter) Header() http.Header { return w.header }

func (w *discardWriter) WriteHeader(status int) {
	if w.status == 0 && status >= 200 {
		w.status = status
	}
}

func (w *discardWriter) Write(p []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	return len(p), nil
}

// statusWriter passes an answer on, and records its first final status
// (1xx are not final): what the handlers after this one answered, for the
// first attempt without the spool and for a re-drive. It is all they need
// of a recorder, at one allocation.
type statusWriter struct {
	http.ResponseWriter
	status int
	before string // Retry-After before the handlers ran
	asked  string // Retry-After as they wrote a 503 or 429, if they set it
}

func (w *statusWriter) WriteHeader(status int) {
	if w.status == 0 && status >= 200 {
		w.status = status
		if askedRetry(status) {
			if v := w.Header().Get("Retry-After"); v != w.before {
				w.asked = v
			}
		}
	}
	w.ResponseWriter.WriteHeader(status)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

// Unwrap lets http.ResponseController reach the writer underneath.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// spoolRequestOf is the request a re-drive will send: r as the next handler
// got it, with the method and URI it arrived with. Handlers before this one
// run again on a re-drive (and rewrite the URI again); so do handlers after
// it that change r's headers in place (request_header, forward_auth), which
// is harmless when they set a header, not when they add a value to one.
// reverse_proxy works on a copy.
func spoolRequestOf(r *http.Request) spoolRequest {
	q := spoolRequest{
		Method:     r.Method,
		RequestURI: r.RequestURI,
		Proto:      r.Proto,
		Host:       r.Host,
		Header:     r.Header.Clone(),
		RemoteAddr: r.RemoteAddr,
	}
	if orig, ok := r.Context().Value(caddyhttp.OriginalRequestCtxKey).(http.Request); ok {
		q.Method, q.RequestURI = orig.Method, orig.RequestURI
	}
	if q.RequestURI == "" {
		q.RequestURI = r.URL.RequestURI()
	}
	if r.TLS != nil {
		q.TLS = &spoolTLS{ServerName: r.TLS.ServerName, Version: r.TLS.Version}
	}
	return q
}

// spoolMetaOf is a new entry's metadata.
func spoolMetaOf(account string, ev *event, now time.Time) spoolMeta {
	m := spoolMeta{
		EventID:     ev.ID,
		EventName:   ev.Name,
		State:       statePending,
		SpooledAt:   now,
		NextAttempt: now,
		Account:     account,
		Timestamp:   ev.Timestamp,
		IssuedAt:    ev.token.IssuedAt,
		ExpiresAt:   ev.token.ExpiresAt,
	}
	if ev.token.hasEndpoint {
		endpoint := ev.token.Endpoint
		m.Endpoint = &endpoint
	}
	return m
}

// Interface guards
var (
	_ http.ResponseWriter = (*discardWriter)(nil)
	_ http.ResponseWriter = (*statusWriter)(nil)
)
