package trivialsecwebhook

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/google/uuid"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// The sender posts each delivery once and never retries. The spool keeps a
// verified delivery the next handler could not take, on stable storage, and
// delivers it again through the same route until it is taken (docs/spool.md). This file is its configuration, what an entry holds,
// and the policy every store shares; spool_file.go is the embedded store,
// spool_redis.go the one shared by instances, spool_redrive.go the re-drive
// both use.

// Spool configures the durable spool. It is on by default.
type Spool struct {
	// Where spooled deliveries are kept: `file` (default), an embedded
	// database in Dir; `redis`, Redis Streams at URL, shared by every
	// instance that names it; or `off`: a delivery the next handler fails
	// is lost, as the sender never sends it again.
	Store string `json:"store,omitempty"`

	// The directory of the file store, created 0700 if it does not exist
	// when Caddy runs (never by `caddy validate`).
	// Default: trivialsec_webhook/spool in Caddy's data directory.
	Dir string `json:"dir,omitempty"`

	// The Redis store's URL, as for the replay store (a server, or its
	// Sentinels; wait_replicas, allow_eviction): a placeholder such as
	// {env.REDIS_URL} when it holds a password.
	URL string `json:"url,omitempty"`

	// What the Redis store's keys start with. Default:
	// "trivialsec_webhook:spool:".
	KeyPrefix string `json:"key_prefix,omitempty"`

	// How long this instance may go without reaching Redis before the
	// others take the entries it holds over (Redis store): its lease on its
	// consumer name lives this long plus AttemptTimeout, renewed every
	// quarter of this. Each instance's own claim_after governs its
	// entries. Default: 1m.
	ClaimAfter caddy.Duration `json:"claim_after,omitempty"`

	// `fallback` (default): the delivery goes to the next handler at once,
	// and is spooled, with a 202 to the sender, only if that fails (an
	// error, a 5xx, 408, 425 or 429, or no answer within AttemptTimeout).
	// `always`: every delivery is spooled first and answered 202 at once,
	// then delivered in the background.
	Mode string `json:"mode,omitempty"`

	// The wait before each retry, as two durations: the n-th retry waits a
	// random time between the first and the first times 2^n, and never
	// more than the second (exponential backoff with jitter).
	// Default: ["1s", "10m"].
	Backoff []caddy.Duration `json:"backoff,omitempty"`

	// How long a delivery is retried; past it, a failed attempt makes it a
	// dead letter, kept until an operator retries or deletes it through
	// the admin API. Default: 72h.
	MaxAge caddy.Duration `json:"max_age,omitempty"`

	// The most bytes the spool holds, bodies and headers. A delivery that
	// does not fit is not spooled: the sender gets the failure it would
	// have got without the spool. Default: 1 GiB.
	MaxSize int64 `json:"max_size,omitempty"`

	// How long one attempt at the next handler may take, the first one
	// and each re-drive, before it counts as failed. The sender waits 30 s
	// for an answer. Default: 20s.
	AttemptTimeout caddy.Duration `json:"attempt_timeout,omitempty"`

	// How many re-drives this instance makes at once, at most. Default:
	// 16.
	RedriveConcurrency int `json:"redrive_concurrency,omitempty"`

	// How many re-drives this instance starts a second, at most, so that
	// a service coming back after an outage is not flooded with its
	// backlog. Default: 0, no limit.
	RedriveRate float64 `json:"redrive_rate,omitempty"`
}

func init() {
	caddy.RegisterModule(spoolApp{})
}

// spoolMeta is what the store knows of an entry besides its request: the
// admin API's listing (the JSON names of the listed fields are the
// listing's), and what the placeholders of a re-drive say.
type spoolMeta struct {
	EventID     uuid.UUID `json:"event_id"`
	EventName   string    `json:"event_name"`
	State       string    `json:"state"` // "pending" or "dead"; "parked" in the index only
	Attempts    int       `json:"attempts"`
	SpooledAt   time.Time `json:"spooled_at"`
	NextAttempt time.Time `json:"next_attempt"`
	LastError   string    `json:"last_error"`
	Size        int64     `json:"size"`

	Account   string    `json:"account"`
	Timestamp time.Time `json:"timestamp"`
	IssuedAt  time.Time `json:"issued_at"`
	ExpiresAt time.Time `json:"expires_at"`
	Endpoint  *string   `json:"endpoint,omitempty"` // the cep claim; nil when absent
	Server    string    `json:"server,omitempty"`   // serverKey of the server it arrived on

	// Held while the Redis replay store did not answer: checked for replay,
	// with the token of the reservation tried then, before each attempt.
	Unchecked   bool   `json:"unchecked,omitempty"`
	ReplayToken string `json:"replay_token,omitempty"`

	gen  int    // bumped at each change of schedule: stale heap items are skipped
	turn string // Redis: the stream message by which this instance holds it
	rev  int64  // Redis: the entry's revision that message is for
}

// The states of an entry. A parked entry is a pending one that no handler
// of the running config can take (its account is served nowhere): it is
// stored as pending, and parked in the index only.
const (
	statePending = "pending"
	stateDead    = "dead"
	stateParked  = "parked"
)

// spoolRequest is the request a re-drive sends again: the original method
// and URI, the host, the headers as the next handler saw them (after
// strip_authorization), the client's address, and its TLS, if any.
type spoolRequest struct {
	Method     string      `json:"method"`
	RequestURI string      `json:"request_uri"`
	Proto      string      `json:"proto"`
	Host       string      `json:"host"`
	Header     http.Header `json:"header"`
	RemoteAddr string      `json:"remote_addr"`
	TLS        *spoolTLS   `json:"tls,omitempty"`
}

type spoolTLS struct {
	ServerName string `json:"server_name"`
	Version    uint16 `json:"version"`
}

// spoolEntry is one delivery to spool.
type spoolEntry struct {
	meta    spoolMeta
	request spoolRequest
	body    []byte
}

// size is what an entry counts against max_size.
func (e *spoolEntry) size() (int64, []byte, []byte, error) {
	req, err := json.Marshal(&e.request)
	if err != nil {
		return 0, nil, nil, err
	}
	e.meta.Size = int64(len(req) + len(e.body))
	meta, err := json.Marshal(&e.meta)
	if err != nil {
		return 0, nil, nil, err
	}
	return e.meta.Size, meta, req, nil
}

// spoolStore is a spool store: the file store (spool_file.go) or the Redis
// store (spool_redis.go). Each is kept across reloads in spools, and
// re-drives with its scheduler.
type spoolStore interface {
	caddy.Destructor
	// start opens the store and starts its loops, when a config using it
	// starts. A store that cannot open is not up, and tries again: only
	// what no retry can mend is an error.
	start() error
	// add spools an entry durably, or says why it could not.
	add(e *spoolEntry) error
	// up reports whether deliveries should go through the store: not a
	// file store that could not be opened (it tries again in the
	// background).
	up() bool
	// logFields name the store in log lines.
	logFields() []zap.Field
	// page, summary, retryNow and removeIf are the admin API's, on the
	// whole store (spool_query.go). removeIf deletes an entry if it is still
	// stored in state (pending or dead; "": any), and reports whether it
	// did. page returns the first limit entries f
	// selects after the cursor (nil: from the first), in spooled order,
	// and how many f selects in all.
	page(f spoolFilter, after *spoolCursor, limit int) ([]spoolMeta, int64, error)
	summary() (spoolSummary, error)
	// probeNow and answeredInline are the breakers' (spool_breaker.go).
	probeNow(id uuid.UUID)
	answeredInline(d *driver)
	retryNow(id uuid.UUID) (bool, error)
	removeIf(id uuid.UUID, state string) (bool, error)
	// stats is what the metrics report.
	stats() spoolStats
	setPolicy(p spoolPolicy)
	setGrace(d time.Duration)
	register(d *driver)
	unregister(d *driver)
}

// spoolStats is what a store holds, and whether it is down: a file store
// that cannot be opened, a Redis that did not answer the last call.
type spoolStats struct {
	pending, parked, dead, bytes int64
	down                         bool
	oldest                       time.Time // when the oldest pending entry, parked or not, was spooled; zero if none
	maxBytes                     int64     // max_size
}

// add counts n entries (n may be negative) of a state and size.
func (st *spoolStats) add(state string, size, n int64) {
	switch state {
	case stateDead:
		st.dead += n
	case stateParked:
		st.parked += n
	default:
		st.pending += n
	}
	st.bytes += n * size
}

// spools keeps each store across config reloads, as replayStores does.
var spools = caddy.NewUsagePool()

// eachSpool calls fn with each spool store of the process, until fn
// returns false. fn runs outside the pool's lock: a Redis store that does
// not answer must not hold up a reload, which loads and deletes stores.
func eachSpool(fn func(spoolStore) bool) {
	var stores []spoolStore
	spools.Range(func(_, v any) bool {
		stores = append(stores, v.(spoolStore))
		return true
	})
	for _, s := range stores {
		if !fn(s) {
			return
		}
	}
}

// spoolApp opens the spool stores of a config when the config starts. The
// handlers make their stores at provision, but do not open them there:
// `caddy validate` provisions a config without starting it, and must touch
// no file, nor wait for, and fail on, the lock of the store a running Caddy
// holds. A store that cannot open does not stop the config (that would
// take every site down for a full disk): it degrades the webhook routes
// that use it, says so, and opens when it can. Nothing in the app is
// configured: the handlers load it.
type spoolApp struct {
	stores []spoolStore
	ctx    caddy.Context
}

// Provision keeps the config's context: Start reads the HTTP app's
// settings through it.
func (a *spoolApp) Provision(ctx caddy.Context) error {
	a.ctx = ctx
	return nil
}

// CaddyModule returns the Caddy module information.
func (spoolApp) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "trivialsec_webhook",
		New: func() caddy.Module { return new(spoolApp) },
	}
}

func (a *spoolApp) use(s spoolStore) {
	if !slices.Contains(a.stores, s) {
		a.stores = append(a.stores, s)
	}
}

// Start opens the stores, and gives them the HTTP servers' grace period:
// re-drives in flight when a store stops have that long to finish.
func (a *spoolApp) Start() error {
	var grace time.Duration
	if app, err := a.ctx.AppIfConfigured("http"); err == nil {
		if h, ok := app.(*caddyhttp.App); ok {
			grace = time.Duration(h.GracePeriod)
		}
	}
	for _, s := range a.stores {
		s.setGrace(grace)
		if err := s.start(); err != nil {
			return err
		}
	}
	return nil
}

// Stop does nothing: a store closes with the last config that uses it.
func (a *spoolApp) Stop() error { return nil }

// Defaults of the spool.
const (
	defaultSpoolMode      = "fallback"
	defaultBackoffMin     = time.Second
	defaultBackoffMax     = 10 * time.Minute
	defaultSpoolMaxAge    = 72 * time.Hour
	defaultSpoolMaxSize   = 1 << 30
	defaultAttemptTimeout = 20 * time.Second
	defaultClaimAfter     = time.Minute

	defaultRedriveConcurrency = 16
	maxRedriveConcurrency     = 1024
	minRedriveRate            = 0.01
	defaultSpoolKeyPrefix     = "trivialsec_webhook:spool:"
)

// defaultSpoolDir is the file store's directory, unless the config names
// one: in Caddy's data directory.
func defaultSpoolDir() string {
	return filepath.Join(caddy.AppDataDir(), "trivialsec_webhook", "spool")
}

// setDefaults fills in what the configuration leaves out.
func (s *Spool) setDefaults() {
	if s.Store == "" {
		s.Store = "file"
	}
	if s.Store == "file" && s.Dir == "" {
		s.Dir = defaultSpoolDir()
	}
	if s.Mode == "" {
		s.Mode = defaultSpoolMode
	}
	if len(s.Backoff) == 0 {
		s.Backoff = []caddy.Duration{caddy.Duration(defaultBackoffMin), caddy.Duration(defaultBackoffMax)}
	}
	if s.MaxAge == 0 {
		s.MaxAge = caddy.Duration(defaultSpoolMaxAge)
	}
	if s.MaxSize == 0 {
		s.MaxSize = defaultSpoolMaxSize
	}
	if s.AttemptTimeout == 0 {
		s.AttemptTimeout = caddy.Duration(defaultAttemptTimeout)
	}
	if s.RedriveConcurrency == 0 {
		s.RedriveConcurrency = defaultRedriveConcurrency
	}
	if s.Store == "redis" {
		if s.KeyPrefix == "" {
			s.KeyPrefix = defaultSpoolKeyPrefix
		}
		if s.ClaimAfter == 0 {
			s.ClaimAfter = caddy.Duration(defaultClaimAfter)
		}
	}
}

// validate checks the spool settings, before any default is set.
func (s *Spool) validate() error {
	switch {
	case s.Store == "redis" && s.URL == "":
		return errors.New("spool store redis needs a url: store redis redis://host:port, as {env.NAME} when it holds a password")
	case s.Store == "redis" && s.Dir != "":
		return errors.New("spool dir is for store file, not redis")
	case s.Store != "redis" && (s.URL != "" || s.KeyPrefix != "" || s.ClaimAfter != 0):
		return errors.New("spool url, key_prefix and claim_after are for store redis: store redis <url> [<key_prefix>]")
	}
	return s.validateFields()
}

// validateFields checks each setting on its own: the Caddyfile calls it
// after each line.
func (s *Spool) validateFields() error {
	switch s.Store {
	case "", "file", "off", "redis":
	default:
		return fmt.Errorf("unknown spool store %q: use file, redis or off", s.Store)
	}
	if s.ClaimAfter < 0 || (s.ClaimAfter > 0 && time.Duration(s.ClaimAfter) < time.Second) {
		return errors.New("spool claim_after must be at least 1s: write it like 1m")
	}
	switch s.Mode {
	case "", "fallback", "always":
	default:
		return fmt.Errorf("unknown spool mode %q: use fallback or always", s.Mode)
	}
	if len(s.Backoff) != 0 && (len(s.Backoff) != 2 || s.Backoff[0] <= 0 || s.Backoff[1] < s.Backoff[0]) {
		return errors.New("spool backoff takes two positive durations, the first no larger than the second: backoff 1s 10m")
	}
	switch {
	case s.MaxAge < 0:
		return errors.New("spool max_age must be positive: write it like 72h")
	case s.MaxSize < 0:
		return errors.New("spool max_size must be positive: write it like 1GiB")
	case s.AttemptTimeout < 0:
		return errors.New("spool attempt_timeout must be positive: write it like 20s")
	case s.RedriveConcurrency < 0 || s.RedriveConcurrency > maxRedriveConcurrency:
		return fmt.Errorf("spool redrive_concurrency must be 1 to %d: write it like 4", maxRedriveConcurrency)
	case s.RedriveRate != 0 && !(s.RedriveRate >= minRedriveRate) || math.IsInf(s.RedriveRate, 0):
		return fmt.Errorf("spool redrive_rate must be at least %g deliveries a second: write it like 50, or 0.5", minRedriveRate)
	}
	return nil
}

// spoolPolicy is what the spool does with deliveries, from the Spool
// settings of the config that uses the store last.
type spoolPolicy struct {
	backoffMin, backoffMax time.Duration
	maxAge                 time.Duration
	maxSize                int64
	attemptTimeout         time.Duration
	claimAfter             time.Duration // the Redis store's
	concurrency            int           // re-drives at once
	rate                   float64       // re-drives started a second; 0: no limit
}

// workers is how many re-drives a store makes at once (redrive_concurrency).
func (p spoolPolicy) workers() int { return cmp.Or(p.concurrency, defaultRedriveConcurrency) }

func (s *Spool) policy() spoolPolicy {
	return spoolPolicy{
		backoffMin:     time.Duration(s.Backoff[0]),
		backoffMax:     time.Duration(s.Backoff[1]),
		maxAge:         time.Duration(s.MaxAge),
		maxSize:        s.MaxSize,
		attemptTimeout: time.Duration(s.AttemptTimeout),
		claimAfter:     time.Duration(s.ClaimAfter),
		concurrency:    s.RedriveConcurrency,
		rate:           s.RedriveRate,
	}
}

// retryAt says when a delivery that failed its attempts-th attempt goes
// again: after backoff, never past its max_age, when the last attempt is
// made. dead is true when max_age has passed already.
func (p spoolPolicy) retryAt(now, spooledAt time.Time, attempts int, asked time.Duration) (at time.Time, dead bool) {
	deadline := spooledAt.Add(p.maxAge)
	if !now.Before(deadline) {
		return time.Time{}, true
	}
	if at = now.Add(p.backoff(attempts, asked)); at.After(deadline) {
		at = deadline
	}
	return at, false
}

// backoff is the wait after the attempts-th failure in a row: the wait the
// service asked for (Retry-After), at least backoffMin, or else a random
// wait between backoffMin and backoffMin·2^(attempts-1); at most
// backoffMax. An entry's attempts and a route's breaker (spool_breaker.go)
// back off by it.
func (p spoolPolicy) backoff(attempts int, asked time.Duration) time.Duration {
	if asked > 0 {
		return min(max(asked, p.backoffMin), p.backoffMax)
	}
	ceiling := p.backoffMax
	if shift := attempts - 1; shift < 32 && p.backoffMin<<shift < p.backoffMax && p.backoffMin<<shift > 0 {
		ceiling = p.backoffMin << shift
	}
	wait := p.backoffMin
	if ceiling > p.backoffMin {
		wait += rand.N(ceiling - p.backoffMin + 1)
	}
	return wait
}

// askedRetry reports whether a status asks for a Retry-After: a 503 or a
// 429.
func askedRetry(status int) bool {
	return status == http.StatusServiceUnavailable || status == http.StatusTooManyRequests
}

// retryAfter is the wait a 503 or a 429 that the handlers after the module
// wrote asks for, with the Retry-After value they set as they wrote it
// (RFC 9110, 10.2.3: seconds, or an HTTP date): 0 for another status, a
// status from an error (handle_errors may answer it, with headers of its
// own), none, one that does not parse, or a date past.
func retryAfter(status int, err error, value string, now time.Time) time.Duration {
	if err != nil || !askedRetry(status) {
		return 0
	}
	v := strings.TrimSpace(value)
	if v == "" || len(v) > 64 {
		return 0
	}
	n, perr := strconv.ParseUint(v, 10, 32)
	switch {
	case perr == nil:
		return time.Duration(n) * time.Second
	case errors.Is(perr, strconv.ErrRange):
		return math.MaxInt64 // longer than any backoff max
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// retryable reports whether an attempt that ended with this status should
// be tried again: a server error, or a client error that says "later"
// (408 Request Timeout, 425 Too Early, 429 Too Many Requests). Any other
// 4xx is the service refusing the delivery: a dead letter.
func retryable(status int) bool {
	return status >= 500 || status == http.StatusRequestTimeout ||
		status == http.StatusTooEarly || status == http.StatusTooManyRequests
}

// errSpoolFull is what a delivery that does not fit in max_size gets.
var errSpoolFull = errors.New("the spool is full (max_size)")

// spoolDir makes the store's directory, 0700, and warns when an existing
// one lets others in.
func spoolDir(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("spool directory %s: %v", dir, err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return "", fmt.Errorf("spool directory %s cannot be created: %v: give the Caddy user a directory it can write, with spool { store file <dir> }", abs, err)
	}
	if info, err := os.Stat(abs); err == nil && info.Mode().Perm()&0o077 != 0 {
		caddy.Log().Named("http.handlers.trivialsec_webhook").Warn("the spool directory lets other users in: it holds deliveries' bodies (and tokens, without strip_authorization); chmod 700 it",
			zap.String("spool", abs), zap.Stringer("mode", info.Mode().Perm()))
	}
	return abs, nil
}

// serveRedriven passes a re-driven delivery on to next, with its event's
// placeholders set, and records on the mark that it reached this handler,
// and what next wrote and returned: the re-drive is judged by that.
func (h *Handler) serveRedriven(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, rd *redrive) error {
	r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer).Map(rd.ev.placeholder)
	if c := h.logger.Check(zapcore.DebugLevel, "re-driving a spooled delivery"); c != nil {
		c.Write(zap.String("event_id", rd.ev.ID.String()), zap.String("event_name", rd.ev.Name))
	}
	if rd.check {
		// What the check came to is on the mark; the spool logs a failed
		// attempt, so Caddy's error log need not.
		if h.checkHeld(r.Context(), rd); rd.replayed || rd.expired || rd.err != nil {
			return nil
		}
	}
	rd.reached = true
	if h.spool != nil && any(h.spool) != any(rd.from) && h.moveHeld(r, rd) {
		return nil
	}
	sw := &statusWriter{ResponseWriter: w, before: w.Header().Get("Retry-After")}
	defer func() { rd.status, rd.asked = sw.status, sw.asked }() // a panic too: send judges it
	rd.err = next.ServeHTTP(sw, r)
	return rd.err
}

// checkHeld checks a held delivery for replay before its attempt, with the
// token of the reservation tried when it arrived: a reservation that the
// write of then made after all is ours. A copy is marked replayed; a
// replay store that still does not answer fails the attempt (rd.err).
func (h *Handler) checkHeld(ctx context.Context, rd *redrive) {
	if h.store == nil {
		return // replay protection is off now
	}
	id, expires, now := rd.ev.ID, rd.ev.token.ExpiresAt.Add(time.Duration(*h.Leeway)), h.now()
	if !now.Before(expires) {
		// The replay store forgets an event at its token's exp + leeway:
		// no check can say any more whether this is a copy. Not a guess:
		// a dead letter, for an operator to retry (and vouch for) or
		// delete.
		rd.reached, rd.expired = true, true
		return
	}
	var result replayResult
	var err error
	if rs, ok := h.store.(*redisStore); ok {
		result, err = rs.reserveAs(ctx, id, rd.token, expires, now)
	} else {
		_, result, err = h.store.reserve(ctx, id, expires, now)
	}
	switch {
	case err != nil:
		rd.reached, rd.unanswered = true, true
		rd.err = fmt.Errorf("held until the replay store answers, to check it: %w", err)
	case result == replayDuplicate:
		rd.replayed = true
	case result == replayFull:
		rd.reached, rd.unanswered = true, true
		rd.err = errors.New("held until the replay store has room, to check it")
	default:
		rd.checked = true
		if h.journal != nil {
			h.keep(id, expires)
		}
	}
}

// moveHeld moves a delivery held on this instance's disk beside a Redis
// spool into that spool, once checked: the spool delivers it, on whichever
// instance. The spool's add is idempotent, and refuses an entry delivered
// already, so a move whose outcome was unknown, or a write held because its
// outcome was, is tried again safely. It reports whether the attempt ends
// here: moved, or waiting for Redis (rd.unanswered). A spool with no room
// for it leaves it to be delivered from here, at once.
func (h *Handler) moveHeld(r *http.Request, rd *redrive) bool {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		rd.err = err
		return true
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	e := &spoolEntry{meta: *rd.meta, request: spoolRequestOf(r), body: body}
	e.meta.Unchecked, e.meta.ReplayToken = false, ""
	e.meta.State, e.meta.NextAttempt = statePending, time.Now()
	switch err := h.spool.add(e); {
	case errors.Is(err, errSpoolFull):
		return false
	case spooledAlready(err):
	case err != nil:
		// Redis did not answer: again soon. It refused (a permission, an
		// unfit server): a failed attempt, with backoff, to max_age.
		rd.unanswered = h.spoolWriteUnknown(err)
		rd.err = fmt.Errorf("held until the spool store takes it: %w", err)
		return true
	}
	rd.moved = true
	if c := h.logger.Check(zapcore.InfoLevel, "moved a delivery held on this instance's disk into the spool"); c != nil {
		c.Write(append(h.spool.logFields(), zap.String("event_id", rd.ev.ID.String()), zap.String("event_name", rd.ev.Name))...)
	}
	return true
}

// errSpoolDelivered is the add of an entry the spool delivered (or an
// operator deleted) already.
var errSpoolDelivered = errors.New("the spool delivered this event already")

// errDeadLetter is the add of an entry that is a dead letter in the spool.
var errDeadLetter = errors.New("a dead letter in the spool already")

// settleSpoolWrite settles a Redis spool write whose outcome was unknown,
// and which nothing holds: if Redis says it ran, the spool delivers it and
// the event ID stays reserved; if it did not, the event ID is released, so
// that a resend is accepted.
func (h *Handler) settleSpoolWrite(ev *event, reserved reservation) {
	expires := ev.token.ExpiresAt.Add(time.Duration(*h.Leeway))
	h.spool.(*redisSpool).settleWrite(ev.ID, expires, func() {
		h.release(context.Background(), ev.ID, reserved, 0)
	})
}

// spooledAlready reports whether an add failed because the spool has the
// event already: delivered, or a dead letter kept for an operator. The
// delivery is in the spool's hands, as one pending already is.
func spooledAlready(err error) bool {
	return errors.Is(err, errSpoolDelivered) || errors.Is(err, errDeadLetter)
}

// spoolWriteUnknown reports whether a Redis spool's write failed without
// an answer (a timeout, a connection broken, a write not confirmed by the
// replicas): it may have run, or run yet.
func (h *Handler) spoolWriteUnknown(err error) bool {
	if _, ok := h.spool.(*redisSpool); !ok {
		return false
	}
	return !errors.Is(err, errSpoolFull) && !spooledAlready(err) && outcomeUnknown(err)
}

// holdsUnchecked reports whether the store holds a delivery of id that
// waits to be checked for replay.
func (s *fileSpool) holdsUnchecked(id uuid.UUID) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.entries[id]
	return ok && m.Unchecked
}

// holdInstead holds a delivery on this instance's disk when a Redis spool
// did not take it (Redis did not answer, or its write's outcome is
// unknown), so that the sender gets 202 and the delivery moves into the
// spool once Redis answers; false if there is nowhere to hold it, or the
// spool refused it for good (full, a dead letter, delivered).
func (h *Handler) holdInstead(e *spoolEntry, err error) bool {
	if h.hold == nil || any(h.hold) == any(h.spool) || errors.Is(err, errSpoolFull) || spooledAlready(err) {
		return false
	}
	if herr := h.hold.add(e); herr != nil {
		return false
	}
	spoolHeld.Inc()
	if c := h.logger.Check(zapcore.WarnLevel, "the spool store did not take the delivery: held it on this instance's disk, answered 202; it moves into the spool once the store answers"); c != nil {
		c.Write(append(h.hold.logFields(), zap.String("event_id", e.meta.EventID.String()), zap.String("event_name", e.meta.EventName), zap.Error(err))...)
	}
	return true
}

// serveHeld holds a verified delivery that the Redis replay store could not
// check (cause) on this instance's disk, unchecked, and answers 202: once
// Redis answers, the spool checks it, drops it if it is a copy, and
// delivers it otherwise. It never reaches the next handler unchecked. If it
// cannot be held, the sender gets 503, as with the spool off.
func (h *Handler) serveHeld(w http.ResponseWriter, r *http.Request, repl *caddy.Replacer, tok *verifiedToken, a *accepted, body []byte,
	reserved reservation, cause error) error {
	e := &spoolEntry{meta: spoolMetaOf(h.Account, &a.ev, time.Now()), request: spoolRequestOf(r), body: body}
	e.meta.Server = h.driver.key
	e.meta.Unchecked, e.meta.ReplayToken = true, reserved.token
	if err := h.hold.add(e); err != nil {
		if c := h.logger.Check(zapcore.WarnLevel, "replay store unavailable, and the delivery could not be held: refusing it"); c != nil {
			c.Write(append(h.hold.logFields(), zap.String("event_id", a.ev.ID.String()), zap.NamedError("cause", cause), zap.Error(err))...)
		}
		if rs, ok := h.store.(*redisStore); ok && outcomeUnknown(cause) {
			rs.settleLater(a.ev.ID, reserved)
		}
		return h.refuse(w, r, repl, reasonReplayStoreDown, tok, a.ev.Name)
	}
	spoolHeld.Inc()
	if c := h.logger.Check(zapcore.WarnLevel, "replay store unavailable: held the delivery on this instance's disk, unchecked, and answered 202; it is checked for replay, and delivered, once the store answers"); c != nil {
		c.Write(append(h.hold.logFields(), zap.String("event_id", a.ev.ID.String()), zap.String("event_name", a.ev.Name), zap.Error(cause))...)
	}
	w.WriteHeader(http.StatusAccepted)
	return nil
}

// outcome is what an attempt at the handlers after this one came to.
type outcome uint8

const (
	taken    outcome = iota // a final status below 400
	failed                  // an error, a retryable status, no answer: again later
	refused                 // another 4xx: the service refuses the delivery
	replayed                // a held delivery the replay store knew: dropped
	moved                   // a held delivery moved into the handler's spool
	waiting                 // a held delivery the replay store could not check yet
)

// errNoAnswer is the failure of an attempt that the handlers after this
// one neither answered nor failed: the delivery reached no service (a
// matcher after the module that no longer matches, say), whatever the
// server then answers.
var errNoAnswer = errors.New("no handler after the trivialsec_webhook handler answered: the delivery reached no service")

// judge says what an attempt came to from what the handlers after this one
// wrote (the first final status, 0 for none) and returned: the status it
// counts as, and the error it failed with. The first attempt and every
// re-drive are judged by it; a final status written decides before an
// error returned after it.
func judge(status int, err error) (outcome, int, error) {
	switch {
	case status == 0 && err == nil:
		return failed, 0, errNoAnswer
	case status == 0:
		status = http.StatusInternalServerError
		if he, ok := errors.AsType[caddyhttp.HandlerError](err); ok && he.StatusCode >= 400 {
			status = he.StatusCode
		}
	}
	switch {
	case status < 400:
		return taken, status, err
	case retryable(status):
		return failed, status, err
	}
	return refused, status, err
}

// serveFallback hands the delivery to next, as serveReleasing does, but a
// failure (an error, a retryable status, a panic before any answer, or no
// answer within the attempt timeout) is held back from the sender: the
// delivery is spooled, and the sender gets 202. The sender hanging up does
// not end the attempt. An informational answer (1xx) goes to the sender and
// decides nothing: the final status does.
func (h *Handler) serveFallback(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, a *accepted, body []byte, reserved reservation) (err error) {
	mark := markHeader(w.Header()) // what a 202 goes out with
	at := &a.attempt
	at.ctx.Context, at.ctx.deadline = context.WithoutCancel(r.Context()), time.Now().Add(h.policy.attemptTimeout)
	at.rec.ResponseWriter = w
	rec := &at.rec
	defer at.end()
	done := false
	defer func() {
		if done {
			return
		}
		p := recover()
		if p == nil { // runtime.Goexit: no answer to give
			h.release(r.Context(), a.ev.ID, reserved, http.StatusInternalServerError)
			return
		}
		if rec.status != 0 && !rec.held {
			// An answer had begun (reverse_proxy panics when the upstream
			// breaks off a 2xx it began): the delivery reached the service,
			// and keeps its reservation; the connection is aborted.
			panic(p)
		}
		logPanic(h.logger, p)
		err = h.spoolFailure(w, r, a, body, reserved, rec, &mark, http.StatusInternalServerError,
			fmt.Errorf("the next handler panicked: %v", p))
	}()
	err = next.ServeHTTP(rec, r.WithContext(&at.ctx))
	done = true

	status := rec.status
	if status != 0 && !rec.held {
		h.spool.answeredInline(h.driver)
		return err // an answer that is no failure went out, or began to
	}
	// No final status went out unbuffered: judge says failed or refused,
	// never taken.
	o, status, failure := judge(status, err)
	if o == refused {
		h.spool.answeredInline(h.driver)
		h.release(r.Context(), a.ev.ID, reserved, status)
		return err // the next handler refused it: as without the spool
	}
	return h.spoolFailure(w, r, a, body, reserved, rec, &mark, status, failure)
}

// logPanic logs a panic of the handlers after this one, with its stack, at
// ERROR: but for http.ErrAbortHandler, reverse_proxy's way to break off an
// answer, which is no bug.
func logPanic(log *zap.Logger, p any) {
	if p == http.ErrAbortHandler {
		return
	}
	log.Error("a handler after trivialsec_webhook panicked: the delivery is spooled, or its re-drive failed", zap.Any("panic", p), zap.ByteString("stack", debug.Stack()))
}

// attempt is what serveFallback's attempt needs: the writer that holds a
// failed answer back, and the attempt's context.
type attempt struct {
	rec fallbackWriter
	ctx attemptContext
}

// end stops the attempt's timer, and keeps the held answer's buffer for the
// next failure.
func (a *attempt) end() {
	a.ctx.stop()
	if buf := a.rec.buf; buf != nil && buf.Cap() <= 64<<10 { // a large failed answer is not kept
		buf.Reset()
		failureBuffers.Put(buf)
	}
}

// fallbackWriter passes the next handler's answer on to the sender, but
// holds one back whose final status is a retryable failure: the delivery
// is spooled instead, and the sender gets 202; or, if it cannot be, the
// failure after all (writeHeld). Informational answers (1xx) go on and
// decide nothing. The header map is the sender's: serveFallback puts it
// back as it was before a held failure (headerMark).
type fallbackWriter struct {
	http.ResponseWriter
	status int           // the first final status written; 0: none yet
	held   bool          // status is a retryable failure, held back
	buf    *bytes.Buffer // the held answer's body, from failureBuffers
	asked  string        // Retry-After as a 503 or 429 was written
}

func (w *fallbackWriter) WriteHeader(status int) {
	switch {
	case w.status != 0:
		return // a second final status: net/http ignores it too
	case status < 200:
		w.ResponseWriter.WriteHeader(status)
		return
	}
	w.status, w.held = status, retryable(status)
	if askedRetry(status) {
		w.asked = w.Header().Get("Retry-After")
	}
	if !w.held {
		w.ResponseWriter.WriteHeader(status)
	}
}

func (w *fallbackWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if !w.held {
		return w.ResponseWriter.Write(p)
	}
	if w.buf == nil {
		w.buf = failureBuffers.Get().(*bytes.Buffer)
	}
	return w.buf.Write(p)
}

// FlushError flushes an answer that goes on. One held, or one whose status
// is not written yet, is not flushed: net/http would send the sender 200.
func (w *fallbackWriter) FlushError() error {
	if w.held || w.status == 0 {
		return nil
	}
	return http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *fallbackWriter) Flush() { _ = w.FlushError() }

// Unwrap lets http.ResponseController reach the writer underneath.
func (w *fallbackWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// writeHeld gives the sender the failure held back.
func (w *fallbackWriter) writeHeld() error {
	w.ResponseWriter.WriteHeader(w.status)
	if w.buf == nil {
		return nil
	}
	_, err := w.buf.WriteTo(w.ResponseWriter)
	return err
}

// attemptContext is the context of a delivery's first attempt in fallback
// mode: the request's values, without its cancellation (the sender hanging
// up does not end the attempt), and a deadline, attempt_timeout after the
// attempt began. Its timer starts only when something watches it (Done):
// a handler that answers at once never pays for one.
type attemptContext struct {
	context.Context // context.WithoutCancel of the request's
	deadline        time.Time

	mu    sync.Mutex
	done  chan struct{} // made by the first Done
	err   error
	timer *time.Timer
}

func (c *attemptContext) Deadline() (time.Time, bool) { return c.deadline, true }

func (c *attemptContext) Done() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done == nil {
		c.done = make(chan struct{})
		switch d := time.Until(c.deadline); {
		case c.err != nil:
			close(c.done)
		case d <= 0:
			c.expire()
		default:
			c.timer = time.AfterFunc(d, func() {
				c.mu.Lock()
				defer c.mu.Unlock()
				c.expire()
			})
		}
	}
	return c.done
}

func (c *attemptContext) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil && !time.Now().Before(c.deadline) {
		c.expire()
	}
	return c.err
}

// expire ends the context at its deadline. Call with c.mu held.
func (c *attemptContext) expire() {
	if c.err != nil {
		return
	}
	c.err = context.DeadlineExceeded
	if c.done != nil {
		close(c.done)
	}
}

// stop ends the context as the attempt ends, as cancel does for
// context.WithTimeout: what still watches it (a child's goroutine, an
// AfterFunc) is told, and the timer stops.
func (c *attemptContext) stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.timer != nil {
		c.timer.Stop()
	}
	if c.err == nil {
		c.err = context.Canceled
		if c.done != nil {
			close(c.done)
		}
	}
}

// spoolFailure spools a delivery the next handler failed (status, err) and
// answers 202 with the headers of before the attempt; or, if it cannot be
// spooled, gives the sender the failure, and releases the event ID.
func (h *Handler) spoolFailure(w http.ResponseWriter, r *http.Request, a *accepted, body []byte, reserved reservation,
	rec *fallbackWriter, mark *headerMark, status int, err error) error {
	failure := describeFailure(status, err)
	now := time.Now()
	e := &spoolEntry{meta: spoolMetaOf(h.Account, &a.ev, now), request: spoolRequestOf(r), body: body}
	e.meta.Server = h.driver.key
	e.meta.Attempts, e.meta.LastError = 1, failure
	e.meta.NextAttempt, _ = h.policy.retryAt(now, now, 1, retryAfter(status, err, mark.changed("Retry-After", rec.asked), now))
	switch serr := h.spool.add(e); {
	case serr == nil, spooledAlready(serr):
		if c := h.logger.Check(zapcore.WarnLevel, "the next handler failed: spooled the delivery, answered 202; the spool delivers it again"); c != nil {
			c.Write(append(h.spool.logFields(), zap.String("event_id", a.ev.ID.String()), zap.String("event_name", a.ev.Name),
				zap.String("failure", failure), zap.Time("next_attempt", e.meta.NextAttempt))...)
		}
	case !h.holdInstead(e, serr):
		if h.spoolWriteUnknown(serr) {
			// The write may run yet, and deliver it: the event ID stays
			// reserved, so that no copy is delivered beside it, until
			// Redis says whether it ran.
			if c := h.logger.Check(zapcore.WarnLevel, "the next handler failed, and the spool's write has an unknown outcome and could not be held either: the sender gets the failure, and the event ID stays reserved until Redis says whether the write ran"); c != nil {
				c.Write(append(h.spool.logFields(), zap.String("event_id", a.ev.ID.String()), zap.String("event_name", a.ev.Name),
					zap.String("failure", failure), zap.Error(serr))...)
			}
			h.settleSpoolWrite(&a.ev, reserved)
		} else {
			if c := h.logger.Check(zapcore.WarnLevel, "the next handler failed, and the delivery could not be spooled: the sender gets the failure"); c != nil {
				c.Write(append(h.spool.logFields(), zap.String("event_id", a.ev.ID.String()), zap.String("event_name", a.ev.Name),
					zap.String("failure", failure), zap.Error(serr))...)
			}
			h.release(r.Context(), a.ev.ID, reserved, status)
		}
		if rec.status != 0 {
			return rec.writeHeld()
		}
		if status == 0 { // no answer at all: the sender gets 502
			return caddyhttp.Error(http.StatusBadGateway, err)
		}
		return err
	}
	// The 202 goes out with the headers from before the attempt, none of
	// the failed answer's.
	mark.restore(w.Header())
	w.WriteHeader(http.StatusAccepted)
	return nil
}

// headerMark is what a response's headers were, so that they can be put
// back after a failed answer changed them: the names, and the values each
// had. It allocates nothing for up to 8 names.
type headerMark struct {
	names  [8]string
	values [8][]string // each as it was, cut to its length then
	n      int
	more   http.Header // a copy, past 8 names
}

func markHeader(h http.Header) (m headerMark) {
	if len(h) > len(m.names) {
		m.more = h.Clone()
		return m
	}
	for name, values := range h {
		m.names[m.n], m.values[m.n] = name, values[:len(values):len(values)]
		m.n++
	}
	return m
}

// changed is value, a header's value now, unless the header had that value
// when the mark was made (a handler before the module set it): "" then.
func (m *headerMark) changed(name, value string) string {
	before := m.more.Get(name)
	for i := range m.n {
		if m.names[i] == name && len(m.values[i]) > 0 {
			before = m.values[i][0]
		}
	}
	if value == before {
		return ""
	}
	return value
}

// restore puts h back as it was: the names it did not have are taken off,
// and the ones it had get their values back (reverse_proxy clears every
// header after an informational answer).
func (m *headerMark) restore(h http.Header) {
	clear(h)
	if m.more != nil {
		maps.Copy(h, m.more)
		return
	}
	for i := range m.n {
		h[m.names[i]] = m.values[i]
	}
}

// failureBuffers hold the failed answers serveFallback keeps from the
// sender.
var failureBuffers = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// serveSpoolFirst spools the delivery and answers 202 at once; the spool
// delivers it in the background. If it cannot be spooled, it goes to next
// as it would without the spool.
func (h *Handler) serveSpoolFirst(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, a *accepted, body []byte, reserved reservation) error {
	e := &spoolEntry{meta: spoolMetaOf(h.Account, &a.ev, time.Now()), request: spoolRequestOf(r), body: body}
	e.meta.Server = h.driver.key
	if err := h.spool.add(e); err != nil && !spooledAlready(err) {
		if h.holdInstead(e, err) {
			w.WriteHeader(http.StatusAccepted)
			return nil
		}
		if h.spoolWriteUnknown(err) {
			// The write may run yet, and deliver it: not at once as well.
			// The event ID stays reserved, so that no copy is either.
			if c := h.logger.Check(zapcore.WarnLevel, "the spool's write has an unknown outcome, and the delivery could not be held either: the sender gets 503, and the event ID stays reserved until Redis says whether the write ran"); c != nil {
				c.Write(append(h.spool.logFields(), zap.String("event_id", a.ev.ID.String()), zap.String("event_name", a.ev.Name), zap.Error(err))...)
			}
			h.settleSpoolWrite(&a.ev, reserved)
			return caddyhttp.Error(http.StatusServiceUnavailable, err)
		}
		if c := h.logger.Check(zapcore.WarnLevel, "the delivery could not be spooled: it goes to the next handler at once"); c != nil {
			c.Write(append(h.spool.logFields(), zap.String("event_id", a.ev.ID.String()), zap.String("event_name", a.ev.Name), zap.Error(err))...)
		}
		return h.serveReleasing(w, r, next, a, reserved)
	}
	if c := h.logger.Check(zapcore.DebugLevel, "spooled the delivery, answered 202"); c != nil {
		c.Write(append(h.spool.logFields(), zap.String("event_id", a.ev.ID.String()), zap.String("event_name", a.ev.Name))...)
	}
	w.WriteHeader(http.StatusAccepted)
	return nil
}

// Interface guard
var (
	_ caddy.App         = (*spoolApp)(nil)
	_ caddy.Provisioner = (*spoolApp)(nil)
)
