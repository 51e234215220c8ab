// Command load drives a Caddy with trivialsec_webhook, in front of a real
// upstream, with many unique valid deliveries mixed with forgeries (20%)
// and replays (5%), at a fixed concurrency, on loopback; then the same
// while `caddy reload` swaps between two equivalent configs every second.
// It checks that the upstream receives every valid delivery exactly once,
// no forgery and no replay, and that no answer is a 5xx.
//
// Run from the repository: go run ./bench/load [-n 20000] [-c 64]
// (it builds nothing: give -caddy a binary with the module, such as
// go build -o bench/out/caddy ./cmd/caddy).
package main

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
)

const (
	secret  = "load-test-secret"
	account = "load"
)

func main() {
	caddyBin := flag.String("caddy", "bench/out/caddy", "Caddy with the module")
	n := flag.Int("n", 20000, "unique valid deliveries per phase")
	c := flag.Int("c", 64, "concurrent senders")
	rate := flag.Int("rate", 0, "requests per second at most (0: as fast as Caddy answers)")
	flag.Parse()
	if err := run(*caddyBin, *n, *c, *rate); err != nil {
		fmt.Fprintln(os.Stderr, "load:", err)
		os.Exit(1)
	}
}

func run(caddyBin string, n, conc, rate int) error {
	up := newUpstream()
	defer up.Close()
	dir, err := os.MkdirTemp("", "trivialsec-load-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	port, err := testkit.FreePort()
	if err != nil {
		return err
	}
	admin, err := testkit.FreePort()
	if err != nil {
		return err
	}
	configs := [2]string{filepath.Join(dir, "a.Caddyfile"), filepath.Join(dir, "b.Caddyfile")}
	for i, name := range configs {
		// Equivalent configs: they differ only in a header the upstream ignores.
		cf := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
}
http://127.0.0.1:%d {
	trivialsec_webhook {
		account %s
		secret {env.TRIVIALSEC_WEBHOOK_SECRET}
	}
	reverse_proxy %s {
		header_up X-Config %c
	}
}
`, admin, port, account, up.Listener.Addr(), 'a'+i)
		if err := os.WriteFile(name, []byte(cf), 0o600); err != nil {
			return err
		}
	}
	caddy, err := testkit.StartCaddy(caddyBin, configs[0], append(os.Environ(), "TRIVIALSEC_WEBHOOK_SECRET="+secret),
		nil, fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return err
	}
	defer caddy.Stop()
	url := fmt.Sprintf("http://127.0.0.1:%d/webhook/trivialsec", port)

	for _, reloading := range []bool{false, true} {
		var stop chan struct{}
		var reloads atomic.Int32
		var reloadErr error
		var wg sync.WaitGroup
		if reloading {
			stop = make(chan struct{})
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 1; ; i++ {
					select {
					case <-stop:
						return
					case <-time.After(time.Second):
					}
					out, err := exec.Command(caddyBin, "reload", "--config", configs[i%2],
						"--address", fmt.Sprintf("127.0.0.1:%d", admin)).CombinedOutput()
					if err != nil {
						reloadErr = fmt.Errorf("reload: %v: %s", err, out)
						return
					}
					reloads.Add(1)
				}
			}()
		}
		res, err := phase(url, up, n, conc, rate)
		if stop != nil {
			close(stop)
		}
		wg.Wait()
		if err == nil {
			err = reloadErr
		}
		label := "steady"
		if reloading {
			label = fmt.Sprintf("with a reload every second (%d reloads)", reloads.Load())
		}
		fmt.Printf("%s: %d requests (%d valid, %d forged, %d replayed) in %s, %.0f requests/s; "+
			"upstream got %d, each valid delivery once; %d connections dropped before an answer, resent\n",
			label, res.requests, res.valid, res.forged, res.replayed, res.elapsed.Round(time.Millisecond),
			float64(res.requests)/res.elapsed.Seconds(), res.forwarded, res.dropped)
		if err != nil {
			return err
		}
	}
	return nil
}

type result struct {
	requests, valid, forged, replayed, forwarded, dropped int
	elapsed                                               time.Duration
}

type job struct {
	auth, body, id string
	kind           int // valid, forged, replay
}

const (
	valid = iota
	forged
	replay
)

// phase sends n unique valid deliveries, n/3.75 forgeries and n/15
// replays (20% and 5% of all), and checks what the upstream received.
func phase(url string, up *upstream, n, conc, rate int) (result, error) {
	up.reset()
	now := time.Now()
	var jobs []job
	for range n {
		id := uuid.NewString()
		auth, body := mint(secret, id, id, now)
		jobs = append(jobs, job{auth, body, id, valid})
	}
	nForged, nReplay := n*20/75, n*5/75
	for i := range nForged {
		id := uuid.NewString()
		var auth, body string
		switch i % 4 {
		case 0: // a guessed secret
			auth, body = mint("guess", id, id, now)
		case 1: // a genuine token over another event's body
			auth, _ = mint(secret, id, id, now)
			_, body = mint(secret, uuid.NewString(), uuid.NewString(), now)
		case 2: // expired
			auth, body = mint(secret, id, id, now.Add(-25*time.Hour))
		case 3: // alg none
			auth, body = mint(secret, id, id, now)
			parts := strings.Split(auth, ".")
			auth = base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none"}`)) + "." + parts[1] + "."
		}
		jobs = append(jobs, job{auth, body, id, forged})
	}
	rand.Shuffle(len(jobs), func(i, j int) { jobs[i], jobs[j] = jobs[j], jobs[i] })

	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: conc}}
	queue := make(chan job, len(jobs)+nReplay)
	for _, j := range jobs {
		queue <- j
	}
	var (
		mu        sync.Mutex
		replayed  int
		failures  []string
		sent      atomic.Int64
		dropped   atomic.Int64
		remaining atomic.Int64
	)
	remaining.Store(int64(len(jobs) + nReplay))
	fail := func(format string, a ...any) {
		mu.Lock()
		if len(failures) < 10 {
			failures = append(failures, fmt.Sprintf(format, a...))
		}
		mu.Unlock()
	}
	start := time.Now()
	var tick <-chan time.Time
	if rate > 0 {
		ticker := time.NewTicker(time.Second / time.Duration(rate))
		defer ticker.Stop()
		tick = ticker.C
	}
	var wg sync.WaitGroup
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for remaining.Load() > 0 {
				var j job
				select {
				case j = <-queue:
				case <-time.After(50 * time.Millisecond):
					continue
				}
				if tick != nil {
					<-tick
				}
				status, err := send(client, url, j)
				// A connection closed before any answer (a reload hands the
				// listener over): the delivery is sent again, a little later
				// each time so as to leave the hand-off behind, and must then
				// pass, or be a replay if the first one got through.
				for try := 1; err != nil && try <= 5; try++ {
					dropped.Add(1)
					time.Sleep(time.Duration(try) * 100 * time.Millisecond)
					status, err = send(client, url, j)
					if j.kind == valid && status == http.StatusConflict {
						status = http.StatusOK // the first attempt got through
					}
				}
				sent.Add(1)
				remaining.Add(-1)
				switch {
				case err != nil:
					fail("%s: %v", j.id, err)
				case status >= 500:
					fail("%s: status %d", j.id, status)
				case j.kind == valid && status/100 != 2:
					fail("valid %s: status %d", j.id, status)
				case j.kind == forged && (status < 400 || status == http.StatusConflict):
					fail("forged %s: status %d", j.id, status)
				case j.kind == replay && status != http.StatusConflict:
					fail("replay %s: status %d", j.id, status)
				}
				if j.kind == valid {
					mu.Lock()
					if replayed < nReplay {
						replayed++
						queue <- job{j.auth, j.body, j.id, replay}
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	res := result{
		requests: int(sent.Load()), valid: n, forged: nForged, replayed: replayed,
		dropped: int(dropped.Load()), elapsed: time.Since(start),
	}
	counts := up.counts()
	for _, j := range jobs {
		if got := counts[j.id]; j.kind == valid && got != 1 {
			fail("valid %s reached the upstream %d times", j.id, got)
		} else if j.kind == forged && got != 0 {
			fail("forged %s reached the upstream", j.id)
		}
		res.forwarded += counts[j.id]
	}
	if total := up.total(); total != res.forwarded {
		fail("the upstream got %d requests, %d of them known", total, res.forwarded)
	}
	if len(failures) > 0 {
		return res, errors.New(strings.Join(failures, "\n"))
	}
	return res, nil
}

func send(client *http.Client, url string, j job) (int, error) {
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(j.body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", j.auth)
	req.Header.Set("User-Agent", "Trivial Security")
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

// mint signs a delivery whose token names tokenID and whose body names
// bodyID.
func mint(key, tokenID, bodyID string, now time.Time) (auth, body string) {
	return testkit.Mint(key, account, tokenID, bodyID, now)
}

// upstream counts the deliveries it receives by event ID.
type upstream struct {
	*httptest.Server
	mu  sync.Mutex
	ids map[string]int
	n   int
}

func newUpstream() *upstream {
	u := &upstream{ids: map[string]int{}}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			EventID string `json:"event_id"`
		}
		_ = json.NewDecoder(r.Body).Decode(&body)
		u.mu.Lock()
		u.ids[body.EventID]++
		u.n++
		u.mu.Unlock()
		w.WriteHeader(http.StatusAccepted)
	}))
	return u
}

func (u *upstream) reset() {
	u.mu.Lock()
	u.ids, u.n = map[string]int{}, 0
	u.mu.Unlock()
}

func (u *upstream) counts() map[string]int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.ids
}

func (u *upstream) total() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.n
}
