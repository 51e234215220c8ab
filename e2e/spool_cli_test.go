package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
)

// TestSpoolCLI drains a running Caddy's spool with `caddy trivialsec-webhook
// spool list|summary|retry|delete`, the built binary against its admin
// endpoint: the service answers 503 (deliveries are spooled, pending), then
// 422 to a retry (dead letters); the command lists them (a table, pages,
// JSON, filters), sums them up, retries the dead letters, deletes an event
// name and event IDs, and exits 0, 1, 2 or 3 as its help says.
func TestSpoolCLI(t *testing.T) {
	up, err := testkit.StartUpstream()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(up.Close)
	answer := func(status int) { up.Answer(func(http.Header, *http.Request) int { return status }) }
	answer(http.StatusServiceUnavailable)
	env := []string{"TRIVIALSEC_WEBHOOK_SECRET=" + secret}
	srv := startSpooling(t, up.Addr)
	url, admin := srv.url, srv.admin

	// Three client_activity deliveries, two report_created ones sent by
	// the command: all spooled.
	activity := srv.spool(t, 3)
	var reports []string
	for range 2 {
		id := uuid.NewString()
		code, out, errOut := run(t, env, "trivialsec-webhook", "send", "--url", url, "--account", "acme",
			"--event", "report_created", "--event-id", id)
		if code != 0 || out != "HTTP/1.1 202 Accepted\n" {
			t.Fatalf("send: exit %d, %q %q", code, out, errOut)
		}
		reports = append(reports, id)
	}

	// spool runs the command, its admin endpoint given by --address.
	spool := func(args ...string) (code int, stdout, stderr string) {
		t.Helper()
		return run(t, nil, append(append([]string{"trivialsec-webhook", "spool"}, args...), "--address", admin)...)
	}
	type entry struct {
		EventID   string `json:"event_id"`
		EventName string `json:"event_name"`
		State     string `json:"state"`
		Attempts  int    `json:"attempts"`
		LastError string `json:"last_error"`
	}
	idsOf := func(entries []entry) []string {
		var ids []string
		for _, e := range entries {
			ids = append(ids, e.EventID)
		}
		return ids
	}
	type page struct {
		Total   int     `json:"total"`
		Entries []entry `json:"entries"`
		Next    *string `json:"next"`
	}
	// listing is `spool list --json` with args: the page, and the
	// entries by event ID.
	listing := func(args ...string) (page, map[string]entry) {
		t.Helper()
		code, out, errOut := spool(append([]string{"list", "--json"}, args...)...)
		var p page
		if err := json.Unmarshal([]byte(out), &p); code != 0 || err != nil || strings.Count(out, "\n") != 1 {
			t.Fatalf("list --json %v: exit %d, %v, stdout %q, stderr %q", args, code, err, out, errOut)
		}
		byID := map[string]entry{}
		for _, e := range p.Entries {
			byID[e.EventID] = e
		}
		return p, byID
	}
	// waitFor polls the listing until ok says it is as the test wants.
	waitFor := func(what string, ok func(map[string]entry) bool) {
		t.Helper()
		for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			_, byID := listing()
			if ok(byID) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the listing is %v", what, byID)
			}
		}
	}
	waitFor("five pending", func(byID map[string]entry) bool {
		n := 0
		for _, e := range byID {
			if e.State == "pending" && e.Attempts == 1 {
				n++
			}
		}
		return n == 5
	})

	// Two dead letters: retried by event ID, the service refuses them.
	answer(http.StatusUnprocessableEntity)
	code, out, errOut := spool("retry", activity[0], "urn:uuid:"+activity[1])
	if code != 0 || out != "retried 2 of 2 (0 gone, 0 refused)\n" || errOut != "" {
		t.Fatalf("retry by ID: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	waitFor("two dead letters", func(byID map[string]entry) bool {
		return byID[activity[0]].State == "dead" && byID[activity[1]].State == "dead" && byID[activity[0]].LastError == "422 Unprocessable Entity"
	})
	answer(http.StatusServiceUnavailable)

	// The order of the listing: oldest first, then by event ID.
	all, _ := listing()
	var order []string
	for _, e := range all.Entries {
		order = append(order, e.EventID)
	}
	if want := append(slices.Clone(activity), reports...); !sameIDs(order, want) {
		t.Fatalf("the listing %v, want %v", order, want)
	}

	// The table: a row each, in that order, and how many.
	code, out, errOut = spool("list")
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if code != 0 || errOut != "" || len(lines) != 7 || lines[6] != "5 entries" ||
		!regexp.MustCompile(`^EVENT ID +EVENT +ACCOUNT +STATE +ATTEMPTS +SPOOLED +NEXT ATTEMPT +LAST ERROR$`).MatchString(lines[0]) {
		t.Fatalf("list: exit %d, stderr %q, stdout:\n%s", code, errOut, out)
	}
	for i, id := range order {
		state, name, next, lastError := "pending", "client_activity", `20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ`, "503 Service Unavailable"
		if slices.Contains(activity[:2], id) {
			state, next, lastError = "dead", "-", "422 Unprocessable Entity"
		}
		if slices.Contains(reports, id) {
			name = "report_created"
		}
		row := fmt.Sprintf(`^%s +%s +acme +%s +\d +20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ +%s +%s$`, id, name, state, next, lastError)
		if !regexp.MustCompile(row).MatchString(lines[i+1]) {
			t.Errorf("row %d %q, want %s", i+1, lines[i+1], row)
		}
	}

	// Pages: two at a time, with the flag that gives the next.
	code, out, _ = spool("list", "--limit", "2")
	m := regexp.MustCompile(`\n2 of 5 entries; next page: --next (\S+)\n$`).FindStringSubmatch(out)
	if code != 0 || m == nil || !strings.Contains(out, order[1]) || strings.Contains(out, order[2]) {
		t.Fatalf("list --limit 2: exit %d:\n%s", code, out)
	}
	p, _ := listing("--limit", "2", "--next", m[1])
	if p.Total != 5 || len(p.Entries) != 2 || p.Entries[0].EventID != order[2] || p.Entries[1].EventID != order[3] || p.Next == nil {
		t.Errorf("the second page: %+v", p)
	}
	p, _ = listing("--limit", "2", "--all-pages")
	if p.Total != 5 || len(p.Entries) != 5 || p.Next != nil || !slices.Equal(idsOf(p.Entries), order) {
		t.Errorf("--all-pages: %+v", p)
	}

	// Filters.
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"--state", "dead"}, activity[:2]},
		{[]string{"--state", "pending", "--event-name", "client_activity"}, activity[2:]},
		{[]string{"--event-name", "report_created"}, reports},
		{[]string{"--state", "parked,dead", "--spooled-after", "1h"}, activity[:2]},
		{[]string{"--spooled-before", "1h"}, nil},
		{[]string{"--spooled-before", time.Now().Add(time.Minute).Format(time.RFC3339)}, append(slices.Clone(activity), reports...)},
	} {
		p, _ := listing(tc.args...)
		if got := idsOf(p.Entries); !sameIDs(got, tc.want) || p.Total != len(tc.want) {
			t.Errorf("list %v: %d, %v; want %v", tc.args, p.Total, got, tc.want)
		}
	}

	// The admin address read from the config, as caddy reload reads it.
	code, out, _ = run(t, nil, "trivialsec-webhook", "spool", "list", "--state", "dead", "--config", srv.config)
	if code != 0 || !strings.HasSuffix(out, "\n2 entries\n") {
		t.Errorf("list --config: exit %d:\n%s", code, out)
	}

	// The summary.
	code, out, errOut = spool("summary")
	for _, want := range []string{
		`(?m)^pending +3 +[\d.]+ KiB$`, `(?m)^parked +0 +0 B$`, `(?m)^dead +2 +[\d.]+ KiB$`,
		`(?m)^client_activity +1 +0 +2$`, `(?m)^report_created +2 +0 +0$`,
		`(?m)^oldest pending: 20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ, [\dhms]+ ago$`,
		`(?m)^next attempt: +20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ, in [\dhms]+$`,
	} {
		if !regexp.MustCompile(want).MatchString(out) {
			t.Errorf("summary: no %s in:\n%s", want, out)
		}
	}
	if code != 0 || errOut != "" {
		t.Errorf("summary: exit %d, stderr %q", code, errOut)
	}
	code, out, _ = spool("summary", "--json")
	var sum struct {
		States map[string]struct{ Entries int } `json:"states"`
	}
	if err := json.Unmarshal([]byte(out), &sum); code != 0 || err != nil || sum.States["pending"].Entries != 3 || sum.States["dead"].Entries != 2 {
		t.Errorf("summary --json: exit %d, %v, %s", code, err, out)
	}

	// Retry the dead letters by filter: the service is down again, so
	// they are pending again, after one more attempt.
	code, out, errOut = spool("retry", "--state", "dead")
	if code != 0 || out != "retried 2 of 2 (0 gone, 0 refused)\n" || errOut != "" {
		t.Fatalf("retry --state dead: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	waitFor("the dead letters retried", func(byID map[string]entry) bool {
		return byID[activity[0]].State == "pending" && byID[activity[0]].Attempts == 3 &&
			byID[activity[1]].State == "pending" && byID[activity[1]].Attempts == 3
	})

	// Delete an event name.
	code, out, errOut = spool("delete", "--event-name", "report_created")
	if code != 0 || out != "deleted 2 of 2 (0 gone, 0 refused)\n" || errOut != "" {
		t.Fatalf("delete --event-name: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	code, out, _ = spool("delete", "--event-name", "report_created", "--json")
	if code != 0 || out != `{"matched":0,"acted":0}`+"\n" {
		t.Errorf("delete --event-name again, --json: exit %d, stdout %q", code, out)
	}

	// Usage mistakes: exit status 2, nothing deleted.
	for _, args := range [][]string{{"delete"}, {"delete", activity[0], "--state", "dead"}, {"list", "--state", "gone"}, {"list", "--limit", "5000"}} {
		code, out, errOut = spool(args...)
		if code != 2 || out != "" || strings.Count(errOut, "\n") != 1 || !strings.HasPrefix(errOut, "caddy trivialsec-webhook spool "+args[0]+": ") {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", args, code, out, errOut)
		}
	}

	// Delete by event ID: one not in the spool is said, exit status 3.
	unknown := uuid.NewString()
	code, out, errOut = spool("delete", activity[2], unknown)
	if code != 3 || out != "deleted 1 of 2 (1 gone, 0 refused)\n" ||
		errOut != fmt.Sprintf("caddy trivialsec-webhook spool delete: the admin API at %s answered 404: event %s is not in the spool\n", admin, unknown) {
		t.Errorf("delete by ID: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	p, byID := listing()
	if p.Total != 2 || byID[activity[0]].State != "pending" || byID[activity[1]].State != "pending" {
		t.Errorf("after the deletes: %+v", p)
	}

	// The API refusing (exit status 1, its message), and no Caddy at all
	// (exit status 1, the address tried).
	code, out, errOut = spool("list", "--next", "bogus")
	if code != 1 || out != "" || errOut != fmt.Sprintf("caddy trivialsec-webhook spool list: the admin API at %s answered 400: next: not a cursor this API gave; leave it out to start from the first entry\n", admin) {
		t.Errorf("list --next bogus: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	nobody := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	code, out, errOut = run(t, nil, "trivialsec-webhook", "spool", "summary", "--address", nobody)
	if code != 1 || out != "" || !strings.HasPrefix(errOut, "caddy trivialsec-webhook spool summary: cannot reach Caddy's admin API at "+nobody+": ") {
		t.Errorf("summary at %s: exit %d, stdout %q, stderr %q", nobody, code, out, errOut)
	}
}

// sameIDs reports whether a and b hold the same event IDs, in any order.
func sameIDs(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}
