package trivialsecwebhook

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/google/uuid"
	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// Held deliveries across what an operator does: an upstream that keeps
// failing past the token's expiry, reloads (to replay memory, to a file
// spool), a stop, a delete through the admin API; and what must not leak.

// failingUpstream makes the rig's upstream answer 503 while fail is set.
func failingUpstream(g *spoolRig) *atomic.Bool {
	var fail atomic.Bool
	g.up.Answer(func(http.Header, *http.Request) int {
		if fail.Load() {
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	})
	return &fail
}

// TestHeldCheckedIsNotCheckedAgain: a delivery held while Redis is paused
// is checked once Redis is back (its reservation made) while the upstream
// fails past the token's exp + leeway: a check that passed is recorded, so
// the delivery is retried as any spooled one, and delivered once the
// upstream is back, never made a dead letter as unchecked.
func TestHeldCheckedIsNotCheckedAgain(t *testing.T) {
	srv := testredis.Start(t)
	g := startSpoolRig(t, "replay redis "+srv.URL()+"\n\t\tleeway 0s\n\t\tspool {\n\t\t\tbackoff 200ms 400ms\n\t\t}")
	if _, status := g.deliver(); status != http.StatusOK {
		t.Fatalf("warm-up: %d", status)
	}
	fail := failingUpstream(g)
	fail.Store(true)
	id := uuid.NewString()
	now := time.Now()
	d := shortLived(id, now, 6*time.Second, "")
	srv.Pause()
	status := g.send(d)
	srv.Resume()
	if status != http.StatusAccepted {
		t.Fatalf("while Redis is paused: %d, want 202 (held)", status)
	}
	// The check passes now (Redis answers): the reservation is ours.
	time.Sleep(2500 * time.Millisecond)
	key := "trivialsec_webhook:replay:" + id
	if v, err := redisAdmin(t, srv).Get(t.Context(), key).Result(); err != nil || v == "" {
		t.Fatalf("replay key %s after the check: %q %v", key, v, err)
	}
	// The upstream stays down past exp, then comes back.
	time.Sleep(time.Until(now.Add(7500 * time.Millisecond)))
	fail.Store(false)
	deadline := time.Now().Add(8 * time.Second)
	for time.Now().Before(deadline) && g.up.Taken()[id] == 0 {
		time.Sleep(100 * time.Millisecond)
	}
	g.drained()
	if n := g.up.Taken()[id]; n != 1 {
		t.Errorf("a held delivery whose replay check passed, answered 202, reached the upstream %d times once it came back, want 1; the spool holds %+v", n, g.list())
	}
}

// TestHeldReloadToReplayMemory: a reload to replay memory checks the held
// delivery against the memory store; its first attempt reserves the event
// ID there and fails at the upstream: the next is not taken for a copy of
// itself, and the delivery arrives once.
func TestHeldReloadToReplayMemory(t *testing.T) {
	srv := testredis.Start(t)
	spool := "\n\t\tspool {\n\t\t\tbackoff 200ms 400ms\n\t\t}"
	g := startSpoolRig(t, "replay redis "+srv.URL()+spool)
	if _, status := g.deliver(); status != http.StatusOK {
		t.Fatalf("warm-up: %d", status)
	}
	fail := failingUpstream(g)
	fail.Store(true)
	srv.Pause()
	resumed := false
	defer func() {
		if !resumed {
			srv.Resume()
		}
	}()
	id, status := g.deliver()
	if status != http.StatusAccepted {
		t.Fatalf("while Redis is paused: %d, want 202 (held)", status)
	}
	// The operator moves to the memory store while Redis is away.
	g.spool = "replay memory" + spool
	g.reload("memory")
	srv.Resume()
	resumed = true
	time.Sleep(3 * time.Second) // a few attempts fail at the upstream
	fail.Store(false)
	deadline := time.Now().Add(8 * time.Second)
	for time.Now().Before(deadline) && g.up.Taken()[id] == 0 {
		time.Sleep(100 * time.Millisecond)
	}
	if n := g.up.Taken()[id]; n != 1 {
		t.Errorf("the held delivery (202) reached the upstream %d times after a reload to replay memory; the spool holds %+v", n, g.list())
	}
}

// TestHeldAcrossStop: deliveries held while Redis is paused survive
// a full stop of Caddy (every store destroyed) and a new start, and are
// checked and delivered, each once, by the new config, with the right
// store; also beside a Redis spool, where they are held in the default
// data directory's file store.
func TestHeldAcrossStop(t *testing.T) {
	for _, tc := range []struct{ name string }{{"spool-file"}, {"spool-redis"}} {
		t.Run(tc.name, func(t *testing.T) {
			srv := testredis.Start(t)
			spool := "spool {\n\t\t\tbackoff 200ms 400ms\n\t\t}"
			if tc.name == "spool-redis" {
				spool = "spool {\n\t\t\tstore redis " + srv.URL() + "\n\t\t\tbackoff 200ms 400ms\n\t\t}"
			}
			g := startSpoolRig(t, "replay redis "+srv.URL()+"\n\t\t"+spool)
			if _, status := g.deliver(); status != http.StatusOK {
				t.Fatalf("warm-up: %d", status)
			}
			srv.Pause()
			resumed := false
			defer func() {
				if !resumed {
					srv.Resume()
				}
			}()
			var ids []string
			for range 4 {
				id, status := g.deliver()
				if status != http.StatusAccepted {
					t.Fatalf("while Redis is paused: %d, want 202", status)
				}
				ids = append(ids, id)
			}
			start := time.Now()
			if err := caddy.Stop(); err != nil {
				t.Logf("stop: %v", err)
			}
			t.Logf("stop took %s with Redis paused", time.Since(start))
			g.load(g.caddyfile("again"))
			srv.Resume()
			resumed = true
			if _, err := g.up.WaitTaken(ids, 20*time.Second); err != nil {
				t.Errorf("held deliveries not delivered after stop/start: %v; spool %+v", err, g.list())
			}
			time.Sleep(time.Second)
			for _, id := range ids {
				if n := g.up.Taken()[id]; n != 1 {
					t.Errorf("%s taken %d times", id, n)
				}
				if status := g.send(productionDelivery().withEventID(id).at(time.Now())); status != http.StatusConflict {
					t.Errorf("copy of %s after delivery: %d, want 409", id, status)
				}
			}
		})
	}
}

// TestHeldReloadToFileSpool: beside a Redis spool, deliveries are held in
// the file store of Caddy's data directory, which the config does not
// name; a reload that moves the spool to a file store elsewhere still
// delivers them (they move into the new spool).
func TestHeldReloadToFileSpool(t *testing.T) {
	srv := testredis.Start(t)
	g := startSpoolRig(t, "replay redis "+srv.URL()+"\n\t\tspool {\n\t\t\tstore redis "+srv.URL()+"\n\t\t\tbackoff 200ms 400ms\n\t\t}")
	if _, status := g.deliver(); status != http.StatusOK {
		t.Fatalf("warm-up: %d", status)
	}
	srv.Pause()
	id, status := g.deliver()
	if status != http.StatusAccepted {
		srv.Resume()
		t.Fatalf("while Redis is paused: %d, want 202", status)
	}
	dir := t.TempDir()
	g.spool = "replay redis " + srv.URL() + "\n\t\tspool {\n\t\t\tstore file " + dir + "\n\t\t\tbackoff 200ms 400ms\n\t\t}"
	g.reload("file-elsewhere")
	srv.Resume()
	deadline := time.Now().Add(8 * time.Second)
	for time.Now().Before(deadline) && g.up.Taken()[id] == 0 {
		time.Sleep(100 * time.Millisecond)
	}
	g.drained()
	if n := g.up.Taken()[id]; n != 1 {
		t.Errorf("a held delivery (202), after a reload that moved the spool to %s: delivered %d times, want 1; listing %+v", dir, n, g.list())
	}
}

// TestHeldDeleteWaitsForCheck: a held delivery has no reservation until it
// is checked, so deleting it then would let a copy in: the admin API
// refuses (409) until it is checked; once Redis is back it is delivered,
// and an attacker's copy, with a payload of its own, is refused.
func TestHeldDeleteWaitsForCheck(t *testing.T) {
	for _, outage := range []string{"pause", "stop"} {
		t.Run(outage, func(t *testing.T) { deleteHeldWaitsForCheck(t, outage) })
	}
}

func deleteHeldWaitsForCheck(t *testing.T, outage string) {
	srv := testredis.StartDurable(t) // appendfsync always: a restart loses nothing
	g := startSpoolRig(t, "replay redis "+srv.URL()+"\n\t\tspool {\n\t\t\tbackoff 3s 5s\n\t\t}")
	if _, status := g.deliver(); status != http.StatusOK {
		t.Fatalf("warm-up: %d", status)
	}
	down, up := srv.Pause, srv.Resume
	if outage == "stop" {
		down, up = srv.Stop, srv.Restart
	}
	down()
	id := uuid.NewString()
	genuine := productionDelivery().withEventID(id).at(time.Now())
	status := g.send(genuine)
	if status != http.StatusAccepted {
		up()
		t.Fatalf("genuine while Redis is away: %d, want 202", status)
	}
	if s := g.adminDo(http.MethodDelete, "/trivialsec_webhook/spool/"+id); s != http.StatusConflict {
		t.Errorf("delete of a held delivery not checked yet: %d, want 409", s)
	}
	time.Sleep(2500 * time.Millisecond) // no check of it in flight any more
	up()
	time.Sleep(300 * time.Millisecond)
	forged := productionDelivery().withEventID(id).at(time.Now())
	forged.payload = `{"report_id": "forged"}`
	if s := g.send(forged); s != http.StatusConflict {
		t.Errorf("a copy of a held delivery the operator deleted: %d, want 409 (a deleted spooled delivery keeps its reservation)", s)
	}
	g.sent[id] = genuine.body()
	g.checkTakenOnce([]string{id})
}

// TestHeldNoSecretInLogs: a Redis with a password, in the URL through a
// placeholder; Redis paused, then stopped, while deliveries are held and
// moved: neither the log, nor the admin API, nor the metrics hold the
// password, the secret, or the token.
func TestHeldNoSecretInLogs(t *testing.T) {
	const password = "Pa55-zz-attack2-redis"
	srv := testredis.Start(t)
	admin := redisAdmin(t, srv)
	if err := admin.Ping(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	if err := admin.ConfigSet(context.Background(), "requirepass", password).Err(); err != nil {
		t.Fatal(err)
	}
	url := strings.Replace(srv.URL(), "redis://", "redis://:"+password+"@", 1)
	t.Setenv("TRIVIALSEC_IT_REDIS", url)
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	g := startSpoolRigEdited(t, "replay redis {env.TRIVIALSEC_IT_REDIS}\n\t\tspool {\n\t\t\tstore redis {env.TRIVIALSEC_IT_REDIS}\n\t\t\tbackoff 200ms 400ms\n\t\t}",
		func(c string) string { return withLog(c, logFile) })
	if _, status := g.deliver(); status != http.StatusOK {
		t.Fatalf("warm-up: %d", status)
	}
	g.up.Down()
	srv.Pause()
	var tokens []string
	for range 2 {
		d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
		tokens = append(tokens, d.token())
		if s := g.send(d); s != http.StatusAccepted {
			t.Errorf("while paused: %d, want 202 (held)", s)
		}
	}
	srv.Resume()
	time.Sleep(2 * time.Second)
	srv.Stop()
	for range 2 {
		d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
		tokens = append(tokens, d.token())
		g.send(d)
	}
	time.Sleep(1500 * time.Millisecond)
	get := func(url string, want int) string {
		t.Helper()
		resp, err := senderClient.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		body := readAll(t, resp.Body)
		if want != 0 && resp.StatusCode != want || body == "" {
			t.Fatalf("%s: %d %q", url, resp.StatusCode, body)
		}
		return body
	}
	metrics := get(g.admin+"/metrics", http.StatusOK)
	listing := get(g.admin+"/trivialsec_webhook/spool", 0) // 503 while Redis is down: its error is scanned too
	cfg := get(g.admin+"/config/", http.StatusOK)
	raw, err := os.ReadFile(logFile)
	if err != nil || len(raw) == 0 {
		t.Fatalf("the log: %v", err)
	}
	for what, text := range map[string]string{"log": string(raw), "metrics": metrics, "listing": listing, "config": cfg} {
		for _, secret := range append([]string{password, testSecret}, tokens...) {
			if strings.Contains(text, secret) {
				t.Errorf("the %s holds a secret (%.12s...)", what, secret)
			}
		}
	}
	t.Logf("log %d bytes, listing %q", len(raw), listing)
}

// TestHeldGuardBeforeVerdict: an evicting Redis is paused when the
// config starts, so the guard has no verdict; the first delivery after it
// resumes must not write into it (it is held: 202, no replay key).
func TestHeldGuardBeforeVerdict(t *testing.T) {
	srv := testredis.StartWith(t, "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
	admin := redisAdmin(t, srv)
	srv.Pause()
	resumed := false
	defer func() {
		if !resumed {
			srv.Resume()
		}
	}()
	g := startSpoolRig(t, "replay redis "+srv.URL()+"\n\t\tspool {\n\t\t\tbackoff 3s 5s\n\t\t}")
	srv.Resume()
	resumed = true
	var ids []string
	for range 5 {
		id, status := g.deliver()
		ids = append(ids, id)
		if status != http.StatusAccepted {
			t.Errorf("delivery on an evicting Redis right after start: %d, want 202 (held)", status)
		}
	}
	for _, id := range ids {
		if n, _ := admin.Exists(context.Background(), "trivialsec_webhook:replay:"+id).Result(); n != 0 {
			t.Errorf("the replay store wrote %s into an evicting Redis before its first verdict", id)
		}
	}
	if n := len(g.up.Received()); n != 0 {
		t.Errorf("%d deliveries reached the upstream unchecked", n)
	}
}
