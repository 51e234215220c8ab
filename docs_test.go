package trivialsecwebhook

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/google/uuid"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// The documentation's examples are run by tests, each found by the name on
// the `<!-- example: NAME -->` line above its code block (testkit.Example).
// Blocks of sample output (```text) are the only ones without a name.

// TestDocExamplesAreTested: every code block but sample output has a name,
// no two share one, and a test fetches each by its page and name
// (testkit.Example): an example no test runs can go stale.
func TestDocExamplesAreTested(t *testing.T) {
	tests := testSources(t)
	pages, err := testkit.DocPages()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]string{}
	for _, page := range pages {
		blocks, err := testkit.DocBlocks(page)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range blocks {
			where := fmt.Sprintf("%s:%d", b.Page, b.Line)
			switch {
			case b.Lang == "text":
				continue
			case b.Example == "":
				t.Errorf("%s: a ```%s block without an `<!-- example: NAME -->` line above it: name it, and run it in a test", where, b.Lang)
				continue
			case seen[b.Example] != "":
				t.Errorf("%s: example %q is also at %s", where, b.Example, seen[b.Example])
			}
			seen[b.Example] = where
			if !slices.ContainsFunc(tests, func(src string) bool { return fetches(src, b.Page, b.Example) }) {
				t.Errorf("%s: no test runs example %q (testkit.Example(t, %q, %q))", where, b.Example, b.Page, b.Example)
			}
		}
	}
}

// fetches reports whether a test file fetches an example:
// testkit.Example(t, "<page>", "<name>"), or with a constant the file sets
// to the page, or {"<page>", "<name>"} in a table of examples it fetches.
func fetches(src, page, name string) bool {
	if strings.Contains(src, fmt.Sprintf("{%q, %q}", page, name)) && strings.Contains(src, "testkit.Example(t, ex.page, ex.name)") {
		return true
	}
	call := regexp.MustCompile(`testkit\.Example\(t, ("[^"]*"|\w+), ` + regexp.QuoteMeta(strconv.Quote(name)) + `\)`)
	for _, m := range call.FindAllStringSubmatch(src, -1) {
		if m[1] == strconv.Quote(page) || regexp.MustCompile(`\b`+m[1]+`\s*=\s*`+regexp.QuoteMeta(strconv.Quote(page))).MatchString(src) {
			return true
		}
	}
	return false
}

// testSources is the text of each test file of the repository.
func testSources(t *testing.T) []string {
	var all []string
	err := filepath.WalkDir(testkit.Root(), func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, "_test.go") {
			return err
		}
		raw, err := os.ReadFile(path)
		all = append(all, string(raw))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return all
}

// docLink is a Markdown link to a relative path, with an optional anchor.
var docLink = regexp.MustCompile(`\]\(([^)#\s]*)(#[^)\s]*)?\)`)

// TestDocLinks: every relative link of the documentation names a file of
// the repository, and every anchor a heading of its page.
func TestDocLinks(t *testing.T) {
	pages, err := testkit.DocPages()
	if err != nil {
		t.Fatal(err)
	}
	pages = append(pages, "SECURITY.md", "CONTRIBUTING.md", "BENCHMARKS.md")
	for _, page := range pages {
		raw, err := os.ReadFile(filepath.Join(testkit.Root(), page))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range docLink.FindAllStringSubmatch(string(raw), -1) {
			target, anchor := m[1], strings.TrimPrefix(m[2], "#")
			if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
				continue
			}
			file := page
			if target != "" {
				file = filepath.ToSlash(filepath.Join(filepath.Dir(page), target))
			}
			info, err := os.Stat(filepath.Join(testkit.Root(), file))
			if err != nil {
				t.Errorf("%s: a link to %s, which is not there", page, target)
				continue
			}
			if anchor == "" || info.IsDir() {
				continue
			}
			if anchors, err := testkit.HeadingAnchors(file); err != nil || !anchors[anchor] {
				t.Errorf("%s: a link to %s#%s, which has no such heading", page, file, anchor)
			}
		}
	}
}

// TestDocSyntaxMatchesParser: the Caddyfile syntax the README and the
// configuration page show names every subdirective and spool setting the
// parser takes, and nothing else.
func TestDocSyntaxMatchesParser(t *testing.T) {
	src, err := os.ReadFile("caddyfile.go")
	if err != nil {
		t.Fatal(err)
	}
	// The names of the cases that take a setting: not the one that
	// answers a wrong argument count for all of them.
	parsed := map[string]bool{}
	name := regexp.MustCompile(`(?:case |sub == )"([a-z_]+)"`)
	lines := strings.Split(string(src), "\n")
	for i, line := range lines {
		if !strings.HasPrefix(strings.TrimSpace(line), "case ") || i+1 < len(lines) && strings.Contains(lines[i+1], "d.ArgErr()") {
			continue
		}
		for _, m := range name.FindAllStringSubmatch(line, -1) {
			parsed[m[1]] = true
		}
	}
	for _, ex := range []struct{ page, name string }{
		{"README.md", "syntax-caddyfile"},
		{"docs/configuration.md", "configuration-syntax"},
	} {
		shown := map[string]bool{}
		for _, line := range strings.Split(testkit.Example(t, ex.page, ex.name), "\n")[1:] {
			if f := strings.Fields(line); len(f) > 0 && f[0] != "}" {
				shown[f[0]] = true
			}
		}
		for word := range parsed {
			if !shown[word] && word != "file" && word != "redis" && word != "off" && word != "memory" {
				t.Errorf("%s (%s): the parser takes %q, which the syntax does not show", ex.page, ex.name, word)
			}
		}
		for word := range shown {
			if !parsed[word] {
				t.Errorf("%s (%s): the syntax shows %q, which the parser does not take", ex.page, ex.name, word)
			}
		}
	}
}

// TestDocJSONExamples: the JSON examples are handlers Caddy provisions as
// they are written.
func TestDocJSONExamples(t *testing.T) {
	t.Setenv("TRIVIALSEC_WEBHOOK_SECRET", testSecret)
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	for _, ex := range []struct{ page, name string }{
		{"README.md", "json"},
		{"docs/configuration.md", "configuration-json"},
	} {
		handler := testkit.Example(t, ex.page, ex.name)
		handler = strings.ReplaceAll(handler, "/var/lib/caddy/trivialsec_webhook/spool", filepath.Join(t.TempDir(), "spool"))
		cfg := fmt.Sprintf(`{"admin": {"disabled": true}, "apps": {"http": {"servers": {"s": {"listen": ["127.0.0.1:%d"],
			"routes": [{"handle": [%s]}]}}}}}`, freePort(t), handler)
		if !json.Valid([]byte(cfg)) {
			t.Fatalf("%s (%s) is not JSON", ex.page, ex.name)
		}
		if err := caddy.Validate(mustConfig(t, cfg)); err != nil {
			t.Errorf("%s (%s): %v", ex.page, ex.name, err)
		}
	}
}

func mustConfig(t *testing.T, raw string) *caddy.Config {
	t.Helper()
	var cfg caddy.Config
	if err := json.Unmarshal([]byte(raw), &cfg); err != nil {
		t.Fatal(err)
	}
	return &cfg
}

// docSnippets are the Caddyfile examples that configure, without showing
// a behaviour of their own: each must adapt and provision as it is
// written, in a site on loopback (a global options block, before one).
// Redis URLs name a Redis of the test's own.
var docSnippets = []struct{ page, name string }{
	{"docs/spool.md", "spool-idempotent"},
	{"docs/several-instances.md", "instances-redis"},
	{"docs/checks.md", "checks-read-body-timeout"},
	{"docs/backlog.md", "backlog-pace"},
}

func TestDocCaddyfileSnippets(t *testing.T) {
	srv := testredis.Start(t)
	t.Setenv("REDIS_URL", srv.URL())
	t.Setenv("TRIVIALSEC_WEBHOOK_SECRET", testSecret)
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	for _, ex := range docSnippets {
		t.Run(ex.name, func(t *testing.T) {
			snippet := testkit.Example(t, ex.page, ex.name)
			site := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
			var caddyfile string
			switch first := strings.Fields(snippet)[0]; {
			case first == "{":
				caddyfile = snippet + "\n" + site + " {\n\trespond 200\n}\n"
			case strings.HasSuffix(strings.TrimSpace(strings.SplitN(snippet, "\n", 2)[0]), "{") && strings.Contains(first, "."):
				caddyfile = site + snippet[strings.Index(snippet, " {"):]
			default:
				caddyfile = site + " {\n\t" + strings.ReplaceAll(strings.TrimSuffix(snippet, "\n"), "\n", "\n\t") + "\n}\n"
			}
			cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
			if err != nil {
				t.Fatalf("adapt: %v\n%s", err, caddyfile)
			}
			for _, w := range warnings {
				t.Errorf("adapt: %s:%d: %s", w.File, w.Line, w.Message)
			}
			var c caddy.Config
			if err := json.Unmarshal(cfg, &c); err != nil {
				t.Fatal(err)
			}
			if err := caddy.Validate(&c); err != nil {
				t.Errorf("validate: %v\n%s", err, caddyfile)
			}
		})
	}
}

// TestReadmeRouteByEvent runs the README's routing example as it is
// written: findings go to one service, every other event to another.
func TestReadmeRouteByEvent(t *testing.T) {
	example := testkit.Example(t, "README.md", "route-by-event")
	var findings, others atomic.Int64
	up := func(n *atomic.Int64) string {
		addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
		srv := &http.Server{Addr: addr, Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { n.Add(1) }), ReadHeaderTimeout: time.Second}
		go func() { _ = srv.ListenAndServe() }()
		t.Cleanup(func() { _ = srv.Close() })
		return addr
	}
	example = strings.ReplaceAll(example, "127.0.0.1:9001", up(&findings))
	example = strings.ReplaceAll(example, "127.0.0.1:9000", up(&others))
	example = strings.Replace(example, "secret {env.TRIVIALSEC_WEBHOOK_SECRET}\n", "secret {env.TRIVIALSEC_WEBHOOK_SECRET}\n\t\tspool off\n", 1)
	t.Setenv("TRIVIALSEC_WEBHOOK_SECRET", testSecret)
	port := freePort(t)
	loadCaddyfile(t, fmt.Sprintf("{\n\tadmin off\n\tpersist_config off\n}\n\nhttp://127.0.0.1:%d {\n%s}\n", port, example))
	time.Sleep(100 * time.Millisecond) // the upstreams' listeners
	for _, name := range []string{"new_findings_domains", "report_created", "new_findings_certificates"} {
		d := productionDelivery().withEventID(uuid.NewString())
		d.name, d.claims["evn"] = name, name
		d = d.at(time.Now())
		resp := post(t, fmt.Sprintf("http://127.0.0.1:%d/webhook/trivialsec", port), d.authorization(), strings.NewReader(d.body()))
		if body := readAll(t, resp.Body); resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %d %s", name, resp.StatusCode, body)
		}
	}
	if findings.Load() != 2 || others.Load() != 1 {
		t.Errorf("findings went to the findings service %d times (want 2), others %d (want 1)", findings.Load(), others.Load())
	}
}
