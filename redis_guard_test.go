package trivialsecwebhook

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// The tests of Redis as operators run it: an evicting Redis, a user short
// of a permission, Redis Cluster, a Redis that pauses, and one that
// restarts under load. Nothing answered 202 may be lost or delivered
// twice, and no copy may pass.

// redisAdmin is a client with every permission, for what the test itself
// does to Redis.
func redisAdmin(t *testing.T, srv *testredis.Server) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", srv.Port)})
	t.Cleanup(func() { c.Close() })
	return c
}

// recheckEvery makes the Redis checks' verdicts last d, for one test.
func recheckEvery(t *testing.T, d time.Duration) {
	old := redisRecheck
	redisRecheck = d
	t.Cleanup(func() { redisRecheck = old })
}

// loadFails loads a Caddyfile that must not start, and returns why.
func loadFails(t *testing.T, caddyfile string) error {
	t.Helper()
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	t.Setenv("TRIVIALSEC_IT_SECRET", testSecret)
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		t.Fatal(err)
	}
	err = caddy.Load(cfg, true)
	if err == nil {
		_ = caddy.Stop()
		t.Fatal("the config started")
	}
	return err
}

// redisSite is a site whose replay store and spool are in Redis at url.
func redisSite(t *testing.T, url string) string {
	return fmt.Sprintf(spoolSite, freePort(t), freePort(t), testAccount,
		"replay redis "+url+"\n\t\tspool {\n\t\t\tstore redis "+url+"\n\t\t}", "127.0.0.1:9", "refused")
}

// TestRedisEvictionRefused: on a Redis that may evict keys (allkeys-lru),
// neither store writes: the config starts, the log says at ERROR what to
// change, and deliveries are held on the instance's disk (202), none of
// them in Redis. Once the policy is noeviction, they are checked, moved
// into the Redis spool and delivered, each once.
func TestRedisEvictionRefused(t *testing.T) {
	recheckEvery(t, 200*time.Millisecond)
	srv := testredis.StartWith(t, "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
	admin := redisAdmin(t, srv)
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	g := startSpoolRigEdited(t, "replay redis "+srv.URL()+"\n\t\tspool {\n\t\t\tstore redis "+srv.URL()+"\n\t\t\tbackoff 50ms 200ms\n\t\t}",
		func(c string) string { return withLog(c, logFile) })
	g.up.Down()
	ids := g.deliverSpooled(5)
	ctx := context.Background()
	if keys, err := admin.Keys(ctx, "trivialsec_webhook:*").Result(); err != nil || len(keys) != 0 {
		t.Fatalf("an evicting Redis got keys %v (%v)", keys, err)
	}
	if n := len(g.list()); n != 5 {
		t.Fatalf("%d held, want 5", n)
	}
	var errors int
	for _, e := range logEntries(t, logFile) {
		if msg, _ := e["msg"].(string); e["level"] == "error" && e["logger"] == "http.handlers.trivialsec_webhook" &&
			strings.Contains(msg, "maxmemory-policy is allkeys-lru") && strings.Contains(msg, "noeviction") {
			errors++
		}
	}
	if errors != 2 { // one per store
		t.Errorf("%d ERROR lines name maxmemory-policy, want 2 (replay and spool)", errors)
	}
	if err := admin.ConfigSet(ctx, "maxmemory-policy", "noeviction").Err(); err != nil {
		t.Fatal(err)
	}
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	g.checkTakenOnce(ids)
	for _, id := range ids[:2] {
		if status := g.send(productionDelivery().withEventID(id).at(time.Now())); status != http.StatusConflict {
			t.Errorf("a copy of a held delivery, once delivered: %d, want 409", status)
		}
	}
}

// TestRedisEvictionAllowed: allow_eviction=true in the URL uses an evicting
// Redis anyway, with a WARN.
func TestRedisEvictionAllowed(t *testing.T) {
	srv := testredis.StartWith(t, "--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru")
	url := srv.URL() + "?allow_eviction=true"
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	g := startSpoolRigEdited(t, "replay redis "+url+"\n\t\tspool {\n\t\t\tstore redis "+url+"\n\t\t\tbackoff 50ms 200ms\n\t\t}",
		func(c string) string { return withLog(c, logFile) })
	g.up.Down()
	ids := g.deliverSpooled(2)
	if n, err := redisAdmin(t, srv).SCard(context.Background(), "trivialsec_webhook:spool:ids").Result(); err != nil || n != 2 {
		t.Fatalf("Redis holds %d entries (%v), want 2", n, err)
	}
	if n := len(logged(t, logFile, "redis: maxmemory-policy is not noeviction, and the URL allows it (allow_eviction=true): Redis may evict spooled deliveries and replay reservations")); n != 2 {
		t.Errorf("%d WARN lines, want 2 (replay and spool)", n)
	}
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	g.checkTakenOnce(ids)
}

// TestRedisMissingPermission: a Redis user short of one command a store
// needs (XCLAIM, with which a dead instance's deliveries are taken over;
// INFO, with which the eviction policy is read; XINFO CONSUMERS) refuses
// the config, naming it.
func TestRedisMissingPermission(t *testing.T) {
	srv := testredis.Start(t)
	for _, tc := range []struct{ user, minus, want string }{
		{"no-xclaim", "-xclaim", "XCLAIM"},
		{"no-info", "-info", "INFO"},
		{"no-xinfo", "-xinfo", "XINFO CONSUMERS"},
		{"no-spool-keys", "resetkeys", `may not use keys under "trivialsec_webhook:spool:"`},
	} {
		t.Run(tc.user, func(t *testing.T) {
			more := []any{tc.minus}
			if tc.minus == "resetkeys" {
				more = append(more, "~trivialsec_webhook:replay:*")
			}
			err := loadFails(t, redisSite(t, leastPrivilegeUser(t, srv.Port, tc.user, more...)))
			if !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "acl-test") {
				t.Fatalf("the error does not name %s (or shows the URL): %v", tc.want, err)
			}
		})
	}
}

// TestRedisClusterRefused: a Redis in cluster mode refuses the config, and
// says why.
func TestRedisClusterRefused(t *testing.T) {
	srv := testredis.StartWith(t, "--cluster-enabled", "yes", "--cluster-config-file", filepath.Join(t.TempDir(), "nodes.conf"))
	err := loadFails(t, redisSite(t, srv.URL()))
	if !strings.Contains(err.Error(), "Redis Cluster is not supported") {
		t.Fatalf("error: %v", err)
	}
}

// TestReplayRedisPausedHolds: while the replay store's Redis is paused (a
// slow fork, a failover), deliveries are held on the instance's disk and
// answered 202, copies included; once it resumes, each is checked: a copy
// of one delivered before is dropped, and the others are delivered once,
// even those whose reservation was written when Redis resumed.
func TestReplayRedisPausedHolds(t *testing.T) {
	srv := testredis.Start(t)
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	g := startSpoolRigEdited(t, "replay redis "+srv.URL()+"\n\t\tspool {\n\t\t\tbackoff 100ms 500ms\n\t\t}",
		func(c string) string { return withLog(c, logFile) })
	before, status := g.deliver()
	if status != http.StatusOK {
		t.Fatalf("before the pause: %d", status)
	}
	srv.Pause()
	var wg sync.WaitGroup
	var held []string
	wg.Go(func() { held = g.sendAtOnce(10, http.StatusAccepted) })
	wg.Go(func() {
		if status := g.send(productionDelivery().withEventID(before).at(time.Now())); status != http.StatusAccepted {
			t.Errorf("a copy while Redis is paused: %d, want 202", status)
		}
	})
	wg.Wait()
	if n := len(g.up.Received()); n != 1 {
		t.Fatalf("the upstream got %d deliveries while the replay store was paused, want the 1 of before", n)
	}
	srv.Resume()
	g.checkTakenOnce(append(held, before))
	if n := len(logged(t, logFile, "spool: a delivery held while the replay store did not answer is a copy of one accepted before: dropped")); n != 1 {
		t.Errorf("%d copies dropped, want 1", n)
	}
	for _, id := range held[:3] {
		if status := g.send(productionDelivery().withEventID(id).at(time.Now())); status != http.StatusConflict {
			t.Errorf("a copy of a held delivery, once delivered: %d, want 409", status)
		}
	}
}

// TestReplayRedisPausedSpoolOff: with the spool off, deliveries made while
// Redis is paused are refused with 503; their reservations, written when
// Redis resumes, are released once it answers, so that a genuine resend is
// accepted rather than refused as a replay.
func TestReplayRedisPausedSpoolOff(t *testing.T) {
	srv := testredis.Start(t)
	admin := redisAdmin(t, srv)
	g := startSpoolRig(t, "replay redis "+srv.URL()+"\n\t\tspool off")
	srv.Pause()
	var wg sync.WaitGroup
	ids := make([]string, 10)
	for i := range ids {
		ids[i] = uuid.NewString()
		wg.Go(func() {
			if status := g.send(productionDelivery().withEventID(ids[i]).at(time.Now())); status != http.StatusServiceUnavailable {
				t.Errorf("while Redis is paused: %d, want 503", status)
			}
		})
	}
	wg.Wait()
	srv.Resume()
	g.waitFor("the reservations of the refused deliveries are gone", func() bool {
		n, err := admin.Exists(context.Background(), replayKeys(ids)...).Result()
		return err == nil && n == 0
	})
	for _, id := range ids {
		d := productionDelivery().withEventID(id).at(time.Now())
		g.sent[id] = d.body()
		if status := g.send(d); status != http.StatusOK {
			t.Errorf("a resend after Redis resumed: %d, want 200", status)
		}
	}
	g.checkTakenOnce(ids)
}

// sendAtOnce sends n new deliveries at once, each of which must be
// answered want, and returns their event IDs.
func (g *spoolRig) sendAtOnce(n, want int) []string {
	var mu sync.Mutex
	var ids []string
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			id := uuid.NewString()
			d := productionDelivery().withEventID(id).at(time.Now())
			mu.Lock()
			g.sent[id] = d.body()
			mu.Unlock()
			if status := g.send(d); status != want {
				g.t.Errorf("%d, want %d", status, want)
				return
			}
			mu.Lock()
			ids = append(ids, id)
			mu.Unlock()
		})
	}
	wg.Wait()
	return ids
}

func replayKeys(ids []string) []string {
	keys := make([]string, len(ids))
	for i, id := range ids {
		keys[i] = defaultRedisKeyPrefix + id
	}
	return keys
}

// TestSpoolRedisPausedHolds: a Redis spool that does not answer (paused)
// when the upstream fails: the delivery is held on the instance's disk and
// answered 202, even when its write ran after all when Redis resumed; it
// then moves into the Redis spool, and is delivered once.
func TestSpoolRedisPausedHolds(t *testing.T) {
	srv := testredis.Start(t)
	g := startSpoolRig(t, "spool {\n\t\t\tstore redis "+srv.URL()+"\n\t\t\tbackoff 100ms 500ms\n\t\t}")
	g.up.Down()
	before := g.deliverSpooled(2)
	srv.Pause()
	held := g.sendAtOnce(8, http.StatusAccepted)
	srv.Resume()
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	g.checkTakenOnce(append(held, before...))
}

// TestRedisRestartsUnderLoad: Redis (durable, appendfsync always) is
// killed and restarted twice while deliveries stream in, the replay store
// and the spool both in it: every delivery answered 2xx is delivered once,
// and copies of them are refused.
func TestRedisRestartsUnderLoad(t *testing.T) {
	srv := testredis.StartDurable(t)
	g := startSpoolRig(t, "replay redis "+srv.URL()+"\n\t\tspool {\n\t\t\tstore redis "+srv.URL()+"\n\t\t\tbackoff 100ms 500ms\n\t\t}")
	var mu sync.Mutex
	var answered []string
	statuses := map[int]int{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for i := 0; i < 300; i++ { // bounded
				select {
				case <-stop:
					return
				default:
				}
				id := uuid.NewString()
				d := productionDelivery().withEventID(id).at(time.Now())
				mu.Lock()
				g.sent[id] = d.body()
				mu.Unlock()
				status := g.send(d)
				mu.Lock()
				statuses[status]++
				if status/100 == 2 {
					answered = append(answered, id)
				}
				mu.Unlock()
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
	for range 2 {
		time.Sleep(400 * time.Millisecond)
		srv.Stop()
		time.Sleep(1500 * time.Millisecond)
		srv.Restart()
	}
	time.Sleep(400 * time.Millisecond)
	close(stop)
	wg.Wait()
	t.Logf("answers: %v", statuses)
	for status, n := range statuses {
		if status/100 != 2 {
			t.Errorf("%d deliveries answered %d: want every delivery answered 2xx", n, status)
		}
	}
	if statuses[http.StatusAccepted] == 0 {
		t.Error("no delivery was held while Redis was down: the outage was not under load")
	}
	g.checkTakenOnce(answered)
	for _, id := range answered[:5] {
		if status := g.send(productionDelivery().withEventID(id).at(time.Now())); status != http.StatusConflict {
			t.Errorf("a copy: %d, want 409", status)
		}
	}
}
