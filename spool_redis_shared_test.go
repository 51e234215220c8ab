package trivialsecwebhook

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// The shared spool's tests with several instances in one process: each
// instance is a Redis store of its own, with its own consumer name and
// policy, and re-drives through the server of a Caddy the test runs (the
// module there has the spool off, so that it passes a re-drive on to the
// upstream). Their clocks, their claim_after and when each starts or dies
// are the test's.

// sharedPrefix is the key prefix of the instances' shared spool.
const sharedPrefix = "test:shared:"

// instance is one instance of the shared spool.
type instance struct {
	*redisSpool
	name  string
	taken atomic.Int64 // deliveries this instance made
	dead  atomic.Bool  // killed: its loops stopped, nothing handed back
}

// countingStore counts what its instance delivers.
type countingStore struct {
	*redisSpool
	in *instance
}

func (c countingStore) delivered(m spoolMeta) {
	c.in.taken.Add(1)
	c.redisSpool.delivered(m)
}

// sharedRig is a Caddy that re-drives the instances' deliveries to its
// upstream, and the Redis they share.
type sharedRig struct {
	*spoolRig
	srv    *testredis.Server
	server *caddyhttp.Server
	admin  *redis.Client // the test's own client
}

func startSharedRig(t *testing.T) *sharedRig {
	t.Helper()
	srv := testredis.Start(t)
	g := startSpoolRig(t, "spool off")
	app, err := caddy.ActiveContext().App("http")
	if err != nil {
		t.Fatal(err)
	}
	var server *caddyhttp.Server
	for _, s := range app.(*caddyhttp.App).Servers {
		for _, addr := range s.Listen {
			if strings.HasSuffix(addr, fmt.Sprintf(":%d", g.port)) {
				server = s
			}
		}
	}
	if server == nil {
		t.Fatalf("no server listens on port %d", g.port)
	}
	admin := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", srv.Port)})
	t.Cleanup(func() { admin.Close() })
	return &sharedRig{spoolRig: g, srv: srv, server: server, admin: admin}
}

// instance makes an instance named name with policy, serving the test's
// account through the rig's server (none if serve is false), its loops
// not started.
func (r *sharedRig) instance(name string, policy spoolPolicy, serve bool) *instance {
	r.t.Helper()
	client, err := loadRedisClient(r.srv.URL())
	if err != nil {
		r.t.Fatal(err)
	}
	in := &instance{redisSpool: newRedisSpool(client, sharedPrefix, policy), name: name}
	in.scheduler.store = countingStore{redisSpool: in.redisSpool, in: in}
	if serve {
		d := &driver{server: r.server, key: serverKey(r.server), account: testAccount}
		in.register(d)
		d.ready.Store(true)
	}
	r.t.Cleanup(func() {
		if in.dead.Load() {
			_ = client.release()
			return
		}
		_ = in.Destruct()
	})
	return in
}

// start starts the instance's loops.
func (in *instance) start() *instance {
	in.startAs(in.name)
	return in
}

// kill stops the instance as SIGKILL would: its loops end, and it hands
// nothing back; its lease lives on until its claim_after.
func (in *instance) kill() {
	in.dead.Store(true)
	in.stop()
	in.workers.Wait()
}

// sharedPolicy is the instances' policy: claim_after and backoff as given.
func sharedPolicy(claimAfter, backoff time.Duration) spoolPolicy {
	return spoolPolicy{backoffMin: backoff, backoffMax: backoff, maxAge: time.Hour, maxSize: 1 << 30,
		attemptTimeout: 5 * time.Second, claimAfter: claimAfter}
}

// spoolNew writes n new deliveries for account through s, due at once, as
// an instance that answered 202 for them does, and returns their IDs.
func (r *sharedRig) spoolNew(s *redisSpool, account string, n int) []string {
	r.t.Helper()
	var ids []string
	for range n {
		e := r.entry(account, s.now())
		if err := s.add(e); err != nil {
			r.t.Fatal(err)
		}
		ids = append(ids, e.meta.EventID.String())
	}
	return ids
}

// entry is a new delivery for account, spooled at now (the writer's
// clock), due at once, as the rig's route takes it.
func (r *sharedRig) entry(account string, now time.Time) *spoolEntry {
	d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
	body := d.body()
	ev := event{ID: uuid.MustParse(d.eventID), Name: "report_created", Timestamp: now}
	ev.token.IssuedAt, ev.token.ExpiresAt = now, now.Add(24*time.Hour)
	r.sent[d.eventID] = body
	return &spoolEntry{
		meta: spoolMetaOf(account, &ev, now),
		request: spoolRequest{Method: http.MethodPost, RequestURI: "/webhook", Proto: "HTTP/1.1", Host: fmt.Sprintf("127.0.0.1:%d", r.port),
			Header: http.Header{"User-Agent": {"Trivial Security"}}, RemoteAddr: "192.0.2.1:1234"},
		body: []byte(body),
	}
}

// pending counts the turns each consumer of the account's stream holds.
func (r *sharedRig) pending(account string) map[string]int64 {
	r.t.Helper()
	p, err := r.admin.XPending(context.Background(), sharedPrefix+"stream:"+account, redisSpoolGroup).Result()
	if err != nil {
		r.t.Fatal(err)
	}
	return p.Consumers
}

// until polls ok, for at most 30 s.
func (r *sharedRig) until(what string, ok func() bool) {
	r.t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !ok(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			r.t.Fatalf("still not so after 30 s: %s", what)
		}
	}
}

// takenOnce waits until the upstream took each of ids, and checks that it
// took each once.
func (r *sharedRig) takenOnce(ids []string) {
	r.t.Helper()
	taken, err := r.up.WaitTaken(ids, 60*time.Second)
	if err != nil {
		r.t.Fatal(err)
	}
	for _, id := range ids {
		if taken[id] != 1 {
			r.t.Errorf("event %s taken %d times", id, taken[id])
		}
	}
	for _, got := range r.up.Received() {
		if got.Status/100 == 2 && got.Body != r.sent[got.EventID] {
			r.t.Errorf("event %s: the upstream got %q, want %q", got.EventID, got.Body, r.sent[got.EventID])
		}
	}
}

// loggedStarting returns the entries of a log file whose message starts
// with msg.
func loggedStarting(t *testing.T, file, msg string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, e := range logEntries(t, file) {
		if m, _ := e["msg"].(string); strings.HasPrefix(m, msg) {
			out = append(out, e)
		}
	}
	return out
}

// TestRedisSpoolSaysWhatRedisRefuses: a command Redis refuses (the Redis
// user lost a permission the spool needs) is logged at ERROR, once, with
// the command and Redis's reply and what to do; it is not "redis does not
// answer", which is for a Redis that does not answer.
func TestRedisSpoolSaysWhatRedisRefuses(t *testing.T) {
	srv := testredis.Start(t)
	admin := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", srv.Port)})
	defer admin.Close()
	ctx := context.Background()
	t.Setenv("TRIVIALSEC_IT_REDIS", leastPrivilegeUser(t, srv.Port, "trivialsec"))
	file := filepath.Join(t.TempDir(), "caddy.log")
	g := startSpoolRigEdited(t, "spool {\n\t\t\tstore redis {env.TRIVIALSEC_IT_REDIS}\n\t\t\tclaim_after 1s\n\t\t\tbackoff 10ms 50ms\n\t\t}",
		func(c string) string { return withLog(c, file) })
	// The user loses XCLAIM, which the scripts that take, renew and take
	// over turns run.
	if err := admin.Do(ctx, "ACL", "SETUSER", "trivialsec", "-xclaim").Err(); err != nil {
		t.Fatal(err)
	}
	g.up.Down()
	g.deliverSpooled(1)
	const refused = "spool: redis refuses a command the spool needs"
	g.waitFor("the refusal is logged", func() bool { return len(loggedStarting(t, file, refused)) > 0 })
	// Five refusals later (attempts, renewals), still one line per
	// command.
	denied := func() (n int64) {
		entries, err := admin.ACLLog(ctx, 100).Result()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			n += e.Count
		}
		return n
	}
	seen := denied()
	g.waitFor("five more refusals", func() bool { return denied() >= seen+5 })
	got := loggedStarting(t, file, refused)
	commands := map[string]int{}
	for _, l := range got {
		command, _ := l["command"].(string)
		reply, _ := l["reply"].(string)
		msg, _ := l["msg"].(string)
		commands[command]++
		if l["level"] != "error" || !strings.Contains(msg, "SECURITY.md") || !strings.Contains(command, "XCLAIM") ||
			!(strings.Contains(reply, "can't run this command") || strings.HasPrefix(reply, "NOPERM")) {
			t.Errorf("the refusal is logged as %v", l)
		}
	}
	for command, n := range commands {
		if n != 1 {
			t.Errorf("%q refused: logged %d times, want once", command, n)
		}
	}
	if n := len(loggedStarting(t, file, "spool: redis does not answer")); n != 0 || len(got) == 0 {
		t.Errorf("%d lines say redis does not answer, %d that it refuses", n, len(got))
	}
}

// TestRedisSpoolTakesOverOnlyFromTheDead: of two instances with different
// claim_after (1m and 1s), the short one never takes what the long one
// holds while the long one lives, however long its turns went unrenewed
// under the short one's claim_after; once the long one is dead (its lease
// gone), the short one takes its deliveries over and delivers each once.
func TestRedisSpoolTakesOverOnlyFromTheDead(t *testing.T) {
	r := startSharedRig(t)
	// 408: retried, and, unlike a 503, no sign of a service that is down,
	// so that the route's breaker does not hold the deliveries back: each
	// is tried.
	r.up.Answer(func(http.Header, *http.Request) int { return http.StatusRequestTimeout })
	// Retries a minute apart: nothing renews the long one's turns (an
	// attempt does) while the test runs.
	long := r.instance("long", sharedPolicy(time.Minute, time.Minute), true).start()
	ids := r.spoolNew(long.redisSpool, testAccount, 20)
	r.until("the long one tried every delivery", func() bool {
		for _, l := range listed(t, long.redisSpool) {
			if l.Attempts == 0 {
				return false
			}
		}
		return r.pending(testAccount)["long"] == 20
	})
	short := r.instance("short", sharedPolicy(time.Second, time.Minute), true).start()
	// The long one's turns look unrenewed for 10 s: past the short one's
	// claim_after, well within the long one's.
	ctx := context.Background()
	stream := sharedPrefix + "stream:" + testAccount
	turns, err := r.admin.XPendingExt(ctx, &redis.XPendingExtArgs{Stream: stream, Group: redisSpoolGroup, Start: "-", End: "+", Count: 100}).Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range turns {
		if err := r.admin.Do(ctx, "XCLAIM", stream, redisSpoolGroup, "long", 0, p.ID, "IDLE", 10000, "JUSTID").Err(); err != nil {
			t.Fatal(err)
		}
	}
	before := testutil.ToFloat64(spoolTakenOver)
	for range 3 {
		if err := short.keep(); err != nil {
			t.Fatal(err)
		}
	}
	if p := r.pending(testAccount); p["long"] != 20 || p["short"] != 0 {
		t.Fatalf("while the long one lives: turns held %v, want all 20 by it", p)
	}

	long.kill()
	// Their backoff passes: due now, on Redis's clock.
	now, err := r.admin.Time(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if err := r.admin.HSet(ctx, sharedPrefix+"entry:"+id, "next", now.UnixMilli()).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.admin.Del(ctx, sharedPrefix+"consumer:long").Err(); err != nil { // as at the end of its claim_after
		t.Fatal(err)
	}
	r.up.Answer(nil)
	if err := short.keep(); err != nil {
		t.Fatal(err)
	}
	if p := r.pending(testAccount); p["long"] != 0 {
		t.Fatalf("once the long one is dead: turns held %v, want none by it", p)
	}
	r.takenOnce(ids)
	if n := testutil.ToFloat64(spoolTakenOver) - before; n != 20 {
		t.Errorf("taken over: %v, want 20", n)
	}
	if n := long.taken.Load(); n != 0 {
		t.Errorf("the long one delivered %d", n)
	}
}

// TestRedisSpoolKeepsRedisTime: the times an instance writes for the
// others (when a delivery was spooled, when it is due) are Redis's: an
// instance whose clock is an hour fast does not make the others hold its
// deliveries back for an hour, and one 11 minutes slow does not make them
// dead letters (max_age 10m) at their first failure.
func TestRedisSpoolKeepsRedisTime(t *testing.T) {
	for _, tc := range []struct {
		name string
		skew time.Duration
	}{
		{"writer_an_hour_fast", time.Hour},
		{"writer_11m_slow", -11 * time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := startSharedRig(t)
			var mu sync.Mutex
			tries := map[string]int{}
			r.up.Answer(func(_ http.Header, req *http.Request) int {
				mu.Lock()
				defer mu.Unlock()
				tries[req.Header.Get("X-Trivialsec-Event-Id")]++
				if tries[req.Header.Get("X-Trivialsec-Event-Id")] == 1 {
					return http.StatusServiceUnavailable // the first attempt fails
				}
				return http.StatusOK
			})
			writer := r.instance("writer", sharedPolicy(time.Minute, 10*time.Millisecond), false)
			writer.now = func() time.Time { return time.Now().Add(tc.skew) }
			ids := r.spoolNew(writer.redisSpool, testAccount, 3)
			for _, l := range listed(t, writer.redisSpool) {
				if d := time.Since(l.SpooledAt); d < -time.Minute || d > time.Minute {
					t.Errorf("spooled_at %s, %s from Redis's clock", l.SpooledAt, d)
				}
			}
			p := sharedPolicy(time.Minute, 10*time.Millisecond)
			p.maxAge = 10 * time.Minute
			reader := r.instance("reader", p, true).start()
			dead := testutil.ToFloat64(spoolDeadLettered)
			r.takenOnce(ids)
			if n := testutil.ToFloat64(spoolDeadLettered) - dead; n != 0 {
				t.Errorf("%v dead letters", n)
			}
			r.until("the reader counts what it delivered", func() bool { return reader.taken.Load() == 3 })
		})
	}
}

// TestRedisSpoolSharesTheBacklog: instances that start with a backlog
// waiting (written while none served the account), or join one that held
// it through an outage, each deliver a share of it, each delivery once.
func TestRedisSpoolSharesTheBacklog(t *testing.T) {
	const n = 600
	slow := func(http.Header, *http.Request) int { time.Sleep(20 * time.Millisecond); return http.StatusOK }
	shares := func(t *testing.T, ins ...*instance) {
		t.Helper()
		var got []int64
		for _, in := range ins {
			got = append(got, in.taken.Load())
		}
		t.Logf("deliveries by instance: %v", got)
		for i, k := range got {
			if k > n*6/10 || k == 0 {
				t.Errorf("instance %d delivered %d of %d: want each a share, none more than 60%%", i, k, n)
			}
		}
	}
	t.Run("written_while_none_served", func(t *testing.T) {
		r := startSharedRig(t)
		r.up.Answer(slow)
		ids := r.spoolNew(r.instance("writer", sharedPolicy(time.Minute, time.Second), false).redisSpool, testAccount, n)
		// One starts first, as in a rolling start; the others once it
		// has begun to deliver.
		a := r.instance("a", sharedPolicy(time.Minute, time.Second), true).start()
		r.until("a delivers", func() bool { return a.taken.Load() > 0 })
		b := r.instance("b", sharedPolicy(time.Minute, time.Second), true).start()
		c := r.instance("c", sharedPolicy(time.Minute, time.Second), true).start()
		r.takenOnce(ids)
		shares(t, a, b, c)
	})
	t.Run("held_through_an_outage", func(t *testing.T) {
		r := startSharedRig(t)
		// 408: retried, and no sign of a service that is down (with a
		// 503, the route's breaker would open, and a would read no more
		// than it holds).
		r.up.Answer(func(http.Header, *http.Request) int { return http.StatusRequestTimeout })
		// Retries 3 s apart: between them, a has room to read more, and
		// reads every delivery.
		a := r.instance("a", sharedPolicy(time.Second, 3*time.Second), true).start()
		ids := r.spoolNew(a.redisSpool, testAccount, n)
		r.until("a holds every delivery", func() bool { return r.pending(testAccount)["a"] == n })
		b := r.instance("b", sharedPolicy(time.Second, 3*time.Second), true).start()
		c := r.instance("c", sharedPolicy(time.Second, 3*time.Second), true).start()
		r.until("a knows b and c serve the account", func() bool {
			a.mu.Lock()
			defer a.mu.Unlock()
			return a.others[testAccount]
		})
		// Attempts slower than deliveries come due: more than a can
		// attempt at once wait.
		r.up.Answer(func(http.Header, *http.Request) int { time.Sleep(100 * time.Millisecond); return http.StatusOK })
		r.takenOnce(ids)
		shares(t, a, b, c)
	})
}

// TestRedisSpoolParksUnservedAccounts: deliveries waiting for an account
// that no handler of an instance serves are parked in its listing and its
// metrics, and logged once: at WARN while no instance serves the account,
// at INFO once another does.
func TestRedisSpoolParksUnservedAccounts(t *testing.T) {
	srv := testredis.Start(t)
	file := filepath.Join(t.TempDir(), "caddy.log")
	g := startSpoolRigEdited(t, "spool {\n\t\t\tstore redis "+srv.URL()+"\n\t\t\tclaim_after 1s\n\t\t\tbackoff 10ms 50ms\n\t\t}",
		func(c string) string { return withLog(c, file) })
	g.up.Down()
	served := g.deliverSpooled(1)
	client, err := loadRedisClient(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	writer := newRedisSpool(client, defaultSpoolKeyPrefix, testPolicy)
	defer writer.Destruct()
	for range 2 {
		e := testEntry("{}")
		e.meta.Account = "other"
		if err := writer.add(e); err != nil {
			t.Fatal(err)
		}
	}
	states := map[string]int{}
	for _, l := range g.list() {
		states[l.State]++
	}
	if states[stateParked] != 2 || states[statePending] != 1 {
		t.Errorf("listing: %v, want 2 parked (account other) and 1 pending (%s)", states, served[0])
	}
	m := scrape(t, g.base+"/metrics")
	if m[`caddy_trivialsec_webhook_spool_entries{state="parked"}`] != 2 || m[`caddy_trivialsec_webhook_spool_entries{state="pending"}`] != 1 {
		t.Errorf("metrics: parked %v, pending %v; want 2 and 1", m[`caddy_trivialsec_webhook_spool_entries{state="parked"}`],
			m[`caddy_trivialsec_webhook_spool_entries{state="pending"}`])
	}
	const none = "spool: deliveries wait in the shared spool for an account that no instance serves"
	g.waitFor("the WARN", func() bool { return len(loggedStarting(t, file, none)) > 0 })
	admin := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", srv.Port)})
	defer admin.Close()
	ctx := context.Background()
	// k more rounds of the instance's keep loop, which marks its account
	// served, until a later time, at each.
	rounds := func(k int) {
		last := 0.0
		for seen := 0; seen <= k; time.Sleep(20 * time.Millisecond) {
			marks, err := admin.ZRangeWithScores(ctx, defaultSpoolKeyPrefix+"served:"+testAccount, 0, -1).Result()
			if err != nil || len(marks) != 1 {
				t.Fatalf("marks %v, %v", marks, err)
			}
			if marks[0].Score != last {
				last = marks[0].Score
				seen++
			}
		}
	}
	rounds(4)
	// Another instance serves it now.
	if err := admin.ZAdd(ctx, defaultSpoolKeyPrefix+"served:other", redis.Z{Score: float64(time.Now().Add(time.Hour).UnixMilli()), Member: "another"}).Err(); err != nil {
		t.Fatal(err)
	}
	const elsewhere = "spool: deliveries of an account that this instance does not serve wait in the shared spool"
	g.waitFor("the INFO", func() bool { return len(loggedStarting(t, file, elsewhere)) > 0 })
	rounds(4)
	for msg, level := range map[string]string{none: "warn", elsewhere: "info"} {
		got := loggedStarting(t, file, msg)
		if len(got) != 1 || got[0]["level"] != level || got[0]["account"] != "other" || got[0]["entries"] != 2.0 {
			t.Errorf("%q logged as %v, want once at %s, for account other", msg, got, level)
		}
	}
}

// TestRedisSpoolCountsWhatRedisHolds: what entries count toward max_size
// is within 30% of the memory Redis spends on them (INFO memory), for
// deliveries of 100 B to 10 KiB.
func TestRedisSpoolCountsWhatRedisHolds(t *testing.T) {
	for _, size := range []int{100, 1024, 4096, 10240} {
		t.Run(strconv.Itoa(size), func(t *testing.T) {
			srv := testredis.Start(t)
			s := openTestRedisSpool(t, srv)
			p := testPolicy
			p.maxSize = 1 << 40
			s.setPolicy(p)
			entry := func() *spoolEntry {
				e := testEntry(strings.Repeat("x", size))
				e.meta.Account = testAccount
				e.request.Header["User-Agent"] = []string{"Trivial Security"}
				return e
			}
			if err := s.add(entry()); err != nil { // Redis loads the script, makes the keys
				t.Fatal(err)
			}
			const n = 1000
			memory, counted := usedMemory(t, s), s.stats().bytes
			for range n {
				if err := s.add(entry()); err != nil {
					t.Fatal(err)
				}
			}
			grew := usedMemory(t, s) - memory
			counted = s.stats().bytes - counted
			ratio := float64(counted) / float64(grew)
			t.Logf("%d B bodies: Redis spent %d B an entry, the spool counts %d B (%.2f)", size, grew/n, counted/n, ratio)
			if ratio < 0.7 || ratio > 1.3 {
				t.Errorf("the spool counts %.2f of what Redis spends", ratio)
			}
		})
	}
}

// usedMemory is Redis's used_memory.
func usedMemory(t *testing.T, s *redisSpool) int64 {
	t.Helper()
	info, err := s.client.Info(context.Background(), "memory").Result()
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(info) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "used_memory:"); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("INFO memory has no used_memory")
	return 0
}

// TestRedisSpoolRemembersWhatItDelivered: a write of an entry the spool
// delivered, or that an operator deleted, adds nothing for a day (a write
// held because its outcome was unknown, whose first try ran after all):
// the writer is told it was delivered; an admin retry still finds nothing
// to retry.
func TestRedisSpoolRemembersWhatItDelivered(t *testing.T) {
	srv := testredis.Start(t)
	s := openTestRedisSpool(t, srv)
	ctx := context.Background()
	for _, how := range []string{"delivered", "deleted"} {
		e := testEntry(`{"a": 1}`)
		e.meta.Account = testAccount
		if err := s.add(e); err != nil {
			t.Fatal(err)
		}
		if err := s.add(e); err != nil { // while it waits, a write again is the same entry
			t.Fatalf("%s: the same write again while it waits: %v", how, err)
		}
		if how == "delivered" {
			turn := read(t, s, "a")
			m := listed(t, s)[0]
			m.turn = turn.ID
			leased(t, s, "a").delivered(m)
		} else if found, err := s.removeIf(e.meta.EventID, ""); !found || err != nil {
			t.Fatalf("remove: %v %v", found, err)
		}
		if err := s.add(e); !errors.Is(err, errSpoolDelivered) {
			t.Errorf("%s: a late write: %v, want errSpoolDelivered", how, err)
		}
		if l := listed(t, s); len(l) != 0 {
			t.Errorf("%s: a late write spooled it again: %+v", how, l)
		}
		if found, err := s.retryNow(e.meta.EventID); found || err != nil {
			t.Errorf("%s: retry: %v %v", how, found, err)
		}
		ttl, err := s.client.PTTL(ctx, s.doneKey(e.meta.EventID.String())).Result()
		if err != nil || ttl < 23*time.Hour || ttl > 24*time.Hour {
			t.Errorf("%s: the tombstone lives %v (%v), want a day", how, ttl, err)
		}
	}
	if n, _ := s.client.XLen(ctx, s.streamKey(testAccount)).Result(); n != 1 {
		t.Errorf("the stream holds %d turns, want the deleted entry's only (its holder meets it)", n)
	}
	if st := s.stats(); st.pending+st.parked != 0 || st.bytes != 0 {
		t.Errorf("stats %+v", st)
	}
}

// TestRedisSpoolActsOnlyUnderItsLease: an instance that lives on after its
// lease on its consumer name expired (it did not reach Redis for its
// claim_after + attempt_timeout) no longer acts on its turns: it neither
// starts an attempt, nor saves an outcome, renews or hands back, while
// another instance takes them over; so only one of the two delivers. An
// attempt starts only while the lease has more than attempt_timeout to
// live, and the lease lives claim_after + attempt_timeout.
func TestRedisSpoolActsOnlyUnderItsLease(t *testing.T) {
	srv := testredis.Start(t)
	client, err := loadRedisClient(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer client.release()
	ctx := context.Background()
	const prefix = "test:lease:"
	a := newRedisSpool(client, prefix, testPolicy)
	b := newRedisSpool(client, prefix, testPolicy)
	a.lease, b.lease = "la", "lb"
	e := testEntry("{}")
	e.meta.Account = testAccount
	if err := a.add(e); err != nil {
		t.Fatal(err)
	}
	leased(t, a, "a")
	msg := read(t, a, "a")
	m := listed(t, a)[0]
	m.turn = msg.ID

	// Its lease about to lapse: no attempt starts, and the turn stays.
	if err := client.PExpire(ctx, a.leaseKey("a"), testPolicy.attemptTimeout/2).Err(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := a.take(&m); !errors.Is(err, errStoreDown) {
		t.Fatalf("take with the lease about to lapse: %v, want errStoreDown (wait, keep the entry)", err)
	}

	// Another process holds the name now: no attempt starts.
	if err := client.Set(ctx, a.leaseKey("a"), "another process", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := a.take(&m); !errors.Is(err, errNotHeld) {
		t.Fatalf("take under another's lease: %v, want errNotHeld", err)
	}

	// Its lease gone, a lives on.
	if err := client.Del(ctx, a.leaseKey("a")).Err(); err != nil {
		t.Fatal(err)
	}
	_, _, errA := a.take(&m)
	failedM := m
	failedM.State, failedM.Attempts, failedM.LastError = stateDead, 1, "410 Gone"
	if err := a.failed(failedM); err != nil {
		t.Fatal(err)
	}
	keys, args := a.turnBatch(testAccount, "a", []spoolMeta{m}, func(m spoolMeta) []any { return []any{m.turn, m.rev} })
	renewed, err := redisRenewScript.Run(ctx, client, keys, args...).Int64Slice()
	if err != nil {
		t.Fatal(err)
	}
	handed, left := a.handBack(ctx, "a", []spoolMeta{m})
	if errA == nil || renewed[0] != 0 || handed != 0 || len(left) != 0 {
		t.Errorf("without its lease, a took the turn (%v), renewed it (%v) or handed it back (%d, %d left)", errA, renewed, handed, len(left))
	}
	if l := listed(t, a); l[0].State == stateDead || l[0].Attempts != 0 {
		t.Errorf("without its lease, a saved an outcome: %+v", l[0])
	}

	leased(t, b, "b")
	if err := b.claim("b", testAccount); err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.take(&m); err != nil {
		t.Errorf("b took a's turn over, then could not take it: %v", err)
	}

	// The lease loop's lease lives claim_after + attempt_timeout.
	p := testPolicy
	p.claimAfter = time.Minute
	c := newRedisSpool(client, prefix, p)
	c.name, c.lease = "c", "lc"
	if name, err := c.keepLease(); name != "c" || err != nil {
		t.Fatal(name, err)
	}
	ttl, err := client.PTTL(ctx, c.leaseKey("c")).Result()
	if want := p.claimAfter + p.attemptTimeout; err != nil || ttl <= p.claimAfter || ttl > want {
		t.Errorf("the lease lives %v (%v), want %v", ttl, err, want)
	}
}

// TestRedisSpoolHoldsTurnsItsReadLost: a turn that reached this instance's
// pending list without reaching its index (Redis gave it to an
// XREADGROUP whose reply was lost, or the entries of turns read or claimed
// could not be read) is held at the next comparison of the two, and
// delivered once, while the instance lives (its lease does, so no other
// instance would take it over).
func TestRedisSpoolHoldsTurnsItsReadLost(t *testing.T) {
	r := startSharedRig(t)
	release := make(chan struct{})
	r.up.Answer(func(http.Header, *http.Request) int { <-release; return http.StatusOK })
	a := r.instance("a", sharedPolicy(time.Second, time.Second), true).start()
	r.instance("b", sharedPolicy(time.Second, time.Second), true).start()
	ids := r.spoolNew(a.redisSpool, testAccount, 2*defaultRedriveConcurrency)
	r.until("both instances busy", func() bool {
		p, err := r.admin.XPending(context.Background(), sharedPrefix+"stream:"+testAccount, redisSpoolGroup).Result()
		return err == nil && p.Consumers["a"] == defaultRedriveConcurrency && p.Consumers["b"] == defaultRedriveConcurrency
	})
	x := r.spoolNew(a.redisSpool, testAccount, 1)
	// a's read of x: Redis gave it to a, the reply never came back.
	res, err := r.admin.XReadGroup(context.Background(), &redis.XReadGroupArgs{Group: redisSpoolGroup, Consumer: "a",
		Streams: []string{sharedPrefix + "stream:" + testAccount, ">"}, Count: 1, Block: -1}).Result()
	if err != nil || len(res) != 1 || len(res[0].Messages) != 1 {
		t.Fatalf("read as a: %v %v", res, err)
	}
	close(release)
	r.takenOnce(append(ids, x...))
}

// TestRedisSpoolHandsBackLater: the deliveries of an account an instance
// no longer serves, which it could not hand back (Redis refused), are
// handed back at a later round, not left in its pending list.
func TestRedisSpoolHandsBackLater(t *testing.T) {
	srv := testredis.Start(t)
	s := openTestRedisSpool(t, srv)
	ctx := context.Background()
	e := testEntry("{}")
	e.meta.Account = testAccount
	if err := s.add(e); err != nil {
		t.Fatal(err)
	}
	leased(t, s, "a")
	if n := s.hold(testAccount, []redis.XMessage{read(t, s, "a")}); n != 1 {
		t.Fatalf("held %d", n)
	}
	admin := redisAdmin(t, srv)
	if err := admin.Do(ctx, "ACL", "SETUSER", "default", "-evalsha", "-eval").Err(); err != nil {
		t.Fatal(err)
	}
	if err := s.renew("a"); err != nil { // no handler serves the account: it hands the entry back, and cannot
		t.Fatal(err)
	}
	if err := admin.Do(ctx, "ACL", "SETUSER", "default", "+evalsha", "+eval").Err(); err != nil {
		t.Fatal(err)
	}
	if err := s.renew("a"); err != nil {
		t.Fatal(err)
	}
	p, err := s.client.XPending(ctx, s.streamKey(testAccount), redisSpoolGroup).Result()
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := s.client.XLen(ctx, s.streamKey(testAccount)).Result(); p.Count != 0 || n != 1 {
		t.Errorf("after the hand-back: %d turns pending, %d in the stream; want 0 and 1 (a new turn)", p.Count, n)
	}
}

// TestRedisSpoolRecountsDriftedCounts: the per-account counts of pending
// entries, which an earlier version (which kept none) lets drift, are
// counted again from the entries when they no longer add up to pending,
// and not only once: after the spool emptied, a delivery of an account no
// handler serves is parked.
func TestRedisSpoolRecountsDriftedCounts(t *testing.T) {
	srv := testredis.Start(t)
	s := openTestRedisSpool(t, srv)
	ctx := context.Background()
	keepCounts := func() {
		t.Helper()
		stats, err := s.readStats()
		if err != nil {
			t.Fatal(err)
		}
		if err := s.keepCounts(stats); err != nil {
			t.Fatal(err)
		}
	}
	keepCounts() // the count once per start
	e := testEntry("{}")
	e.meta.Account = testAccount
	if err := s.add(e); err != nil {
		t.Fatal(err)
	}
	// As an earlier version writes it: no pending:<account>.
	s.client.HIncrBy(ctx, s.prefix+"stats", "pending:"+testAccount, -1)
	if ok, err := s.removeIf(e.meta.EventID, ""); !ok || err != nil {
		t.Fatal(ok, err)
	}
	e2 := testEntry("{}")
	e2.meta.Account = testAccount
	if err := s.add(e2); err != nil {
		t.Fatal(err)
	}
	keepCounts()
	v, _ := s.client.HGet(ctx, s.prefix+"stats", "pending:"+testAccount).Result()
	if st := s.stats(); st.parked != 1 {
		t.Errorf("spool emptied, then one delivery of an unserved account: parked %d, pending %d (pending:%s = %s)", st.parked, st.pending, testAccount, v)
	}
}
