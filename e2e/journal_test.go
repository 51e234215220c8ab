package e2e

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
)

// TestNoReplayAfterSIGKILL: with the defaults (memory replay protection, the
// file spool), a delivery's reservation is on disk before it is forwarded.
// Under a stream of deliveries from 8 senders, one sender SIGKILLs Caddy the
// moment it reads an answer; Caddy starts again on the same data, and every
// delivery the upstream received in that run, and every one answered, is
// sent again: each must be refused with 409. E2E_KILLS sets the number of
// kills (100 by default).
func TestNoReplayAfterSIGKILL(t *testing.T) {
	kills := 100
	if v := os.Getenv("E2E_KILLS"); v != "" {
		var err error
		if kills, err = strconv.Atoi(v); err != nil {
			t.Fatalf("E2E_KILLS=%q: %v", v, err)
		}
	}
	// The upstream keeps each body it read whole: one cut by the kill
	// reached no service.
	var upMu sync.Mutex
	var received []string
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil || int64(len(body)) != r.ContentLength {
			return
		}
		upMu.Lock()
		received = append(received, string(body))
		upMu.Unlock()
	}))
	defer up.Close()
	receivedSince := func(n int) []string {
		upMu.Lock()
		defer upMu.Unlock()
		return append([]string(nil), received[n:]...)
	}
	port := freePort(t)
	env := []string{"TRIVIALSEC_WEBHOOK_SECRET=" + secret, "XDG_DATA_HOME=" + t.TempDir()}
	config := fmt.Sprintf(`{
	admin off
	persist_config off
}

http://127.0.0.1:%d {
	trivialsec_webhook {
		account acme
		secret {env.TRIVIALSEC_WEBHOOK_SECRET}
	}
	reverse_proxy %s
}
`, port, up.Listener.Addr())
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)

	type sent struct{ auth, body string }
	var (
		mu                   sync.Mutex
		made                 = map[string]sent{} // body -> delivery, of every kill: the spool re-drives some later
		resent, lastReplayed int
		replayed             []string
	)
	srv := startServer(t, config, port, env)
	for kill := range kills {
		var (
			answered []sent
			killed   atomic.Bool
			last     string // the body of the delivery answered right before the kill
			wg       sync.WaitGroup
		)
		upMu.Lock()
		before := len(received)
		upMu.Unlock()
		for sender := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for n := 0; n < 2000 && !killed.Load(); n++ {
					var d sent
					d.auth, d.body = mint(secret, "acme", uuid.NewString(), time.Now())
					mu.Lock()
					made[d.body] = d
					mu.Unlock()
					status, err := postStatus(url, d.auth, d.body)
					if err != nil || status/100 != 2 {
						continue // cut by the kill, or answered after it
					}
					// The first sender kills Caddy the moment its 20th
					// answer is in: the others are in flight.
					if sender == 0 && n >= 20 && killed.CompareAndSwap(false, true) {
						srv.Kill()
						mu.Lock()
						last = d.body
						mu.Unlock()
					}
					mu.Lock()
					answered = append(answered, d)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		if !killed.Load() {
			t.Fatalf("kill %d: no sender got 20 answers", kill)
		}
		srv = startServer(t, config, port, env)
		again := map[string]sent{}
		for _, d := range answered {
			again[d.body] = d
		}
		for _, body := range receivedSince(before) {
			d, ok := made[body]
			if !ok {
				t.Fatalf("kill %d: the upstream received a delivery nobody sent", kill)
			}
			again[body] = d
		}
		for body, d := range again {
			resent++
			if status := post(t, url, d.auth, d.body); status != 409 {
				replayed = append(replayed, fmt.Sprintf("kill %d: a copy got %d", kill, status))
				if body == last {
					lastReplayed++
				}
			}
		}
	}
	t.Logf("%d kills; copies accepted: %d of the %d deliveries answered right before a kill, %d of all %d forwarded or answered",
		kills, lastReplayed, kills, len(replayed), resent)
	if len(replayed) > 0 || lastReplayed > 0 {
		t.Fatalf("copies of forwarded deliveries accepted after SIGKILL and restart, the first of them:\n%s", strings.Join(replayed[:min(len(replayed), 10)], "\n"))
	}
}
