package trivialsecwebhook

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/textproto"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/google/uuid"
	bolt "go.etcd.io/bbolt"
)

// A 202 means delivered: the sender was told the delivery is taken, and
// never sends it again. These tests walk the ways a delivery answered 202,
// or one the sender was never answered for, could go missing: a re-drive
// judged by what the server answered rather than by the handlers after the
// module, an informational answer before a failure, an account gone from
// the config, an answer broken off, and a store that cannot be opened.

// withLog adds a JSON log file to a Caddyfile of the spool's tests.
func withLog(caddyfile, file string) string {
	return strings.Replace(caddyfile, "persist_config off", "persist_config off\n\tlog {\n\t\toutput file "+file+"\n\t\tformat json\n\t\tlevel DEBUG\n\t}", 1)
}

// logEntries reads a JSON log file: one map per line.
func logEntries(t *testing.T, file string) []map[string]any {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		var entry map[string]any
		if json.Unmarshal([]byte(line), &entry) == nil {
			out = append(out, entry)
		}
	}
	return out
}

// logged returns the entries of a log file with this message.
func logged(t *testing.T, file, msg string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, e := range logEntries(t, file) {
		if e["msg"] == msg {
			out = append(out, e)
		}
	}
	return out
}

// everyEntry reports whether the spool holds n entries, each of which ok
// says yes to.
func (g *spoolRig) everyEntry(n int, ok func(spoolListing) bool) bool {
	l := g.list()
	if len(l) != n {
		return false
	}
	for _, e := range l {
		if !ok(e) {
			return false
		}
	}
	return true
}

// TestRedriveRouteMoved: a reload that moves the webhook's path leaves the
// spooled deliveries' path to no handler. Caddy answers such a request with
// an empty 200; that is no delivery: each attempt fails, saying why, until
// the route reaches the handler again.
func TestRedriveRouteMoved(t *testing.T) {
	g := startSpoolRig(t, "spool {\n\t\t\tbackoff 20ms 50ms\n\t\t}")
	g.url += "?key=query-secret" // the admin API's last_error must not show it
	g.up.Down()
	ids := g.deliverSpooled(5)
	g.load(strings.ReplaceAll(g.caddyfile("moved"), " /webhook", " /hooks/ts"))
	want := `the route no longer reaches the trivialsec_webhook handler of account "acme" (POST 127.0.0.1:`
	failedMoved := func(attempts map[string]int) func() bool {
		return func() bool {
			return g.everyEntry(5, func(l spoolListing) bool {
				return l.State == statePending && l.Attempts >= attempts[l.EventID]+3 && strings.HasPrefix(l.LastError, want) &&
					!strings.Contains(l.LastError, "query-secret")
			})
		}
	}
	// With the upstream still down, until each entry failed through the
	// moved route: an attempt begun before the reload is over by then.
	g.waitFor("every entry failed through the moved route", failedMoved(nil))
	before := map[string]int{}
	for _, l := range g.list() {
		before[l.EventID] = l.Attempts
	}
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	g.waitFor("every entry failed through the moved route, the upstream up", failedMoved(before))
	if n := len(g.up.Received()); n != 0 {
		t.Fatalf("the upstream got %d requests through a route that does not reach it", n)
	}
	g.reload("back")
	g.checkTakenOnce(ids)
}

// TestRedriveHandleErrors: an error page answered 200 (a common way to hide
// errors) does not make a failed re-drive a delivery: the handlers after
// the module returned an error.
func TestRedriveHandleErrors(t *testing.T) {
	g := startSpoolRigEdited(t, "spool {\n\t\t\tbackoff 20ms 50ms\n\t\t}", func(c string) string {
		return strings.Replace(c, "\treverse_proxy", "\thandle_errors {\n\t\trespond \"hidden\" 200\n\t}\n\treverse_proxy", 1)
	})
	g.up.Down()
	ids := g.deliverSpooled(5)
	g.waitFor("every entry failed a re-drive", func() bool {
		return g.everyEntry(5, func(l spoolListing) bool {
			return l.State == statePending && l.Attempts >= 3 && strings.HasPrefix(l.LastError, "502")
		})
	})
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	g.checkTakenOnce(ids)
}

// TestRedriveThroughItsSite: one account served by two sites that share
// the default spool. A delivery spooled by one site is re-driven through
// that site's server, never through the other's, whichever handler was
// provisioned last (the order changes with each load).
func TestRedriveThroughItsSite(t *testing.T) {
	other := freePort(t)
	g := startSpoolRigEdited(t, "spool {\n\t\t\tbackoff 10ms 50ms\n\t\t}", func(c string) string {
		return c + fmt.Sprintf(`
http://127.0.0.1:%d {
	trivialsec_webhook {
		account %s
		secret {env.TRIVIALSEC_IT_SECRET}
		spool {
			backoff 10ms 50ms
		}
	}
	respond "the other site" 200
}
`, other, testAccount)
	})
	var all []string
	for round := range 4 {
		g.up.Down()
		ids := g.deliverSpooled(3)
		all = append(all, ids...)
		g.reload(fmt.Sprint(round)) // provisioned again, in another order
		if err := g.up.Up(); err != nil {
			t.Fatal(err)
		}
		if _, err := g.up.WaitTaken(ids, 20*time.Second); err != nil {
			t.Fatalf("round %d: %v; the spool holds %+v", round, err, g.list())
		}
		g.drained()
	}
	g.checkTakenOnce(all)
}

// testUpstream is an upstream the test writes by hand; it counts the
// requests for each event ID, and answers the n-th of an event as answer
// says.
type testUpstream struct {
	*httptest.Server
	mu     sync.Mutex
	seen   map[string]int
	answer func(w http.ResponseWriter, n int)
}

func startTestUpstream(t *testing.T, answer func(w http.ResponseWriter, n int)) *testUpstream {
	u := &testUpstream{seen: map[string]int{}, answer: answer}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var fields struct {
			EventID string `json:"event_id"`
		}
		_ = json.Unmarshal(body, &fields)
		u.mu.Lock()
		u.seen[fields.EventID]++
		n := u.seen[fields.EventID]
		u.mu.Unlock()
		u.answer(w, n)
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *testUpstream) count(id string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.seen[id]
}

// hangUp closes the connection of w without another byte.
func hangUp(w http.ResponseWriter) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err == nil {
		conn.Close()
	}
}

// breakOff answers 200 and the start of a body, then hangs up.
func breakOff(w http.ResponseWriter) {
	conn, buf, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return
	}
	_, _ = buf.WriteString("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\npartial")
	_ = buf.Flush()
	conn.Close()
}

// TestSpoolEarlyHints: an upstream that sends 103 Early Hints, then hangs
// up or stops answering: the final status decides, and the delivery is
// spooled (202), then delivered once.
func TestSpoolEarlyHints(t *testing.T) {
	for _, then := range []string{"hangs up", "hangs"} {
		t.Run(strings.ReplaceAll(then, " ", "_"), func(t *testing.T) {
			release := make(chan struct{})
			up := startTestUpstream(t, func(w http.ResponseWriter, n int) {
				if n > 1 {
					w.WriteHeader(http.StatusOK)
					return
				}
				w.Header().Set("Link", "</style.css>; rel=preload")
				w.WriteHeader(http.StatusEarlyHints)
				if then == "hangs" {
					<-release
					return
				}
				hangUp(w)
			})
			t.Cleanup(func() { close(release) }) // before the upstream's Close, which waits for its handlers
			g := startSpoolRigTo(t, "spool {\n\t\t\tattempt_timeout 300ms\n\t\t\tbackoff 10ms 50ms\n\t\t}", up.Listener.Addr().String())
			ids := g.deliverSpooled(4)
			// The sender gets the 103 first, then the 202.
			d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
			var hints atomic.Int32
			trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, _ textproto.MIMEHeader) error {
				if code == http.StatusEarlyHints {
					hints.Add(1)
				}
				return nil
			}}
			req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), http.MethodPost, g.url, strings.NewReader(d.body()))
			req.Header.Set("Authorization", d.authorization())
			resp, err := senderClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusAccepted || hints.Load() != 1 {
				t.Errorf("the sender got %d after %d early hints, want 202 after 1", resp.StatusCode, hints.Load())
			}
			ids = append(ids, d.eventID)
			g.drained()
			for _, id := range ids {
				if n := up.count(id); n != 2 {
					t.Errorf("event %s: the upstream got %d requests, want 2 (the failed one, then the delivery)", id, n)
				}
			}
		})
	}
}

// TestBrokenAnswerKeepsReservation: an upstream that begins a 200, then
// breaks off: the delivery reached it. Nothing is spooled, and the event ID
// stays reserved: a copy is refused, not delivered again.
func TestBrokenAnswerKeepsReservation(t *testing.T) {
	for _, spool := range []string{"", "spool off"} {
		t.Run(fmt.Sprintf("spool_%t", spool == ""), func(t *testing.T) {
			up := startTestUpstream(t, func(w http.ResponseWriter, n int) { breakOff(w) })
			g := startSpoolRigTo(t, spool, up.Listener.Addr().String())
			for range 3 {
				id := uuid.NewString()
				d := productionDelivery().withEventID(id).at(time.Now())
				resp := post(t, g.url, d.authorization(), strings.NewReader(d.body()))
				_, _ = io.Copy(io.Discard, resp.Body) // broken off
				resp.Body.Close()
				if status := g.send(productionDelivery().withEventID(id).at(time.Now())); status != http.StatusConflict {
					t.Errorf("a copy of a delivery the upstream began to answer: %d, want 409", status)
				}
				if n := up.count(id); n != 1 {
					t.Errorf("the upstream got it %d times", n)
				}
			}
			if spool == "" {
				if n := len(g.list()); n != 0 {
					t.Errorf("%d entries spooled", n)
				}
			}
		})
	}
}

// TestRedriveBrokenAnswer: a re-drive whose upstream begins a 200 and
// breaks off reached it: the entry is delivered (and Caddy, where
// reverse_proxy panics to abort the answer, goes on).
func TestRedriveBrokenAnswer(t *testing.T) {
	up := startTestUpstream(t, func(w http.ResponseWriter, n int) {
		switch n {
		case 1:
			w.WriteHeader(http.StatusServiceUnavailable)
		case 2:
			breakOff(w)
		default:
			w.WriteHeader(http.StatusOK)
		}
	})
	g := startSpoolRigTo(t, "spool {\n\t\t\tbackoff 10ms 50ms\n\t\t}", up.Listener.Addr().String())
	ids := g.deliverSpooled(3)
	g.drained()
	time.Sleep(200 * time.Millisecond) // several backoffs: room for a third request, if there were one
	for _, id := range ids {
		if n := up.count(id); n != 2 {
			t.Errorf("event %s: %d requests, want 2", id, n)
		}
	}
}

// TestSpoolParkedAccount: a reload that removes an account parks its
// entries: listed and counted as parked, said once at ERROR, and made dead
// letters at max_age, never pending for ever.
func TestSpoolParkedAccount(t *testing.T) {
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	g := startSpoolRigEdited(t, "spool {\n\t\t\tbackoff 10ms 20ms\n\t\t\tmax_age 3s\n\t\t}",
		func(c string) string { return withLog(c, logFile) })
	g.up.Down()
	g.deliverSpooled(2)
	g.load(strings.Replace(g.caddyfile("first"), "account "+testAccount, "account other", 1))
	g.waitFor("both entries are parked", func() bool {
		return g.everyEntry(2, func(l spoolListing) bool { return l.State == stateParked && l.NextAttempt == "" })
	})
	if got := scrape(t, g.base+"/metrics")[`caddy_trivialsec_webhook_spool_entries{state="parked"}`]; got != 2 {
		t.Errorf("spool_entries{parked} = %v, want 2", got)
	}
	want := `no trivialsec_webhook handler of the running config serves account "acme"`
	g.waitFor("both entries are dead letters at max_age", func() bool {
		return g.everyEntry(2, func(l spoolListing) bool { return l.State == stateDead && l.LastError == want })
	})
	m := scrape(t, g.base+"/metrics")
	if m[`caddy_trivialsec_webhook_spool_entries{state="dead"}`] != 2 || m[`caddy_trivialsec_webhook_spool_entries{state="parked"}`] != 0 {
		t.Errorf("spool_entries: dead %v, parked %v", m[`caddy_trivialsec_webhook_spool_entries{state="dead"}`], m[`caddy_trivialsec_webhook_spool_entries{state="parked"}`])
	}
	if n := len(g.up.Received()); n != 0 {
		t.Errorf("the upstream got %d requests", n)
	}
	parked := logged(t, logFile, "spool: deliveries of an account that no trivialsec_webhook handler of the running config serves are waiting: "+
		"serve the account again, or delete them through the admin API; at max_age they become dead letters")
	if len(parked) != 1 || parked[0]["level"] != "error" || parked[0]["account"] != testAccount {
		t.Errorf("the parked entries were said %d times: %v", len(parked), parked)
	}
	// The WARN line of each spooled delivery names the store.
	spooled := logged(t, logFile, "the next handler failed: spooled the delivery, answered 202; the spool delivers it again")
	if len(spooled) != 2 {
		t.Fatalf("%d lines for 2 spooled deliveries", len(spooled))
	}
	for _, e := range spooled {
		if dir, _ := e["spool"].(string); !strings.HasSuffix(dir, filepath.Join("trivialsec_webhook", "spool")) || e["level"] != "warn" {
			t.Errorf("the spooled line: %v", e)
		}
	}
}

// reopenEvery sets spoolReopenInterval for a test, until its Caddy has
// stopped (a cleanup registered before the rig's runs after it).
func reopenEvery(t *testing.T, d time.Duration) {
	old := spoolReopenInterval
	spoolReopenInterval = d
	t.Cleanup(func() { spoolReopenInterval = old })
}

// TestSpoolStoreDegrades: a store that cannot be opened (here, another
// process holds its lock) does not stop Caddy: the webhook's route works
// without the spool (a failure goes back to the sender, never a 202),
// spool_up says 0 and the log says why; once the store opens, what it held
// is delivered, and deliveries are spooled again.
func TestSpoolStoreDegrades(t *testing.T) {
	reopenEvery(t, 100*time.Millisecond)
	dir := filepath.Join(t.TempDir(), "spool")
	g := startSpoolRig(t, "spool {\n\t\t\tstore file "+dir+"\n\t\t\tbackoff 10ms 50ms\n\t\t}")
	g.up.Down()
	ids := g.deliverSpooled(3)
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	lock, err := bolt.Open(filepath.Join(dir, "spool.db"), 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	g.load(withLog(g.caddyfile("second"), logFile))
	if got := scrape(t, g.base+"/metrics")["caddy_trivialsec_webhook_spool_up"]; got != 0 {
		t.Errorf("spool_up = %v with the store locked", got)
	}
	if _, status := g.deliver(); status != http.StatusBadGateway {
		t.Errorf("with the store locked and the upstream down: %d, want the upstream's 502", status)
	}
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	inline, status := g.deliver()
	if status != http.StatusOK {
		t.Errorf("with the store locked: %d, want 200 from the upstream", status)
	}
	cannot := logged(t, logFile, "spool: the store cannot be opened: deliveries go to the next handler without the spool, "+
		"and a failure goes back to the sender, until it opens; it is tried again every 100ms")
	if len(cannot) != 1 || cannot[0]["level"] != "error" || !strings.Contains(fmt.Sprint(cannot[0]["error"]), "is locked by another process") {
		t.Errorf("the log said %v", cannot)
	}
	if err := lock.Close(); err != nil {
		t.Fatal(err)
	}
	g.checkTakenOnce(append(ids, inline))
	g.up.Down()
	g.deliverSpooled(1)
	if got := scrape(t, g.base+"/metrics")["caddy_trivialsec_webhook_spool_up"]; got != 1 {
		t.Errorf("spool_up = %v once the store opened", got)
	}
}

// TestSpoolDirUnusable: a store directory that cannot be made (a file is
// in the way) degrades the webhook's route only, and the store opens once
// the directory can be made.
func TestSpoolDirUnusable(t *testing.T) {
	reopenEvery(t, 100*time.Millisecond)
	file := filepath.Join(t.TempDir(), "a-file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(file, "spool")
	g := startSpoolRig(t, "spool {\n\t\t\tstore file "+dir+"\n\t\t\tbackoff 10ms 50ms\n\t\t}")
	g.up.Down()
	if _, status := g.deliver(); status != http.StatusBadGateway {
		t.Errorf("with no spool directory: %d, want the upstream's 502", status)
	}
	if got := scrape(t, g.base+"/metrics")["caddy_trivialsec_webhook_spool_up"]; got != 0 {
		t.Errorf("spool_up = %v with no spool directory", got)
	}
	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}
	g.waitFor("the store opens", func() bool { return scrape(t, g.base+"/metrics")["caddy_trivialsec_webhook_spool_up"] == 1 })
	ids := g.deliverSpooled(2)
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	g.checkTakenOnce(ids)
}

// TestValidateTouchesNoFile: validating a config (caddy validate) creates
// no spool directory: a later `caddy run` as another user must find none
// made by whoever validated.
func TestValidateTouchesNoFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "not", "yet", "spool")
	caddyfile := fmt.Sprintf("{\n\tadmin off\n\tpersist_config off\n}\nhttp://127.0.0.1:%d {\n\ttrivialsec_webhook {\n\t\taccount acme\n\t\tsecret s\n\t\tspool {\n\t\t\tstore file %s\n\t\t}\n\t}\n}\n", freePort(t), dir)
	cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		t.Fatal(err)
	}
	var cfg caddy.Config
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		t.Fatal(err)
	}
	if err := caddy.Validate(&cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Dir(filepath.Dir(dir))); !os.IsNotExist(err) {
		t.Errorf("validate made %s (or it is not there for another reason: %v)", filepath.Dir(filepath.Dir(dir)), err)
	}
}

// tryLoad loads a Caddyfile that is expected to fail to start.
func (g *spoolRig) tryLoad(caddyfile string) error {
	g.t.Helper()
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		g.t.Fatal(err)
	}
	return caddy.Load(cfg, true)
}

// TestSpoolFailedReloadStrandsNothing: reloads that provision the same site
// but fail to start (another site's port is taken) register handlers that
// never become ready, and are cleaned up: the entries that waited for them
// are retried all the same, and delivered once the upstream is back.
func TestSpoolFailedReloadStrandsNothing(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		if store != "" {
			store += "claim_after 1s\n\t\t\t"
		}
		g := startSpoolRig(t, "spool {\n\t\t\t"+store+"backoff 1ms 3ms\n\t\t}")
		taken, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer taken.Close()
		g.up.Down()
		ids := g.deliverSpooled(12)
		bad := g.caddyfile("bad") + fmt.Sprintf("\nhttp://%s {\n\trespond \"x\"\n}\n", taken.Addr())
		for range 30 {
			if err := g.tryLoad(bad); err == nil {
				t.Fatal("the bad config started")
			}
		}
		if err := g.up.Up(); err != nil {
			t.Fatal(err)
		}
		g.checkTakenOnce(ids)
	})
}

// TestNothingAnswersIsNoDelivery: when nothing after the module answers
// (reverse_proxy's matcher moved), the sender is not told 200: with the
// spool, the delivery is spooled (202); without it, the sender gets 502,
// and the event ID is released.
func TestNothingAnswersIsNoDelivery(t *testing.T) {
	for spool, want := range map[string]int{"": http.StatusAccepted, "spool off": http.StatusBadGateway} {
		t.Run(fmt.Sprint(want), func(t *testing.T) {
			g := startSpoolRigEdited(t, spool, func(c string) string {
				return strings.Replace(c, "reverse_proxy /webhook", "reverse_proxy /elsewhere", 1)
			})
			d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
			if status := g.send(d); status != want {
				t.Fatalf("nothing answered: %d, want %d", status, want)
			}
			again := http.StatusConflict // spooled: reserved
			if want == http.StatusBadGateway {
				again = http.StatusBadGateway // released: it passes, and is not answered again
			}
			if status := g.send(productionDelivery().withEventID(d.eventID).at(time.Now())); status != again {
				t.Errorf("the same delivery again: %d, want %d", status, again)
			}
		})
	}
}

// TestRedriveNothingAnswers: a reload moves reverse_proxy's matcher but not
// the module's: a re-drive reaches the module, and nothing after it
// answers. That is no delivery: each attempt fails, saying so, until a
// handler answers again.
func TestRedriveNothingAnswers(t *testing.T) {
	g := startSpoolRig(t, "spool {\n\t\t\tbackoff 20ms 50ms\n\t\t}")
	g.up.Down()
	ids := g.deliverSpooled(3)
	g.load(strings.Replace(g.caddyfile("moved"), "reverse_proxy /webhook", "reverse_proxy /hooks/ts", 1))
	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	g.waitFor("every entry failed with no answer", func() bool {
		return g.everyEntry(3, func(l spoolListing) bool { return l.Attempts >= 3 && l.LastError == errNoAnswer.Error() })
	})
	if n := len(g.up.Received()); n != 0 {
		t.Fatalf("the upstream got %d requests", n)
	}
	g.reload("back")
	g.checkTakenOnce(ids)
}

// TestSpoolAbortBeforeAnswer: a handler after the module that aborts
// (panics with http.ErrAbortHandler) before any answer: the first attempt
// is spooled (202), each re-drive is a failed attempt (no crash), and a
// reload that answers delivers it once. A copy meanwhile gets 409.
func TestSpoolAbortBeforeAnswer(t *testing.T) {
	aborts := true
	g := startSpoolRigEdited(t, "spool {\n\t\t\tbackoff 10ms 30ms\n\t\t}", func(c string) string {
		if !aborts {
			return c
		}
		return strings.Replace(c, "\treverse_proxy /webhook", "\tabort /webhook\n\treverse_proxy /never", 1)
	})
	d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
	if status := g.send(d); status != http.StatusAccepted {
		t.Fatalf("aborted first attempt: %d, want 202", status)
	}
	if status := g.send(productionDelivery().withEventID(d.eventID).at(time.Now())); status != http.StatusConflict {
		t.Errorf("copy: %d, want 409", status)
	}
	g.waitFor("several failed re-drives", func() bool {
		l := g.list()
		return len(l) == 1 && l[0].Attempts >= 4 && strings.Contains(l[0].LastError, "panicked")
	})
	aborts = false
	g.reload("answers")
	g.checkTakenOnce([]string{d.eventID})
}

// TestSpoolDegradedLeavesNoLoop: a store that never opens, reloaded
// several times and stopped, leaves no reopenLoop (or other store loop)
// behind.
func TestSpoolDegradedLeavesNoLoop(t *testing.T) {
	reopenEvery(t, 20*time.Millisecond)
	file := filepath.Join(t.TempDir(), "a-file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	g := startSpoolRig(t, "spool {\n\t\t\tstore file "+filepath.Join(file, "spool")+"\n\t\t}")
	for i := range 5 {
		g.reload(fmt.Sprint("r", i))
		_, _ = g.deliver()
		_ = scrape(t, g.base+"/metrics")
	}
	// the store opens while deliveries arrive, then another reload
	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}
	g.waitFor("open", func() bool { return scrape(t, g.base+"/metrics")["caddy_trivialsec_webhook_spool_up"] == 1 })
	g.reload("after")
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	buf := make([]byte, 1<<22)
	stacks := string(buf[:runtime.Stack(buf, true)])
	// commitLoop: the spool store's and its journal's; settle: the
	// journal's pass over old segments.
	for _, fn := range []string{"reopenLoop", "redriveLoop", "commitLoop", ").settle(", ").attempt("} {
		if strings.Contains(stacks, fn) {
			t.Errorf("%s still running after Stop", fn)
		}
	}
}
