package trivialsecwebhook

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// openTestRedisSpool makes a Redis store on srv, its loops not started:
// the test plays the instances, by consumer name.
func openTestRedisSpool(t *testing.T, srv *testredis.Server) *redisSpool {
	t.Helper()
	s, key, err := loadRedisSpool(srv.URL(), "test:spool:", testPolicy)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = spools.Delete(key) })
	return s
}

// read takes the next new turn of the account's stream as consumer.
func read(t *testing.T, s *redisSpool, consumer string) redis.XMessage {
	t.Helper()
	ctx := context.Background()
	stream := s.streamKey(testAccount)
	if err := s.client.XGroupCreateMkStream(ctx, stream, redisSpoolGroup, "0").Err(); err != nil && err.Error() != "BUSYGROUP Consumer Group name already exists" {
		t.Fatal(err)
	}
	res, err := s.client.XReadGroup(ctx, &redis.XReadGroupArgs{Group: redisSpoolGroup, Consumer: consumer, Streams: []string{stream, ">"}, Count: 1, Block: -1}).Result()
	if err != nil || len(res) != 1 || len(res[0].Messages) != 1 {
		t.Fatalf("read: %v %v", res, err)
	}
	return res[0].Messages[0]
}

// as makes s act as consumer.
func as(s *redisSpool, consumer string) *redisSpool {
	s.mu.Lock()
	s.consumer = consumer
	s.mu.Unlock()
	return s
}

// leased makes s act as consumer, holding its lease for a minute: the
// scripts act on consumer's turns only under it.
func leased(t *testing.T, s *redisSpool, consumer string) *redisSpool {
	t.Helper()
	if s.lease == "" {
		s.lease = randomHex(16)
	}
	if ok, err := s.holdLease(consumer, time.Minute, true); !ok || err != nil {
		t.Fatalf("the lease on %s: %v %v", consumer, ok, err)
	}
	return as(s, consumer)
}

// TestRedisSpoolTurns: each script acts on an entry only through the turn
// that is both its consumer's and the entry's current one. A turn made
// stale by an admin retry is ended by whoever meets it; another instance's
// turn is left alone; counters follow every change.
func TestRedisSpoolTurns(t *testing.T) {
	srv := testredis.Start(t)
	s := openTestRedisSpool(t, srv)
	e := testEntry(`{"a": 1}`)
	e.meta.Account = testAccount
	if err := s.add(e); err != nil {
		t.Fatal(err)
	}
	if err := s.add(e); err != nil { // the same delivery again: spooled once
		t.Fatal(err)
	}
	// No handler of this store serves the account: parked, here.
	if st := s.stats(); st.parked != 1 || st.pending != 0 || st.bytes <= e.meta.Size {
		t.Fatalf("stats %+v after adding %d bytes", st, e.meta.Size)
	}
	first := read(t, s, "a")
	listing := listed(t, s)
	if len(listing) != 1 || listing[0].rev != 1 {
		t.Fatalf("listing %+v", listing)
	}
	m := listing[0]
	m.turn = first.ID

	if found, err := s.retryNow(m.EventID); !found || err != nil {
		t.Fatalf("retry: %v %v", found, err)
	}
	if _, _, err := leased(t, s, "a").take(&m); !errors.Is(err, errNotHeld) {
		t.Fatalf("take of a turn made stale by a retry: %v", err)
	}
	if n, _ := s.client.XLen(context.Background(), s.streamKey(testAccount)).Result(); n != 1 {
		t.Fatalf("the stream holds %d turns, want the retry's only", n)
	}

	second := read(t, s, "b")
	m.turn, m.rev = second.ID, 2
	if _, _, err := as(s, "a").take(&m); !errors.Is(err, errNotHeld) {
		t.Fatalf("take of b's turn by a: %v", err)
	}
	req, body, err := leased(t, s, "b").take(&m)
	if err != nil || string(body) != `{"a": 1}` || req.RequestURI != "/webhook?x=1" {
		t.Fatalf("take by b: %+v %q %v", req, body, err)
	}
	for consumer, want := range map[string]int64{"a": 0, "b": 1} {
		keys, args := s.turnBatch(testAccount, consumer, []spoolMeta{m}, func(m spoolMeta) []any { return []any{m.turn, m.rev} })
		res, err := redisRenewScript.Run(context.Background(), s.client, keys, args...).Int64Slice()
		if err != nil || len(res) != 1 || res[0] != want {
			t.Errorf("renewal by %s: %v %v, want %d", consumer, res, err, want)
		}
	}

	m.State, m.Attempts, m.LastError = stateDead, 2, "410 Gone"
	if err := as(s, "a").failed(m); err != nil {
		t.Fatal(err)
	}
	if l := listed(t, s); l[0].State == stateDead {
		t.Fatalf("a saved an outcome on b's turn: %+v", l[0])
	}
	if err := as(s, "b").failed(m); err != nil {
		t.Fatal(err)
	}
	if l := listed(t, s); l[0].State != stateDead || l[0].LastError != "410 Gone" || l[0].Attempts != 2 {
		t.Fatalf("after the dead letter: %+v", l[0])
	}
	if st := s.stats(); st.pending+st.parked != 0 || st.dead != 1 {
		t.Fatalf("stats %+v", st)
	}
	if pending, _ := s.client.XPending(context.Background(), s.streamKey(testAccount), redisSpoolGroup).Result(); pending.Count != 0 {
		t.Fatalf("a dead letter's turn is still pending: %+v", pending)
	}

	if found, err := s.removeIf(m.EventID, ""); !found || err != nil {
		t.Fatalf("remove: %v %v", found, err)
	}
	if found, _ := s.removeIf(m.EventID, ""); found {
		t.Error("removed twice")
	}
	if st := s.stats(); st != (spoolStats{maxBytes: s.policy.maxSize}) || len(listed(t, s)) != 0 {
		t.Fatalf("after remove: %+v", st)
	}
}

// TestRedisSpoolFull: max_size holds for the whole shared store.
func TestRedisSpoolFull(t *testing.T) {
	srv := testredis.Start(t)
	s := openTestRedisSpool(t, srv)
	if err := s.add(testEntry("{}")); err != nil {
		t.Fatal(err)
	}
	p := testPolicy
	p.maxSize = s.stats().bytes * 3 / 2 // room for one entry, not two
	s.setPolicy(p)
	if err := s.add(testEntry("{}")); err != errSpoolFull {
		t.Fatalf("the second entry: %v, want errSpoolFull", err)
	}
}

// TestRedisSpoolForgetsGoneConsumers: consumers that hold nothing and were
// not seen for long leave the group; one that holds a turn stays, and so
// does this instance's.
func TestRedisSpoolForgetsGoneConsumers(t *testing.T) {
	srv := testredis.Start(t)
	s := openTestRedisSpool(t, srv)
	e := testEntry("{}")
	e.meta.Account = testAccount
	if err := s.add(e); err != nil {
		t.Fatal(err)
	}
	read(t, s, "holder")
	ctx := context.Background()
	stream := s.streamKey(testAccount)
	for _, name := range []string{"gone", "me"} {
		if err := s.client.XGroupCreateConsumer(ctx, stream, redisSpoolGroup, name).Err(); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(5 * time.Millisecond)
	if err := redisForgetScript.Run(ctx, s.client, []string{stream}, redisSpoolGroup, "me", 1).Err(); err != nil {
		t.Fatal(err)
	}
	consumers, err := s.client.XInfoConsumers(ctx, stream, redisSpoolGroup).Result()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range consumers {
		names = append(names, c.Name)
	}
	if len(names) != 2 || names[0] != "holder" || names[1] != "me" {
		t.Fatalf("consumers left: %v, want holder and me", names)
	}
}

// TestRedisSpoolRoomCountsWhatComesDue: the entries an instance holds that
// come due within a quarter of its claim_after take up room as due ones
// do, when another instance serves their account: an instance that holds
// a worker's worth of them reads no more turns, so that the first reader
// does not take every turn there is. Alone, it counts only those due, so
// that entries it retries soon again and again do not keep it from reading
// the others.
func TestRedisSpoolRoomCountsWhatComesDue(t *testing.T) {
	srv := testredis.Start(t)
	s := openTestRedisSpool(t, srv)
	p := testPolicy
	p.claimAfter = time.Minute
	s.setPolicy(p)
	now := time.Now()
	s.now = func() time.Time { return now }
	s.mu.Lock()
	for i := range defaultRedriveConcurrency {
		at := now.Add(5 * time.Second) // due within claim_after/4
		if i%2 == 0 {
			at = now.Add(time.Hour) // not soon
		}
		s.schedule(spoolMeta{EventID: uuid.New(), State: statePending, Account: testAccount, NextAttempt: at})
	}
	s.mu.Unlock()
	if got, want := s.room(), defaultRedriveConcurrency; got != want {
		t.Errorf("alone: room %d, want %d: only the entries due count", got, want)
	}
	s.mu.Lock()
	s.others[testAccount] = true
	s.mu.Unlock()
	if got, want := s.room(), defaultRedriveConcurrency/2; got != want {
		t.Errorf("another instance serving the account: room %d, want %d: the entries due within claim_after/4 count", got, want)
	}
}

// TestRedisSpoolMeasuresRedisClock: the offset of Redis's clock is measured
// with a TIME call on the store's clock; a sample whose round trip was long
// is not taken.
func TestRedisSpoolMeasuresRedisClock(t *testing.T) {
	srv := testredis.Start(t)
	s := openTestRedisSpool(t, srv)
	var clock time.Time
	step := time.Duration(0)
	s.now = func() time.Time { clock = clock.Add(step); return clock }
	clock = time.Now().Add(-time.Hour) // an hour slow
	s.measureClock()
	if d := time.Duration(s.skew.Load()) * time.Millisecond; d < 59*time.Minute || d > 61*time.Minute {
		t.Fatalf("skew %v, want an hour", d)
	}
	clock, step = time.Now(), time.Second // every sample takes a second
	s.measureClock()
	if d := time.Duration(s.skew.Load()) * time.Millisecond; d < 59*time.Minute || d > 61*time.Minute {
		t.Errorf("a sample with a 1 s round trip was taken: skew %v", d)
	}
}

// TestRedisSpoolTombstoneOutlivesItsToken: a delivered entry whose token
// lives longer than a day keeps its tombstone until after its exp.
func TestRedisSpoolTombstoneOutlivesItsToken(t *testing.T) {
	srv := testredis.Start(t)
	s := openTestRedisSpool(t, srv)
	e := testEntry("{}")
	e.meta.Account = testAccount
	e.meta.ExpiresAt = time.Now().Add(48 * time.Hour)
	if err := s.add(e); err != nil {
		t.Fatal(err)
	}
	if found, err := s.removeIf(e.meta.EventID, ""); !found || err != nil {
		t.Fatalf("remove: %v %v", found, err)
	}
	ttl, err := s.client.PTTL(context.Background(), s.doneKey(e.meta.EventID.String())).Result()
	if want := 48*time.Hour + redisDoneMargin; err != nil || ttl < want-time.Minute || ttl > want {
		t.Errorf("the tombstone lives %v (%v), want %v", ttl, err, want)
	}
}
