package trivialsecwebhook

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// The Redis store's pages and summary, from its indexes, against what it
// holds, read entry by entry (everyEntry): a store with entries of three
// accounts (two served here, one parked) and four event names (one with
// a colon), pending, backed off and dead, spooled so close together that
// many share a millisecond.

var (
	queryAccounts = []string{"a1", "a2", "a3"} // a3: no handler here, its pending entries are parked
	queryEvents   = []string{"report_created", "scan:finished", "x", "user_invited"}
)

// queryStore is a Redis store that serves a1 and a2, as consumer c under
// its lease, and the turns it read, by event ID.
type queryStore struct {
	*redisSpool
	t     *testing.T
	turns map[string]redis.XMessage
	rng   *rand.Rand
}

func newQueryStore(t *testing.T) *queryStore {
	t.Helper()
	s := openTestRedisSpool(t, testredis.Start(t))
	p := testPolicy
	p.maxSize = 1 << 40
	s.setPolicy(p)
	for _, a := range queryAccounts[:2] {
		d := &driver{account: a}
		s.register(d)
		t.Cleanup(func() { s.unregister(d) })
	}
	return &queryStore{redisSpool: leased(t, s, "c"), t: t, turns: make(map[string]redis.XMessage), rng: rand.New(rand.NewPCG(1, 2))}
}

// fill adds n entries, the ith of account i%3 and event name (i/3)%4,
// spooled up to 300 ms ago; then dead-letters one in five, and backs one
// in five off (a failed attempt, due in an hour).
func (q *queryStore) fill(n int) {
	q.t.Helper()
	now := time.Now()
	for i := range n {
		e := testEntry("{}")
		e.meta.Account, e.meta.EventName = queryAccounts[i%3], queryEvents[(i/3)%4]
		e.meta.SpooledAt = now.Add(-time.Duration(q.rng.IntN(300)) * time.Millisecond)
		e.meta.NextAttempt = now.Add(time.Duration(i%7) * time.Second)
		if err := q.add(e); err != nil {
			q.t.Fatal(err)
		}
	}
	q.readTurns()
	i := 0
	for id := range q.turns {
		switch i++; i % 5 {
		case 0:
			q.fail(id, stateDead)
		case 1:
			q.fail(id, statePending)
		}
	}
}

// readTurns reads every new turn of every account's stream.
func (q *queryStore) readTurns() {
	q.t.Helper()
	ctx := context.Background()
	for _, a := range queryAccounts {
		stream := q.streamKey(a)
		if err := q.client.XGroupCreateMkStream(ctx, stream, redisSpoolGroup, "0").Err(); err != nil && !strings.HasPrefix(err.Error(), "BUSYGROUP") {
			q.t.Fatal(err)
		}
		res, err := q.client.XReadGroup(ctx, &redis.XReadGroupArgs{Group: redisSpoolGroup, Consumer: "c", Streams: []string{stream, ">"}, Count: 1 << 20, Block: -1}).Result()
		if err != nil && !errors.Is(err, redis.Nil) {
			q.t.Fatal(err)
		}
		for _, st := range res {
			for _, msg := range st.Messages {
				q.turns[msg.Values["id"].(string)] = msg
			}
		}
	}
}

// fail saves a failed attempt at the pending entry id, through the turn
// read: it becomes state (dead, or pending again, due in an hour).
func (q *queryStore) fail(id, state string) {
	q.t.Helper()
	m := q.meta(id)
	msg := q.turns[id]
	m.turn, m.State, m.Attempts, m.LastError = msg.ID, state, 3, "upstream answered 503"
	fmt.Sscan(msg.Values["rev"].(string), &m.rev)
	m.NextAttempt = q.now().Add(time.Hour)
	if err := q.failed(m); err != nil {
		q.t.Fatal(err)
	}
	delete(q.turns, id)
}

// deliver deletes an entry as a delivery does, ending its turn if one
// was read.
func (q *queryStore) deliver(m spoolMeta) {
	m.turn = "0-0"
	if msg, ok := q.turns[m.EventID.String()]; ok {
		m.turn = msg.ID
		delete(q.turns, m.EventID.String())
	}
	q.delivered(m)
}

// meta is an entry's metadata, as Redis holds it.
func (q *queryStore) meta(id string) spoolMeta {
	q.t.Helper()
	v, err := q.client.HMGet(context.Background(), q.entryKey(id), redisMetaFields...).Result()
	if err != nil {
		q.t.Fatal(err)
	}
	rm, ok := metaOf(v)
	if !ok {
		q.t.Fatalf("entry %s is gone", id)
	}
	return rm.spoolMeta
}

// everyEntry reads every entry the store holds, one by one, as a listing
// shows it: its times on Redis's clock, parked if no handler here serves
// its account. What the indexes answer is checked against it.
func (q *queryStore) everyEntry() []spoolMeta {
	q.t.Helper()
	ctx := context.Background()
	ids, err := q.client.SMembers(ctx, q.prefix+"ids").Result()
	if err != nil {
		q.t.Fatal(err)
	}
	handled := q.handled()
	cmds := make([]*redis.SliceCmd, len(ids))
	if _, err := q.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, id := range ids {
			cmds[i] = p.HMGet(ctx, q.entryKey(id), redisMetaFields...)
		}
		return nil
	}); err != nil {
		q.t.Fatal(err)
	}
	var out []spoolMeta
	for _, cmd := range cmds {
		rm, ok := metaOf(cmd.Val())
		if !ok {
			continue
		}
		m := rm.spoolMeta
		m.SpooledAt, m.NextAttempt = redisTime(rm.spooledMs), redisTime(rm.nextMs)
		if m.State == statePending && !handled[m.Account] {
			m.State = stateParked
		}
		out = append(out, m)
	}
	slices.SortFunc(out, func(a, b spoolMeta) int { return cursorOf(&a).compare(cursorOf(&b)) })
	return out
}

// wantPage is the page and total that every entry read one by one gives.
func wantPage(all []spoolMeta, f spoolFilter, after *spoolCursor, limit int) ([]spoolMeta, int64) {
	var page []spoolMeta
	var total int64
	for _, m := range all {
		if !f.selects(m.State, m.EventName, m.Account, m.SpooledAt.UnixMilli()) {
			continue
		}
		total++
		if (after == nil || cursorOf(&m).compare(*after) > 0) && len(page) < limit {
			page = append(page, m)
		}
	}
	return page, total
}

// samePage reports how got differs from want, "" if not.
func samePage(got, want []spoolMeta) string {
	line := func(m spoolMeta) string {
		return fmt.Sprintf("%s %s %s %d %d %d %q %d", m.EventID, m.EventName, m.State, m.Attempts, m.SpooledAt.UnixMilli(),
			m.NextAttempt.UnixMilli(), m.LastError, m.Size)
	}
	if len(got) != len(want) {
		return fmt.Sprintf("%d entries, want %d", len(got), len(want))
	}
	for i := range got {
		if g, w := line(got[i]), line(want[i]); g != w {
			return fmt.Sprintf("entry %d: %s, want %s", i, g, w)
		}
	}
	return ""
}

// queryFilters are filters of every kind, as the admin API parses them.
func queryFilters(t *testing.T, all []spoolMeta) map[string]spoolFilter {
	t.Helper()
	mid := all[len(all)/2].SpooledAt.UTC().Format(time.RFC3339Nano)
	late := all[3*len(all)/4].SpooledAt.UTC().Format(time.RFC3339Nano)
	out := make(map[string]spoolFilter)
	for _, q := range []string{
		"",
		"state=pending",
		"state=parked",
		"state=dead",
		"state=pending,dead",
		"state=parked,dead",
		"event_name=scan:finished",
		"state=dead&event_name=user_invited",
		"state=parked&event_name=x",
		"event_name=none",
		"spooled_after=" + mid,
		"spooled_before=" + mid,
		"state=pending&spooled_after=" + mid + "&spooled_before=" + late,
	} {
		v, err := url.ParseQuery(strings.ReplaceAll(q, "+", "%2B"))
		if err != nil {
			t.Fatal(err)
		}
		// The store takes any event name (the admin API refuses one the
		// sender does not use): these test the keys' form too.
		name := v.Get("event_name")
		v.Del("event_name")
		f, err := parseSpoolFilter(v)
		if err != nil {
			t.Fatal(err)
		}
		f.eventName = name
		out[q] = f
	}
	return out
}

// walk reads every page of f, limit entries each, checking each against
// what every entry read one by one gives then; between pages it calls
// between. It returns the entries listed.
func (q *queryStore) walk(f spoolFilter, limit int, between func()) []spoolMeta {
	q.t.Helper()
	var listed []spoolMeta
	var after *spoolCursor
	all := q.everyEntry()
	for pages := 0; ; pages++ {
		if pages > 10000 {
			q.t.Fatal("no end to the pages")
		}
		got, total, err := q.page(f, after, limit)
		if err != nil {
			q.t.Fatal(err)
		}
		want, wantTotal := wantPage(all, f, after, limit)
		if diff := samePage(got, want); diff != "" || total != wantTotal {
			q.t.Fatalf("page %d (after %v): %s; total %d, want %d", pages, after, diff, total, wantTotal)
		}
		listed = append(listed, got...)
		if len(got) < limit {
			return listed
		}
		c := cursorOf(&got[len(got)-1])
		after = &c
		if between != nil {
			between()
			all = q.everyEntry()
		}
	}
}

// TestRedisSpoolPage: every page of every filter is what the entries,
// read one by one, give: the same entries in the same order, and the same
// total; every entry is on one page; pages of 7 entries end within a
// millisecond that several entries share.
func TestRedisSpoolPage(t *testing.T) {
	q := newQueryStore(t)
	q.fill(3000)
	all := q.everyEntry()
	shared := 0
	for i := 1; i < len(all); i++ {
		if all[i].SpooledAt.Equal(all[i-1].SpooledAt) {
			shared++
		}
	}
	if shared < 100 {
		t.Fatalf("only %d entries share a millisecond with another: the test does not test ties", shared)
	}
	for name, f := range queryFilters(t, all) {
		for _, limit := range []int{7, 100, maxSpoolPage} {
			t.Run(fmt.Sprintf("%s/limit=%d", name, limit), func(t *testing.T) {
				q.t = t
				listed := q.walk(f, limit, nil)
				want, _ := wantPage(all, f, nil, len(all))
				if diff := samePage(listed, want); diff != "" {
					t.Errorf("every page: %s", diff)
				}
				if name == "state=dead" && len(listed) < 500 || name == "state=parked" && len(listed) < 500 {
					t.Errorf("%d entries: the fill did not make what the test needs", len(listed))
				}
			})
		}
	}
}

// TestRedisSpoolPageWhileItChanges: between pages, entries are delivered,
// deleted, retried, dead-lettered and added; each page is still what the
// entries then give, and each entry that did not change is on one page.
func TestRedisSpoolPageWhileItChanges(t *testing.T) {
	for _, name := range []string{"", "state=pending", "state=dead", "state=parked,dead", "event_name=scan:finished"} {
		t.Run(name, func(t *testing.T) {
			q := newQueryStore(t)
			q.fill(1500)
			all := q.everyEntry()
			f := queryFilters(t, all)[name]
			changed := make(map[uuid.UUID]bool)
			pick := func(ok func(m spoolMeta) bool) (spoolMeta, bool) {
				var of []spoolMeta
				for _, m := range q.everyEntry() {
					if ok(m) {
						of = append(of, m)
					}
				}
				if len(of) == 0 {
					return spoolMeta{}, false
				}
				m := of[q.rng.IntN(len(of))]
				changed[m.EventID] = true
				return m, true
			}
			anyEntry := func(spoolMeta) bool { return true }
			pending := func(m spoolMeta) bool { return m.State != stateDead }
			dead := func(m spoolMeta) bool { return m.State == stateDead }
			held := func(m spoolMeta) bool { _, ok := q.turns[m.EventID.String()]; return ok && m.State != stateDead }
			between := func() {
				if m, ok := pick(anyEntry); ok {
					if ok, err := q.removeIf(m.EventID, ""); !ok || err != nil {
						t.Fatal("remove", ok, err)
					}
				}
				if m, ok := pick(pending); ok {
					q.deliver(m)
				}
				if m, ok := pick(dead); ok {
					if ok, err := q.retryNow(m.EventID); !ok || err != nil {
						t.Fatal("retry", ok, err)
					}
				}
				if m, ok := pick(pending); ok {
					if ok, err := q.retryNow(m.EventID); !ok || err != nil {
						t.Fatal("retry", ok, err)
					}
					delete(q.turns, m.EventID.String()) // stale now
				}
				if m, ok := pick(held); ok {
					q.fail(m.EventID.String(), stateDead)
				}
				e := testEntry("{}")
				e.meta.Account, e.meta.EventName = queryAccounts[q.rng.IntN(3)], queryEvents[q.rng.IntN(4)]
				e.meta.SpooledAt = time.Now().Add(-time.Duration(q.rng.IntN(300)) * time.Millisecond)
				if err := q.add(e); err != nil {
					t.Fatal(err)
				}
				changed[e.meta.EventID] = true
			}
			listed := q.walk(f, 50, between)
			seen := make(map[uuid.UUID]int)
			for _, m := range listed {
				seen[m.EventID]++
			}
			want, _ := wantPage(all, f, nil, len(all))
			for _, m := range want {
				if !changed[m.EventID] && seen[m.EventID] != 1 {
					t.Errorf("entry %s, which did not change, is on %d pages", m.EventID, seen[m.EventID])
				}
			}
			if len(changed) < 20 {
				t.Errorf("only %d entries changed", len(changed))
			}
		})
	}
}

// wantSummary is the summary that every entry read one by one gives.
func wantSummary(all []spoolMeta) spoolSummary {
	var sum spoolSummary
	for _, m := range all {
		c := spoolCount{Entries: 1, Bytes: m.Size}
		sum.countState(m.State, c)
		if m.State == stateParked {
			sum.countEvent(m.EventName, statePending, c)
		} else {
			sum.countEvent(m.EventName, m.State, c)
		}
		if m.State != stateDead {
			sum.oldestPending = earliest(sum.oldestPending, m.SpooledAt)
		}
		if m.State == statePending {
			sum.nextAttempt = earliest(sum.nextAttempt, m.NextAttempt)
		}
	}
	return sum
}

// checkSummary checks the store's summary against every entry read one by
// one.
func (q *queryStore) checkSummary() {
	q.t.Helper()
	got, err := q.summary()
	if err != nil {
		q.t.Fatal(err)
	}
	want := wantSummary(q.everyEntry())
	if g, w := fmt.Sprint(got.states, got.events), fmt.Sprint(want.states, want.events); g != w {
		q.t.Errorf("summary counts:\n%s\nwant\n%s", g, w)
	}
	if !got.oldestPending.Equal(want.oldestPending) || !got.nextAttempt.Equal(want.nextAttempt) {
		q.t.Errorf("summary: oldest pending %v, next attempt %v; want %v, %v", got.oldestPending, got.nextAttempt, want.oldestPending, want.nextAttempt)
	}
	// Each account's due set holds its pending entries, by next attempt:
	// the summary puts a stale head right, but a page of due sets stale
	// throughout would cost a round trip per entry.
	for _, a := range queryAccounts {
		var want []string
		for _, m := range q.everyEntry() {
			if m.Account == a && m.State != stateDead {
				want = append(want, fmt.Sprint(m.EventID, " ", m.NextAttempt.UnixMilli()))
			}
		}
		zs, err := q.client.ZRangeWithScores(context.Background(), q.dueKey(a), 0, -1).Result()
		if err != nil {
			q.t.Fatal(err)
		}
		var got []string
		for _, z := range zs {
			got = append(got, fmt.Sprint(z.Member, " ", int64(z.Score)))
		}
		slices.Sort(want)
		slices.Sort(got)
		if !slices.Equal(got, want) {
			q.t.Errorf("due:%s holds %d entries, want %d, or their next attempts differ", a, len(got), len(want))
		}
	}
}

// TestRedisSpoolSummary: the summary is what the entries, read one by one,
// give, as they change: retried, dead-lettered, delivered, deleted.
func TestRedisSpoolSummary(t *testing.T) {
	q := newQueryStore(t)
	q.checkSummary() // empty
	q.fill(1000)
	q.checkSummary()
	all := q.everyEntry()
	for i, m := range all[:200] {
		switch i % 4 {
		case 0:
			if _, err := q.retryNow(m.EventID); err != nil {
				t.Fatal(err)
			}
			delete(q.turns, m.EventID.String())
		case 1:
			if _, err := q.removeIf(m.EventID, ""); err != nil {
				t.Fatal(err)
			}
		case 2:
			q.deliver(m)
		case 3:
			if _, ok := q.turns[m.EventID.String()]; ok {
				q.fail(m.EventID.String(), stateDead)
			}
		}
	}
	q.checkSummary()
	for _, m := range q.everyEntry() {
		if m.State != stateDead {
			q.deliver(m)
		}
	}
	q.checkSummary() // dead letters only
	if got, err := q.summary(); err != nil || !got.oldestPending.IsZero() || !got.nextAttempt.IsZero() || got.states[stateDead].Entries == 0 {
		t.Errorf("dead letters only: %+v, %v", got, err)
	}
}

// TestRedisSpoolIndexesBackFill: entries an earlier version wrote, and
// changed, without indexes (no event field, no index, no per-index count;
// some without a spooled field), are listed and summed up exactly once the
// store counts again, as it does at start.
func TestRedisSpoolIndexesBackFill(t *testing.T) {
	q := newQueryStore(t)
	q.fill(600)
	ctx := context.Background()
	all := q.everyEntry()
	// As an earlier version leaves them: no event or bytes field, no
	// index, no count per index; an earlier one still, no spooled field,
	// and no waiting.
	for i, m := range all {
		fields := []string{"event", "bytes"}
		if i%3 == 0 {
			fields = append(fields, "spooled")
		}
		if err := q.client.HDel(ctx, q.entryKey(m.EventID.String()), fields...).Err(); err != nil {
			t.Fatal(err)
		}
	}
	keys, err := q.client.Keys(ctx, q.prefix+"idx:*").Result()
	if err != nil || len(keys) < 10 {
		t.Fatalf("index keys %v, %v", keys, err)
	}
	dues, _ := q.client.Keys(ctx, q.prefix+"due:*").Result()
	if err := q.client.Del(ctx, append(append(keys, dues...), q.prefix+"waiting")...).Err(); err != nil {
		t.Fatal(err)
	}
	stats, _ := q.client.HKeys(ctx, q.prefix+"stats").Result()
	for _, f := range stats {
		if strings.HasPrefix(f, "n:") || strings.HasPrefix(f, "bytes:") {
			q.client.HDel(ctx, q.prefix+"stats", f)
		}
	}
	if got, total, err := q.page(spoolFilter{}, nil, 10); err != nil || total != 0 || len(got) != 0 {
		t.Fatalf("before the back-fill: %d entries of %d, %v; want none: the test does not test it", len(got), total, err)
	}
	// An earlier version adds one more.
	old := testEntry("{}")
	old.meta.Account, old.meta.EventName = "a1", "legacy"
	if err := q.add(old); err != nil {
		t.Fatal(err)
	}
	id := old.meta.EventID.String()
	q.client.HDel(ctx, q.entryKey(id), "event", "bytes")
	q.client.ZRem(ctx, q.indexKey(statePending, indexSuffix("legacy", "a1")), id)
	q.client.ZRem(ctx, q.dueKey("a1"), id)
	q.client.HDel(ctx, q.prefix+"stats", "n:pending:"+indexSuffix("legacy", "a1"), "bytes:pending:"+indexSuffix("legacy", "a1"))

	st, err := q.readStats()
	if err != nil {
		t.Fatal(err)
	}
	if countsAddUp(st) {
		t.Fatal("the counts add up without the indexes' counts")
	}
	// The back-fill counts what it indexes, whether the counts are put in
	// place after it or not (the spool may change meanwhile).
	ids, _ := q.client.SMembers(ctx, q.prefix+"ids").Result()
	if err := q.countBatch(ids, make(map[string]int64)); err != nil {
		t.Fatal(err)
	}
	q.checkSummary()
	if err := q.keepCounts(st); err != nil {
		t.Fatal(err)
	}
	if st, _ = q.readStats(); !countsAddUp(st) {
		t.Errorf("after the count, the counts do not add up: %v", st)
	}
	all = q.everyEntry()
	for name, f := range queryFilters(t, all) {
		t.Run(name, func(t *testing.T) {
			q.t = t
			listed := q.walk(f, 100, nil)
			want, _ := wantPage(all, f, nil, len(all))
			if diff := samePage(listed, want); diff != "" {
				t.Errorf("every page: %s", diff)
			}
		})
	}
	q.t = t
	q.checkSummary()
	// What was back-filled changes as any entry does.
	for _, m := range all[:30] {
		if _, err := q.removeIf(m.EventID, ""); err != nil {
			t.Fatal(err)
		}
	}
	q.checkSummary()
	if st, _ = q.readStats(); !countsAddUp(st) {
		t.Errorf("after deletes, the counts do not add up: %v", st)
	}
}

// TestRedisSpoolIndexesOutliveAnEarlierVersion: entries that an instance
// of an earlier version deletes or dead-letters, in their index, are left
// out of a page that meets them, and out of their index then; and out of
// the indexes and their counts once the store counts again.
func TestRedisSpoolIndexesOutliveAnEarlierVersion(t *testing.T) {
	for _, how := range []string{"page", "count"} {
		t.Run(how, func(t *testing.T) {
			q := newQueryStore(t)
			q.fill(300)
			ctx := context.Background()
			var gone, dead []spoolMeta
			for _, m := range q.everyEntry() {
				if m.State == stateDead {
					continue
				}
				switch {
				case len(gone) < 10:
					gone = append(gone, m)
					// The earlier version's delete script.
					q.client.Del(ctx, q.entryKey(m.EventID.String()))
					q.client.SRem(ctx, q.prefix+"ids", m.EventID.String())
					q.client.ZRem(ctx, q.prefix+"waiting", m.EventID.String())
					q.client.HIncrBy(ctx, q.prefix+"stats", statePending, -1)
					q.client.HIncrBy(ctx, q.prefix+"stats", "pending:"+m.Account, -1)
					q.client.HIncrBy(ctx, q.prefix+"stats", "bytes", -m.Size)
				case len(dead) < 10:
					dead = append(dead, m)
					// The earlier version's failed script, to a dead letter.
					q.client.HSet(ctx, q.entryKey(m.EventID.String()), "state", stateDead, "next", 0)
					q.client.ZRem(ctx, q.prefix+"waiting", m.EventID.String())
					q.client.HIncrBy(ctx, q.prefix+"stats", statePending, -1)
					q.client.HIncrBy(ctx, q.prefix+"stats", "pending:"+m.Account, -1)
					q.client.HIncrBy(ctx, q.prefix+"stats", stateDead, 1)
				}
			}
			pending := spoolFilter{states: []string{statePending}}
			if how == "page" {
				got, _, err := q.page(pending, nil, maxSpoolPage)
				if err != nil {
					t.Fatal(err)
				}
				want, _ := wantPage(q.everyEntry(), pending, nil, maxSpoolPage)
				if diff := samePage(got, want); diff != "" {
					t.Errorf("pending, before the count: %s", diff)
				}
			} else {
				st, err := q.readStats()
				if err != nil {
					t.Fatal(err)
				}
				if countsAddUp(st) {
					t.Fatal("the counts add up after an earlier version changed the spool")
				}
				if err := q.keepCounts(st); err != nil {
					t.Fatal(err)
				}
				for name, f := range queryFilters(t, q.everyEntry()) {
					t.Run(name, func(t *testing.T) {
						q.t = t
						q.walk(f, 100, nil)
					})
				}
				q.t = t
				q.checkSummary()
			}
			for _, m := range append(gone, dead...) {
				if err := q.client.ZScore(ctx, q.indexKey(statePending, indexSuffix(m.EventName, m.Account)), m.EventID.String()).Err(); !errors.Is(err, redis.Nil) {
					t.Errorf("entry %s, deleted or dead, is still in its pending index (%v)", m.EventID, err)
				}
			}
		})
	}
}

// TestRedisSpoolPageWithinAMillisecond: 300 entries of one index spooled
// in the same millisecond (a burst) are each on one page, in the order of
// their event IDs, whatever the page's size: the index is read in chunks
// that end within them.
func TestRedisSpoolPageWithinAMillisecond(t *testing.T) {
	q := newQueryStore(t)
	ctx := context.Background()
	ms := time.Now().UnixMilli()
	for range 300 {
		e := testEntry("{}")
		e.meta.Account, e.meta.EventName = "a1", "report_created"
		if err := q.add(e); err != nil {
			t.Fatal(err)
		}
		id := e.meta.EventID.String()
		q.client.HSet(ctx, q.entryKey(id), "spooled", ms)
		q.client.ZAddXX(ctx, q.indexKey(statePending, indexSuffix("report_created", "a1")), redis.Z{Score: float64(ms), Member: id})
		q.client.ZAddXX(ctx, q.prefix+"waiting", redis.Z{Score: float64(ms), Member: id})
	}
	all := q.everyEntry()
	for _, limit := range []int{1, 7, 15, 16, 17, 100, 299, 300} {
		t.Run(fmt.Sprintf("limit=%d", limit), func(t *testing.T) {
			q.t = t
			listed := q.walk(spoolFilter{}, limit, nil)
			if diff := samePage(listed, all); diff != "" {
				t.Errorf("every page: %s", diff)
			}
		})
	}
}

// TestRedisSpoolCountScriptChecksItAddsUp: the count script puts counts in
// place only if they add up to stats' pending and dead, as they do when
// nothing changed the spool during the count.
func TestRedisSpoolCountScriptChecksItAddsUp(t *testing.T) {
	q := newQueryStore(t)
	ctx := context.Background()
	sfx := indexSuffix("x", "a1")
	for _, c := range []struct {
		name string
		args []any
		want int
	}{
		{"adds up", []any{"pending:a1", 2, "n:pending:" + sfx, 2, "n:dead:" + sfx, 1, "bytes:dead:" + sfx, 10}, 1},
		{"an account short", []any{"pending:a1", 1, "n:pending:" + sfx, 2, "n:dead:" + sfx, 1}, 0},
		{"a pending index short", []any{"pending:a1", 2, "n:pending:" + sfx, 1, "n:dead:" + sfx, 1}, 0},
		{"a dead index short", []any{"pending:a1", 2, "n:pending:" + sfx, 2, "n:dead:" + sfx, 0}, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			q.client.Del(ctx, q.prefix+"stats")
			q.client.HSet(ctx, q.prefix+"stats", statePending, 2, stateDead, 1, "n:dead:old", 5)
			n, err := q.run(ctx, redisCountScript, []string{q.prefix + "stats"}, c.args...).Int()
			if err != nil || n != c.want {
				t.Fatalf("%d, %v; want %d", n, err, c.want)
			}
			stale, _ := q.client.HExists(ctx, q.prefix+"stats", "n:dead:old").Result()
			if stale != (c.want == 0) {
				t.Errorf("the count put in place: %v, want %v", !stale, c.want == 1)
			}
		})
	}
}

// TestRedisSpoolPageMerge: the page takes an entry once, even when it is
// in two indexes as the page reads them (it moved from pending to dead
// meanwhile); and a chunk that reads on inside one millisecond skips no
// member when members of it already read are deleted meanwhile.
func TestRedisSpoolPageMerge(t *testing.T) {
	moved := indexPlace{ms: 5, id: "5e123de4-e401-49e3-9a68-092985f22e0b"}
	pending := &indexRead{buf: []indexPlace{{ms: 4, id: "a"}, moved}, done: true}
	dead := &indexRead{buf: []indexPlace{moved, {ms: 6, id: "b"}}, done: true}
	var last *indexPlace
	var ids []string
	for _, p := range pickNext([]*indexRead{pending, dead}, 10, &last) {
		ids = append(ids, p.id)
	}
	if want := []string{"a", moved.id, "b"}; !slices.Equal(ids, want) {
		t.Errorf("picked %v, want %v", ids, want)
	}

	s := openTestRedisSpool(t, testredis.Start(t))
	ctx := context.Background()
	key := s.prefix + "test-index"
	var members []string
	for i := range 40 {
		members = append(members, fmt.Sprintf("%08d-0000-4000-8000-000000000000", i))
	}
	for _, m := range members {
		if err := s.client.ZAdd(ctx, key, redis.Z{Score: 7, Member: m}).Err(); err != nil {
			t.Fatal(err)
		}
	}
	r := &indexRead{redisIndex: redisIndex{key: key}, from: 7, hi: "+inf", chunk: 16}
	var read []string
	take := func() {
		if err := s.fill(ctx, []*indexRead{r}); err != nil {
			t.Fatal(err)
		}
		for _, p := range r.buf {
			read = append(read, p.id)
		}
		r.buf = nil
	}
	take()
	if err := s.client.ZRem(ctx, key, members[2], members[3], members[5], members[7], members[8], members[9],
		members[10], members[11], members[12], members[13], members[14], members[15]).Err(); err != nil {
		t.Fatal(err)
	}
	for !r.done {
		take()
	}
	if !slices.Equal(read, members) {
		t.Errorf("read %d members, want the 40 in order: %v", len(read), read)
	}
}
