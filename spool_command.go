package trivialsecwebhook

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/dustin/go-humanize"
	"github.com/google/uuid"
	"github.com/spf13/cobra"
)

// The `caddy trivialsec-webhook spool list|summary|retry|delete` commands:
// the spool's admin API (spool_admin.go) from the command line, through the
// admin endpoint of a running Caddy, found as `caddy stop` and `caddy
// reload` find it.

// Exit statuses of the spool's admin commands, beside 0 (done) and 1 (the
// admin API refused or failed, or could not be reached).
const (
	exitUsage    = 2 // a usage mistake: nothing was asked of Caddy
	exitNotFound = 3 // retry or delete by event ID: an ID was not in the spool
)

// spoolAdminHelp ends the long help of each of the commands.
const spoolAdminHelp = `
The admin endpoint is --address if given; else the admin address of the
config that --config (and --adapter) name; else localhost:2019: as
"caddy reload" finds it.

Exit status: 0 done; 1 the admin API refused or failed, or could not be
reached (its error, and the address tried, on stderr); 2 a usage mistake,
said on stderr, and nothing was asked of Caddy; 3 retry or delete by event
ID only: an ID given was not in the spool (delivered or deleted meanwhile),
and every other one was acted on.
`

// spoolFilterHelp says what the filters are, in the long help of list,
// retry and delete.
const spoolFilterHelp = `
Filters (each narrows the selection):
  --state pending|parked|dead   repeated, or a comma list; pending selects
                                the parked entries too
  --event-name <name>           one of the 15 event names
  --account <name>              the account of a trivialsec_webhook handler
  --spooled-after <time>        spooled at or after it
  --spooled-before <time>       spooled before it
A time is RFC 3339 (2026-11-30T12:00:00Z), or a duration meaning that long
ago (90m: spooled in the last 90 minutes, with --spooled-after).
`

// addSpoolAdminCommands adds list, summary, retry and delete to the spool
// command.
func addSpoolAdminCommands(spool *cobra.Command) {
	list := &cobra.Command{
		Use:   "list [filters] [--limit <n>] [--next <cursor> | --all-pages] [--json]",
		Short: "Lists the entries of a running Caddy's spool, oldest first",
		Long: `
Lists the entries of the spool of a running Caddy that the filters select,
oldest first, a page at a time: a table (event ID, event name, state,
attempts, when spooled, the next attempt, the last error), then how many of
how many, and the --next flag that gives the next page. Never a body or a
header.

--json prints the admin API's answer as it is: one JSON document,
{"total", "entries", "next"}, "next" absent on the last page. With
--all-pages the command follows "next" to the last page and prints every
entry: one table, or one JSON document of the same form without "next"
("total" is the first page's count; entries spooled, delivered or deleted
meanwhile can make it differ from the entries'). Pages are then --limit
entries, 1000 unless given.
` + spoolFilterHelp + spoolAdminHelp,
		Args: noArgs,
	}
	summary := &cobra.Command{
		Use:   "summary [--json]",
		Short: "Sums up a running Caddy's spool: by state, by event, breakers",
		Long: `
Sums up the spool of a running Caddy: entries and bytes by state (pending,
parked, dead), entries by event name and state, when the oldest pending
entry was spooled, when the next attempt is due, and the breakers of the
routes the spool delivers through. --json prints the admin API's answer as
it is: one JSON document.
` + spoolAdminHelp,
		Args: noArgs,
	}
	retry := &cobra.Command{
		Use:   "retry <event_id>... | [filters] | --all",
		Short: "Delivers again now the entries given, dead letters too",
		Long: `
Delivers again, at once, the entries of the spool of a running Caddy given
by event ID, or those the filters select, or with --all every entry; dead
letters too. A retried entry is pending again: an attempt that fails is
handled as any other (docs/spool.md). Prints
"retried 12 of 12 (0 gone, 0 refused)": gone, delivered or deleted
meanwhile; refused, the entry's state does not allow it now. A selection of
more than 1000 is retried in the background: "retrying 54,321 in the
background", and Caddy's log says when it is done.

By event ID, an ID not in the spool is said on stderr and counted gone
(exit status 3), one refused is said on stderr (exit status 1); the others
are retried all the same. --json prints the admin API's answer as it is,
one JSON document, {"matched", "acted", "gone", "refused"} or {"matched",
"background": true}; by event ID, the same form, counted by the command.
` + spoolFilterHelp + spoolAdminHelp,
		Args: cobra.ArbitraryArgs,
	}
	del := &cobra.Command{
		Use:   "delete <event_id>... | [filters] | --all",
		Short: "Drops entries from the spool: they will not be delivered",
		Long: `
Drops from the spool of a running Caddy the entries given by event ID, or
those the filters select, or with --all every entry: they will not be
delivered. Without an event ID, a filter or --all it refuses, and asks
nothing of Caddy. Prints "deleted 12 of 12 (0 gone, 0 refused)": gone,
delivered or deleted meanwhile, or its state changed since it was selected
(a dead letter retried); refused, the entry's state does not allow it now
(a delivery held unchecked while Redis did not answer). A selection of more than 1000 is
deleted in the background: "deleting 54,321 in the background", and
Caddy's log says when it is done.

By event ID, an ID not in the spool is said on stderr and counted gone
(exit status 3), one refused is said on stderr (exit status 1); the others
are deleted all the same. --json prints the admin API's answer as it is,
one JSON document, {"matched", "acted", "gone", "refused"} or {"matched",
"background": true}; by event ID, the same form, counted by the command.
` + spoolFilterHelp + spoolAdminHelp,
		Args: cobra.ArbitraryArgs,
	}

	for _, c := range []*cobra.Command{list, summary, retry, del} {
		f := c.Flags()
		f.String("address", "", "the admin endpoint of the running Caddy (default: from --config, else localhost:2019)")
		f.StringP("config", "c", "", "a config file to read the admin address from")
		f.StringP("adapter", "a", "", "the config adapter of --config")
		f.Bool("json", false, "print the admin API's JSON answer, one document")
		if c != summary {
			f.StringSlice("state", nil, "pending, parked or dead: repeated, or a comma list")
			f.String("event-name", "", "an event name, such as report_created")
			f.String("account", "", "an account, as a handler's account names it")
			f.String("spooled-after", "", "RFC 3339 time, or a duration meaning that long ago (1h)")
			f.String("spooled-before", "", "RFC 3339 time, or a duration meaning that long ago (1h)")
		}
		c.SilenceErrors = true
		c.SilenceUsage = true
	}
	list.Flags().Int("limit", 0, "entries a page, 1 to 1000 (default 100, or 1000 with --all-pages)")
	list.Flags().String("next", "", "the cursor of the page to print: the one the previous page gave")
	list.Flags().Bool("all-pages", false, "follow the cursor to the last page, and print every entry")
	for _, c := range []*cobra.Command{retry, del} {
		c.Flags().Bool("all", false, "act on every entry of the spool: no filter, no event ID")
	}

	list.RunE = func(c *cobra.Command, _ []string) error {
		a, err := spoolArgsFromFlags(c, nil, time.Now())
		if err != nil {
			return usageError(c, err)
		}
		return a.list(c)
	}
	summary.RunE = func(c *cobra.Command, _ []string) error {
		a, err := spoolArgsFromFlags(c, nil, time.Now())
		if err != nil {
			return usageError(c, err)
		}
		return a.summary(c)
	}
	for _, c := range []*cobra.Command{retry, del} {
		c.RunE = func(c *cobra.Command, ids []string) error {
			a, err := spoolArgsFromFlags(c, ids, time.Now())
			if err != nil {
				return usageError(c, err)
			}
			return a.act(c)
		}
	}
	spool.AddCommand(list, summary, retry, del)
}

// statusError is an error that Caddy's Main exits with a status other than
// 1 on.
type statusError struct {
	code int
	err  error // what went wrong, already said on stderr
	exit error // what makes Caddy's Main exit with code
}

func (e *statusError) Error() string   { return e.err.Error() }
func (e *statusError) Unwrap() []error { return []error{e.err, e.exit} }

// exitStatus makes Caddy's Main exit with code (2 or more) on err. Main
// exits 1 on any error but caddycmd's own exitError, which only
// WrapCommandFuncForCobra makes: from a status it is given, and without a
// log line when it is given no error.
func exitStatus(c *cobra.Command, code int, err error) error {
	exit := caddycmd.WrapCommandFuncForCobra(func(caddycmd.Flags) (int, error) { return code, nil })(c, nil)
	return &statusError{code: code, err: err, exit: exit}
}

// spoolArgs is what the flags and arguments of a spool admin command ask.
type spoolArgs struct {
	address  string     // the admin endpoint
	filter   url.Values // state, event_name, account, spooled_after, spooled_before
	ids      []string   // event IDs, canonical
	all      bool       // retry or delete: every entry
	limit    int        // list: 0 for the API's default
	next     string     // list: the cursor to start at
	allPages bool       // list: follow the cursors to the last page
	json     bool
	now      time.Time
}

// spoolArgsFromFlags reads a spool admin command's flags, and the event
// IDs of retry and delete; an error is a usage mistake. It reads the
// config that --config names for the admin address.
func spoolArgsFromFlags(c *cobra.Command, ids []string, now time.Time) (*spoolArgs, error) {
	f := c.Flags()
	str := func(name string) string { v, _ := f.GetString(name); return v }
	a := &spoolArgs{filter: url.Values{}, now: now}
	a.json, _ = f.GetBool("json")
	// A filter given empty (a script's variable left empty) is a mistake:
	// taken as no filter, a delete would select more than asked.
	for _, name := range []string{"state", "event-name", "account", "spooled-after", "spooled-before"} {
		if fl := f.Lookup(name); fl != nil && fl.Changed && (fl.Value.String() == "" || fl.Value.String() == "[]") {
			return nil, fmt.Errorf("--%s is empty: give a value, or leave it out", name)
		}
	}

	if f.Lookup("state") != nil {
		states, _ := f.GetStringSlice("state")
		for _, s := range states {
			if s != statePending && s != stateParked && s != stateDead {
				return nil, fmt.Errorf("--state %q: use pending, parked or dead", s)
			}
			if !slices.Contains(a.filter["state"], s) {
				a.filter.Add("state", s)
			}
		}
		if name := str("event-name"); name != "" {
			if eventIndex([]byte(name)) < 0 {
				return nil, fmt.Errorf("--event-name %q: use one of %s", name, strings.Join(eventNames[:], ", "))
			}
			a.filter.Set("event_name", name)
		}
		if account := str("account"); account != "" {
			a.filter.Set("account", account)
		}
		for _, p := range []struct{ flag, param string }{
			{"spooled-after", "spooled_after"}, {"spooled-before", "spooled_before"},
		} {
			if v := str(p.flag); v != "" {
				t, err := spoolTime(p.flag, v, now)
				if err != nil {
					return nil, err
				}
				a.filter.Set(p.param, t)
			}
		}
	}

	if f.Lookup("limit") != nil {
		a.limit, _ = f.GetInt("limit")
		a.next = str("next")
		a.allPages, _ = f.GetBool("all-pages")
		if f.Changed("limit") && (a.limit < 1 || a.limit > maxSpoolPage) {
			return nil, fmt.Errorf("--limit %d: use a number from 1 to %d", a.limit, maxSpoolPage)
		}
		if a.allPages && a.limit == 0 {
			a.limit = maxSpoolPage
		}
	}

	if f.Lookup("all") != nil {
		a.all, _ = f.GetBool("all")
		for _, arg := range ids {
			id, err := uuid.Parse(arg)
			if err != nil {
				return nil, fmt.Errorf("%q is not an event ID: give event IDs, such as %s, or filters", arg, exampleEventID)
			}
			if s := id.String(); !slices.Contains(a.ids, s) {
				a.ids = append(a.ids, s)
			}
		}
		switch {
		case len(a.ids) > 0 && len(a.filter) > 0:
			return nil, errors.New("event IDs and filters together: give the event IDs, or the filters")
		case len(a.ids) > 0 && a.all:
			return nil, errors.New("event IDs and --all together: give the event IDs, or --all")
		case a.all && len(a.filter) > 0:
			return nil, errors.New("--all and filters together: --all selects every entry; give the filters, or --all")
		case len(a.ids) == 0 && len(a.filter) == 0 && !a.all:
			return nil, fmt.Errorf("%s what? give event IDs, filters (--state, --event-name, --account, --spooled-after, --spooled-before), or --all for every entry", c.Name())
		}
	}

	var err error
	a.address, err = caddycmd.DetermineAdminAPIAddress(str("address"), nil, str("config"), str("adapter"))
	if err != nil {
		return nil, fmt.Errorf("cannot read the admin address from --config: %v", err)
	}
	if na, err := caddy.ParseNetworkAddress(a.address); err != nil || na.PortRangeSize() > 1 {
		return nil, fmt.Errorf("admin address %q: give one like localhost:2019 or unix//run/caddy-admin.sock", a.address)
	}
	return a, nil
}

// exampleEventID is an event ID for the help and the errors.
const exampleEventID = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"

// spoolTime reads the value of --spooled-after or --spooled-before: an
// RFC 3339 time, or a duration that long before now. It gives RFC 3339.
func spoolTime(flag, v string, now time.Time) (string, error) {
	if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
		return t.UTC().Format(time.RFC3339Nano), nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return "", fmt.Errorf("--%s %q: give an RFC 3339 time, such as 2026-11-30T12:00:00Z, or how long ago, such as 90m", flag, v)
	}
	return now.Add(-d).UTC().Format(time.RFC3339Nano), nil
}

// apiError is the admin API refusing or failing: its status, and the
// message of Caddy's {"error": "..."} answer.
type apiError struct {
	address string
	status  int
	message string
}

func (e *apiError) Error() string {
	return fmt.Sprintf("the admin API at %s answered %d: %s", e.address, e.status, e.message)
}

// call makes a request of the admin API, and reads the answer: its body if
// the status is one of ok, an *apiError if it is another, another error if
// Caddy could not be reached.
func (a *spoolArgs) call(method, uri string, ok ...int) (int, []byte, error) {
	var status int
	var body []byte
	resp, err := caddycmd.AdminAPIRequest(a.address, method, uri, nil, nil)
	if err != nil {
		// AdminAPIRequest answers 4xx and 5xx with an error, which
		// holds the status and the body.
		var refused bool
		if status, body, refused = parseAdminRefusal(err); !refused {
			return 0, nil, fmt.Errorf("cannot reach Caddy's admin API at %s: %v (is Caddy running? give its admin address with --address, or its config with --config)", a.address, err)
		}
	} else {
		defer resp.Body.Close()
		status = resp.StatusCode
		if body, err = io.ReadAll(resp.Body); err != nil {
			return 0, nil, fmt.Errorf("reading the answer of the admin API at %s: %v", a.address, err)
		}
	}
	if !slices.Contains(ok, status) {
		var answer struct {
			Error string `json:"error"`
		}
		message := strings.TrimSpace(string(body))
		if json.Unmarshal(body, &answer) == nil && answer.Error != "" {
			message = answer.Error
		}
		return status, body, &apiError{address: a.address, status: status, message: message}
	}
	return status, body, nil
}

// parseAdminRefusal reads the status and body from AdminAPIRequest's
// error for an answer of 400 or more: "caddy responded with error: HTTP
// <status>: <body>".
func parseAdminRefusal(err error) (int, []byte, bool) {
	rest, ok := strings.CutPrefix(err.Error(), "caddy responded with error: HTTP ")
	if !ok {
		return 0, nil, false
	}
	code, body, ok := strings.Cut(rest, ": ")
	status, err := strconv.Atoi(code)
	if !ok || err != nil || status < 400 {
		return 0, nil, false
	}
	return status, []byte(body), true
}

// list runs `spool list`.
func (a *spoolArgs) list(c *cobra.Command) error {
	q := url.Values{}
	for k, v := range a.filter {
		q[k] = v
	}
	if a.limit > 0 {
		q.Set("limit", strconv.Itoa(a.limit))
	}
	next := a.next
	var entries []json.RawMessage
	var rows []spoolListing
	var total int64
	for first := true; ; first = false {
		if next != "" {
			q.Set("next", next)
		}
		uri := "/trivialsec_webhook/spool"
		if len(q) > 0 {
			uri += "?" + q.Encode()
		}
		_, body, err := a.call(http.MethodGet, uri, http.StatusOK)
		if err != nil {
			return commandError(c, err)
		}
		if a.json && !a.allPages {
			_, err := c.OutOrStdout().Write(body)
			return err
		}
		var page struct {
			Total   int64             `json:"total"`
			Entries []json.RawMessage `json:"entries"`
			Next    string            `json:"next"`
		}
		if err := json.Unmarshal(body, &page); err != nil {
			return commandError(c, fmt.Errorf("the admin API at %s answered what is not a listing: %v", a.address, err))
		}
		for _, raw := range page.Entries {
			var l spoolListing
			if err := json.Unmarshal(raw, &l); err != nil {
				return commandError(c, fmt.Errorf("the admin API at %s answered what is not a listing: %v", a.address, err))
			}
			rows = append(rows, l)
		}
		entries = append(entries, page.Entries...)
		if first {
			total = page.Total
		}
		next = page.Next
		if !a.allPages || next == "" {
			break
		}
	}
	out := c.OutOrStdout()
	if a.json {
		if entries == nil {
			entries = []json.RawMessage{}
		}
		return json.NewEncoder(out).Encode(struct {
			Total   int64             `json:"total"`
			Entries []json.RawMessage `json:"entries"`
		}{total, entries})
	}
	_, err := io.WriteString(out, listingTable(rows, total, next, a.allPages))
	return err
}

// listingTable writes the entries of a listing as a table, and a line that
// says how many of how many, and how to get the next page. allPages: the
// rows are every page's, and total only the first page's count.
func listingTable(rows []spoolListing, total int64, next string, allPages bool) string {
	var b strings.Builder
	if len(rows) > 0 {
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "EVENT ID\tEVENT\tACCOUNT\tSTATE\tATTEMPTS\tSPOOLED\tNEXT ATTEMPT\tLAST ERROR")
		for _, r := range rows {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n", r.EventID, r.EventName, r.Account, r.State, r.Attempts,
				shortTime(r.SpooledAt), shortTime(r.NextAttempt), oneLine(r.LastError, 60))
		}
		tw.Flush()
	}
	n := int64(len(rows))
	switch {
	case n == 0 && (total == 0 || allPages):
		b.WriteString("no entries\n")
	case next != "":
		fmt.Fprintf(&b, "%s of %s; next page: --next %s\n", humanize.Comma(n), plural(int(total), "entry", "entries"), next)
	case n == total || allPages:
		fmt.Fprintf(&b, "%s\n", plural(int(n), "entry", "entries"))
	default:
		fmt.Fprintf(&b, "%s of %s, the last page\n", humanize.Comma(n), plural(int(total), "entry", "entries"))
	}
	return b.String()
}

// shortTime writes an API time (RFC 3339, in ms, UTC) to the second; "-"
// for none.
func shortTime(v string) string {
	if v == "" {
		return "-"
	}
	t, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		return v
	}
	return t.UTC().Truncate(time.Second).Format(time.RFC3339)
}

// oneLine makes s one line of at most n characters, "…" where it was cut;
// "-" for none.
func oneLine(s string, n int) string {
	if s == "" {
		return "-"
	}
	s = strings.Join(strings.Fields(s), " ")
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	r := []rune(s)
	return strings.TrimRight(string(r[:n-1]), " ") + "…"
}

// summary runs `spool summary`.
func (a *spoolArgs) summary(c *cobra.Command) error {
	_, body, err := a.call(http.MethodGet, "/trivialsec_webhook/spool/summary", http.StatusOK)
	if err != nil {
		return commandError(c, err)
	}
	if a.json {
		_, err := c.OutOrStdout().Write(body)
		return err
	}
	var s summaryAnswer
	if err := json.Unmarshal(body, &s); err != nil {
		return commandError(c, fmt.Errorf("the admin API at %s answered what is not a summary: %v", a.address, err))
	}
	_, err = io.WriteString(c.OutOrStdout(), summaryTable(s, a.now))
	return err
}

// summaryTable writes a summary for people.
func summaryTable(s summaryAnswer, now time.Time) string {
	states := []string{statePending, stateParked, stateDead}
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "STATE\tENTRIES\tSIZE")
	for _, st := range states {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", st, humanize.Comma(s.States[st].Entries), humanize.IBytes(uint64(max(0, s.States[st].Bytes))))
	}
	tw.Flush()

	if len(s.Events) > 0 {
		b.WriteString("\n")
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "EVENT\tPENDING\tPARKED\tDEAD")
		names := make([]string, 0, len(s.Events))
		for name := range s.Events {
			names = append(names, name)
		}
		slices.Sort(names)
		for _, name := range names {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", name, humanize.Comma(s.Events[name][statePending].Entries),
				humanize.Comma(s.Events[name][stateParked].Entries), humanize.Comma(s.Events[name][stateDead].Entries))
		}
		tw.Flush()
	}

	b.WriteString("\n")
	tw = tabwriter.NewWriter(&b, 0, 0, 1, ' ', 0)
	oldest := "none"
	if s.OldestPending != "" {
		age := time.Duration(s.OldestPendingSeconds * float64(time.Second)).Round(time.Second)
		oldest = fmt.Sprintf("%s, %s ago", shortTime(s.OldestPending), age)
	}
	fmt.Fprintf(tw, "oldest pending:\t%s\n", oldest)
	nextAttempt := "none"
	if s.NextAttempt != "" {
		nextAttempt = shortTime(s.NextAttempt)
		if t, err := time.Parse(time.RFC3339Nano, s.NextAttempt); err == nil {
			if in := t.Sub(now).Round(time.Second); in > 0 {
				nextAttempt += fmt.Sprintf(", in %s", in)
			} else {
				nextAttempt += ", due"
			}
		}
	}
	fmt.Fprintf(tw, "next attempt:\t%s\n", nextAttempt)
	if len(s.Breakers) == 0 {
		fmt.Fprintf(tw, "breakers:\tnone\n")
	}
	tw.Flush()
	if len(s.Breakers) > 0 {
		b.WriteString("\n")
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "ACCOUNT\tSERVER\tBREAKER\tFAILURES\tNEXT PROBE")
		for _, br := range s.Breakers {
			probe := "-"
			if !br.NextProbe.IsZero() {
				probe = br.NextProbe.UTC().Truncate(time.Second).Format(time.RFC3339)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", br.Account, br.Server, br.State, br.Failures, probe)
		}
		tw.Flush()
	}
	return b.String()
}

// act runs `spool retry` or `spool delete`.
func (a *spoolArgs) act(c *cobra.Command) error {
	name := c.Name() // retry or delete
	if len(a.ids) > 0 {
		return a.actOnIDs(c, name)
	}
	q := url.Values{}
	for k, v := range a.filter {
		q[k] = v
	}
	if a.all {
		q.Set("all", "true")
	}
	uri := "/trivialsec_webhook/spool/" + name
	if len(q) > 0 {
		uri += "?" + q.Encode()
	}
	_, body, err := a.call(http.MethodPost, uri, http.StatusOK, http.StatusAccepted)
	if err != nil {
		return commandError(c, err)
	}
	if a.json {
		_, err := c.OutOrStdout().Write(body)
		return err
	}
	var answer bulkAnswer
	if err := json.Unmarshal(body, &answer); err != nil {
		return commandError(c, fmt.Errorf("the admin API at %s answered what is not a count: %v", a.address, err))
	}
	_, err = io.WriteString(c.OutOrStdout(), actedLine(name, answer))
	return err
}

// actOnIDs retries or deletes the entries a.ids, one request each.
func (a *spoolArgs) actOnIDs(c *cobra.Command, name string) error {
	answer := bulkAnswer{Matched: int64(len(a.ids))}
	var failed error
	for _, id := range a.ids {
		var err error
		if name == "retry" {
			_, _, err = a.call(http.MethodPost, "/trivialsec_webhook/spool/"+id+"/retry", http.StatusAccepted)
		} else {
			_, _, err = a.call(http.MethodDelete, "/trivialsec_webhook/spool/"+id, http.StatusNoContent)
		}
		var refusal *apiError
		switch {
		case err == nil:
			answer.Acted++
			continue
		case !errors.As(err, &refusal):
			return commandError(c, err) // Caddy cannot be reached
		case refusal.status == http.StatusNotFound:
			answer.Gone++
		case refusal.status == http.StatusConflict:
			answer.Refused++
			failed = err
		default:
			failed = err
		}
		commandError(c, err)
	}
	out := c.OutOrStdout()
	if a.json {
		if err := json.NewEncoder(out).Encode(answer); err != nil {
			return err
		}
	} else {
		fmt.Fprint(out, actedLine(name, answer))
	}
	switch {
	case failed != nil:
		return failed
	case answer.Gone > 0:
		return exitStatus(c, exitNotFound, fmt.Errorf("%s not in the spool", plural(int(answer.Gone), "event", "events")))
	}
	return nil
}

// actedLine says what a retry or delete did.
func actedLine(name string, answer bulkAnswer) string {
	if answer.Background {
		doing := map[string]string{"retry": "retrying", "delete": "deleting"}[name]
		return fmt.Sprintf("%s %s in the background; Caddy's log says when done\n", doing, humanize.Comma(answer.Matched))
	}
	done := map[string]string{"retry": "retried", "delete": "deleted"}[name]
	return fmt.Sprintf("%s %s of %s (%s gone, %s refused)\n", done, humanize.Comma(answer.Acted), humanize.Comma(answer.Matched),
		humanize.Comma(answer.Gone), humanize.Comma(answer.Refused))
}
