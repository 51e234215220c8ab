package trivialsecwebhook

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// The admin API's filters, pages and bulk actions, through a real Caddy,
// on each store.

// queryRig is a spool rig whose upstream answers each delivery as the
// test says by event ID: 200 for those it lets through, 410 for those it
// refuses (a dead letter at once), 503 (spool it, retry in an hour) for
// the rest.
type queryRig struct {
	*spoolRig
	mu      sync.Mutex
	through map[string]bool
	refused map[string]bool
	nameOf  map[string]string // event ID -> event name, of what was spooled
}

func startQueryRig(t *testing.T, store string) *queryRig {
	g := &queryRig{
		spoolRig: startSpoolRig(t, "spool {\n\t\t\t"+store+"backoff 1h 2h\n\t\t}"),
		through:  map[string]bool{}, refused: map[string]bool{}, nameOf: map[string]string{},
	}
	g.up.Answer(func(_ http.Header, r *http.Request) int {
		id := r.Header.Get("X-Trivialsec-Event-Id")
		g.mu.Lock()
		defer g.mu.Unlock()
		switch {
		case g.through[id]:
			return http.StatusOK
		case g.refused[id]:
			return http.StatusGone
		}
		return http.StatusServiceUnavailable
	})
	return g
}

// spool sends n deliveries of an event name, 8 at once, each of which must
// be spooled (202), and returns their event IDs.
func (g *queryRig) spool(n int, name string) []string {
	g.t.Helper()
	ids := g.spoolMany(n, 8, name)
	g.mu.Lock()
	for _, id := range ids {
		g.nameOf[id] = name
	}
	g.mu.Unlock()
	return ids
}

// adminJSON sends an admin API request and decodes its JSON answer into
// out; it returns the status.
func (g *queryRig) adminJSON(method, path string, out any) int {
	g.t.Helper()
	req, _ := http.NewRequest(method, g.admin+path, nil)
	resp, err := senderClient.Do(req)
	if err != nil {
		g.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw := readAll(g.t, resp.Body)
	if out != nil && resp.StatusCode < 300 {
		if err := json.Unmarshal([]byte(raw), out); err != nil {
			g.t.Fatalf("%s %s: %q: %v", method, path, raw, err)
		}
	}
	return resp.StatusCode
}

// deliverNow lets ids through and retries them, one by one.
func (g *queryRig) deliverNow(ids ...string) { g.retryAs(g.through, ids) }

// kill makes dead letters of ids: refused at their retry.
func (g *queryRig) kill(ids ...string) {
	g.t.Helper()
	g.retryAs(g.refused, ids)
	g.waitFor(fmt.Sprintf("%d dead letters", len(ids)), func() bool {
		var p spoolListingPage
		g.adminJSON(http.MethodGet, "/trivialsec_webhook/spool?state=dead&limit=1", &p)
		return p.Total >= int64(len(ids))
	})
}

// retryAs puts ids in answer (through or refused), and retries them, one
// by one.
func (g *queryRig) retryAs(answer map[string]bool, ids []string) {
	g.t.Helper()
	g.mu.Lock()
	for _, id := range ids {
		answer[id] = true
	}
	g.mu.Unlock()
	for _, id := range ids {
		if code := g.adminDo(http.MethodPost, "/trivialsec_webhook/spool/"+id+"/retry"); code != http.StatusAccepted {
			g.t.Fatalf("retry %s: %d", id, code)
		}
	}
}

// TestSpoolListingPages: a few thousand entries read a page at a time, while
// more are spooled and others delivered, are each on one page only; every
// entry there from the first page to the last, and not delivered, is seen.
func TestSpoolListingPages(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		g := startQueryRig(t, store)
		first := g.spool(2000, "report_created")
		p := g.listPage("limit=137")
		if p.Total != 2000 || len(p.Entries) != 137 || p.Next == "" {
			t.Fatalf("first page: total %d, %d entries, next %q; want 2000, 137, a cursor", p.Total, len(p.Entries), p.Next)
		}
		seen := map[string]int{}
		var order []spoolListing
		delivered := map[string]bool{}
		for page := 0; ; page++ {
			for _, e := range p.Entries {
				seen[e.EventID]++
				order = append(order, e)
			}
			if p.Next == "" {
				break
			}
			// Between pages: 20 new entries, and 10 of the first ones
			// delivered, some before the cursor and some after.
			if page < 6 {
				g.spool(20, "report_created")
				var gone []string
				for i := range 10 {
					id := first[(page*331+i*197)%len(first)]
					if !delivered[id] {
						delivered[id] = true
						gone = append(gone, id)
					}
				}
				g.deliverNow(gone...)
				if _, err := g.up.WaitTaken(gone, 20*time.Second); err != nil {
					t.Fatal(err)
				}
			}
			p = g.listPage("limit=137&next=" + url.QueryEscape(p.Next))
		}
		for id, n := range seen {
			if n != 1 {
				t.Errorf("event %s on %d pages", id, n)
			}
		}
		for _, id := range first {
			if seen[id] == 0 && !delivered[id] {
				t.Errorf("event %s, spooled before the first page and never delivered, is on no page", id)
			}
		}
		if !slices.IsSortedFunc(order, func(a, b spoolListing) int {
			return strings.Compare(a.SpooledAt+a.EventID, b.SpooledAt+b.EventID)
		}) {
			t.Error("the pages are not in spooled order")
		}
		if last := g.listPage("limit=1000"); last.Total != int64(2000+6*20-len(delivered)) {
			t.Errorf("total %d at the end, want %d", last.Total, 2000+6*20-len(delivered))
		}
	})
}

// TestSpoolListingFilters: each filter, alone and together, selects what it
// says, with a total that counts them all; the summary adds up the same.
func TestSpoolListingFilters(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		g := startQueryRig(t, store)
		created := g.spool(60, "report_created")
		time.Sleep(20 * time.Millisecond) // a boundary between the two batches' spooled times
		boundary := time.Now().UTC()
		time.Sleep(20 * time.Millisecond)
		finished := g.spool(40, "report_deleted")
		g.kill(created[:7]...)
		g.kill(finished[:5]...)
		stamp := boundary.Format(time.RFC3339Nano)
		for _, c := range []struct {
			query string
			want  int
		}{
			{"", 100},
			{"state=pending", 88},
			{"state=dead", 12},
			{"state=pending,dead", 100},
			{"state=pending&state=dead", 100},
			{"state=parked", 0},
			{"event_name=report_deleted", 40},
			{"event_name=report_deleted&state=dead", 5},
			{"event_name=account_activity", 0},
			{"account=" + testAccount + "&event_name=report_deleted", 40},
			{"account=someone-else", 0},
			{"spooled_before=" + stamp, 60},
			{"spooled_after=" + stamp, 40},
			{"spooled_after=" + stamp + "&state=pending", 35},
			{"spooled_after=" + stamp + "&event_name=report_created", 0},
		} {
			var ids []string
			next := ""
			var total int64
			for {
				var p spoolListingPage
				if code := g.adminJSON(http.MethodGet, "/trivialsec_webhook/spool?limit=9&"+c.query+"&next="+next, &p); code != 200 {
					t.Fatalf("%q: %d", c.query, code)
				}
				if total != 0 && p.Total != total {
					t.Errorf("%q: the total went from %d to %d", c.query, total, p.Total)
				}
				total = p.Total
				for _, e := range p.Entries {
					ids = append(ids, e.EventID)
					q, _ := url.ParseQuery(c.query)
					f, _ := parseSpoolFilter(q)
					spooled, _ := time.Parse(time.RFC3339Nano, e.SpooledAt)
					if !f.selects(e.State, e.EventName, e.Account, spooled.UnixMilli()) || e.EventName != g.nameOf[e.EventID] || e.Account != testAccount {
						t.Errorf("%q selected %+v", c.query, e)
					}
				}
				if next = p.Next; next == "" {
					break
				}
			}
			if len(ids) != c.want || total != int64(c.want) {
				t.Errorf("%q: %d entries, total %d; want %d", c.query, len(ids), total, c.want)
			}
		}
		for _, bad := range []string{"state=sleeping", "spooled_after=yesterday", "limit=0", "limit=1001", "next=xyz", "event=report_created", "event_name=report", "event_name=",
			"state=", "spooled_before=", "event_name=report_created&event_name=report_deleted"} {
			if code := g.adminJSON(http.MethodGet, "/trivialsec_webhook/spool?"+bad, nil); code != http.StatusBadRequest {
				t.Errorf("%q: %d, want 400", bad, code)
			}
		}

		var sum summaryAnswer
		if code := g.adminJSON(http.MethodGet, "/trivialsec_webhook/spool/summary", &sum); code != 200 {
			t.Fatalf("summary: %d", code)
		}
		if sum.States[statePending].Entries != 88 || sum.States[stateDead].Entries != 12 || sum.States[stateParked].Entries != 0 {
			t.Errorf("summary by state %+v", sum.States)
		}
		want := map[string]map[string]int64{
			"report_created": {statePending: 53, stateDead: 7},
			"report_deleted": {statePending: 35, stateDead: 5},
		}
		var bytes int64
		for name, byState := range want {
			for state, n := range byState {
				c := sum.Events[name][state]
				if c.Entries != n || c.Bytes <= 0 {
					t.Errorf("summary of %s %s: %+v, want %d entries", name, state, c, n)
				}
				bytes += c.Bytes
			}
		}
		if total := sum.States[statePending].Bytes + sum.States[stateDead].Bytes; total != bytes {
			t.Errorf("summary: %d bytes by state, %d by event", total, bytes)
		}
		if sum.OldestPending == "" || sum.OldestPendingSeconds <= 0 || sum.NextAttempt == "" {
			t.Errorf("summary: oldest pending %q (%v s), next attempt %q", sum.OldestPending, sum.OldestPendingSeconds, sum.NextAttempt)
		}
		if next, _ := time.Parse(time.RFC3339Nano, sum.NextAttempt); time.Until(next) < 30*time.Minute {
			t.Errorf("summary: next attempt %s, within the hour's backoff", sum.NextAttempt)
		}
	})
}

// TestSpoolBulkActions: a bulk retry of the dead letters delivers them and
// nothing else; a bulk delete by event name drops those and nothing else;
// a delete needs a filter or all=true; a large set is acted on in the
// background.
func TestSpoolBulkActions(t *testing.T) {
	eachStore(t, func(t *testing.T, store string) {
		g := startQueryRig(t, store)
		created := g.spool(50, "report_created")
		finished := g.spool(30, "report_deleted")
		dead := append(slices.Clone(created[:6]), finished[:4]...)
		g.kill(dead...)

		// The dead letters, let through now, are retried: those only.
		g.mu.Lock()
		for _, id := range dead {
			g.refused[id], g.through[id] = false, true
		}
		g.mu.Unlock()
		var out bulkAnswer
		if code := g.adminJSON(http.MethodPost, "/trivialsec_webhook/spool/retry?state=dead", &out); code != 200 || out.Matched != 10 || out.Acted != 10 {
			t.Fatalf("bulk retry of dead letters: %d %+v, want 200, 10 matched and acted", code, out)
		}
		if _, err := g.up.WaitTaken(dead, 20*time.Second); err != nil {
			t.Fatal(err)
		}
		g.waitFor("70 left, all pending", func() bool {
			p := g.listPage("limit=1000")
			return p.Total == 70 && !slices.ContainsFunc(p.Entries, func(e spoolListing) bool { return e.State != statePending })
		})

		for _, bad := range []string{"delete", "delete?all=yes", "delete?state=gone", "delete?events=x", "delete?event_name=", "delete?state=&all=true"} {
			if code := g.adminJSON(http.MethodPost, "/trivialsec_webhook/spool/"+bad, nil); code != http.StatusBadRequest {
				t.Errorf("POST %s: %d, want 400", bad, code)
			}
		}
		if code := g.adminJSON(http.MethodGet, "/trivialsec_webhook/spool/delete?all=true", nil); code != http.StatusMethodNotAllowed {
			t.Errorf("GET of a bulk delete: %d, want 405", code)
		}
		if n := g.listPage("limit=1").Total; n != 70 {
			t.Fatalf("%d entries after the refused deletes, want 70", n)
		}

		if code := g.adminJSON(http.MethodPost, "/trivialsec_webhook/spool/delete?event_name=report_deleted", &out); code != 200 || out.Matched != 26 || out.Acted != 26 {
			t.Fatalf("bulk delete by event name: %d %+v, want 200, 26 matched and acted", code, out)
		}
		for _, e := range g.list() {
			if e.EventName != "report_created" {
				t.Errorf("left after deleting report_deleted: %+v", e)
			}
		}
		if n := len(g.list()); n != 44 {
			t.Errorf("%d left, want 44", n)
		}

		// More than bulkInline: in the background.
		g.spool(bulkInline+200-44, "report_created")
		if code := g.adminJSON(http.MethodPost, "/trivialsec_webhook/spool/delete?all=true", &out); code != http.StatusAccepted || !out.Background || out.Matched != bulkInline+200 {
			t.Fatalf("bulk delete of everything: %d %+v, want 202, %d matched, in the background", code, out, bulkInline+200)
		}
		g.drained()
	})
}

// TestSpoolRemoveIf: a bulk delete's removeIf deletes an entry only in the
// state it was selected in: a dead letter retried meanwhile (pending
// again) stays, on each store.
func TestSpoolRemoveIf(t *testing.T) {
	for name, open := range map[string]func(t *testing.T) spoolStore{
		"file":  func(t *testing.T) spoolStore { return openTestSpool(t, t.TempDir(), testPolicy) },
		"redis": func(t *testing.T) spoolStore { return openTestRedisSpool(t, testredis.Start(t)) },
	} {
		t.Run(name, func(t *testing.T) {
			s := open(t)
			e := testEntry(`{"a": 1}`)
			if err := s.add(e); err != nil {
				t.Fatal(err)
			}
			if done, err := s.removeIf(e.meta.EventID, stateDead); done || err != nil {
				t.Fatalf("removeIf dead, of a pending entry: %v %v", done, err)
			}
			if l := listed(t, s); len(l) != 1 {
				t.Fatalf("%d entries after a removeIf that did not match, want 1", len(l))
			}
			if done, err := s.removeIf(e.meta.EventID, statePending); !done || err != nil {
				t.Fatalf("removeIf pending, of a pending entry: %v %v", done, err)
			}
			if l := listed(t, s); len(l) != 0 {
				t.Fatalf("%d entries after removeIf, want 0", len(l))
			}
		})
	}
}
