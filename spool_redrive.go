package trivialsecwebhook

import (
	"bytes"
	"container/heap"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// A re-drive sends a spooled delivery through its server's routes again, as
// if it had just arrived: same method, URI, host, headers, body and client
// address. Its context carries a mark that only this package can make
// (redriveKey is unexported, and a context value never comes from the
// network); the handler of the same account passes a marked request on to
// the handlers after it, with the event's placeholders set, without
// checking it again.

// redriveKey is the context key of the mark.
type redriveKey struct{}

// redrive is the mark, and what the handler reports back.
type redrive struct {
	account string
	ev      event
	err     error // what the next handler returned
}

// redriveOf returns the mark of a re-driven request, or nil.
func redriveOf(r *http.Request) *redrive {
	rd, _ := r.Context().Value(redriveKey{}).(*redrive)
	return rd
}

// driver is a handler's server, able to run a request through the routes
// once the config it belongs to has started. It is told so by Caddy's
// "started" event.
type driver struct {
	server  *caddyhttp.Server
	account string
	ready   atomic.Bool
	spool   *fileSpool
}

// Handle marks the driver ready: its config's apps have started. The
// account's entries that waited for a handler are due again.
func (d *driver) Handle(context.Context, caddy.Event) error {
	d.ready.Store(true)
	s := d.spool
	s.mu.Lock()
	for _, it := range s.parked[d.account] {
		heap.Push(&s.due, it)
	}
	delete(s.parked, d.account)
	s.mu.Unlock()
	s.signal()
	return nil
}

// register adds a handler's driver for its account.
func (s *fileSpool) register(d *driver) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.drivers[d.account] = append(s.drivers[d.account], d)
}

// unregister removes it, when its config is cleaned up.
func (s *fileSpool) unregister(d *driver) {
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
}

// driverFor returns the newest ready driver of an account, or nil. Call
// with s.mu held.
func (s *fileSpool) driverFor(account string) *driver {
	ds := s.drivers[account]
	for i := len(ds) - 1; i >= 0; i-- {
		if ds[i].ready.Load() {
			return ds[i]
		}
	}
	return nil
}

// replayPruneInterval is how often expired replay reservations leave the
// journal.
const replayPruneInterval = 10 * time.Minute

// redriveLoop hands due entries to re-drive workers, at most redriveWorkers
// at once, until the store is destroyed. An entry whose account has no
// ready handler waits until one registers.
func (s *fileSpool) redriveLoop() {
	defer s.workers.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	prune := time.NewTicker(replayPruneInterval)
	defer prune.Stop()
	for {
		wait := s.dispatch(time.Now())
		timer.Reset(wait)
		select {
		case <-s.stopped.Done():
			return
		case <-s.wake:
		case <-timer.C:
		case <-prune.C:
			s.pruneReplay(time.Now())
		}
	}
}

// dispatch starts the entries due at now, and returns how long to wait for
// the next one. A due entry whose account has no ready handler is parked
// until one is ready.
func (s *fileSpool) dispatch(now time.Time) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	for s.due.Len() > 0 {
		it := s.due[0]
		m, ok := s.entries[it.id]
		if !ok || m.gen != it.gen || m.State != statePending || s.inflight[it.id] {
			heap.Pop(&s.due)
			continue
		}
		if it.at.After(now) {
			return it.at.Sub(now)
		}
		if len(s.inflight) >= redriveWorkers {
			return time.Hour // a worker that finishes wakes the loop
		}
		heap.Pop(&s.due)
		d := s.driverFor(m.Account)
		if d == nil {
			s.parked[m.Account] = append(s.parked[m.Account], it)
			continue
		}
		s.inflight[it.id] = true
		s.workers.Add(1)
		go s.attempt(*m, d)
	}
	return time.Hour
}

// attempt re-drives one entry and records what came of it.
//
// The entry stays in s.inflight until its outcome is in the index, heap
// item and all: dispatch drops the heap items of entries in flight.
func (s *fileSpool) attempt(m spoolMeta, d *driver) {
	defer s.workers.Done()
	defer s.signal() // a worker is free
	landed := false
	defer func() {
		if !landed {
			s.mu.Lock()
			delete(s.inflight, m.EventID)
			s.mu.Unlock()
		}
	}()
	s.mu.Lock()
	policy := s.policy
	s.mu.Unlock()

	status, failure := s.send(m, d, policy.attemptTimeout)
	if s.stopped.Err() != nil {
		return // Caddy is stopping: not an attempt; the entry stays as it is
	}
	spoolAttempts.Inc()
	now := time.Now()
	log := s.log().With(zap.String("event_id", m.EventID.String()), zap.String("event_name", m.EventName),
		zap.Int("attempts", m.Attempts+1))
	if failure == "" {
		s.forget(m.EventID)
		spoolRedelivered.Inc()
		log.Info("spool: redelivered", zap.Int("status", status), zap.Duration("spooled_for", now.Sub(m.SpooledAt)))
		return
	}

	m.Attempts++
	m.LastError = failure
	state := statePending
	var dead bool
	if retryable(status) {
		m.NextAttempt, dead = policy.retryAt(now, m.SpooledAt, m.Attempts)
	} else {
		dead = true
	}
	if dead {
		state, m.NextAttempt = stateDead, time.Time{}
	}
	m.State = state
	if err := s.save(m); err != nil {
		log.Error("spool: the outcome of an attempt could not be saved", zap.Error(err))
	}
	s.mu.Lock()
	delete(s.inflight, m.EventID)
	landed = true
	if cur, ok := s.entries[m.EventID]; ok {
		if cur.State != state {
			spoolEntries.WithLabelValues(cur.State).Dec()
			spoolEntries.WithLabelValues(state).Inc()
		}
		cur.State, cur.Attempts, cur.LastError, cur.NextAttempt = state, m.Attempts, m.LastError, m.NextAttempt
		cur.gen++
		if state == statePending {
			heap.Push(&s.due, dueItem{at: cur.NextAttempt, id: cur.EventID, gen: cur.gen})
		}
	}
	s.mu.Unlock()
	if dead {
		spoolDeadLettered.Inc()
		log.Error("spool: dead letter: kept, and not retried until an operator retries or deletes it",
			zap.String("last_error", failure), zap.Time("spooled_at", m.SpooledAt))
		return
	}
	log.Warn("spool: attempt failed, will retry", zap.String("last_error", failure), zap.Time("next_attempt", m.NextAttempt))
}

// send runs one entry through its server's routes and returns the status it
// was answered with, and what failed ("" when it was taken).
func (s *fileSpool) send(m spoolMeta, d *driver, timeout time.Duration) (int, string) {
	req, body, err := s.load(m.EventID)
	if err != nil {
		return http.StatusInternalServerError, err.Error()
	}
	rd := &redrive{account: m.Account, ev: m.event()}
	ctx, cancel := context.WithTimeout(context.WithValue(s.stopped, redriveKey{}, rd), timeout)
	defer cancel()
	r, err := req.build(ctx, body)
	if err != nil {
		return http.StatusBadRequest, err.Error()
	}
	w := &redriveWriter{header: make(http.Header)}
	d.server.ServeHTTP(w, r)
	status := w.status
	if status == 0 {
		status = http.StatusOK // what net/http answers when no handler writes
	}
	if status < 400 {
		return status, ""
	}
	return status, describeFailure(status, rd.err)
}

// describeFailure says what an attempt failed with: the error the next
// handler returned, if any, and the status.
func describeFailure(status int, err error) string {
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

// redriveWriter takes a re-drive's answer: its status counts, its body
// does not.
type redriveWriter struct {
	header http.Header
	status int
}

func (w *redriveWriter) Header() http.Header { return w.header }

func (w *redriveWriter) WriteHeader(status int) {
	if w.status == 0 && status >= 200 {
		w.status = status
	}
}

func (w *redriveWriter) Write(p []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	return len(p), nil
}

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

// Interface guard
var _ http.ResponseWriter = (*redriveWriter)(nil)
