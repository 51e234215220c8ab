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
)

// The Redis store: one spool shared by every instance that names the same
// Redis and key prefix, so that an instance that dies for good takes no
// delivery with it (README: Several instances).
//
// Keys, after the prefix:
//
//	entry:<event ID>  hash: meta (JSON, as spooled), request (JSON), body,
//	                  size, account; and what changes: state, attempts,
//	                  next (Unix ms), error, rev (bumped by an admin retry)
//	ids               set: every event ID the spool holds
//	stats             hash: pending, dead, bytes
//	stream:<account>  stream of turns, each naming an entry and its rev
//	consumer:<name>   the lease on an instance's consumer name
//
// Each stream has one consumer group, and each instance is a consumer of
// it. The instance that reads a turn holds its entry: the turn stays in its
// pending list, through every backoff, until the entry is delivered or
// becomes a dead letter, or the instance stops and hands it back (a new
// turn), and it renews the claim every quarter of claim_after. A turn left unrenewed for claim_after (its instance died) is
// taken over by another instance with XAUTOCLAIM. Every script checks, in
// Redis, that the turn is still this instance's and still the entry's
// current one before it acts on it.

// redisSpoolGroup is the consumer group of every stream.
const redisSpoolGroup = "trivialsec_webhook"

// redisReadBlock is how long a read waits for new turns: also how long
// the store takes to stop, and to start reading a new account's stream.
const redisReadBlock = 250 * time.Millisecond

// redisBatch bounds what one call reads, claims or renews.
const redisBatch = 128

type redisSpool struct {
	*scheduler // its index: the entries this instance holds
	client     *redisClient
	prefix     string

	openMu sync.Mutex
	opened bool
	name   string                     // the consumer name this instance wants: host and Caddy instance ID
	lease  string                     // the random value of our lease on consumer:<name>
	down   atomic.Bool                // Redis did not answer the last call
	last   atomic.Pointer[spoolStats] // what stats read last

	// Under mu: our consumer name while we hold its lease ("" until then),
	// and the accounts whose streams we read, with their own turns read
	// back at start.
	consumer string
	reading  map[string]bool
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
		s := &redisSpool{client: client, prefix: prefix, reading: make(map[string]bool)}
		s.scheduler = newScheduler(s, true, policy)
		s.last.Store(new(spoolStats))
		return s, nil
	})
	if err != nil {
		return nil, "", err
	}
	s := v.(*redisSpool)
	s.setPolicy(policy)
	return s, key, nil
}

func (s *redisSpool) entryKey(id string) string       { return s.prefix + "entry:" + id }
func (s *redisSpool) streamKey(account string) string { return s.prefix + "stream:" + account }

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

// start starts reading turns, renewing claims and taking over those of
// instances that died. It needs no answer from Redis: the loops wait for
// one.
func (s *redisSpool) start() error {
	s.openMu.Lock()
	defer s.openMu.Unlock()
	if s.opened {
		return nil
	}
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "localhost"
	}
	id, err := caddy.InstanceID()
	if err != nil {
		return fmt.Errorf("spool redis: Caddy's instance ID, which names this instance's consumer: %v", err)
	}
	s.name, s.lease = host+"/"+id.String(), randomHex(16)
	s.opened = true
	s.workers.Add(3)
	go s.redriveLoop()
	go s.readLoop()
	go s.keepLoop()
	return nil
}

// Destruct stops the loops, hands the turns this instance held back to the
// other instances, gives up the consumer name, and lets go of the client,
// with the last config using the store. A turn it could not hand back (Redis
// did not answer) is taken over after claim_after.
func (s *redisSpool) Destruct() error {
	s.stop()
	s.workers.Wait() // no attempt is under way now
	s.mu.Lock()
	consumer := s.consumer
	held := make([]spoolMeta, 0, len(s.entries))
	for _, m := range s.entries {
		held = append(held, *m)
	}
	s.mu.Unlock()
	if consumer != "" {
		ctx, cancel := context.WithTimeout(context.Background(), handBackTimeout)
		n := s.handBack(ctx, consumer, held)
		if n > 0 {
			s.log().Info("spool: handed the deliveries this instance held back to the other instances", zap.Int("entries", n))
		}
		_ = releaseScript.Run(ctx, s.client, []string{s.prefix + "consumer:" + consumer}, s.lease).Err()
		cancel()
	}
	return s.client.release()
}

// handBackTimeout bounds the hand-back when the store stops.
const handBackTimeout = 5 * time.Second

// handBack ends the turns of held, none of them in flight, and adds a new
// turn for each, which any instance may read at once. It returns how many
// it handed back.
func (s *redisSpool) handBack(ctx context.Context, consumer string, held []spoolMeta) (n int) {
	for _, m := range held {
		id := m.EventID.String()
		ok, err := redisHandBackScript.Run(ctx, s.client, []string{s.streamKey(m.Account), s.entryKey(id)},
			redisSpoolGroup, consumer, m.turn, m.rev, id).Int()
		if err != nil {
			return n
		}
		n += ok
	}
	return n
}

// The scripts. Each acts on one entry and its turn at once, so that no
// other instance's script runs in between.
var (
	// KEYS: entry, ids, stats, stream. ARGV: event ID, meta, request, body,
	// size, account, next, max_size, attempts, error.
	redisAddScript = redis.NewScript(`
local state = redis.call('HGET', KEYS[1], 'state')
if state then return state end
local bytes = tonumber(redis.call('HGET', KEYS[3], 'bytes') or '0')
if bytes + tonumber(ARGV[5]) > tonumber(ARGV[8]) then return 'full' end
redis.call('HSET', KEYS[1], 'meta', ARGV[2], 'request', ARGV[3], 'body', ARGV[4], 'size', ARGV[5],
	'account', ARGV[6], 'state', 'pending', 'attempts', ARGV[9], 'next', ARGV[7], 'error', ARGV[10], 'rev', 1)
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'bytes', ARGV[5])
redis.call('HINCRBY', KEYS[3], 'pending', 1)
redis.call('XADD', KEYS[4], '*', 'id', ARGV[1], 'rev', 1)
return 'ok'`)

	// KEYS: stream, entry. ARGV: group, consumer, turn, rev. Renews the
	// claim and returns the request and body, if the turn is ours and the
	// entry's current one; a stale turn is acknowledged and deleted.
	redisTakeScript = redis.NewScript(`
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return {'lost'} end
local cur = redis.call('HMGET', KEYS[2], 'rev', 'state', 'request', 'body')
if cur[1] ~= ARGV[4] or cur[2] ~= 'pending' then
	redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
	redis.call('XDEL', KEYS[1], ARGV[3])
	return {'stale'}
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return {'ok', cur[3], cur[4]}`)

	// KEYS: stream, then the entries. ARGV: group, consumer, then each
	// entry's turn and rev. Renews the claims that are still ours, and
	// returns for each entry 1 (renewed), 0 (another instance holds it) or
	// -1 (stale: acknowledged and deleted).
	redisRenewScript = redis.NewScript(`
local out = {}
for i = 2, #KEYS do
	local turn, rev = ARGV[2*i - 1], ARGV[2*i]
	local p = redis.call('XPENDING', KEYS[1], ARGV[1], turn, turn, 1)
	if #p == 0 or p[1][2] ~= ARGV[2] then
		out[i - 1] = 0
	else
		local cur = redis.call('HMGET', KEYS[i], 'rev', 'state')
		if cur[1] ~= rev or cur[2] ~= 'pending' then
			redis.call('XACK', KEYS[1], ARGV[1], turn)
			redis.call('XDEL', KEYS[1], turn)
			out[i - 1] = -1
		else
			redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, turn, 'JUSTID')
			out[i - 1] = 1
		end
	end
end
return out`)

	// KEYS: entry, stats, stream. ARGV: group, consumer, turn, rev, state,
	// attempts, next, error. Saves a failed attempt's outcome; a dead
	// letter's turn ends.
	redisFailedScript = redis.NewScript(`
local p = redis.call('XPENDING', KEYS[3], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
local cur = redis.call('HMGET', KEYS[1], 'rev', 'state')
if cur[1] ~= ARGV[4] or cur[2] ~= 'pending' then
	redis.call('XACK', KEYS[3], ARGV[1], ARGV[3])
	redis.call('XDEL', KEYS[3], ARGV[3])
	return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[5], 'attempts', ARGV[6], 'next', ARGV[7], 'error', ARGV[8])
if ARGV[5] ~= 'pending' then
	redis.call('HINCRBY', KEYS[2], 'pending', -1)
	redis.call('HINCRBY', KEYS[2], ARGV[5], 1)
	redis.call('XACK', KEYS[3], ARGV[1], ARGV[3])
	redis.call('XDEL', KEYS[3], ARGV[3])
end
return 1`)

	// KEYS: entry, ids, stats, and the stream of a turn to end. ARGV: event
	// ID, and the group and turn. Deletes an entry, delivered or dropped.
	redisDeleteScript = redis.NewScript(`
local cur = redis.call('HMGET', KEYS[1], 'state', 'size')
local n = 0
if cur[1] then
	redis.call('DEL', KEYS[1])
	redis.call('SREM', KEYS[2], ARGV[1])
	redis.call('HINCRBY', KEYS[3], cur[1], -1)
	redis.call('HINCRBY', KEYS[3], 'bytes', -tonumber(cur[2]))
	n = 1
end
if KEYS[4] then
	redis.call('XACK', KEYS[4], ARGV[2], ARGV[3])
	redis.call('XDEL', KEYS[4], ARGV[3])
end
return n`)

	// KEYS: entry, stats, stream. ARGV: event ID, now. Makes an entry due
	// now under a new rev, with a new turn: the old turn, wherever it is,
	// is stale.
	redisRetryScript = redis.NewScript(`
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
local rev = redis.call('HINCRBY', KEYS[1], 'rev', 1)
redis.call('HSET', KEYS[1], 'state', 'pending', 'next', ARGV[2])
if state ~= 'pending' then
	redis.call('HINCRBY', KEYS[2], state, -1)
	redis.call('HINCRBY', KEYS[2], 'pending', 1)
end
redis.call('XADD', KEYS[3], '*', 'id', ARGV[1], 'rev', rev)
return 1`)

	// KEYS: stream. ARGV: group, our consumer, idle ms. Deletes the
	// consumers that hold nothing and were not seen for that long: at once,
	// so that none takes a turn in between and loses it with the consumer.
	redisForgetScript = redis.NewScript(`
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
	local f = {}
	for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
	if f['name'] ~= ARGV[2] and f['pending'] == 0 and f['idle'] > tonumber(ARGV[3]) then
		redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
	end
end
return 0`)

	// KEYS: stream, entry. ARGV: group, consumer, turn, rev, event ID.
	// Ends a turn this consumer holds and, if it is the entry's current
	// one, adds a new turn for the same rev, which any consumer may read.
	redisHandBackScript = redis.NewScript(`
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
local cur = redis.call('HMGET', KEYS[2], 'rev', 'state')
if cur[1] ~= ARGV[4] or cur[2] ~= 'pending' then return 0 end
redis.call('XADD', KEYS[1], '*', 'id', ARGV[5], 'rev', ARGV[4])
return 1`)

	// KEYS: the lease. ARGV: its value, its time to live in ms.
	redisLeaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
	return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0`)
)

// add spools an entry: the 202 waits for Redis to have it.
func (s *redisSpool) add(e *spoolEntry) error {
	size, meta, req, err := e.size()
	if err != nil {
		return err
	}
	s.mu.Lock()
	maxSize := s.policy.maxSize
	s.mu.Unlock()
	m := &e.meta
	id := m.EventID.String()
	ctx, cancel := s.ctx()
	defer cancel()
	res, err := redisAddScript.Run(ctx, s.client,
		[]string{s.entryKey(id), s.prefix + "ids", s.prefix + "stats", s.streamKey(m.Account)},
		id, meta, req, e.body, size, m.Account, m.NextAttempt.UnixMilli(), maxSize, m.Attempts, m.LastError).Text()
	switch {
	case err != nil:
		s.failing(err)
		return fmt.Errorf("spool redis: %w", err)
	case res == "full":
		return errSpoolFull
	case res == stateDead:
		return fmt.Errorf("event %s is a dead letter in the spool already", id)
	case res == "ok":
		spoolSpooled.Inc()
	}
	// "pending": spooled already (replay protection off, and the same
	// delivery came again): it will be delivered.
	return nil
}

// take renews this instance's claim on m's turn and reads what to send.
func (s *redisSpool) take(m *spoolMeta) (spoolRequest, []byte, error) {
	var req spoolRequest
	consumer := s.consumerName()
	if consumer == "" {
		return req, nil, errNotHeld
	}
	ctx, cancel := s.ctx()
	defer cancel()
	res, err := redisTakeScript.Run(ctx, s.client, []string{s.streamKey(m.Account), s.entryKey(m.EventID.String())},
		redisSpoolGroup, consumer, m.turn, m.rev).Slice()
	if err != nil {
		s.failing(err)
		return req, nil, fmt.Errorf("%w: %v", errStoreDown, err)
	}
	s.answering()
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

// delivered deletes a delivered entry, and ends its turn. While Redis does
// not answer it tries again, as long as the store runs: an entry left in
// Redis is delivered again.
func (s *redisSpool) delivered(m spoolMeta) {
	id := m.EventID.String()
	keys := []string{s.entryKey(id), s.prefix + "ids", s.prefix + "stats", s.streamKey(m.Account)}
	for {
		ctx, cancel := s.ctx()
		err := redisDeleteScript.Run(ctx, s.client, keys, id, redisSpoolGroup, m.turn).Err()
		cancel()
		if err == nil {
			s.answering()
			return
		}
		s.failing(err)
		if !s.pause(storeDownWait) {
			s.log().Error("spool: a delivered entry could not be deleted before Caddy stopped: it will be delivered again",
				zap.String("event_id", id), zap.Error(err))
			return
		}
	}
}

// failed saves a failed attempt's outcome, if m's turn is still ours.
func (s *redisSpool) failed(m spoolMeta) error {
	var next int64
	if m.State == statePending {
		next = m.NextAttempt.UnixMilli()
	}
	ctx, cancel := s.ctx()
	defer cancel()
	err := redisFailedScript.Run(ctx, s.client,
		[]string{s.entryKey(m.EventID.String()), s.prefix + "stats", s.streamKey(m.Account)},
		redisSpoolGroup, s.consumerName(), m.turn, m.rev, m.State, m.Attempts, next, m.LastError).Err()
	if err != nil {
		s.failing(err)
	}
	return err
}

// list reads every entry of the store, whichever instance holds it.
func (s *redisSpool) list() ([]spoolMeta, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*redisTimeout)
	defer cancel()
	ids, err := s.client.SMembers(ctx, s.prefix+"ids").Result()
	if err != nil {
		return nil, fmt.Errorf("spool redis: %w", err)
	}
	out := make([]spoolMeta, 0, len(ids))
	for chunk := range slices.Chunk(ids, 1000) {
		cmds := make([]*redis.SliceCmd, len(chunk))
		_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, id := range chunk {
				cmds[i] = p.HMGet(ctx, s.entryKey(id), redisMetaFields...)
			}
			return nil
		})
		if err != nil && !errors.Is(err, redis.Nil) {
			return nil, fmt.Errorf("spool redis: %w", err)
		}
		for _, cmd := range cmds {
			if m, ok := metaOf(cmd.Val()); ok {
				out = append(out, m)
			}
		}
	}
	return out, nil
}

// redisMetaFields are what metaOf reads, in its order.
var redisMetaFields = []string{"meta", "state", "attempts", "next", "error", "rev"}

// metaOf makes an entry's metadata from its hash's redisMetaFields; false
// if the entry is gone.
func metaOf(v []any) (spoolMeta, bool) {
	var m spoolMeta
	if len(v) != len(redisMetaFields) {
		return m, false
	}
	str := func(i int) string { s, _ := v[i].(string); return s }
	if err := json.Unmarshal([]byte(str(0)), &m); err != nil || str(1) == "" {
		return m, false
	}
	m.State, m.LastError = str(1), str(4)
	m.Attempts, _ = strconv.Atoi(str(2))
	m.NextAttempt = time.Time{}
	if ms, err := strconv.ParseInt(str(3), 10, 64); err == nil && ms != 0 {
		m.NextAttempt = time.UnixMilli(ms)
	}
	m.rev, _ = strconv.ParseInt(str(5), 10, 64)
	return m, true
}

// stats reads the store's counters; while Redis does not answer, the last
// ones it gave.
func (s *redisSpool) stats() spoolStats {
	ctx, cancel := context.WithTimeout(context.Background(), redisTimeout)
	defer cancel()
	v, err := s.client.HMGet(ctx, s.prefix+"stats", statePending, stateDead, "bytes").Result()
	if err != nil || len(v) != 3 {
		st := *s.last.Load()
		st.down = true
		return st
	}
	n := func(i int) int64 { s, _ := v[i].(string); n, _ := strconv.ParseInt(s, 10, 64); return n }
	st := &spoolStats{pending: n(0), dead: n(1), bytes: n(2)}
	s.last.Store(st)
	return *st
}

// retryNow makes an entry due now, under a new rev: whichever instance
// reads the new turn delivers it.
func (s *redisSpool) retryNow(id uuid.UUID) (bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), redisTimeout)
	defer cancel()
	key := s.entryKey(id.String())
	account, err := s.client.HGet(ctx, key, "account").Result()
	switch {
	case errors.Is(err, redis.Nil):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("spool redis: %w", err)
	}
	n, err := redisRetryScript.Run(ctx, s.client, []string{key, s.prefix + "stats", s.streamKey(account)},
		id.String(), time.Now().UnixMilli()).Int()
	if err != nil {
		return false, fmt.Errorf("spool redis: %w", err)
	}
	return n == 1, nil
}

// remove deletes an entry; the instance that holds its turn finds it gone.
func (s *redisSpool) remove(id uuid.UUID) (bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), redisTimeout)
	defer cancel()
	n, err := redisDeleteScript.Run(ctx, s.client, []string{s.entryKey(id.String()), s.prefix + "ids", s.prefix + "stats"},
		id.String()).Int()
	if err != nil {
		return false, fmt.Errorf("spool redis: %w", err)
	}
	return n == 1, nil
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
	var out []string
	for account := range s.drivers {
		if s.serves(account) {
			out = append(out, account)
		}
	}
	slices.Sort(out)
	return out
}

// readLoop reads new turns from the streams of the accounts this instance
// re-drives, and holds their entries.
func (s *redisSpool) readLoop() {
	defer s.workers.Done()
	for s.stopped.Err() == nil {
		consumer, accounts := s.consumerName(), s.accounts()
		s.mu.Lock()
		for account := range s.reading {
			if !slices.Contains(accounts, account) {
				delete(s.reading, account) // when it comes back, its turns are read back
			}
		}
		s.mu.Unlock()
		if consumer == "" || len(accounts) == 0 {
			s.pause(100 * time.Millisecond)
			continue
		}
		if err := s.startReading(consumer, accounts); err != nil {
			s.failing(err)
			s.pause(storeDownWait)
			continue
		}
		streams := make([]string, 0, 2*len(accounts))
		for _, a := range accounts {
			streams = append(streams, s.streamKey(a))
		}
		for range accounts {
			streams = append(streams, ">")
		}
		res, err := s.client.XReadGroup(s.stopped, &redis.XReadGroupArgs{
			Group: redisSpoolGroup, Consumer: consumer, Streams: streams, Count: redisBatch, Block: redisReadBlock,
		}).Result()
		switch {
		case errors.Is(err, redis.Nil):
			s.answering()
			continue
		case err != nil:
			if strings.HasPrefix(err.Error(), "NOGROUP") { // Redis lost its data
				s.mu.Lock()
				clear(s.reading)
				s.mu.Unlock()
			}
			s.failing(err)
			s.pause(storeDownWait)
			continue
		}
		s.answering()
		for _, st := range res {
			s.hold(strings.TrimPrefix(st.Stream, s.prefix+"stream:"), st.Messages)
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
		if err != nil && !strings.HasPrefix(err.Error(), "BUSYGROUP") {
			return err
		}
		for after := "0"; ; {
			ctx, cancel := s.ctx()
			res, err := s.client.XReadGroup(ctx, &redis.XReadGroupArgs{
				Group: redisSpoolGroup, Consumer: consumer, Streams: []string{s.streamKey(account), after}, Count: redisBatch, Block: -1,
			}).Result()
			cancel()
			if errors.Is(err, redis.Nil) || (err == nil && (len(res) == 0 || len(res[0].Messages) == 0)) {
				break
			}
			if err != nil {
				return err
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

// hold takes the entries of turns this instance just read or claimed into
// its index, and returns how many; turns of entries gone, dead or retried
// since are acknowledged and deleted.
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
	if err != nil && !errors.Is(err, redis.Nil) {
		s.failing(err) // the turns stay in our pending list: claimed again after claim_after
		return 0
	}
	var stale []string
	for i, msg := range msgs {
		m, ok := metaOf(cmds[i].Val())
		if !ok || m.State != statePending || strconv.FormatInt(m.rev, 10) != revs[i] || m.Account != account {
			stale = append(stale, msg.ID)
			continue
		}
		m.turn = msg.ID
		s.mu.Lock()
		if old, ok := s.entries[m.EventID]; ok && old.turn != m.turn && !s.inflight[m.EventID] {
			stale = append(stale, old.turn)
		}
		s.schedule(m)
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
	if err != nil {
		s.failing(err)
	}
}

// keepLoop, every quarter of claim_after: keeps the consumer name's lease,
// renews the claims on the turns this instance holds, and takes over the
// turns other instances left unrenewed for claim_after.
func (s *redisSpool) keepLoop() {
	defer s.workers.Done()
	for {
		s.mu.Lock()
		claimAfter := s.policy.claimAfter
		s.mu.Unlock()
		wait := claimAfter / 4
		if err := s.keep(claimAfter); err != nil {
			s.failing(err)
			wait = min(wait, storeDownWait) // resume soon after Redis answers
		} else {
			s.answering()
		}
		if !s.pause(wait) {
			return
		}
	}
}

func (s *redisSpool) keep(claimAfter time.Duration) error {
	consumer, err := s.keepLease(claimAfter)
	if err != nil || consumer == "" {
		return err
	}
	if err := s.renew(consumer); err != nil {
		return err
	}
	for _, account := range s.accounts() {
		if err := s.claim(consumer, account, claimAfter); err != nil {
			return err
		}
	}
	return nil
}

// keepLease takes the lease on our consumer name, or renews it. A name
// another live process holds (one that shares Caddy's data directory, and
// so its instance ID) gets a random suffix. A lease lost while Redis did
// not answer lets go of every turn this instance held.
func (s *redisSpool) keepLease(claimAfter time.Duration) (string, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	consumer := s.consumerName()
	if consumer != "" {
		n, err := redisLeaseScript.Run(ctx, s.client, []string{s.prefix + "consumer:" + consumer}, s.lease, claimAfter.Milliseconds()).Int()
		if err != nil || n == 1 {
			return consumer, err
		}
		s.log().Error("spool: this instance lost the lease on its consumer name (redis lost its data, or did not answer for claim_after): it lets go of the deliveries it held, which another instance, or this one, takes over after claim_after", zap.String("consumer", consumer))
		s.mu.Lock()
		s.consumer = ""
		for _, m := range s.entries {
			s.unindex(m)
		}
		clear(s.reading)
		s.mu.Unlock()
	}
	for _, name := range []string{s.name, s.name + "/" + randomHex(4)} {
		ok, err := s.client.SetNX(ctx, s.prefix+"consumer:"+name, s.lease, claimAfter).Result()
		if err != nil {
			return "", err
		}
		if ok {
			if name != s.name {
				s.log().Warn("spool: another live process uses this instance's consumer name (does it share Caddy's data directory?): this one takes another", zap.String("consumer", name))
			}
			s.mu.Lock()
			s.consumer = name
			s.mu.Unlock()
			return name, nil
		}
	}
	return "", errors.New("no consumer name could be taken")
}

// renew renews the claims on the turns this instance holds, and lets go of
// those that are stale or another's. Those of an account it no longer
// serves (a reload dropped it) it hands back.
func (s *redisSpool) renew(consumer string) error {
	byAccount := make(map[string][]spoolMeta)
	var unserved []spoolMeta
	s.mu.Lock()
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
		s.handBack(ctx, consumer, unserved)
		cancel()
	}
	for account, held := range byAccount {
		for chunk := range slices.Chunk(held, redisBatch) {
			keys := []string{s.streamKey(account)}
			args := []any{redisSpoolGroup, consumer}
			for _, m := range chunk {
				keys = append(keys, s.entryKey(m.EventID.String()))
				args = append(args, m.turn, m.rev)
			}
			ctx, cancel := s.ctx()
			res, err := redisRenewScript.Run(ctx, s.client, keys, args...).Int64Slice()
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

// claim takes over the turns of an account's stream left unrenewed for
// claimAfter: their instance died, or lost Redis for that long.
func (s *redisSpool) claim(consumer, account string, claimAfter time.Duration) error {
	for start, rounds := "0-0", 0; rounds < 100; rounds++ {
		ctx, cancel := s.ctx()
		msgs, next, err := s.client.XAutoClaim(ctx, &redis.XAutoClaimArgs{
			Stream: s.streamKey(account), Group: redisSpoolGroup, Consumer: consumer,
			MinIdle: claimAfter, Start: start, Count: redisBatch,
		}).Result()
		cancel()
		if err != nil {
			if strings.HasPrefix(err.Error(), "NOGROUP") {
				return nil // the reader makes it
			}
			return err
		}
		if held := s.hold(account, msgs); held > 0 {
			spoolTakenOver.Add(float64(held))
			s.log().Info("spool: took over deliveries another instance left unfinished for claim_after", zap.Int("entries", held))
		}
		if next == "0-0" {
			break
		}
		start = next
	}
	return s.forgetConsumers(consumer, account)
}

// goneConsumerIdle is how long a consumer that holds nothing may go unseen
// before it leaves the group: an instance replaced, or a name taken for one
// run. A live instance reads every redisReadBlock.
const goneConsumerIdle = time.Hour

// forgetConsumers deletes the consumers of an account's stream that hold
// nothing and were not seen for goneConsumerIdle, so that the group does not
// grow with every instance ever started.
func (s *redisSpool) forgetConsumers(consumer, account string) error {
	ctx, cancel := s.ctx()
	defer cancel()
	err := redisForgetScript.Run(ctx, s.client, []string{s.streamKey(account)},
		redisSpoolGroup, consumer, goneConsumerIdle.Milliseconds()).Err()
	if err != nil && strings.Contains(err.Error(), "NOGROUP") {
		return nil // the reader makes it
	}
	return err
}

// Interface guards
var (
	_ spoolStore   = (*redisSpool)(nil)
	_ spoolStore   = (*fileSpool)(nil)
	_ redriveStore = (*redisSpool)(nil)
	_ redriveStore = (*fileSpool)(nil)
)
