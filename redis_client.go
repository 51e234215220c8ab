package trivialsecwebhook

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
)

// redisClient is one Redis client, shared by every store (replay and spool)
// that names its URL, and kept across reloads. Behind Sentinel it is
// go-redis's failover client, which asks the Sentinels for the primary
// whenever it dials: a *redis.Client all the same.
type redisClient struct {
	*redis.Client
	key    string      // in redisClients
	health redisHealth // what the server's settings and our permissions allow (redis_check.go)

	// wait_replicas and wait_timeout, from the URL: eval follows every
	// script with WAIT waitReplicas waitTimeout. 0: no WAIT.
	waitReplicas int
	waitTimeout  time.Duration
	// waiting is Client with a read timeout long enough for WAIT, over the
	// same connection pools; nil when waitReplicas is 0.
	waiting *redis.Client
}

// defaultWaitTimeout is how long a write waits for wait_replicas replicas
// when the URL gives no wait_timeout.
const defaultWaitTimeout = time.Second

// errNotReplicated: a script ran on the primary, but fewer replicas than
// wait_replicas confirmed its writes within wait_timeout. The writes stay
// on the primary, and may still reach the replicas, or be lost if the
// primary fails first: whoever wrote must treat the outcome as unknown.
var errNotReplicated = errors.New("redis: not replicated")

// Destruct closes the client with the last store using it.
func (c *redisClient) Destruct() error { return c.Close() }

// redisClients keeps one client per URL.
var redisClients = caddy.NewUsagePool()

// loadRedisClient takes the client of rawURL over from an earlier config or
// another store, or makes it. Give it back with release. Errors never show
// the URL, which may hold a password.
func loadRedisClient(rawURL string) (*redisClient, error) {
	v, _, err := redisClients.LoadOrNew(rawURL, func() (caddy.Destructor, error) {
		u, err := parseRedisURL(rawURL)
		if err != nil {
			return nil, err
		}
		c := &redisClient{key: rawURL, waitReplicas: u.waitReplicas, waitTimeout: u.waitTimeout}
		c.health.allowEviction = u.allowEviction
		if u.failover != nil {
			c.Client = redis.NewFailoverClient(u.failover)
		} else {
			c.Client = redis.NewClient(u.plain)
		}
		if c.waitReplicas > 0 {
			// A pipeline is read with the client's read timeout, whatever
			// WAIT's own: give it WAIT's on top of the usual one, lest the
			// read time out (and go-redis send the script again) while
			// WAIT still waits.
			c.waiting = c.WithTimeout(redisTimeout + c.waitTimeout)
		}
		return c, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*redisClient), nil
}

// release lets go of the client.
func (c *redisClient) release() error {
	_, err := redisClients.Delete(c.key)
	return err
}

// redisURL is what a Redis URL says: the options of one of go-redis's two
// clients, and this module's own parameters.
type redisURL struct {
	plain        *redis.Options         // redis://host:port
	failover     *redis.FailoverOptions // Sentinel: a URL with master_name
	waitReplicas int
	waitTimeout  time.Duration
	// allow_eviction=true: use a Redis that may evict keys, with a WARN
	// (redis_check.go).
	allowEviction bool
}

// redisURLForms says how to write the URL, for the errors.
const redisURLForms = "write it as redis://[user:password@]host:port[/db] (rediss:// for TLS), " +
	"or for Sentinel redis://[user:password@]sentinel1:26379[/db]?master_name=NAME&addr=sentinel2:26379&addr=sentinel3:26379, " +
	"percent-encoding the characters of the user name and password that a URL reserves (such as @ : / ? # % &)"

// parseRedisURL reads a Redis URL. One with master_name names Sentinels
// (go-redis's failover URL), and its user and password are the primary's,
// as in a URL that names the server itself; sentinel_username and
// sentinel_password are the Sentinels' own, if they ask for one.
// wait_replicas, wait_timeout and allow_eviction are this module's, taken
// out of the URL before go-redis reads it. Errors never show the
// URL, nor any part of it that could hold a password.
func parseRedisURL(rawURL string) (redisURL, error) {
	var r redisURL
	u, err := url.Parse(rawURL)
	if err != nil {
		// url.Parse's errors quote the URL, or a part of it ("invalid
		// port" can be a password's tail): say nothing of it.
		return r, errors.New("the URL does not parse: " + redisURLForms)
	}
	q := u.Query()
	take := func(name string) (string, bool) {
		v, ok := q[name]
		delete(q, name)
		if !ok || len(v) == 0 {
			return "", false
		}
		return v[len(v)-1], true
	}

	sentinelUser, hasSentinelUser := take("sentinel_username")
	sentinelPassword, hasSentinelPassword := take("sentinel_password")
	if cutShort(u, q) {
		// The errors below, and go-redis's, quote the path and the query:
		// here they hold the tail of a password.
		return r, errors.New("the URL has an @ after its host: a password with a / ? or # not percent-encoded ends the URL's user info early; " + redisURLForms)
	}

	if v, ok := take("wait_replicas"); ok {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return r, fmt.Errorf("wait_replicas is a number of replicas, 0 or more: found %q", v)
		}
		r.waitReplicas = n
	}
	if v, ok := take("wait_timeout"); ok {
		d, err := caddy.ParseDuration(v)
		if err != nil || d < time.Millisecond {
			// WAIT counts in milliseconds, and its 0 waits for ever.
			return r, fmt.Errorf("wait_timeout is a duration of 1ms or more, such as 500ms: found %q", v)
		}
		if r.waitReplicas == 0 {
			return r, errors.New("wait_timeout is for wait_replicas: add wait_replicas=N, the replicas that must confirm each write")
		}
		r.waitTimeout = d
	} else if r.waitReplicas > 0 {
		r.waitTimeout = defaultWaitTimeout
	}
	if v, ok := take("allow_eviction"); ok {
		allow, err := strconv.ParseBool(v)
		if err != nil {
			return r, fmt.Errorf("allow_eviction is true or false: found %q", v)
		}
		r.allowEviction = allow
	}

	if !q.Has("master_name") {
		if hasSentinelUser || hasSentinelPassword {
			return r, errors.New("sentinel_username and sentinel_password are for a Sentinel URL, one with master_name: " + redisURLForms)
		}
		if q.Has("addr") {
			return r, errors.New("addr names further Sentinels, in a URL with master_name: " + redisURLForms)
		}
		u.RawQuery = q.Encode()
		r.plain, err = redis.ParseURL(u.String())
		if err != nil {
			return r, fmt.Errorf("the URL does not parse (%v): %s", err, redisURLForms)
		}
		r.plain.DialTimeout, r.plain.ReadTimeout, r.plain.WriteTimeout = redisTimeout, redisTimeout, redisTimeout
		r.plain.MaxRetries = 1
		return r, nil
	}

	switch {
	case q.Get("master_name") == "":
		return r, errors.New("master_name is empty: give the name the Sentinels monitor the primary by, such as master_name=mymaster")
	case u.Host == "":
		return r, errors.New("a Sentinel URL names a Sentinel as its host: " + redisURLForms)
	case q.Has("password") || q.Has("username"):
		// go-redis reads the primary's credentials from these, and the
		// URL's user and password as the Sentinels'. This module reads the
		// URL's user and password as the primary's, as in a URL without
		// Sentinel (and as the warning about a password written literally
		// in the config expects): one meaning for one place.
		return r, errors.New("in a Sentinel URL, give the primary's user and password before the host (redis://user:password@sentinel1:26379?master_name=...), and the Sentinels' own, if they ask for one, as sentinel_username and sentinel_password")
	}
	for _, name := range []string{"replica_only", "use_disconnected_replicas", "route_by_latency", "route_by_latency_tolerance", "route_randomly"} {
		if q.Has(name) {
			// Every write goes to the primary; go-redis's failover client
			// panics on the two route_ ones.
			return r, fmt.Errorf("%s is not supported: every command goes to the primary", name)
		}
	}
	u.RawQuery = q.Encode()
	r.failover, err = redis.ParseFailoverURL(u.String())
	if err != nil {
		// Not go-redis's words: an unknown option it names may be the
		// tail of a sentinel_password with an & not percent-encoded.
		return r, fmt.Errorf("the Sentinel URL does not parse (an unknown or malformed query parameter; percent-encode & in a password): %s", redisURLForms)
	}
	f := r.failover
	f.Username, f.Password = f.SentinelUsername, f.SentinelPassword
	f.SentinelUsername, f.SentinelPassword = sentinelUser, sentinelPassword
	if f.TLSConfig != nil {
		// go-redis names the first Sentinel as the server of every TLS
		// connection, the primary's too, whose certificate then fails
		// verification unless it holds that name. Without a name, each
		// connection checks the host it dials: a Sentinel's from the URL,
		// the primary's as the Sentinels give it.
		f.TLSConfig.ServerName = ""
	}
	f.DialTimeout, f.ReadTimeout, f.WriteTimeout = redisTimeout, redisTimeout, redisTimeout
	f.MaxRetries = 1
	return r, nil
}

// cutShort reports whether the URL holds an @ after its host, in its path,
// query or fragment: the sign of a user info cut short by a / ? or # in the
// password, whose tail then reads as a path or a query. (The Sentinels'
// user and password, which may hold an @, are out of q already.)
func cutShort(u *url.URL, q url.Values) bool {
	if u.Fragment != "" || strings.Contains(u.Path, "@") {
		return true
	}
	for k, vs := range q {
		if strings.Contains(k, "@") || slices.ContainsFunc(vs, func(v string) bool { return strings.Contains(v, "@") }) {
			return true
		}
	}
	return false
}

// eval runs script as script.Run does (EVALSHA, then EVAL if Redis does
// not have it). With wait_replicas set, it sends WAIT right behind the
// script on the same connection (WAIT counts only its connection's writes,
// and a script may not call it), and if fewer replicas than wait_replicas
// confirm within wait_timeout, the Cmd carries errNotReplicated, with the
// script's value still in Val: the writes happened on the primary. WAIT
// waits for the connection's last write, so a script that wrote nothing
// waits too, and fails the same way while the replicas are away.
func (c *redisClient) eval(ctx context.Context, script *redis.Script, keys []string, args ...any) *redis.Cmd {
	if c.waitReplicas == 0 {
		return script.Run(ctx, c.Client, keys, args...)
	}
	cmd, wait := c.evalWait(ctx, script.EvalSha, keys, args)
	if errors.Is(cmd.Err(), redis.ErrNoScript) || redis.HasErrorPrefix(cmd.Err(), "NOSCRIPT") {
		cmd, wait = c.evalWait(ctx, script.Eval, keys, args)
	}
	if cmd.Err() != nil {
		return cmd
	}
	n, err := wait.Int64()
	switch {
	case err != nil:
		cmd.SetErr(fmt.Errorf("%w: written on the primary, but WAIT failed: %w", errNotReplicated, err))
	case int(n) < c.waitReplicas:
		cmd.SetErr(fmt.Errorf("%w: written on the primary, but only %d of %d replicas confirmed it within %v",
			errNotReplicated, n, c.waitReplicas, c.waitTimeout))
	}
	return cmd
}

// evalWait sends the script, run as run runs it, and WAIT in one pipeline:
// one connection, one round trip.
func (c *redisClient) evalWait(ctx context.Context, run func(context.Context, redis.Scripter, []string, ...any) *redis.Cmd, keys []string, args []any) (cmd, wait *redis.Cmd) {
	// Each command carries its own error; Pipelined's is the first of them.
	_, _ = c.waiting.Pipelined(ctx, func(p redis.Pipeliner) error {
		cmd = run(ctx, p, keys, args...)
		// Pipeliner has no Wait method: go-redis leaves blocking commands
		// out of it.
		wait = p.Do(ctx, "WAIT", c.waitReplicas, c.waitTimeout.Milliseconds())
		return nil
	})
	return cmd, wait
}
