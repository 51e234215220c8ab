package trivialsecwebhook

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestSpoolStopLetsRedrivesFinish: a config stop (here a reload to a config
// without the spool, as a SIGTERM's stop does) while the service is slow to
// answer the re-drives it has read lets them finish within grace_period,
// and records them: none is delivered again once the spool runs again.
// Those still running when the grace period ends are cut short, and stay in
// the spool.
func TestSpoolStopLetsRedrivesFinish(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		for _, tc := range []struct {
			name  string
			grace string
			slow  time.Duration
			once  bool // each taken exactly once; else at least once
		}{
			{"within_grace", "5s", 700 * time.Millisecond, true},
			{"past_grace", "200ms", 2 * time.Second, false},
		} {
			t.Run(tc.name, func(t *testing.T) {
				// No re-drive before the service is back: failed ones would
				// open the route's breaker, and its probe would go first,
				// alone, and the others after it answered.
				g := startSpoolRigEdited(t, "spool {\n\t\t\t"+store+"backoff 1s 2s\n\t\t}", func(c string) string {
					return strings.Replace(c, "persist_config off\n", "persist_config off\n\tgrace_period "+tc.grace+"\n", 1)
				})
				g.up.Down()
				ids := g.deliverSpooled(8)
				var started, answered atomic.Int64
				g.up.Answer(func(http.Header, *http.Request) int {
					started.Add(1)
					time.Sleep(tc.slow)
					answered.Add(1)
					return http.StatusOK
				})
				if err := g.up.Up(); err != nil {
					t.Fatal(err)
				}
				g.waitFor("every re-drive reached the service", func() bool { return started.Load() == int64(len(ids)) })
				g.load(fmt.Sprintf("{\n\tadmin 127.0.0.1:%d\n\tpersist_config off\n}\n\nhttp://127.0.0.1:%d {\n\trespond 200\n}\n", g.adminPort, g.port))
				if n := answered.Load(); tc.once && n != int64(len(ids)) {
					t.Errorf("the store stopped with %d of %d re-drives answered: it did not wait for them", n, len(ids))
				} else if !tc.once && n != 0 {
					t.Errorf("%d re-drives answered before the store stopped: the grace period did not bound the wait", n)
				}
				g.up.Answer(nil)
				g.reload("again")
				if _, err := g.up.WaitTaken(ids, 20*time.Second); err != nil {
					t.Fatal(err)
				}
				g.drained()
				// The requests the service read before the stop are counted
				// once it has answered them, cut or not.
				g.waitFor("the service answered what it read", func() bool { return answered.Load() == started.Load() })
				taken := g.up.Taken()
				for _, id := range ids {
					// Past the grace period, the cut attempt (which the
					// service still answered) stays in the spool, and is
					// made again.
					if n := taken[id]; n < 1 || (tc.once && n != 1) || (!tc.once && n < 2) {
						t.Errorf("event %s taken %d times", id, n)
					}
				}
			})
		}
	})
}

// TestSpoolRetryAfter: a 503 or 429 with Retry-After (seconds, or an HTTP
// date) sets the next attempt, on the first attempt and on a re-drive,
// within the backoff's min and max; another status's Retry-After is not
// read.
func TestSpoolRetryAfter(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		const quick, slow = "10ms 2m", "1m 2m" // backoffs
		var g *spoolRig
		for _, tc := range []struct {
			name   string
			rig    string
			status int
			after  func(time.Time) string
			first  bool          // on the first attempt; else on a re-drive
			want   time.Duration // from the attempt
		}{
			{"seconds_first", quick, 503, func(time.Time) string { return "30" }, true, 30 * time.Second},
			{"seconds_redrive", quick, 429, func(time.Time) string { return "30" }, false, 30 * time.Second},
			{"date_redrive", quick, 503, func(now time.Time) string { return now.Add(45 * time.Second).UTC().Format(http.TimeFormat) }, false, 45 * time.Second},
			{"capped", quick, 503, func(time.Time) string { return "3600" }, true, 2 * time.Minute},
			{"beyond_32_bits", quick, 503, func(time.Time) string { return "99999999999" }, true, 2 * time.Minute},
			{"at_least_backoff_min", slow, 503, func(time.Time) string { return "1" }, true, time.Minute},
			{"not_for_500", slow, 500, func(time.Time) string { return "90" }, true, time.Minute},
		} {
			// A re-drive's Retry-After opens the route's breaker, for the
			// wait it asked: the next re-drive needs a route of its own.
			if g == nil || !strings.Contains(g.spool, tc.rig) || !tc.first {
				g = startSpoolRig(t, "spool {\n\t\t\t"+store+"backoff "+tc.rig+"\n\t\t}")
			}
			t.Run(tc.name, func(t *testing.T) {
				var attempts atomic.Int64
				g.up.Answer(func(h http.Header, _ *http.Request) int {
					if attempts.Add(1) == 1 && !tc.first {
						return http.StatusServiceUnavailable // a plain failure: re-driven in 10 ms
					}
					h.Set("Retry-After", tc.after(time.Now()))
					return tc.status
				})
				id, status := g.deliver()
				if status != http.StatusAccepted {
					t.Fatalf("status %d, want 202", status)
				}
				want := 1
				if !tc.first {
					want = 2
				}
				var next time.Time
				g.waitFor("the attempt with Retry-After", func() bool {
					for _, l := range g.list() {
						if l.EventID == id && l.Attempts == want {
							next, _ = time.Parse(time.RFC3339Nano, l.NextAttempt)
							return true
						}
					}
					return false
				})
				if wait := time.Until(next); wait < tc.want-5*time.Second || wait > tc.want {
					t.Errorf("next attempt in %v, want %v", wait.Round(time.Second), tc.want)
				}
				if code := g.adminDo(http.MethodDelete, "/trivialsec_webhook/spool/"+id); code != http.StatusNoContent {
					t.Fatalf("delete: %d", code)
				}
			})
		}
	})
}

// TestSpoolRedriveLimits: a backlog drains with at most
// redrive_concurrency re-drives at once, and at most redrive_rate started
// a second, each delivered once.
func TestSpoolRedriveLimits(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		t.Run("concurrency", func(t *testing.T) {
			g := startSpoolRig(t, "spool {\n\t\t\t"+store+"backoff 10ms 20ms\n\t\t\tredrive_concurrency 2\n\t\t}")
			g.up.Down()
			ids := g.deliverSpooled(12)
			var now, most atomic.Int64
			g.up.Answer(func(http.Header, *http.Request) int {
				n := now.Add(1)
				for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
				}
				time.Sleep(50 * time.Millisecond)
				now.Add(-1)
				return http.StatusOK
			})
			if err := g.up.Up(); err != nil {
				t.Fatal(err)
			}
			g.checkTakenOnce(ids)
			if m := most.Load(); m > 2 || m < 1 {
				t.Errorf("%d re-drives at once, want at most redrive_concurrency 2", m)
			}
		})
		t.Run("rate", func(t *testing.T) {
			g := startSpoolRig(t, "spool {\n\t\t\t"+store+"backoff 10ms 20ms\n\t\t\tredrive_rate 20\n\t\t}")
			g.up.Down()
			ids := g.deliverSpooled(30)
			var mu sync.Mutex
			var at []time.Time
			g.up.Answer(func(http.Header, *http.Request) int {
				mu.Lock()
				at = append(at, time.Now())
				mu.Unlock()
				return http.StatusOK
			})
			if err := g.up.Up(); err != nil {
				t.Fatal(err)
			}
			g.checkTakenOnce(ids)
			mu.Lock()
			defer mu.Unlock()
			// The limiter spaces starts 50 ms apart: any second holds at
			// most 20 of them, and one more at its edge (and one late
			// arrival at the upstream).
			for i := range at {
				n := 0
				for _, b := range at[i:] {
					if b.Sub(at[i]) < time.Second {
						n++
					}
				}
				if n > 22 {
					t.Fatalf("%d re-drives within a second of %v, want at most redrive_rate 20 (+2)", n, at[i])
				}
			}
		})
	})
}

// TestRetryAfterHeader: what Retry-After values ask for.
func TestRetryAfterHeader(t *testing.T) {
	now := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		status int
		err    error
		value  string
		want   time.Duration
	}{
		{503, nil, "120", 2 * time.Minute},
		{429, nil, " 7 ", 7 * time.Second},
		{503, nil, now.Add(time.Hour).Format(http.TimeFormat), time.Hour},
		{503, nil, now.Add(-time.Hour).Format(http.TimeFormat), 0}, // past
		{503, nil, "-5", 0},
		{503, nil, "+5", 0},
		{503, nil, "0", 0},
		{503, nil, "soon", 0},
		{503, nil, strings.Repeat("9", 65), 0}, // too long to read
		{503, nil, "99999999999", math.MaxInt64},
		{502, nil, "30", 0},
		{503, errors.New("dial tcp: connection refused"), "30", 0}, // an error's status: handle_errors answers it
	} {
		if got := retryAfter(tc.status, tc.err, tc.value, now); got != tc.want {
			t.Errorf("%d %q (err %v): %v, want %v", tc.status, tc.value, tc.err, got, tc.want)
		}
	}
}

// TestSpoolRetryAfterOfTheSite: a Retry-After that a handler before the
// module sets (the site's own header) is not the service's: a 503 without
// one backs off as usual, on the first attempt and on a re-drive.
func TestSpoolRetryAfterOfTheSite(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		g := startSpoolRigEdited(t, "spool {\n\t\t\t"+store+"backoff 1m 20m\n\t\t}", func(c string) string {
			return strings.Replace(c, "\tmetrics /metrics\n", "\tmetrics /metrics\n\theader Retry-After 600\n", 1)
		})
		g.up.Answer(func(http.Header, *http.Request) int { return http.StatusServiceUnavailable })
		id, status := g.deliver()
		if status != http.StatusAccepted {
			t.Fatalf("status %d, want 202", status)
		}
		for attempts := 1; attempts <= 2; attempts++ {
			if attempts == 2 {
				if code := g.adminDo(http.MethodPost, "/trivialsec_webhook/spool/"+id+"/retry"); code != http.StatusAccepted {
					t.Fatalf("retry: %d", code)
				}
			}
			var next time.Time
			g.waitFor(fmt.Sprintf("attempt %d", attempts), func() bool {
				for _, l := range g.list() {
					if l.EventID == id && l.Attempts == attempts {
						next, _ = time.Parse(time.RFC3339Nano, l.NextAttempt)
						return true
					}
				}
				return false
			})
			// The backoff: 1 min after the first, 1 to 2 min after the
			// second; the site's header would say 10 min.
			if wait := time.Until(next); wait > 3*time.Minute {
				t.Errorf("attempt %d: next attempt in %v: the site's Retry-After was taken for the service's", attempts, wait.Round(time.Second))
			}
		}
	})
}
