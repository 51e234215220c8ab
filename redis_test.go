package trivialsecwebhook

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/google/uuid"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

func TestRedisStore(t *testing.T) {
	srv := testredis.Start(t)
	s, err := newRedisStore(srv.URL(), "test:")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Destruct() })
	ctx := context.Background()
	now := time.Now()
	exp := now.Add(90 * time.Second)

	id := uuid.New()
	first, result, err := s.reserve(ctx, id, exp, now)
	if err != nil || result != replayReserved {
		t.Fatalf("first: %d, %v", result, err)
	}
	if _, result, err := s.reserve(ctx, id, exp, now); err != nil || result != replayDuplicate {
		t.Fatalf("second: %d, %v", result, err)
	}
	ttl, err := s.client.PTTL(ctx, "test:"+id.String()).Result()
	if err != nil || ttl < 89*time.Second || ttl > 90*time.Second {
		t.Fatalf("TTL %s, %v: want exp + leeway - now", ttl, err)
	}

	// Release is compare-and-delete: another reservation's token removes
	// nothing.
	if err := s.release(ctx, id, reservation{token: "not-ours"}); err != nil {
		t.Fatal(err)
	}
	if _, result, _ := s.reserve(ctx, id, exp, now); result != replayDuplicate {
		t.Fatalf("released with another token: %d", result)
	}
	// The request's context is often done by the time a release runs (the
	// client went away): the release happens all the same.
	gone, cancel := context.WithCancel(ctx)
	cancel()
	if err := s.release(gone, id, first); err != nil {
		t.Fatalf("release with the request's context done: %v", err)
	}
	if _, result, _ := s.reserve(ctx, id, exp, now); result != replayReserved {
		t.Fatalf("after release: %d", result)
	}

	// Of concurrent reservations of one ID, exactly one wins.
	for range 20 {
		id := uuid.New()
		exactlyOneWins(t, 10, func() bool {
			_, result, err := s.reserve(ctx, id, exp, now)
			return err == nil && result == replayReserved
		})
	}

	// Redis down: an error, quickly; Redis back: reservations again.
	srv.Stop()
	start := time.Now()
	if _, _, err := s.reserve(ctx, uuid.New(), exp, now); err == nil {
		t.Fatal("no error with Redis down")
	}
	if d := time.Since(start); d > 5*redisTimeout {
		t.Errorf("the failure took %s", d)
	}
	srv.Restart()
	if _, result, err := s.reserve(ctx, uuid.New(), exp, now); err != nil || result != replayReserved {
		t.Fatalf("after restart: %d, %v", result, err)
	}
}

// TestServeHTTPRedisFailsClosed: with Redis down, deliveries get 503 and a
// WARN line, and nothing reaches the next handler.
func TestServeHTTPRedisFailsClosed(t *testing.T) {
	srv := testredis.Start(t)
	h, logs := newTestHandler(t, func(h *Handler) { h.Replay = &Replay{Store: "redis", URL: srv.URL(), KeyPrefix: t.Name() + ":"} })
	next := &recordingNext{}
	if status, _ := serve(t, h, next, deliveryRequest(productionDelivery())); status != 200 {
		t.Fatalf("with Redis up: %d", status)
	}
	if status, _ := serve(t, h, next, deliveryRequest(productionDelivery())); status != http.StatusConflict {
		t.Fatalf("replay with Redis up: %d", status)
	}
	srv.Stop()
	d := productionDelivery().withEventID(uuid.NewString())
	status, repl := serve(t, h, next, deliveryRequest(d))
	if status != http.StatusServiceUnavailable || next.calls != 1 {
		t.Fatalf("with Redis down: status %d, next called %d times", status, next.calls)
	}
	if got, _ := repl.GetString("http.trivialsec_webhook.reason"); got != "replay_store_unavailable" {
		t.Errorf("reason %q", got)
	}
	warn := logs.FilterLevelExact(zapcore.WarnLevel).FilterMessage("replay store unavailable: refusing the delivery")
	if warn.Len() != 1 || warn.All()[0].ContextMap()["error"] == "" {
		t.Errorf("no WARN line naming the reason: %v", logs.All())
	}
	if logs.FilterField(zap.String("reason", "replay_store_unavailable")).Len() != 1 {
		t.Error("the refusal is not logged with its reason")
	}
	srv.Restart()
	if status, _ := serve(t, h, next, deliveryRequest(d)); status != 200 {
		t.Fatalf("with Redis back: %d", status)
	}
}

// TestIntegrationRedisAcrossReloads: config reloads neither leak Redis
// connections nor lose reservations.
func TestIntegrationRedisAcrossReloads(t *testing.T) {
	srv := testredis.Start(t)
	up := startUpstream(t)
	t.Setenv("TRIVIALSEC_IT_SECRET", testSecret)
	t.Setenv("TRIVIALSEC_IT_REDIS", srv.URL())
	base := startCaddy(t, fmt.Sprintf(`	trivialsec_webhook {
		account %s
		secret {env.TRIVIALSEC_IT_SECRET}
		replay redis {env.TRIVIALSEC_IT_REDIS} %s:
	}
	reverse_proxy %s`, testAccount, t.Name(), up.Listener.Addr()))
	d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
	// A connection that Caddy's listener hand-off closes before any answer
	// (see docs/deploying.md) is sent again: this test is about the store.
	send := func() int {
		t.Helper()
		for try := 0; ; try++ {
			req, _ := http.NewRequest(http.MethodPost, base+"/", strings.NewReader(d.body()))
			req.Header.Set("Authorization", d.authorization())
			resp, err := senderClient.Do(req)
			if err == nil {
				resp.Body.Close()
				return resp.StatusCode
			}
			if try == 3 {
				t.Fatal(err)
			}
			time.Sleep(time.Duration(try+1) * 100 * time.Millisecond) // past the hand-off
		}
	}
	if status := send(); status != 202 {
		t.Fatalf("first delivery: %d", status)
	}
	before, err := srv.ConnectedClients()
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		if err := caddy.Load(loadedConfig, true); err != nil {
			t.Fatal(err)
		}
		if status := send(); status != http.StatusConflict {
			t.Fatalf("after reload %d: %d, want 409", i+1, status)
		}
	}
	after, err := srv.ConnectedClients()
	if err != nil {
		t.Fatal(err)
	}
	if after > before+1 {
		t.Fatalf("%d Redis connections before 10 reloads, %d after", before, after)
	}
	if n := len(up.received()); n != 1 {
		t.Fatalf("upstream got %d deliveries", n)
	}
}
