package trivialsecwebhook

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// Deliveries held on the instance's disk while Redis does not answer, as
// an attacker would try them: copies sent while one is held, late, or
// first; and a spool write whose outcome is unknown with nowhere to hold
// it. (docs/checks.md, Replay protection; docs/several-instances.md.)

// shortLived is a delivery of id whose token was issued now and
// expires life later (the real sender's live a day; an attacker's captured
// copy is simply sent late in that day).
func shortLived(id string, now time.Time, life time.Duration, payload string) *delivery {
	d := productionDelivery().withEventID(id)
	d.claims["iat"] = now.Unix()
	d.claims["nbf"] = now.Unix()
	d.claims["exp"] = now.Add(life).Unix()
	if payload != "" {
		d.payload = payload
	}
	return d
}

// TestHeldPastExpiryIsDeadLetter: a delivery is delivered (200); a copy
// of it sent while Redis is paused is held (202). Redis comes back only
// after the token's exp + leeway, when it has forgotten the event: the
// held copy cannot be checked any more, and is not delivered.
func TestHeldPastExpiryIsDeadLetter(t *testing.T) {
	for _, tc := range []struct{ name, spool string }{
		{"spool-file", "spool {\n\t\t\tbackoff 100ms 300ms\n\t\t}"},
		{"spool-redis", ""}, // filled below: the same Redis
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := testredis.Start(t)
			spool := tc.spool
			if spool == "" {
				spool = "spool {\n\t\t\tstore redis " + srv.URL() + "\n\t\t\tbackoff 100ms 300ms\n\t\t}"
			}
			g := startSpoolRig(t, "replay redis "+srv.URL()+"\n\t\tleeway 0s\n\t\t"+spool)
			id := uuid.NewString()
			now := time.Now()
			d := shortLived(id, now, 3*time.Second, "")
			g.sent[id] = d.body()
			if status := g.send(d); status != http.StatusOK {
				t.Fatalf("genuine: %d, want 200", status)
			}
			// The replay, while Redis does not answer.
			srv.Pause()
			resumed := false
			defer func() {
				if !resumed {
					srv.Resume()
				}
			}()
			if status := g.send(shortLived(id, now, 3*time.Second, "")); status != http.StatusAccepted {
				t.Fatalf("copy while Redis is paused: %d, want 202 (held)", status)
			}
			// Redis comes back after the token expired.
			time.Sleep(time.Until(now.Add(4500 * time.Millisecond)))
			srv.Resume()
			resumed = true
			g.waitFor("the held copy is a dead letter", func() bool {
				l := g.list()
				return len(l) == 1 && l[0].State == stateDead && strings.Contains(l[0].LastError, "exp + leeway")
			})
			if n := g.up.Taken()[id]; n != 1 {
				t.Errorf("event %s reached the upstream %d times (a replay held while Redis was away, checked after its token expired)", id, n)
			}
		})
	}
}

// TestHeldBeforeItsCopy: a genuine delivery is held while Redis is unfit
// (evicting); once Redis is fit again, a copy with a payload of its own
// reaches the same instance before the held one is checked. The held one
// came first: the copy is refused, and the genuine payload is delivered,
// once.
func TestHeldBeforeItsCopy(t *testing.T) {
	for _, tc := range []struct{ name string }{{"spool-file"}, {"spool-redis"}} {
		t.Run(tc.name, func(t *testing.T) {
			recheckEvery(t, 100*time.Millisecond)
			srv := testredis.StartWith(t, "--maxmemory", "64mb", "--maxmemory-policy", "noeviction")
			admin := redisAdmin(t, srv)
			spool := "spool {\n\t\t\tbackoff 3s 5s\n\t\t}"
			if tc.name == "spool-redis" {
				spool = "spool {\n\t\t\tstore redis " + srv.URL() + "\n\t\t\tbackoff 3s 5s\n\t\t}"
			}
			g := startSpoolRig(t, "replay redis "+srv.URL()+"\n\t\t"+spool)
			ctx := context.Background()
			if err := admin.ConfigSet(ctx, "maxmemory-policy", "allkeys-lru").Err(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond)
			id := uuid.NewString()
			genuine := productionDelivery().withEventID(id).at(time.Now())
			genuine.payload = `{"report_id": "genuine"}`
			if status := g.send(genuine); status != http.StatusAccepted {
				t.Fatalf("genuine while Redis is unfit: %d, want 202 (held)", status)
			}
			time.Sleep(300 * time.Millisecond) // its first check fails: backoff 3s
			if err := admin.ConfigSet(ctx, "maxmemory-policy", "noeviction").Err(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond)
			forged := productionDelivery().withEventID(id).at(time.Now())
			forged.payload = `{"report_id": "forged"}`
			if status := g.send(forged); status != http.StatusConflict {
				t.Errorf("the copy, with the genuine one held: %d, want 409", status)
			}
			deadline := time.Now().Add(12 * time.Second)
			for time.Now().Before(deadline) && len(g.list()) > 0 {
				time.Sleep(100 * time.Millisecond)
			}
			time.Sleep(500 * time.Millisecond)
			var bodies []string
			for _, r := range g.up.Received() {
				if r.EventID == id {
					bodies = append(bodies, r.Body)
				}
			}
			t.Logf("the upstream got: %q", bodies)
			gotGenuine := false
			for _, b := range bodies {
				if b == genuine.body() {
					gotGenuine = true
				}
			}
			if !gotGenuine {
				t.Errorf("the genuine delivery, answered 202, never reached the upstream; it got %q", bodies)
			}
			if len(bodies) > 1 {
				t.Errorf("event %s reached the upstream %d times", id, len(bodies))
			}
		})
	}
}

// TestHeldTwoCopiesWhilePaused: within the first second of a Redis pause,
// a delivery and a copy of it reach the same instance, each sending its
// reservation into the paused Redis: whichever Redis runs first, each is
// delivered once.
func TestHeldTwoCopiesWhilePaused(t *testing.T) {
	srv := testredis.Start(t)
	g := startSpoolRig(t, "replay redis "+srv.URL()+"\n\t\tspool {\n\t\t\tbackoff 100ms 300ms\n\t\t}")
	if _, status := g.deliver(); status != http.StatusOK { // the guard's verdict is fresh
		t.Fatalf("warm-up: %d", status)
	}
	srv.Pause()
	const n = 20
	ids := make([]string, n)
	done := make(chan struct{}, 2*n)
	for i := range ids {
		ids[i] = uuid.NewString()
		d := productionDelivery().withEventID(ids[i]).at(time.Now())
		g.sent[ids[i]] = d.body()
		go func() {
			if status := g.send(d); status != http.StatusAccepted {
				t.Errorf("genuine: %d", status)
			}
			done <- struct{}{}
		}()
	}
	time.Sleep(30 * time.Millisecond)
	for i := range ids {
		d := productionDelivery().withEventID(ids[i]).at(time.Now())
		go func() {
			if status := g.send(d); status != http.StatusAccepted && status != http.StatusConflict {
				t.Errorf("copy: %d, want 202 or 409", status)
			}
			done <- struct{}{}
		}()
	}
	for range 2 * n {
		<-done
	}
	srv.Resume()
	if _, err := g.up.WaitTaken(ids, 15*time.Second); err != nil {
		t.Errorf("%v (held deliveries dropped as copies of their own copy)", err)
	}
	for id, k := range g.up.Taken() {
		if k > 1 {
			t.Errorf("%s taken %d times", id, k)
		}
	}
}

// TestHeldPastExpiryRedisUnfit: as TestHeldPastExpiryIsDeadLetter, with
// Redis unfit (evicting) throughout: the held copy, never checked, is not
// delivered once its token has expired.
func TestHeldPastExpiryRedisUnfit(t *testing.T) {
	recheckEvery(t, 100*time.Millisecond)
	srv := testredis.StartWith(t, "--maxmemory", "64mb", "--maxmemory-policy", "noeviction")
	admin := redisAdmin(t, srv)
	g := startSpoolRig(t, "replay redis "+srv.URL()+"\n\t\tleeway 0s\n\t\tspool {\n\t\t\tbackoff 100ms 300ms\n\t\t}")
	id := uuid.NewString()
	now := time.Now()
	if status := g.send(shortLived(id, now, 3*time.Second, "")); status != http.StatusOK {
		t.Fatalf("genuine: %d, want 200", status)
	}
	if err := admin.ConfigSet(context.Background(), "maxmemory-policy", "allkeys-lru").Err(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if status := g.send(shortLived(id, now, 3*time.Second, `{"report_id": "forged"}`)); status != http.StatusAccepted {
		t.Fatalf("copy while Redis is unfit: %d, want 202 (held)", status)
	}
	g.waitFor("the held copy is a dead letter", func() bool {
		l := g.list()
		return len(l) == 1 && l[0].State == stateDead
	})
	if n := g.up.Taken()[id]; n != 1 {
		t.Errorf("event %s reached the upstream %d times, Redis unfit throughout", id, n)
	}
}

// fillHold fills the local hold store of g (max_size 5000) with a large
// delivery held while the replay store's Redis is paused, then pauses the
// spool's Redis: set *resumed once the test resumes it.
func fillHold(t *testing.T, g *spoolRig, replaySrv, spoolSrv *testredis.Server) (big *delivery, resumed *bool) {
	t.Helper()
	replaySrv.Pause()
	big = productionDelivery().withEventID(uuid.NewString()).at(time.Now())
	big.payload = `{"pad": "` + strings.Repeat("x", 4300) + `"}`
	if status := g.send(big); status != http.StatusAccepted {
		replaySrv.Resume()
		t.Fatalf("big: %d, want 202 (held)", status)
	}
	replaySrv.Resume()
	time.Sleep(1500 * time.Millisecond)
	spoolSrv.Pause()
	resumed = new(bool)
	t.Cleanup(func() {
		if !*resumed {
			spoolSrv.Resume()
		}
	})
	return big, resumed
}

// TestHoldFullKeepsReservation: the spool's Redis is paused while the
// upstream is down, and the local hold store is full: a spool write whose
// outcome is unknown (it runs when Redis resumes) cannot be held. The
// sender gets the failure, and the event ID stays reserved: the write that
// ran delivers it, once, and a copy is refused.
func TestHoldFullKeepsReservation(t *testing.T) {
	replaySrv := testredis.Start(t)
	spoolSrv := testredis.Start(t)
	g := startSpoolRig(t, "replay redis "+replaySrv.URL()+"\n\t\tspool {\n\t\t\tstore redis "+spoolSrv.URL()+
		"\n\t\t\tmax_size 5000\n\t\t\tbackoff 1s 2s\n\t\t}")
	g.up.Down()
	// A large delivery, held while the replay store's Redis is paused,
	// fills the local hold store (and does not fit in the Redis spool: it
	// is delivered from the disk once the upstream is back).
	_, resumed := fillHold(t, g, replaySrv, spoolSrv)
	id := uuid.NewString()
	d := productionDelivery().withEventID(id).at(time.Now())
	status := g.send(d)
	t.Logf("the delivery whose spool write timed out, with the hold store full: %d", status)
	spoolSrv.Resume()
	*resumed = true
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	// The copy.
	time.Sleep(200 * time.Millisecond)
	copyStatus := g.send(productionDelivery().withEventID(id).at(time.Now()))
	if status == http.StatusAccepted || copyStatus != http.StatusConflict {
		t.Errorf("the delivery: %d, want the failure; a copy: %d, want 409 (the event ID stays reserved)", status, copyStatus)
	}
	if _, err := g.up.WaitTaken([]string{id}, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	g.drained()
	if n := g.up.Taken()[id]; n > 1 {
		t.Errorf("event %s reached the upstream %d times (first answered %d, copy %d)", id, n, status, copyStatus)
	}
}

// TestHoldFullModeAlways: as TestHoldFullKeepsReservation, in mode always
// with the upstream up: the delivery whose write has an unknown outcome is
// not also sent inline (the write that ran delivers it, once); and the
// held delivery the Redis spool has no room for is delivered from the
// instance's disk.
func TestHoldFullModeAlways(t *testing.T) {
	replaySrv := testredis.Start(t)
	spoolSrv := testredis.Start(t)
	g := startSpoolRig(t, "replay redis "+replaySrv.URL()+"\n\t\tspool {\n\t\t\tstore redis "+spoolSrv.URL()+
		"\n\t\t\tmode always\n\t\t\tmax_size 5000\n\t\t\tbackoff 1s 2s\n\t\t}")
	g.up.Down() // the big delivery stays held: the hold store is full
	big, resumed := fillHold(t, g, replaySrv, spoolSrv)
	if n := len(g.up.Received()); n != 0 {
		t.Fatalf("the upstream got %d requests: the big delivery left the hold store", n)
	}
	id := uuid.NewString()
	if status := g.send(productionDelivery().withEventID(id).at(time.Now())); status != http.StatusServiceUnavailable {
		t.Errorf("mode always, the spool's write with an unknown outcome, the hold full: %d, want 503", status)
	}
	spoolSrv.Resume()
	*resumed = true
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	if _, err := g.up.WaitTaken([]string{id}, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	g.drained()
	if n := g.up.Taken()[id]; n != 1 {
		t.Errorf("event %s reached the upstream %d times, want once (by the write that ran)", id, n)
	}
	if g.up.Taken()[big.eventID] == 0 {
		t.Errorf("the big delivery, answered 202, is still held with the upstream up (it never fits the Redis spool): %+v", g.list())
	}
}

// TestHoldFullSettlesWriteNotRun: as TestHoldFullKeepsReservation, with the
// spool's Redis down rather than paused, so that the write never runs:
// once Redis answers, the write is found not to have run, and the event ID
// is released; a resend is accepted, and delivered once.
func TestHoldFullSettlesWriteNotRun(t *testing.T) {
	replaySrv := testredis.Start(t)
	spoolSrv := testredis.Start(t)
	g := startSpoolRig(t, "replay redis "+replaySrv.URL()+"\n\t\tspool {\n\t\t\tstore redis "+spoolSrv.URL()+
		"\n\t\t\tmax_size 5000\n\t\t\tbackoff 1s 2s\n\t\t}")
	g.up.Down()
	_, resumed := fillHold(t, g, replaySrv, spoolSrv)
	spoolSrv.Resume()
	*resumed = true
	spoolSrv.Stop()
	id := uuid.NewString()
	if status := g.send(productionDelivery().withEventID(id).at(time.Now())); status == http.StatusAccepted {
		t.Fatalf("with the spool's Redis down and the hold full: %d, want the failure", status)
	}
	spoolSrv.Restart()
	admin := redisAdmin(t, replaySrv)
	g.waitFor("the event ID is released", func() bool {
		n, err := admin.Exists(context.Background(), defaultRedisKeyPrefix+id).Result()
		return err == nil && n == 0
	})
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	d := productionDelivery().withEventID(id).at(time.Now())
	g.sent[id] = d.body()
	if status := g.send(d); status != http.StatusOK {
		t.Fatalf("a resend once the write was found not to have run: %d, want 200", status)
	}
	g.checkTakenOnce([]string{id})
}
