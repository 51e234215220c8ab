package trivialsecwebhook

import (
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus/testutil"
	bolt "go.etcd.io/bbolt"
)

var testPolicy = spoolPolicy{backoffMin: time.Second, backoffMax: time.Minute, maxAge: time.Hour, maxSize: 1 << 20, attemptTimeout: time.Second}

// openTestSpool makes the store of dir and opens it, as a config that
// starts does.
func openTestSpool(t testing.TB, dir string, policy spoolPolicy) *fileSpool {
	t.Helper()
	s := newFileSpool(dir, policy)
	if err := s.open(); err != nil {
		t.Fatal(err)
	}
	return s
}

func testEntry(body string) *spoolEntry {
	ev := event{ID: uuid.New(), Name: "report_created", Timestamp: testNow}
	ev.token.IssuedAt, ev.token.ExpiresAt = testNow, testNow.Add(24*time.Hour)
	ev.token.Endpoint, ev.token.hasEndpoint = "", true
	return &spoolEntry{
		meta: spoolMetaOf(testAccount, &ev, time.Now().Add(time.Hour)), // due later: nothing re-drives here
		request: spoolRequest{Method: "POST", RequestURI: "/webhook?x=1", Proto: "HTTP/1.1", Host: "hooks.example.com",
			Header: map[string][]string{"X-A": {"1", "2"}}, RemoteAddr: "192.0.2.1:1234"},
		body: []byte(body),
	}
}

// listed is what a store lists.
func listed(t testing.TB, s spoolStore) []spoolMeta {
	t.Helper()
	l, total, err := s.page(spoolFilter{}, nil, maxSpoolPage)
	if err != nil {
		t.Fatal(err)
	}
	if total != int64(len(l)) {
		t.Fatalf("the store lists %d entries, and says it holds %d", len(l), total)
	}
	return l
}

// TestFileSpoolKeepsEntries: what is added is there, byte for byte, after
// the store is closed and opened again; sizes add up; remove and retry act
// on one entry.
func TestFileSpoolKeepsEntries(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool")
	if _, err := spoolDir(dir); err != nil {
		t.Fatal(err)
	}
	s := openTestSpool(t, dir, testPolicy)
	a, b := testEntry(`{"a": 1}`), testEntry(`{"b": "caf\u00e9"}`)
	for _, e := range []*spoolEntry{a, b, a} { // a twice: spooled once
		if err := s.add(e); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Destruct(); err != nil {
		t.Fatal(err)
	}

	s = openTestSpool(t, dir, testPolicy)
	defer s.Destruct()
	list := listed(t, s)
	if len(list) != 2 || s.bytes != a.meta.Size+b.meta.Size {
		t.Fatalf("%d entries, %d bytes, after reopening", len(list), s.bytes)
	}
	req, body, err := s.take(&b.meta)
	if err != nil || string(body) != `{"b": "caf\u00e9"}` || req.RequestURI != "/webhook?x=1" || req.Header["X-A"][1] != "2" || req.RemoteAddr != "192.0.2.1:1234" {
		t.Fatalf("loaded %+v %q %v", req, body, err)
	}
	m := list[0]
	if m.EventID != a.meta.EventID && m.EventID != b.meta.EventID || m.Endpoint == nil || *m.Endpoint != "" || m.State != statePending {
		t.Errorf("meta %+v", m)
	}
	if ev := m.event(); !ev.token.hasEndpoint || ev.Name != "report_created" || ev.nameIndex != eventIndex([]byte("report_created")) {
		t.Errorf("event %+v", ev)
	}
	if found, err := s.removeIf(a.meta.EventID, ""); !found || err != nil {
		t.Fatalf("remove: %v %v", found, err)
	}
	if found, _ := s.removeIf(a.meta.EventID, ""); found {
		t.Error("removed twice")
	}
	if found, err := s.retryNow(b.meta.EventID); !found || err != nil {
		t.Fatalf("retry: %v %v", found, err)
	}
	if l := listed(t, s); len(l) != 1 || l[0].NextAttempt.After(time.Now()) || s.bytes != b.meta.Size {
		t.Errorf("after remove and retry: %+v, %d bytes", l, s.bytes)
	}
}

// TestFileSpoolFull: an entry that would take the store past max_size is
// refused, and nothing of it is kept.
func TestFileSpoolFull(t *testing.T) {
	p := testPolicy
	small := testEntry("{}")
	if _, _, _, err := small.size(); err != nil {
		t.Fatal(err)
	}
	p.maxSize = small.meta.Size + 10
	s := openTestSpool(t, t.TempDir(), p)
	defer s.Destruct()
	if err := s.add(small); err != nil {
		t.Fatal(err)
	}
	if err := s.add(testEntry("{}")); err != errSpoolFull {
		t.Fatalf("the second entry: %v, want errSpoolFull", err)
	}
	if len(listed(t, s)) != 1 || s.bytes != small.meta.Size {
		t.Errorf("%d entries, %d bytes", len(listed(t, s)), s.bytes)
	}
}

// TestFileSpoolGroupCommit: writes made at once share commits, and each
// one is answered.
func TestFileSpoolGroupCommit(t *testing.T) {
	s := openTestSpool(t, t.TempDir(), testPolicy)
	defer s.Destruct()
	before := testutil.ToFloat64(spoolCommits)
	const n = 100
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- s.add(testEntry("{}"))
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	commits := testutil.ToFloat64(spoolCommits) - before
	t.Logf("%d concurrent writes, %v commits", n, commits)
	if len(listed(t, s)) != n || commits >= n {
		t.Fatalf("%d entries in %v commits", len(listed(t, s)), commits)
	}
}

// TestFileSpoolReservations: reservations come back after a reopen, into
// the memory store of their account, but not released or expired ones.
func TestFileSpoolReservations(t *testing.T) {
	dir := t.TempDir()
	s := openTestSpool(t, dir, testPolicy)
	now := time.Now()
	kept, released, expired, other := uuid.New(), uuid.New(), uuid.New(), uuid.New()
	for _, r := range []struct {
		id      uuid.UUID
		account string
		exp     time.Time
	}{{kept, testAccount, now.Add(time.Hour)}, {released, testAccount, now.Add(time.Hour)},
		{expired, testAccount, now.Add(-time.Second)}, {other, "other", now.Add(time.Hour)}} {
		if err := s.reserve(r.account, r.id, r.exp); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.unreserve(testAccount, released, now.Add(time.Hour).UnixNano()); err != nil {
		t.Fatal(err)
	}
	if err := s.Destruct(); err != nil { // commits what is queued
		t.Fatal(err)
	}
	s = openTestSpool(t, dir, testPolicy)
	defer s.Destruct()
	if got := keptReservations(t, s, testAccount); len(got) != 1 || got[kept] != now.Add(time.Hour).UnixNano() {
		t.Fatalf("reservations %v, want only %s", got, kept)
	}
	if got := keptReservations(t, s, "other"); len(got) != 1 {
		t.Fatalf("the other account's reservations %v", got)
	}
}

// keptReservations hands account's reservations kept in s to a new memory
// store, and returns what it holds.
func keptReservations(t *testing.T, s *fileSpool, account string) map[uuid.UUID]int64 {
	t.Helper()
	store := newMemoryStore(defaultReplayMaxEntries)
	if err := s.keepReservations(account, store); err != nil {
		t.Fatal(err)
	}
	store.mu.Lock()
	defer store.mu.Unlock()
	return maps.Clone(store.entries)
}

// TestFileSpoolAdoptsOldReservations: a spool.db written by a version that
// kept the reservations in its replay bucket opens with them still
// refusing copies; they move into the journal, and the bucket goes.
func TestFileSpoolAdoptsOldReservations(t *testing.T) {
	dir := t.TempDir()
	db, err := bolt.Open(filepath.Join(dir, "spool.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	live, expired := uuid.New(), uuid.New()
	err = db.Update(func(tx *bolt.Tx) error {
		for _, name := range spoolBuckets {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		b := tx.Bucket(bucketReplay)
		if err := b.Put(replayKey(live, now.Add(time.Hour)), []byte(testAccount)); err != nil {
			return err
		}
		return b.Put(replayKey(expired, now.Add(-time.Minute)), []byte(testAccount))
	})
	if err != nil {
		t.Fatal(err)
	}
	db.Close()

	for range 2 { // moved at the first open; from the journal at the second
		s := openTestSpool(t, dir, testPolicy)
		if got := keptReservations(t, s, testAccount); len(got) != 1 || got[live] != now.Add(time.Hour).UnixNano() {
			t.Fatalf("reservations %v, want only %s", got, live)
		}
		_ = s.db.View(func(tx *bolt.Tx) error {
			if tx.Bucket(bucketReplay) != nil {
				t.Error("spool.db still has its replay bucket")
			}
			return nil
		})
		if err := s.Destruct(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestFileSpoolPermissions: the directory is 0700 and the database 0600.
func TestFileSpoolPermissions(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "spool")
	abs, err := spoolDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	s := openTestSpool(t, abs, testPolicy)
	defer s.Destruct()
	for path, want := range map[string]os.FileMode{abs: 0o700 | os.ModeDir, filepath.Join(abs, "spool.db"): 0o600} {
		info, err := os.Stat(path)
		if err != nil || info.Mode() != want {
			t.Errorf("%s: %v %v, want %v", path, info.Mode(), err, want)
		}
	}
	second := newFileSpool(abs, testPolicy)
	defer second.Destruct()
	if err := second.open(); err == nil || err.Error() != fmt.Sprintf("spool store %s is locked by another process: give each Caddy its own spool directory (spool { store file <dir> })", filepath.Join(abs, "spool.db")) {
		t.Errorf("a second open: %v", err)
	}
}

// TestAdminStoreNotOpen: the admin API says 503 for a file store that
// cannot be opened, whose entries are not known: for the listing, and for
// a retry or delete it cannot find elsewhere (not 404: the entry may be in
// that store).
func TestAdminStoreNotOpen(t *testing.T) {
	blocker := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(blocker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s, key, err := loadFileSpool(filepath.Join(blocker, "spool"), testPolicy) // its directory cannot be made
	if err != nil {
		t.Fatal(err)
	}
	defer spools.Delete(key)
	if s.up() {
		t.Fatal("a store under a file opened")
	}
	id := uuid.NewString()
	for _, tc := range []struct {
		method, path string
		serve        func(http.ResponseWriter, *http.Request) error
	}{
		{http.MethodGet, "/trivialsec_webhook/spool", adminSpool{}.list},
		{http.MethodPost, "/trivialsec_webhook/spool/" + id + "/retry", adminSpool{}.entry},
		{http.MethodDelete, "/trivialsec_webhook/spool/" + id, adminSpool{}.entry},
	} {
		err := tc.serve(httptest.NewRecorder(), httptest.NewRequest(tc.method, tc.path, nil))
		if ae, ok := errors.AsType[caddy.APIError](err); !ok || ae.HTTPStatus != http.StatusServiceUnavailable {
			t.Errorf("%s %s: %v, want 503", tc.method, tc.path, err)
		}
	}
}
