package trivialsecwebhook

import (
	"fmt"
	"net/http"
	"strings"
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
				g := startSpoolRigEdited(t, "spool {\n\t\t\t"+store+"backoff 10ms 20ms\n\t\t}", func(c string) string {
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
					if n := taken[id]; n < 1 || (tc.once && n != 1) {
						t.Errorf("event %s taken %d times", id, n)
					}
				}
			})
		}
	})
}
