// Package trivialsecwebhook is a Caddy HTTP handler that verifies webhook
// deliveries from Trivial Security before Caddy proxies or answers them.
package trivialsecwebhook

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/google/uuid"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Defaults of the configuration.
const (
	defaultSubject = "bc6e2cd5-1f59-487f-b05b-49946bd078b2"
	defaultIssuer  = "https://www.trivialsec.com"
	defaultLeeway  = 3 * time.Second
	defaultMaxBody = 10 << 20
)

// Handler verifies each webhook delivery from Trivial Security: its signed
// token, then its body, then that it is not a replay. A delivery that passes
// goes to the next handler with its body restored byte for byte; any other
// request is refused with an HTTP error (403, 405, 409, 413, 415, 400, 422 or
// 503) that `handle_errors` can shape, and never reaches the next handler.
//
// On success it sets the placeholders {http.trivialsec_webhook.event_id},
// {http.trivialsec_webhook.event_name}, {http.trivialsec_webhook.timestamp},
// {http.trivialsec_webhook.issued_at}, {http.trivialsec_webhook.expires_at}
// and {http.trivialsec_webhook.endpoint}; on refusal,
// {http.trivialsec_webhook.reason}, a stable code such as `bad_signature`.
type Handler struct {
	// The Trivial Security account name. Required: the token's aud claim
	// must hold `urn:trivialsec:webhook:client_endpoint:<account>`.
	Account string `json:"account,omitempty"`

	// The signing secrets, tried in turn (more than one during a key
	// rotation). Required. Write each as a placeholder, `{env.NAME}` or
	// `{file.PATH}`, resolved once at provision; a literal secret is shown
	// by the admin API and draws a warning at startup.
	Secret []string `json:"secret,omitempty"`

	// The UUID the token's sub claim must name, in any of its textual forms.
	// Default: bc6e2cd5-1f59-487f-b05b-49946bd078b2.
	Subject string `json:"subject,omitempty"`

	// The exact value of the token's iss claim.
	// Default: https://www.trivialsec.com.
	Issuer string `json:"issuer,omitempty"`

	// When set, a token's cep claim, if it has one, must equal it: the
	// endpoint URL configured for the account at Trivial Security.
	Endpoint string `json:"endpoint,omitempty"`

	// How far exp and nbf may be off, for clock skew. Default: 3s.
	Leeway *caddy.Duration `json:"leeway,omitempty"`

	// The largest body accepted, in bytes. Default: 10 MiB.
	MaxBody int64 `json:"max_body,omitempty"`

	// How deep the body's arrays and objects may nest, the outermost
	// object counted, from 1 to 10000. Default: 64, which the strictest
	// mainstream parsers behind Caddy take (.NET's System.Text.Json stops
	// past 64, Ruby's JSON past 100, Python's json near 1,000).
	MaxDepth int `json:"max_depth,omitempty"`

	// When set, only these event names are accepted; others get 403.
	// Default: all 15.
	Events []string `json:"events,omitempty"`

	// Replay protection. Default: the memory store.
	Replay *Replay `json:"replay,omitempty"`

	// Remove the Authorization header before the next handler, so that
	// the token does not travel further (nor into the spool).
	StripAuthorization bool `json:"strip_authorization,omitempty"`

	// The durable spool of deliveries the next handler could not take.
	// Default: on, in a file store in Caddy's data directory.
	Spool *Spool `json:"spool,omitempty"`

	verifier *verifier
	store    replayStore
	storeKey string // its key in replayStores
	spool    spoolStore
	spoolKey string // its key in spools
	policy   spoolPolicy
	driver   *driver // re-drives this handler's spooled deliveries
	// hold keeps deliveries while Redis does not answer, on this
	// instance's disk: the spool's file store, or, beside a Redis spool,
	// the file store in Caddy's data directory. nil: they are refused with
	// 503. held is that store when this handler loaded it (beside a Redis
	// spool, or to deliver what an earlier config held there).
	hold       *fileSpool
	held       *fileSpool
	heldKey    string
	heldDriver *driver
	journal    *fileSpool // keeps the memory store's reservations too, if any
	logger     *zap.Logger
	now        func() time.Time
}

// Replay configures replay protection.
type Replay struct {
	// Where accepted event IDs are kept: `memory` (default; per process),
	// `redis` (shared by every instance), or `off`.
	Store string `json:"store,omitempty"`

	// The most event IDs the memory store keeps at once. When it is full,
	// new deliveries get 503 until entries expire. Default: 1000000.
	MaxEntries int `json:"max_entries,omitempty"`

	// The Redis server, for store `redis`: redis://[user:password@]host:port[/db]
	// or rediss:// for TLS; or its Sentinels, with ?master_name=<name> and
	// &addr=<sentinel> for each more. The module's own query parameters:
	// wait_replicas=N (and wait_timeout), allow_eviction=true
	// (docs/several-instances.md). Write it as a placeholder, {env.NAME}
	// or {file.PATH}, when it holds a password.
	URL string `json:"url,omitempty"`

	// What every Redis key starts with; the event ID follows.
	// Default: trivialsec_webhook:replay:
	KeyPrefix string `json:"key_prefix,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.trivialsec_webhook",
		New: func() caddy.Module { return new(Handler) },
	}
}

// secretPlaceholder matches a secret written as one placeholder alone.
var secretPlaceholder = regexp.MustCompile(`^\{(env|file)\.[^{}]+\}$`)

// Provision sets defaults, resolves the secrets and prepares the verifier
// and the replay store.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if h.now == nil {
		h.now = time.Now
	}
	if h.Subject == "" {
		h.Subject = defaultSubject
	}
	if h.Issuer == "" {
		h.Issuer = defaultIssuer
	}
	if h.Leeway == nil {
		d := caddy.Duration(defaultLeeway)
		h.Leeway = &d
	}
	if h.MaxBody == 0 {
		h.MaxBody = defaultMaxBody
	}
	if h.MaxDepth == 0 {
		h.MaxDepth = defaultJSONLimits.depth
	}
	if h.Replay == nil {
		h.Replay = new(Replay)
	}
	if h.Replay.Store == "" {
		h.Replay.Store = "memory"
	}
	if h.Replay.MaxEntries == 0 {
		h.Replay.MaxEntries = defaultReplayMaxEntries
	}

	subject, err := parseSubject(h.Subject)
	if err != nil {
		return err
	}
	events, err := parseEvents(h.Events)
	if err != nil {
		return err
	}
	keys, err := h.resolveSecrets()
	if err != nil {
		return err
	}

	h.verifier = newVerifier(verifierConfig{
		keys:     keys,
		account:  h.Account,
		issuer:   h.Issuer,
		subject:  subject,
		endpoint: h.Endpoint,
		leeway:   time.Duration(*h.Leeway),
		body:     jsonLimits{depth: h.MaxDepth, number: defaultJSONLimits.number},
		events:   events,
		now:      h.now,
	})

	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return err
	}
	if err := h.provisionSpool(ctx); err != nil {
		return err
	}
	if err := h.provisionStore(ctx); err != nil {
		return err
	}
	return h.provisionHold(ctx)
}

// provisionSpool opens the spool store, or takes it over from an earlier
// config, and registers this handler's server to re-drive its deliveries
// once the config has started.
func (h *Handler) provisionSpool(ctx caddy.Context) error {
	if h.Spool == nil {
		h.Spool = new(Spool)
	}
	if err := h.Spool.validate(); err != nil {
		return err
	}
	if h.Spool.Store == "off" {
		h.logger.Warn("the spool is off: a delivery the next handler fails is lost, as the sender never sends it again")
		return nil
	}
	h.Spool.setDefaults()
	h.policy = h.Spool.policy()
	if server, _ := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); server == nil {
		return errNoServer // before a store is taken
	}
	if h.Spool.Store == "redis" {
		rawURL, err := h.resolveRedisURL("spool", h.Spool.URL)
		if err != nil {
			return err
		}
		store, key, err := loadRedisSpool(rawURL, h.Spool.KeyPrefix, h.policy)
		if err != nil {
			return err
		}
		h.spool, h.spoolKey = store, key
		if err := checkRedis(store.client.guard(spoolUse, store.prefix)); err != nil {
			return fmt.Errorf("spool store redis: %w", err)
		}
	} else {
		store, key, err := loadFileSpool(h.Spool.Dir, h.policy)
		if err != nil {
			return err
		}
		h.spool, h.spoolKey = store, key
	}
	var err error
	h.driver, err = h.startDriver(ctx, h.spool)
	return err
}

// errNoServer refuses a spool outside an HTTP server's routes.
var errNoServer = errors.New("spool: the handler is not in the routes of an HTTP server, through which the spool delivers again: use it in a site, or set spool off")

// startDriver registers this handler's server to re-drive store's
// deliveries of its account once the config has started.
func (h *Handler) startDriver(ctx caddy.Context, store spoolStore) (*driver, error) {
	server, _ := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if server == nil {
		return nil, errNoServer
	}
	events, err := ctx.App("events")
	if err != nil {
		return nil, fmt.Errorf("spool: %v", err)
	}
	app, err := ctx.App("trivialsec_webhook")
	if err != nil {
		return nil, fmt.Errorf("spool: %v", err)
	}
	app.(*spoolApp).use(store)
	d := &driver{server: server, key: serverKey(server), account: h.Account}
	if err := events.(*caddyevents.App).On("started", d); err != nil {
		return nil, fmt.Errorf("spool: %v", err)
	}
	store.register(d)
	return d, nil
}

// provisionStore takes the replay store over from an earlier config, or
// makes it.
func (h *Handler) provisionStore(ctx caddy.Context) error {
	switch h.Replay.Store {
	case "off":
		h.logger.Warn("replay protection is off: a captured delivery can be replayed until its token expires")
		return nil
	case "memory":
		store, key, err := loadMemoryStore(h.Account, h.Replay.MaxEntries)
		if err != nil {
			return err
		}
		h.store, h.storeKey = store, key
		switch file, ok := h.spool.(*fileSpool); {
		case ok:
			// The spool store keeps the reservations too, so that a restart
			// keeps them; the memory store is the cache in front.
			h.journal = file
			if err := file.keepReservations(h.Account, store); err != nil {
				return err
			}
		case h.spool != nil:
			h.logger.Warn("replay memory with spool store redis: each instance refuses only the replays it saw itself, and forgets them when it stops; use replay redis beside a shared spool")
		}
		return nil
	case "redis":
		if h.Replay.URL == "" {
			return errors.New("replay store redis needs a url: redis://host:port, as {env.NAME} when it holds a password")
		}
		rawURL, err := h.resolveRedisURL("replay", h.Replay.URL)
		if err != nil {
			return err
		}
		prefix := h.Replay.KeyPrefix
		if prefix == "" {
			prefix = defaultRedisKeyPrefix
		}
		store, key, err := loadRedisStore(rawURL, prefix)
		if err != nil {
			return err
		}
		h.store, h.storeKey = store, key
		if err := checkRedis(store.guard); err != nil {
			return fmt.Errorf("replay store redis: %w", err)
		}
		return nil
	default:
		return fmt.Errorf("unknown replay store %q: use memory, redis or off", h.Replay.Store)
	}
}

// checkRedis checks a Redis store's server when its config is provisioned:
// a missing permission, or Redis Cluster, refuses the config. A Redis that
// does not answer does not: Caddy serves its other sites, and the store
// waits for it (the log says so). Neither does an evicting one: its ERROR
// says what to change, and the store writes nothing until it is changed.
func checkRedis(g *redisGuard) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*redisTimeout)
	defer cancel()
	err := g.check(ctx)
	if p, ok := errors.AsType[*redisProblem](err); ok {
		if p.fatal {
			return p
		}
		return nil
	}
	if err != nil {
		caddy.Log().Named("http.handlers.trivialsec_webhook").Warn("redis does not answer: its checks run, and the store writes, once it does",
			zap.String("store", g.use.String()), zap.String("key_prefix", g.prefix), zap.Error(err))
	}
	return nil
}

// provisionHold gives the Redis stores somewhere to hold deliveries while
// Redis does not answer: the spool's file store, or, beside a Redis spool,
// the file store in Caddy's data directory. With the spool off there is
// none.
func (h *Handler) provisionHold(ctx caddy.Context) error {
	_, redisReplay := h.store.(*redisStore)
	dir := defaultSpoolDir()
	switch spool := h.spool.(type) {
	case nil:
		if redisReplay {
			h.logger.Warn("replay redis with the spool off: while Redis does not answer, deliveries are refused with 503, and lost (the sender never sends them again); turn the spool on to hold them")
		}
		return nil
	case *fileSpool:
		if redisReplay {
			h.hold = spool
		}
		if abs, err := filepath.Abs(dir); err == nil && abs == spool.dir {
			return nil
		}
	case *redisSpool:
		file, err := h.loadHeld(ctx, dir)
		h.hold = file
		return err
	}
	// An earlier config, with a Redis spool, may have held deliveries in
	// that directory: this one moves them into its spool, so that a reload
	// away from Redis strands none.
	if _, err := os.Stat(filepath.Join(dir, "spool.db")); err != nil {
		return nil
	}
	_, err := h.loadHeld(ctx, dir)
	return err
}

// loadHeld takes the file store of dir, where deliveries are held beside a
// Redis spool, and re-drives this account's through this handler.
func (h *Handler) loadHeld(ctx caddy.Context, dir string) (*fileSpool, error) {
	file, key, err := loadFileSpool(dir, h.policy)
	if err != nil {
		return nil, err
	}
	h.held, h.heldKey = file, key
	h.heldDriver, err = h.startDriver(ctx, file)
	return file, err
}

// resolveRedisURL resolves a placeholder URL of the replay or spool store,
// and warns of a literal one that holds a password.
func (h *Handler) resolveRedisURL(what, raw string) (string, error) {
	if secretPlaceholder.MatchString(raw) {
		v, err := resolvePlaceholder(raw)
		if err != nil {
			return "", fmt.Errorf("%s redis url: %w", what, err)
		}
		return v, nil
	}
	if u, err := url.Parse(raw); err == nil {
		_, hasPassword := u.User.Password() // nil User: none
		if hasPassword || u.Query().Has("sentinel_password") {
			h.logger.Warn("the " + what + " redis url holds a password written literally in the config, where the admin API shows it: use {env.NAME} or {file.PATH}")
		}
	}
	return raw, nil
}

// resolveSecrets turns the configured secrets into keys. Nothing it returns
// or logs holds a secret's value.
func (h *Handler) resolveSecrets() ([][]byte, error) {
	keys := make([][]byte, 0, len(h.Secret))
	for i, s := range h.Secret {
		n := i + 1
		switch {
		case secretPlaceholder.MatchString(s):
			v, err := resolvePlaceholder(s)
			if err != nil {
				return nil, fmt.Errorf("secret %d: %w", n, err)
			}
			keys = append(keys, []byte(v))
		case strings.Contains(s, "{env.") || strings.Contains(s, "{file."):
			return nil, fmt.Errorf("secret %d: write a placeholder alone, as {env.NAME} or {file.PATH}", n)
		case s == "":
			return nil, fmt.Errorf("secret %d is empty", n)
		default:
			h.logger.Warn("a secret is written literally in the config, where the admin API shows it: use {env.NAME} or {file.PATH}",
				zap.Int("secret", n))
			keys = append(keys, []byte(s))
		}
	}
	return keys, nil
}

// resolvePlaceholder resolves one {env.*} or {file.*} placeholder written
// alone. An empty result is an error that names the placeholder, never a
// value.
func resolvePlaceholder(placeholder string) (string, error) {
	v, err := caddy.NewReplacer().ReplaceOrErr(placeholder, true, true)
	if err != nil {
		return "", fmt.Errorf("%v: set the variable or create the file", err)
	}
	return v, nil
}

// Validate checks the configuration.
func (h *Handler) Validate() error {
	if err := h.checkRequired(); err != nil {
		return err
	}
	if err := h.Spool.validate(); err != nil {
		return err
	}
	switch {
	case *h.Leeway < 0:
		return errors.New("leeway must not be negative")
	case h.MaxBody < 0:
		return errors.New("max_body must not be negative")
	case h.MaxDepth < 1 || h.MaxDepth > maxJSONDepth:
		return fmt.Errorf("max_depth %d is out of range: use 1 to %d", h.MaxDepth, maxJSONDepth)
	case h.Replay.MaxEntries < 0:
		return errors.New("replay max_entries must not be negative")
	}
	return nil
}

// checkRequired reports a missing account or secret. The Caddyfile and
// Validate both call it.
func (h *Handler) checkRequired() error {
	switch {
	case h.Account == "":
		return errors.New("account is required: the Trivial Security account name")
	case len(h.Secret) == 0:
		return errors.New("secret is required: the webhook signing secret, as {env.NAME} or {file.PATH}")
	}
	return nil
}

// parseSubject reads the subject setting, a UUID in any textual form. The
// Caddyfile and Provision both call it.
func parseSubject(s string) (uuid.UUID, error) {
	id, err := uuid.Parse(s)
	if err != nil {
		return uuid.UUID{}, fmt.Errorf("subject %q is not a UUID: write it as %s", s, defaultSubject)
	}
	return id, nil
}

// parseEvents reads the events allow-list; none means every event. The
// Caddyfile and Provision both call it.
func parseEvents(names []string) (eventSet, error) {
	if len(names) == 0 {
		return allEvents, nil
	}
	var set eventSet
	for _, name := range names {
		i := eventIndex([]byte(name))
		if i < 0 {
			return 0, fmt.Errorf("unknown event name %q: use one of %s", name, strings.Join(eventNames[:], ", "))
		}
		set |= 1 << i
	}
	return set, nil
}

// Cleanup lets go of the replay store and the spool store; each lives on
// while a newer config uses it.
func (h *Handler) Cleanup() error {
	var errs []error
	if h.store != nil {
		_, err := replayStores.Delete(h.storeKey)
		errs = append(errs, err)
	}
	if h.spool != nil {
		if h.driver != nil { // nil when Provision failed before it was made
			h.spool.unregister(h.driver)
		}
		_, err := spools.Delete(h.spoolKey)
		errs = append(errs, err)
	}
	if h.held != nil {
		if h.heldDriver != nil {
			h.held.unregister(h.heldDriver)
		}
		_, err := spools.Delete(h.heldKey)
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// ServeHTTP verifies the delivery, then hands it to next.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if rd := redriveOf(r); rd != nil && rd.account == h.Account {
		return h.serveRedriven(w, r, next, rd)
	}
	repl := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)

	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		return h.refuse(w, r, repl, reasonMethodNotAllowed, nil, "")
	}
	authorization := r.Header["Authorization"]
	if len(authorization) == 0 {
		return h.refuse(w, r, repl, reasonMissingToken, nil, "")
	}
	if len(authorization) > 1 {
		return h.refuse(w, r, repl, reasonMalformedToken, nil, "")
	}
	tok, reason := h.verifier.verifyToken(authorization[0])
	if reason != reasonNone {
		return h.refuse(w, r, repl, reason, &tok, "")
	}
	// From here on the token is genuine: every refusal is a WARN.
	contentType := r.Header["Content-Type"]
	if len(contentType) > 1 {
		return h.refuse(w, r, repl, reasonUnsupportedMediaType, &tok, "")
	}
	if len(contentType) == 1 {
		if reason := checkContentType(contentType[0]); reason != reasonNone {
			return h.refuse(w, r, repl, reason, &tok, "")
		}
	}
	body, reason := readBody(r, h.MaxBody)
	if reason != reasonNone {
		return h.refuse(w, r, repl, reason, &tok, "")
	}
	ev, reason := h.verifier.verifyBody(tok, body)
	if reason != reasonNone {
		return h.refuse(w, r, repl, reason, &tok, ev.Name)
	}

	expires := tok.ExpiresAt.Add(time.Duration(*h.Leeway))
	var reserved reservation
	var unchecked error // the replay store did not answer: hold it, unchecked
	if h.journal != nil {
		// The reservations kept on disk are in the memory store once the
		// spool store is open: before its config started, open it now.
		_ = h.journal.ready()
	}
	if h.hold != nil && h.hold.holdsUnchecked(ev.ID) {
		// A delivery of this event waits on this instance's disk to be
		// checked: it came first, and this one is its copy.
		return h.refuse(w, r, repl, reasonReplayed, &tok, ev.Name)
	}
	if h.store != nil {
		var result replayResult
		var err error
		reserved, result, err = h.store.reserve(r.Context(), ev.ID, expires, h.now())
		switch {
		case err != nil && h.hold != nil && h.hold.up():
			unchecked = err
		case err != nil:
			// Fail closed: never forward a delivery that was not checked.
			if c := h.logger.Check(zapcore.WarnLevel, "replay store unavailable: refusing the delivery"); c != nil {
				c.Write(zap.String("event_id", ev.ID.String()), zap.Error(err))
			}
			if rs, ok := h.store.(*redisStore); ok && outcomeUnknown(err) {
				rs.settleLater(ev.ID, reserved)
			}
			return h.refuse(w, r, repl, reasonReplayStoreDown, &tok, ev.Name)
		case result == replayDuplicate:
			return h.refuse(w, r, repl, reasonReplayed, &tok, ev.Name)
		case result == replayFull:
			return h.refuse(w, r, repl, reasonReplayStoreFull, &tok, ev.Name)
		}
		if h.journal != nil && unchecked == nil {
			h.keep(ev.ID, expires)
		}
	}

	// The body again, byte for byte, with its length: a chunked upload goes
	// on with a Content-Length.
	if r.ContentLength != int64(len(body)) || len(r.Header["Content-Length"]) != 1 {
		r.Header["Content-Length"] = []string{strconv.Itoa(len(body))}
	}
	a := &accepted{ev: ev}
	a.body.Reset(body)
	r.Body = &a.body
	r.ContentLength = int64(len(body))
	r.TransferEncoding = nil
	// Trailers are headers the sender never signed, and could carry the
	// token past strip_authorization: only the verified bytes go on.
	r.Trailer = nil
	if h.StripAuthorization {
		r.Header.Del("Authorization")
	}
	if unchecked != nil {
		return h.serveHeld(w, r, repl, &tok, a, body, reserved, unchecked)
	}
	repl.Map(a.ev.placeholder)
	acceptedCounter.Inc()
	eventCounters[ev.nameIndex].Inc()
	if c := h.logger.Check(zapcore.DebugLevel, "accepted delivery"); c != nil {
		c.Write(zap.String("event_id", ev.ID.String()), zap.String("event_name", ev.Name),
			zap.String("remote_addr", r.RemoteAddr))
	}

	switch {
	case h.spool == nil || !h.spool.up():
		// No spool, or its store cannot be used now (the log said so):
		// the sender gets what the next handler answers.
		return h.serveReleasing(w, r, next, a, reserved)
	case h.Spool.Mode == "always":
		return h.serveSpoolFirst(w, r, next, a, body, reserved)
	default:
		return h.serveFallback(w, r, next, a, body, reserved)
	}
}

// serveReleasing hands the delivery to next, and releases its reservation
// if next fails (returns an error, answers 5xx, or panics before an answer
// began), so that a genuine delivery whose upstream was down could come
// again. When nothing after the module answers at all, the sender gets 502,
// not net/http's empty 200: the delivery reached no service.
func (h *Handler) serveReleasing(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, a *accepted, reserved reservation) error {
	sw := &a.sw
	sw.ResponseWriter = w
	if h.store == nil {
		// Replay off: nothing to release, so no defers; only an answer to
		// look for.
		err := next.ServeHTTP(sw, r)
		if sw.status == 0 && err == nil {
			return caddyhttp.Error(http.StatusBadGateway, errNoAnswer)
		}
		return err
	}
	id := a.ev.ID
	succeeded := false
	defer func() {
		if !succeeded {
			h.release(r.Context(), id, reserved, sw.status)
		}
	}()
	defer func() {
		if p := recover(); p != nil {
			// reverse_proxy panics when the upstream breaks off an answer
			// it began: an answer begun reached the service.
			succeeded = keeps(sw.status)
			panic(p)
		}
	}()
	err := next.ServeHTTP(sw, r)
	status := sw.status
	succeeded = keeps(status)
	if status == 0 && err == nil {
		return caddyhttp.Error(http.StatusBadGateway, errNoAnswer)
	}
	return err
}

// keeps reports whether a delivery keeps its reservation once the next
// handler wrote status (0: none): it does once an answer other than a
// retryable failure went out, even if an error or a panic followed: the
// delivery reached the service, which took it or refused it. Without an
// answer (an error, a panic, nothing at all), it is released.
func keeps(status int) bool { return status != 0 && !retryable(status) }

// keep writes a reservation made in the memory store to the spool store's
// journal, and returns once it is on disk: a crash from then on keeps it. A
// journal that cannot write is said at ERROR and counted, and the delivery
// goes on: the memory store refuses its copies until a restart, and
// refusing it would lose a genuine delivery for sure (docs/checks.md,
// Replay protection).
func (h *Handler) keep(id uuid.UUID, expires time.Time) {
	if err := h.journal.reserve(h.Account, id, expires); err != nil {
		replayJournalErrors.Inc()
		if c := h.logger.Check(zapcore.ErrorLevel, "the replay reservation could not be written to disk: the delivery goes on, and a restart would forget its reservation"); c != nil {
			c.Write(zap.String("event_id", id.String()), zap.Error(err))
		}
	}
}

// release gives a reservation back, in the store and its journal.
func (h *Handler) release(ctx context.Context, id uuid.UUID, reserved reservation, status int) {
	if h.store == nil {
		return // replay off
	}
	// The journal hears of the release first, while the memory store still
	// refuses copies: a redelivery reserved after the release is then
	// after it in the journal too, and a restart keeps it.
	var err error
	if h.journal != nil {
		err = h.journal.unreserve(h.Account, id, reserved.expires)
	}
	if err == nil {
		err = h.store.release(ctx, id, reserved)
	}
	if rs, ok := h.store.(*redisStore); ok && outcomeUnknown(err) {
		if c := h.logger.Check(zapcore.WarnLevel, "next handler failed, and the release of the event ID has an unknown outcome: it is released once Redis answers"); c != nil {
			c.Write(zap.String("event_id", id.String()), zap.Error(err))
		}
		rs.settleLater(id, reserved)
		return
	}
	if err != nil {
		if c := h.logger.Check(zapcore.WarnLevel, "next handler failed, and the event ID could not be released: a redelivery is refused until the token expires"); c != nil {
			c.Write(zap.String("event_id", id.String()), zap.Error(err))
		}
		return
	}
	if c := h.logger.Check(zapcore.DebugLevel, "next handler failed: released the event ID"); c != nil {
		c.Write(zap.String("event_id", id.String()), zap.Int("status", status))
	}
}

// placeholder gives the {http.trivialsec_webhook.*} placeholders of an
// accepted event. Values are made only when a later handler asks for them.
func (ev *event) placeholder(key string) (any, bool) {
	name, ok := strings.CutPrefix(key, "http.trivialsec_webhook.")
	if !ok {
		return nil, false
	}
	switch name {
	case "event_id":
		return ev.ID.String(), true
	case "event_name":
		return ev.Name, true
	case "timestamp":
		return ev.Timestamp.UTC().Format(time.RFC3339Nano), true
	case "issued_at":
		return ev.token.IssuedAt.UTC().Format(time.RFC3339), true
	case "expires_at":
		return ev.token.ExpiresAt.UTC().Format(time.RFC3339), true
	case "endpoint":
		return ev.token.Endpoint, true
	}
	return nil, false
}

// accepted is what an accepted delivery leaves behind for the handlers
// after this one, in one allocation: the body, the event the placeholders
// read, and what the path it takes needs to see the answer.
type accepted struct {
	body    bodyReader
	ev      event
	sw      statusWriter // serveReleasing's
	attempt attempt      // serveFallback's
}

// bodyReader hands the verified body to the next handler.
type bodyReader struct{ bytes.Reader }

func (*bodyReader) Close() error { return nil }

// refuse answers a refusal through Caddy's error handling, and logs it:
// at DEBUG before the signature verified (internet noise), at WARN after
// (a lost event, or an attack with a signed token).
func (h *Handler) refuse(w http.ResponseWriter, r *http.Request, repl *caddy.Replacer, reason reasonCode, tok *verifiedToken, eventName string) error {
	if reason.bodyUnread() && r.ProtoMajor == 1 {
		// What is left of the body stays on the wire. net/http would read
		// and discard up to 256 KiB of it, or wait for a body the client
		// has not sent (Expect: 100-continue, a Content-Length the client
		// holds back), before the answer goes out: Caddy's wrapped body
		// hides it from the server's own check. Closing the connection
		// sends the answer at once. (HTTP/2 ends the stream alone, and
		// there a Connection header would close the whole connection.)
		w.Header().Set("Connection", "close")
	}
	repl.Set("http.trivialsec_webhook.reason", reason.String())
	refusedCounters[reason].Inc()
	level := zapcore.DebugLevel
	if reason.authenticated() {
		level = zapcore.WarnLevel
	}
	if c := h.logger.Check(level, "refused delivery"); c != nil {
		fields := []zap.Field{zap.String("reason", reason.String()), zap.String("remote_addr", r.RemoteAddr)}
		// Only what the signed token or the checks vouch for, in canonical
		// form: never a raw value from the request.
		if tok != nil {
			if tok.eidValid {
				fields = append(fields, zap.String("event_id", tok.EventID.String()))
			}
			if eventName == "" {
				eventName = tok.EventName
			}
		}
		if eventName != "" {
			fields = append(fields, zap.String("event_name", eventName))
		}
		c.Write(fields...)
	}
	return caddyhttp.Error(reason.status(), reason)
}

// firstBodyBuffer is what readBody allocates before any byte arrives. The
// buffer then grows only when full, by at most what it holds (and never past
// the Content-Length or max_body), so it stays within about twice the bytes
// that arrived: a Content-Length alone, which anyone holding one captured
// token can send, must not make the module allocate max_body.
const firstBodyBuffer = 64 << 10

// readBody reads the body, at most limit bytes. It runs only once the token
// has verified, so an unauthenticated request makes the module buffer
// nothing. A body of known length up to 64 KiB is read into one buffer of
// its size.
func readBody(r *http.Request, limit int64) ([]byte, reasonCode) {
	if r.Body == nil {
		return nil, reasonNone
	}
	if r.ContentLength > limit {
		return nil, reasonBodyTooLarge
	}
	// Room for one byte more than the body, so that its end is seen
	// without growing the buffer.
	want := limit + 1
	if r.ContentLength >= 0 {
		want = r.ContentLength + 1
	}
	buf := make([]byte, 0, min(want, firstBodyBuffer+1))
	for {
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, int(min(int64(cap(buf)), want-int64(len(buf)))))
		}
		n, err := r.Body.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if int64(len(buf)) > limit {
			return nil, reasonBodyTooLarge
		}
		// A body framed by Content-Length ends there (net/http holds it
		// to that); no further read, each of which costs Caddy a deadline.
		if err == io.EOF || (err == nil && int64(len(buf)) == r.ContentLength) {
			return buf, reasonNone
		}
		if err != nil {
			var maxBytes *http.MaxBytesError
			var handlerErr caddyhttp.HandlerError
			if errors.As(err, &maxBytes) ||
				(errors.As(err, &handlerErr) && handlerErr.StatusCode == http.StatusRequestEntityTooLarge) {
				return nil, reasonBodyTooLarge
			}
			return nil, reasonBodyReadFailed
		}
	}
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
