package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// The shared spool's tests run several Caddy processes on one Redis, as a
// cluster behind a load balancer does: replay protection and the spool in
// Redis, each process with its own data directory (its own instance ID)
// and admin API.

// clusterClaimAfter is the tests' claim_after: short, so that a takeover
// comes within seconds, and long enough for a loaded CI machine to renew
// its claims (every quarter of it) in time.
const clusterClaimAfter = 2 * time.Second

// instance is one Caddy of the cluster.
type instance struct {
	*server
	url, admin string
}

// clusterSpool is the spool's settings in most cluster tests.
var clusterSpool = fmt.Sprintf("claim_after %s\n\t\t\tbackoff 50ms 200ms", clusterClaimAfter)

// startInstance runs a Caddy sharing redisURL, in front of upstream, with
// these spool settings. data is Caddy's data directory, "" for its own.
func startInstance(t *testing.T, redisURL, upstream, settings, data string) *instance {
	t.Helper()
	port, admin := freePort(t), freePort(t)
	config := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
}

http://127.0.0.1:%d {
	trivialsec_webhook {
		account acme
		secret {env.TRIVIALSEC_WEBHOOK_SECRET}
		replay redis {env.TRIVIALSEC_REDIS_URL}
		spool {
			store redis {env.TRIVIALSEC_REDIS_URL}
			%s
		}
	}
	reverse_proxy %s
}
`, admin, port, settings, upstream)
	env := []string{"TRIVIALSEC_WEBHOOK_SECRET=" + secret, "TRIVIALSEC_REDIS_URL=" + redisURL}
	if data != "" {
		env = append(env, "XDG_DATA_HOME="+data)
	}
	return &instance{
		server: startServer(t, config, port, env),
		url:    fmt.Sprintf("http://127.0.0.1:%d/", port),
		admin:  fmt.Sprintf("http://127.0.0.1:%d", admin),
	}
}

// listed is one entry of the admin API's listing.
type listed struct {
	EventID  string `json:"event_id"`
	State    string `json:"state"`
	Attempts int    `json:"attempts"`
}

// list is the instance's listing of the shared spool.
func (in *instance) list(t *testing.T) []listed {
	t.Helper()
	resp, err := sender.Get(in.admin + "/trivialsec_webhook/spool")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct{ Entries []listed }
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != 200 {
		t.Fatalf("listing: %d %v", resp.StatusCode, err)
	}
	return out.Entries
}

// adminDo sends an admin API request and returns its status.
func (in *instance) adminDo(t *testing.T, method, path string) int {
	t.Helper()
	req, _ := http.NewRequest(method, in.admin+path, nil)
	resp, err := sender.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// triedAll waits until the spool holds n entries, each tried again since
// it was spooled: by in, when it runs alone.
func (in *instance) triedAll(t *testing.T, n int) {
	t.Helper()
	waitUntil(t, 20*time.Second, "every entry tried again", func() bool {
		l := in.list(t)
		for _, e := range l {
			if e.Attempts < 2 {
				return false
			}
		}
		return len(l) == n
	})
}

// spoolTo sends n new client_activity deliveries of account acme to url,
// each of which must be answered 202 (spooled); it returns their event IDs
// and, for each, its Authorization value and body.
func spoolTo(t *testing.T, url string, n int) (ids []string, copies [][2]string) {
	t.Helper()
	for range n {
		id := uuid.NewString()
		auth, body := mint(secret, "acme", id, time.Now())
		if status := post(t, url, auth, body); status != 202 {
			t.Fatalf("with the upstream down: %d, want 202", status)
		}
		ids = append(ids, id)
		copies = append(copies, [2]string{auth, body})
	}
	return ids, copies
}

// downUpstream is the service behind the cluster, down until the test
// brings it up.
func downUpstream(t *testing.T) *testkit.Upstream {
	t.Helper()
	up, err := testkit.StartUpstream()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(up.Close)
	up.Down()
	return up
}

// waitUntil polls ok every 50 ms for at most timeout.
func waitUntil(t *testing.T, timeout time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("still not so after %s: %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// takenOnce waits until the upstream took each of ids, then waits two
// claim_after more, room for a second delivery by another instance, and
// checks that each was taken exactly once, and nothing else was. It
// returns when the last was taken.
func takenOnce(t *testing.T, up *testkit.Upstream, ids []string) time.Time {
	t.Helper()
	if _, err := up.WaitTaken(ids, 60*time.Second); err != nil {
		t.Fatal(err)
	}
	all := time.Now()
	time.Sleep(2 * clusterClaimAfter)
	taken := up.Taken()
	for _, id := range ids {
		if taken[id] != 1 {
			t.Errorf("event %s taken %d times", id, taken[id])
		}
	}
	if len(taken) != len(ids) {
		t.Errorf("the upstream took %d events, want %d", len(taken), len(ids))
	}
	return all
}

// TestClusterSpoolOutlivesAnInstance: deliveries A spooled while the
// upstream was down, and held, are delivered by B once A is killed for
// good, after claim_after, each exactly once; copies sent to B are refused
// as replays; B's admin API lists and deletes what A holds.
func TestClusterSpoolOutlivesAnInstance(t *testing.T) {
	redis := testredis.Start(t)
	up := downUpstream(t)
	a := startInstance(t, redis.URL(), up.Addr, clusterSpool, "")
	ids, copies := spoolTo(t, a.url, 20)
	a.triedAll(t, 20) // A alone: it reads every turn, and holds every entry

	b := startInstance(t, redis.URL(), up.Addr, clusterSpool, "")
	for _, c := range copies {
		if status := post(t, b.url, c[0], c[1]); status != 409 {
			t.Fatalf("a copy of a spooled delivery at B: %d, want 409", status)
		}
	}
	if n := len(b.list(t)); n != 20 {
		t.Fatalf("B lists %d entries of the shared spool, want 20", n)
	}
	if status := b.adminDo(t, http.MethodDelete, "/trivialsec_webhook/spool/"+ids[0]); status != 204 {
		t.Fatalf("B deleting an entry A holds: %d", status)
	}
	deleted, ids := ids[0], ids[1:]

	a.Kill()
	killed := time.Now()
	if err := up.Up(); err != nil {
		t.Fatal(err)
	}
	all := takenOnce(t, up, ids)
	if up.Taken()[deleted] != 0 {
		t.Error("the deleted entry was delivered")
	}
	// A renewed its claims at most a quarter of claim_after before it
	// died, and B takes them over once they are claim_after old: not at
	// once.
	if waited := all.Sub(killed); waited < clusterClaimAfter/2 {
		t.Errorf("B delivered A's entries %s after A died, long before claim_after", waited)
	}
	if !strings.Contains(b.logs(), "took over deliveries another instance left unfinished") {
		t.Errorf("B's log does not say it took A's deliveries over:\n%s", b.logs())
	}
	if n := metric(t, b.admin+"/metrics", "caddy_trivialsec_webhook_spool_taken_over_total"); n != 19 {
		t.Errorf("B took over %v deliveries, want 19", n)
	}
	if n := len(b.list(t)); n != 0 {
		t.Errorf("B lists %d entries after the redelivery", n)
	}
	t.Logf("A killed; its 19 deliveries taken by B within %s (claim_after %s)", all.Sub(killed).Round(time.Millisecond), clusterClaimAfter)
}

// TestClusterEachDeliveredOnce: with both instances running, deliveries
// spooled at either, held through several claim_after of failures, and
// one retried through the admin API, are each delivered once, never by
// both; even when the two have the same instance ID.
func TestClusterEachDeliveredOnce(t *testing.T) {
	redis := testredis.Start(t)
	up := downUpstream(t)
	// Retries further apart than claim_after: only the renewals keep the
	// entries with the instance that holds them.
	settings := fmt.Sprintf("claim_after %s\n\t\t\tbackoff 3s 3s", clusterClaimAfter)
	// The two have the same instance ID, as machines cloned from one image
	// would, each in a data directory of its own (its file store, where it
	// holds deliveries while Redis does not answer, is its own). The ID is
	// written before either starts: Caddy makes one on first use, and two
	// of its goroutines may each make their own at once.
	id := []byte(uuid.NewString())
	var dirs []string
	for range 2 {
		data := t.TempDir()
		if err := os.MkdirAll(filepath.Join(data, "caddy"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(data, "caddy", "instance.uuid"), id, 0o600); err != nil {
			t.Fatal(err)
		}
		dirs = append(dirs, data)
	}
	a := startInstance(t, redis.URL(), up.Addr, settings, dirs[0])
	b := startInstance(t, redis.URL(), up.Addr, settings, dirs[1])
	var ids []string
	for range 10 {
		for _, in := range []*instance{a, b} {
			more, _ := spoolTo(t, in.url, 2)
			ids = append(ids, more...)
		}
	}
	if status := a.adminDo(t, http.MethodPost, "/trivialsec_webhook/spool/"+ids[1]+"/retry"); status != 202 {
		t.Fatalf("retry: %d", status)
	}
	// Failures for longer than claim_after: the entries stay with the
	// instance that holds them, and are not taken over.
	time.Sleep(2 * clusterClaimAfter)
	if err := up.Up(); err != nil {
		t.Fatal(err)
	}
	takenOnce(t, up, ids)
	for _, in := range []*instance{a, b} {
		if n := len(in.list(t)); n != 0 {
			t.Errorf("%d entries left", n)
		}
		if n := metric(t, in.admin+"/metrics", "caddy_trivialsec_webhook_spool_taken_over_total"); n != 0 {
			t.Errorf("an instance took over %v deliveries while the other was alive:\n%s", n, in.logs())
		}
	}
	renamed := 0 // the one that came second to the name, whichever that was
	for _, in := range []*instance{a, b} {
		renamed += strings.Count(in.logs(), "another live process uses this instance's consumer name")
	}
	if renamed != 1 {
		t.Errorf("%d instances say they took another consumer name, want 1", renamed)
	}
}

// TestClusterRedisRestarts: Redis killed while the instances re-drive, and
// started again (with the append-only file docs/several-instances.md asks for): nothing
// is delivered while it is down, a delivery made meanwhile is held on the
// instance's disk (202), unchecked, and every entry, that one included, is
// delivered once when it is back.
func TestClusterRedisRestarts(t *testing.T) {
	redis := testredis.StartDurable(t)
	up := downUpstream(t)
	a := startInstance(t, redis.URL(), up.Addr, clusterSpool, "")
	b := startInstance(t, redis.URL(), up.Addr, clusterSpool, "")
	var ids []string
	for _, in := range []*instance{a, b} {
		more, _ := spoolTo(t, in.url, 10)
		ids = append(ids, more...)
	}
	redis.Stop()
	if err := up.Up(); err != nil {
		t.Fatal(err)
	}
	held := uuid.NewString()
	auth, body := mint(secret, "acme", held, time.Now())
	if status := post(t, a.url, auth, body); status != 202 {
		t.Errorf("a delivery with Redis down: %d, want 202 (held, unchecked, on the instance's disk)", status)
	}
	ids = append(ids, held)
	time.Sleep(clusterClaimAfter + time.Second) // past claim_after: the claims lapse meanwhile
	if n := len(up.Received()); n != 0 {
		t.Fatalf("%d deliveries while Redis was down", n)
	}
	redis.Restart()
	takenOnce(t, up, ids)
	for _, in := range []*instance{a, b} {
		if !strings.Contains(in.logs(), "redis does not answer") || !strings.Contains(in.logs(), "redis answers again") {
			t.Errorf("the outage is not in the log:\n%s", in.logs())
		}
	}
}

// TestClusterHandsBackOnStop: an instance stopped gracefully (SIGTERM, a
// rolling deploy) hands what it held back: another instance delivers it at
// once, each once, not after claim_after (a minute here).
func TestClusterHandsBackOnStop(t *testing.T) {
	redis := testredis.Start(t)
	up := downUpstream(t)
	settings := "claim_after 1m\n\t\t\tbackoff 50ms 200ms"
	a := startInstance(t, redis.URL(), up.Addr, settings, "")
	ids, _ := spoolTo(t, a.url, 10)
	a.triedAll(t, 10)
	b := startInstance(t, redis.URL(), up.Addr, settings, "")
	a.Stop()
	if !strings.Contains(a.logs(), `"msg":"spool: handed the deliveries this instance held back to the other instances","spool":"redis","key_prefix":"trivialsec_webhook:spool:","entries":10`) {
		t.Errorf("A does not say it handed 10 deliveries back:\n%s", a.logs())
	}
	stopped := time.Now()
	if err := up.Up(); err != nil {
		t.Fatal(err)
	}
	all := takenOnce(t, up, ids)
	if waited := all.Sub(stopped); waited > 30*time.Second {
		t.Errorf("B delivered what A handed back %s after A stopped", waited)
	}
	if n := metric(t, b.admin+"/metrics", "caddy_trivialsec_webhook_spool_taken_over_total"); n != 0 {
		t.Errorf("B took over %v deliveries: A handed none back", n)
	}
}
