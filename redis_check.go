package trivialsecwebhook

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Before a store writes to a Redis, it makes sure that the server keeps
// what it is given and that this module may run there every command the
// store needs (docs/several-instances.md, The Redis server). A store whose check finds a
// problem writes nothing: the sender gets the failure, as with Redis down,
// and the log says, at ERROR, what to change. The check runs when the store
// is provisioned (a missing permission or Redis Cluster then refuses the
// config), then again every redisRecheck and after any call that failed.

// redisRecheck is how long a check's verdict holds (a variable for the
// tests).
var redisRecheck = 10 * time.Second

// redisUse is what a store does with Redis: the commands it needs.
type redisUse uint8

const (
	replayUse redisUse = iota
	spoolUse
)

func (u redisUse) String() string {
	if u == spoolUse {
		return "spool"
	}
	return "replay"
}

// redisHealth holds the guards of a client's stores.
type redisHealth struct {
	mu     sync.Mutex
	guards map[string]*redisGuard // by use and key prefix
	// allowEviction: the URL says allow_eviction=true, so that an evicting
	// Redis is used anyway, with a WARN.
	allowEviction bool
}

// guard is the guard of the store that uses c so, under prefix.
func (c *redisClient) guard(use redisUse, prefix string) *redisGuard {
	c.health.mu.Lock()
	defer c.health.mu.Unlock()
	key := use.String() + "|" + prefix
	if g, ok := c.health.guards[key]; ok {
		return g
	}
	if c.health.guards == nil {
		c.health.guards = make(map[string]*redisGuard)
	}
	g := &redisGuard{client: c, use: use, prefix: prefix}
	c.health.guards[key] = g
	return g
}

// redisGuard checks a Redis for one store.
type redisGuard struct {
	client *redisClient
	use    redisUse
	prefix string

	checking sync.Mutex
	verdict  atomic.Pointer[redisVerdict] // nil: none that holds
	logged   atomic.Pointer[string]       // the problem last logged
}

// redisVerdict is what a check found, and when.
type redisVerdict struct {
	at  time.Time
	err error // nil: fine; else a *redisProblem
}

// redisProblem is what makes a Redis unfit for a store: the server's
// settings or this module's permissions there. fatal problems refuse the
// config when they are found at provisioning.
type redisProblem struct {
	msg   string
	fatal bool
}

func (p *redisProblem) Error() string { return p.msg }

// usable says whether the store may write now: nil, or the problem that
// keeps it from writing. A Redis that does not answer is not the guard's to
// say: the store's own call fails.
func (g *redisGuard) usable(ctx context.Context) error {
	v := g.verdict.Load()
	if v != nil && time.Since(v.at) < redisRecheck {
		return v.err
	}
	if !g.checking.TryLock() {
		if v != nil {
			return v.err // another request checks it now
		}
		g.checking.Lock()
	}
	defer g.checking.Unlock()
	if now := g.verdict.Load(); now != v && now != nil {
		return now.err
	}
	err := g.check(ctx)
	if _, ok := errors.AsType[*redisProblem](err); ok {
		return err
	}
	return nil
}

// stale drops the verdict after a failed call: Redis may have restarted,
// with other settings.
func (g *redisGuard) stale() { g.verdict.Store(nil) }

// check checks the server now. It returns a *redisProblem, or an error when
// Redis did not answer (and keeps no verdict then), or nil.
func (g *redisGuard) check(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*redisTimeout)
	defer cancel()
	problem, err := g.inspect(ctx)
	if err != nil {
		g.verdict.Store(nil)
		return err
	}
	v := &redisVerdict{at: time.Now()}
	if problem != nil {
		v.err = problem // not a nil *redisProblem in an error
	}
	g.verdict.Store(v)
	g.report(problem)
	return v.err
}

// report logs a problem once, and that it is gone once.
func (g *redisGuard) report(problem *redisProblem) {
	msg := ""
	if problem != nil {
		msg = problem.msg
	}
	old := g.logged.Swap(&msg)
	if old != nil && *old == msg || old == nil && msg == "" {
		return
	}
	log := caddy.Log().Named("http.handlers.trivialsec_webhook").With(zap.String("store", g.use.String()), zap.String("key_prefix", g.prefix))
	if msg == "" {
		log.Info("redis: the problem found before is gone: the store writes again")
		return
	}
	what := "the spool writes nothing: a delivery the next handler failed gets that failure"
	if g.use == replayUse {
		what = "deliveries are refused with 503 (replay_store_unavailable), or held on this instance's disk when the spool is on"
	}
	log.Error("redis: "+msg+": "+what, zap.Bool("fatal", problem.fatal))
}

// inspect reads the server's settings, and probes every command the store
// needs on keys under its prefix.
func (g *redisGuard) inspect(ctx context.Context) (*redisProblem, error) {
	info, err := g.client.Info(ctx, "memory", "cluster").Result()
	switch {
	case isPermissionError(err):
		return &redisProblem{fatal: true, msg: "the Redis user may not run INFO, which tells whether Redis may evict what the store keeps: " +
			"allow it (add +info to the user's ACL rules; see SECURITY.md)"}, nil
	case err != nil:
		return nil, err
	}
	setting := func(name string) string {
		for line := range strings.Lines(info) {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+":"); ok {
				return v
			}
		}
		return ""
	}
	if setting("cluster_enabled") == "1" {
		return &redisProblem{fatal: true, msg: "Redis Cluster is not supported (each script of the store works on keys of several hash slots): " +
			"use one Redis, or a primary with replicas under Sentinel"}, nil
	}
	if denied, err := g.probe(ctx); err != nil || len(denied) > 0 {
		switch {
		case isKeyPermissionError(err):
			return &redisProblem{fatal: true, msg: fmt.Sprintf("the Redis user may not use keys under %q, where the %s store keeps its own: "+
				"allow them in the user's key pattern (~%s*), or give the store a prefix the pattern allows (see SECURITY.md)", g.prefix, g.use, g.prefix)}, nil
		case isPermissionError(err):
			return &redisProblem{fatal: true, msg: "the Redis user may not run scripts (EVAL, EVALSHA), which the " + g.use.String() +
				" store needs: allow +@scripting (see SECURITY.md)"}, nil
		case err != nil:
			return nil, err
		}
		return &redisProblem{fatal: true, msg: fmt.Sprintf("the Redis user may not run %s on keys under %q, which the %s store needs: "+
			"allow them in the user's ACL rules (see SECURITY.md)", strings.Join(denied, ", "), g.prefix, g.use)}, nil
	}
	if g.client.waitReplicas > 0 {
		// WAIT, which wait_replicas adds after each write, cannot run in
		// a script: try it on its own (0 replicas: it answers at once).
		if err := g.client.Do(ctx, "WAIT", 0, 1).Err(); isPermissionError(err) {
			return &redisProblem{fatal: true, msg: "the Redis user may not run WAIT, which wait_replicas needs: allow +@connection (see SECURITY.md)"}, nil
		} else if err != nil {
			return nil, err
		}
	}
	policy := setting("maxmemory_policy")
	if policy != "" && policy != "noeviction" {
		if g.client.health.allowEviction {
			g.warnEviction(policy)
			return nil, nil
		}
		return &redisProblem{msg: fmt.Sprintf("maxmemory-policy is %s, so Redis may evict what the %s store keeps (spooled deliveries already answered 202, "+
			"replay reservations: copies would pass): set maxmemory-policy noeviction (CONFIG SET maxmemory-policy noeviction, "+
			"and in redis.conf), or add allow_eviction=true to the URL to use it anyway", policy, g.use)}, nil
	}
	return nil, nil
}

// warnEviction says, once per policy, that eviction is allowed by the URL.
func (g *redisGuard) warnEviction(policy string) {
	msg := "evict:" + policy
	if old := g.logged.Swap(&msg); old != nil && *old == msg {
		return
	}
	caddy.Log().Named("http.handlers.trivialsec_webhook").Warn("redis: maxmemory-policy is not noeviction, and the URL allows it (allow_eviction=true): Redis may evict spooled deliveries and replay reservations",
		zap.String("store", g.use.String()), zap.String("key_prefix", g.prefix), zap.String("maxmemory_policy", policy))
}

// probeCommands are the commands each store runs, as the probe calls them:
// %s is a key under the store's prefix that nothing else uses.
var probeCommands = map[redisUse]string{
	replayUse: `
try('SET', k, '1', 'NX', 'PX', 60000)
try('GET', k)
try('DEL', k)`,
	spoolUse: `
try('HSET', k..'h', 'f', '1')
try('HGET', k..'h', 'f')
try('HMGET', k..'h', 'f')
try('HGETALL', k..'h')
try('HKEYS', k..'h')
try('HINCRBY', k..'h', 'n', 1)
try('HDEL', k..'h', 'n')
try('HSETNX', k..'h', 'm', '1')
try('SADD', k..'s', 'x')
try('SREM', k..'s', 'x')
try('SMEMBERS', k..'s')
try('SSCAN', k..'s', 0, 'COUNT', 10)
try('ZADD', k..'z', 1, 'x')
try('ZSCORE', k..'z', 'x')
try('ZCARD', k..'z')
try('ZRANGE', k..'z', 0, 0, 'WITHSCORES')
try('ZCOUNT', k..'z', 0, 1)
try('ZSCAN', k..'z', 0, 'COUNT', 10)
try('ZREM', k..'z', 'x')
try('ZREMRANGEBYSCORE', k..'z', 0, 1)
try('SET', k..'k', 'v', 'NX', 'PX', 60000)
try('GET', k..'k')
try('EXISTS', k..'k')
try('PEXPIRE', k..'k', 60000)
try('PTTL', k..'k')
try('XGROUP', 'CREATE', k..'x', 'g', '0', 'MKSTREAM')
try('XADD', k..'x', '*', 'id', 'probe')
try('XREADGROUP', 'GROUP', 'g', 'c', 'COUNT', 1, 'STREAMS', k..'x', '>')
try('XPENDING', k..'x', 'g', '-', '+', 1)
try('XRANGE', k..'x', '-', '+', 'COUNT', 1)
try('XCLAIM', k..'x', 'g', 'c', 0, '0-1', 'JUSTID')
try('XACK', k..'x', 'g', '0-1')
try('XDEL', k..'x', '0-1')
try('XINFO', 'CONSUMERS', k..'x', 'g')
try('XGROUP', 'DELCONSUMER', k..'x', 'g', 'c')
try('TIME')
try('DEL', k..'h', k..'s', k..'z', k..'k', k..'x')`,
}

// probe runs every command of the store in one script, on keys of its own,
// and returns those Redis would not let it run.
func (g *redisGuard) probe(ctx context.Context) ([]string, error) {
	script := `
local k = KEYS[1]
local denied = {}
local function try(...)
	local r = redis.pcall(...)
	if type(r) == 'table' and r.err and (string.find(r.err, 'NOPERM', 1, true) or string.find(r.err, "can't run this command", 1, true) or
		string.find(r.err, "can't access at least one of the keys", 1, true)) then
		local name = select(1, ...)
		if name == 'XGROUP' or name == 'XINFO' then name = name .. ' ' .. select(2, ...) end
		table.insert(denied, name)
	end
end` + probeCommands[g.use] + `
return denied`
	key := g.prefix + "probe:" + randomHex(8)
	res, err := g.client.Eval(ctx, script, []string{key}).StringSlice()
	if err != nil {
		return nil, err
	}
	return res, nil
}

// isPermissionError reports whether Redis refused a command under its ACL:
// the command, or a key it names (in a script, Redis 7 says so in words of
// its own).
func isPermissionError(err error) bool {
	return err != nil && (strings.HasPrefix(err.Error(), "NOPERM") || strings.Contains(err.Error(), "can't run this command") ||
		isKeyPermissionError(err))
}

// isKeyPermissionError reports whether Redis refused a command for a key
// outside the user's key patterns.
func isKeyPermissionError(err error) bool {
	return err != nil && (strings.HasPrefix(err.Error(), "NOPERM") && strings.Contains(err.Error(), "key") ||
		strings.Contains(err.Error(), "can't access at least one of the keys"))
}

// outcomeUnknown reports whether a call that failed with err may still have
// run, or run later: Redis did not answer in time, or the connection broke
// after the call was sent. An error reply is an answer: the call did not
// run. A call that never left (no connection could be made) is taken as
// unknown too: go-redis does not say which it was.
func outcomeUnknown(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, errNotReplicated) {
		return true // written on the primary, maybe lost in a failover
	}
	if _, ok := errors.AsType[*redisProblem](err); ok {
		return false // the guard wrote nothing
	}
	_, reply := errors.AsType[redis.Error](err)
	return !reply
}
