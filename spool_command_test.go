package trivialsecwebhook

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
)

// fakeAdmin is Caddy's admin endpoint, as the spool commands see it: it
// records each request and answers as the test says.
type fakeAdmin struct {
	*httptest.Server
	mu       sync.Mutex
	requests []*http.Request
	answer   func(r *http.Request) (status int, body string)
}

func startFakeAdmin(t *testing.T, answer func(r *http.Request) (int, string)) *fakeAdmin {
	t.Helper()
	f := &fakeAdmin{answer: answer}
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		f.requests = append(f.requests, r.Clone(r.Context()))
		f.mu.Unlock()
		status, body := f.answer(r)
		if body != "" {
			w.Header().Set("Content-Type", "application/json")
		}
		w.WriteHeader(status)
		fmt.Fprint(w, body)
	}))
	t.Cleanup(f.Close)
	return f
}

// address is the fake's host:port, as --address takes it.
func (f *fakeAdmin) address() string { return f.Listener.Addr().String() }

func (f *fakeAdmin) asked() []*http.Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*http.Request(nil), f.requests...)
}

// exitCode is the status Caddy's Main exits with on err: the ExitCode of
// caddycmd's exitError if err holds one, else 1 for an error, 0 for none.
func exitCode(err error) int {
	if err == nil {
		return 0
	}
	code := 1
	var walk func(error)
	walk = func(e error) {
		if e == nil {
			return
		}
		if v := reflect.ValueOf(e); v.Kind() == reflect.Pointer && v.Elem().Kind() == reflect.Struct &&
			v.Elem().Type().Name() == "exitError" && v.Elem().Type().PkgPath() == "github.com/caddyserver/caddy/v2/cmd" {
			code = int(v.Elem().FieldByName("ExitCode").Int())
			return
		}
		switch u := e.(type) {
		case interface{ Unwrap() error }:
			walk(u.Unwrap())
		case interface{ Unwrap() []error }:
			for _, e := range u.Unwrap() {
				walk(e)
			}
		}
	}
	walk(err)
	return code
}

// spoolCommand runs `caddy trivialsec-webhook spool <args...>` against the
// fake, with --address added, and returns stdout, stderr and the exit
// status.
func spoolCommand(t *testing.T, admin *fakeAdmin, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	args = append([]string{"trivialsec-webhook", "spool"}, args...)
	if admin != nil {
		args = append(args, "--address", admin.address())
	}
	stdout, stderr, err := runCommand(t, args...)
	return stdout, stderr, exitCode(err)
}

const (
	spoolID1 = "0b5e2f4a-9c1d-4e8f-a3b2-7d6c5e4f3a21"
	spoolID2 = "1c6f3a5b-ad2e-4f90-b4c3-8e7d6f5a4b32"
)

// TestSpoolCommandUsageMistakes: a usage mistake is one line on stderr,
// with where the usage is, exit status 2, and no request to Caddy.
func TestSpoolCommandUsageMistakes(t *testing.T) {
	admin := startFakeAdmin(t, func(*http.Request) (int, string) { return 200, `{"total":0,"entries":[]}` })
	for _, tc := range []struct {
		args []string
		want string // the line on stderr, after "caddy trivialsec-webhook spool "
	}{
		{[]string{"list", "--bogus"}, `list: unknown flag: --bogus`},
		{[]string{"list", "stray"}, `list: unexpected argument "stray": list takes flags only`},
		{[]string{"summary", "--state", "dead"}, `summary: unknown flag: --state`},
		{[]string{"list", "--state", "pending,gone"}, `list: --state "gone": use pending, parked or dead`},
		{[]string{"list", "--state", "pending,"}, `list: --state "": use pending, parked or dead`},
		{[]string{"list", "--event-name", "report_updated"}, `list: --event-name "report_updated": use one of ` + strings.Join(eventNames[:], ", ")},
		{[]string{"list", "--spooled-after", "yesterday"}, `list: --spooled-after "yesterday": give an RFC 3339 time, such as 2026-11-30T12:00:00Z, or how long ago, such as 90m`},
		{[]string{"list", "--spooled-before", "-1h"}, `list: --spooled-before "-1h": give an RFC 3339 time, such as 2026-11-30T12:00:00Z, or how long ago, such as 90m`},
		{[]string{"delete", "--state", "", "--event-name", "client_activity"}, `delete: --state is empty: give a value, or leave it out`},
		{[]string{"delete", "--event-name", "", "--spooled-before", "24h"}, `delete: --event-name is empty: give a value, or leave it out`},
		{[]string{"retry", "--spooled-after", "", "--state", "dead"}, `retry: --spooled-after is empty: give a value, or leave it out`},
		{[]string{"list", "--limit", "0"}, `list: --limit 0: use a number from 1 to 1000`},
		{[]string{"list", "--limit", "1001"}, `list: --limit 1001: use a number from 1 to 1000`},
		{[]string{"list", "--limit", "many"}, `list: invalid argument "many" for "--limit" flag: strconv.ParseInt: parsing "many": invalid syntax`},
		{[]string{"retry"}, `retry: retry what? give event IDs, filters (--state, --event-name, --account, --spooled-after, --spooled-before), or --all for every entry`},
		{[]string{"delete"}, `delete: delete what? give event IDs, filters (--state, --event-name, --account, --spooled-after, --spooled-before), or --all for every entry`},
		{[]string{"delete", "--json"}, `delete: delete what? give event IDs, filters (--state, --event-name, --account, --spooled-after, --spooled-before), or --all for every entry`},
		{[]string{"delete", spoolID1, "--state", "dead"}, `delete: event IDs and filters together: give the event IDs, or the filters`},
		{[]string{"retry", spoolID1, "--all"}, `retry: event IDs and --all together: give the event IDs, or --all`},
		{[]string{"delete", "--all", "--event-name", "report_created"}, `delete: --all and filters together: --all selects every entry; give the filters, or --all`},
		{[]string{"delete", spoolID1, "42"}, `delete: "42" is not an event ID: give event IDs, such as 6ba7b810-9dad-11d1-80b4-00c04fd430c8, or filters`},
		{[]string{"retry", "--limit", "5", "--state", "dead"}, `retry: unknown flag: --limit`},
		{[]string{"list", "--address", "localhost:2019-2020"}, `list: admin address "localhost:2019-2020": give one like localhost:2019 or unix//run/caddy-admin.sock`},
		{[]string{"list", "--config", "/nonexistent/caddy.json"}, `list: cannot read the admin address from --config: reading config from file: open /nonexistent/caddy.json: no such file or directory`},
	} {
		t.Run(strings.Join(tc.args, "_"), func(t *testing.T) {
			args := append([]string{"trivialsec-webhook", "spool"}, tc.args...)
			if !strings.Contains(strings.Join(tc.args, " "), "--address") && !strings.Contains(strings.Join(tc.args, " "), "--config") {
				args = append(args, "--address", admin.address())
			}
			stdout, stderr, err := runCommand(t, args...)
			cmd := "caddy trivialsec-webhook spool " + tc.args[0]
			want := "caddy trivialsec-webhook spool " + tc.want + ` (see "` + cmd + ` --help")` + "\n"
			if code := exitCode(err); code != exitUsage {
				t.Errorf("exit status %d, want %d", code, exitUsage)
			}
			if stderr != want || stdout != "" {
				t.Errorf("stderr %q\nwant   %q\nstdout %q", stderr, want, stdout)
			}
			if n := len(admin.asked()); n > 0 {
				t.Errorf("%d requests to the admin API", n)
			}
		})
	}
}

// TestSpoolCommandRequests: the flags become the admin API's request:
// method, path, query, and the Origin header Caddy's admin endpoint asks
// of a request from the command line.
func TestSpoolCommandRequests(t *testing.T) {
	now := time.Now()
	hourAgo := now.Add(-time.Hour)
	for _, tc := range []struct {
		args   []string
		method string
		path   string
		query  url.Values
	}{
		{[]string{"list"}, "GET", "/trivialsec_webhook/spool", url.Values{}},
		{[]string{"list", "--state", "pending,dead", "--state", "parked", "--state", "dead", "--event-name", "report_created",
			"--spooled-before", "2026-11-30T13:00:00+01:00", "--limit", "5", "--next", "AAABk"},
			"GET", "/trivialsec_webhook/spool", url.Values{"state": {"pending", "dead", "parked"}, "event_name": {"report_created"},
				"spooled_before": {"2026-11-30T12:00:00Z"}, "limit": {"5"}, "next": {"AAABk"}}},
		{[]string{"list", "--spooled-after", "1h"}, "GET", "/trivialsec_webhook/spool", url.Values{"spooled_after": {"1h ago"}}},
		{[]string{"summary"}, "GET", "/trivialsec_webhook/spool/summary", url.Values{}},
		{[]string{"retry", "--state", "dead", "--spooled-after", "2026-11-30T12:00:00.5Z"}, "POST", "/trivialsec_webhook/spool/retry",
			url.Values{"state": {"dead"}, "spooled_after": {"2026-11-30T12:00:00.5Z"}}},
		{[]string{"retry", "--all"}, "POST", "/trivialsec_webhook/spool/retry", url.Values{"all": {"true"}}},
		{[]string{"delete", "--event-name", "client_activity"}, "POST", "/trivialsec_webhook/spool/delete", url.Values{"event_name": {"client_activity"}}},
		{[]string{"delete", "--state", "parked", "--account", "acme"}, "POST", "/trivialsec_webhook/spool/delete", url.Values{"state": {"parked"}, "account": {"acme"}}},
		{[]string{"delete", "--all"}, "POST", "/trivialsec_webhook/spool/delete", url.Values{"all": {"true"}}},
		{[]string{"retry", "urn:uuid:" + strings.ToUpper(spoolID1)}, "POST", "/trivialsec_webhook/spool/" + spoolID1 + "/retry", url.Values{}},
		{[]string{"delete", spoolID1}, "DELETE", "/trivialsec_webhook/spool/" + spoolID1, url.Values{}},
	} {
		t.Run(strings.Join(tc.args, "_"), func(t *testing.T) {
			admin := startFakeAdmin(t, func(r *http.Request) (int, string) {
				switch {
				case r.Method == "DELETE":
					return 204, ""
				case strings.HasSuffix(r.URL.Path, "/summary"):
					return 200, `{"states":{},"events":{},"oldest_pending_seconds":0,"breakers":[]}`
				case r.Method == "POST" && strings.Count(r.URL.Path, "/") == 4:
					return 202, ""
				case r.Method == "POST":
					return 200, `{"matched":0,"acted":0}`
				}
				return 200, `{"total":0,"entries":[]}`
			})
			_, stderr, code := spoolCommand(t, admin, tc.args...)
			if code != 0 || stderr != "" {
				t.Fatalf("exit status %d, stderr %q", code, stderr)
			}
			asked := admin.asked()
			if len(asked) != 1 {
				t.Fatalf("%d requests, want 1", len(asked))
			}
			r := asked[0]
			query := r.URL.Query()
			if want := tc.query.Get("spooled_after"); want == "1h ago" {
				at, err := time.Parse(time.RFC3339Nano, query.Get("spooled_after"))
				if err != nil || at.Location() != time.UTC || at.Before(hourAgo.Truncate(time.Second)) || at.After(time.Now().Add(-time.Hour)) {
					t.Errorf("spooled_after %q, want an hour ago, in UTC (%v)", query.Get("spooled_after"), err)
				}
				query.Del("spooled_after")
				tc.query.Del("spooled_after")
			}
			if r.Method != tc.method || r.URL.Path != tc.path || !reflect.DeepEqual(query, tc.query) {
				t.Errorf("%s %s %v, want %s %s %v", r.Method, r.URL.Path, query, tc.method, tc.path, tc.query)
			}
			if origin := r.Header.Get("Origin"); origin != "http://"+admin.address() {
				t.Errorf("Origin %q", origin)
			}
		})
	}
}

// TestSpoolTime: --spooled-after and --spooled-before, RFC 3339 or that
// long ago, in UTC.
func TestSpoolTime(t *testing.T) {
	for in, want := range map[string]string{
		"1h":                        "2026-11-28T17:33:38.032435Z",
		"0s":                        "2026-11-28T18:33:38.032435Z",
		"36h30m":                    "2026-11-27T06:03:38.032435Z",
		"2026-11-30T12:00:00Z":      "2026-11-30T12:00:00Z",
		"2026-11-30T12:00:00-05:00": "2026-11-30T17:00:00Z",
		"2026-11-30T12:00:00.25Z":   "2026-11-30T12:00:00.25Z",
	} {
		if got, err := spoolTime("spooled-after", in, testNow); err != nil || got != want {
			t.Errorf("%s: %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"-1h", "1d", "2026-11-30", "now", "2026-11-30 12:00:00Z"} {
		if got, err := spoolTime("spooled-after", in, testNow); err == nil {
			t.Errorf("%s: %q, want an error", in, got)
		}
	}
}

// TestSpoolCommandConfig: without --address, the admin address is the
// config's (--config), as caddy reload reads it.
func TestSpoolCommandConfig(t *testing.T) {
	admin := startFakeAdmin(t, func(*http.Request) (int, string) { return 200, `{"total":0,"entries":[]}` })
	config := filepath.Join(t.TempDir(), "caddy.json")
	if err := os.WriteFile(config, []byte(`{"admin": {"listen": "`+admin.address()+`"}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err := runCommand(t, "trivialsec-webhook", "spool", "list", "--config", config)
	if err != nil || stdout != "no entries\n" || len(admin.asked()) != 1 {
		t.Errorf("%v, stdout %q, stderr %q, %d requests", err, stdout, stderr, len(admin.asked()))
	}
}

// listingJSON is a page of the listing, as the admin API writes it.
func listingJSON(total int, next string, entries ...string) string {
	page := fmt.Sprintf(`{"total":%d,"entries":[%s]`, total, strings.Join(entries, ","))
	if next != "" {
		page += `,"next":"` + next + `"`
	}
	return page + "}\n"
}

var (
	pendingEntry = `{"event_id":"` + spoolID1 + `","event_name":"report_created","account":"acme","state":"pending","attempts":3,` +
		`"spooled_at":"2026-11-28T18:33:38.032Z","next_attempt":"2026-11-28T19:00:00.999Z",` +
		`"last_error":"dial tcp 127.0.0.1:9000: connect: connection refused\nafter 3 attempts, with a long tail that is cut","size":1234}`
	deadEntry = `{"event_id":"` + spoolID2 + `","event_name":"client_activity","account":"acme","state":"dead","attempts":1,` +
		`"spooled_at":"2026-11-28T18:40:00.000Z","last_error":"422","size":99}`
)

// TestSpoolCommandList: the listing as a table, with how many of how many
// and the next page; as the API's JSON, byte for byte; every page.
func TestSpoolCommandList(t *testing.T) {
	table := "" +
		"EVENT ID                              EVENT            ACCOUNT  STATE    ATTEMPTS  SPOOLED               NEXT ATTEMPT          LAST ERROR\n" +
		spoolID1 + "  report_created   acme     pending  3         2026-11-28T18:33:38Z  2026-11-28T19:00:00Z  dial tcp 127.0.0.1:9000: connect: connection refused after…\n" +
		spoolID2 + "  client_activity  acme     dead     1         2026-11-28T18:40:00Z  -                     422\n"
	firstPage := listingJSON(4321, "AAABk", pendingEntry, deadEntry)
	for _, tc := range []struct {
		name   string
		args   []string
		pages  map[string]string // by the next parameter
		stdout string
	}{
		{"first_page", []string{"list"}, map[string]string{"": firstPage},
			table + "2 of 4,321 entries; next page: --next AAABk\n"},
		{"last_page", []string{"list", "--next", "AAABk"}, map[string]string{"AAABk": listingJSON(4321, "", pendingEntry, deadEntry)},
			table + "2 of 4,321 entries, the last page\n"},
		{"every_entry", []string{"list"}, map[string]string{"": listingJSON(2, "", pendingEntry, deadEntry)},
			table + "2 entries\n"},
		{"one_entry", []string{"list"}, map[string]string{"": listingJSON(1, "", deadEntry)},
			"EVENT ID                              EVENT            ACCOUNT  STATE  ATTEMPTS  SPOOLED               NEXT ATTEMPT  LAST ERROR\n" +
				spoolID2 + "  client_activity  acme     dead   1         2026-11-28T18:40:00Z  -             422\n1 entry\n"},
		{"none", []string{"list", "--state", "dead"}, map[string]string{"": listingJSON(0, "")}, "no entries\n"},
		{"json", []string{"list", "--json"}, map[string]string{"": firstPage}, firstPage},
		{"all_pages", []string{"list", "--all-pages"}, map[string]string{
			"": listingJSON(2, "AAABk", pendingEntry), "AAABk": listingJSON(2, "", deadEntry)},
			table + "2 entries\n"},
		{"all_pages_json", []string{"list", "--all-pages", "--json", "--limit", "1"}, map[string]string{
			"": listingJSON(3, "AAABk", pendingEntry), "AAABk": listingJSON(2, "", deadEntry)},
			`{"total":3,"entries":[` + pendingEntry + "," + deadEntry + "]}\n"},
		{"all_pages_json_none", []string{"list", "--all-pages", "--json"}, map[string]string{"": listingJSON(0, "")},
			`{"total":0,"entries":[]}` + "\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			admin := startFakeAdmin(t, func(r *http.Request) (int, string) {
				page, ok := tc.pages[r.URL.Query().Get("next")]
				if !ok {
					return 400, `{"error":"next: not a cursor this API gave; leave it out to start from the first entry"}`
				}
				return 200, page
			})
			stdout, stderr, code := spoolCommand(t, admin, tc.args...)
			if code != 0 || stderr != "" || stdout != tc.stdout {
				t.Errorf("exit status %d, stderr %q, stdout:\n%s\nwant:\n%s", code, stderr, stdout, tc.stdout)
			}
			if n := len(admin.asked()); n != len(tc.pages) {
				t.Errorf("%d requests, want %d", n, len(tc.pages))
			}
			// Every page is 1000 entries with --all-pages, unless --limit
			// says otherwise.
			args := strings.Join(tc.args, " ")
			for _, r := range admin.asked() {
				want := ""
				switch {
				case strings.Contains(args, "--limit 1"):
					want = "1"
				case strings.Contains(args, "--all-pages"):
					want = "1000"
				}
				if got := r.URL.Query().Get("limit"); got != want {
					t.Errorf("limit %q, want %q", got, want)
				}
			}
		})
	}
}

// TestSpoolCommandSummary: the summary as tables, and as the API's JSON.
func TestSpoolCommandSummary(t *testing.T) {
	answer := `{"states":{"dead":{"entries":1,"bytes":99},"parked":{"entries":0,"bytes":0},"pending":{"entries":4321,"bytes":5400000}},` +
		`"events":{"report_created":{"pending":{"entries":4320,"bytes":5399990},"dead":{"entries":1,"bytes":99}},` +
		`"client_activity":{"pending":{"entries":1,"bytes":10}}},` +
		`"oldest_pending":"2026-11-28T17:33:38.032Z","oldest_pending_seconds":3723.4,"next_attempt":"2026-11-28T18:34:00.000Z",` +
		`"breakers":[{"account":"acme","server":":443","state":"open","failures":5,"next_probe":"2026-11-28T18:35:00.5Z"}]}` + "\n"
	want := "" +
		"STATE    ENTRIES  SIZE\n" +
		"pending  4,321    5.1 MiB\n" +
		"parked   0        0 B\n" +
		"dead     1        99 B\n" +
		"\n" +
		"EVENT            PENDING  PARKED  DEAD\n" +
		"client_activity  1        0       0\n" +
		"report_created   4,320    0       1\n" +
		"\n" +
		"oldest pending: 2026-11-28T17:33:38Z, 1h2m3s ago\n" +
		"next attempt:   2026-11-28T18:34:00Z, in 22s\n" +
		"\n" +
		"ACCOUNT  SERVER  BREAKER  FAILURES  NEXT PROBE\n" +
		"acme     :443    open     5         2026-11-28T18:35:00Z\n"
	admin := startFakeAdmin(t, func(*http.Request) (int, string) { return 200, answer })
	stdout, stderr, code := spoolCommand(t, admin, "summary", "--json")
	if code != 0 || stderr != "" || stdout != answer {
		t.Errorf("--json: exit status %d, stderr %q, stdout %q", code, stderr, stdout)
	}
	var s summaryAnswer
	if err := json.Unmarshal([]byte(answer), &s); err != nil {
		t.Fatal(err)
	}
	if got := summaryTable(s, testNow); got != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}
	// The command's clock is the real one.
	stdout, stderr, code = spoolCommand(t, admin, "summary")
	if wantNow := summaryTable(s, time.Now()); code != 0 || stderr != "" || stdout != wantNow {
		t.Errorf("exit status %d, stderr %q, stdout:\n%s\nwant:\n%s", code, stderr, stdout, wantNow)
	}
	if got := summaryTable(s, testNow.Add(time.Minute)); !strings.Contains(got, "\nnext attempt:   2026-11-28T18:34:00Z, due\n") {
		t.Errorf("a next attempt past:\n%s", got)
	}
	empty := summaryAnswer{States: map[string]spoolCount{}, Events: map[string]map[string]spoolCount{}, Breakers: []breakerState{}}
	if got, want := summaryTable(empty, testNow), "STATE    ENTRIES  SIZE\npending  0        0 B\nparked   0        0 B\ndead     0        0 B\n\n"+
		"oldest pending: none\nnext attempt:   none\nbreakers:       none\n"; got != want {
		t.Errorf("empty: got:\n%s\nwant:\n%s", got, want)
	}
}

// TestSpoolCommandBulk: retry and delete by filter say what the API did,
// or print its JSON; a refusal is its message on stderr, exit status 1.
func TestSpoolCommandBulk(t *testing.T) {
	for _, tc := range []struct {
		args   []string
		status int
		answer string
		stdout string
		stderr string
		code   int
	}{
		{[]string{"retry", "--state", "dead"}, 200, `{"matched":12,"acted":12}`, "retried 12 of 12 (0 gone, 0 refused)\n", "", 0},
		{[]string{"delete", "--event-name", "report_created"}, 200, `{"matched":1234,"acted":1000,"gone":200,"refused":34}`,
			"deleted 1,000 of 1,234 (200 gone, 34 refused)\n", "", 0},
		{[]string{"retry", "--all"}, 202, `{"matched":54321,"background":true}`, "retrying 54,321 in the background; Caddy's log says when done\n", "", 0},
		{[]string{"delete", "--state", "dead"}, 202, `{"matched":54321,"background":true}`, "deleting 54,321 in the background; Caddy's log says when done\n", "", 0},
		{[]string{"retry", "--state", "pending", "--json"}, 200, `{"matched":0,"acted":0}` + "\n", `{"matched":0,"acted":0}` + "\n", "", 0},
		{[]string{"delete", "--all", "--json"}, 202, `{"matched":54321,"background":true}` + "\n", `{"matched":54321,"background":true}` + "\n", "", 0},
		{[]string{"delete", "--state", "dead"}, 400, `{"error":"unknown parameter \"x\": use state, event_name"}` + "\n", "",
			`caddy trivialsec-webhook spool delete: the admin API at ADDR answered 400: unknown parameter "x": use state, event_name` + "\n", 1},
		{[]string{"delete", "--state", "dead", "--json"}, 503, `{"error":"spool store is not open"}`, "",
			`caddy trivialsec-webhook spool delete: the admin API at ADDR answered 503: spool store is not open` + "\n", 1},
		{[]string{"retry", "--all"}, 500, "not JSON at all\n", "",
			`caddy trivialsec-webhook spool retry: the admin API at ADDR answered 500: not JSON at all` + "\n", 1},
		{[]string{"list"}, 404, `{"error":"not found"}`, "",
			`caddy trivialsec-webhook spool list: the admin API at ADDR answered 404: not found` + "\n", 1},
		{[]string{"summary"}, 200, `<html>`, "",
			`caddy trivialsec-webhook spool summary: the admin API at ADDR answered what is not a summary: invalid character '<' looking for beginning of value` + "\n", 1},
	} {
		t.Run(strings.Join(tc.args, "_")+fmt.Sprint("_", tc.status), func(t *testing.T) {
			admin := startFakeAdmin(t, func(*http.Request) (int, string) { return tc.status, tc.answer })
			stdout, stderr, code := spoolCommand(t, admin, tc.args...)
			wantErr := strings.ReplaceAll(tc.stderr, "ADDR", admin.address())
			if code != tc.code || stdout != tc.stdout || stderr != wantErr {
				t.Errorf("exit status %d, stdout %q, stderr %q\nwant %d, %q, %q", code, stdout, stderr, tc.code, tc.stdout, wantErr)
			}
		})
	}
}

// TestSpoolCommandByID: retry and delete by event ID act on each, say on
// stderr what the API refused, and count it: exit status 3 for an ID not
// in the spool, 1 for a refusal, which outweighs it.
func TestSpoolCommandByID(t *testing.T) {
	gone, held := uuid.NewString(), uuid.NewString()
	answer := func(r *http.Request) (int, string) {
		switch {
		case strings.Contains(r.URL.Path, gone):
			return 404, `{"error":"event ` + gone + ` is not in the spool"}`
		case strings.Contains(r.URL.Path, held):
			return 409, `{"error":"event ` + held + ` is being delivered: try again"}`
		case r.Method == "DELETE":
			return 204, ""
		}
		return 202, ""
	}
	for _, tc := range []struct {
		args   []string
		stdout string
		stderr []string // lines, after the command's name
		code   int
	}{
		{[]string{"retry", spoolID1, spoolID2}, "retried 2 of 2 (0 gone, 0 refused)\n", nil, 0},
		{[]string{"delete", spoolID1, strings.ToUpper(spoolID1)}, "deleted 1 of 1 (0 gone, 0 refused)\n", nil, 0},
		{[]string{"delete", spoolID1, gone}, "deleted 1 of 2 (1 gone, 0 refused)\n",
			[]string{"the admin API at ADDR answered 404: event " + gone + " is not in the spool"}, exitNotFound},
		{[]string{"retry", gone, "--json"}, `{"matched":1,"acted":0,"gone":1}` + "\n",
			[]string{"the admin API at ADDR answered 404: event " + gone + " is not in the spool"}, exitNotFound},
		{[]string{"retry", held, gone, spoolID1}, "retried 1 of 3 (1 gone, 1 refused)\n",
			[]string{"the admin API at ADDR answered 409: event " + held + " is being delivered: try again",
				"the admin API at ADDR answered 404: event " + gone + " is not in the spool"}, 1},
		{[]string{"delete", spoolID2, held, "--json"}, `{"matched":2,"acted":1,"refused":1}` + "\n",
			[]string{"the admin API at ADDR answered 409: event " + held + " is being delivered: try again"}, 1},
	} {
		t.Run(strings.Join(tc.args, "_"), func(t *testing.T) {
			admin := startFakeAdmin(t, answer)
			stdout, stderr, code := spoolCommand(t, admin, tc.args...)
			var want string
			for _, line := range tc.stderr {
				want += "caddy trivialsec-webhook spool " + tc.args[0] + ": " + strings.ReplaceAll(line, "ADDR", admin.address()) + "\n"
			}
			if code != tc.code || stdout != tc.stdout || stderr != want {
				t.Errorf("exit status %d, stdout %q, stderr %q\nwant %d, %q, %q", code, stdout, stderr, tc.code, tc.stdout, want)
			}
		})
	}
}

// TestSpoolCommandUnreachable: a Caddy that cannot be reached is one line
// on stderr, with the address tried, and exit status 1.
func TestSpoolCommandUnreachable(t *testing.T) {
	admin := startFakeAdmin(t, nil)
	admin.Close()
	for _, args := range [][]string{{"list"}, {"summary"}, {"retry", "--all"}, {"delete", spoolID1, spoolID2}} {
		stdout, stderr, code := spoolCommand(t, admin, args...)
		prefix := "caddy trivialsec-webhook spool " + args[0] + ": cannot reach Caddy's admin API at " + admin.address() + ": "
		if code != 1 || stdout != "" || strings.Count(stderr, "\n") != 1 || !strings.HasPrefix(stderr, prefix) ||
			!strings.HasSuffix(stderr, "(is Caddy running? give its admin address with --address, or its config with --config)\n") {
			t.Errorf("%v: exit status %d, stdout %q, stderr %q", args, code, stdout, stderr)
		}
	}
}

// TestParseAdminRefusal: the status and body of AdminAPIRequest's error
// for an answer of 400 or more; nothing from its other errors.
func TestParseAdminRefusal(t *testing.T) {
	status, body, ok := parseAdminRefusal(errors.New(`caddy responded with error: HTTP 409: {"error":"a: b"}` + "\n"))
	if !ok || status != 409 || string(body) != `{"error":"a: b"}`+"\n" {
		t.Errorf("%d %q %v", status, body, ok)
	}
	for _, msg := range []string{
		`performing request: dial tcp 127.0.0.1:1: connect: connection refused`,
		`caddy responded with error: HTTP 200: ok`,
		`HTTP 404: reading error message: EOF`,
		`caddy responded with error: HTTP x: y`,
	} {
		if status, _, ok := parseAdminRefusal(errors.New(msg)); ok {
			t.Errorf("%q: %d", msg, status)
		}
	}
}
