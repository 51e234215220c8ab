package trivialsecwebhook

import (
	"container/heap"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/google/uuid"
	bolt "go.etcd.io/bbolt"
	"go.uber.org/zap"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/journal"
)

// The file store: one bbolt database per directory, spool.db, shared by every
// config that names the directory and kept across reloads. Commits are
// fsync'd; concurrent writers share one commit (commitLoop). The store keeps
// an index of every entry's metadata in memory, for scheduling and listing;
// requests and bodies stay on disk until a re-drive reads them.

// Buckets of spool.db.
var (
	bucketMeta    = []byte("meta")    // event ID -> spoolMeta, JSON
	bucketRequest = []byte("request") // event ID -> spoolRequest, JSON
	bucketBody    = []byte("body")    // event ID -> the body, as it came
	bucketReplay  = []byte("replay")  // expiry (8 bytes, Unix ns, big-endian) + event ID -> account
)

// spoolLockTimeout is how long opening spool.db waits for another process's
// lock on it before it gives up.
const spoolLockTimeout = 2 * time.Second

// fileSpool is the file store. It is made at provision, without touching
// the disk (`caddy validate` provisions a config, and must neither create
// the directory nor take the lock of the store a running Caddy holds), and
// opened when a config using it starts (spoolApp), or by the first delivery
// before that. A store that cannot be opened is not up: deliveries go to the
// next handler without it, and it is tried again in the background.
type fileSpool struct {
	dir string

	openMu  sync.Mutex
	db      *bolt.DB                // nil until open
	tried   atomic.Bool             // open was called
	opened  atomic.Bool             // db is open
	openErr string                  // what the last failed open said, as logged
	damaged os.FileInfo             // spool.db as it was when found damaged: not read again while it is the same
	damage  error                   // what was found
	kept    map[string]*memoryStore // account -> the memory replay store whose reservations it keeps
	journal *journal.Journal        // the replay reservations; set with db

	queueMu   sync.Mutex
	queue     []*commitOp   // writes waiting for the next commit
	queued    chan struct{} // a write was queued
	closing   bool
	committed chan struct{} // closed when commitLoop has written its last

	*scheduler       // its index: every entry, dead letters too
	bytes      int64 // held by entries, and reserved by writes under way; under mu
}

// loadFileSpool takes the store in dir over from an earlier config, or
// makes it, and returns it with its key in spools.
func loadFileSpool(dir string, policy spoolPolicy) (*fileSpool, string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, "", fmt.Errorf("spool directory %s: %v", dir, err)
	}
	key := "file:" + abs
	v, _, err := spools.LoadOrNew(key, func() (caddy.Destructor, error) {
		return newFileSpool(abs, policy), nil
	})
	if err != nil {
		return nil, "", err
	}
	s := v.(*fileSpool)
	s.setPolicy(policy)
	return s, key, nil
}

// newFileSpool makes the store of dir, not opened yet.
func newFileSpool(dir string, policy spoolPolicy) *fileSpool {
	s := &fileSpool{
		dir:       dir,
		kept:      make(map[string]*memoryStore),
		queued:    make(chan struct{}, 1),
		committed: make(chan struct{}),
	}
	s.scheduler = newScheduler(s, false, policy)
	return s
}

// ready opens the store if nobody tried yet, and says whether it is open.
// Once open was tried, it answers at once.
func (s *fileSpool) ready() error {
	if s.opened.Load() {
		return nil
	}
	if !s.tried.Load() {
		return s.open()
	}
	return errSpoolClosed
}

// start opens the store when a config using it starts; one that cannot
// open degrades, and tries again.
func (s *fileSpool) start() error {
	_ = s.open()
	return nil
}

// spoolReopenInterval is how often a store that could not be opened is
// tried again.
var spoolReopenInterval = 10 * time.Second

// open opens the store, the first time it is called. When it cannot (the
// directory cannot be made, the disk is full, the file is damaged or locked
// by another process), it says so at ERROR, and tries again every
// spoolReopenInterval in the background until it opens or the store is
// destroyed.
func (s *fileSpool) open() error {
	s.openMu.Lock()
	defer s.openMu.Unlock()
	if s.tried.Load() {
		if s.db != nil {
			return nil
		}
		return errSpoolClosed
	}
	if s.stopped.Err() != nil {
		return errSpoolClosed
	}
	err := s.tryOpen()
	s.tried.Store(true)
	if err != nil {
		s.workers.Add(1)
		go s.reopenLoop()
	}
	return err
}

// reopenLoop tries to open the store every spoolReopenInterval, until it
// opens or the store is destroyed.
func (s *fileSpool) reopenLoop() {
	defer s.workers.Done()
	for s.pause(spoolReopenInterval) {
		s.openMu.Lock()
		var err error = errSpoolClosed
		if s.stopped.Err() == nil {
			err = s.tryOpen()
		}
		s.openMu.Unlock()
		if err == nil {
			return
		}
	}
}

// tryOpen opens (or creates) spool.db, loads the index of its entries and
// the replay reservations, and starts the commit and re-drive loops; or
// logs why it could not, at ERROR, once for each new reason. Call with
// s.openMu held.
func (s *fileSpool) tryOpen() error {
	err := s.openUnlessDamaged()
	if err != nil {
		if msg := err.Error(); msg != s.openErr {
			s.openErr = msg
			s.log().Error("spool: the store cannot be opened: deliveries go to the next handler without the spool, "+
				"and a failure goes back to the sender, until it opens; it is tried again every "+spoolReopenInterval.String(),
				zap.Error(err))
		}
		return err
	}
	if s.openErr != "" {
		s.log().Info("spool: the store is open: deliveries are spooled again")
		s.openErr = ""
	}
	return nil
}

// openUnlessDamaged opens the store, unless spool.db is the very file found
// damaged before (same file, size and modification time): checking a
// large file again every spoolReopenInterval would read it all each time.
// Call with s.openMu held.
func (s *fileSpool) openUnlessDamaged() error {
	path := filepath.Join(s.dir, "spool.db")
	if s.damaged != nil {
		info, err := os.Stat(path)
		if err == nil && os.SameFile(info, s.damaged) && info.Size() == s.damaged.Size() && info.ModTime().Equal(s.damaged.ModTime()) {
			return s.damage
		}
		s.damaged = nil
	}
	err := s.openDB()
	if errors.Is(err, errSpoolDamaged) {
		if info, serr := os.Stat(path); serr == nil {
			s.damaged, s.damage = info, err
		}
	}
	return err
}

// openDB is tryOpen's work. Call with s.openMu held.
func (s *fileSpool) openDB() error {
	if _, err := spoolDir(s.dir); err != nil {
		return err
	}
	path := filepath.Join(s.dir, "spool.db")
	db, err := openSpoolDB(path)
	if err != nil {
		return err
	}
	skipped := 0
	s.mu.Lock()
	err = db.Update(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketMeta, bucketRequest, bucketBody} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		return tx.Bucket(bucketMeta).ForEach(func(k, v []byte) error {
			m := new(spoolMeta)
			if err := json.Unmarshal(v, m); err != nil || len(k) != len(m.EventID) || uuid.UUID(k) != m.EventID {
				// One bad record must not stop the others: it stays on
				// disk, for salvage or an operator, and is said.
				skipped++
				s.log().Error("spool: an entry of the store cannot be read, and is skipped: it is not delivered",
					zap.String("key", fmt.Sprintf("%x", k)), zap.Error(err))
				return nil
			}
			s.schedule(*m) // a dead letter's heap item is skipped
			s.bytes += m.Size
			return nil
		})
	})
	if err != nil {
		clear(s.entries)
		s.bytes, s.due, s.tally = 0, nil, spoolStats{}
		s.mu.Unlock()
		_ = db.Close()
		return fmt.Errorf("spool store %s cannot be read: %v", path, err)
	}
	n := len(s.entries)
	s.mu.Unlock()
	j, err := s.openJournal(db)
	if err != nil {
		s.mu.Lock()
		clear(s.entries)
		s.bytes, s.due, s.tally = 0, nil, spoolStats{}
		s.mu.Unlock()
		_ = db.Close()
		return err
	}
	s.db, s.journal = db, j
	for account, store := range s.kept {
		if err := s.preload(account, store); err != nil {
			s.log().Error("spool: the replay reservations kept in the store cannot be read: a restart forgets them", zap.Error(err))
		}
	}
	if n > 0 || skipped > 0 {
		s.log().Info("spool opened with deliveries to re-drive", zap.Int("entries", n), zap.Int64("bytes", s.bytes), zap.Int("unreadable", skipped))
	}
	go s.commitLoop() // it ends when Destruct closes the queue
	s.workers.Add(1)
	go s.redriveLoop()
	s.opened.Store(true)
	return nil
}

// keepReservations makes the store keep a memory replay store's
// reservations, and hands it the ones it kept: now if it is open, else when
// it opens.
func (s *fileSpool) keepReservations(account string, store *memoryStore) error {
	s.openMu.Lock()
	defer s.openMu.Unlock()
	s.kept[account] = store
	if s.db == nil {
		return nil
	}
	return s.preload(account, store)
}

// preload hands an account's kept reservations to its memory store, once
// per store. Call with s.openMu held and the database open.
func (s *fileSpool) preload(account string, store *memoryStore) error {
	err := store.preload(s.dir, func(add, release func(uuid.UUID, int64)) error {
		return s.journal.Replay(time.Now(), func(r journal.Record) {
			switch {
			case r.Account != account:
			case r.Op == journal.OpAdd:
				add(r.ID, r.Expires)
			case r.Op == journal.OpRelease:
				release(r.ID, r.Expires)
			}
		})
	})
	if err != nil {
		return fmt.Errorf("replay: reading the reservations kept in the spool store %s: %v", s.dir, err)
	}
	return nil
}

// log is the store's logger: Caddy's current one, as the store outlives the
// config that opened it.
func (s *fileSpool) log() *zap.Logger {
	return caddy.Log().Named("http.handlers.trivialsec_webhook").With(s.logFields()...)
}

func (s *fileSpool) logFields() []zap.Field { return []zap.Field{zap.String("spool", s.dir)} }

// up reports whether the store is open; before a config using it started,
// it opens it.
func (s *fileSpool) up() bool { return s.ready() == nil }

// Destruct stops the loops and closes the database, with the last config
// using the store. Writes queued before it are committed first.
func (s *fileSpool) Destruct() error {
	s.finish()
	s.openMu.Lock()
	s.stop() // under openMu: an open under way finishes first, or none starts
	s.openMu.Unlock()
	s.workers.Wait()
	s.openMu.Lock()
	defer s.openMu.Unlock()
	if s.db == nil {
		return nil
	}
	s.queueMu.Lock()
	s.closing = true
	s.queueMu.Unlock()
	poke(s.queued)
	<-s.committed
	s.opened.Store(false)
	return errors.Join(s.journal.Close(), s.db.Close())
}

// commitOp is one write waiting for a commit.
type commitOp struct {
	fn   func(*bolt.Tx) error // must write nothing when it fails
	done chan error           // nil: nobody waits (commitLater)
}

// errSpoolClosed is what a write gets after Destruct, or when the store
// could not be opened (as the log said then).
var errSpoolClosed = errors.New("the spool store is closed, or could not be opened")

// enqueue queues a write for the next commit, once the store is open.
func (s *fileSpool) enqueue(op *commitOp) bool {
	if s.ready() != nil {
		return false
	}
	s.queueMu.Lock()
	if s.closing {
		s.queueMu.Unlock()
		return false
	}
	s.queue = append(s.queue, op)
	s.queueMu.Unlock()
	poke(s.queued)
	return true
}

// commit runs fn in a write transaction and returns once it is on stable
// storage (fsync'd), or failed.
func (s *fileSpool) commit(fn func(*bolt.Tx) error) error {
	op := &commitOp{fn: fn, done: make(chan error, 1)}
	if !s.enqueue(op) {
		return errSpoolClosed
	}
	return <-op.done
}

// commitLater queues fn for a commit within laterInterval and returns at
// once: writes nobody waits for (deleting what was delivered), so that
// many share a commit.
func (s *fileSpool) commitLater(fn func(*bolt.Tx) error) {
	s.enqueue(&commitOp{fn: fn})
}

// laterInterval is how long commitLater's writes may wait for others to
// share their commit. Each commit costs about a millisecond of CPU here
// (pages written, two fdatasync calls); a crash forgets at most this much
// of them.
const laterInterval = 10 * time.Millisecond

// commitLoop is the group commit: it takes every write queued, commits
// them in one transaction, one fsync for all, and starts again; writes
// queued meanwhile wait for the next round. A round of commitLater writes
// alone waits until laterInterval after the last commit, or until a write
// that someone waits for comes. It commits what is queued when the store
// closes, then stops.
func (s *fileSpool) commitLoop() {
	defer close(s.committed)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var last time.Time
	var batch []*commitOp
	for {
		<-s.queued
		for {
			s.queueMu.Lock()
			batch, s.queue = append(batch, s.queue...), nil
			closing := s.closing
			s.queueMu.Unlock()
			wait := time.Until(last.Add(laterInterval))
			if closing || wait <= 0 || slices.ContainsFunc(batch, func(op *commitOp) bool { return op.done != nil }) {
				break
			}
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-s.queued:
			}
		}
		s.runBatch(batch)
		last = time.Now()
		batch = batch[:0]
		s.queueMu.Lock()
		closing := s.closing && len(s.queue) == 0
		s.queueMu.Unlock()
		if closing {
			return
		}
	}
}

// runBatch commits ops in one transaction. An op that fails is answered
// with its error, and the others are committed without it.
func (s *fileSpool) runBatch(ops []*commitOp) {
	for len(ops) > 0 {
		failed := -1
		var opErr error
		err := s.db.Update(func(tx *bolt.Tx) error {
			for i, op := range ops {
				if opErr = op.fn(tx); opErr != nil {
					failed = i
					return opErr
				}
			}
			return nil
		})
		if failed < 0 {
			spoolCommits.Inc()
			for _, op := range ops {
				s.done(op, err)
			}
			return
		}
		s.done(ops[failed], opErr)
		ops = slices.Delete(ops, failed, failed+1)
	}
}

// done answers a write.
func (s *fileSpool) done(op *commitOp, err error) {
	switch {
	case op.done != nil:
		op.done <- err
	case err != nil:
		s.log().Warn("spool: the deletion of a delivered entry could not be committed: a restart would deliver it again", zap.Error(err))
	}
}

// add spools an entry, durably, or says why it could not.
func (s *fileSpool) add(e *spoolEntry) error {
	size, meta, req, err := e.size()
	if err != nil {
		return err
	}
	id := e.meta.EventID
	s.mu.Lock()
	if old, ok := s.entries[id]; ok {
		// Spooled already (replay protection off, and the same delivery
		// came again): it will be delivered.
		state, unchecked := old.State, old.Unchecked
		s.mu.Unlock()
		switch {
		case state == stateDead:
			return fmt.Errorf("event %s: %w", id, errDeadLetter)
		case unchecked && !e.meta.Unchecked:
			// A delivery checked now, whose copy waits unchecked: this
			// one's reservation would make that one a replay. The sender
			// gets the failure, the reservation goes, and the held copy
			// is delivered.
			return fmt.Errorf("event %s is held in the spool, unchecked, already", id)
		}
		return nil
	}
	if s.bytes+size > s.policy.maxSize {
		s.mu.Unlock()
		return errSpoolFull
	}
	s.bytes += size // reserved while the write is under way
	s.mu.Unlock()

	key := id[:]
	err = s.commit(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketMeta).Get(key) != nil {
			return nil
		}
		if err := tx.Bucket(bucketRequest).Put(key, req); err != nil {
			return err
		}
		if err := tx.Bucket(bucketBody).Put(key, e.body); err != nil {
			return err
		}
		return tx.Bucket(bucketMeta).Put(key, meta)
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.entries[id]; err != nil || ok { // failed, or added at the same time by another write
		s.bytes -= size
		return err
	}
	s.schedule(e.meta)
	spoolSpooled.Inc()
	return nil
}

// take reads an entry's request and body.
func (s *fileSpool) take(m *spoolMeta) (spoolRequest, []byte, error) {
	id := m.EventID
	var req spoolRequest
	var body []byte
	err := s.db.View(func(tx *bolt.Tx) error {
		raw := tx.Bucket(bucketRequest).Get(id[:])
		if raw == nil {
			return fmt.Errorf("event %s has no request in the spool", id)
		}
		if err := json.Unmarshal(raw, &req); err != nil {
			return err
		}
		body = slices.Clone(tx.Bucket(bucketBody).Get(id[:]))
		return nil
	})
	return req, body, err
}

// failed saves the outcome of an attempt.
func (s *fileSpool) failed(m spoolMeta) error { return s.save(m) }

// save writes an entry's metadata again.
func (s *fileSpool) save(m spoolMeta) error {
	raw, err := json.Marshal(&m)
	if err != nil {
		return err
	}
	return s.commit(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketMeta).Get(m.EventID[:]) == nil {
			return nil // deleted meanwhile
		}
		return tx.Bucket(bucketMeta).Put(m.EventID[:], raw)
	})
}

// removeIf deletes an entry an operator drops, durably, if it is stored in
// state ("": any; the index says parked for a stored pending one). It
// reports whether it did.
func (s *fileSpool) removeIf(id uuid.UUID, state string) (bool, error) {
	if err := s.known(); err != nil {
		return false, err
	}
	s.mu.Lock()
	m, ok := s.entries[id]
	waiting := ok && m.Unchecked && m.State != stateDead
	changed := ok && state != "" && (m.State == stateDead) != (state == stateDead)
	s.mu.Unlock()
	if changed {
		return false, nil
	}
	if waiting {
		// It holds no reservation yet: deleted, it would let a copy of the
		// event in. Once checked (or a dead letter) it can go.
		return true, conflictError{fmt.Errorf("event %s is held, unchecked, until the replay store answers: delete it once it is checked", id)}
	}
	err := s.commit(func(tx *bolt.Tx) error {
		if state != "" {
			// Its state as last saved: a retry saves before it indexes.
			var cur struct{ State string }
			raw := tx.Bucket(bucketMeta).Get(id[:])
			if raw == nil || json.Unmarshal(raw, &cur) != nil || cur.State != state {
				changed = true
				return nil
			}
		}
		return deleteEntry(tx, id)
	})
	if err != nil || changed {
		return false, err
	}
	return s.unindex(id), nil
}

// delivered deletes a delivered entry: from the index at once, from the
// disk within laterInterval. A crash in between delivers it again (at
// least once).
func (s *fileSpool) delivered(m spoolMeta) {
	id := m.EventID
	s.unindex(id)
	s.commitLater(func(tx *bolt.Tx) error { return deleteEntry(tx, id) })
}

func deleteEntry(tx *bolt.Tx, id uuid.UUID) error {
	for _, b := range [][]byte{bucketMeta, bucketRequest, bucketBody} {
		if err := tx.Bucket(b).Delete(id[:]); err != nil {
			return err
		}
	}
	return nil
}

// unindex takes an entry out of the index, and reports whether it was in.
func (s *fileSpool) unindex(id uuid.UUID) bool {
	m, ok := s.drop(id, "")
	if ok {
		s.mu.Lock()
		s.bytes -= m.Size
		s.mu.Unlock()
	}
	return ok
}

// errStoreNotOpen is what the admin API gets from a store whose entries are
// not known, as it could not be opened.
var errStoreNotOpen = errors.New("its entries are not known until it opens")

// known is nil once the store is open, its entries known: an open under
// way (the config is starting) is waited for.
func (s *fileSpool) known() error {
	if s.ready() != nil {
		return fmt.Errorf("spool store %s is not open (the log says why): %w", s.dir, errStoreNotOpen)
	}
	return nil
}

// page is a page of the entries f selects; an error while the store is
// not open, whose entries are not known. It reads the index, in memory.
func (s *fileSpool) page(f spoolFilter, after *spoolCursor, limit int) ([]spoolMeta, int64, error) {
	if err := s.known(); err != nil {
		return nil, 0, err
	}
	p := newSpoolPage(after, limit)
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range s.entries {
		if f.selects(m.State, m.EventName, m.Account, m.SpooledAt.UnixMilli()) {
			p.offer(m)
		}
	}
	out, total := p.result()
	return out, total, nil
}

// summary counts the index, in memory.
func (s *fileSpool) summary() (spoolSummary, error) {
	if err := s.known(); err != nil {
		return spoolSummary{}, err
	}
	var sum spoolSummary
	s.mu.Lock()
	for _, m := range s.entries {
		sum.count(m.State, m.EventName, spoolCount{Entries: 1, Bytes: m.Size})
		if m.State == statePending {
			sum.nextAttempt = earliest(sum.nextAttempt, m.NextAttempt)
		}
	}
	sum.oldestPending = s.oldestWaiting()
	s.mu.Unlock()
	sum.breakers = s.breakers()
	return sum, nil
}

// stats is what the store holds.
func (s *fileSpool) stats() spoolStats {
	s.mu.Lock()
	st := s.tally
	st.oldest = s.oldestWaiting()
	st.maxBytes = s.policy.maxSize
	s.mu.Unlock()
	st.down = !s.opened.Load()
	return st
}

// retryNow makes an entry, pending or dead, due at once. It reports
// whether there was one.
func (s *fileSpool) retryNow(id uuid.UUID) (bool, error) {
	if err := s.known(); err != nil {
		return false, err
	}
	s.mu.Lock()
	m, ok := s.entries[id]
	if !ok {
		s.mu.Unlock()
		return false, nil
	}
	updated := *m
	s.mu.Unlock()
	if updated.State == stateDead && updated.Unchecked {
		// A held delivery that could not be checked for replay in time:
		// the operator who retries it vouches for it (docs/several-instances.md).
		updated.Unchecked, updated.ReplayToken = false, ""
	}
	updated.State, updated.NextAttempt = statePending, time.Now()
	if err := s.save(updated); err != nil {
		return true, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if m, ok = s.entries[id]; ok {
		s.restate(m, statePending)
		m.NextAttempt, m.Unchecked, m.ReplayToken = updated.NextAttempt, updated.Unchecked, updated.ReplayToken
		m.gen++
		heap.Push(&s.due, dueItem{at: m.NextAttempt, id: id, gen: m.gen})
		s.signal()
	}
	return true, nil
}

// probeNow probes the routes of entry id's account at once, if their
// breakers are open (an operator retried it).
func (s *fileSpool) probeNow(id uuid.UUID) {
	s.mu.Lock()
	m, ok := s.entries[id]
	s.mu.Unlock()
	if ok {
		s.probeAccount(m.Account)
	}
}

// The replay journal: the memory replay store's reservations, kept on disk
// beside spool.db so that a restart keeps them (docs/checks.md, Replay protection).
// It is an append-only log (internal/journal): a reservation is appended
// and fsync'd, in a group commit shared by the deliveries of the moment,
// before its delivery goes on.

// journalDir is where the journal's segments are, in the spool directory.
const journalDir = "replay"

// journalCommitInterval is the least time between two of the journal's
// commits. Each commit costs the kernel 50 to 100 µs of CPU here whatever it
// holds, so under load the deliveries of the moment wait for one commit
// together: at most a thousand a second, which bounds the journal's CPU,
// while a delivery that comes alone is committed at once (BENCHMARKS.md).
var journalCommitInterval = time.Millisecond

// openJournal opens the replay journal, and moves into it the reservations
// that an older version kept in spool.db's replay bucket: written to the
// journal and synced first, then deleted from spool.db, so that a crash
// between the two keeps them twice, never none. Call with s.openMu held,
// spool.db open and locked (the lock is the journal's too).
func (s *fileSpool) openJournal(db *bolt.DB) (*journal.Journal, error) {
	j, err := journal.Open(journal.Options{
		Dir:            filepath.Join(s.dir, journalDir),
		CommitInterval: journalCommitInterval,
		Warn: func(msg string, err error) {
			s.log().Warn("spool: replay journal: "+msg, zap.Error(err))
		},
	})
	if err != nil {
		return nil, fmt.Errorf("replay journal in %s: %v", s.dir, err)
	}
	moved, err := adoptReservations(db, j, time.Now())
	if err != nil {
		_ = j.Close()
		return nil, fmt.Errorf("moving the replay reservations of %s into its journal: %v", filepath.Join(s.dir, "spool.db"), err)
	}
	if moved > 0 {
		s.log().Info("spool: replay reservations moved from spool.db into the replay journal", zap.Int("reservations", moved))
	}
	return j, nil
}

// adoptReservations appends the unexpired reservations of spool.db's replay
// bucket, if it has one, to j, syncs them, and deletes the bucket.
func adoptReservations(db *bolt.DB, j *journal.Journal, now time.Time) (int, error) {
	var last *journal.Record
	n, failed := 0, j.Failed()
	err := db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketReplay)
		if b == nil {
			return nil
		}
		c := b.Cursor()
		for k, v := c.Seek(replayKey(uuid.Nil, now.Add(time.Nanosecond))); k != nil; k, v = c.Next() {
			if len(k) != 24 || len(v) > 255 {
				continue
			}
			if last != nil {
				if err := j.Write(*last); err != nil {
					return err
				}
			}
			last = &journal.Record{Op: journal.OpAdd, ID: uuid.UUID(k[8:]), Expires: int64(binary.BigEndian.Uint64(k)), Account: string(v)}
			n++
		}
		return nil
	})
	if err == nil && last != nil {
		err = j.Sync(*last)
	}
	if err == nil && j.Failed() != failed {
		// A batch of the Writes failed, and said so to nobody.
		err = errors.New("a write to the replay journal failed")
	}
	if err != nil {
		return 0, err
	}
	return n, db.Update(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketReplay) == nil {
			return nil
		}
		return tx.DeleteBucket(bucketReplay)
	})
}

// replayKey is a reservation's key in the replay bucket of older versions:
// expiry (8 bytes, Unix ns, big-endian) + event ID. Salvage copies that
// bucket from a damaged spool.db; the next open moves it into the journal.
func replayKey(id uuid.UUID, expires time.Time) []byte {
	key := make([]byte, 8+16)
	binary.BigEndian.PutUint64(key, uint64(expires.UnixNano()))
	copy(key[8:], id[:])
	return key
}

// reserve writes a reservation to the journal, and returns once it is on
// disk. A store not open keeps nothing (the log said why it is not open).
func (s *fileSpool) reserve(account string, id uuid.UUID, expires time.Time) error {
	if !s.opened.Load() {
		return nil
	}
	return s.journal.Sync(journal.Record{Op: journal.OpAdd, ID: id, Expires: expires.UnixNano(), Account: account})
}

// unreserve writes the release of a reservation to the journal, so that a
// redelivery passes after a restart too. Nobody waits for it: a crash
// before the next group commit keeps the reservation, which refuses the
// redelivery, as before the release.
func (s *fileSpool) unreserve(account string, id uuid.UUID, expires int64) error {
	if !s.opened.Load() {
		return nil
	}
	return s.journal.Write(journal.Record{Op: journal.OpRelease, ID: id, Expires: expires, Account: account})
}

// journalPending is how many reservations the journal has not synced yet.
func (s *fileSpool) journalPending() int64 {
	if !s.opened.Load() {
		return 0
	}
	return s.journal.Pending()
}
