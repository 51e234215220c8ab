package trivialsecwebhook

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// The spool's tests run a real Caddy in this process, with its admin API on
// a port of its own, in front of an upstream that can go down, come back,
// fail, hang or refuse. They wait for what happens in the background by
// polling, with generous deadlines; backoffs are milliseconds.

// spoolSite is the site the spool's tests run: the module with a spool
// block, then reverse_proxy with headers made from the placeholders.
const spoolSite = `{
	admin 127.0.0.1:%d
	persist_config off
}

http://127.0.0.1:%d {
	metrics /metrics
	trivialsec_webhook /webhook {
		account %s
		secret {env.TRIVIALSEC_IT_SECRET}
		strip_authorization
		%s
	}
	reverse_proxy /webhook %s {
		header_up X-Trivialsec-Event-Id {http.trivialsec_webhook.event_id}
		header_up X-Trivialsec-Config %s
	}
}
`

// eachStore runs a spool test on the file store, then on a Redis store of
// its own: store is the spool block's first line, "" for the default
// store.
func eachStore(t *testing.T, test func(t *testing.T, store string)) {
	t.Run("file", func(t *testing.T) { test(t, "") })
	t.Run("redis", func(t *testing.T) {
		srv := testredis.Start(t)
		test(t, "store redis "+srv.URL()+"\n\t\t\t")
	})
}

// spoolRig is a Caddy with the spool in front of an upstream.
type spoolRig struct {
	t               testing.TB
	up              *testkit.Upstream
	url             string // where deliveries go
	base            string // the site
	admin           string // the admin API
	adminPort, port int
	spool           string
	upstream        string              // where reverse_proxy goes: up, unless the test gives another
	edit            func(string) string // changes the test makes to every Caddyfile, if any
	sent            map[string]string   // event ID -> body sent
}

func startSpoolRig(t *testing.T, spool string) *spoolRig {
	t.Helper()
	return startSpoolRigTo(t, spool, "")
}

// startSpoolRigEdited starts a spool rig whose Caddyfiles, the first one
// included, edit changes: a test that needs a config from its first
// delivery on must not reload into it, as a connection accepted during the
// handover may still be served by the old config.
func startSpoolRigEdited(t *testing.T, spool string, edit func(string) string) *spoolRig {
	t.Helper()
	return startSpoolRigTo(t, spool, "", edit)
}

// startSpoolRigTo starts a spool rig whose reverse_proxy goes to upstream,
// an upstream of the test's own, when it is not "".
func startSpoolRigTo(t testing.TB, spool, upstream string, edit ...func(string) string) *spoolRig {
	t.Helper()
	up, err := testkit.StartUpstream()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(up.Close)
	if upstream == "" {
		upstream = up.Addr
	}
	g := &spoolRig{t: t, up: up, adminPort: freePort(t), port: freePort(t), spool: spool, upstream: upstream, sent: map[string]string{}}
	for _, e := range edit {
		g.edit = e
	}
	g.base = fmt.Sprintf("http://127.0.0.1:%d", g.port)
	g.url = g.base + "/webhook"
	g.admin = fmt.Sprintf("http://127.0.0.1:%d", g.adminPort)
	t.Setenv("TRIVIALSEC_IT_SECRET", testSecret)
	loadCaddyfile(t, g.caddyfile("first"))
	return g
}

func (g *spoolRig) caddyfile(name string) string {
	c := fmt.Sprintf(spoolSite, g.adminPort, g.port, testAccount, g.spool, g.upstream, name)
	if g.edit != nil {
		c = g.edit(c)
	}
	return c
}

// reload loads the same site again, with another X-Trivialsec-Config.
func (g *spoolRig) reload(name string) { g.load(g.caddyfile(name)) }

// load replaces the running config with caddyfile, as `caddy reload` does.
func (g *spoolRig) load(caddyfile string) {
	g.t.Helper()
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		g.t.Fatal(err)
	}
	if err := caddy.Load(cfg, true); err != nil {
		g.t.Fatalf("reload: %v", err)
	}
	// A connection accepted while the old config hands the listener over
	// can be reset (Caddy's own behaviour, docs/deploying.md): let the
	// handover end before the test sends what it counts.
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if resp, err := senderClient.Get(g.base + "/"); err == nil {
			resp.Body.Close()
			break
		}
	}
}

// deliver sends a new genuine delivery and returns its event ID and the
// status it was answered with.
func (g *spoolRig) deliver() (string, int) {
	g.t.Helper()
	d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
	d.payload = fmt.Sprintf(`{"report_id": "%s", "name": "caf\u00e9"}`, uuid.NewString())
	g.sent[d.eventID] = d.body()
	return d.eventID, g.send(d)
}

// deliverSpooled sends n new deliveries, each of which must be answered
// 202, and returns their event IDs.
func (g *spoolRig) deliverSpooled(n int) []string {
	g.t.Helper()
	var ids []string
	for range n {
		id, status := g.deliver()
		if status != http.StatusAccepted {
			g.t.Fatalf("status %d, want 202", status)
		}
		ids = append(ids, id)
	}
	return ids
}

// send posts a delivery and returns the status.
func (g *spoolRig) send(d *delivery) int {
	g.t.Helper()
	resp := post(g.t, g.url, d.authorization(), strings.NewReader(d.body()))
	readAll(g.t, resp.Body)
	return resp.StatusCode
}

// list is the admin API's listing, every page of it.
func (g *spoolRig) list() []spoolListing {
	g.t.Helper()
	var out []spoolListing
	next := ""
	for {
		page := g.listPage("limit=1000&next=" + next)
		out = append(out, page.Entries...)
		if next = page.Next; next == "" {
			return out
		}
	}
}

// listPage is one page of the admin API's listing, with query parameters.
func (g *spoolRig) listPage(query string) spoolListingPage {
	g.t.Helper()
	resp, err := senderClient.Get(g.admin + "/trivialsec_webhook/spool?" + query)
	if err != nil {
		g.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw := readAll(g.t, resp.Body)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" {
		g.t.Fatalf("listing: %d %s", resp.StatusCode, raw)
	}
	var out spoolListingPage
	if err := json.Unmarshal([]byte(raw), &out); err != nil {
		g.t.Fatalf("listing %s: %v", raw, err)
	}
	return out
}

// adminDo sends an admin API request and returns its status.
func (g *spoolRig) adminDo(method, path string) int {
	g.t.Helper()
	req, _ := http.NewRequest(method, g.admin+path, nil)
	resp, err := senderClient.Do(req)
	if err != nil {
		g.t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// waitFor polls until ok, for at most 20 s.
func (g *spoolRig) waitFor(what string, ok func() bool) {
	g.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			g.t.Fatalf("still not so after 20 s: %s; the spool holds %+v", what, g.list())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// drained waits until the spool holds nothing.
func (g *spoolRig) drained() {
	g.t.Helper()
	g.waitFor("the spool is empty", func() bool { return len(g.list()) == 0 })
}

// checkTakenOnce checks that the upstream took each of ids exactly once,
// byte for byte, with the placeholders' headers and without the token.
func (g *spoolRig) checkTakenOnce(ids []string) {
	g.t.Helper()
	if _, err := g.up.WaitTaken(ids, 20*time.Second); err != nil {
		g.t.Fatal(err)
	}
	g.drained()
	taken := g.up.Taken()
	for _, id := range ids {
		if taken[id] != 1 {
			g.t.Errorf("event %s taken %d times", id, taken[id])
		}
	}
	for _, r := range g.up.Received() {
		if r.Status/100 != 2 {
			continue
		}
		if want, ok := g.sent[r.EventID]; ok && r.Body != want {
			g.t.Errorf("event %s: the upstream got %q, want %q", r.EventID, r.Body, want)
		}
		if r.Header.Get("X-Trivialsec-Event-Id") != r.EventID || r.Header.Get("Authorization") != "" {
			g.t.Errorf("event %s: event ID header %q, Authorization %.10q", r.EventID,
				r.Header.Get("X-Trivialsec-Event-Id"), r.Header.Get("Authorization"))
		}
		if !strings.HasPrefix(r.Header.Get("X-Forwarded-For"), "127.0.0.1") {
			g.t.Errorf("event %s: X-Forwarded-For %q", r.EventID, r.Header.Get("X-Forwarded-For"))
		}
	}
}

// TestSpoolUpstreamDown: with the upstream down, 20 deliveries are answered
// 202 and spooled; a copy of one is refused as a replay; the listing shows
// them, without bodies or headers; once the upstream is back, each arrives
// exactly once, byte for byte, through the same route.
func TestSpoolUpstreamDown(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		g := startSpoolRig(t, "spool {\n\t\t\t"+store+"backoff 20ms 200ms\n\t\t}")
		before := scrape(t, g.base+"/metrics")
		g.up.Down()
		ids := g.deliverSpooled(20)
		copyOf := productionDelivery().withEventID(ids[0]).at(time.Now())
		if status := g.send(copyOf); status != http.StatusConflict {
			t.Errorf("a copy of a spooled delivery: %d, want 409", status)
		}

		listing := g.list()
		if len(listing) != 20 {
			t.Fatalf("the listing holds %d entries", len(listing))
		}
		raw, _ := json.Marshal(listing)
		for _, l := range listing {
			if l.State != statePending || l.Attempts < 1 || !strings.HasPrefix(l.LastError, "502") || l.Size == 0 || l.EventName != "report_created" {
				t.Errorf("listed %+v", l)
			}
		}
		if strings.Contains(string(raw), "report_id") || strings.Contains(string(raw), productionDelivery().token()[:30]) {
			t.Errorf("the listing shows a body or a token: %s", raw)
		}
		m := scrape(t, g.base+"/metrics")
		if got := m[`caddy_trivialsec_webhook_spool_entries{state="pending"}`]; got != 20 {
			t.Errorf("spool_entries{pending} = %v", got)
		}
		if got := m["caddy_trivialsec_webhook_spool_oldest_pending_seconds"]; got <= 0 || got > 60 {
			t.Errorf("spool_oldest_pending_seconds = %v", got)
		}
		if got, want := m["caddy_trivialsec_webhook_spool_full_ratio"], m["caddy_trivialsec_webhook_spool_bytes"]/defaultSpoolMaxSize; got != want || got <= 0 {
			t.Errorf("spool_full_ratio = %v, want %v", got, want)
		}

		if err := g.up.Up(); err != nil {
			t.Fatal(err)
		}
		g.checkTakenOnce(ids)
		after := scrape(t, g.base+"/metrics")
		for series, want := range map[string]float64{
			"caddy_trivialsec_webhook_spool_spooled_total":     20,
			"caddy_trivialsec_webhook_spool_redelivered_total": 20,
			"caddy_trivialsec_webhook_spool_bytes":             0,
		} {
			if got := after[series] - before[series]; got != want {
				t.Errorf("%s rose by %v, want %v", series, got, want)
			}
		}
		if after[`caddy_trivialsec_webhook_spool_entries{state="pending"}`] != 0 || after["caddy_trivialsec_webhook_spool_oldest_pending_seconds"] != 0 {
			t.Error("entries left pending")
		}
	})
}

// TestSpoolRetriesUntilTaken: an upstream that answers 503 twice for each
// event, then takes it.
func TestSpoolRetriesUntilTaken(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		g := startSpoolRig(t, "spool {\n\t\t\t"+store+"backoff 10ms 50ms\n\t\t}")
		var mu sync.Mutex
		seen := map[string]int{}
		g.up.Answer(func(_ http.Header, r *http.Request) int {
			mu.Lock()
			defer mu.Unlock()
			seen[r.Header.Get("X-Trivialsec-Event-Id")]++
			if seen[r.Header.Get("X-Trivialsec-Event-Id")] <= 2 {
				return http.StatusServiceUnavailable
			}
			return http.StatusOK
		})
		ids := g.deliverSpooled(5)
		g.checkTakenOnce(ids)
		for _, id := range ids {
			if seen[id] != 3 {
				t.Errorf("event %s tried %d times, want 3", id, seen[id])
			}
		}
	})
}

// TestSpoolPassesRefusals: a 4xx the upstream means (422) goes back to the
// sender, and nothing is spooled; the event ID stays taken.
func TestSpoolPassesRefusals(t *testing.T) {
	g := startSpoolRig(t, "")
	g.up.Answer(func(http.Header, *http.Request) int { return http.StatusUnprocessableEntity })
	d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
	if status := g.send(d); status != http.StatusUnprocessableEntity {
		t.Fatalf("status %d, want 422", status)
	}
	if n := len(g.list()); n != 0 {
		t.Fatalf("%d entries spooled", n)
	}
	if status := g.send(d); status != http.StatusConflict {
		t.Errorf("the same delivery again: %d, want 409", status)
	}
}

// TestSpoolHungUpstream: an upstream that does not answer within
// attempt_timeout gets the delivery again later; the sender gets 202
// meanwhile, not its own read timeout.
func TestSpoolHungUpstream(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		g := startSpoolRig(t, "spool {\n\t\t\t"+store+"attempt_timeout 300ms\n\t\t\tbackoff 10ms 50ms\n\t\t}")
		release := make(chan struct{})
		t.Cleanup(func() { close(release) })
		var first atomic.Bool
		g.up.Answer(func(http.Header, *http.Request) int {
			if first.CompareAndSwap(false, true) {
				<-release // hangs
			}
			return http.StatusOK
		})
		id, status := g.deliver()
		if status != http.StatusAccepted {
			t.Fatalf("status %d, want 202", status)
		}
		if _, err := g.up.WaitTaken([]string{id}, 20*time.Second); err != nil {
			t.Fatal(err)
		}
		g.drained()
	})
}

// TestSpoolClientHangsUp: the sender giving up on its answer does not end
// the attempt: the upstream, slower than the sender, still gets the
// delivery, once, and nothing is spooled.
func TestSpoolClientHangsUp(t *testing.T) {
	g := startSpoolRig(t, "")
	answered := make(chan struct{})
	var cancelled atomic.Bool
	g.up.Answer(func(_ http.Header, r *http.Request) int {
		defer close(answered)
		select {
		case <-time.After(500 * time.Millisecond):
		case <-r.Context().Done(): // Caddy gave up on the upstream
			cancelled.Store(true)
		}
		return http.StatusOK
	})
	d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
	req, _ := http.NewRequest(http.MethodPost, g.url, strings.NewReader(d.body()))
	req.Header.Set("Authorization", d.authorization())
	impatient := &http.Client{Timeout: 100 * time.Millisecond}
	if resp, err := impatient.Do(req); err == nil {
		resp.Body.Close()
		t.Fatalf("the client got %d before the upstream answered", resp.StatusCode)
	}
	select {
	case <-answered:
	case <-time.After(10 * time.Second):
		t.Fatal("the upstream never answered")
	}
	if cancelled.Load() {
		t.Fatal("the attempt ended with the client: Caddy closed its request to the upstream")
	}
	g.waitFor("the upstream's answer is recorded", func() bool { return g.up.Taken()[d.eventID] == 1 })
	if n := len(g.list()); n != 0 {
		t.Errorf("%d entries spooled for a delivery the upstream took", n)
	}
}

// TestSpoolAlways: mode always answers 202 before the upstream has the
// delivery, then delivers it.
func TestSpoolAlways(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		g := startSpoolRig(t, "spool {\n\t\t\t"+store+"mode always\n\t\t}")
		release := make(chan struct{})
		g.up.Answer(func(http.Header, *http.Request) int {
			<-release
			return http.StatusOK
		})
		ids := g.deliverSpooled(3)
		if n := len(g.up.Received()); n != 0 {
			t.Fatalf("the upstream answered %d deliveries while it was held", n)
		}
		close(release)
		g.checkTakenOnce(ids)
	})
}

// TestSpoolDeadLetters: past max_age, or refused by the upstream with a 4xx,
// a delivery is a dead letter, kept and not retried; an operator retries or
// deletes it through the admin API.
func TestSpoolDeadLetters(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		g := startSpoolRig(t, "spool {\n\t\t\t"+store+"backoff 20ms 40ms\n\t\t\tmax_age 300ms\n\t\t}")
		before := scrape(t, g.base+"/metrics")
		g.up.Answer(func(http.Header, *http.Request) int { return http.StatusServiceUnavailable })
		aged, _ := g.deliver()
		deleted, _ := g.deliver()
		g.waitFor("both are dead letters", func() bool {
			l := g.list()
			return len(l) == 2 && l[0].State == stateDead && l[1].State == stateDead
		})
		for _, l := range g.list() {
			if l.Attempts < 2 || l.LastError != "503 Service Unavailable" || l.NextAttempt != "" {
				t.Errorf("dead letter %+v", l)
			}
		}
		// A 4xx on a re-drive is a dead letter at once.
		var refused atomic.Bool
		g.up.Answer(func(http.Header, *http.Request) int {
			if refused.CompareAndSwap(false, true) {
				return http.StatusServiceUnavailable
			}
			return http.StatusGone
		})
		gone, _ := g.deliver()
		g.waitFor("the 410 is a dead letter", func() bool {
			for _, l := range g.list() {
				if l.EventID == gone {
					return l.State == stateDead && l.LastError == "410 Gone" && l.Attempts == 2
				}
			}
			return false
		})
		n := len(g.up.Received())
		time.Sleep(200 * time.Millisecond) // several backoffs: a dead letter is not retried on its own
		if m := len(g.up.Received()); m != n {
			t.Fatalf("dead letters were retried: %d requests, then %d", n, m)
		}
		gauges := func(when string, dead, pending float64) {
			t.Helper()
			m := scrape(t, g.base+"/metrics")
			if m[`caddy_trivialsec_webhook_spool_entries{state="dead"}`] != dead || m[`caddy_trivialsec_webhook_spool_entries{state="pending"}`] != pending {
				t.Errorf("%s: spool_entries dead %v, pending %v; want %v, %v", when, m[`caddy_trivialsec_webhook_spool_entries{state="dead"}`], m[`caddy_trivialsec_webhook_spool_entries{state="pending"}`], dead, pending)
			}
			if bytes := m["caddy_trivialsec_webhook_spool_bytes"]; (bytes == 0) != (dead+pending == 0) {
				t.Errorf("%s: spool_bytes %v for %v entries", when, bytes, dead+pending)
			}
		}
		gauges("three dead letters", 3, 0)

		g.up.Answer(nil)
		if status := g.adminDo(http.MethodPost, "/trivialsec_webhook/spool/"+aged+"/retry"); status != http.StatusAccepted {
			t.Fatalf("retry: %d", status)
		}
		if _, err := g.up.WaitTaken([]string{aged}, 20*time.Second); err != nil {
			t.Fatal(err)
		}
		for _, id := range []string{deleted, gone} {
			if status := g.adminDo(http.MethodDelete, "/trivialsec_webhook/spool/"+id); status != http.StatusNoContent {
				t.Fatalf("delete: %d", status)
			}
		}
		g.drained()
		for path, want := range map[string]int{
			"/trivialsec_webhook/spool/" + deleted:                     http.StatusNotFound,
			"/trivialsec_webhook/spool/" + uuid.NewString() + "/retry": http.StatusNotFound,
			"/trivialsec_webhook/spool/not-a-uuid":                     http.StatusNotFound,
		} {
			method := http.MethodDelete
			if strings.HasSuffix(path, "/retry") {
				method = http.MethodPost
			}
			if status := g.adminDo(method, path); status != want {
				t.Errorf("%s %s: %d, want %d", method, path, status, want)
			}
		}
		if taken := g.up.Taken(); taken[deleted] != 0 || taken[gone] != 0 || taken[aged] != 1 {
			t.Errorf("taken: %v", taken)
		}
		gauges("retried and deleted", 0, 0)
		after := scrape(t, g.base+"/metrics")
		if got := after["caddy_trivialsec_webhook_spool_dead_lettered_total"] - before["caddy_trivialsec_webhook_spool_dead_lettered_total"]; got < 3 {
			t.Errorf("dead_lettered_total rose by %v, want at least 3", got)
		}
	})
}

// TestSpoolReload: a reload keeps the spool and its re-drive; what was
// spooled under the old config goes through the new one.
func TestSpoolReload(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		// No retry is due before the reload: an attempt under way as the
		// old config stops finishes through it, as a request does.
		g := startSpoolRig(t, "spool {\n\t\t\t"+store+"backoff 2s 4s\n\t\t}")
		g.up.Down()
		ids := g.deliverSpooled(5)
		g.reload("second")
		if n := len(g.list()); n != 5 {
			t.Fatalf("%d entries after the reload, want 5", n)
		}
		if status := g.send(productionDelivery().withEventID(ids[0]).at(time.Now())); status != http.StatusConflict {
			t.Errorf("a copy after the reload: %d, want 409", status)
		}
		if err := g.up.Up(); err != nil {
			t.Fatal(err)
		}
		g.checkTakenOnce(ids)
		for _, r := range g.up.Received() {
			if r.Status == 200 && r.Header.Get("X-Trivialsec-Config") != "second" {
				t.Errorf("event %s went through config %q", r.EventID, r.Header.Get("X-Trivialsec-Config"))
			}
		}
	})
}

// TestSpoolFull: a delivery that does not fit in max_size is not spooled:
// the sender gets the failure, and the event ID is released, so that a
// redelivery can pass.
func TestSpoolFull(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		g := startSpoolRig(t, "spool {\n\t\t\t"+store+"max_size 1KB\n\t\t}")
		g.up.Down()
		d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
		d.payload = `{"pad": "` + strings.Repeat("x", 2000) + `"}`
		if status := g.send(d); status != http.StatusBadGateway {
			t.Fatalf("status %d, want the upstream's 502", status)
		}
		if n := len(g.list()); n != 0 {
			t.Fatalf("%d entries", n)
		}
		if err := g.up.Up(); err != nil {
			t.Fatal(err)
		}
		if status := g.send(d); status != http.StatusOK {
			t.Errorf("the redelivery: %d", status)
		}
	})
}

// TestRetryAt: the n-th retry waits between backoff_min and
// backoff_min·2^(n-1), at most backoff_max, never past max_age; past it,
// the entry is dead.
func TestRetryAt(t *testing.T) {
	p := spoolPolicy{backoffMin: time.Second, backoffMax: time.Minute, maxAge: time.Hour}
	spooled := time.Unix(1_800_000_000, 0)
	for attempts := 1; attempts <= 40; attempts++ {
		ceiling := min(time.Second<<min(attempts-1, 30), time.Minute)
		var longest time.Duration
		for range 200 {
			now := spooled.Add(time.Minute)
			at, dead := p.retryAt(now, spooled, attempts, 0)
			wait := at.Sub(now)
			if dead || wait < time.Second || wait > ceiling {
				t.Fatalf("attempt %d: wait %v (dead %v), want 1s to %v", attempts, wait, dead, ceiling)
			}
			longest = max(longest, wait)
		}
		if attempts > 1 && longest <= ceiling/2 {
			t.Errorf("attempt %d: the longest of 200 waits is %v, with a ceiling of %v", attempts, longest, ceiling)
		}
	}
	if at, dead := p.retryAt(spooled.Add(time.Hour-time.Second), spooled, 30, 0); dead || !at.Equal(spooled.Add(time.Hour)) {
		t.Errorf("near max_age: %v %v, want the last attempt at max_age", at, dead)
	}
	if _, dead := p.retryAt(spooled.Add(time.Hour), spooled, 3, 0); !dead {
		t.Error("at max_age: not dead")
	}
}

func TestRetryable(t *testing.T) {
	for status, want := range map[int]bool{200: false, 302: false, 400: false, 404: false, 408: true, 409: false,
		410: false, 422: false, 425: true, 429: true, 500: true, 502: true, 503: true, 504: true} {
		if retryable(status) != want {
			t.Errorf("%d: retryable %v", status, !want)
		}
	}
}

// TestSpoolWithReplayOff: with replay protection off, a failure the spool
// cannot take goes back to the sender (nothing to release), and one it can
// is delivered once.
func TestSpoolWithReplayOff(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		// Room for a delivery of a few hundred bytes, as each store counts
		// it (the Redis store counts what Redis spends on it), not for 6 KB.
		g := startSpoolRig(t, "replay off\n\t\tspool {\n\t\t\t"+store+"max_size 4KB\n\t\t\tbackoff 10ms 50ms\n\t\t}")
		g.up.Answer(func(http.Header, *http.Request) int { return http.StatusServiceUnavailable })
		d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
		d.payload = `{"pad": "` + strings.Repeat("x", 6000) + `"}`
		if status := g.send(d); status != http.StatusServiceUnavailable {
			t.Fatalf("too large to spool: %d, want the upstream's 503", status)
		}
		g.up.Answer(nil)
		g.up.Down()
		ids := g.deliverSpooled(1)
		if err := g.up.Up(); err != nil {
			t.Fatal(err)
		}
		g.checkTakenOnce(ids)
	})
}

// TestSpoolWaitsForItsAccount: a delivery spooled for an account that no
// handler of the running config serves waits, and goes once one does.
func TestSpoolWaitsForItsAccount(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		g := startSpoolRig(t, "spool {\n\t\t\t"+store+"backoff 10ms 20ms\n\t\t}")
		g.up.Down()
		ids := g.deliverSpooled(2)
		acme := g.caddyfile("first")
		other := strings.Replace(acme, "account "+testAccount, "account other", 1)
		g.load(other)
		// An attempt begun through the old config may still be under way; once
		// the attempts stop counting for several backoffs, both entries wait.
		attempts := func() (n int) {
			for _, l := range g.list() {
				n += l.Attempts
			}
			return n
		}
		for last := -1; last != attempts(); {
			last = attempts()
			time.Sleep(100 * time.Millisecond)
		}
		if err := g.up.Up(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond) // many backoffs: room for a delivery that should not happen
		if n := len(g.up.Received()); n != 0 {
			t.Fatalf("the upstream got %d requests with no handler for the account", n)
		}
		// Parked in the listing: the file store's, and the Redis store's
		// of an instance that does not serve the account (it hands them
		// back, pending, to one that does).
		if l := g.list(); len(l) != 2 || l[0].State != stateParked || l[1].State != stateParked {
			t.Fatalf("listing %+v", l)
		}
		g.load(acme)
		g.checkTakenOnce(ids)
	})
}

// TestSpool202IsClean: the 202 that stands in for a failed answer carries
// the headers the response had before the attempt, none of the failed
// answer's, and no body.
func TestSpool202IsClean(t *testing.T) {
	g := startSpoolRig(t, "spool {\n\t\t\tbackoff 10ms 50ms\n\t\t}")
	var failed atomic.Bool
	g.up.Answer(func(h http.Header, _ *http.Request) int {
		if failed.CompareAndSwap(false, true) {
			h.Set("Retry-After", "120")
			h.Set("X-Upstream", "down for maintenance")
			h.Add("Server", "upstream")
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	})
	d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
	g.sent[d.eventID] = d.body()
	req, _ := http.NewRequest(http.MethodPost, g.url, strings.NewReader(d.body()))
	req.Header.Set("Authorization", d.authorization())
	resp, err := senderClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body := readAll(t, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted || body != "" {
		t.Fatalf("%d %q, want an empty 202", resp.StatusCode, body)
	}
	if resp.Header.Get("Retry-After") != "" || resp.Header.Get("X-Upstream") != "" || len(resp.Header.Values("Server")) != 1 {
		t.Errorf("the 202 carries the failed answer's headers: %v", resp.Header)
	}
	g.checkTakenOnce([]string{d.eventID})
}

// TestSpoolRedisDown: with the Redis store down, a delivery the next
// handler fails is held on the instance's disk and answered 202, with a
// WARN line; nothing is re-driven meanwhile; once Redis is back (with what
// it acknowledged, as docs/several-instances.md asks), the held delivery moves into it,
// and the re-drive resumes and delivers each entry once.
func TestSpoolRedisDown(t *testing.T) {
	srv := testredis.StartDurable(t)
	g := startSpoolRig(t, "spool {\n\t\t\tstore redis "+srv.URL()+"\n\t\t\tbackoff 10ms 50ms\n\t\t}")
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	g.load(strings.Replace(g.caddyfile("first"), "persist_config off", "persist_config off\n\tlog {\n\t\toutput file "+logFile+"\n\t\tformat json\n\t}", 1))
	g.up.Down()
	ids := g.deliverSpooled(3)
	srv.Stop()
	held, status := g.deliver()
	if status != http.StatusAccepted {
		t.Fatalf("with Redis down: %d, want 202 (held on the instance's disk)", status)
	}
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // many backoffs
	if n := len(g.up.Received()); n != 0 {
		t.Fatalf("%d deliveries re-driven while Redis was down", n)
	}
	srv.Restart()
	g.checkTakenOnce(append(ids, held))
	raw, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	levels := map[string]string{} // message -> level
	for _, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		var entry struct {
			Level   string `json:"level"`
			Msg     string `json:"msg"`
			EventID string `json:"event_id"`
		}
		if json.Unmarshal([]byte(line), &entry) == nil && (entry.EventID == "" || entry.EventID == held) {
			levels[entry.Msg] = entry.Level
		}
	}
	for msg, level := range map[string]string{
		"the spool store did not take the delivery: held it on this instance's disk, answered 202; it moves into the spool once the store answers": "warn",
		"moved a delivery held on this instance's disk into the spool":                                                                             "info",
		"spool: redis does not answer: re-drive waits for it, and deliveries that need the spool get the failure the next handler gave":            "warn",
		"spool: redis answers again: re-drive resumes":                                                                                             "info",
	} {
		if levels[msg] != level {
			t.Errorf("the log has %q at %q, want %q:\n%s", msg, levels[msg], level, raw)
		}
	}
}

// TestSpoolRedisSharesItsClient: the replay store and the spool on one
// Redis URL share one client, and reloads keep it: one client, whatever the
// number of reloads, and deliveries spooled before them still delivered.
func TestSpoolRedisSharesItsClient(t *testing.T) {
	srv := testredis.Start(t)
	g := startSpoolRig(t, "replay redis "+srv.URL()+"\n\t\tspool {\n\t\t\tstore redis "+srv.URL()+"\n\t\t\tbackoff 10ms 50ms\n\t\t}")
	g.up.Down()
	ids := g.deliverSpooled(3)
	for i := range 5 {
		g.reload(fmt.Sprint("reload-", i))
	}
	if n, ok := redisClients.References(srv.URL()); n != 2 || !ok {
		t.Fatalf("the Redis URL's client has %d users (%v), want 2: the replay store and the spool", n, ok)
	}
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	g.checkTakenOnce(ids)
}

// TestSpoolRedisLeaseLost: an instance whose consumer name was taken from
// it (its lease overwritten, as when Redis lost its data or did not answer
// for claim_after) lets go of what it held, takes another name, and the
// deliveries it held are delivered all the same, each once, once the
// lease of whoever took the name is gone.
func TestSpoolRedisLeaseLost(t *testing.T) {
	srv := testredis.Start(t)
	g := startSpoolRig(t, "spool {\n\t\t\tstore redis "+srv.URL()+"\n\t\t\tclaim_after 1s\n\t\t\tbackoff 10ms 50ms\n\t\t}")
	g.up.Down()
	ids := g.deliverSpooled(3)
	client := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", srv.Port)})
	defer client.Close()
	ctx := context.Background()
	leases, err := client.Keys(ctx, defaultSpoolKeyPrefix+"consumer:*").Result()
	if err != nil || len(leases) != 1 {
		t.Fatalf("leases %v, %v", leases, err)
	}
	// Another process takes the name, and dies: its lease expires.
	if err := client.Set(ctx, leases[0], "another process", 2*time.Second).Err(); err != nil {
		t.Fatal(err)
	}
	g.waitFor("the instance takes another consumer name", func() bool {
		n, _ := client.Keys(ctx, defaultSpoolKeyPrefix+"consumer:*").Result()
		return len(n) == 2
	})
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	g.checkTakenOnce(ids)
}

// spoolACL is the least a Redis user needs for the replay store and the
// spool, as SECURITY.md gives it.
var spoolACL = []any{"~trivialsec_webhook:*", "resetchannels", "-@all", "+@connection", "+@read", "+@write", "+@scripting", "-@dangerous", "+info", "+time"}

// leastPrivilegeUser makes a user of the Redis on port, limited as
// SECURITY.md says, with more rules after those, and returns its URL.
func leastPrivilegeUser(t *testing.T, port int, user string, more ...any) string {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", port)})
	defer c.Close()
	rules := append(append([]any{"ACL", "SETUSER", user, "on", ">acl-test"}, spoolACL...), more...)
	if err := c.Do(context.Background(), rules...).Err(); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("redis://%s:acl-test@127.0.0.1:%d/0", user, port)
}

// TestSpoolRedisLeastPrivilege: the replay store and the spool work as a
// Redis user limited as SECURITY.md says, through every path (spool, copy
// refused, listing, delete, retry, renewals, claims, consumer clean-up,
// delivery, hand-back on stop), and Redis refuses none of their commands.
func TestSpoolRedisLeastPrivilege(t *testing.T) {
	srv := testredis.Start(t)
	admin := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", srv.Port)})
	defer admin.Close()
	ctx := context.Background()
	t.Setenv("TRIVIALSEC_IT_REDIS", leastPrivilegeUser(t, srv.Port, "trivialsec"))
	g := startSpoolRig(t, "replay redis {env.TRIVIALSEC_IT_REDIS}\n\t\tspool {\n\t\t\tstore redis {env.TRIVIALSEC_IT_REDIS}\n\t\t\tclaim_after 1s\n\t\t\tbackoff 10ms 50ms\n\t\t}")
	g.up.Down()
	ids := g.deliverSpooled(3)
	if status := g.send(productionDelivery().withEventID(ids[0]).at(time.Now())); status != http.StatusConflict {
		t.Errorf("a copy: %d, want 409", status)
	}
	if n := len(g.list()); n != 3 {
		t.Fatalf("listing %d entries", n)
	}
	if status := g.adminDo(http.MethodDelete, "/trivialsec_webhook/spool/"+ids[2]); status != http.StatusNoContent {
		t.Fatalf("delete: %d", status)
	}
	if status := g.adminDo(http.MethodPost, "/trivialsec_webhook/spool/"+ids[1]+"/retry"); status != http.StatusAccepted {
		t.Fatalf("retry: %d", status)
	}
	time.Sleep(600 * time.Millisecond) // two rounds of renewals, claims and clean-up
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	g.checkTakenOnce(ids[:2])
	g.up.Down()
	held := g.deliverSpooled(1)
	g.spool = "replay redis {env.TRIVIALSEC_IT_REDIS}\n\t\tspool off"
	g.reload("no spool") // the Redis spool stops: a hand-back
	denied, err := admin.Do(ctx, "ACL", "LOG").Slice()
	if err != nil {
		t.Fatal(err)
	}
	if len(denied) != 0 {
		t.Errorf("Redis refused %d commands of the user SECURITY.md describes: %v", len(denied), denied)
	}
	if n, _ := admin.XLen(ctx, defaultSpoolKeyPrefix+"stream:"+testAccount).Result(); n != 1 {
		t.Errorf("the stream holds %d turns after the hand-back of %s, want 1", n, held[0])
	}
}

// TestSpoolRedisDownAtStart: Caddy starts with the Redis store down; a
// delivery the upstream fails meanwhile is held on the instance's disk, and
// the spool works, and delivers it, once Redis answers.
func TestSpoolRedisDownAtStart(t *testing.T) {
	srv := testredis.Start(t)
	srv.Stop()
	g := startSpoolRig(t, "spool {\n\t\t\tstore redis "+srv.URL()+"\n\t\t\tbackoff 10ms 50ms\n\t\t}")
	g.up.Down()
	held, status := g.deliver()
	if status != http.StatusAccepted {
		t.Fatalf("with Redis down: %d, want 202 (held on the instance's disk)", status)
	}
	srv.Restart()
	ids := append(g.deliverSpooled(2), held)
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	g.checkTakenOnce(ids)
}

// TestEachSpoolHoldsNoLock: what eachSpool calls runs outside the pool's
// lock, so that a store slow to answer (Redis down, for the admin API or a
// metrics scrape) cannot hold up a reload, which loads and deletes stores.
func TestEachSpoolHoldsNoLock(t *testing.T) {
	_, key, err := loadFileSpool(t.TempDir(), testPolicy)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		select {
		case <-done:
			_, _ = spools.Delete(key)
		default: // the pool is locked for good: fail, do not hang
		}
	})
	go func() {
		defer close(done)
		eachSpool(func(spoolStore) bool {
			// a reload meanwhile
			_, other, err := loadFileSpool(t.TempDir(), testPolicy)
			if err == nil {
				_, err = spools.Delete(other)
			}
			if err != nil {
				t.Error(err)
			}
			return false
		})
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("a store loaded while eachSpool ran waited for it")
	}
}

// TestAttemptContext: a first attempt's context keeps the request's values,
// not its cancellation, and ends at its deadline, whether something watched
// it before (Done) or asks only after (Err).
func TestAttemptContext(t *testing.T) {
	type key struct{}
	parent, cancel := context.WithCancel(context.WithValue(context.Background(), key{}, "v"))
	watched := &attemptContext{Context: context.WithoutCancel(parent), deadline: time.Now().Add(50 * time.Millisecond)}
	cancel() // the sender hangs up
	if watched.Value(key{}) != "v" || watched.Err() != nil || context.Cause(watched) != nil {
		t.Fatalf("value %v, err %v, cause %v", watched.Value(key{}), watched.Err(), context.Cause(watched))
	}
	child, stop := context.WithCancel(watched)
	defer stop()
	select {
	case <-child.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the deadline never ended the attempt")
	}
	if watched.Err() != context.DeadlineExceeded || child.Err() != context.DeadlineExceeded {
		t.Fatalf("err %v, child's %v", watched.Err(), child.Err())
	}

	late := &attemptContext{Context: context.Background(), deadline: time.Now().Add(-time.Millisecond)}
	if late.Err() != context.DeadlineExceeded {
		t.Fatalf("past its deadline, unwatched: %v", late.Err())
	}
	select {
	case <-late.Done():
	default:
		t.Fatal("Done after Err is not closed")
	}
	late.stop()

	// The attempt's end ends it, as cancel did: a child hears of it.
	ended := &attemptContext{Context: context.Background(), deadline: time.Now().Add(time.Hour)}
	child, stopChild := context.WithCancel(ended)
	defer stopChild()
	ended.stop()
	select {
	case <-child.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the attempt's end did not reach a child")
	}
	if ended.Err() != context.Canceled || child.Err() != context.Canceled {
		t.Fatalf("after the end: err %v, child's %v", ended.Err(), child.Err())
	}
}

// TestFallbackWriterFlush: a flush before the next handler wrote a status,
// or while a failure is held back, sends the sender nothing (net/http
// would send 200); once an answer goes on, it is flushed.
func TestFallbackWriterFlush(t *testing.T) {
	rec := httptest.NewRecorder()
	w := &fallbackWriter{ResponseWriter: rec}
	if err := http.NewResponseController(w).Flush(); err != nil {
		t.Fatal(err)
	}
	w.WriteHeader(http.StatusServiceUnavailable)
	w.Flush()
	if rec.Flushed || w.status != http.StatusServiceUnavailable || !w.held {
		t.Fatalf("flushed %v, status %d, held %v: a 503 must stay held", rec.Flushed, w.status, w.held)
	}

	rec = httptest.NewRecorder()
	w = &fallbackWriter{ResponseWriter: rec}
	w.WriteHeader(http.StatusOK)
	w.Flush()
	if !rec.Flushed || rec.Code != http.StatusOK {
		t.Fatalf("a 200 going on: flushed %v, code %d", rec.Flushed, rec.Code)
	}
}
