package trivialsecwebhook

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/google/uuid"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
)

// These tests run a real Caddy in this process, configured from a
// Caddyfile, in front of a real upstream HTTP server, and drive it over
// loopback. They run one at a time: Caddy's running config is global.

// upstream is the service behind Caddy. It keeps every request it gets.
type upstream struct {
	*httptest.Server
	mu       sync.Mutex
	requests []upstreamRequest
}

type upstreamRequest struct {
	body    string
	header  http.Header
	trailer http.Header // after the body: what a chunked request's trailers said
	length  int64
	chunked bool
}

func startUpstream(t *testing.T) *upstream {
	t.Helper()
	u := &upstream{}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			t.Errorf("upstream: %v", err)
		}
		u.mu.Lock()
		u.requests = append(u.requests, upstreamRequest{string(body), r.Header.Clone(), r.Trailer.Clone(), r.ContentLength, len(r.TransferEncoding) > 0})
		u.mu.Unlock()
		if r.Header.Get("X-Fail") != "" {
			w.WriteHeader(http.StatusBadGateway)
			return
		}
		w.WriteHeader(http.StatusAccepted)
		fmt.Fprint(w, "received")
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *upstream) received() []upstreamRequest {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]upstreamRequest(nil), u.requests...)
}

// freePort finds a loopback port nobody listens on.
func freePort(t testing.TB) int {
	t.Helper()
	port, err := testkit.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// startProxy runs the module, with settings beside account and secret, in
// front of an upstream that records what it receives.
func startProxy(t *testing.T, settings string) (base string, up *upstream) {
	t.Helper()
	up = startUpstream(t)
	t.Setenv("TRIVIALSEC_IT_SECRET", testSecret)
	base = startCaddy(t, fmt.Sprintf(`	trivialsec_webhook {
		account %s
		secret {env.TRIVIALSEC_IT_SECRET}
		%s
	}
	reverse_proxy %s`, testAccount, settings, up.Listener.Addr()))
	return base, up
}

// startCaddy adapts a Caddyfile site block and runs it, failing the test
// (never skipping it) if Caddy does not start.
func startCaddy(t *testing.T, site string) string {
	t.Helper()
	port := freePort(t)
	loadCaddyfile(t, fmt.Sprintf("{\n\tadmin off\n\tpersist_config off\n\tauto_https off\n\tstorage file_system %s\n}\n\nhttp://127.0.0.1:%d {\n%s\n}\n",
		t.TempDir(), port, site))
	return fmt.Sprintf("http://127.0.0.1:%d", port)
}

// loadCaddyfile runs a whole Caddyfile until the test ends. Caddy's data
// directory, where the spool is by default, is the test's own.
func loadCaddyfile(t testing.TB, caddyfile string) {
	t.Helper()
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		t.Fatalf("adapt: %v\n%s", err, caddyfile)
	}
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("caddy did not start: %v", err)
	}
	loadedConfig = cfg
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
}

// loadedConfig is the JSON config startCaddy loaded last.
var loadedConfig []byte

// at moves the delivery's token times to the sender's clock reading now.
func (d *delivery) at(now time.Time) *delivery {
	shift := now.Unix() - testNow.Unix()
	for _, k := range []string{"iat", "nbf", "exp"} {
		d.claims[k] = d.claims[k].(int64) + shift
	}
	return d
}

// post sends a delivery as the production sender does: no Content-Type,
// User-Agent "Trivial Security".
func post(t testing.TB, url, authorization string, body io.Reader) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, body)
	if err != nil {
		t.Fatal(err)
	}
	if authorization != "" {
		req.Header.Set("Authorization", authorization)
	}
	req.Header.Set("User-Agent", "Trivial Security")
	resp, err := senderClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// senderClient opens a connection per delivery, as the sender does. (An
// idle kept-alive connection can be closed by a config reload just as it
// is reused, and Go does not resend a POST.)
var senderClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 30 * time.Second}

func readAll(t testing.TB, r io.Reader) string {
	t.Helper()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestIntegrationReverseProxy(t *testing.T) {
	up := startUpstream(t)
	t.Setenv("TRIVIALSEC_IT_OLD", "the-old-secret-being-rotated-out")
	t.Setenv("TRIVIALSEC_IT_SECRET", testSecret)
	// No route, no order line: the directive finds its own place.
	base := startCaddy(t, fmt.Sprintf(`	handle_errors {
		respond "{err.status_code} {http.trivialsec_webhook.reason}"
	}
	trivialsec_webhook /webhook/trivialsec {
		account %s
		secret {env.TRIVIALSEC_IT_OLD} {env.TRIVIALSEC_IT_SECRET}
	}
	reverse_proxy /webhook/trivialsec %s {
		header_up X-Trivialsec-Event {http.trivialsec_webhook.event_name}
		header_up X-Trivialsec-Event-Id {http.trivialsec_webhook.event_id}
	}
	@other not path /webhook/trivialsec
	respond @other "not a webhook" 404`, testAccount, up.Listener.Addr()))
	url := base + "/webhook/trivialsec"
	now := time.Now()

	// Genuine deliveries in both styles, the second one chunked.
	var want []string
	for i, style := range styles {
		d := style.make().withEventID(uuid.NewString()).at(now)
		if style.name == "documented" {
			d.name = "member_activity"
		} else {
			d.claims["evn"] = d.name
		}
		var body io.Reader = strings.NewReader(d.body())
		if i == 1 {
			body = io.MultiReader(strings.NewReader(d.body()[:10]), strings.NewReader(d.body()[10:])) // no length: chunked
		}
		resp := post(t, url, d.authorization(), body)
		if got := readAll(t, resp.Body); resp.StatusCode != http.StatusAccepted || got != "received" {
			t.Fatalf("%s delivery: %d %q", style.name, resp.StatusCode, got)
		}
		want = append(want, d.body())
		// The same delivery again is a replay.
		resp = post(t, url, d.authorization(), strings.NewReader(d.body()))
		if got := readAll(t, resp.Body); resp.StatusCode != http.StatusConflict || got != "409 replayed" {
			t.Fatalf("%s replay: %d %q", style.name, resp.StatusCode, got)
		}
	}

	// Forgeries and mistakes, each refused before the upstream.
	forged := productionDelivery().withEventID(uuid.NewString()).at(now)
	forged.key = "a guess"
	expired := productionDelivery().withEventID(uuid.NewString()).at(now.Add(-25 * time.Hour))
	swapped := productionDelivery().withEventID(uuid.NewString()).at(now)
	swappedAuth := swapped.authorization()
	swapped.eventID = uuid.NewString()
	for _, tc := range []struct {
		name, auth, body string
		want             string
	}{
		{"no_token", "", productionDelivery().body(), "403 missing_token"},
		{"forged_signature", forged.authorization(), forged.body(), "403 bad_signature"},
		{"alg_none", rawURL.EncodeToString([]byte(`{"alg":"none"}`)) + "." + rawURL.EncodeToString([]byte(mustJSON(forged.claims))) + ".", forged.body(), "403 bad_algorithm"},
		{"expired", expired.authorization(), expired.body(), "403 expired"},
		{"body_of_another_event", swappedAuth, swapped.body(), "403 eid_mismatch"},
		{"not_json", swappedAuth, "event_id=1", "400 malformed_body"},
	} {
		resp := post(t, url, tc.auth, strings.NewReader(tc.body))
		if got := readAll(t, resp.Body); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
	// Other methods and paths.
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, resp.Body); got != "405 method_not_allowed" || resp.Header.Get("Allow") != "POST" {
		t.Errorf("GET: %q, Allow %q", got, resp.Header.Get("Allow"))
	}
	resp.Body.Close()
	if resp := post(t, base+"/elsewhere", "", strings.NewReader("{}")); resp.StatusCode != 404 {
		t.Errorf("another path: %d", resp.StatusCode)
	}

	// The upstream got exactly the genuine deliveries, byte for byte.
	got := up.received()
	if len(got) != len(want) {
		t.Fatalf("upstream got %d requests, want %d", len(got), len(want))
	}
	for i, r := range got {
		if r.body != want[i] || r.length != int64(len(want[i])) {
			t.Errorf("upstream request %d: length %d, body %q\nwant %q", i, r.length, r.body, want[i])
		}
		if len(r.header["Transfer-Encoding"]) > 0 {
			t.Errorf("upstream request %d came chunked", i)
		}
		if r.header.Get("X-Trivialsec-Event-Id") == "" || r.header.Get("X-Trivialsec-Event") == "" {
			t.Errorf("upstream request %d: placeholders missing: %v", i, r.header)
		}
	}
	if got[1].header.Get("X-Trivialsec-Event") != "member_activity" {
		t.Errorf("event name placeholder: %q", got[1].header.Get("X-Trivialsec-Event"))
	}
}

// TestIntegrationRedeliveryAfterUpstreamFailure: with the spool off, a
// delivery the upstream failed is not remembered, so it can come again.
func TestIntegrationRedeliveryAfterUpstreamFailure(t *testing.T) {
	base, up := startProxy(t, "spool off")
	d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
	for i, want := range []int{http.StatusBadGateway, http.StatusAccepted, http.StatusConflict} {
		req, _ := http.NewRequest(http.MethodPost, base+"/", strings.NewReader(d.body()))
		req.Header.Set("Authorization", d.authorization())
		if i == 0 {
			req.Header.Set("X-Fail", "1")
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("attempt %d: %d, want %d", i+1, resp.StatusCode, want)
		}
	}
	if n := len(up.received()); n != 2 {
		t.Fatalf("upstream got %d requests, want 2", n)
	}
}

// TestIntegrationBadConfig: a config error stops Caddy from loading it.
func TestIntegrationBadConfig(t *testing.T) {
	caddyfile := "{\n\tadmin off\n\tpersist_config off\n}\nhttp://127.0.0.1:" + fmt.Sprint(freePort(t)) +
		" {\n\ttrivialsec_webhook {\n\t\taccount acme\n\t\tsecret {env.TRIVIALSEC_IT_UNSET}\n\t}\n}\n"
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		t.Fatal(err)
	}
	err = caddy.Load(cfg, true)
	if err == nil {
		_ = caddy.Stop()
		t.Fatal("caddy loaded a config whose secret is unset")
	}
	if !strings.Contains(err.Error(), "secret 1: evaluated placeholder {env.TRIVIALSEC_IT_UNSET} is empty") {
		t.Errorf("error: %v", err)
	}
}

// TestIntegrationPolicyKnobs: events, endpoint, strip_authorization and
// several secrets, each through a real Caddy.
func TestIntegrationPolicyKnobs(t *testing.T) {
	up := startUpstream(t)
	t.Setenv("TRIVIALSEC_IT_A", "secret-a")
	t.Setenv("TRIVIALSEC_IT_B", "secret-b")
	base := startCaddy(t, fmt.Sprintf(`	trivialsec_webhook {
		account %s
		secret {env.TRIVIALSEC_IT_A} {env.TRIVIALSEC_IT_B}
		endpoint https://hooks.example.com/webhook/trivialsec
		events report_created new_findings_domains
		strip_authorization
	}
	reverse_proxy %s`, testAccount, up.Listener.Addr()))
	now := time.Now()
	type want struct {
		status  int
		forward bool
	}
	deliveries := []struct {
		name string
		edit func(d *delivery)
		want want
	}{
		{"secret_a", func(d *delivery) { d.key = "secret-a" }, want{202, true}},
		{"secret_b", func(d *delivery) { d.key = "secret-b" }, want{202, true}},
		{"neither_secret", func(d *delivery) { d.key = testSecret }, want{403, false}},
		{"allowed_event", func(d *delivery) { d.key = "secret-a"; d.name = "new_findings_domains"; d.claims["evn"] = d.name }, want{202, true}},
		{"filtered_event", func(d *delivery) { d.key = "secret-a"; d.name = "report_deleted"; d.claims["evn"] = d.name }, want{403, false}},
		{"other_endpoint", func(d *delivery) { d.key = "secret-a"; d.claims["cep"] = "https://attacker.example/hook" }, want{403, false}},
		{"no_endpoint_claim", func(d *delivery) { d.key = "secret-b"; delete(d.claims, "cep") }, want{202, true}},
	}
	var forwarded []string
	for _, tc := range deliveries {
		d := productionDelivery().withEventID(uuid.NewString()).at(now)
		tc.edit(d)
		resp := post(t, base+"/", d.authorization(), strings.NewReader(d.body()))
		resp.Body.Close()
		if resp.StatusCode != tc.want.status {
			t.Errorf("%s: %d, want %d", tc.name, resp.StatusCode, tc.want.status)
		}
		if tc.want.forward {
			forwarded = append(forwarded, d.body())
		}
	}
	got := up.received()
	if len(got) != len(forwarded) {
		t.Fatalf("upstream got %d deliveries, want %d", len(got), len(forwarded))
	}
	for i, r := range got {
		if r.body != forwarded[i] {
			t.Errorf("upstream delivery %d: %q", i, r.body)
		}
		if _, ok := r.header["Authorization"]; ok {
			t.Errorf("upstream delivery %d carries the token despite strip_authorization", i)
		}
	}
}

// TestIntegrationMetrics scrapes Caddy's metrics after a mix of accepted
// and refused deliveries and checks the counts exactly.
func TestIntegrationMetrics(t *testing.T) {
	up := startUpstream(t)
	t.Setenv("TRIVIALSEC_IT_SECRET", testSecret)
	base := startCaddy(t, fmt.Sprintf(`	metrics /metrics
	trivialsec_webhook /webhook {
		account %s
		secret {env.TRIVIALSEC_IT_SECRET}
	}
	reverse_proxy /webhook %s`, testAccount, up.Listener.Addr()))
	before := scrape(t, base+"/metrics")
	now := time.Now()
	send := func(d *delivery, auth string) {
		resp := post(t, base+"/webhook", auth, strings.NewReader(d.body()))
		resp.Body.Close()
	}
	a := productionDelivery().withEventID(uuid.NewString()).at(now)
	send(a, a.authorization()) // accepted: report_created
	send(a, a.authorization()) // replayed
	b := productionDelivery().withEventID(uuid.NewString()).at(now)
	b.name, b.claims["evn"] = "client_status", "client_status"
	send(b, b.authorization()) // accepted: client_status
	send(b, "")                // missing_token
	c := productionDelivery().withEventID(uuid.NewString()).at(now)
	c.key = "wrong"
	send(c, c.authorization()) // bad_signature
	send(c, c.authorization()) // bad_signature
	// A reload keeps the counts: the collectors outlive each config.
	if err := caddy.Load(loadedConfig, true); err != nil {
		t.Fatal(err)
	}
	after := scrape(t, base+"/metrics")

	for series, want := range map[string]float64{
		`caddy_trivialsec_webhook_requests_total{reason="none",result="accepted"}`:         2,
		`caddy_trivialsec_webhook_requests_total{reason="replayed",result="refused"}`:      1,
		`caddy_trivialsec_webhook_requests_total{reason="missing_token",result="refused"}`: 1,
		`caddy_trivialsec_webhook_requests_total{reason="bad_signature",result="refused"}`: 2,
		`caddy_trivialsec_webhook_requests_total{reason="expired",result="refused"}`:       0,
		`caddy_trivialsec_webhook_events_total{event_name="report_created"}`:               1,
		`caddy_trivialsec_webhook_events_total{event_name="client_status"}`:                1,
		`caddy_trivialsec_webhook_events_total{event_name="member_activity"}`:              0,
	} {
		v, ok := after[series]
		if !ok {
			t.Errorf("%s is not exported", series)
			continue
		}
		if got := v - before[series]; got != want {
			t.Errorf("%s rose by %v, want %v", series, got, want)
		}
	}
}

// scrape reads a Prometheus text exposition into series -> value.
func scrape(t testing.TB, url string) map[string]float64 {
	t.Helper()
	resp, err := senderClient.Get(url)
	if err != nil { // once more: a reload may have closed the connection
		resp, err = senderClient.Get(url)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	series := map[string]float64{}
	for _, line := range strings.Split(readAll(t, resp.Body), "\n") {
		if !strings.HasPrefix(line, "caddy_trivialsec_webhook_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		var v float64
		if _, err := fmt.Sscan(line[i+1:], &v); err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		series[line[:i]] = v
	}
	if len(series) == 0 {
		t.Fatalf("no caddy_trivialsec_webhook_ series at %s", url)
	}
	return series
}

// TestReadmeFirstExample runs the README's first example as it is written,
// with the spool off, in front of an upstream that is down: the module's
// refusals print their reason, and an error that is not the module's (the
// 502 reverse_proxy answers) prints its status text, never a placeholder's
// literal name.
func TestReadmeFirstExample(t *testing.T) {
	example, found := strings.CutPrefix(testkit.Example(t, "README.md", "proxy"), "hooks.example.com {\n")
	if !found || !strings.Contains(example, "handle_errors") {
		t.Fatal("the README's first example is no longer the site this test runs")
	}
	port := freePort(t)
	t.Setenv("TRIVIALSEC_WEBHOOK_SECRET", testSecret)
	example = strings.ReplaceAll(example, "127.0.0.1:9000", testkit.ClosedAddr(t)) // down
	// With the spool on, the service being down is answered 202 and
	// spooled; with it off, it is an error the module does not make.
	example = strings.Replace(example, "strip_authorization\n", "strip_authorization\n\t\tspool off\n", 1)
	loadCaddyfile(t, fmt.Sprintf("{\n\tadmin off\n\tpersist_config off\n}\n\nhttp://127.0.0.1:%d {\n%s", port, example))
	url := fmt.Sprintf("http://127.0.0.1:%d/webhook/trivialsec", port)

	forged := productionDelivery().at(time.Now())
	forged.key = "a guess"
	genuine := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
	for _, tc := range []struct {
		name, auth, body, want string
		status                 int
	}{
		{"refused", forged.authorization(), forged.body(), "403 bad_signature", 403},
		{"service_down", genuine.authorization(), genuine.body(), "502 Bad Gateway", 502},
	} {
		resp := post(t, url, tc.auth, strings.NewReader(tc.body))
		if got := readAll(t, resp.Body); resp.StatusCode != tc.status || got != tc.want {
			t.Errorf("%s: %d %q, want %d %q", tc.name, resp.StatusCode, got, tc.status, tc.want)
		}
	}
}
