// Package journal keeps replay reservations durable across restarts: an
// append-only log of segment files, written by one goroutine that commits
// every record queued meanwhile with one write and one fdatasync (group
// commit). It keeps no index and answers no lookups: the caller holds the
// live set in memory and rebuilds it with Replay after a restart. Segments
// whose records have all expired are deleted whole, so the disk holds what
// is alive plus about one SegmentAge of history.
package journal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Record operations.
const (
	OpAdd     byte = 1 // a reservation made
	OpRelease byte = 2 // a reservation given back (same ID and Expires as its add)
)

// MaxAccount is the longest Account a record carries: its length is one byte.
const MaxAccount = 255

// ErrClosed is returned by every call on a closed journal.
var ErrClosed = errors.New("journal is closed")

// Record is one entry of the journal.
type Record struct {
	Op      byte
	ID      [16]byte
	Expires int64  // Unix nanoseconds; the record is dead once this is not after now
	Account string // at most MaxAccount bytes
}

// Options configure Open.
type Options struct {
	Dir         string                      // made 0700 if missing
	SegmentAge  time.Duration               // a new segment at least this often while appends come (default 10 min)
	SegmentSize int64                       // or once a segment holds this many bytes (default 64 MiB)
	Warn        func(msg string, err error) // damage found, a segment that could not be deleted...; nil: silent; called from any goroutine
	Now         func() time.Time            // default time.Now (tests)

	// CommitInterval is the least time from the start of one commit to
	// the start of the next: records of the moment wait for it and share
	// one commit. Each commit costs the kernel about as much CPU whatever
	// it holds (a write and a cache flush: 50 to 100 µs in a VM), so under
	// load this is what bounds the journal's CPU; a record that comes
	// when the last commit is older than this is committed at once. 0: a
	// commit starts as soon as the last one ended.
	CommitInterval time.Duration
}

const (
	defaultSegmentAge  = 10 * time.Minute
	defaultSegmentSize = 64 << 20

	// Segments grow by writing zeros ahead, in chunks of this many bytes,
	// so that most fdatasyncs need not update the file's size: on ext4
	// this took about a third off a commit's latency, a fifth off its CPU.
	preallocChunk = 1 << 20

	// A commit buffer grown past this by a burst is not kept for reuse.
	maxSpare = 4 << 20

	// Read buffer of a scan: hundreds of frames a read.
	scanBuffer = 64 << 10

	minExpires = math.MinInt64
)

// zeros is what preallocation writes; never written itself, it costs no memory.
var zeros [preallocChunk]byte

// Test hooks: the system calls that make data durable.
var (
	fdatasync = datasync // a segment's data and size
	syncDir   = dirSync  // a directory's entries
)

// Journal is an open journal. Its methods are safe for concurrent use.
type Journal struct {
	dir     string
	age     time.Duration
	pace    time.Duration // CommitInterval
	limit   int64
	chunk   int64
	warnFn  func(string, error)
	now     func() time.Time
	dirFile *os.File // open for syncing the directory, and locked (Linux) so that no other journal uses it

	// Appenders and the committer meet here, holding it only to copy a
	// record in or to swap buffers.
	mu       sync.Mutex
	buf      []byte // frames of records waiting for the next commit
	spare    []byte // the last batch's buffer, given back for the next swap
	queued   int64  // records in buf
	inflight int64  // records in the batch being committed
	bufMax   int64  // largest Expires in buf
	batch    *batch // what buf's records learn when they are committed
	closed   bool
	broken   error // no segment could be made: Write fails with it until one can

	wake     chan struct{} // a record was queued, or Close was called
	stop     chan struct{} // closed by Close: the pass over old segments gives up
	scanned  chan struct{} // closed when that pass is over
	workers  sync.WaitGroup
	closeErr error // the committer's last word, read after it has stopped

	commits atomic.Uint64
	failed  atomic.Uint64 // batches that could not be committed

	segMu sync.Mutex
	segs  []*segment // oldest first; the active one, if any, last

	pruneMu sync.Mutex // one deletion pass at a time

	// Owned by the committer.
	active  *segment
	nextSeq uint64
}

// A batch is the records of one commit. Its waiters share one channel, so
// that waking them costs nothing per waiter.
type batch struct {
	done chan struct{} // closed once the batch is durable, or failed
	err  error         // why it failed, set before done is closed
}

func newBatch() *batch { return &batch{done: make(chan struct{})} }

// Open opens the journal in opts.Dir and starts a new segment for appends.
// It reads no old segment: Replay does, and a background pass learns which
// of them may be deleted.
func Open(opts Options) (*Journal, error) {
	if opts.Dir == "" {
		return nil, errors.New("journal directory is not set")
	}
	j := &Journal{
		dir:     opts.Dir,
		age:     opts.SegmentAge,
		pace:    opts.CommitInterval,
		limit:   opts.SegmentSize,
		warnFn:  opts.Warn,
		now:     opts.Now,
		bufMax:  minExpires,
		batch:   newBatch(),
		wake:    make(chan struct{}, 1),
		stop:    make(chan struct{}),
		scanned: make(chan struct{}),
	}
	if j.age <= 0 {
		j.age = defaultSegmentAge
	}
	if j.limit <= 0 {
		j.limit = defaultSegmentSize
	}
	// Preallocating more than a segment holds would only write zeros to cut off.
	j.chunk = min(preallocChunk, (j.limit+4095)&^4095)
	if j.now == nil {
		j.now = time.Now
	}
	if _, err := os.Stat(j.dir); errors.Is(err, fs.ErrNotExist) {
		if err := makeDir(j.dir); err != nil {
			return nil, err
		}
	}
	d, err := openDir(j.dir)
	if err != nil {
		return nil, err
	}
	j.dirFile = d
	old, err := listSegments(j.dir)
	if err != nil {
		d.Close()
		return nil, fmt.Errorf("listing journal segments: %w", err)
	}
	j.segs = old
	j.nextSeq = 1
	if len(old) > 0 {
		j.nextSeq = old[len(old)-1].seq + 1
	}
	if err := j.startSegment(); err != nil {
		d.Close()
		return nil, err
	}
	j.workers.Add(2)
	go j.commitLoop()
	go j.settle(slices.Clone(old))
	return j, nil
}

// makeDir makes dir, durably: until its parent's entry for it is synced, a
// crash could lose the directory with every segment in it.
func makeDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("making journal directory: %w", err)
	}
	parent, err := os.Open(filepath.Dir(dir))
	if err == nil {
		err = syncDir(parent)
		parent.Close()
	}
	if err != nil {
		return fmt.Errorf("syncing the directory of the journal directory: %w", err)
	}
	return nil
}

// Sync appends r and returns once it is on stable storage, or failed.
// Concurrent callers share one write and one fdatasync.
func (j *Journal) Sync(r Record) error {
	b, err := j.append(&r, true)
	if err != nil {
		return err
	}
	<-b.done
	return b.err
}

// Write appends r and returns at once; the next commit makes it durable.
// It fails for a bad record, a closed journal, or while no segment can be
// made (then it asks for another attempt).
func (j *Journal) Write(r Record) error {
	_, err := j.append(&r, false)
	return err
}

// append queues r for the next commit and returns the batch it is in.
func (j *Journal) append(r *Record, wait bool) (*batch, error) {
	if r.Op != OpAdd && r.Op != OpRelease {
		return nil, fmt.Errorf("journal record op %d is unknown: use OpAdd or OpRelease", r.Op)
	}
	if len(r.Account) > MaxAccount {
		return nil, fmt.Errorf("journal record account is %d bytes long, the limit is %d", len(r.Account), MaxAccount)
	}
	var frame [maxFrame]byte
	n := encode(&frame, r)

	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		return nil, ErrClosed
	}
	if err := j.broken; err != nil && !wait {
		j.mu.Unlock()
		j.poke()
		return nil, err
	}
	j.buf = append(j.buf, frame[:n]...)
	j.bufMax = max(j.bufMax, r.Expires)
	j.queued++
	b := j.batch
	j.mu.Unlock()

	j.poke()
	return b, nil
}

// poke wakes the committer, or leaves it a wake-up if it is busy.
func (j *Journal) poke() {
	select {
	case j.wake <- struct{}{}:
	default:
	}
}

// commitLoop is the committer: it takes whatever was queued while the last
// commit ran, and commits it. No timer: the fdatasync is the batching window.
func (j *Journal) commitLoop() {
	defer j.workers.Done()
	var last time.Time
	for range j.wake {
		if wait := j.pace - time.Since(last); wait > 0 {
			time.Sleep(wait) // Close waits for it too: at most one interval
		}
		last = time.Now()
		next := newBatch()
		j.mu.Lock()
		buf, n, bufMax, b, closed := j.buf, j.queued, j.bufMax, j.batch, j.closed
		if n > 0 {
			j.buf, j.spare = j.spare[:0], nil
			j.queued, j.inflight, j.bufMax = 0, n, minExpires
			j.batch = next
		}
		j.mu.Unlock()

		var err error
		if n > 0 || j.active == nil && !closed {
			err = j.commit(buf, bufMax)
		}
		if n > 0 {
			j.mu.Lock()
			j.inflight = 0
			if cap(buf) <= maxSpare {
				j.spare = buf[:0]
			}
			j.mu.Unlock()
			if err != nil {
				j.failed.Add(1)
			}
			b.err = err
			close(b.done)
		}
		if closed {
			if j.active != nil {
				err = errors.Join(err, j.seal())
			}
			j.closeErr = err
			return
		}
	}
}

// commit writes buf, a batch of frames whose largest Expires is bufMax, at
// the end of the active segment and syncs it: first rotating, or making a
// segment if there is none. With an empty buf it only makes sure there is an
// active segment.
func (j *Journal) commit(buf []byte, bufMax int64) error {
	if s := j.active; s != nil && len(buf) > 0 {
		if now := j.now(); now.Sub(s.born) >= j.age || s.end >= j.limit {
			j.seal()
			j.prune(now)
		}
	}
	if j.active == nil {
		err := j.startSegment()
		j.mu.Lock()
		j.broken = err
		j.mu.Unlock()
		if err != nil {
			return err
		}
	}
	if len(buf) == 0 {
		return nil
	}
	s := j.active
	checksum(buf)
	if err := j.write(s, buf); err != nil {
		// After a failed fdatasync the kernel may have dropped the pages:
		// nothing more is written to this file.
		j.seal()
		return fmt.Errorf("writing journal segment %s: %w", s.path, err)
	}
	s.maxExp.Store(max(s.maxExp.Load(), bufMax))
	j.commits.Add(1)
	return nil
}

// write appends buf to s and syncs it, preallocating ahead first if needed.
func (j *Journal) write(s *segment, buf []byte) error {
	end := s.end + int64(len(buf))
	if end > s.front {
		front := (end + j.chunk - 1) / j.chunk * j.chunk
		for off := s.front; off < front; {
			n, err := s.f.WriteAt(zeros[:min(front-off, preallocChunk)], off)
			if err != nil {
				return err
			}
			off += int64(n)
		}
		s.front = front
	}
	if _, err := s.f.WriteAt(buf, s.end); err != nil {
		return err
	}
	if err := fdatasync(s.f); err != nil {
		return err
	}
	s.end = end
	s.size.Store(end)
	return nil
}

// startSegment makes a new active segment: its header synced, and its
// directory entry.
func (j *Journal) startSegment() error {
	s := &segment{seq: j.nextSeq, path: filepath.Join(j.dir, segmentName(j.nextSeq)), born: j.now()}
	j.nextSeq++
	f, err := os.OpenFile(s.path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("making journal segment: %w", err)
	}
	if _, err = f.Write(header[:]); err == nil {
		err = fdatasync(f)
	}
	if err == nil {
		err = syncDir(j.dirFile)
	}
	if err != nil {
		f.Close()
		if rmErr := os.Remove(s.path); rmErr != nil {
			j.warn("could not delete the journal segment "+s.path+" that failed as it was made", rmErr)
		}
		return fmt.Errorf("making journal segment %s: %w", s.path, err)
	}
	s.f, s.end, s.front = f, headerSize, headerSize
	s.size.Store(headerSize)
	s.maxExp.Store(minExpires)
	s.known.Store(true)
	s.live.Store(true)
	j.active = s
	j.segMu.Lock()
	j.segs = append(j.segs, s)
	j.segMu.Unlock()
	return nil
}

// seal ends the active segment: cut to what was synced (the zeros ahead, or
// the bytes of a failed batch, go), and closed.
func (j *Journal) seal() error {
	s := j.active
	j.active = nil
	if err := s.f.Truncate(s.end); err != nil {
		j.warn("could not cut journal segment "+s.path+" to its size", err)
	}
	err := s.f.Close()
	if err != nil {
		j.warn("could not close journal segment "+s.path, err)
	}
	s.f = nil
	s.live.Store(false)
	return err
}

// prune deletes every sealed segment whose records have all expired at now.
func (j *Journal) prune(now time.Time) {
	j.pruneMu.Lock()
	defer j.pruneMu.Unlock()
	cut := now.UnixNano()
	var victims []*segment
	j.segMu.Lock()
	for _, s := range j.segs {
		if !s.live.Load() && !s.bad.Load() && s.known.Load() && s.maxExp.Load() <= cut {
			s.deleting.Store(true)
			victims = append(victims, s)
		}
	}
	j.segMu.Unlock()
	if len(victims) == 0 {
		return
	}
	gone := 0
	for _, s := range victims {
		if err := os.Remove(s.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			j.warn("could not delete expired journal segment "+s.path, err)
			s.deleting.Store(false)
			continue
		}
		gone++
	}
	if gone == 0 {
		return
	}
	if err := syncDir(j.dirFile); err != nil {
		j.warn("could not sync journal directory "+j.dir+" after deleting segments", err)
	}
	j.segMu.Lock()
	j.segs = slices.DeleteFunc(j.segs, func(s *segment) bool { return s.deleting.Load() })
	j.segMu.Unlock()
}

// settle is the pass over the segments found at Open: it learns the largest
// Expires of each that Replay has not read yet, then deletes those expired.
func (j *Journal) settle(old []*segment) {
	defer j.workers.Done()
	defer close(j.scanned)
	var buf []byte
	for _, s := range old {
		select {
		case <-j.stop:
			return
		default:
		}
		if s.known.Load() || s.bad.Load() {
			continue
		}
		if buf == nil {
			buf = make([]byte, scanBuffer)
		}
		if err := j.read(s, buf, func([]byte) {}); err != nil {
			j.warn("could not read journal segment "+s.path, err)
		}
	}
	j.prune(j.now())
}

// Replay calls fn with every record of every segment, oldest segment first,
// in append order, skipping records whose Expires is not after now; the
// caller applies adds and releases itself. It may run while appends go on:
// it reads the active segment as far as it was synced. Damage is reported
// to Warn, once per segment, and skipped; an error means a segment could
// not be read, and fn has still been called with the records of the others.
func (j *Journal) Replay(now time.Time, fn func(Record)) error {
	j.mu.Lock()
	closed := j.closed
	j.mu.Unlock()
	if closed {
		return ErrClosed
	}
	j.segMu.Lock()
	segs := slices.Clone(j.segs)
	j.segMu.Unlock()

	cut := now.UnixNano()
	// One string per account. Records of one account tend to come in runs,
	// and comparing with the last is cheaper than a map lookup.
	accounts := make(map[string]string)
	var last string
	visit := func(p []byte) {
		r := Record{Op: p[0], Expires: int64(binary.LittleEndian.Uint64(p[1:]))}
		if r.Expires <= cut {
			return
		}
		copy(r.ID[:], p[9:25])
		if string(p[26:]) != last {
			acct, ok := accounts[string(p[26:])]
			if !ok {
				acct = string(p[26:])
				accounts[acct] = acct
			}
			last = acct
		}
		r.Account = last
		fn(r)
	}
	buf := make([]byte, scanBuffer)
	var errs []error
	for _, s := range segs {
		if s.bad.Load() {
			continue
		}
		if err := j.read(s, buf, visit); err != nil {
			errs = append(errs, fmt.Errorf("reading journal segment %s: %w", s.path, err))
		}
	}
	return errors.Join(errs...)
}

// read scans segment s with fn, and learns from it what there is to learn:
// its largest Expires, its damage. A segment deleted meanwhile reads as empty.
func (j *Journal) read(s *segment, buf []byte, fn func(p []byte)) error {
	f, err := os.Open(s.path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) && s.deleting.Load() {
			return nil
		}
		return err
	}
	defer f.Close()
	maxExp, dmg, err := scan(f, s.size.Load(), buf, fn)
	if err != nil {
		return err
	}
	if dmg != nil {
		if dmg.header {
			s.bad.Store(true)
		}
		if s.warned.CompareAndSwap(false, true) {
			msg := fmt.Sprintf("journal segment %s damaged at offset %d: the records from there on are skipped", s.path, dmg.off)
			if dmg.header {
				msg = fmt.Sprintf("journal segment %s is not one this build reads: skipped and kept", s.path)
			}
			j.warn(msg, errors.New(dmg.reason))
		}
		if dmg.header {
			return nil
		}
	}
	if s.old {
		s.maxExp.Store(maxExp)
		s.known.Store(true)
	}
	return nil
}

func (j *Journal) warn(msg string, err error) {
	if j.warnFn != nil {
		j.warnFn(msg, err)
	}
}

// Close stops accepting records, commits those queued (their Sync callers
// get their answers), and closes the active segment. Later calls fail with
// ErrClosed.
func (j *Journal) Close() error {
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		return ErrClosed
	}
	j.closed = true
	j.mu.Unlock()
	j.poke()
	close(j.stop)
	j.workers.Wait()
	return errors.Join(j.closeErr, j.dirFile.Close())
}

// Pending is the number of records appended but not yet committed.
func (j *Journal) Pending() int64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.queued + j.inflight
}

// Size is the number of bytes the segments hold.
func (j *Journal) Size() int64 {
	j.segMu.Lock()
	defer j.segMu.Unlock()
	var n int64
	for _, s := range j.segs {
		n += s.size.Load()
	}
	return n
}

// Segments is the number of segment files.
func (j *Journal) Segments() int {
	j.segMu.Lock()
	defer j.segMu.Unlock()
	return len(j.segs)
}

// Commits is the number of group commits done.
func (j *Journal) Commits() uint64 {
	return j.commits.Load()
}

// Failed is how many batches could not be committed: a Write's record in
// one of them is not on disk, and nobody was told. A caller that needs all
// of its Writes durable compares it before and after their Sync.
func (j *Journal) Failed() uint64 {
	return j.failed.Load()
}
