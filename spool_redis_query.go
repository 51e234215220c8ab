package trivialsecwebhook

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// The Redis store's answers to the admin API (spool_query.go), from its
// indexes rather than its entries: a page reads the indexes the filter
// selects from where the cursor is, and only the entries on the page; a
// summary reads the stats hash and the heads of waiting and due. Each
// index holds the entries stored as one state (pending or dead) of one
// event name and account, by spooled ms, and the scripts that change an
// entry keep it, and its counts in stats, at once. Which pending entries
// are parked is this instance's view: those of an account that no
// handler of it serves, whose indexes are known by their name.

// redisIndex is one index, and what stats counts of it.
type redisIndex struct {
	state, event, account string // state as stored: pending or dead
	key                   string
	count                 spoolCount
}

// indexes reads, from stats, the indexes that hold entries.
func (s *redisSpool) indexes(ctx context.Context) ([]redisIndex, error) {
	stats, err := s.client.HGetAll(ctx, s.prefix+"stats").Result()
	if s.note("HGETALL", err) != nil {
		return nil, fmt.Errorf("spool redis: %w", err)
	}
	var out []redisIndex
	for f, v := range stats {
		rest, ok := strings.CutPrefix(f, "n:")
		if !ok {
			continue
		}
		state, sfx, _ := strings.Cut(rest, ":")
		event, account, ok := parseIndexSuffix(sfx)
		if !ok || (state != statePending && state != stateDead) {
			continue
		}
		n, _ := strconv.ParseInt(v, 10, 64)
		bytes, _ := strconv.ParseInt(stats["bytes:"+rest], 10, 64)
		out = append(out, redisIndex{state: state, event: event, account: account, key: s.indexKey(state, sfx),
			count: spoolCount{Entries: n, Bytes: bytes}})
	}
	slices.SortFunc(out, func(a, b redisIndex) int { return strings.Compare(a.key, b.key) })
	return out, nil
}

// shown is the state a listing shows an index's entries in: a pending
// entry of an account no handler of this instance serves is parked.
func (ix *redisIndex) shown(handled map[string]bool) string {
	if ix.state == statePending && !handled[ix.account] {
		return stateParked
	}
	return ix.state
}

// redisQueryTimeout bounds a page or a summary.
const redisQueryTimeout = 10 * redisTimeout

// page reads the indexes f selects, merged in spooled order from the
// cursor on, and the entries on the page; the total is what those indexes
// hold in f's spooled range. An entry that is gone, or no longer in the
// index's state, when the page reads it (it changed meanwhile) is left
// out, and the page reads on.
func (s *redisSpool) page(f spoolFilter, after *spoolCursor, limit int) ([]spoolMeta, int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), redisQueryTimeout)
	defer cancel()
	all, err := s.indexes(ctx)
	if err != nil {
		return nil, 0, err
	}
	handled := s.handled()
	kinds := f // the states and event name only: each index's range is read
	kinds.after, kinds.before = time.Time{}, time.Time{}
	lo, hi := "-inf", "+inf"
	var from int64 = -1 << 62
	if !f.after.IsZero() {
		from = f.after.UnixMilli()
		lo = strconv.FormatInt(from, 10)
	}
	if !f.before.IsZero() {
		hi = "(" + strconv.FormatInt(f.before.UnixMilli(), 10)
	}
	var last *indexPlace
	if after != nil {
		last = &indexPlace{ms: after.ms, id: after.id.String()}
		from = max(from, after.ms)
	}
	var reads []*indexRead
	for _, ix := range all {
		if f.selectsState(ix.state) && kinds.selects(ix.shown(handled), ix.event, ix.account, 0) {
			reads = append(reads, &indexRead{redisIndex: ix, from: from, last: last, hi: hi})
		}
	}
	if len(reads) == 0 {
		return nil, 0, nil
	}
	counts := make([]*redis.IntCmd, len(reads))
	_, err = s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, r := range reads {
			counts[i] = p.ZCount(ctx, r.key, lo, hi)
		}
		return nil
	})
	if s.note("ZCOUNT", err) != nil {
		return nil, 0, fmt.Errorf("spool redis: %w", err)
	}
	var total int64
	for _, c := range counts {
		total += c.Val()
	}
	chunk := int64(max(16, min(limit, 2*limit/len(reads)+1)))
	for _, r := range reads {
		r.chunk = chunk
	}
	out := make([]spoolMeta, 0, limit)
	for len(out) < limit {
		if err := s.fill(ctx, reads); err != nil {
			return nil, 0, err
		}
		picked := pickNext(reads, limit-len(out), &last)
		if len(picked) == 0 {
			if slices.ContainsFunc(reads, func(r *indexRead) bool { return !r.done }) {
				continue // a chunk held only members already read
			}
			break
		}
		metas, err := s.readPicked(ctx, picked, f, handled)
		if err != nil {
			return nil, 0, err
		}
		out = append(out, metas...)
	}
	return out, total, nil
}

// indexPlace is a place in an index: a member's score (spooled ms) and
// event ID. The members of one score are in the order of their text,
// which for UUIDs (lowercase hex) is the order of their bytes, as
// spoolCursor.compare orders them.
type indexPlace struct {
	ms int64
	id string
}

func (p indexPlace) after(o *indexPlace) bool {
	return o == nil || p.ms > o.ms || (p.ms == o.ms && p.id > o.id)
}

// indexRead reads one index in chunks, from a score on. It reads each
// chunk from the score of the last member it read, past as many members
// of that score as it read (less indexTieMargin, in case some were
// deleted meanwhile), and keeps only the members after the last one.
type indexRead struct {
	redisIndex
	hi    string // the range's upper bound, as ZRANGE takes it
	from  int64  // the score the next chunk starts at
	skip  int64  // how many members of score from it read
	last  *indexPlace
	chunk int64
	buf   []indexPlace
	done  bool
}

// indexTieMargin is how many of the members of one score already read a
// chunk reads again.
const indexTieMargin = 8

// maxIndexChunk bounds a chunk.
const maxIndexChunk = 4096

// fill reads the next chunk of each index read whose members are all
// taken, and that has more, in one round trip.
func (s *redisSpool) fill(ctx context.Context, reads []*indexRead) error {
	var need []*indexRead
	for _, r := range reads {
		if len(r.buf) == 0 && !r.done {
			need = append(need, r)
		}
	}
	if len(need) == 0 {
		return nil
	}
	cmds := make([]*redis.ZSliceCmd, len(need))
	offsets := make([]int64, len(need))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, r := range need {
			// The members of score from read already, again: all of them
			// while they fill at most half a chunk (the chunk then holds
			// new ones too), so that none deleted meanwhile makes the
			// offset skip one; past that, all but indexTieMargin.
			if r.skip > r.chunk/2 {
				offsets[i] = max(0, r.skip-indexTieMargin)
			}
			cmds[i] = p.ZRangeArgsWithScores(ctx, redis.ZRangeArgs{Key: r.key, ByScore: true,
				Start: strconv.FormatInt(r.from, 10), Stop: r.hi, Offset: offsets[i], Count: r.chunk})
		}
		return nil
	})
	if s.note("ZRANGE", err) != nil {
		return fmt.Errorf("spool redis: %w", err)
	}
	for i, r := range need {
		zs := cmds[i].Val()
		r.done = int64(len(zs)) < r.chunk
		// Where the members of score from start in zs: the chunk skipped
		// some of them.
		start := -offsets[i]
		for j, z := range zs {
			id, _ := z.Member.(string)
			p := indexPlace{ms: int64(z.Score), id: id}
			if p.ms != r.from {
				r.from, r.skip, start = p.ms, 0, int64(j)
			}
			r.skip = max(r.skip, int64(j)-start+1)
			if p.after(r.last) {
				r.buf = append(r.buf, p)
				r.last = &p
			}
		}
		r.chunk = min(2*r.chunk, maxIndexChunk)
	}
	return nil
}

// pickedEntry is a member taken from an index read, for the page.
type pickedEntry struct {
	read *indexRead
	id   string
}

// pickNext takes up to n members off the index reads, the first in
// spooled order first, as long as each read that has more holds some:
// one that holds none may have the next. A member at or before *last, the
// page's place (an entry read from one index, then from another it moved
// to meanwhile), is dropped; *last moves to each member taken.
func pickNext(reads []*indexRead, n int, last **indexPlace) []pickedEntry {
	var out []pickedEntry
	for len(out) < n {
		var first *indexRead
		for _, r := range reads {
			if len(r.buf) == 0 {
				if !r.done {
					return out
				}
				continue
			}
			if first == nil || first.buf[0].after(&r.buf[0]) {
				first = r
			}
		}
		if first == nil {
			break
		}
		p := first.buf[0]
		first.buf = first.buf[1:]
		if !p.after(*last) {
			continue
		}
		*last = &p
		out = append(out, pickedEntry{read: first, id: p.id})
	}
	return out
}

// redisUnindexScript takes an entry out of an index, or a due set (whose
// entries are pending), unless it is stored in that state. KEYS: the
// index or due set, the entry. ARGV: event ID, the state.
var redisUnindexScript = newRedisScript("the spool's index clean-up script (HGET, ZREM)", `
if redis.call('HGET', KEYS[2], 'state') == ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1`)

// readPicked reads the entries picked, in one round trip, with their
// times on Redis's clock, and keeps those f selects. One that is gone, or
// no longer in its index's state, is taken out of the index unless it is
// back in that state by then: a trim of an index, run without
// wait_replicas's WAIT (the scripts that change entries keep the indexes;
// an instance of an earlier version does not).
func (s *redisSpool) readPicked(ctx context.Context, picked []pickedEntry, f spoolFilter, handled map[string]bool) ([]spoolMeta, error) {
	cmds := make([]*redis.SliceCmd, len(picked))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, e := range picked {
			cmds[i] = p.HMGet(ctx, s.entryKey(e.id), redisMetaFields...)
		}
		return nil
	})
	if s.note("HMGET", err) != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("spool redis: %w", err)
	}
	out := make([]spoolMeta, 0, len(picked))
	for i, e := range picked {
		rm, ok := metaOf(cmds[i].Val())
		if !ok || rm.State != e.read.state {
			err := redisUnindexScript.Run(ctx, s.client.Client, []string{e.read.key, s.entryKey(e.id)}, e.id, e.read.state).Err()
			s.note(redisUnindexScript.name, err)
			continue
		}
		m := rm.spoolMeta
		m.SpooledAt, m.NextAttempt = redisTime(rm.spooledMs), redisTime(rm.nextMs)
		if m.State == statePending && !handled[m.Account] {
			m.State = stateParked
		}
		if f.selects(m.State, m.EventName, m.Account, rm.spooledMs) {
			out = append(out, m)
		}
	}
	return out, nil
}

// summary counts from stats, per index; the oldest pending entry is the
// head of waiting, the next attempt the earliest head of the due sets of
// the accounts this instance serves (a parked entry has none, as the
// listing shows it).
func (s *redisSpool) summary() (spoolSummary, error) {
	var sum spoolSummary
	sum.breakers = s.breakers()
	ctx, cancel := context.WithTimeout(context.Background(), redisQueryTimeout)
	defer cancel()
	all, err := s.indexes(ctx)
	if err != nil {
		return sum, err
	}
	handled := s.handled()
	for _, ix := range all {
		sum.countState(ix.shown(handled), ix.count)
		sum.countEvent(ix.event, ix.state, ix.count)
	}
	sum.oldestPending = redisTime(s.oldestMs(ctx))
	sum.nextAttempt = redisTime(s.nextMs(ctx, handled))
	return sum, nil
}

// redisUndueScript puts the head of due right: it takes an entry out
// unless it is pending, and moves it to its next attempt if that is not
// its score. KEYS: due, the entry. ARGV: event ID, its score. 1 if it did
// either.
var redisUndueScript = newRedisScript("the spool's due clean-up script (HMGET, ZREM, ZADD)", `
local cur = redis.call('HMGET', KEYS[2], 'state', 'next')
if cur[1] ~= 'pending' then
	redis.call('ZREM', KEYS[1], ARGV[1])
	return 1
end
if tonumber(cur[2]) ~= tonumber(ARGV[2]) then
	redis.call('ZADD', KEYS[1], tonumber(cur[2]) or 0, ARGV[1])
	return 1
end
return 0`)

// nextMs is the earliest next attempt of a pending entry of the handled
// accounts, Unix ms of Redis's clock: the earliest head of their due
// sets, each put right first if an instance of an earlier version changed
// its entry (a trim, as in oldestMs). 0 when none is pending, or when
// Redis does not say.
func (s *redisSpool) nextMs(ctx context.Context, handled map[string]bool) int64 {
	var next int64
	for account := range handled {
		if ms := s.dueHead(ctx, s.dueKey(account)); ms != 0 && (next == 0 || ms < next) {
			next = ms
		}
	}
	return next
}

// dueHead is the score of a due set's head, put right first.
func (s *redisSpool) dueHead(ctx context.Context, key string) int64 {
	for range redisOldestTries {
		head, err := s.client.ZRangeWithScores(ctx, key, 0, 0).Result()
		if s.note("ZRANGE", err) != nil || len(head) == 0 {
			return 0
		}
		id, _ := head[0].Member.(string)
		n, err := redisUndueScript.Run(ctx, s.client.Client, []string{key, s.entryKey(id)}, id, int64(head[0].Score)).Int()
		if s.note(redisUndueScript.name, err) != nil || n == 0 {
			return int64(head[0].Score)
		}
	}
	return 0
}
