package trivialsecwebhook

import (
	"bytes"
	"cmp"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
)

// What the admin API asks of a store: a page of the entries a filter
// selects, and a summary (docs/spool.md, Watching and draining a backlog).
// Entries are in spooled order: by the millisecond they were spooled, then
// by event ID. A cursor is the place of the last entry of a page in that
// order: the next page starts after it, whatever was delivered or deleted
// meanwhile, so that an entry that stays is on one page only.

// Limits of a page.
const (
	defaultSpoolPage = 100
	maxSpoolPage     = 1000
)

// spoolFilter selects entries: the admin API's query parameters.
type spoolFilter struct {
	// The states to select; none: every state. "pending" selects the
	// parked entries too (they are pending: nothing of this instance
	// serves their account); "parked" those only.
	states    []string
	eventName string    // "": any
	account   string    // "": any
	after     time.Time // spooled at or after it; zero: no bound
	before    time.Time // spooled before it; zero: no bound
}

// selects reports whether f selects an entry whose state is state (as the
// listing shows it: pending, parked or dead), of event name and account,
// spooled at spooledMs (Unix ms).
func (f *spoolFilter) selects(state, name, account string, spooledMs int64) bool {
	if len(f.states) > 0 && !slices.Contains(f.states, state) &&
		!(state == stateParked && slices.Contains(f.states, statePending)) {
		return false
	}
	if f.eventName != "" && name != f.eventName || f.account != "" && account != f.account {
		return false
	}
	return f.inRange(spooledMs)
}

// inRange reports whether spooledMs is within f's spooled_after and
// spooled_before.
func (f *spoolFilter) inRange(spooledMs int64) bool {
	if !f.after.IsZero() && spooledMs < f.after.UnixMilli() {
		return false
	}
	return f.before.IsZero() || spooledMs < f.before.UnixMilli()
}

// selectsState reports whether f may select entries stored as state
// (pending or dead): a store skips what it does not.
func (f *spoolFilter) selectsState(stored string) bool {
	if len(f.states) == 0 || slices.Contains(f.states, stored) {
		return true
	}
	return stored == statePending && slices.Contains(f.states, stateParked)
}

// empty reports whether f selects every entry.
func (f *spoolFilter) empty() bool {
	return len(f.states) == 0 && f.eventName == "" && f.account == "" && f.after.IsZero() && f.before.IsZero()
}

// parseSpoolFilter reads a filter from the query parameters state (one or
// more, comma separated), event_name, account, spooled_after and
// spooled_before (RFC 3339). Other parameters are the caller's.
func parseSpoolFilter(q url.Values) (spoolFilter, error) {
	var f spoolFilter
	// A filter given empty, or twice, is a mistake (a script's variable
	// left empty): taken as no filter, a delete would select more.
	for _, name := range []string{"event_name", "account", "spooled_after", "spooled_before"} {
		switch vs := q[name]; {
		case len(vs) > 1:
			return f, fmt.Errorf("%s is given %d times: give it once", name, len(vs))
		case len(vs) == 1 && vs[0] == "":
			return f, fmt.Errorf("%s is empty: give a value, or leave it out", name)
		}
	}
	for _, v := range q["state"] {
		for s := range strings.SplitSeq(v, ",") {
			switch s {
			case statePending, stateParked, stateDead:
				if !slices.Contains(f.states, s) {
					f.states = append(f.states, s)
				}
			default:
				return f, fmt.Errorf("state %q: use pending, parked or dead", s)
			}
		}
	}
	f.eventName = q.Get("event_name")
	if f.eventName != "" && eventIndex([]byte(f.eventName)) < 0 {
		return f, fmt.Errorf("event_name %q: use one of %s", f.eventName, strings.Join(eventNames[:], ", "))
	}
	f.account = q.Get("account")
	for _, p := range []struct {
		name string
		to   *time.Time
	}{{"spooled_after", &f.after}, {"spooled_before", &f.before}} {
		v := q.Get(p.name)
		if v == "" {
			continue
		}
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			return f, fmt.Errorf("%s %q: use RFC 3339, such as 2026-11-30T12:00:00Z", p.name, v)
		}
		*p.to = t
	}
	return f, nil
}

// parseSpoolLimit reads the limit parameter: defaultSpoolPage without one.
func parseSpoolLimit(v string) (int, error) {
	if v == "" {
		return defaultSpoolPage, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > maxSpoolPage {
		return 0, fmt.Errorf("limit %q: use a number from 1 to %d", v, maxSpoolPage)
	}
	return n, nil
}

// spoolCursor is a place in spooled order: an entry's spooled time (Unix
// ms) and event ID.
type spoolCursor struct {
	ms int64
	id uuid.UUID
}

// cursorOf is the place of an entry.
func cursorOf(m *spoolMeta) spoolCursor {
	return spoolCursor{ms: m.SpooledAt.UnixMilli(), id: m.EventID}
}

// compare orders two places.
func (c spoolCursor) compare(o spoolCursor) int {
	return cmp.Or(cmp.Compare(c.ms, o.ms), bytes.Compare(c.id[:], o.id[:]))
}

// String is the cursor as the API gives it: opaque, URL-safe.
func (c spoolCursor) String() string {
	var b [24]byte
	binary.BigEndian.PutUint64(b[:8], uint64(c.ms))
	copy(b[8:], c.id[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// errBadCursor is a next parameter that no answer gave.
var errBadCursor = errors.New("next: not a cursor this API gave; leave it out to start from the first entry")

// parseSpoolCursor reads the next parameter; nil without one.
func parseSpoolCursor(v string) (*spoolCursor, error) {
	if v == "" {
		return nil, nil
	}
	b, err := base64.RawURLEncoding.DecodeString(v)
	if err != nil || len(b) != 24 {
		return nil, errBadCursor
	}
	c := &spoolCursor{ms: int64(binary.BigEndian.Uint64(b[:8]))}
	copy(c.id[:], b[8:])
	return c, nil
}

// spoolCount is how many entries, and their bytes.
type spoolCount struct {
	Entries int64 `json:"entries"`
	Bytes   int64 `json:"bytes"`
}

func (c *spoolCount) add(o spoolCount) {
	c.Entries += o.Entries
	c.Bytes += o.Bytes
}

// spoolSummary is what a store holds, in sum.
type spoolSummary struct {
	// By state: pending (not parked), parked, dead.
	states map[string]spoolCount
	// By event name, then state as above. A shared store (Redis) counts
	// its parked entries as pending here: which are parked is this
	// instance's view, kept per account only.
	events map[string]map[string]spoolCount
	// When the oldest pending entry, parked or not, was spooled; zero if
	// none.
	oldestPending time.Time
	// The next attempt due (the earliest next_attempt of a pending entry);
	// zero if none.
	nextAttempt time.Time
	// The breakers of the routes the store re-drives through.
	breakers []breakerState
}

// count adds entries of a state and event name.
func (s *spoolSummary) count(state, name string, c spoolCount) {
	s.countState(state, c)
	s.countEvent(name, state, c)
}

// countState adds entries of a state, to states only.
func (s *spoolSummary) countState(state string, c spoolCount) {
	if s.states == nil {
		s.states = make(map[string]spoolCount)
	}
	st := s.states[state]
	st.add(c)
	s.states[state] = st
}

// countEvent adds entries of an event name and state, to events only.
func (s *spoolSummary) countEvent(name, state string, c spoolCount) {
	if s.events == nil {
		s.events = make(map[string]map[string]spoolCount)
	}
	byState := s.events[name]
	if byState == nil {
		byState = make(map[string]spoolCount)
		s.events[name] = byState
	}
	ev := byState[state]
	ev.add(c)
	byState[state] = ev
}

// merge adds another store's summary.
func (s *spoolSummary) merge(o spoolSummary) {
	for state, c := range o.states {
		s.countState(state, c)
	}
	for name, byState := range o.events {
		for state, c := range byState {
			s.countEvent(name, state, c)
		}
	}
	s.oldestPending = earliest(s.oldestPending, o.oldestPending)
	s.nextAttempt = earliest(s.nextAttempt, o.nextAttempt)
	s.breakers = append(s.breakers, o.breakers...)
}

// earliest is the earlier of two times, zero meaning none.
func earliest(a, b time.Time) time.Time {
	if a.IsZero() || (!b.IsZero() && b.Before(a)) {
		return b
	}
	return a
}

// breakerState is a route's breaker, as the summary shows it.
type breakerState struct {
	Account string `json:"account"`
	Server  string `json:"server"` // the listen addresses of the server the route is on
	// closed: attempts go through; open: the route's entries wait, and one
	// probe at a time goes through, at NextProbe.
	State     string    `json:"state"`
	Failures  int       `json:"failures"` // attempts failed in a row
	NextProbe time.Time `json:"next_probe,omitzero"`
	Waiting   int       `json:"waiting"` // open: the due entries that wait for it
}

// spoolPage collects a page: the first limit entries a filter selects
// after a cursor, in spooled order, and how many it selects in all (after
// the cursor or not).
type spoolPage struct {
	after *spoolCursor
	limit int
	total int64
	out   []*spoolMeta // sorted, at most limit
}

func newSpoolPage(after *spoolCursor, limit int) *spoolPage {
	return &spoolPage{after: after, limit: limit}
}

// offer counts an entry the filter selects (the caller checked), and keeps
// it if it is on the page: m must not change until result.
func (p *spoolPage) offer(m *spoolMeta) {
	p.total++
	c := cursorOf(m)
	if p.after != nil && c.compare(*p.after) <= 0 {
		return
	}
	if len(p.out) == p.limit && c.compare(cursorOf(p.out[len(p.out)-1])) >= 0 {
		return
	}
	i, _ := slices.BinarySearchFunc(p.out, c, func(e *spoolMeta, c spoolCursor) int { return cursorOf(e).compare(c) })
	if len(p.out) == p.limit {
		p.out = p.out[:len(p.out)-1]
	}
	p.out = slices.Insert(p.out, i, m)
}

// result is the page, copied, and the total.
func (p *spoolPage) result() ([]spoolMeta, int64) {
	out := make([]spoolMeta, len(p.out))
	for i, m := range p.out {
		out[i] = *m
	}
	return out, p.total
}
