package e2e

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
)

// The monitoring mixin: monitoring/alerts.yaml (Prometheus rules), their
// unit tests in monitoring/alerts_test.yaml, monitoring/dashboard.json
// (Grafana) and their runbooks in docs/monitoring.md. These tests check the
// rules with promtool, and run every alert's and every panel's expression
// in a real Prometheus that scrapes a real Caddy with the module.
//
// Each alert's expr is kept on one line in alerts.yaml, so that this file
// reads it without a YAML library.

const (
	alertsFile     = "monitoring/alerts.yaml"
	alertsTestFile = "monitoring/alerts_test.yaml"
	dashboardFile  = "monitoring/dashboard.json"
	monitoringDoc  = "docs/monitoring.md"
	runbookBase    = "https://github.com/trivialsec/caddy-trivialsec-webhook/blob/main/docs/monitoring.md#"
)

// alertRule is one alert of alerts.yaml.
type alertRule struct {
	name, expr, severity, runbook string
	summary, description          bool
}

var (
	alertLine    = regexp.MustCompile(`^\s*- alert:\s*(\S+)\s*$`)
	exprLine     = regexp.MustCompile(`^\s*expr:\s*(\S.*)$`)
	severityLine = regexp.MustCompile(`^\s*severity:\s*(\S+)\s*$`)
	runbookLine  = regexp.MustCompile(`^\s*runbook_url:\s*"([^"]*)"\s*$`)
)

// readAlertRules reads the alerts of alerts.yaml, and fails the test if one
// lacks an expr on one line, a severity, a summary, a description or a
// runbook_url into docs/monitoring.md.
func readAlertRules(t *testing.T) []alertRule {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(testkit.Root(), alertsFile))
	if err != nil {
		t.Fatal(err)
	}
	var rules []alertRule
	for _, line := range strings.Split(string(raw), "\n") {
		if m := alertLine.FindStringSubmatch(line); m != nil {
			rules = append(rules, alertRule{name: m[1]})
			continue
		}
		if len(rules) == 0 {
			continue
		}
		r := &rules[len(rules)-1]
		trimmed := strings.TrimSpace(line)
		switch {
		case exprLine.MatchString(line):
			r.expr = exprLine.FindStringSubmatch(line)[1]
		case severityLine.MatchString(line):
			r.severity = severityLine.FindStringSubmatch(line)[1]
		case runbookLine.MatchString(line):
			r.runbook = runbookLine.FindStringSubmatch(line)[1]
		case strings.HasPrefix(trimmed, "summary:"):
			r.summary = strings.TrimSpace(strings.TrimPrefix(trimmed, "summary:")) != ""
		case strings.HasPrefix(trimmed, "description:"):
			r.description = strings.TrimSpace(strings.TrimPrefix(trimmed, "description:")) != ""
		}
	}
	if len(rules) == 0 {
		t.Fatalf("%s has no alert", alertsFile)
	}
	for _, r := range rules {
		if r.expr == "" || r.expr == "|" || r.expr == ">" || strings.HasPrefix(r.expr, "|") || strings.HasPrefix(r.expr, ">") {
			t.Errorf("%s: alert %s: write its expr on one line", alertsFile, r.name)
		}
		if r.severity != "critical" && r.severity != "warning" {
			t.Errorf("%s: alert %s: severity %q, want critical or warning", alertsFile, r.name, r.severity)
		}
		if !r.summary || !r.description {
			t.Errorf("%s: alert %s: it needs a summary and a description", alertsFile, r.name)
		}
		if !strings.HasPrefix(r.runbook, runbookBase) {
			t.Errorf("%s: alert %s: runbook_url %q is not %s<anchor>", alertsFile, r.name, r.runbook, runbookBase)
		}
	}
	return rules
}

// lookTool finds a Prometheus tool, and fails the test without it: the CI
// installs it, and a check that is skipped is no check.
func lookTool(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is not installed: apt-get install prometheus (.ci/run installs it)", name)
	}
	return path
}

// TestMonitoringRules: the commands docs/monitoring.md gives check the rules
// (`promtool check rules`) and pass their unit tests (`promtool test
// rules`), and the unit tests see each alert both fire and not fire.
func TestMonitoringRules(t *testing.T) {
	promtool := lookTool(t, "promtool")
	rules := readAlertRules(t)

	block := testkit.Example(t, monitoringDoc, "monitoring-promtool")
	var ran []string
	for _, line := range strings.Split(strings.TrimSpace(block), "\n") {
		args := strings.Fields(line)
		if len(args) < 2 || args[0] != "promtool" {
			t.Fatalf("%s: %q is not a promtool command", monitoringDoc, line)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		cmd := exec.CommandContext(ctx, promtool, args[1:]...)
		cmd.Dir = testkit.Root()
		out, err := cmd.CombinedOutput()
		cancel()
		if err != nil {
			t.Fatalf("%s: %v\n%s", line, err, out)
		}
		if args[1] == "check" {
			if want := fmt.Sprintf("SUCCESS: %d rules found", len(rules)); !strings.Contains(string(out), want) {
				t.Errorf("%s: want %q in\n%s", line, want, out)
			}
		}
		ran = append(ran, strings.Join(args[1:], " "))
	}
	for _, want := range []string{"check rules " + alertsFile, "test rules " + alertsTestFile} {
		if !slices.Contains(ran, want) {
			t.Errorf("%s's monitoring-promtool example does not run promtool %s", monitoringDoc, want)
		}
	}

	// Each alert has a case where it fires and one where it does not.
	raw, err := os.ReadFile(filepath.Join(testkit.Root(), alertsTestFile))
	if err != nil {
		t.Fatal(err)
	}
	fires, quiet := map[string]bool{}, map[string]bool{}
	current := ""
	for _, line := range strings.Split(string(raw), "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(trimmed, "alertname:"):
			if current != "" {
				quiet[current] = true // no exp_alerts: none expected
			}
			current = strings.TrimSpace(strings.TrimPrefix(trimmed, "alertname:"))
		case current != "" && trimmed == "exp_alerts: []":
			quiet[current], current = true, ""
		case current != "" && trimmed == "exp_alerts:":
			fires[current], current = true, ""
		case current != "" && (strings.HasPrefix(trimmed, "- eval_time:") || strings.HasPrefix(trimmed, "- interval:")):
			quiet[current], current = true, ""
		}
	}
	if current != "" {
		quiet[current] = true
	}
	for _, r := range rules {
		if !fires[r.name] {
			t.Errorf("%s has no case where %s fires", alertsTestFile, r.name)
		}
		if !quiet[r.name] {
			t.Errorf("%s has no case where %s does not fire", alertsTestFile, r.name)
		}
	}
}

// TestMonitoringRunbooks: each alert's runbook_url names a section of
// docs/monitoring.md of its own. (That every code block of the page is run
// by a test, TestDocExamplesAreTested checks, as for every page.)
func TestMonitoringRunbooks(t *testing.T) {
	anchors, err := testkit.HeadingAnchors(monitoringDoc)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range readAlertRules(t) {
		anchor := strings.TrimPrefix(r.runbook, runbookBase)
		if !anchors[anchor] {
			t.Errorf("%s: the runbook of %s, #%s, is no heading of %s", alertsFile, r.name, anchor, monitoringDoc)
		}
		if anchor != strings.ToLower(r.name) {
			t.Errorf("%s: the runbook of %s is #%s: give each alert the section named after it", alertsFile, r.name, anchor)
		}
	}
}

// promSelectors returns the vector selectors of a PromQL expression, each
// a metric name and its matchers as written (`up{job="caddy"}`): every
// identifier that is not a function (followed by a parenthesis), an
// aggregation operator, a keyword or a label of by/without/on/ignoring/
// group_left/group_right. Strings, durations and numbers are skipped.
func promSelectors(expr string) (selectors, names []string) {
	keywords := map[string]bool{"and": true, "or": true, "unless": true, "bool": true, "offset": true,
		"inf": true, "nan": true, "atan2": true,
		// the aggregation operators, which may come before by or without
		"sum": true, "min": true, "max": true, "avg": true, "group": true, "stddev": true, "stdvar": true,
		"count": true, "count_values": true, "bottomk": true, "topk": true, "quantile": true}
	labelLists := map[string]bool{"by": true, "without": true, "on": true, "ignoring": true,
		"group_left": true, "group_right": true}
	isIdentStart := func(c byte) bool { return c == '_' || c == ':' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }
	isIdent := func(c byte) bool { return isIdentStart(c) || c >= '0' && c <= '9' }
	// skipTo returns the index just past the closing byte, strings skipped.
	skipTo := func(i int, closing byte) int {
		for i < len(expr) && expr[i] != closing {
			if q := expr[i]; q == '"' || q == '\'' || q == '`' {
				for i++; i < len(expr) && expr[i] != q; i++ {
					if expr[i] == '\\' && q != '`' {
						i++
					}
				}
			}
			i++
		}
		return i + 1
	}
	next := func(i int) byte {
		for ; i < len(expr); i++ {
			if expr[i] != ' ' && expr[i] != '\t' && expr[i] != '\n' {
				return expr[i]
			}
		}
		return 0
	}
	for i := 0; i < len(expr); {
		c := expr[i]
		switch {
		case c == '"' || c == '\'' || c == '`':
			i = skipTo(i+1, c)
		case c == '[':
			i = skipTo(i+1, ']')
		case c >= '0' && c <= '9' || c == '.':
			for i < len(expr) && (isIdent(expr[i]) || expr[i] == '.') {
				i++
			}
		case c == '{':
			end := skipTo(i+1, '}')
			selectors, names = append(selectors, expr[i:end]), append(names, "")
			i = end
		case isIdentStart(c):
			start := i
			for i < len(expr) && isIdent(expr[i]) {
				i++
			}
			ident := expr[start:i]
			switch {
			case labelLists[strings.ToLower(ident)] && next(i) == '(':
				i = strings.IndexByte(expr[i:], '(') + i
				i = skipTo(i+1, ')')
			case keywords[strings.ToLower(ident)] || next(i) == '(':
				// an operator, or a function or aggregation: its
				// arguments are read as the loop goes on
			default:
				sel := ident
				if next(i) == '{' {
					open := strings.IndexByte(expr[i:], '{') + i
					end := skipTo(open+1, '}')
					sel, i = ident+expr[open:end], end
				}
				selectors, names = append(selectors, sel), append(names, ident)
			}
		default:
			i++
		}
	}
	return selectors, names
}

func TestMonitoringPromSelectors(t *testing.T) {
	for expr, want := range map[string][]string{
		`sum without (result, reason) (increase(a_total{result="refused",reason=~"x|y"}[5m])) > 100`: {`a_total{result="refused",reason=~"x|y"}`},
		`histogram_quantile(0.99, sum by (le) (rate(b_bucket{method="POST"}[1m])))`:                  {`b_bucket{method="POST"}`},
		`c / d > 0.8`: {"c", "d"},
		`clamp_min(sum(rate(e[1m])) - sum(rate(f{x="}"}[1m])), 0) or on(instance) g offset 5m`: {"e", `f{x="}"}`, "g"},
		`min_over_time(h[5m]) > 0 and count by (job) (i) unless j`:                             {"h", "i", "j"},
		`topk without (a) (3, k{a="b"}) * on (x) group_left (y) sum(l) by (z)`:                 {`k{a="b"}`, "l"},
	} {
		got, _ := promSelectors(expr)
		if !slices.Equal(got, want) {
			t.Errorf("promSelectors(%s) = %q, want %q", expr, got, want)
		}
	}
}

// prometheus is a Prometheus server the test started.
type prometheus struct {
	cmd    *exec.Cmd
	url    string
	exited chan struct{}
	mu     sync.Mutex
	log    bytes.Buffer
}

func (p *prometheus) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.Write(b)
}

func (p *prometheus) logs() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.String()
}

// startPrometheus runs Prometheus on config until the test ends, its API on
// a free loopback port, and waits until it is ready.
func startPrometheus(t *testing.T, bin, config string, deadline time.Time) *prometheus {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	p := &prometheus{url: "http://" + addr, exited: make(chan struct{})}
	p.cmd = exec.Command(bin, "--config.file="+path, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr, "--log.level=warn")
	p.cmd.Stdout, p.cmd.Stderr = p, p
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(10 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Logf("prometheus's log:\n%s", p.logs())
		}
	})
	for {
		if resp, err := sender.Get(p.url + "/-/ready"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return p
			}
		}
		select {
		case <-p.exited:
			t.Fatalf("prometheus exited:\n%s", p.logs())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus is not ready:\n%s", p.logs())
		}
	}
}

// api gets a Prometheus API path and decodes its data.
func (p *prometheus) api(path string, params url.Values, data any) error {
	resp, err := sender.Get(p.url + path + "?" + params.Encode())
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	var out struct {
		Status string          `json:"status"`
		Error  string          `json:"error"`
		Data   json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		return fmt.Errorf("%s: %d %s", path, resp.StatusCode, raw)
	}
	if out.Status != "success" {
		return fmt.Errorf("%s", out.Error)
	}
	return json.Unmarshal(out.Data, data)
}

// query evaluates expr now, and returns how many series it gives.
func (p *prometheus) query(expr string) (int, error) {
	var data struct {
		ResultType string          `json:"resultType"`
		Result     json.RawMessage `json:"result"`
	}
	if err := p.api("/api/v1/query", url.Values{"query": {expr}}, &data); err != nil {
		return 0, err
	}
	if data.ResultType != "vector" && data.ResultType != "matrix" {
		return 1, nil // a scalar or a string
	}
	var series []json.RawMessage
	err := json.Unmarshal(data.Result, &series)
	return len(series), err
}

// loadedRule is a rule as /api/v1/rules lists it.
type loadedRule struct {
	Name        string            `json:"name"`
	Query       string            `json:"query"`
	Type        string            `json:"type"`
	Health      string            `json:"health"`
	LastError   string            `json:"lastError"`
	State       string            `json:"state"`
	Annotations map[string]string `json:"annotations"`
}

func (p *prometheus) rules() ([]loadedRule, error) {
	var data struct {
		Groups []struct {
			Rules []loadedRule `json:"rules"`
		} `json:"groups"`
	}
	if err := p.api("/api/v1/rules", nil, &data); err != nil {
		return nil, err
	}
	var out []loadedRule
	for _, g := range data.Groups {
		out = append(out, g.Rules...)
	}
	return out, nil
}

// exportedMetrics returns the names of the series Caddy serves at metrics.
func exportedMetrics(t *testing.T, metrics string) map[string]bool {
	t.Helper()
	resp, err := sender.Get(metrics)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	names := map[string]bool{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		if i := strings.IndexAny(line, "{ "); i > 0 {
			names[line[:i]] = true
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return names
}

// dashboard is what the test reads of dashboard.json.
type dashboard struct {
	Panels     []dashboardPanel `json:"panels"`
	Templating struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

type dashboardPanel struct {
	ID         int              `json:"id"`
	Type       string           `json:"type"`
	Title      string           `json:"title"`
	Datasource *datasourceRef   `json:"datasource"`
	Panels     []dashboardPanel `json:"panels"` // a collapsed row's
	Targets    []struct {
		RefID      string         `json:"refId"`
		Expr       string         `json:"expr"`
		Datasource *datasourceRef `json:"datasource"`
	} `json:"targets"`
}

type datasourceRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// dashboardVars are the values the test gives the dashboard's variables:
// every job and instance, and Grafana's rate interval as a minute (the
// test's Prometheus scrapes every second).
var dashboardVars = strings.NewReplacer("$__rate_interval", "1m", "$job", ".*", "$instance", ".*")

// TestMonitoringPrometheus: a real Prometheus, configured as
// docs/monitoring.md says, scrapes a real Caddy with the module, in the
// Caddyfile docs/monitoring.md gives, while deliveries are accepted,
// refused (forged, replayed, signed but wrong), spooled, and turned into a
// dead letter. Then every alert of alerts.yaml is loaded and healthy, and
// each of its selectors, and every panel of dashboard.json, gives series of
// metrics that Caddy exports. The alerts this traffic should set off are
// active, and the others are not. The dead letter is then listed, retried
// and deleted with the commands of the runbook.
func TestMonitoringPrometheus(t *testing.T) {
	deadline := time.Now().Add(50 * time.Second)
	promBin := lookTool(t, "prometheus")
	rules := readAlertRules(t)
	var dash dashboard
	raw, err := os.ReadFile(filepath.Join(testkit.Root(), dashboardFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}

	// Caddy, its global options as the documentation gives them.
	up, err := testkit.StartUpstream()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(up.Close)
	port, admin := freePort(t), freePort(t)
	adminAddr := fmt.Sprintf("127.0.0.1:%d", admin)
	global := testkit.Example(t, monitoringDoc, "monitoring-caddyfile")
	global = replaceIn(t, global, "localhost:2019", adminAddr)
	global = replaceIn(t, global, "{\n", "{\n\tpersist_config off\n")
	spoolDir := t.TempDir()
	caddyfile := global + fmt.Sprintf(`
http://127.0.0.1:%d {
	trivialsec_webhook /waits {
		account acme
		secret {env.TRIVIALSEC_WEBHOOK_SECRET}
		spool {
			store file %s
			backoff 10m 10m
		}
	}
	trivialsec_webhook /dies {
		account beta
		secret {env.TRIVIALSEC_WEBHOOK_SECRET}
		spool {
			store file %s
			backoff 100ms 200ms
			max_age 1s
		}
	}
	reverse_proxy %s
}
`, port, filepath.Join(spoolDir, "waits"), filepath.Join(spoolDir, "dies"), up.Addr)
	startServer(t, caddyfile, port, []string{"TRIVIALSEC_WEBHOOK_SECRET=" + secret})
	base := fmt.Sprintf("http://127.0.0.1:%d", port)

	// Prometheus, configured as the documentation says: the scrape target
	// is this Caddy's admin endpoint, the rules are alerts.yaml, and it
	// scrapes and evaluates every second.
	config := testkit.Example(t, monitoringDoc, "monitoring-prometheus-yml")
	config = replaceIn(t, config, `"localhost:2019"`, strconv.Quote(adminAddr))
	config = replaceIn(t, config, "15s", "1s")
	config = replaceIn(t, config, "/etc/prometheus/rules/trivialsec-webhook.yaml", filepath.Join(testkit.Root(), alertsFile))
	prom := startPrometheus(t, promBin, config, deadline)
	waitFor(t, deadline, "prometheus scrapes caddy", func() bool {
		n, err := prom.query(`caddy_trivialsec_webhook_spool_up == 1`)
		return err == nil && n == 1
	})

	// Deliveries: accepted, replayed, forged, signed but refused, spooled,
	// and spooled until they are dead letters.
	type delivery struct{ auth, body string }
	var accepted []delivery
	for range 3 {
		auth, body := mint(secret, "acme", uuid.NewString(), time.Now())
		if status := post(t, base+"/waits", auth, body); status != 200 {
			t.Fatalf("a genuine delivery: %d, want the upstream's 200", status)
		}
		accepted = append(accepted, delivery{auth, body})
	}
	for _, tc := range []struct {
		what, path, auth, body string
		want                   int
	}{
		{"a replay", "/waits", accepted[0].auth, accepted[0].body, 409},
		{"no token", "/waits", "", accepted[1].body, 403},
		{"a forged token", "/waits", func() string { a, _ := mint("not-the-secret", "acme", uuid.NewString(), time.Now()); return a }(), accepted[1].body, 403},
		{"another account's token", "/waits", func() string { a, _ := mint(secret, "other", uuid.NewString(), time.Now()); return a }(), accepted[1].body, 403},
	} {
		if status := post(t, base+tc.path, tc.auth, tc.body); status != tc.want {
			t.Fatalf("%s: %d, want %d", tc.what, status, tc.want)
		}
	}
	up.Down()
	auth, body := mint(secret, "acme", uuid.NewString(), time.Now())
	if status := post(t, base+"/waits", auth, body); status != 202 {
		t.Fatalf("with the upstream down: %d, want 202 (spooled)", status)
	}
	deadID := uuid.NewString()
	auth, body = mint(secret, "beta", deadID, time.Now())
	if status := post(t, base+"/dies", auth, body); status != 202 {
		t.Fatalf("with the upstream down: %d, want 202 (spooled)", status)
	}

	// Prometheus has seen the dead letter and the waiting delivery, and the
	// alerts this traffic sets off are active.
	waitFor(t, deadline, "prometheus sees one dead letter and one pending delivery", func() bool {
		dead, err1 := prom.query(`caddy_trivialsec_webhook_spool_entries{state="dead"} == 1`)
		pending, err2 := prom.query(`caddy_trivialsec_webhook_spool_entries{state="pending"} == 1 and on() caddy_trivialsec_webhook_spool_oldest_pending_seconds > 0`)
		return err1 == nil && err2 == nil && dead == 1 && pending == 1
	})
	wantActive := map[string]string{
		"TrivialsecWebhookDeadLetters":             "pending firing", // for 1m: pending, in this test's time
		"TrivialsecWebhookSignedDeliveriesRefused": "firing",         // the other account's token: bad_audience
	}
	var loaded []loadedRule
	waitFor(t, deadline, "the alerts this traffic sets off are active", func() bool {
		loaded, err = prom.rules()
		if err != nil {
			return false
		}
		active := 0
		for _, r := range loaded {
			if slices.Contains(strings.Fields(wantActive[r.Name]), r.State) {
				active++
			}
		}
		return active == len(wantActive)
	})

	// Every metric of the module is in docs/monitoring.md's table, and the
	// table has no other.
	exported := exportedMetrics(t, "http://"+adminAddr+"/metrics")
	doc, err := os.ReadFile(filepath.Join(testkit.Root(), monitoringDoc))
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| `(caddy_trivialsec_webhook_\\w+)` \\|").FindAllStringSubmatch(string(doc), -1) {
		documented[m[1]] = true
	}
	for name := range exported {
		if strings.HasPrefix(name, "caddy_trivialsec_webhook_") && !documented[name] {
			t.Errorf("%s: the metrics table lacks %s", monitoringDoc, name)
		}
	}
	for name := range documented {
		if !exported[name] {
			t.Errorf("%s: the metrics table lists %s, which Caddy does not export", monitoringDoc, name)
		}
	}

	// Every alert of alerts.yaml is loaded, healthy, and the only ones
	// active are those this traffic should set off.
	byName := map[string]loadedRule{}
	for _, r := range loaded {
		byName[r.Name] = r
	}
	if len(loaded) != len(rules) {
		t.Errorf("prometheus loaded %d rules, %s has %d alerts", len(loaded), alertsFile, len(rules))
	}
	for _, r := range rules {
		l, ok := byName[r.name]
		switch {
		case !ok:
			t.Errorf("%s: prometheus did not load it", r.name)
			continue
		case l.Type != "alerting" || l.Health != "ok":
			t.Errorf("%s: a %s rule, health %q: %s", r.name, l.Type, l.Health, l.LastError)
		case l.Annotations["summary"] == "" || l.Annotations["description"] == "" || l.Annotations["runbook_url"] != r.runbook:
			t.Errorf("%s: annotations %v", r.name, l.Annotations)
		}
		if want := cmp.Or(wantActive[r.name], "inactive"); !slices.Contains(strings.Fields(want), l.State) {
			t.Errorf("%s is %s, want %s, in this test", r.name, l.State, want)
		}
		checkExpr(t, prom, exported, "alert "+r.name, r.expr, false)
	}

	// Every panel of the dashboard gives series, of metrics Caddy exports.
	panels, exprs := 0, 0
	var walk func([]dashboardPanel)
	walk = func(ps []dashboardPanel) {
		for _, p := range ps {
			if p.Type == "row" {
				walk(p.Panels)
				continue
			}
			panels++
			what := fmt.Sprintf("panel %d %q", p.ID, p.Title)
			if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
				t.Errorf("%s: its datasource is not the ${datasource} variable", what)
			}
			if len(p.Targets) == 0 {
				t.Errorf("%s has no query", what)
			}
			for _, tg := range p.Targets {
				exprs++
				if tg.Datasource != nil && tg.Datasource.UID != "${datasource}" {
					t.Errorf("%s, query %s: its datasource is not the ${datasource} variable", what, tg.RefID)
				}
				checkExpr(t, prom, exported, what+" query "+tg.RefID, tg.Expr, true)
			}
		}
	}
	walk(dash.Panels)
	labelValues := regexp.MustCompile(`^label_values\((.+),\s*(\w+)\)$`)
	for _, v := range dash.Templating.List {
		if v.Type != "query" {
			continue
		}
		q, _ := v.Query.(string)
		if m, ok := v.Query.(map[string]any); ok {
			q, _ = m["query"].(string)
		}
		m := labelValues.FindStringSubmatch(q)
		if m == nil {
			t.Errorf("variable %s: %q is not label_values(<selector>, <label>)", v.Name, q)
			continue
		}
		checkExpr(t, prom, exported, "variable "+v.Name, fmt.Sprintf("count by (%s) (%s)", m[2], m[1]), true)
	}
	t.Logf("%d alerts and %d panels (%d queries) checked in a real Prometheus", len(rules), panels, exprs)

	// The runbook's commands list, retry and delete the dead letter.
	for _, line := range strings.Split(strings.TrimSpace(testkit.Example(t, monitoringDoc, "monitoring-dead-letters")), "\n") {
		args := strings.Fields(strings.ReplaceAll(line, "<event_id>", deadID))
		if len(args) < 4 || args[0] != "caddy" || args[1] != "trivialsec-webhook" || args[2] != "spool" {
			t.Fatalf("%s: %q is not `caddy trivialsec-webhook spool ...`", monitoringDoc, line)
		}
		var before *spoolEntry
		if args[3] == "retry" {
			before = deadLetter(t, "http://"+adminAddr+"/trivialsec_webhook/spool", deadID)
		}
		code, out, errOut := run(t, nil, append(args[1:], "--address", adminAddr)...)
		if code != 0 {
			t.Fatalf("%s: exit %d, stdout %q, stderr %q", line, code, out, errOut)
		}
		switch args[3] {
		case "list":
			if !regexp.MustCompile(`(?m)^` + deadID + ` +\S+ +\S+ +dead +`).MatchString(out) {
				t.Fatalf("%s: the dead letter is not listed as dead:\n%s", line, out)
			}
		case "retry":
			// Retried at once, it fails again (the upstream is down) and
			// is a dead letter again, past its max_age.
			waitFor(t, deadline, "the retried dead letter is tried again", func() bool {
				e := deadLetter(t, "http://"+adminAddr+"/trivialsec_webhook/spool", deadID)
				return e != nil && e.State == "dead" && e.Attempts > before.Attempts
			})
		case "delete":
			if e := deadLetter(t, "http://"+adminAddr+"/trivialsec_webhook/spool", deadID); e != nil {
				t.Fatalf("%s: still listed: %+v", line, e)
			}
		default:
			t.Fatalf("%s: command %s", line, args[3])
		}
	}
	if time.Now().After(deadline) {
		t.Errorf("the test took longer than its bound")
	}
}

// checkExpr evaluates expr in Prometheus. Each of its selectors must name a
// metric Caddy exports and give at least one series; with whole, the
// expression itself must too (an alert's gives none while it does not
// fire).
func checkExpr(t *testing.T, prom *prometheus, exported map[string]bool, what, expr string, whole bool) {
	t.Helper()
	expr = dashboardVars.Replace(expr)
	if strings.Contains(expr, "$") {
		t.Errorf("%s: %s: a variable the test does not know", what, expr)
		return
	}
	selectors, names := promSelectors(expr)
	if len(selectors) == 0 {
		t.Errorf("%s: %s: no metric", what, expr)
	}
	for i, sel := range selectors {
		if names[i] == "" {
			t.Errorf("%s: selector %s: name the metric", what, sel)
			continue
		}
		if !exported[names[i]] {
			t.Errorf("%s: %s is no metric Caddy exports", what, names[i])
			continue
		}
		if n, err := prom.query(sel); err != nil || n == 0 {
			t.Errorf("%s: %s gives no series (%v)", what, sel, err)
		}
	}
	n, err := prom.query(expr)
	switch {
	case err != nil:
		t.Errorf("%s: %s: %v", what, expr, err)
	case whole && n == 0:
		t.Errorf("%s: %s gives no series", what, expr)
	}
}

// spoolEntry is one entry of the admin API's spool listing.
type spoolEntry struct {
	EventID  string `json:"event_id"`
	State    string `json:"state"`
	Attempts int    `json:"attempts"`
}

// deadLetter lists the spool at listing, and returns the entry of id, or nil.
func deadLetter(t *testing.T, listing, id string) *spoolEntry {
	t.Helper()
	resp, err := sender.Get(listing)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var page struct{ Entries []spoolEntry }
	if err := json.NewDecoder(resp.Body).Decode(&page); err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d %v", listing, resp.StatusCode, err)
	}
	for _, e := range page.Entries {
		if e.EventID == id {
			return &e
		}
	}
	return nil
}

// replaceIn replaces old in s, which must hold it: an example whose text
// changed fails the test that adapts it.
func replaceIn(t *testing.T, s, old, replacement string) string {
	t.Helper()
	if !strings.Contains(s, old) {
		t.Fatalf("%s: the example no longer holds %q:\n%s", monitoringDoc, old, s)
	}
	return strings.ReplaceAll(s, old, replacement)
}

// waitFor polls ok every 100 ms until deadline.
func waitFor(t *testing.T, deadline time.Time, what string, ok func() bool) {
	t.Helper()
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("not so in time: %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
