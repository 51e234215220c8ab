package e2e

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// TestTwoInstancesShareRedis: two Caddy processes behind one Redis act as
// one receiver: a delivery accepted by one is refused by the other, a race
// between them lets one through, and Redis down means a delivery held on
// the instance's disk, unchecked, never a pass: checked, and delivered,
// once Redis is back.
func TestTwoInstancesShareRedis(t *testing.T) {
	redis := testredis.Start(t)
	up := startUpstream(t, 0)
	env := []string{"TRIVIALSEC_WEBHOOK_SECRET=" + secret, "TRIVIALSEC_REDIS_URL=" + redis.URL()}
	var urls []string
	for range 2 {
		port := freePort(t)
		startServer(t, fmt.Sprintf(`{
	admin off
	persist_config off
}

http://127.0.0.1:%d {
	trivialsec_webhook {
		account acme
		secret {env.TRIVIALSEC_WEBHOOK_SECRET}
		replay redis {env.TRIVIALSEC_REDIS_URL}
	}
	reverse_proxy %s
}
`, port, up.Listener.Addr()), port, env)
		urls = append(urls, fmt.Sprintf("http://127.0.0.1:%d/", port))
	}
	a, b := urls[0], urls[1]
	var want []string

	// Accepted by A, then refused by B.
	auth, body := mint(secret, "acme", uuid.NewString(), time.Now())
	if status := post(t, a, auth, body); status != 202 {
		t.Fatalf("A: %d", status)
	}
	want = append(want, body)
	if status := post(t, b, auth, body); status != 409 {
		t.Fatalf("the same delivery at B: %d, want 409", status)
	}

	// The same event sent to A and B at once, many times over: it passes
	// exactly once.
	for range 10 {
		auth, body := mint(secret, "acme", uuid.NewString(), time.Now())
		statuses := make(chan int, 8)
		var wg sync.WaitGroup
		for i := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				statuses <- post(t, urls[i%2], auth, body)
			}()
		}
		wg.Wait()
		close(statuses)
		passed := 0
		for s := range statuses {
			switch s {
			case 202:
				passed++
			case 409:
			default:
				t.Errorf("status %d in the race", s)
			}
		}
		if passed != 1 {
			t.Fatalf("the event passed %d times", passed)
		}
		want = append(want, body)
	}

	// Redis stopped: each held on its instance's disk (202), unchecked,
	// and nothing forwarded.
	redis.Stop()
	for _, u := range urls {
		auth, body := mint(secret, "acme", uuid.NewString(), time.Now())
		if status := post(t, u, auth, body); status != 202 {
			t.Errorf("with Redis down: %d, want 202 (held)", status)
		}
		want = append(want, body)
	}
	time.Sleep(500 * time.Millisecond) // checks that find Redis down
	if n, sent := len(up.received()), len(want)-2; n != sent {
		t.Fatalf("with Redis down, the upstream got %d deliveries, want the %d of before", n, sent)
	}
	// Redis back: the held deliveries are checked and delivered, and new
	// ones pass again.
	redis.Restart()
	for _, u := range urls {
		auth, body := mint(secret, "acme", uuid.NewString(), time.Now())
		if status := post(t, u, auth, body); status != 202 {
			t.Errorf("with Redis back: %d, want 202", status)
		}
		want = append(want, body)
	}

	for deadline := time.Now().Add(20 * time.Second); len(up.received()) < len(want) && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	got := up.received()
	if len(got) != len(want) {
		t.Fatalf("upstream got %d deliveries, want %d", len(got), len(want))
	}
	seen := map[string]bool{}
	for _, body := range got {
		seen[body] = true
	}
	for _, body := range want {
		if !seen[body] {
			t.Errorf("upstream never got %s", body)
		}
	}
}
