package trivialsecwebhook

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/google/uuid"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(adminSpool{})
}

// adminSpool is the admin API of the spool: list what it holds, sum it
// up, and retry or delete entries, one or many. It acts on every spool
// store of the process, and on the whole of a Redis store, which other
// instances share (docs/spool.md, Watching and draining a backlog).
//
//	GET    /trivialsec_webhook/spool?<filter>&limit=&next=  a page of entries, oldest first
//	GET    /trivialsec_webhook/spool/summary                counts and bytes, by state and event name
//	POST   /trivialsec_webhook/spool/retry?<filter>         re-drive those the filter selects now
//	POST   /trivialsec_webhook/spool/delete?<filter>        drop them (a filter, or all=true)
//	POST   /trivialsec_webhook/spool/<event_id>/retry       re-drive one now, a dead letter too
//	DELETE /trivialsec_webhook/spool/<event_id>             drop one
//
// A filter is state, event_name, account, spooled_after and spooled_before
// (spool_query.go). The listing has no bodies and no headers.
type adminSpool struct{}

// CaddyModule returns the Caddy module information.
func (adminSpool) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.trivialsec_webhook",
		New: func() caddy.Module { return new(adminSpool) },
	}
}

// Routes returns the routes of the spool's admin API.
func (a adminSpool) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/trivialsec_webhook/spool", Handler: caddy.AdminHandlerFunc(a.list)},
		{Pattern: "/trivialsec_webhook/spool/", Handler: caddy.AdminHandlerFunc(a.entry)},
	}
}

// spoolListing is one entry of GET /trivialsec_webhook/spool.
type spoolListing struct {
	EventID     string `json:"event_id"`
	EventName   string `json:"event_name"`
	Account     string `json:"account"`
	State       string `json:"state"`
	Attempts    int    `json:"attempts"`
	SpooledAt   string `json:"spooled_at"`
	NextAttempt string `json:"next_attempt,omitempty"` // none for a dead letter, or a parked entry
	LastError   string `json:"last_error,omitempty"`
	Size        int64  `json:"size"`
}

// spoolListingPage is the answer of GET /trivialsec_webhook/spool.
type spoolListingPage struct {
	Total   int64          `json:"total"` // how many entries the filter selects, on every page
	Entries []spoolListing `json:"entries"`
	Next    string         `json:"next,omitempty"` // the next page's cursor; none on the last
}

func methodIs(r *http.Request, method string) error {
	if r.Method != method {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method not allowed: use %s", method)}
	}
	return nil
}

func badRequest(err error) error {
	return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
}

// known rejects query parameters that none of names is: a misspelt filter
// must not select everything.
func known(q url.Values, names ...string) error {
	for k := range q {
		if !slices.Contains(names, k) {
			return badRequest(fmt.Errorf("unknown parameter %q: use %s", k, strings.Join(names, ", ")))
		}
	}
	return nil
}

var filterParams = []string{"state", "event_name", "account", "spooled_after", "spooled_before"}

func (adminSpool) list(w http.ResponseWriter, r *http.Request) error {
	if err := methodIs(r, http.MethodGet); err != nil {
		return err
	}
	q := r.URL.Query()
	if err := known(q, append(filterParams, "limit", "next")...); err != nil {
		return err
	}
	f, err := parseSpoolFilter(q)
	if err != nil {
		return badRequest(err)
	}
	limit, err := parseSpoolLimit(q.Get("limit"))
	if err != nil {
		return badRequest(err)
	}
	after, err := parseSpoolCursor(q.Get("next"))
	if err != nil {
		return badRequest(err)
	}
	metas, total, err := pageAll(f, after, limit+1)
	if err != nil {
		return err
	}
	out := spoolListingPage{Total: total, Entries: make([]spoolListing, 0, len(metas))}
	if len(metas) > limit {
		metas = metas[:limit]
		out.Next = cursorOf(&metas[limit-1]).String()
	}
	for i := range metas {
		m := &metas[i]
		l := spoolListing{
			EventID:   m.EventID.String(),
			EventName: m.EventName,
			Account:   m.Account,
			State:     m.State,
			Attempts:  m.Attempts,
			SpooledAt: m.SpooledAt.UTC().Format(rfc3339Millis),
			LastError: m.LastError,
			Size:      m.Size,
		}
		if m.State == statePending {
			l.NextAttempt = m.NextAttempt.UTC().Format(rfc3339Millis)
		}
		out.Entries = append(out.Entries, l)
	}
	return writeJSON(w, http.StatusOK, out)
}

// pageAll is a page across every store: the first limit of each, merged.
func pageAll(f spoolFilter, after *spoolCursor, limit int) ([]spoolMeta, int64, error) {
	var all []spoolMeta
	var total int64
	var pageErr error
	eachSpool(func(s spoolStore) bool {
		metas, n, err := s.page(f, after, limit)
		all, total, pageErr = append(all, metas...), total+n, err
		return err == nil
	})
	if pageErr != nil {
		return nil, 0, caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: pageErr}
	}
	slices.SortFunc(all, func(a, b spoolMeta) int { return cursorOf(&a).compare(cursorOf(&b)) })
	return all[:min(limit, len(all))], total, nil
}

func writeJSON(w http.ResponseWriter, status int, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	return json.NewEncoder(w).Encode(v)
}

const rfc3339Millis = "2006-01-02T15:04:05.000Z07:00"

// summaryAnswer is the answer of GET /trivialsec_webhook/spool/summary.
type summaryAnswer struct {
	States               map[string]spoolCount            `json:"states"` // pending, parked, dead: each, even at 0
	Events               map[string]map[string]spoolCount `json:"events"` // event name -> state -> count
	OldestPending        string                           `json:"oldest_pending,omitempty"`
	OldestPendingSeconds float64                          `json:"oldest_pending_seconds"`
	NextAttempt          string                           `json:"next_attempt,omitempty"`
	Breakers             []breakerState                   `json:"breakers"`
}

func (adminSpool) summary(w http.ResponseWriter, r *http.Request) error {
	if err := methodIs(r, http.MethodGet); err != nil {
		return err
	}
	if err := known(r.URL.Query()); err != nil {
		return err
	}
	var sum spoolSummary
	var sumErr error
	eachSpool(func(s spoolStore) bool {
		one, err := s.summary()
		sum.merge(one)
		sumErr = err
		return err == nil
	})
	if sumErr != nil {
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: sumErr}
	}
	out := summaryAnswer{States: map[string]spoolCount{}, Events: sum.events, Breakers: sum.breakers}
	for _, state := range []string{statePending, stateParked, stateDead} {
		out.States[state] = sum.states[state]
	}
	if out.Events == nil {
		out.Events = map[string]map[string]spoolCount{}
	}
	if out.Breakers == nil {
		out.Breakers = []breakerState{}
	}
	if !sum.oldestPending.IsZero() {
		out.OldestPending = sum.oldestPending.UTC().Format(rfc3339Millis)
		out.OldestPendingSeconds = max(0, time.Since(sum.oldestPending).Seconds())
	}
	if !sum.nextAttempt.IsZero() {
		out.NextAttempt = sum.nextAttempt.UTC().Format(rfc3339Millis)
	}
	return writeJSON(w, http.StatusOK, out)
}

// spoolAction is what an admin retry or delete does to one entry, in a
// store: whether the entry was there. A delete acts only on an entry still
// stored in state ("": any): a bulk delete of dead letters must not delete
// one retried meanwhile.
type spoolAction func(s spoolStore, id uuid.UUID, state string) (bool, error)

func retryAction(s spoolStore, id uuid.UUID, _ string) (bool, error) { return s.retryNow(id) }
func deleteAction(s spoolStore, id uuid.UUID, state string) (bool, error) {
	return s.removeIf(id, state)
}

func (a adminSpool) entry(w http.ResponseWriter, r *http.Request) error {
	rest := strings.TrimPrefix(r.URL.Path, "/trivialsec_webhook/spool/")
	switch rest {
	case "summary":
		return a.summary(w, r)
	case "retry":
		return a.bulk(w, r, "retry", retryAction)
	case "delete":
		return a.bulk(w, r, "delete", deleteAction)
	}
	idText, action, _ := strings.Cut(rest, "/")
	id, err := uuid.Parse(idText)
	if err != nil || len(idText) != 36 {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("not an event ID, nor summary, retry or delete: %q", idText)}
	}
	var do spoolAction
	switch {
	case action == "retry" && r.Method == http.MethodPost:
		do = retryAction
	case action == "" && r.Method == http.MethodDelete:
		do = deleteAction
	case action == "retry" || action == "":
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: POST .../retry, or DELETE")}
	default:
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("unknown action %q: use retry", action)}
	}
	found := false
	var doErr, down error
	eachSpool(func(s spoolStore) bool {
		found, doErr = do(s, id, "")
		if found && doErr == nil && action == "retry" {
			s.probeNow(id) // an operator checking whether the service is back
		}
		if errors.Is(doErr, errStoreNotOpen) {
			down, doErr = doErr, nil // the entry may be in another store
		}
		return !found && doErr == nil
	})
	switch {
	case !found && doErr == nil && down != nil:
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: fmt.Errorf("event %s is not in the spool stores that are open: %w", id, down)}
	case errors.As(doErr, new(conflictError)):
		return caddy.APIError{HTTPStatus: http.StatusConflict, Err: doErr}
	case doErr != nil:
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: doErr}
	case !found:
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("event %s is not in the spool", id)}
	}
	if action == "retry" {
		w.WriteHeader(http.StatusAccepted)
	} else {
		w.WriteHeader(http.StatusNoContent)
	}
	return nil
}

// bulkInline is how many entries a bulk action acts on before it answers;
// more are acted on in the background, and the answer says how many match.
const bulkInline = 1000

// bulkWorkers is how many entries a bulk action acts on at once: the file
// store commits theirs together, the Redis store pipelines nothing, so
// this bounds its round trips in flight.
const bulkWorkers = 8

// bulkAnswer is the answer of a bulk retry or delete.
type bulkAnswer struct {
	Matched    int64 `json:"matched"`              // what the filter selected
	Acted      int64 `json:"acted"`                // retried or deleted; 0 when in the background
	Gone       int64 `json:"gone,omitempty"`       // delivered, deleted, or (a delete) retried or dead-lettered meanwhile
	Refused    int64 `json:"refused,omitempty"`    // their state does not allow it now (held, unchecked)
	Background bool  `json:"background,omitempty"` // acted on after the answer: the log says when done
}

func (adminSpool) bulk(w http.ResponseWriter, r *http.Request, name string, do spoolAction) error {
	if err := methodIs(r, http.MethodPost); err != nil {
		return err
	}
	q := r.URL.Query()
	if err := known(q, append(filterParams, "all")...); err != nil {
		return err
	}
	f, err := parseSpoolFilter(q)
	if err != nil {
		return badRequest(err)
	}
	all := q.Get("all")
	if all != "" && all != "true" {
		return badRequest(fmt.Errorf("all %q: use all=true, or leave it out", all))
	}
	if name == "delete" && f.empty() && all != "true" {
		return badRequest(errors.New("delete needs a filter (state, event_name, account, spooled_after, spooled_before), or all=true to delete every entry"))
	}
	type target struct {
		store spoolStore
		id    uuid.UUID
		state string // as stored when selected: pending (parked too) or dead
	}
	var targets []target
	var listErr error
	eachSpool(func(s spoolStore) bool {
		var after *spoolCursor
		for {
			metas, _, err := s.page(f, after, maxSpoolPage)
			if listErr = err; err != nil {
				return false
			}
			for i := range metas {
				state := metas[i].State
				if state == stateParked {
					state = statePending
				}
				targets = append(targets, target{s, metas[i].EventID, state})
			}
			if len(metas) < maxSpoolPage {
				return true
			}
			after = new(cursorOf(&metas[len(metas)-1]))
		}
	})
	if listErr != nil {
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: listErr}
	}
	run := func() (bulkAnswer, error) {
		out := bulkAnswer{Matched: int64(len(targets))}
		var mu sync.Mutex
		var firstErr error
		work := make(chan target)
		var wg sync.WaitGroup
		for range bulkWorkers {
			wg.Go(func() {
				for t := range work {
					found, err := do(t.store, t.id, t.state)
					mu.Lock()
					switch {
					case errors.As(err, new(conflictError)):
						out.Refused++
					case err != nil:
						firstErr = cmp.Or(firstErr, err)
					case found:
						out.Acted++
					default:
						out.Gone++
					}
					mu.Unlock()
				}
			})
		}
		for _, t := range targets {
			mu.Lock()
			failed := firstErr != nil
			mu.Unlock()
			if failed {
				break
			}
			work <- t
		}
		close(work)
		wg.Wait()
		return out, firstErr
	}
	if len(targets) <= bulkInline {
		out, err := run()
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: fmt.Errorf("%s: %d of %d done: %w", name, out.Acted, out.Matched, err)}
		}
		return writeJSON(w, http.StatusOK, out)
	}
	go func() {
		out, err := run()
		log := caddy.Log().Named("admin.api.trivialsec_webhook") // the logging of the config running now
		fields := []zap.Field{zap.String("action", name), zap.Int64("matched", out.Matched), zap.Int64("acted", out.Acted),
			zap.Int64("gone", out.Gone), zap.Int64("refused", out.Refused)}
		if err != nil {
			log.Error("spool: a bulk "+name+" stopped at an error: what is left is as it was", append(fields, zap.Error(err))...)
			return
		}
		log.Info("spool: a bulk "+name+" is done", fields...)
	}()
	return writeJSON(w, http.StatusAccepted, bulkAnswer{Matched: int64(len(targets)), Background: true})
}

// Interface guard
var _ caddy.AdminRouter = adminSpool{}

// conflictError is an action the entry's state does not allow now: 409.
type conflictError struct{ error }

func (e conflictError) Unwrap() error { return e.error }
