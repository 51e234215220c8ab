package trivialsecwebhook

import (
	"context"
	"errors"
	"testing"
	"time"

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
	if st := s.stats(); st.pending != 1 || st.bytes != e.meta.Size {
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
	if _, _, err := as(s, "a").take(&m); !errors.Is(err, errNotHeld) {
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
	req, body, err := as(s, "b").take(&m)
	if err != nil || string(body) != `{"a": 1}` || req.RequestURI != "/webhook?x=1" {
		t.Fatalf("take by b: %+v %q %v", req, body, err)
	}
	keys := []string{s.streamKey(testAccount), s.entryKey(m.EventID.String())}
	for consumer, want := range map[string]int64{"a": 0, "b": 1} {
		res, err := redisRenewScript.Run(context.Background(), s.client, keys, redisSpoolGroup, consumer, m.turn, m.rev).Int64Slice()
		if err != nil || len(res) != 1 || res[0] != want {
			t.Errorf("renewal by %s: %v %v, want %d", consumer, res, err, want)
		}
	}

	m.State, m.Attempts, m.LastError = stateDead, 2, "410 Gone"
	if err := as(s, "a").failed(m); err != nil {
		t.Fatal(err)
	}
	if l := listed(t, s); l[0].State != statePending {
		t.Fatalf("a saved an outcome on b's turn: %+v", l[0])
	}
	if err := as(s, "b").failed(m); err != nil {
		t.Fatal(err)
	}
	if l := listed(t, s); l[0].State != stateDead || l[0].LastError != "410 Gone" || l[0].Attempts != 2 {
		t.Fatalf("after the dead letter: %+v", l[0])
	}
	if st := s.stats(); st.pending != 0 || st.dead != 1 {
		t.Fatalf("stats %+v", st)
	}
	if pending, _ := s.client.XPending(context.Background(), s.streamKey(testAccount), redisSpoolGroup).Result(); pending.Count != 0 {
		t.Fatalf("a dead letter's turn is still pending: %+v", pending)
	}

	if found, err := s.remove(m.EventID); !found || err != nil {
		t.Fatalf("remove: %v %v", found, err)
	}
	if found, _ := s.remove(m.EventID); found {
		t.Error("removed twice")
	}
	if st := s.stats(); st != (spoolStats{}) || len(listed(t, s)) != 0 {
		t.Fatalf("after remove: %+v", st)
	}
}

// TestRedisSpoolFull: max_size holds for the whole shared store.
func TestRedisSpoolFull(t *testing.T) {
	srv := testredis.Start(t)
	s := openTestRedisSpool(t, srv)
	small := testEntry("{}")
	if _, _, _, err := small.size(); err != nil {
		t.Fatal(err)
	}
	p := testPolicy
	p.maxSize = small.meta.Size + 10
	s.setPolicy(p)
	if err := s.add(small); err != nil {
		t.Fatal(err)
	}
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
