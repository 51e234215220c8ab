package trivialsecwebhook

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/google/uuid"
)

func init() {
	caddy.RegisterModule(adminSpool{})
}

// adminSpool is the admin API of the spool: list what it holds, and retry
// or delete an entry. It acts on every spool store of the process, and on
// the whole of a Redis store, which other instances share.
//
//	GET    /trivialsec_webhook/spool                   the entries, oldest first
//	POST   /trivialsec_webhook/spool/<event_id>/retry  re-drive one now, a dead letter too
//	DELETE /trivialsec_webhook/spool/<event_id>        drop one
//
// The listing has no bodies and no headers.
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
	State       string `json:"state"`
	Attempts    int    `json:"attempts"`
	SpooledAt   string `json:"spooled_at"`
	NextAttempt string `json:"next_attempt,omitempty"` // none for a dead letter
	LastError   string `json:"last_error,omitempty"`
	Size        int64  `json:"size"`
}

func (adminSpool) list(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: use GET")}
	}
	var all []spoolMeta
	var listErr error
	eachSpool(func(s spoolStore) bool {
		metas, err := s.list()
		all, listErr = append(all, metas...), err
		return err == nil
	})
	if listErr != nil {
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: listErr}
	}
	slices.SortFunc(all, func(a, b spoolMeta) int {
		return cmp.Or(a.SpooledAt.Compare(b.SpooledAt), slices.Compare(a.EventID[:], b.EventID[:]))
	})
	out := make([]spoolListing, 0, len(all))
	for _, m := range all {
		l := spoolListing{
			EventID:   m.EventID.String(),
			EventName: m.EventName,
			State:     m.State,
			Attempts:  m.Attempts,
			SpooledAt: m.SpooledAt.UTC().Format(rfc3339Millis),
			LastError: m.LastError,
			Size:      m.Size,
		}
		if m.State == statePending {
			l.NextAttempt = m.NextAttempt.UTC().Format(rfc3339Millis)
		}
		out = append(out, l)
	}
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(out)
}

const rfc3339Millis = "2006-01-02T15:04:05.000Z07:00"

func (adminSpool) entry(w http.ResponseWriter, r *http.Request) error {
	rest := strings.TrimPrefix(r.URL.Path, "/trivialsec_webhook/spool/")
	idText, action, _ := strings.Cut(rest, "/")
	id, err := uuid.Parse(idText)
	if err != nil || len(idText) != 36 {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("not an event ID: %q", idText)}
	}
	var do func(spoolStore) (bool, error)
	switch {
	case action == "retry" && r.Method == http.MethodPost:
		do = func(s spoolStore) (bool, error) { return s.retryNow(id) }
	case action == "" && r.Method == http.MethodDelete:
		do = func(s spoolStore) (bool, error) { return s.remove(id) }
	case action == "retry" || action == "":
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: POST .../retry, or DELETE")}
	default:
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("unknown action %q: use retry", action)}
	}
	found := false
	var doErr, down error
	eachSpool(func(s spoolStore) bool {
		found, doErr = do(s)
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

// Interface guard
var _ caddy.AdminRouter = adminSpool{}

// conflictError is an action the entry's state does not allow now: 409.
type conflictError struct{ error }

func (e conflictError) Unwrap() error { return e.error }
