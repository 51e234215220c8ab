package trivialsecwebhook

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// The Redis store: one spool shared by every instance that names the same
// Redis and key prefix, so that an instance that dies for good takes no
// delivery with it (docs/several-instances.md).
//
// Keys, after the prefix:
//
//	entry:<event ID>  hash: meta (JSON, as spooled), request (JSON), body,
//	                  size (what it counts toward max_size), account,
//	                  event (its name) and bytes (the request's and the
//	                  body's, as its meta's size); and
//	                  what changes: state, attempts, spooled and next (Unix
//	                  ms, Redis's clock), error, rev (bumped by an admin
//	                  retry)
//	ids               set: every event ID the spool holds
//	stats             hash: pending, dead, bytes, pending:<account>, and
//	                  per index n:<state>:<sfx> and bytes:<state>:<sfx>
//	waiting           sorted set: the pending entries, by spooled ms
//	idx:<state>:<sfx> sorted set: the entries stored as state (pending or
//	                  dead) of an event name and account (sfx:
//	                  indexSuffix), by spooled ms: what the admin API's
//	                  pages read; an entry is in one once its hash has
//	                  an event field
//	due:<account>     sorted set: the account's pending entries, by next
//	                  attempt
//	stream:<account>  stream of turns, each naming an entry and its rev
//	consumer:<name>   the lease on an instance's consumer name: the proof
//	                  that the instance lives, for its own claim_after +
//	                  attempt_timeout
//	served:<account>  sorted set: the consumers that serve the account,
//	                  each until when (Redis's clock)
//	done:<event ID>   a delivered or deleted entry, for a day: a late write
//	                  of it (one whose outcome was unknown) adds nothing
//
// Each stream has one consumer group, and each instance is a consumer of
// it. The instance that reads a turn holds its entry: the turn stays in its
// pending list, through every backoff, until the entry is delivered or
// becomes a dead letter, or the instance stops and hands it back (a new
// turn). An instance reads only as many turns as its workers can attempt
// soon, and hands back the due entries it cannot attempt soon when another
// instance serves their account. The turns of an instance whose lease is
// gone (it died, or lost Redis for its claim_after + attempt_timeout) are
// taken over by another; those of a live one, never. Every script checks,
// in Redis, that the turn is still this instance's, that this instance
// still holds its lease, and that the turn is still the entry's current
// one, before it acts on it; an attempt starts only while the lease has
// more than attempt_timeout to live, so that it ends before the lease can
// lapse. Every time another instance reads (spooled, next) is Redis's, and
// each instance schedules by the difference between Redis's clock and its
// own.

// redisSpoolGroup is the consumer group of every stream.
const redisSpoolGroup = "trivialsec_webhook"

// redisReadBlock is how long a read waits for new turns: also how long
// the store takes to stop, and to start reading a new account's stream.
const redisReadBlock = 250 * time.Millisecond

// redisBatch bounds what one call reads, claims, renews or hands back.
const redisBatch = 128

// redisDoneTTL is how long a delivered or deleted entry's tombstone lasts
// at least: longer than a token lives, and so than a write of it can be
// held. An entry whose token expires later keeps its tombstone until
// redisDoneMargin after its exp.
const redisDoneTTL = 24 * time.Hour

// redisDoneMargin is how long a tombstone outlives its token's exp: more
// than any sane leeway (which the spool does not know: it is the
// handler's).
const redisDoneMargin = time.Hour

// redisClockRoundTrip is the longest round trip of a TIME call whose answer
// measures Redis's clock: a longer one says little of when Redis read it.
const redisClockRoundTrip = 50 * time.Millisecond

// redisServedTTL is how long an account's set of serving consumers lasts
// once no instance renews it.
const redisServedTTL = 24 * time.Hour

// redisEntryOverhead is what Redis spends on an entry beyond the bytes of
// its fields' values: the hash's key, fields and encoding, its turn in the
// stream, its members of the ids set and of the waiting, index and due
// sorted sets (measured with INFO memory on Redis 7, jemalloc:
// TestRedisSpoolCountsWhatRedisHolds; the index and due members, and the
// event and bytes fields, about 310 B).
const redisEntryOverhead = 1610

type redisSpool struct {
	*scheduler // its index: the entries this instance holds
	client     *redisClient
	guard      *redisGuard // says whether the store may write to this Redis (redis_check.go)
	prefix     string
	now        func() time.Time // this instance's clock

	openMu sync.Mutex
	opened bool
	name   string                     // the consumer name this instance wants: host and Caddy instance ID
	lease  string                     // the random value of our lease on consumer:<name>
	down   atomic.Bool                // Redis did not answer the last call
	last   atomic.Pointer[spoolStats] // what stats read last
	skew   atomic.Int64               // Redis's clock minus ours, in ms, as last measured

	leaseMu sync.Mutex // one keepLease at a time

	// Under countMu: whether the per-account counts were made since the
	// store started, when they may be made again after a count that did
	// not fit (the spool changed meanwhile), and how long it waits then.
	countMu    sync.Mutex
	counted    bool
	countAfter time.Time
	countWait  time.Duration
	// The read loop's: when it last compared our pending turns with the
	// index.
	checkedAt time.Time

	refusedMu sync.Mutex
	refused   map[string]string // what Redis refuses, and its reply, as logged

	// Under mu: our consumer name while we hold its lease ("" until then),
	// the accounts whose streams we read, with their own turns read back at
	// start, those we marked as served, those another live instance
	// serves, and the entries of accounts we no longer serve that we could
	// not hand back yet (out of the index).
	consumer string
	reading  map[string]bool
	marked   map[string]bool
	others   map[string]bool
	giveBack []spoolMeta

	// The accounts with waiting entries that this instance does not serve,
	// and what it said of them.
	unservedMu sync.Mutex
	unserved   map[string]*unservedNote
}

// unservedNote is what a Redis store knows of an account it does not serve
// and whose entries wait: whether another instance serves it, how many
// rounds in a row that held, and whether it said so.
type unservedNote struct {
	elsewhere bool
	rounds    int
	logged    bool
}

// loadRedisSpool takes the store of rawURL and prefix over from an earlier
// config, or makes it, and returns it with its key in spools.
func loadRedisSpool(rawURL, prefix string, policy spoolPolicy) (*redisSpool, string, error) {
	key := "redis:" + prefix + "|" + rawURL
	v, _, err := spools.LoadOrNew(key, func() (caddy.Destructor, error) {
		client, err := loadRedisClient(rawURL)
		if err != nil {
			return nil, fmt.Errorf("spool redis: %w", err)
		}
		return newRedisSpool(client, prefix, policy), nil
	})
	if err != nil {
		return nil, "", err
	}
	s := v.(*redisSpool)
	s.setPolicy(policy)
	return s, key, nil
}

func newRedisSpool(client *redisClient, prefix string, policy spoolPolicy) *redisSpool {
	s := &redisSpool{client: client, guard: client.guard(spoolUse, prefix), prefix: prefix, now: time.Now, refused: make(map[string]string),
		reading: make(map[string]bool), marked: make(map[string]bool), others: make(map[string]bool),
		unserved: make(map[string]*unservedNote)}
	s.scheduler = newScheduler(s, true, policy)
	s.last.Store(new(spoolStats))
	return s
}

func (s *redisSpool) entryKey(id string) string       { return s.prefix + "entry:" + id }
func (s *redisSpool) streamKey(account string) string { return s.prefix + "stream:" + account }
func (s *redisSpool) leaseKey(name string) string     { return s.prefix + "consumer:" + name }
func (s *redisSpool) servedKey(account string) string { return s.prefix + "served:" + account }
func (s *redisSpool) doneKey(id string) string        { return s.prefix + "done:" + id }

// indexSuffix names the indexes of the entries of an event name and
// account: the event name's length first, so that the name may hold a
// colon and the suffix still parses (parseIndexSuffix).
func indexSuffix(event, account string) string {
	return strconv.Itoa(len(event)) + ":" + event + ":" + account
}

// parseIndexSuffix is the event name and account of an index suffix.
func parseIndexSuffix(sfx string) (event, account string, ok bool) {
	n, rest, ok := strings.Cut(sfx, ":")
	size, err := strconv.Atoi(n)
	if !ok || err != nil || size < 0 || len(rest) < size+1 || rest[size] != ':' {
		return "", "", false
	}
	return rest[:size], rest[size+1:], true
}

// indexKey is the index of the entries stored as state (pending or dead)
// of an index suffix.
func (s *redisSpool) indexKey(state, sfx string) string { return s.prefix + "idx:" + state + ":" + sfx }

// dueKey is the account's pending entries, by next attempt.
func (s *redisSpool) dueKey(account string) string { return s.prefix + "due:" + account }

// indexKeys are the keys a script that may move an entry between states
// needs: its pending and dead indexes, and its account's due; and its
// index suffix.
func (s *redisSpool) indexKeys(event, account string) (keys []string, sfx string) {
	sfx = indexSuffix(event, account)
	return []string{s.indexKey(statePending, sfx), s.indexKey(stateDead, sfx), s.dueKey(account)}, sfx
}

// log is the store's logger: Caddy's current one.
func (s *redisSpool) log() *zap.Logger {
	return caddy.Log().Named("http.handlers.trivialsec_webhook").With(s.logFields()...)
}

func (s *redisSpool) logFields() []zap.Field {
	return []zap.Field{zap.String("spool", "redis"), zap.String("key_prefix", s.prefix)}
}

// up is true: each write tells its caller whether Redis took it, and a
// delivery Redis did not take gets the next handler's failure.
func (s *redisSpool) up() bool { return true }

// ctx bounds one Redis call, and ends when the store stops.
func (s *redisSpool) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(s.stopped, redisTimeout)
}

// note records what came of a Redis call, named by what (the command, or
// the script and the commands it runs), and returns err: Redis answered;
// Redis refused it (an error reply: a permission, its memory, its disk...),
// which is logged at ERROR once, with the reply and what to do; or Redis did
// not answer (the network, a timeout), one WARN per outage.
func (s *redisSpool) note(what string, err error) error {
	switch {
	case err == nil || errors.Is(err, redis.Nil):
		s.answering()
		s.accepted(what)
	case s.stopped.Err() != nil:
	case errors.Is(err, errNotReplicated):
		s.answering()
		s.refusedWith(what, err.Error(), zapcore.WarnLevel,
			"spool: redis ran a write, but fewer replicas than wait_replicas confirmed it: the spool treats it as not done, and tries again")
	default:
		reply, ok := errors.AsType[redis.Error](err)
		if !ok {
			s.failing(err)
			return err
		}
		s.answering() // with a refusal
		level, advice := redisReplyAdvice(reply)
		s.refusedWith(what, reply.Error(), level, "spool: redis refuses a command the spool needs: "+advice)
	}
	return err
}

// redisReplyAdvice says what an error reply of Redis means for the spool,
// and what to do.
func redisReplyAdvice(reply redis.Error) (zapcore.Level, string) {
	switch {
	case isPermissionError(reply):
		return zapcore.ErrorLevel, "the Redis user may not run it: give the user the ACL rules in SECURITY.md, which allow every command the spool and its scripts run; until then the spool cannot do what it names (a delivery held by an instance that died is not taken over, a spooled delivery is not delivered)"
	case redis.IsAuthError(reply):
		return zapcore.ErrorLevel, "Redis refuses the user or password of the URL: check them"
	case redis.IsReadOnlyError(reply):
		return zapcore.ErrorLevel, "the URL names a read-only replica: give the primary's address (or the Sentinels', with master_name)"
	case redis.IsOOMError(reply):
		return zapcore.ErrorLevel, "Redis has reached maxmemory: raise it, or drain the spool; deliveries that need the spool get the failure the next handler gave"
	case redis.HasErrorPrefix(reply, "MISCONF"):
		return zapcore.ErrorLevel, "Redis cannot write its data to disk, and refuses writes: see Redis's log"
	case redis.IsLoadingError(reply), redis.HasErrorPrefix(reply, "BUSY"), redis.IsTryAgainError(reply), redis.IsMasterDownError(reply):
		return zapcore.WarnLevel, "Redis cannot serve it for now (loading its data, a script running too long, or its primary away): the spool waits"
	case redis.HasErrorPrefix(reply, "NOGROUP"):
		return zapcore.WarnLevel, "a stream or its consumer group is gone (did Redis lose its data?): the spool makes them again"
	case redis.HasErrorPrefix(reply, "MOVED"), redis.HasErrorPrefix(reply, "ASK"), redis.HasErrorPrefix(reply, "CROSSSLOT"), redis.IsClusterDownError(reply):
		return zapcore.ErrorLevel, "Redis Cluster is not supported: use one Redis, or a primary with replicas under Sentinel"
	}
	return zapcore.ErrorLevel, "see Redis's reply"
}

// refusedWith logs, once until it is accepted again, that Redis refuses
// what; another reply to it is logged too.
func (s *redisSpool) refusedWith(what, reply string, level zapcore.Level, msg string) {
	s.refusedMu.Lock()
	logged := s.refused[what] == reply
	s.refused[what] = reply
	s.refusedMu.Unlock()
	if !logged {
		s.log().Log(level, msg, zap.String("command", what), zap.String("reply", reply))
	}
}

// accepted notes that Redis ran what: if it refused it before, that is
// over.
func (s *redisSpool) accepted(what string) {
	s.refusedMu.Lock()
	_, was := s.refused[what]
	delete(s.refused, what)
	s.refusedMu.Unlock()
	if was {
		s.log().Info("spool: redis runs again what it refused", zap.String("command", what))
	}
}

// failing notes that Redis did not answer: one WARN per outage, and the
// callers wait storeDownWait before they try again.
func (s *redisSpool) failing(err error) {
	if s.stopped.Err() != nil {
		return
	}
	if s.down.CompareAndSwap(false, true) {
		s.log().Warn("spool: redis does not answer: re-drive waits for it, and deliveries that need the spool get the failure the next handler gave", zap.Error(err))
	}
}

// answering notes that Redis answers again.
func (s *redisSpool) answering() {
	if s.down.CompareAndSwap(true, false) {
		s.log().Info("spool: redis answers again: re-drive resumes")
	}
}

// redisScript is a script of the store, with what the log calls it: its
// name and the commands it runs, so that a refusal names them.
type redisScript struct {
	*redis.Script
	name string
}

func newRedisScript(name, src string) *redisScript {
	return &redisScript{Script: redis.NewScript(redisPrelude + src), name: name}
}

// run runs a script, and notes what came of it.
func (s *redisSpool) run(ctx context.Context, sc *redisScript, keys []string, args ...any) *redis.Cmd {
	cmd := s.client.eval(ctx, sc.Script, keys, args...)
	s.note(sc.name, cmd.Err())
	return cmd
}

// measureClock measures Redis's clock against ours (s.now) with a TIME
// call. A sample whose round trip took longer than redisClockRoundTrip,
// or whose answer did not parse, is not taken: the last one stands.
func (s *redisSpool) measureClock() {
	ctx, cancel := s.ctx()
	defer cancel()
	before := s.now()
	t, err := s.client.Time(ctx).Result()
	after := s.now()
	if s.note("TIME", err) != nil || t.IsZero() || after.Sub(before) > redisClockRoundTrip {
		return
	}
	mid := before.Add(after.Sub(before) / 2)
	s.skew.Store(t.UnixMilli() - mid.UnixMilli())
}

// local is a time of Redis's clock (Unix ms) on ours; zero stays zero.
func (s *redisSpool) local(ms int64) time.Time {
	if ms == 0 {
		return time.Time{}
	}
	return time.UnixMilli(ms - s.skew.Load())
}

// start starts reading turns, renewing claims and taking over those of
// instances that died. It needs no answer from Redis: the loops wait for
// one.
func (s *redisSpool) start() error {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "localhost"
	}
	id, err := caddy.InstanceID()
	if err != nil {
		return fmt.Errorf("spool redis: Caddy's instance ID, which names this instance's consumer: %v", err)
	}
	s.startAs(host + "/" + id.String())
	return nil
}

// startAs starts the loops under the consumer name name, once.
func (s *redisSpool) startAs(name string) {
	s.openMu.Lock()
	defer s.openMu.Unlock()
	if s.opened {
		return
	}
	s.name, s.lease = name, randomHex(16)
	s.opened = true
	s.workers.Add(4)
	go s.redriveLoop()
	go s.leaseLoop()
	go s.readLoop()
	go s.keepLoop()
}

// Destruct stops the loops, hands the turns this instance held back to the
// other instances, says it serves no account any more, gives up the
// consumer name, and lets go of the client, with the last config using the
// store. A turn it could not hand back (Redis did not answer) is taken over
// once its lease has expired, after claim_after + attempt_timeout.
func (s *redisSpool) Destruct() error {
	s.finish()
	s.workers.Wait() // no attempt is under way now
	s.mu.Lock()
	consumer := s.consumer
	held := make([]spoolMeta, 0, len(s.entries)+len(s.giveBack))
	for _, m := range s.entries {
		held = append(held, *m)
	}
	held = append(held, s.giveBack...)
	marked := make([]string, 0, len(s.marked))
	for account := range s.marked {
		marked = append(marked, account)
	}
	s.mu.Unlock()
	if consumer != "" {
		ctx, cancel := context.WithTimeout(context.Background(), handBackTimeout)
		n, _ := s.handBack(ctx, consumer, held)
		if n > 0 {
			s.log().Info("spool: handed the deliveries this instance held back to the other instances", zap.Int("entries", n))
		}
		if len(marked) > 0 {
			ops := make(map[string]string, len(marked))
			for _, account := range marked {
				ops[account] = "unmark"
			}
			_, _ = s.served(ctx, consumer, 0, ops)
		}
		_ = s.run(ctx, redisReleaseScript, []string{s.leaseKey(consumer)}, s.lease).Err()
		cancel()
	}
	return s.client.release()
}

// handBackTimeout bounds the hand-back when the store stops.
const handBackTimeout = 5 * time.Second

// handBack ends the turns of held, none of them in flight nor in the
// index, and adds a new turn for each, which any instance may read at once.
// It returns how many it handed back, and those it could not, Redis not
// answering.
func (s *redisSpool) handBack(ctx context.Context, consumer string, held []spoolMeta) (n int, left []spoolMeta) {
	byAccount := make(map[string][]spoolMeta)
	for _, m := range held {
		byAccount[m.Account] = append(byAccount[m.Account], m)
	}
	for account, metas := range byAccount {
		for chunk := range slices.Chunk(metas, redisBatch) {
			if left != nil {
				left = append(left, chunk...)
				continue
			}
			keys, args := s.turnBatch(account, consumer, chunk, func(m spoolMeta) []any {
				return []any{m.turn, m.rev, m.EventID.String()}
			})
			k, err := s.run(ctx, redisHandBackScript, keys, args...).Int()
			if err != nil {
				left = append(left, chunk...)
				continue
			}
			n += k
		}
	}
	return n, left
}

// turnBatch is the keys and arguments of a script that acts, as consumer
// under its lease, on turns of one account's stream: KEYS the stream, the
// lease, then the entries of metas; ARGV the group, consumer, the lease's
// value, then what each gives of its entry.
func (s *redisSpool) turnBatch(account, consumer string, metas []spoolMeta, each func(m spoolMeta) []any) ([]string, []any) {
	keys := make([]string, 0, 2+len(metas))
	keys = append(keys, s.streamKey(account), s.leaseKey(consumer))
	args := []any{redisSpoolGroup, consumer, s.lease}
	for _, m := range metas {
		keys = append(keys, s.entryKey(m.EventID.String()))
		args = append(args, each(m)...)
	}
	return keys, args
}

// redisPrelude is joined to the front of every script: now() is Redis's
// clock (TIME) in Unix ms; holds(lease, value) whether the lease holds that
// value (the instance that runs the script still holds it); tally(stats,
// state, sfx, n, size) adds n entries of size bytes each (n may be -1) to
// the counts of an index (stats fields n:<state>:<sfx> and
// bytes:<state>:<sfx>), and deletes both when none is left.
const redisPrelude = `local function now()
	local t = redis.call('TIME')
	return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function holds(lease, value)
	return redis.call('GET', lease) == value
end
local function tally(stats, state, sfx, n, size)
	local f = state .. ':' .. sfx
	if redis.call('HINCRBY', stats, 'n:' .. f, n) <= 0 then
		redis.call('HDEL', stats, 'n:' .. f, 'bytes:' .. f)
	else
		redis.call('HINCRBY', stats, 'bytes:' .. f, n * tonumber(size))
	end
end
`

// The scripts. Each acts on one entry and its turn at once (or a batch, one
// by one), so that no other instance's script runs in between. Times that
// other instances read are Redis's: TIME. A script that acts on a turn
// this instance holds does so only while the instance holds its lease.
var (
	// KEYS: entry, ids, stats, stream, done, waiting, the entry's pending
	// index, its account's due. ARGV: event ID, meta, request, body, size, account, ms
	// until due, max_size, attempts, error, ms since spooled, event name,
	// index suffix, bytes. 'done': delivered or deleted already.
	redisAddScript = newRedisScript("the spool's add script (HGET, EXISTS, HSET, SADD, HINCRBY, HDEL, TIME, XADD, ZADD)", `
local state = redis.call('HGET', KEYS[1], 'state')
if state then return state end
if redis.call('EXISTS', KEYS[5]) == 1 then return 'done' end
local bytes = tonumber(redis.call('HGET', KEYS[3], 'bytes') or '0')
if bytes + tonumber(ARGV[5]) > tonumber(ARGV[8]) then return 'full' end
local t = now()
local spooled = t - tonumber(ARGV[11])
redis.call('HSET', KEYS[1], 'meta', ARGV[2], 'request', ARGV[3], 'body', ARGV[4], 'size', ARGV[5],
	'account', ARGV[6], 'state', 'pending', 'attempts', ARGV[9], 'next', t + tonumber(ARGV[7]),
	'spooled', spooled, 'error', ARGV[10], 'rev', 1, 'event', ARGV[12], 'bytes', ARGV[14])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[6], spooled, ARGV[1])
redis.call('ZADD', KEYS[7], spooled, ARGV[1])
redis.call('ZADD', KEYS[8], t + tonumber(ARGV[7]), ARGV[1])
tally(KEYS[3], 'pending', ARGV[13], 1, ARGV[14])
redis.call('HINCRBY', KEYS[3], 'bytes', ARGV[5])
redis.call('HINCRBY', KEYS[3], 'pending', 1)
redis.call('HINCRBY', KEYS[3], 'pending:' .. ARGV[6], 1)
redis.call('XADD', KEYS[4], '*', 'id', ARGV[1], 'rev', 1)
return 'ok'`)

	// KEYS: stream, lease, entry. ARGV: group, consumer, lease value, turn,
	// rev, attempt_timeout in ms. Renews the claim and returns the request
	// and body, if the turn is ours and the entry's current one, and our
	// lease lives longer than an attempt; a stale turn is acknowledged and
	// deleted. 'lost': the turn or the lease is not ours; 'short': the
	// lease may lapse before an attempt ends.
	redisTakeScript = newRedisScript("the spool's take script (GET, PTTL, XPENDING, HMGET, XACK, XDEL, XCLAIM)", `
if not holds(KEYS[2], ARGV[3]) then return {'lost'} end
if redis.call('PTTL', KEYS[2]) <= tonumber(ARGV[6]) then return {'short'} end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[4], ARGV[4], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return {'lost'} end
local cur = redis.call('HMGET', KEYS[3], 'rev', 'state', 'request', 'body')
if cur[1] ~= ARGV[5] or cur[2] ~= 'pending' then
	redis.call('XACK', KEYS[1], ARGV[1], ARGV[4])
	redis.call('XDEL', KEYS[1], ARGV[4])
	return {'stale'}
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[4], 'JUSTID')
return {'ok', cur[3], cur[4]}`)

	// KEYS and ARGV: turnBatch's, each entry with its turn and rev. Renews
	// the claims that are still ours, and returns for each entry 1
	// (renewed), 0 (another instance holds it, or our lease is gone) or -1
	// (stale: acknowledged and deleted).
	redisRenewScript = newRedisScript("the spool's renew script (GET, XPENDING, HMGET, XACK, XDEL, XCLAIM)", `
local out = {}
local mine = holds(KEYS[2], ARGV[3])
for i = 1, #KEYS - 2 do
	local turn, rev = ARGV[2*i + 2], ARGV[2*i + 3]
	out[i] = 0
	local p = {}
	if mine then p = redis.call('XPENDING', KEYS[1], ARGV[1], turn, turn, 1) end
	if #p > 0 and p[1][2] == ARGV[2] then
		local cur = redis.call('HMGET', KEYS[i + 2], 'rev', 'state')
		if cur[1] ~= rev or cur[2] ~= 'pending' then
			redis.call('XACK', KEYS[1], ARGV[1], turn)
			redis.call('XDEL', KEYS[1], turn)
			out[i] = -1
		else
			redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, turn, 'JUSTID')
			out[i] = 1
		end
	end
end
return out`)

	// KEYS: entry, stats, stream, lease, waiting, the entry's pending and
	// dead indexes, its account's due. ARGV: group, consumer, turn, rev, state, attempts,
	// ms until due, error, lease value, event ID, index suffix. Saves a
	// failed attempt's outcome, if the turn and the lease are ours; a dead
	// letter's turn ends. An entry without an event field is in no index
	// yet (an earlier version wrote it): count back-fills it.
	redisFailedScript = newRedisScript("the spool's failed-attempt script (GET, XPENDING, HMGET, XACK, XDEL, TIME, HSET, HINCRBY, HDEL, ZADD, ZREM)", `
if not holds(KEYS[4], ARGV[9]) then return 0 end
local p = redis.call('XPENDING', KEYS[3], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
local cur = redis.call('HMGET', KEYS[1], 'rev', 'state', 'account', 'event', 'bytes', 'spooled')
if cur[1] ~= ARGV[4] or cur[2] ~= 'pending' then
	redis.call('XACK', KEYS[3], ARGV[1], ARGV[3])
	redis.call('XDEL', KEYS[3], ARGV[3])
	return 0
end
local next = 0
if ARGV[5] == 'pending' then next = now() + tonumber(ARGV[7]) end
redis.call('HSET', KEYS[1], 'state', ARGV[5], 'attempts', ARGV[6], 'next', next, 'error', ARGV[8])
if ARGV[5] == 'pending' then
	if cur[4] then redis.call('ZADD', KEYS[8], next, ARGV[10]) end
else
	redis.call('HINCRBY', KEYS[2], 'pending', -1)
	redis.call('HINCRBY', KEYS[2], 'pending:' .. cur[3], -1)
	redis.call('HINCRBY', KEYS[2], ARGV[5], 1)
	redis.call('ZREM', KEYS[5], ARGV[10])
	redis.call('ZREM', KEYS[8], ARGV[10])
	if cur[4] then
		redis.call('ZREM', KEYS[6], ARGV[10])
		redis.call('ZADD', KEYS[7], cur[6], ARGV[10])
		tally(KEYS[2], 'pending', ARGV[11], -1, cur[5])
		tally(KEYS[2], ARGV[5], ARGV[11], 1, cur[5])
	end
	redis.call('XACK', KEYS[3], ARGV[1], ARGV[3])
	redis.call('XDEL', KEYS[3], ARGV[3])
end
return 1`)

	// KEYS: entry, ids, stats, done, waiting, the entry's pending and dead
	// indexes, its account's due, and for a delivery, the stream and our lease. ARGV:
	// event ID, the tombstone's ms to live, 1 if delivered, the index
	// suffix, and for a delivery the group, the turn, our consumer and the
	// lease's value; for a drop, the state it must be in ('': any), 9th.
	// Deletes an entry, delivered or dropped, and
	// leaves its tombstone: a late write of it adds nothing. A delivered
	// entry is deleted whoever holds it now (another attempt at it would
	// deliver it twice); its turn ends if it is ours, under our lease:
	// whoever holds it else meets a stale turn.
	redisDeleteScript = newRedisScript("the spool's delete script (HMGET, DEL, SREM, ZREM, HINCRBY, HDEL, SET, GET, XPENDING, XACK, XDEL)", `
local cur = redis.call('HMGET', KEYS[1], 'state', 'size', 'account', 'event', 'bytes')
if cur[1] and ARGV[9] and ARGV[9] ~= '' and cur[1] ~= ARGV[9] then return 0 end
local n = 0
if cur[1] then
	redis.call('DEL', KEYS[1])
	redis.call('SREM', KEYS[2], ARGV[1])
	redis.call('ZREM', KEYS[5], ARGV[1])
	redis.call('ZREM', KEYS[8], ARGV[1])
	if cur[4] then
		redis.call('ZREM', KEYS[6], ARGV[1])
		redis.call('ZREM', KEYS[7], ARGV[1])
		tally(KEYS[3], cur[1], ARGV[4], -1, cur[5])
	end
	redis.call('HINCRBY', KEYS[3], cur[1], -1)
	redis.call('HINCRBY', KEYS[3], 'bytes', -tonumber(cur[2]))
	if cur[1] == 'pending' and cur[3] then
		redis.call('HINCRBY', KEYS[3], 'pending:' .. cur[3], -1)
	end
	n = 1
end
if n == 1 or ARGV[3] == '1' then
	redis.call('SET', KEYS[4], '1', 'PX', ARGV[2])
end
if KEYS[9] and holds(KEYS[10], ARGV[8]) then
	local p = redis.call('XPENDING', KEYS[9], ARGV[5], ARGV[6], ARGV[6], 1)
	if #p > 0 and p[1][2] == ARGV[7] then
		redis.call('XACK', KEYS[9], ARGV[5], ARGV[6])
		redis.call('XDEL', KEYS[9], ARGV[6])
	end
end
return n`)

	// KEYS: entry, stats, stream, waiting, the entry's pending and dead
	// indexes, its account's due. ARGV: event ID, index suffix. Makes an entry due now
	// under a new rev, with a new turn: the old turn, wherever it is, is
	// stale.
	redisRetryScript = newRedisScript("the spool's retry script (HMGET, HINCRBY, HDEL, TIME, HSET, XADD, ZADD, ZREM)", `
local cur = redis.call('HMGET', KEYS[1], 'state', 'account', 'spooled', 'event', 'bytes')
if not cur[1] then return 0 end
local rev = redis.call('HINCRBY', KEYS[1], 'rev', 1)
local t = now()
redis.call('HSET', KEYS[1], 'state', 'pending', 'next', t)
if cur[4] then redis.call('ZADD', KEYS[7], t, ARGV[1]) end
if cur[1] ~= 'pending' then
	redis.call('HINCRBY', KEYS[2], cur[1], -1)
	redis.call('HINCRBY', KEYS[2], 'pending', 1)
	redis.call('HINCRBY', KEYS[2], 'pending:' .. cur[2], 1)
	redis.call('ZADD', KEYS[4], tonumber(cur[3]) or t, ARGV[1])
	if cur[4] then
		redis.call('ZREM', KEYS[6], ARGV[1])
		redis.call('ZADD', KEYS[5], cur[3], ARGV[1])
		tally(KEYS[2], cur[1], ARGV[2], -1, cur[5])
		tally(KEYS[2], 'pending', ARGV[2], 1, cur[5])
	end
end
redis.call('XADD', KEYS[3], '*', 'id', ARGV[1], 'rev', rev)
return 1`)

	// KEYS: stream. ARGV: group, our consumer, idle ms. Deletes the
	// consumers that hold nothing and were not seen for that long: at once,
	// so that none takes a turn in between and loses it with the consumer.
	redisForgetScript = newRedisScript("the spool's consumer clean-up script (XINFO CONSUMERS, XGROUP DELCONSUMER)", `
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
	local f = {}
	for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
	if f['name'] ~= ARGV[2] and f['pending'] == 0 and f['idle'] > tonumber(ARGV[3]) then
		redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
	end
end
return 0`)

	// KEYS and ARGV: turnBatch's, each entry with its turn, rev and event
	// ID. Under our lease, ends each turn this consumer holds and, if it
	// is the entry's current one, adds a new turn for the same rev, which
	// any consumer may read. Returns how many it added.
	redisHandBackScript = newRedisScript("the spool's hand-back script (GET, XPENDING, XACK, XDEL, HMGET, XADD)", `
if not holds(KEYS[2], ARGV[3]) then return 0 end
local n = 0
for i = 1, #KEYS - 2 do
	local turn, rev, id = ARGV[3*i + 1], ARGV[3*i + 2], ARGV[3*i + 3]
	local p = redis.call('XPENDING', KEYS[1], ARGV[1], turn, turn, 1)
	if #p > 0 and p[1][2] == ARGV[2] then
		redis.call('XACK', KEYS[1], ARGV[1], turn)
		redis.call('XDEL', KEYS[1], turn)
		local cur = redis.call('HMGET', KEYS[i + 2], 'rev', 'state')
		if cur[1] == rev and cur[2] == 'pending' then
			redis.call('XADD', KEYS[1], '*', 'id', id, 'rev', rev)
			n = n + 1
		end
	end
end
return n`)

	// KEYS: the lease. ARGV: its value, its time to live in ms, 1 to take
	// it if it is free. Returns 1 if we hold it now, else 0.
	redisLeaseScript = newRedisScript("the spool's lease script (GET, PEXPIRE, SET)", `
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
	redis.call('PEXPIRE', KEYS[1], ARGV[2])
	return 1
end
if not v and ARGV[3] == '1' then
	redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
	return 1
end
return 0`)

	// KEYS: the lease. ARGV: its value. Gives the lease up, if it is ours.
	redisReleaseScript = &redisScript{Script: releaseScript, name: "the spool's lease release script (GET, DEL)"}

	// KEYS: the stream, the lease of another consumer, ours. ARGV: group,
	// that consumer, ours, count, our lease's value. If that consumer's
	// lease is gone (it died, or lost Redis for its own claim_after +
	// attempt_timeout) and we hold ours, moves up to count of its turns to
	// ours: {how many it held, the turns as XCLAIM gives them}; {-1} if it
	// lives, {-2} if our lease is gone.
	redisTakeOverScript = newRedisScript("the spool's take-over script (EXISTS, GET, XPENDING, XCLAIM)", `
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1} end
if not holds(KEYS[3], ARGV[5]) then return {-2} end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[4]), ARGV[2])
if #p == 0 then return {0} end
local ids = {}
for i, e in ipairs(p) do ids[i] = e[1] end
return {#p, redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, unpack(ids))}`)

	// KEYS: the served sets of accounts. ARGV: our consumer, ms to serve
	// for, the sets' ms to live, then for each set 'mark' (we serve it),
	// 'unmark' (we do not any more) or 'check'. Returns for each set how
	// many other consumers serve it.
	redisServedScript = newRedisScript("the spool's served-accounts script (TIME, ZREMRANGEBYSCORE, ZADD, ZREM, PEXPIRE, ZCARD, ZSCORE)", `
local t = now()
local out = {}
for i, k in ipairs(KEYS) do
	local op = ARGV[3 + i]
	redis.call('ZREMRANGEBYSCORE', k, '-inf', t)
	if op == 'mark' then
		redis.call('ZADD', k, t + tonumber(ARGV[2]), ARGV[1])
		redis.call('PEXPIRE', k, ARGV[3])
	elseif op == 'unmark' then
		redis.call('ZREM', k, ARGV[1])
	end
	local n = redis.call('ZCARD', k)
	if redis.call('ZSCORE', k, ARGV[1]) then n = n - 1 end
	out[i] = n
end
return out`)

	// KEYS: stats. ARGV: field, value, field, value...: the counts as
	// counted, pending:<account>, n:<state>:<sfx> and bytes:<state>:<sfx>.
	// Puts them in place of stats' own, if the counts of pending entries
	// per account, and of entries per index, add up to its pending and
	// dead (nothing changed the spool meanwhile in a way the count
	// missed): 1 if so, else 0.
	redisCountScript = newRedisScript("the spool's count script (HMGET, HKEYS, HDEL, HSET)", `
local sums = {}
for i = 1, #ARGV, 2 do
	local f = ARGV[i]
	local kind = string.match(f, '^pending:') and 'account' or string.match(f, '^n:(%a+):')
	if kind then sums[kind] = (sums[kind] or 0) + tonumber(ARGV[i + 1]) end
end
local cur = redis.call('HMGET', KEYS[1], 'pending', 'dead')
local pending, dead = tonumber(cur[1] or '0'), tonumber(cur[2] or '0')
if (sums['account'] or 0) ~= pending or (sums['pending'] or 0) ~= pending or (sums['dead'] or 0) ~= dead then return 0 end
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
	if string.match(f, '^pending:') or string.match(f, '^n:') or string.match(f, '^bytes:') then redis.call('HDEL', KEYS[1], f) end
end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1`)

	// KEYS: stats, then for each entry: the entry, its pending and dead
	// indexes, its account's due. ARGV: for each entry: event ID, event
	// name, index suffix, spooled ms and bytes (its meta's, for an entry
	// without a spooled or bytes field). Back-fills the indexes: an entry
	// an earlier version wrote (no event field) gets one, and its spooled
	// and bytes fields, and is counted; every entry is put in the index of
	// its state, and its account's due if pending; one that is gone is
	// taken out of both indexes and due. Returns how many it counted.
	redisIndexScript = newRedisScript("the spool's index back-fill script (HMGET, HSET, HSETNX, HINCRBY, HDEL, ZADD, ZREM)", `
local n = 0
for i = 0, (#KEYS - 1) / 4 - 1 do
	local entry, pk, dk, due = KEYS[2 + 4*i], KEYS[3 + 4*i], KEYS[4 + 4*i], KEYS[5 + 4*i]
	local id, event, sfx, ms, bytes = ARGV[1 + 5*i], ARGV[2 + 5*i], ARGV[3 + 5*i], ARGV[4 + 5*i], ARGV[5 + 5*i]
	local cur = redis.call('HMGET', entry, 'state', 'event', 'bytes', 'next', 'spooled')
	if not cur[1] then
		redis.call('ZREM', pk, id)
		redis.call('ZREM', dk, id)
		redis.call('ZREM', due, id)
	else
		local spooled = cur[5] or ms
		if not cur[2] then
			redis.call('HSET', entry, 'event', event)
			redis.call('HSETNX', entry, 'spooled', spooled)
			redis.call('HSETNX', entry, 'bytes', bytes)
			tally(KEYS[1], cur[1], sfx, 1, cur[3] or bytes)
			n = n + 1
		end
		if cur[1] == 'pending' then
			redis.call('ZREM', dk, id)
			redis.call('ZADD', pk, spooled, id)
			redis.call('ZADD', due, tonumber(cur[4]) or 0, id)
		else
			redis.call('ZREM', pk, id)
			redis.call('ZADD', dk, spooled, id)
			redis.call('ZREM', due, id)
		end
	end
end
return n`)
)

// redisEntryCost is what an entry counts toward max_size: what Redis holds
// for it, near enough (docs/several-instances.md).
func redisEntryCost(fields ...int) int64 {
	n := int64(redisEntryOverhead)
	for _, f := range fields {
		n += int64(f)
	}
	return n
}

// add spools an entry: the 202 waits for Redis to have it. Its times go to
// Redis as durations, from now on this instance's clock: Redis stores them
// on its own. A Redis the guard finds unfit (it may evict, say) gets
// nothing.
func (s *redisSpool) add(e *spoolEntry) error {
	_, meta, req, err := e.size()
	if err != nil {
		return err
	}
	s.mu.Lock()
	maxSize := s.policy.maxSize
	s.mu.Unlock()
	m := &e.meta
	id := m.EventID.String()
	now := s.now()
	age := max(0, now.Sub(m.SpooledAt).Milliseconds())
	due := m.NextAttempt.Sub(now).Milliseconds()
	cost := redisEntryCost(len(meta), len(req), len(e.body), len(m.LastError), len(m.Account), len(id), len(m.EventName))
	ctx, cancel := s.ctx()
	defer cancel()
	if err := s.guard.usable(ctx); err != nil {
		return fmt.Errorf("spool redis: %w", err)
	}
	sfx := indexSuffix(m.EventName, m.Account)
	res, err := s.run(ctx, redisAddScript,
		[]string{s.entryKey(id), s.prefix + "ids", s.prefix + "stats", s.streamKey(m.Account), s.doneKey(id), s.prefix + "waiting",
			s.indexKey(statePending, sfx), s.dueKey(m.Account)},
		id, meta, req, e.body, cost, m.Account, due, maxSize, m.Attempts, m.LastError, age, m.EventName, sfx, m.Size).Text()
	switch {
	case err != nil:
		s.guard.stale()
		return fmt.Errorf("spool redis: %w", err)
	case res == "full":
		return errSpoolFull
	case res == stateDead:
		return fmt.Errorf("event %s: %w", id, errDeadLetter)
	case res == "done":
		return fmt.Errorf("event %s: %w", id, errSpoolDelivered)
	case res == "ok":
		spoolSpooled.Inc()
	}
	// "pending": spooled already (replay protection off, and the same
	// delivery came again; or a write whose outcome was unknown, again): it
	// will be delivered.
	return nil
}

// take renews this instance's claim on m's turn and reads what to send.
// An attempt starts only while our lease has more than attempt_timeout to
// live: it ends before the lease can lapse, and so before another instance
// can take the entry over.
func (s *redisSpool) take(m *spoolMeta) (spoolRequest, []byte, error) {
	var req spoolRequest
	consumer := s.consumerName()
	if consumer == "" {
		return req, nil, errNotHeld
	}
	s.mu.Lock()
	attemptTimeout := s.policy.attemptTimeout
	s.mu.Unlock()
	ctx, cancel := s.ctx()
	defer cancel()
	res, err := s.run(ctx, redisTakeScript, []string{s.streamKey(m.Account), s.leaseKey(consumer), s.entryKey(m.EventID.String())},
		redisSpoolGroup, consumer, s.lease, m.turn, m.rev, attemptTimeout.Milliseconds()).Slice()
	if err != nil {
		return req, nil, fmt.Errorf("%w: %v", errStoreDown, err)
	}
	if len(res) == 1 && res[0] == "short" {
		// Not renewed for a while (Redis did not answer): wait for the
		// lease loop.
		return req, nil, fmt.Errorf("%w: this instance's lease on its consumer name may lapse before an attempt ends", errStoreDown)
	}
	if len(res) != 3 || res[0] != "ok" {
		return req, nil, errNotHeld
	}
	raw, _ := res[1].(string)
	body, _ := res[2].(string)
	if err := json.Unmarshal([]byte(raw), &req); err != nil {
		return req, nil, fmt.Errorf("event %s: the spooled request does not parse: %v", m.EventID, err)
	}
	return req, []byte(body), nil
}

// doneTTL is how long the tombstone of an entry whose token expires at exp
// lives: redisDoneTTL, or until redisDoneMargin after exp if that is later.
func (s *redisSpool) doneTTL(exp time.Time) time.Duration {
	if exp.IsZero() {
		return redisDoneTTL
	}
	return max(redisDoneTTL, exp.Sub(s.now())+redisDoneMargin)
}

// delivered deletes a delivered entry, ends its turn, and leaves its
// tombstone. While Redis does not answer it tries again, as long as the
// store runs: an entry left in Redis is delivered again.
func (s *redisSpool) delivered(m spoolMeta) {
	id := m.EventID.String()
	consumer := s.consumerName()
	if consumer == "" {
		consumer = s.name // its lease lost: the turn is not ended, the entry is deleted all the same
	}
	idx, sfx := s.indexKeys(m.EventName, m.Account)
	keys := []string{s.entryKey(id), s.prefix + "ids", s.prefix + "stats", s.doneKey(id), s.prefix + "waiting"}
	keys = append(append(keys, idx...), s.streamKey(m.Account), s.leaseKey(consumer))
	ttl := s.doneTTL(m.ExpiresAt).Milliseconds()
	for {
		// Not s.ctx(): a delivery taken as the store stops is deleted all
		// the same, or it would be delivered again.
		ctx, cancel := context.WithTimeout(context.Background(), redisTimeout)
		err := s.run(ctx, redisDeleteScript, keys, id, ttl, 1, sfx, redisSpoolGroup, m.turn, consumer, s.lease).Err()
		cancel()
		if err == nil {
			return
		}
		if !s.pause(storeDownWait) {
			s.log().Error("spool: a delivered entry could not be deleted before Caddy stopped: it will be delivered again",
				zap.String("event_id", id), zap.Error(err))
			return
		}
	}
}

// settleWrite finds out, once Redis answers, whether an add whose outcome
// was unknown ran: the entry is there (or was delivered: its tombstone),
// or it is not, twice storeDownWait apart (a write that was sent runs as
// soon as Redis reads it), and then notRun is called. It gives up at until
// (the reservation expires then), or when the store stops.
func (s *redisSpool) settleWrite(id uuid.UUID, until time.Time, notRun func()) {
	go func() {
		absent := 0
		for time.Now().Before(until) && s.pause(storeDownWait) {
			ctx, cancel := context.WithTimeout(context.Background(), redisTimeout)
			n, err := s.client.Exists(ctx, s.entryKey(id.String()), s.doneKey(id.String())).Result()
			cancel()
			switch {
			case err != nil:
				absent = 0
			case n > 0:
				return // it ran: the spool delivers it
			default:
				if absent++; absent == 2 {
					s.log().Info("spool: a write whose outcome was unknown did not run: released its event ID, so that a resend is accepted",
						zap.String("event_id", id.String()))
					notRun()
					return
				}
			}
		}
	}()
}

// failed saves a failed attempt's outcome, if m's turn and our lease are
// still ours.
func (s *redisSpool) failed(m spoolMeta) error {
	consumer := s.consumerName()
	if consumer == "" {
		return nil // its lease lost: whoever takes the turn over tries again
	}
	var due int64
	if m.State == statePending {
		due = m.NextAttempt.Sub(s.now()).Milliseconds()
	}
	idx, sfx := s.indexKeys(m.EventName, m.Account)
	keys := []string{s.entryKey(m.EventID.String()), s.prefix + "stats", s.streamKey(m.Account), s.leaseKey(consumer), s.prefix + "waiting"}
	ctx, cancel := s.ctx()
	defer cancel()
	return s.run(ctx, redisFailedScript, append(keys, idx...),
		redisSpoolGroup, consumer, m.turn, m.rev, m.State, m.Attempts, due, m.LastError, s.lease, m.EventID.String(), sfx).Err()
}

// redisTime is a time of Redis's clock, as Redis gave it; zero stays zero.
func redisTime(ms int64) time.Time {
	if ms == 0 {
		return time.Time{}
	}
	return time.UnixMilli(ms)
}

// handled is the set of accounts that a handler of this instance serves.
func (s *redisSpool) handled() map[string]bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]bool, len(s.drivers))
	for account, ds := range s.drivers {
		if len(ds) > 0 {
			out[account] = true
		}
	}
	return out
}

// redisMetaFields are what metaOf reads, in its order.
var redisMetaFields = []string{"meta", "state", "attempts", "next", "error", "rev", "spooled"}

// redisMeta is an entry's metadata as Redis holds it: its times are Unix ms
// of Redis's clock.
type redisMeta struct {
	spoolMeta
	spooledMs, nextMs int64
}

// metaOf makes an entry's metadata from its hash's redisMetaFields; false
// if the entry is gone. An entry an earlier version wrote has no spooled
// field: its meta's time stands for it.
func metaOf(v []any) (redisMeta, bool) {
	var m redisMeta
	if len(v) != len(redisMetaFields) {
		return m, false
	}
	str := func(i int) string { s, _ := v[i].(string); return s }
	if err := json.Unmarshal([]byte(str(0)), &m.spoolMeta); err != nil || str(1) == "" {
		return m, false
	}
	m.State, m.LastError = str(1), str(4)
	m.Attempts, _ = strconv.Atoi(str(2))
	m.nextMs, _ = strconv.ParseInt(str(3), 10, 64)
	m.rev, _ = strconv.ParseInt(str(5), 10, 64)
	m.spooledMs = m.SpooledAt.UnixMilli()
	if ms, err := strconv.ParseInt(str(6), 10, 64); err == nil {
		m.spooledMs = ms
	}
	return m, true
}

// stats reads the store's counters; while Redis does not answer, the last
// ones it gave. The pending entries of the accounts no handler of this
// instance serves count as parked.
func (s *redisSpool) stats() spoolStats {
	ctx, cancel := context.WithTimeout(context.Background(), redisTimeout)
	defer cancel()
	v, err := s.client.HGetAll(ctx, s.prefix+"stats").Result()
	if err != nil {
		st := *s.last.Load()
		st.down = true
		return st
	}
	n := func(f string) int64 { n, _ := strconv.ParseInt(v[f], 10, 64); return n }
	st := &spoolStats{pending: n(statePending), dead: n(stateDead), bytes: n("bytes")}
	handled := s.handled()
	for f := range v {
		if account, ok := strings.CutPrefix(f, "pending:"); ok && !handled[account] {
			st.parked += max(0, n(f))
		}
	}
	st.parked = min(st.parked, st.pending)
	st.pending -= st.parked
	st.oldest = s.oldest(ctx)
	s.mu.Lock()
	st.maxBytes = s.policy.maxSize
	s.mu.Unlock()
	s.last.Store(st)
	return *st
}

// redisOldestTries bounds how many entries oldest looks at: each one
// delivered or dead that it meets first is taken out of waiting.
const redisOldestTries = 16

// redisUnwaitScript takes an entry out of waiting unless it is pending.
// KEYS: waiting, entry. ARGV: event ID.
var redisUnwaitScript = newRedisScript("the spool's waiting clean-up script (HGET, ZREM)", `
if redis.call('HGET', KEYS[2], 'state') == 'pending' then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1`)

// oldest is when the oldest pending entry, parked or not, was spooled, on
// this instance's clock: the head of waiting (entries by the time they
// were spooled). Zero when none waits, or when Redis does not say.
func (s *redisSpool) oldest(ctx context.Context) time.Time {
	return s.local(s.oldestMs(ctx))
}

// oldestMs is the head of waiting's score: Unix ms of Redis's clock. An
// entry that is no longer pending there (one an instance of an earlier
// version made a dead letter) is taken out: a trim of an index, run
// without wait_replicas's WAIT. 0 when none waits, or when Redis does not
// say.
func (s *redisSpool) oldestMs(ctx context.Context) int64 {
	for range redisOldestTries {
		head, err := s.client.ZRangeWithScores(ctx, s.prefix+"waiting", 0, 0).Result()
		if s.note("ZRANGE", err) != nil || len(head) == 0 {
			return 0
		}
		id, _ := head[0].Member.(string)
		n, err := redisUnwaitScript.Run(ctx, s.client.Client, []string{s.prefix + "waiting", s.entryKey(id)}, id).Int()
		if s.note(redisUnwaitScript.name, err) != nil || n == 0 {
			return int64(head[0].Score) // pending, or Redis did not say: the head's age is the best there is
		}
	}
	return 0
}

// retryNow makes an entry due now, under a new rev: whichever instance
// reads the new turn delivers it.
func (s *redisSpool) retryNow(id uuid.UUID) (bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), redisTimeout)
	defer cancel()
	key := s.entryKey(id.String())
	m, ok, err := s.entryNames(ctx, key)
	if err != nil || !ok {
		return false, err
	}
	idx, sfx := s.indexKeys(m.EventName, m.Account)
	keys := []string{key, s.prefix + "stats", s.streamKey(m.Account), s.prefix + "waiting"}
	n, err := s.run(ctx, redisRetryScript, append(keys, idx...), id.String(), sfx).Int()
	if err != nil {
		return false, fmt.Errorf("spool redis: %w", err)
	}
	return n == 1, nil
}

// probeNow probes this instance's routes of entry id's account at once,
// if their breakers are open (an operator retried it).
func (s *redisSpool) probeNow(id uuid.UUID) {
	ctx, cancel := context.WithTimeout(context.Background(), redisTimeout)
	defer cancel()
	if account, err := s.client.HGet(ctx, s.entryKey(id.String()), "account").Result(); err == nil {
		s.probeAccount(account)
	}
}

// removeIf deletes an entry if it is stored in state ("": any), and leaves
// its tombstone; the instance that holds its turn finds it gone.
func (s *redisSpool) removeIf(id uuid.UUID, state string) (bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), redisTimeout)
	defer cancel()
	key := s.entryKey(id.String())
	m, _, err := s.entryNames(ctx, key)
	if err != nil {
		return false, err
	}
	idx, sfx := s.indexKeys(m.EventName, m.Account)
	keys := []string{key, s.prefix + "ids", s.prefix + "stats", s.doneKey(id.String()), s.prefix + "waiting"}
	n, err := s.run(ctx, redisDeleteScript, append(keys, idx...),
		id.String(), s.doneTTL(m.ExpiresAt).Milliseconds(), 0, sfx, "", "", "", "", state).Int()
	if err != nil {
		return false, fmt.Errorf("spool redis: %w", err)
	}
	return n == 1, nil
}

// entryNames reads an entry's meta, which names its event and account
// (neither changes): false if the entry is gone, or its meta does not
// parse.
func (s *redisSpool) entryNames(ctx context.Context, key string) (spoolMeta, bool, error) {
	var m spoolMeta
	raw, err := s.client.HGet(ctx, key, "meta").Result()
	switch {
	case errors.Is(err, redis.Nil):
		return m, false, nil
	case err != nil:
		return m, false, fmt.Errorf("spool redis: %w", err)
	}
	return m, json.Unmarshal([]byte(raw), &m) == nil, nil
}

// consumerName is our consumer name while we hold its lease, else "".
func (s *redisSpool) consumerName() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.consumer
}

// accounts returns the accounts this instance re-drives: those with a ready
// handler.
func (s *redisSpool) accounts() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.servedAccounts()
}

// servedAccounts is accounts, with s.mu held.
func (s *redisSpool) servedAccounts() []string {
	var out []string
	for account := range s.drivers {
		if s.serves(account) {
			out = append(out, account)
		}
	}
	slices.Sort(out)
	return out
}

// waiting returns the entries this instance holds that no attempt is under
// way at, pending and due by by. Call with s.mu held.
func (s *redisSpool) waiting(by time.Time) []*spoolMeta {
	var out []*spoolMeta
	for id, m := range s.entries {
		if !s.inflight[id] && m.State == statePending && !m.NextAttempt.After(by) {
			out = append(out, m)
		}
	}
	return out
}

// room is how many more entries this instance's workers could attempt
// soon: redrive_concurrency, less the attempts under way, the entries it holds
// that are due, and those that come due within a quarter of claim_after
// of the accounts another live instance serves (this instance would
// otherwise read every turn while those wait for their time, and leave the
// other instances none). Alone, it counts only those due: it has no one to
// leave turns to, and entries it retries soon, again and again, would keep
// it from reading any other. Entries whose route's breaker is open are
// not counted: they wait for it, and would keep it from reading the turns
// of other routes (readLoop reads no more of their account's).
func (s *redisSpool) room() int {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	busy := len(s.inflight)
	for _, m := range s.waiting(now.Add(s.policy.claimAfter / 4)) {
		if (s.others[m.Account] || !m.NextAttempt.After(now)) && !s.heldBack(m) {
			busy++
		}
	}
	return s.policy.workers() - busy
}

// readLoop reads new turns from the streams of the accounts this instance
// re-drives, as many as its workers can attempt soon, and holds their
// entries.
func (s *redisSpool) readLoop() {
	defer s.workers.Done()
	// It stops with dispatching (finish): a turn read then would wait,
	// unattempted, until the hand-back.
	for s.halted.Err() == nil {
		consumer, accounts := s.consumerName(), s.accounts()
		s.mu.Lock()
		for account := range s.reading {
			if !slices.Contains(accounts, account) {
				delete(s.reading, account) // when it comes back, its turns are read back
			}
		}
		claimAfter := s.policy.claimAfter
		s.mu.Unlock()
		if consumer == "" || len(accounts) == 0 {
			s.pause(100 * time.Millisecond)
			continue
		}
		if err := s.startReading(consumer, accounts); err != nil {
			s.pause(storeDownWait)
			continue
		}
		if now := s.now(); now.Sub(s.checkedAt) >= claimAfter/4 {
			if err := s.holdPending(consumer, accounts); err != nil {
				s.pause(storeDownWait)
				continue
			}
			s.checkedAt = now
		}
		s.shed(consumer)
		room := s.room()
		if room <= 0 {
			s.waitForRoom()
			continue
		}
		// Not the turns of an account whose entries wait for an open
		// breaker: they would wait too. (With none held, it reads them,
		// for a probe.)
		s.mu.Lock()
		accounts = slices.DeleteFunc(accounts, s.stalled)
		s.mu.Unlock()
		if len(accounts) == 0 {
			s.waitForRoom()
			continue
		}
		streams := make([]string, 0, 2*len(accounts))
		for _, a := range accounts {
			streams = append(streams, s.streamKey(a))
		}
		for range accounts {
			streams = append(streams, ">")
		}
		count := (room + len(accounts) - 1) / len(accounts)
		res, err := s.client.XReadGroup(s.halted, &redis.XReadGroupArgs{
			Group: redisSpoolGroup, Consumer: consumer, Streams: streams, Count: int64(count), Block: redisReadBlock,
		}).Result()
		if err != nil && !errors.Is(err, redis.Nil) {
			// Its reply may be lost with turns Redis gave us (or the group
			// with Redis's data): read our pending turns back.
			s.mu.Lock()
			clear(s.reading)
			s.mu.Unlock()
			if redis.HasErrorPrefix(err, "NOGROUP") {
				continue
			}
		}
		if s.note("XREADGROUP", err) != nil && !errors.Is(err, redis.Nil) {
			s.pause(storeDownWait)
			continue
		}
		for _, st := range res {
			s.hold(strings.TrimPrefix(st.Stream, s.prefix+"stream:"), st.Messages)
		}
	}
}

// waitForRoom waits until an attempt ends, or redisReadBlock.
func (s *redisSpool) waitForRoom() {
	t := time.NewTimer(redisReadBlock)
	defer t.Stop()
	select {
	case <-s.stopped.Done():
	case <-s.landed:
	case <-t.C:
	}
}

// shed hands back the due entries this instance holds beyond what its
// workers can attempt soon (they are queued behind redrive_concurrency others),
// when another live instance serves their account: one that has room reads
// them. An instance alone keeps them.
func (s *redisSpool) shed(consumer string) {
	now := s.now()
	s.mu.Lock()
	waiting := s.waiting(now)
	if len(waiting) <= s.policy.workers() {
		s.mu.Unlock()
		return
	}
	slices.SortFunc(waiting, func(a, b *spoolMeta) int { return a.NextAttempt.Compare(b.NextAttempt) })
	var excess []spoolMeta
	for _, m := range waiting[s.policy.workers():] {
		if s.others[m.Account] {
			s.unindex(m) // no attempt starts on it now
			excess = append(excess, *m)
		}
	}
	s.mu.Unlock()
	if len(excess) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(s.stopped, handBackTimeout)
	_, left := s.handBack(ctx, consumer, excess)
	cancel()
	s.reschedule(left)
}

// reschedule puts entries it could not hand back (Redis did not answer)
// in the index again: still ours, or gone (take finds out which).
func (s *redisSpool) reschedule(left []spoolMeta) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range left {
		if _, ok := s.entries[m.EventID]; !ok {
			s.schedule(m)
		}
	}
}

// startReading makes the consumer group of each account's stream that this
// instance does not read yet, and reads back the turns it held before a
// restart under the same name.
func (s *redisSpool) startReading(consumer string, accounts []string) error {
	for _, account := range accounts {
		s.mu.Lock()
		reading := s.reading[account]
		s.mu.Unlock()
		if reading {
			continue
		}
		ctx, cancel := s.ctx()
		err := s.client.XGroupCreateMkStream(ctx, s.streamKey(account), redisSpoolGroup, "0").Err()
		cancel()
		if redis.HasErrorPrefix(err, "BUSYGROUP") {
			err = nil
		}
		if s.note("XGROUP CREATE", err) != nil {
			return err
		}
		for after := "0"; ; {
			ctx, cancel := s.ctx()
			res, err := s.client.XReadGroup(ctx, &redis.XReadGroupArgs{
				Group: redisSpoolGroup, Consumer: consumer, Streams: []string{s.streamKey(account), after}, Count: redisBatch, Block: -1,
			}).Result()
			cancel()
			if s.note("XREADGROUP", err) != nil && !errors.Is(err, redis.Nil) {
				return err
			}
			if len(res) == 0 || len(res[0].Messages) == 0 {
				break
			}
			msgs := res[0].Messages
			s.hold(account, msgs)
			after = msgs[len(msgs)-1].ID
		}
		s.mu.Lock()
		s.reading[account] = true
		s.mu.Unlock()
	}
	return nil
}

// holdPendingPages bounds how many pages of our pending turns holdPending
// reads of one stream in a round: redisBatch each.
const holdPendingPages = 1000

// holdPending compares the turns each account's stream has pending for
// this consumer with the index, and holds the entries of those the index
// lacks: a turn whose read's reply was lost, or whose entry could not be
// read when it was read or claimed, would stay in our pending list, and no
// other instance would take it over while we live. Run by the read loop,
// so that no read of its own is half way.
func (s *redisSpool) holdPending(consumer string, accounts []string) error {
	for _, account := range accounts {
		stream := s.streamKey(account)
		start := "-"
		for range holdPendingPages {
			ctx, cancel := s.ctx()
			pending, err := s.client.XPendingExt(ctx, &redis.XPendingExtArgs{
				Stream: stream, Group: redisSpoolGroup, Start: start, End: "+", Count: redisBatch, Consumer: consumer,
			}).Result()
			cancel()
			if redis.HasErrorPrefix(err, "NOGROUP") {
				break // startReading makes it
			}
			if s.note("XPENDING", err) != nil {
				return err
			}
			s.mu.Lock()
			held := make(map[string]bool, len(s.entries))
			for _, m := range s.entries {
				held[m.turn] = true
			}
			s.mu.Unlock()
			var missing []string
			for _, p := range pending {
				if !held[p.ID] {
					missing = append(missing, p.ID)
				}
			}
			if err := s.holdTurns(account, missing); err != nil {
				return err
			}
			if len(pending) < redisBatch {
				break
			}
			start = "(" + pending[len(pending)-1].ID
		}
	}
	return nil
}

// holdTurns reads the turns of an account's stream that this consumer
// has pending, and holds their entries; a turn whose message is gone ends.
func (s *redisSpool) holdTurns(account string, turns []string) error {
	if len(turns) == 0 {
		return nil
	}
	stream := s.streamKey(account)
	ctx, cancel := s.ctx()
	cmds := make([]*redis.XMessageSliceCmd, len(turns))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, turn := range turns {
			cmds[i] = p.XRange(ctx, stream, turn, turn)
		}
		return nil
	})
	cancel()
	if s.note("XRANGE", err) != nil {
		return err
	}
	var msgs []redis.XMessage
	var gone []string
	for i, cmd := range cmds {
		if m := cmd.Val(); len(m) == 1 {
			msgs = append(msgs, m[0])
		} else {
			gone = append(gone, turns[i])
		}
	}
	s.ack(account, gone)
	s.hold(account, msgs)
	return nil
}

// hold takes the entries of turns this instance just read or claimed into
// its index, their times on its own clock, and returns how many; turns of
// entries gone, dead or retried since are acknowledged and deleted. A
// turn the index holds already stays as the index has it.
func (s *redisSpool) hold(account string, msgs []redis.XMessage) (held int) {
	if len(msgs) == 0 {
		return 0
	}
	ctx, cancel := s.ctx()
	defer cancel()
	cmds := make([]*redis.SliceCmd, len(msgs))
	revs := make([]string, len(msgs))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, msg := range msgs {
			id, _ := msg.Values["id"].(string)
			revs[i], _ = msg.Values["rev"].(string)
			cmds[i] = p.HMGet(ctx, s.entryKey(id), redisMetaFields...)
		}
		return nil
	})
	if s.note("HMGET", err) != nil && !errors.Is(err, redis.Nil) {
		return 0 // the turns stay in our pending list: holdPending finds them
	}
	var stale []string
	for i, msg := range msgs {
		rm, ok := metaOf(cmds[i].Val())
		if !ok || rm.State != statePending || strconv.FormatInt(rm.rev, 10) != revs[i] || rm.Account != account {
			stale = append(stale, msg.ID)
			continue
		}
		m := rm.spoolMeta
		m.SpooledAt, m.NextAttempt = s.local(rm.spooledMs), s.local(rm.nextMs)
		m.turn = msg.ID
		s.mu.Lock()
		old, ok := s.entries[m.EventID]
		switch {
		case ok && old.turn == m.turn:
		case ok && !s.inflight[m.EventID]:
			stale = append(stale, old.turn)
			s.schedule(m)
		default:
			s.schedule(m)
		}
		s.mu.Unlock()
		held++
	}
	s.ack(account, stale)
	return held
}

// ack ends turns that name nothing to deliver.
func (s *redisSpool) ack(account string, turns []string) {
	if len(turns) == 0 {
		return
	}
	ctx, cancel := s.ctx()
	defer cancel()
	stream := s.streamKey(account)
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.XAck(ctx, stream, redisSpoolGroup, turns...)
		p.XDel(ctx, stream, turns...)
		return nil
	})
	s.note("XACK, XDEL", err)
}

// leaseTimes is claim_after, and the lease's time to live: claim_after +
// attempt_timeout, so that an attempt, which starts only while the lease
// has more than attempt_timeout to live (take), ends before the lease can
// lapse, however long its renewals fail meanwhile.
func (s *redisSpool) leaseTimes() (claimAfter, ttl time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.policy.claimAfter, s.policy.claimAfter + s.policy.attemptTimeout
}

// leaseLoop, every quarter of claim_after, on its own, whatever the keep
// loop's work takes: takes the lease on our consumer name, or renews it,
// and measures Redis's clock.
func (s *redisSpool) leaseLoop() {
	defer s.workers.Done()
	for {
		claimAfter, _ := s.leaseTimes()
		wait := claimAfter / 4
		if _, err := s.keepLease(); err != nil {
			wait = min(wait, storeDownWait) // resume soon after Redis answers
		} else {
			s.measureClock()
		}
		if !s.pause(wait) {
			return
		}
	}
}

// keepLoop, every quarter of claim_after: renews the claims on the turns
// this instance holds, keeps the per-account counts, says which accounts
// it serves, and takes over the turns of instances whose lease is gone.
func (s *redisSpool) keepLoop() {
	defer s.workers.Done()
	for {
		claimAfter, _ := s.leaseTimes()
		wait := claimAfter / 4
		if err := s.keep(); err != nil {
			wait = min(wait, storeDownWait) // resume soon after Redis answers
		}
		if !s.pause(wait) {
			return
		}
	}
}

// keep is one round of the keep loop. Until the lease loop holds our
// consumer name, it takes it.
func (s *redisSpool) keep() error {
	consumer := s.consumerName()
	if consumer == "" {
		var err error
		if consumer, err = s.keepLease(); err != nil || consumer == "" {
			return err
		}
	}
	if err := s.renew(consumer); err != nil {
		return err
	}
	stats, err := s.readStats()
	if err != nil {
		return err
	}
	if err := s.keepCounts(stats); err != nil {
		return err
	}
	waiting := waitingByAccount(stats)
	claimAfter, _ := s.leaseTimes()
	checked, others, err := s.markServed(consumer, claimAfter, waiting)
	if err != nil {
		return err
	}
	s.noteWaiting(checked, others, waiting)
	for _, account := range s.accounts() {
		if err := s.claim(consumer, account); err != nil {
			return err
		}
	}
	return nil
}

// holdLease takes the lease on name (if take, and it is free), or renews
// it, for ttl; true if we hold it.
func (s *redisSpool) holdLease(name string, ttl time.Duration, take bool) (bool, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	flag := 0
	if take {
		flag = 1
	}
	n, err := s.run(ctx, redisLeaseScript, []string{s.leaseKey(name)}, s.lease, ttl.Milliseconds(), flag).Int()
	return n == 1, err
}

// keepLease takes the lease on our consumer name, or renews it, for
// claim_after + attempt_timeout: while it lives, no other instance takes
// our turns over. A name another live process holds (one that shares
// Caddy's data directory, and so its instance ID) gets a random suffix. A
// lease lost while Redis did not answer lets go of every turn this
// instance held. Nothing is written to a Redis the guard finds unfit (it
// logs why): no consumer name, so no turn read either.
func (s *redisSpool) keepLease() (string, error) {
	s.leaseMu.Lock()
	defer s.leaseMu.Unlock()
	_, ttl := s.leaseTimes()
	consumer := s.consumerName()
	if consumer != "" {
		ok, err := s.holdLease(consumer, ttl, false)
		if err != nil || ok {
			return consumer, err
		}
		s.log().Error("spool: this instance lost the lease on its consumer name (redis lost its data, or did not answer for claim_after + attempt_timeout): it lets go of the deliveries it held, which another instance, or this one, takes over", zap.String("consumer", consumer))
		s.mu.Lock()
		s.consumer = ""
		for _, m := range s.entries {
			s.unindex(m)
		}
		s.giveBack = nil
		clear(s.reading)
		s.mu.Unlock()
	} else {
		ctx, cancel := s.ctx()
		err := s.guard.usable(ctx)
		cancel()
		if err != nil {
			return "", err
		}
	}
	for _, name := range []string{s.name, s.name + "/" + randomHex(4)} {
		ok, err := s.holdLease(name, ttl, true)
		if err != nil {
			return "", err
		}
		if ok {
			if name != s.name {
				s.log().Warn("spool: another live process uses this instance's consumer name (does it share Caddy's data directory?): this one takes another", zap.String("consumer", name))
			}
			s.measureClock() // before the first turn is read
			s.mu.Lock()
			s.consumer = name
			s.mu.Unlock()
			return name, nil
		}
	}
	return "", errors.New("no consumer name could be taken")
}

// renew renews the claims on the turns this instance holds, and lets go of
// those that are stale or another's (or all, its lease gone). Those of an
// account it no longer serves (a reload dropped it) it hands back; those
// it could not (Redis did not answer), at the next round.
func (s *redisSpool) renew(consumer string) error {
	byAccount := make(map[string][]spoolMeta)
	s.mu.Lock()
	unserved := s.giveBack
	s.giveBack = nil
	for _, m := range s.entries {
		if len(s.drivers[m.Account]) > 0 || s.inflight[m.EventID] {
			byAccount[m.Account] = append(byAccount[m.Account], *m)
			continue
		}
		s.unindex(m)
		unserved = append(unserved, *m)
	}
	s.mu.Unlock()
	if len(unserved) > 0 {
		ctx, cancel := context.WithTimeout(s.stopped, handBackTimeout)
		_, left := s.handBack(ctx, consumer, unserved)
		cancel()
		s.mu.Lock()
		s.giveBack = append(s.giveBack, left...)
		s.mu.Unlock()
	}
	for account, held := range byAccount {
		for chunk := range slices.Chunk(held, redisBatch) {
			keys, args := s.turnBatch(account, consumer, chunk, func(m spoolMeta) []any { return []any{m.turn, m.rev} })
			ctx, cancel := s.ctx()
			res, err := s.run(ctx, redisRenewScript, keys, args...).Int64Slice()
			cancel()
			if err != nil {
				return err
			}
			for i, r := range res {
				if r != 1 && i < len(chunk) {
					s.drop(chunk[i].EventID, chunk[i].turn)
				}
			}
		}
	}
	return nil
}

// readStats reads the store's counters, as Redis holds them.
func (s *redisSpool) readStats() (map[string]string, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	stats, err := s.client.HGetAll(ctx, s.prefix+"stats").Result()
	return stats, s.note("HGETALL", err)
}

// waitingByAccount is how many pending entries each account has, as stats
// counts them.
func waitingByAccount(stats map[string]string) map[string]int64 {
	waiting := make(map[string]int64)
	for f, v := range stats {
		if account, ok := strings.CutPrefix(f, "pending:"); ok {
			if n, _ := strconv.ParseInt(v, 10, 64); n > 0 {
				waiting[account] = n
			}
		}
	}
	return waiting
}

// countsAddUp reports whether stats' per-account counts of pending
// entries add up to its pending, and its per-index counts to its pending
// and dead, none negative. They do not once an instance of an earlier
// version, which kept neither, changed the spool.
func countsAddUp(stats map[string]string) bool {
	pending, _ := strconv.ParseInt(stats[statePending], 10, 64)
	dead, _ := strconv.ParseInt(stats[stateDead], 10, 64)
	var byAccount, indexedPending, indexedDead int64
	for f, v := range stats {
		var sum *int64
		switch {
		case strings.HasPrefix(f, "pending:"):
			sum = &byAccount
		case strings.HasPrefix(f, "n:pending:"):
			sum = &indexedPending
		case strings.HasPrefix(f, "n:dead:"):
			sum = &indexedDead
		default:
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return false
		}
		*sum += n
	}
	return byAccount == pending && indexedPending == pending && indexedDead == dead
}

// keepCounts counts the pending entries of each account, and the entries
// of each index, again, from the entries, and back-fills the indexes: once
// after the store starts, and whenever stats' counts do not add up (an
// instance of an earlier version, which kept no such count, changed the
// spool). A count the spool's changes overtook (it does not add
// up either) is tried again after a wait that doubles, up to an hour.
func (s *redisSpool) keepCounts(stats map[string]string) error {
	s.countMu.Lock()
	defer s.countMu.Unlock()
	if (s.counted && countsAddUp(stats)) || s.now().Before(s.countAfter) {
		return nil
	}
	ok, err := s.count()
	switch {
	case err != nil:
		return err
	case ok:
		s.counted, s.countWait, s.countAfter = true, 0, time.Time{}
	default:
		s.countWait = min(max(2*s.countWait, time.Second), time.Hour)
		s.countAfter = s.now().Add(s.countWait)
	}
	return nil
}

// redisCountBatch is how many entries count reads at a time, and
// redisCountPages bounds how many times.
const (
	redisCountBatch = 1000
	redisCountPages = 1 << 20
)

// count counts the pending entries of each account, and the entries and
// bytes of each index, in batches (SSCAN of ids, and the entries' fields,
// pipelined), so that Redis serves others in between; back-fills waiting
// and the indexes, where an instance of an earlier version spooled
// entries or changed them; and puts the counts in place of stats' if they
// add up: true if so.
func (s *redisSpool) count() (bool, error) {
	counts := make(map[string]int64) // stats' fields, as counted
	seen := make(map[string]bool)    // SSCAN may return an ID twice
	var cursor uint64
	for range redisCountPages {
		ctx, cancel := s.ctx()
		ids, next, err := s.client.SScan(ctx, s.prefix+"ids", cursor, "", redisCountBatch).Result()
		cancel()
		if s.note("SSCAN", err) != nil {
			return false, err
		}
		var read []string
		for _, id := range ids {
			if !seen[id] {
				seen[id] = true
				read = append(read, id)
			}
		}
		if err := s.countBatch(read, counts); err != nil {
			return false, err
		}
		if cursor = next; cursor == 0 {
			break
		}
	}
	if cursor != 0 {
		return false, nil
	}
	if err := s.trimIndexes(seen); err != nil {
		return false, err
	}
	args := make([]any, 0, 2*len(counts))
	for f, n := range counts {
		args = append(args, f, n)
	}
	ctx, cancel := s.ctx()
	defer cancel()
	n, err := s.run(ctx, redisCountScript, []string{s.prefix + "stats"}, args...).Int()
	return n == 1, err
}

// countBatch counts a batch of entries into counts, and back-fills
// waiting and the indexes with them.
func (s *redisSpool) countBatch(ids []string, counts map[string]int64) error {
	if len(ids) == 0 {
		return nil
	}
	ctx, cancel := s.ctx()
	defer cancel()
	cmds := make([]*redis.SliceCmd, len(ids))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, id := range ids {
			cmds[i] = p.HMGet(ctx, s.entryKey(id), "state", "account", "spooled", "event", "bytes")
		}
		return nil
	})
	if s.note("HMGET", err) != nil && !errors.Is(err, redis.Nil) {
		return err
	}
	// The meta of the entries an earlier version wrote: it names their
	// event, when they were spooled, and their bytes.
	metas := make(map[int]*redis.StringCmd)
	_, err = s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, cmd := range cmds {
			v := cmd.Val()
			if len(v) == 5 && v[0] != nil && slices.Contains(v[2:], nil) {
				metas[i] = p.HGet(ctx, s.entryKey(ids[i]), "meta")
			}
		}
		return nil
	})
	if s.note("HGET", err) != nil && !errors.Is(err, redis.Nil) {
		return err
	}
	var waiting []redis.Z
	keys := []string{s.prefix + "stats"}
	var args []any
	for i, cmd := range cmds {
		v := cmd.Val()
		str := func(j int) string { s, _ := v[j].(string); return s }
		if len(v) != 5 || str(0) == "" {
			continue // gone
		}
		state, account, event := str(0), str(1), str(3)
		ms, msErr := strconv.ParseInt(str(2), 10, 64)
		bytes, bytesErr := strconv.ParseInt(str(4), 10, 64)
		if v[3] == nil || msErr != nil || bytesErr != nil {
			var m spoolMeta
			if metas[i] == nil || json.Unmarshal([]byte(metas[i].Val()), &m) != nil {
				continue // no index can name it
			}
			if v[3] == nil {
				event = m.EventName
			}
			if msErr != nil {
				ms = m.SpooledAt.UnixMilli()
			}
			if bytesErr != nil {
				bytes = m.Size
			}
		}
		if state == statePending {
			if account != "" {
				counts["pending:"+account]++
			}
			waiting = append(waiting, redis.Z{Score: float64(ms), Member: ids[i]})
		}
		sfx := indexSuffix(event, account)
		counts["n:"+state+":"+sfx]++
		counts["bytes:"+state+":"+sfx] += bytes
		keys = append(keys, s.entryKey(ids[i]), s.indexKey(statePending, sfx), s.indexKey(stateDead, sfx), s.dueKey(account))
		args = append(args, ids[i], event, sfx, ms, bytes)
	}
	if err := s.addWaiting(waiting); err != nil {
		return err
	}
	if len(args) == 0 {
		return nil
	}
	return s.run(ctx, redisIndexScript, keys, args...).Err()
}

// trimIndexes takes out of the indexes, and the due sets, the entries
// that are gone, which an instance of an earlier version deleted: the
// members that the count did not see (seen), unless they are there and in
// the state of the index (pending, for a due set) by then.
func (s *redisSpool) trimIndexes(seen map[string]bool) error {
	ctx, cancel := s.ctx()
	all, err := s.indexes(ctx)
	cancel()
	if err != nil {
		return err
	}
	states := make(map[string]string) // key -> the state of its members
	for _, ix := range all {
		states[ix.key] = ix.state
		states[s.dueKey(ix.account)] = statePending
	}
	for key, state := range states {
		var cursor uint64
		for range redisCountPages {
			ctx, cancel := s.ctx()
			members, next, err := s.client.ZScan(ctx, key, cursor, "", redisCountBatch).Result()
			if s.note("ZSCAN", err) != nil {
				cancel()
				return err
			}
			for i := 0; i < len(members); i += 2 { // member, score
				if id := members[i]; !seen[id] {
					err := redisUnindexScript.Run(ctx, s.client.Client, []string{key, s.entryKey(id)}, id, state).Err()
					if s.note(redisUnindexScript.name, err) != nil {
						cancel()
						return err
					}
				}
			}
			cancel()
			if cursor = next; cursor == 0 {
				break
			}
		}
	}
	return nil
}

// addWaiting puts pending entries in waiting, where an instance of an
// earlier version, which kept no such index, spooled them. One that is
// delivered meanwhile is taken out again by oldest.
func (s *redisSpool) addWaiting(entries []redis.Z) error {
	if len(entries) == 0 {
		return nil
	}
	ctx, cancel := s.ctx()
	defer cancel()
	return s.note("ZADD", s.client.ZAddNX(ctx, s.prefix+"waiting", entries...).Err())
}

// served runs the served-accounts script for ops (account -> 'mark',
// 'unmark' or 'check'), marking for serveFor, and returns for each account
// whether another live instance serves it.
func (s *redisSpool) served(ctx context.Context, consumer string, serveFor time.Duration, ops map[string]string) (map[string]bool, error) {
	keys := make([]string, 0, len(ops))
	args := []any{consumer, serveFor.Milliseconds(), redisServedTTL.Milliseconds()}
	accounts := make([]string, 0, len(ops))
	for account, op := range ops {
		accounts = append(accounts, account)
		keys = append(keys, s.servedKey(account))
		args = append(args, op)
	}
	counts, err := s.run(ctx, redisServedScript, keys, args...).Int64Slice()
	if err != nil {
		return nil, err
	}
	others := make(map[string]bool, len(accounts))
	for i, account := range accounts {
		others[account] = i < len(counts) && counts[i] > 0
	}
	return others, nil
}

// markServed says, in Redis, which accounts this instance serves, until
// claim_after from now unless it says so again, and that it no longer
// serves those it dropped; and learns which accounts another live instance
// serves, among those and the accounts with waiting entries that it does
// not serve (checked).
func (s *redisSpool) markServed(consumer string, claimAfter time.Duration, waiting map[string]int64) (checked []string, others map[string]bool, err error) {
	s.mu.Lock()
	served := s.servedAccounts()
	ops := make(map[string]string)
	for _, account := range served {
		ops[account] = "mark"
	}
	for account := range s.marked {
		if !slices.Contains(served, account) {
			ops[account] = "unmark"
		}
	}
	for account := range waiting {
		if len(s.drivers[account]) == 0 {
			if _, ok := ops[account]; !ok {
				ops[account] = "check"
			}
			checked = append(checked, account)
		}
	}
	s.mu.Unlock()
	ctx, cancel := s.ctx()
	defer cancel()
	if others, err = s.served(ctx, consumer, claimAfter, ops); err != nil {
		return nil, nil, err
	}
	s.mu.Lock()
	clear(s.marked)
	for _, account := range served {
		s.marked[account] = true
	}
	s.others = others
	s.mu.Unlock()
	return checked, others, nil
}

// noteWaiting says, once, when deliveries wait for an account that this
// instance does not serve (checked), and whether another does.
func (s *redisSpool) noteWaiting(checked []string, others map[string]bool, waiting map[string]int64) {
	s.unservedMu.Lock()
	defer s.unservedMu.Unlock()
	for account := range s.unserved {
		if !slices.Contains(checked, account) {
			delete(s.unserved, account) // served here now, or nothing waits
		}
	}
	for _, account := range checked {
		s.noteUnserved(account, others[account], waiting[account])
	}
}

// noteUnserved says, once, that deliveries wait for an account this
// instance does not serve: at WARN when no instance does, at INFO when
// another does. It says so once it has seen it twice in a row, so that an
// instance that starts, or reloads, as another takes the account up says
// nothing. Call with s.unservedMu held.
func (s *redisSpool) noteUnserved(account string, elsewhere bool, n int64) {
	u := s.unserved[account]
	if u == nil || u.elsewhere != elsewhere {
		u = &unservedNote{elsewhere: elsewhere}
		s.unserved[account] = u
	}
	u.rounds++
	if u.logged || u.rounds < 2 || caddy.Exiting() {
		return
	}
	u.logged = true
	if elsewhere {
		s.log().Info("spool: deliveries of an account that this instance does not serve wait in the shared spool: the instances that serve it deliver them",
			zap.String("account", account), zap.Int64("entries", n))
		return
	}
	s.log().Warn("spool: deliveries wait in the shared spool for an account that no instance serves: no handler of this instance's config serves it, and no other instance says it does; "+
		"serve the account again (give every instance the same accounts), or delete them through the admin API",
		zap.String("account", account), zap.Int64("entries", n))
}

// claim takes over the turns of an account's stream held by consumers
// whose lease is gone: their instance died, or lost Redis for its
// claim_after + attempt_timeout. A live instance's turns stay its own,
// whatever this instance's claim_after.
func (s *redisSpool) claim(consumer, account string) error {
	ctx, cancel := s.ctx()
	consumers, err := s.client.XInfoConsumers(ctx, s.streamKey(account), redisSpoolGroup).Result()
	cancel()
	if redis.HasErrorPrefix(err, "NOGROUP") || redis.HasErrorPrefix(err, "no such key") {
		return nil // the reader makes it
	}
	if s.note("XINFO CONSUMERS", err) != nil {
		return err
	}
	for _, c := range consumers {
		if c.Name == consumer || c.Pending == 0 {
			continue
		}
		if err := s.takeOver(consumer, account, c.Name); err != nil {
			return err
		}
	}
	return s.forgetConsumers(consumer, account)
}

// takeOver moves the turns of consumer from to ours, if its lease is gone,
// in batches.
func (s *redisSpool) takeOver(consumer, account, from string) error {
	taken := 0
	for range 100 {
		ctx, cancel := s.ctx()
		res, err := s.run(ctx, redisTakeOverScript, []string{s.streamKey(account), s.leaseKey(from), s.leaseKey(consumer)},
			redisSpoolGroup, from, consumer, redisBatch, s.lease).Slice()
		cancel()
		if err != nil {
			return err
		}
		if len(res) == 0 {
			return fmt.Errorf("the take-over script answered %v", res)
		}
		n, _ := res[0].(int64)
		if n <= 0 {
			break // it lives, it holds nothing more, or our own lease is gone
		}
		if len(res) > 1 {
			taken += s.hold(account, xMessages(res[1]))
		}
		if n < redisBatch {
			break
		}
	}
	if taken > 0 {
		spoolTakenOver.Add(float64(taken))
		s.log().Info("spool: took over deliveries another instance left unfinished: its lease on its consumer name expired (it died, or lost Redis for its claim_after)",
			zap.String("from", from), zap.Int("entries", taken))
	}
	return nil
}

// xMessages reads stream messages as a script returns them.
func xMessages(v any) []redis.XMessage {
	items, _ := v.([]any)
	out := make([]redis.XMessage, 0, len(items))
	for _, item := range items {
		pair, _ := item.([]any)
		if len(pair) != 2 {
			continue
		}
		id, _ := pair[0].(string)
		kv, _ := pair[1].([]any)
		values := make(map[string]any, len(kv)/2)
		for i := 0; i+1 < len(kv); i += 2 {
			k, _ := kv[i].(string)
			values[k] = kv[i+1]
		}
		out = append(out, redis.XMessage{ID: id, Values: values})
	}
	return out
}

// goneConsumerIdle is how long a consumer that holds nothing may go unseen
// before it leaves the group: an instance replaced, or a name taken for one
// run.
const goneConsumerIdle = time.Hour

// forgetConsumers deletes the consumers of an account's stream that hold
// nothing and were not seen for goneConsumerIdle, so that the group does not
// grow with every instance ever started.
func (s *redisSpool) forgetConsumers(consumer, account string) error {
	ctx, cancel := s.ctx()
	defer cancel()
	err := s.client.eval(ctx, redisForgetScript.Script, []string{s.streamKey(account)},
		redisSpoolGroup, consumer, goneConsumerIdle.Milliseconds()).Err()
	if redis.HasErrorPrefix(err, "NOGROUP") || redis.HasErrorPrefix(err, "no such key") {
		return nil // the reader makes it
	}
	return s.note(redisForgetScript.name, err)
}

// Interface guards
var (
	_ spoolStore   = (*redisSpool)(nil)
	_ spoolStore   = (*fileSpool)(nil)
	_ redriveStore = (*redisSpool)(nil)
	_ redriveStore = (*fileSpool)(nil)
)
