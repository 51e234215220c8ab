package trivialsecwebhook

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// TestSpoolOldestPending: each store says when its oldest waiting entry was
// spooled, skipping dead letters and what was delivered; the Redis store
// also for entries an earlier version spooled, which it indexes when it
// counts them. Each says its max_size.
func TestSpoolOldestPending(t *testing.T) {
	now := time.Now()
	spooled := []time.Time{now.Add(-3 * time.Hour), now.Add(-2 * time.Hour), now.Add(-time.Hour)}
	fill := func(t *testing.T, s spoolStore) []spoolMeta {
		if st := s.stats(); !st.oldest.IsZero() || st.maxBytes != testPolicy.maxSize {
			t.Fatalf("empty store: oldest %v, max_bytes %d", st.oldest, st.maxBytes)
		}
		var metas []spoolMeta
		for _, at := range spooled {
			e := testEntry("{}")
			e.meta.SpooledAt = at
			if err := s.add(e); err != nil {
				t.Fatal(err)
			}
			metas = append(metas, e.meta)
		}
		return metas
	}
	oldest := func(t *testing.T, s spoolStore, want time.Time) {
		t.Helper()
		got := s.stats().oldest
		if d := got.Sub(want); d < -time.Second || d > time.Second {
			t.Errorf("oldest = %v, want %v", got, want)
		}
	}
	t.Run("file", func(t *testing.T) {
		s := openTestSpool(t, t.TempDir(), testPolicy)
		defer s.Destruct()
		metas := fill(t, s)
		oldest(t, s, spooled[0])
		s.mu.Lock()
		s.restate(s.entries[metas[0].EventID], stateDead)
		s.mu.Unlock()
		oldest(t, s, spooled[1])
		if _, err := s.removeIf(metas[1].EventID, ""); err != nil {
			t.Fatal(err)
		}
		oldest(t, s, spooled[2])
		// A dead letter retried waits again, as old as it is.
		if _, err := s.retryNow(metas[0].EventID); err != nil {
			t.Fatal(err)
		}
		oldest(t, s, spooled[0])
	})
	t.Run("redis", func(t *testing.T) {
		srv := testredis.Start(t)
		client, err := loadRedisClient(srv.URL())
		if err != nil {
			t.Fatal(err)
		}
		s := newRedisSpool(client, defaultSpoolKeyPrefix, testPolicy)
		defer s.Destruct()
		metas := fill(t, s)
		oldest(t, s, spooled[0])
		admin := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", srv.Port)})
		defer admin.Close()
		ctx := context.Background()
		// A dead letter, as an instance of an earlier version made it:
		// still in waiting, taken out when met.
		_, err = admin.TxPipelined(ctx, func(p redis.Pipeliner) error {
			p.HSet(ctx, s.entryKey(metas[0].EventID.String()), "state", stateDead)
			p.HIncrBy(ctx, defaultSpoolKeyPrefix+"stats", statePending, -1)
			p.HIncrBy(ctx, defaultSpoolKeyPrefix+"stats", "pending:"+testAccount, -1)
			p.HIncrBy(ctx, defaultSpoolKeyPrefix+"stats", stateDead, 1)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		oldest(t, s, spooled[1])
		if n, _ := admin.ZCard(ctx, defaultSpoolKeyPrefix+"waiting").Result(); n != 2 {
			t.Errorf("waiting holds %d entries, want 2", n)
		}
		if _, err := s.removeIf(metas[1].EventID, ""); err != nil {
			t.Fatal(err)
		}
		oldest(t, s, spooled[2])
		// An earlier version kept no index: counting makes it.
		if err := admin.Del(ctx, defaultSpoolKeyPrefix+"waiting").Err(); err != nil {
			t.Fatal(err)
		}
		if got := s.stats().oldest; !got.IsZero() {
			t.Errorf("oldest = %v with no index", got)
		}
		if ok, err := s.count(); !ok || err != nil {
			t.Fatalf("count: %v, %v", ok, err)
		}
		oldest(t, s, spooled[2])
		// A retried dead letter waits again, as old as it is.
		if _, err := s.retryNow(metas[0].EventID); err != nil {
			t.Fatal(err)
		}
		oldest(t, s, spooled[0])
		// With wait_replicas and no replica, the reading's trim of a dead
		// head waits for no replica.
		if err := admin.HSet(ctx, s.entryKey(metas[0].EventID.String()), "state", stateDead).Err(); err != nil {
			t.Fatal(err)
		}
		waiting, err := loadRedisClient(srv.URL() + "?wait_replicas=1&wait_timeout=2s")
		if err != nil {
			t.Fatal(err)
		}
		w := newRedisSpool(waiting, defaultSpoolKeyPrefix, testPolicy)
		defer w.Destruct()
		oldest(t, w, spooled[2])
		if n, _ := admin.ZCard(ctx, defaultSpoolKeyPrefix+"waiting").Result(); n != 1 {
			t.Errorf("waiting holds %d entries, want 1: the dead head was not trimmed", n)
		}
	})
}

// TestOldestWaitingKept: the index keeps its oldest waiting entry as
// entries come, die, come back and go, with dead letters alone between.
func TestOldestWaitingKept(t *testing.T) {
	s := newFileSpool(t.TempDir(), testPolicy)
	now := time.Now()
	at := func(ago time.Duration) spoolMeta {
		return spoolMeta{EventID: uuid.New(), State: statePending, SpooledAt: now.Add(-ago), Account: testAccount}
	}
	check := func(what string, want time.Time) {
		t.Helper()
		if got := s.oldestWaiting(); !got.Equal(want) {
			t.Errorf("%s: oldest %v, want %v", what, got, want)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	check("empty", time.Time{})
	dead := at(3 * time.Hour)
	s.schedule(dead)
	s.restate(s.entries[dead.EventID], stateDead)
	check("a dead letter alone", time.Time{})
	check("a dead letter alone, again", time.Time{})
	young := at(time.Hour)
	s.schedule(young)
	check("one waiting beside it", young.SpooledAt)
	old := at(2 * time.Hour)
	s.schedule(old) // spooled before: held elsewhere, moved in
	check("an older one comes", old.SpooledAt)
	s.restate(s.entries[dead.EventID], statePending) // retried
	check("the dead letter retried", dead.SpooledAt)
	s.scheduler.unindex(s.entries[dead.EventID])
	check("it is delivered", old.SpooledAt)
	s.scheduler.unindex(s.entries[old.EventID])
	s.scheduler.unindex(s.entries[young.EventID])
	check("none left", time.Time{})
}
