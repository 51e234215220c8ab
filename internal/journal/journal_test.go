package journal

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"
)

var t0 = time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)

// clock is a settable Now.
type clock struct{ ns atomic.Int64 }

func newClock(t time.Time) *clock {
	c := new(clock)
	c.ns.Store(t.UnixNano())
	return c
}

func (c *clock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *clock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// warnings records what Warn was told.
type warnings struct {
	mu   sync.Mutex
	msgs []string
}

func (w *warnings) warn(msg string, err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.msgs = append(w.msgs, msg+": "+err.Error())
}

func (w *warnings) list() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.msgs)
}

// openT opens a journal that is closed when the test ends.
func openT(t testing.TB, opts Options) *Journal {
	t.Helper()
	j, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := j.Close(); err != nil && !errors.Is(err, ErrClosed) {
			t.Errorf("close: %v", err)
		}
	})
	return j
}

// setFdatasync replaces the fdatasync hook until the test ends. Call it
// before opening the journals that use it, so that they close first.
func setFdatasync(t testing.TB, fn func(*os.File) error) {
	t.Helper()
	saved := fdatasync
	fdatasync = fn
	t.Cleanup(func() { fdatasync = saved })
}

func rec(i int, expires time.Time, account string) Record {
	r := Record{Op: OpAdd, Expires: expires.UnixNano(), Account: account}
	binary.BigEndian.PutUint64(r.ID[8:], uint64(i))
	return r
}

func idOf(r Record) int { return int(binary.BigEndian.Uint64(r.ID[8:])) }

func replayAll(t testing.TB, j *Journal, now time.Time) []Record {
	t.Helper()
	var got []Record
	if err := j.Replay(now, func(r Record) { got = append(got, r) }); err != nil {
		t.Fatal(err)
	}
	return got
}

func ids(recs []Record) []int {
	out := make([]int, len(recs))
	for i, r := range recs {
		out[i] = idOf(r)
	}
	return out
}

// segmentBytes is a segment file holding recs, and where each frame starts.
func segmentBytes(recs ...Record) ([]byte, []int) {
	b := slices.Clone(header[:])
	var offs []int
	for _, r := range recs {
		var f [maxFrame]byte
		n := encode(&f, &r)
		checksum(f[:n])
		offs = append(offs, len(b))
		b = append(b, f[:n]...)
	}
	return b, offs
}

func writeSegment(t testing.TB, dir string, seq uint64, data []byte) string {
	t.Helper()
	path := filepath.Join(dir, segmentName(seq))
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func segmentFiles(t testing.TB, dir string) []string {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "*"+segmentSuffix))
	if err != nil {
		t.Fatal(err)
	}
	for i, n := range names {
		names[i] = filepath.Base(n)
	}
	return names
}

func TestRoundTrip(t *testing.T) {
	dir := t.TempDir()
	clk := newClock(t0)
	j := openT(t, Options{Dir: dir, Now: clk.Now})
	later := t0.Add(time.Hour)
	recs := []Record{
		rec(1, t0.Add(2*time.Hour), "acme"),
		rec(2, t0.Add(30*time.Minute), "acme"), // expired at replay
		rec(3, t0.Add(3*time.Hour), "globex"),
		rec(4, later, "acme"), // expires exactly at replay: dead
		rec(5, t0.Add(2*time.Hour), ""),
		rec(6, t0.Add(2*time.Hour), strings.Repeat("a", MaxAccount)),
	}
	release := recs[0]
	release.Op = OpRelease
	recs = append(recs, release)
	for _, r := range recs {
		if err := j.Sync(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := j.Write(rec(7, t0.Add(2*time.Hour), "globex")); err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	j = openT(t, Options{Dir: dir, Now: clk.Now})
	got := replayAll(t, j, later)
	want := []Record{recs[0], recs[2], recs[4], recs[5], release, rec(7, t0.Add(2*time.Hour), "globex")}
	if !slices.Equal(got, want) {
		t.Fatalf("replay:\n got %v\nwant %v", got, want)
	}
	if unsafe.StringData(got[0].Account) != unsafe.StringData(got[4].Account) {
		t.Error("one account, two strings: accounts are not interned")
	}
	if got := replayAll(t, j, t0); len(got) != len(recs)+1 {
		t.Errorf("replay at t0: %d records, want all %d", len(got), len(recs)+1)
	}
}

// TestRoundTripMany crosses the read buffer's boundaries many times, with
// frames of every length.
func TestRoundTripMany(t *testing.T) {
	dir := t.TempDir()
	j := openT(t, Options{Dir: dir})
	exp := time.Now().Add(time.Hour)
	const n = 20000
	for i := range n {
		if err := j.Write(rec(i, exp, strings.Repeat("x", i%(MaxAccount+1)))); err != nil {
			t.Fatal(err)
		}
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openT(t, Options{Dir: dir})
	got := replayAll(t, j, time.Now())
	if len(got) != n {
		t.Fatalf("%d records, want %d", len(got), n)
	}
	for i, r := range got {
		if idOf(r) != i || len(r.Account) != i%(MaxAccount+1) || r.Expires != exp.UnixNano() {
			t.Fatalf("record %d: %v", i, r)
		}
	}
}

func TestOpenMakesDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "journal")
	openT(t, Options{Dir: dir})
	info, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if perm := info.Mode().Perm(); perm != 0o700 {
		t.Errorf("directory made %v, want 0700", perm)
	}
	if _, err := Open(Options{}); err == nil {
		t.Error("opened a journal without a directory")
	}
}

func TestBadRecord(t *testing.T) {
	j := openT(t, Options{Dir: t.TempDir()})
	exp := time.Now().Add(time.Hour)
	for name, r := range map[string]Record{
		"op_zero":      {Op: 0, Expires: exp.UnixNano()},
		"op_unknown":   {Op: 3, Expires: exp.UnixNano()},
		"account_long": {Op: OpAdd, Expires: exp.UnixNano(), Account: strings.Repeat("a", MaxAccount+1)},
	} {
		if err := j.Sync(r); err == nil {
			t.Errorf("%s: Sync took it", name)
		}
		if err := j.Write(r); err == nil {
			t.Errorf("%s: Write took it", name)
		}
	}
	if n := len(replayAll(t, j, time.Now())); n != 0 {
		t.Errorf("%d records journaled", n)
	}
}

func TestClose(t *testing.T) {
	dir := t.TempDir()
	exp := time.Now().Add(time.Hour)
	j, err := Open(Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		if err := j.Write(rec(i, exp, "acme")); err != nil {
			t.Fatal(err)
		}
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); !errors.Is(err, ErrClosed) {
		t.Errorf("second Close: %v", err)
	}
	if err := j.Sync(rec(200, exp, "acme")); !errors.Is(err, ErrClosed) {
		t.Errorf("Sync after Close: %v", err)
	}
	if err := j.Write(rec(201, exp, "acme")); !errors.Is(err, ErrClosed) {
		t.Errorf("Write after Close: %v", err)
	}
	if err := j.Replay(time.Now(), func(Record) {}); !errors.Is(err, ErrClosed) {
		t.Errorf("Replay after Close: %v", err)
	}
	if j.Pending() != 0 {
		t.Errorf("Pending after Close: %d", j.Pending())
	}

	j = openT(t, Options{Dir: dir})
	if got := replayAll(t, j, time.Now()); len(got) != 100 {
		t.Errorf("queued writes: %d of 100 committed by Close", len(got))
	}
}

// TestCloseAnswersWaiters closes while Sync callers wait behind a commit.
func TestCloseAnswersWaiters(t *testing.T) {
	gate := newGate()
	setFdatasync(t, func(f *os.File) error {
		gate.pass()
		return datasync(f)
	})
	j, err := Open(Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(gate.open)
	exp := time.Now().Add(time.Hour)
	gate.hold.Store(true)
	const n = 8
	errs := make(chan error, n)
	go func() { errs <- j.Sync(rec(0, exp, "acme")) }()
	<-gate.entered
	for i := 1; i < n; i++ {
		go func() { errs <- j.Sync(rec(i, exp, "acme")) }()
	}
	waitFor(t, func() bool { return j.Pending() == n })
	closed := make(chan error)
	go func() { closed <- j.Close() }()
	waitFor(t, func() bool { return j.Write(rec(99, exp, "acme")) != nil })
	gate.open()
	for range n {
		if err := <-errs; err != nil {
			t.Errorf("Sync: %v", err)
		}
	}
	if err := <-closed; err != nil {
		t.Errorf("Close: %v", err)
	}
}

// A gate holds the next fdatasync once armed (hold), until it is opened;
// entered says that one is held. A failed test opens it too, so that
// closing the journal does not hang.
type gate struct {
	once    sync.Once
	ch      chan struct{}
	hold    atomic.Bool
	entered chan struct{}
}

func newGate() *gate { return &gate{ch: make(chan struct{}), entered: make(chan struct{}, 1)} }

// pass is called by an fdatasync hook: it holds the call if the gate is
// armed, and says whether it did.
func (g *gate) pass() bool {
	if !g.hold.CompareAndSwap(true, false) {
		return false
	}
	g.entered <- struct{}{}
	<-g.ch
	return true
}

func (g *gate) open() { g.once.Do(func() { close(g.ch) }) }

// waitFor polls cond, for a state another goroutine reaches without a
// signal to wait on; it fails the test if that takes absurdly long.
func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestGroupCommit holds the first commit in its fdatasync while N-1 more
// Sync calls queue: they must share one commit, and each must return only
// once its record is durable.
func TestGroupCommit(t *testing.T) {
	var (
		mu      sync.Mutex
		durable = map[int]bool{} // IDs on disk when an fdatasync returned
		calls   atomic.Int64
	)
	gate := newGate()
	setFdatasync(t, func(f *os.File) error {
		calls.Add(1)
		gate.pass()
		if err := datasync(f); err != nil {
			return err
		}
		data, err := os.ReadFile(f.Name())
		if err != nil {
			return err
		}
		mu.Lock()
		defer mu.Unlock()
		_, _, err = scan(bytes.NewReader(data), int64(len(data)), make([]byte, scanBuffer), func(p []byte) {
			durable[int(binary.BigEndian.Uint64(p[17:25]))] = true
		})
		return err
	})
	j := openT(t, Options{Dir: t.TempDir()})
	t.Cleanup(gate.open)
	calls.Store(0)
	exp := time.Now().Add(time.Hour)
	const n = 64
	var wg sync.WaitGroup
	sync1 := func(i int) {
		defer wg.Done()
		if err := j.Sync(rec(i, exp, "acme")); err != nil {
			t.Errorf("Sync %d: %v", i, err)
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if !durable[i] {
			t.Errorf("Sync %d returned before its record was durable", i)
		}
	}
	gate.hold.Store(true)
	wg.Add(n)
	go sync1(0)
	<-gate.entered
	for i := 1; i < n; i++ {
		go sync1(i)
	}
	waitFor(t, func() bool { return j.Pending() == n })
	gate.open()
	wg.Wait()
	if c := j.Commits(); c != 2 {
		t.Errorf("%d Sync calls took %d commits, want 2 (one held, one for the rest)", n, c)
	}
	if c := calls.Load(); c != 2 {
		t.Errorf("%d fdatasync calls, want 2", c)
	}
	if p := j.Pending(); p != 0 {
		t.Errorf("Pending %d after every Sync returned", p)
	}
}

// TestReplaySynced replays while a batch is written but its fdatasync has
// not returned: the batch is not in the replay.
func TestReplaySynced(t *testing.T) {
	gate := newGate()
	setFdatasync(t, func(f *os.File) error {
		gate.pass()
		return datasync(f)
	})
	j := openT(t, Options{Dir: t.TempDir()})
	t.Cleanup(gate.open)
	exp := time.Now().Add(time.Hour)
	if err := j.Sync(rec(1, exp, "acme")); err != nil {
		t.Fatal(err)
	}
	gate.hold.Store(true)
	errs := make(chan error, 1)
	go func() { errs <- j.Sync(rec(2, exp, "acme")) }()
	<-gate.entered
	if got := ids(replayAll(t, j, time.Now())); !slices.Equal(got, []int{1}) {
		t.Errorf("replay during the commit of 2: %v, want [1]", got)
	}
	gate.open()
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	if got := ids(replayAll(t, j, time.Now())); !slices.Equal(got, []int{1, 2}) {
		t.Errorf("replay after: %v, want [1 2]", got)
	}
}

// TestSyncFailure fails the fdatasync of a batch of waiters: each gets the
// error, the segment is sealed, and the next Sync goes to a new segment.
func TestSyncFailure(t *testing.T) {
	errDisk := errors.New("disk on fire")
	var fail atomic.Bool
	gate := newGate()
	setFdatasync(t, func(f *os.File) error {
		if gate.pass() {
			return datasync(f)
		}
		if fail.CompareAndSwap(true, false) {
			return errDisk
		}
		return datasync(f)
	})
	dir := t.TempDir()
	j := openT(t, Options{Dir: dir})
	t.Cleanup(gate.open)
	exp := time.Now().Add(time.Hour)
	if err := j.Sync(rec(1, exp, "acme")); err != nil {
		t.Fatal(err)
	}

	// 2 is held in its fdatasync (which succeeds) while 3..6 queue; their
	// batch's fdatasync fails.
	gate.hold.Store(true)
	errs := make(chan error, 5)
	go func() { errs <- j.Sync(rec(2, exp, "acme")) }()
	<-gate.entered
	for i := 3; i <= 6; i++ {
		go func() { errs <- j.Sync(rec(i, exp, "acme")) }()
	}
	waitFor(t, func() bool { return j.Pending() == 5 })
	fail.Store(true)
	gate.open()
	var failed int
	for range 5 {
		if err := <-errs; errors.Is(err, errDisk) {
			failed++
		} else if err != nil {
			t.Errorf("Sync: %v", err)
		}
	}
	if failed != 4 {
		t.Errorf("%d of the failed batch's 4 waiters got its error", failed)
	}
	if n := j.Failed(); n != 1 {
		t.Errorf("Failed() = %d, want 1", n)
	}
	if err := j.Sync(rec(7, exp, "acme")); err != nil {
		t.Fatalf("Sync after a failed commit: %v", err)
	}
	if s := j.Segments(); s != 2 {
		t.Errorf("%d segments, want 2: the failed one sealed, and a new one", s)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	j = openT(t, Options{Dir: dir})
	if got := ids(replayAll(t, j, time.Now())); !slices.Equal(got, []int{1, 2, 7}) {
		t.Errorf("replay after reopen: %v, want [1 2 7] (the failed batch cut off)", got)
	}
}

// TestNoSegment fails every fdatasync, so that no new segment can be made
// either: Sync and Write fail until one can, and then work again.
func TestNoSegment(t *testing.T) {
	errDisk := errors.New("disk gone")
	var fail atomic.Bool
	setFdatasync(t, func(f *os.File) error {
		if fail.Load() {
			return errDisk
		}
		return datasync(f)
	})
	dir := t.TempDir()
	j := openT(t, Options{Dir: dir})
	exp := time.Now().Add(time.Hour)
	fail.Store(true)
	if err := j.Sync(rec(1, exp, "acme")); !errors.Is(err, errDisk) {
		t.Fatalf("Sync on a failing disk: %v", err)
	}
	if err := j.Sync(rec(2, exp, "acme")); !errors.Is(err, errDisk) {
		t.Fatalf("Sync with no segment: %v", err)
	}
	if err := j.Write(rec(3, exp, "acme")); !errors.Is(err, errDisk) {
		t.Fatalf("Write with no segment: %v", err)
	}
	fail.Store(false)
	if err := j.Sync(rec(4, exp, "acme")); err != nil {
		t.Fatalf("Sync once the disk is back: %v", err)
	}
	if err := j.Write(rec(5, exp, "acme")); err != nil {
		t.Fatalf("Write once the disk is back: %v", err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if files := segmentFiles(t, dir); len(files) != 2 {
		t.Errorf("segment files %v: a segment that failed as it was made is left behind", files)
	}
	j = openT(t, Options{Dir: dir})
	if got := ids(replayAll(t, j, time.Now())); !slices.Equal(got, []int{4, 5}) {
		t.Errorf("replay: %v, want [4 5]", got)
	}
}

func TestDamage(t *testing.T) {
	exp := t0.Add(time.Hour)
	// The damaged segment holds 10..13; damage comes at 12's frame.
	mid := []Record{rec(10, exp, "acme"), rec(11, exp, "acme"), rec(12, exp, "acme"), rec(13, exp, "acme")}
	putLen := func(b []byte, off int, n uint32) { binary.LittleEndian.PutUint32(b[off:], n) }
	tests := []struct {
		name   string
		damage func(b []byte, frames []int) []byte
		want   []int // of the damaged segment
		warn   string
	}{
		{"clean", func(b []byte, _ []int) []byte { return b }, []int{10, 11, 12, 13}, ""},
		{"zero_tail", func(b []byte, _ []int) []byte { return append(b, make([]byte, 5000)...) }, []int{10, 11, 12, 13}, ""},
		{"zero_tail_short", func(b []byte, _ []int) []byte { return append(b, 0, 0) }, []int{10, 11, 12, 13}, ""},
		{"torn_tail", func(b []byte, f []int) []byte { return b[:f[3]+20] }, []int{10, 11, 12}, "cut short"},
		{"torn_length", func(b []byte, f []int) []byte { return b[:f[3]+2] }, []int{10, 11, 12}, "cut short"},
		{"torn_then_zeros", func(b []byte, f []int) []byte { return append(b[:f[3]+20], make([]byte, 100)...) }, []int{10, 11, 12}, "checksum"},
		{"garbled_byte", func(b []byte, f []int) []byte { b[f[2]+20] ^= 0x40; return b }, []int{10, 11}, "checksum"},
		{"garbled_crc", func(b []byte, f []int) []byte { b[f[2]+5] ^= 1; return b }, []int{10, 11}, "checksum"},
		{"length_over", func(b []byte, f []int) []byte { putLen(b, f[2], fixedPayload+MaxAccount+1); return b }, []int{10, 11}, "out of bounds"},
		{"length_huge", func(b []byte, f []int) []byte { putLen(b, f[2], 0xffffffff); return b }, []int{10, 11}, "out of bounds"},
		{"length_under", func(b []byte, f []int) []byte { putLen(b, f[2], fixedPayload-1); return b }, []int{10, 11}, "out of bounds"},
		{"unknown_op", func(b []byte, f []int) []byte {
			p := b[f[2]+frameHead : f[3]]
			p[0] = 9
			binary.LittleEndian.PutUint32(b[f[2]+4:], crc32.Checksum(p, castagnoli))
			return b
		}, []int{10, 11}, "unknown op"},
		{"account_length", func(b []byte, f []int) []byte {
			p := b[f[2]+frameHead : f[3]]
			p[25]--
			binary.LittleEndian.PutUint32(b[f[2]+4:], crc32.Checksum(p, castagnoli))
			return b
		}, []int{10, 11}, "account length"},
		{"bad_magic", func(b []byte, _ []int) []byte { b[0] = 'X'; return b }, nil, "not one this build reads"},
		{"future_version", func(b []byte, _ []int) []byte { b[4] = formatVersion + 1; return b }, nil, "not one this build reads"},
		{"header_only_part", func(b []byte, _ []int) []byte { return b[:3] }, nil, ""},
		{"empty_file", func(b []byte, _ []int) []byte { return b[:0] }, nil, ""},
		{"foreign_short", func(b []byte, _ []int) []byte { return []byte("hi") }, nil, "not one this build reads"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			first, _ := segmentBytes(rec(1, exp, "acme"), rec(2, exp, "globex"))
			writeSegment(t, dir, 1, first)
			b, frames := segmentBytes(mid...)
			damaged := writeSegment(t, dir, 2, tt.damage(b, frames))
			last, _ := segmentBytes(rec(20, exp, "acme"))
			writeSegment(t, dir, 3, last)

			var w warnings
			j := openT(t, Options{Dir: dir, Warn: w.warn, Now: newClock(t0).Now})
			want := append(append([]int{1, 2}, tt.want...), 20)
			for range 2 {
				if got := ids(replayAll(t, j, t0)); !slices.Equal(got, want) {
					t.Fatalf("replay: %v, want %v", got, want)
				}
			}
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			msgs := w.list()
			if tt.warn == "" {
				if len(msgs) != 0 {
					t.Fatalf("warned: %q", msgs)
				}
				return
			}
			if len(msgs) != 1 {
				t.Fatalf("warnings %q, want one", msgs)
			}
			if !strings.Contains(msgs[0], damaged) || !strings.Contains(msgs[0], tt.warn) {
				t.Errorf("warning %q does not name the file and %q", msgs[0], tt.warn)
			}
			if len(tt.want) > 0 && len(tt.want) < 4 {
				if off := "offset " + strconv.Itoa(frames[len(tt.want)]); !strings.Contains(msgs[0], off) {
					t.Errorf("warning %q does not name %s", msgs[0], off)
				}
			}
			if _, err := os.Stat(damaged); err != nil {
				t.Errorf("the damaged segment is gone: %v", err)
			}
		})
	}
}

func TestRotateBySize(t *testing.T) {
	dir := t.TempDir()
	const limit = 200
	j := openT(t, Options{Dir: dir, SegmentSize: limit})
	exp := time.Now().Add(time.Hour)
	const n = 20
	for i := range n {
		if err := j.Sync(rec(i, exp, "acme")); err != nil {
			t.Fatal(err)
		}
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	files := segmentFiles(t, dir)
	if len(files) < 3 {
		t.Fatalf("segments %v: no rotation by size", files)
	}
	frame := frameHead + fixedPayload + len("acme")
	for _, name := range files {
		info, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if info.Size() >= int64(limit+frame) || (info.Size()-headerSize)%int64(frame) != 0 {
			t.Errorf("segment %s: %d bytes (limit %d, frames of %d; preallocation cut off?)", name, info.Size(), limit, frame)
		}
	}
	j = openT(t, Options{Dir: dir})
	if got := ids(replayAll(t, j, time.Now())); len(got) != n || !slices.IsSorted(got) {
		t.Errorf("replay: %v", got)
	}
}

func TestRotateByAge(t *testing.T) {
	clk := newClock(t0)
	j := openT(t, Options{Dir: t.TempDir(), SegmentAge: time.Minute, Now: clk.Now})
	exp := t0.Add(24 * time.Hour) // none pruned
	steps := []struct {
		advance  time.Duration
		segments int
	}{
		{0, 1},
		{30 * time.Second, 1},
		{29 * time.Second, 1},
		{time.Second, 2}, // a minute old
		{59 * time.Second, 2},
		{time.Hour, 3}, // appends come after a pause: one new segment
	}
	for i, s := range steps {
		clk.Advance(s.advance)
		if err := j.Sync(rec(i, exp, "acme")); err != nil {
			t.Fatal(err)
		}
		if got := j.Segments(); got != s.segments {
			t.Fatalf("step %d: %d segments, want %d", i, got, s.segments)
		}
	}
}

func TestPruneExpired(t *testing.T) {
	dir := t.TempDir()
	clk := newClock(t0)
	j := openT(t, Options{Dir: dir, SegmentAge: time.Minute, Now: clk.Now})
	// Segment 1, Open's, holds records that expire in a minute.
	for i := range 3 {
		if err := j.Sync(rec(i, t0.Add(time.Minute), "acme")); err != nil {
			t.Fatal(err)
		}
	}
	// Two minutes on, a rotation deletes it. Segment 2 holds one record
	// that lives an hour among short ones.
	clk.Advance(2 * time.Minute)
	for i, d := range []time.Duration{time.Minute, time.Hour, time.Minute} {
		if err := j.Sync(rec(10+i, clk.Now().Add(d), "acme")); err != nil {
			t.Fatal(err)
		}
	}
	if files := segmentFiles(t, dir); !slices.Equal(files, []string{segmentName(2)}) {
		t.Fatalf("files %v: want segment 1 deleted at the rotation", files)
	}
	clk.Advance(10 * time.Minute)
	if err := j.Sync(rec(20, clk.Now().Add(time.Hour), "acme")); err != nil {
		t.Fatal(err)
	}
	if files := segmentFiles(t, dir); !slices.Equal(files, []string{segmentName(2), segmentName(3)}) {
		t.Fatalf("files %v: want segment 2 (a live record) and 3 (active)", files)
	}
	if j.Segments() != 2 {
		t.Errorf("Segments %d, want 2", j.Segments())
	}
	clk.Advance(time.Hour)
	if err := j.Sync(rec(21, clk.Now().Add(time.Hour), "acme")); err != nil {
		t.Fatal(err)
	}
	if files := segmentFiles(t, dir); !slices.Equal(files, []string{segmentName(4)}) {
		t.Fatalf("files %v: want only the active segment", files)
	}
}

// TestPruneOld checks the pass after Open: segments from before it whose
// records have all expired are deleted, in the background; others are kept.
func TestPruneOld(t *testing.T) {
	dir := t.TempDir()
	expired, _ := segmentBytes(rec(1, t0.Add(-time.Minute), "acme"), rec(2, t0, "acme"))
	writeSegment(t, dir, 1, expired)
	live, _ := segmentBytes(rec(3, t0.Add(-time.Hour), "acme"), rec(4, t0.Add(time.Second), "acme"))
	writeSegment(t, dir, 2, live)
	foreign := writeSegment(t, dir, 3, []byte("not a segment at all"))
	damaged, offs := segmentBytes(rec(5, t0.Add(-time.Minute), "acme"), rec(6, t0.Add(time.Hour), "acme"))
	damaged[offs[1]+10] ^= 1 // the live record is unreadable: the segment has expired
	writeSegment(t, dir, 4, damaged)
	empty := writeSegment(t, dir, 5, header[:])

	var w warnings
	j := openT(t, Options{Dir: dir, Warn: w.warn, Now: newClock(t0).Now})
	<-j.scanned
	want := []string{segmentName(2), filepath.Base(foreign), segmentName(6)}
	if files := segmentFiles(t, dir); !slices.Equal(files, want) {
		t.Errorf("files %v, want %v (%s empty)", files, want, empty)
	}
	if j.Segments() != len(want) {
		t.Errorf("Segments %d, want %d", j.Segments(), len(want))
	}
	if msgs := w.list(); len(msgs) != 2 {
		t.Errorf("warnings %q, want the foreign and the damaged segment's", msgs)
	}
	if got := ids(replayAll(t, j, t0)); !slices.Equal(got, []int{4}) {
		t.Errorf("replay %v", got)
	}
}

// TestBounded runs many rotations: the directory holds the segments of the
// live records and about one SegmentAge more, never all history.
func TestBounded(t *testing.T) {
	dir := t.TempDir()
	clk := newClock(t0)
	j := openT(t, Options{Dir: dir, SegmentAge: time.Minute, Now: clk.Now})
	const ttl = 5 * time.Minute
	most := 0
	for i := range 600 {
		clk.Advance(10 * time.Second)
		if err := j.Sync(rec(i, clk.Now().Add(ttl), "acme")); err != nil {
			t.Fatal(err)
		}
		most = max(most, len(segmentFiles(t, dir)))
	}
	// Live records span ttl: ttl/SegmentAge segments, one more being
	// filled, one not yet pruned.
	if most > 7 {
		t.Errorf("up to %d segments on disk, want at most 7", most)
	}
	if n := len(segmentFiles(t, dir)); n != j.Segments() {
		t.Errorf("%d files, Segments %d", n, j.Segments())
	}
	var size int64
	for _, name := range segmentFiles(t, dir) {
		info, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		size += info.Size()
	}
	if size < j.Size() {
		t.Errorf("files hold %d bytes, Size says %d", size, j.Size())
	}
	if got := replayAll(t, j, clk.Now()); len(got) != int(ttl/(10*time.Second)) {
		t.Errorf("%d live records, want %d", len(got), ttl/(10*time.Second))
	}
}

// TestSizePreallocated: Size counts the bytes used, not the zeros ahead,
// which Close cuts off.
func TestSizePreallocated(t *testing.T) {
	dir := t.TempDir()
	j := openT(t, Options{Dir: dir})
	exp := time.Now().Add(time.Hour)
	for i := range 10 {
		if err := j.Sync(rec(i, exp, "acme")); err != nil {
			t.Fatal(err)
		}
	}
	want := int64(headerSize + 10*(frameHead+fixedPayload+len("acme")))
	if got := j.Size(); got != want {
		t.Errorf("Size %d, want %d", got, want)
	}
	path := filepath.Join(dir, segmentName(1))
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if info.Size() <= want {
		t.Errorf("file %d bytes: not preallocated", info.Size())
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if info, err = os.Stat(path); err != nil || info.Size() != want {
		t.Errorf("file after Close: %v bytes (%v), want %d", info.Size(), err, want)
	}
}

func TestLocked(t *testing.T) {
	dir := t.TempDir()
	j, err := Open(Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if j2, err := Open(Options{Dir: dir}); err == nil {
		j2.Close()
		t.Fatal("a second journal opened the same directory")
	}
	if files := segmentFiles(t, dir); len(files) != 1 {
		t.Errorf("files %v: the refused Open made a segment", files)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	openT(t, Options{Dir: dir})
}

// TestConcurrent replays, rotates and prunes while appends go on: every
// record whose Sync returned before a Replay began is in that Replay.
func TestConcurrent(t *testing.T) {
	clk := newClock(t0)
	var w warnings
	j := openT(t, Options{Dir: t.TempDir(), SegmentSize: 4096, Now: clk.Now, Warn: w.warn})
	var (
		mu    sync.Mutex
		acked []int
		wg    sync.WaitGroup
	)
	const writers, each = 4, 300
	for g := range writers {
		wg.Go(func() {
			for i := range each {
				id := g*each + i
				exp := clk.Now().Add(time.Hour)
				if id%3 == 0 {
					exp = clk.Now().Add(time.Second) // expired soon: segments get pruned
				}
				if id%5 == 0 {
					if err := j.Write(rec(id, exp, "acme")); err != nil {
						t.Error(err)
					}
					continue
				}
				if err := j.Sync(rec(id, exp, fmt.Sprint("acct", g))); err != nil {
					t.Error(err)
					return
				}
				if id%3 != 0 {
					mu.Lock()
					acked = append(acked, id)
					mu.Unlock()
				}
				clk.Advance(10 * time.Millisecond)
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	for replays := 0; ; replays++ {
		mu.Lock()
		before := slices.Clone(acked)
		mu.Unlock()
		seen := map[int]bool{}
		if err := j.Replay(clk.Now(), func(r Record) { seen[idOf(r)] = true }); err != nil {
			t.Fatal(err)
		}
		for _, id := range before {
			if !seen[id] {
				t.Fatalf("replay %d: record %d was synced before it began, and is missing", replays, id)
			}
		}
		_, _, _, _ = j.Pending(), j.Size(), j.Segments(), j.Commits()
		select {
		case <-done:
			if msgs := w.list(); len(msgs) > 0 {
				t.Errorf("warnings: %q", msgs)
			}
			return
		default:
		}
	}
}

func BenchmarkSyncParallel(b *testing.B) {
	j := openT(b, Options{Dir: b.TempDir()})
	exp := time.Now().Add(time.Hour).UnixNano()
	var next atomic.Uint64
	b.SetParallelism(32) // goroutines per core: a server's concurrent deliveries
	b.ReportAllocs()
	commits := j.Commits()
	cpu := measureCPU(b, "cpu-ns/op", 1)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		r := Record{Op: OpAdd, Expires: exp, Account: "account-01"}
		for pb.Next() {
			binary.LittleEndian.PutUint64(r.ID[:], next.Add(1))
			if err := j.Sync(r); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	cpu()
	if c := j.Commits() - commits; c > 0 {
		b.ReportMetric(float64(b.N)/float64(c), "records/commit")
	}
}

// BenchmarkSync is one Sync at a time: what one commit (write, fdatasync)
// costs, in latency and CPU.
func BenchmarkSync(b *testing.B) {
	j := openT(b, Options{Dir: b.TempDir()})
	r := Record{Op: OpAdd, Expires: time.Now().Add(time.Hour).UnixNano(), Account: "account-01"}
	b.ReportAllocs()
	cpu := measureCPU(b, "cpu-ns/op", 1)
	b.ResetTimer()
	for i := range b.N {
		binary.LittleEndian.PutUint64(r.ID[:], uint64(i))
		if err := j.Sync(r); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	cpu()
}

func BenchmarkWrite(b *testing.B) {
	j := openT(b, Options{Dir: b.TempDir()})
	r := Record{Op: OpAdd, Expires: time.Now().Add(time.Hour).UnixNano(), Account: "account-01"}
	b.ReportAllocs()
	cpu := measureCPU(b, "cpu-ns/op", 1)
	b.ResetTimer()
	for i := range b.N {
		binary.LittleEndian.PutUint64(r.ID[:], uint64(i))
		if err := j.Write(r); err != nil {
			b.Fatal(err)
		}
	}
	// Close waits for the commits: the CPU is that of the whole, appender
	// and committer, per record.
	if err := j.Close(); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	cpu()
}

// BenchmarkReplay replays 1,000,000 live records, of one account, and of
// 16 interleaved.
func BenchmarkReplay(b *testing.B) {
	for _, accounts := range []int{1, 16} {
		b.Run(fmt.Sprintf("accounts=%d", accounts), func(b *testing.B) {
			benchmarkReplay(b, accounts)
		})
	}
}

func benchmarkReplay(b *testing.B, accounts int) {
	const n = 1_000_000
	dir := b.TempDir()
	j, err := Open(Options{Dir: dir})
	if err != nil {
		b.Fatal(err)
	}
	exp := time.Now().Add(time.Hour)
	for i := range n {
		if err := j.Write(rec(i, exp, fmt.Sprintf("account-%02d", i%accounts))); err != nil {
			b.Fatal(err)
		}
	}
	if err := j.Close(); err != nil {
		b.Fatal(err)
	}
	j = openT(b, Options{Dir: dir})
	now := time.Now()
	b.ReportAllocs()
	cpu := measureCPU(b, "cpu-ns/record", n)
	b.ResetTimer()
	for range b.N {
		got := 0
		if err := j.Replay(now, func(Record) { got++ }); err != nil {
			b.Fatal(err)
		}
		if got != n {
			b.Fatalf("%d records, want %d", got, n)
		}
	}
	b.StopTimer()
	cpu()
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/record")
}

// measureCPU starts measuring the process's CPU time; the function it
// returns reports it per unit, b.N times perOp units of them, where /proc
// tells it (in 10 ms ticks: run long enough).
func measureCPU(b *testing.B, unit string, perOp int) func() {
	cpu0, ok0 := processCPU()
	return func() {
		if cpu1, ok := processCPU(); ok && ok0 {
			b.ReportMetric(float64(cpu1-cpu0)/float64(b.N*perOp), unit)
		}
	}
}

// processCPU is the CPU time this process has used, where /proc tells it.
func processCPU() (time.Duration, bool) {
	data, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return 0, false
	}
	// Fields after the command's closing parenthesis; utime and stime are
	// the 12th and 13th, in clock ticks of 10 ms.
	_, rest, ok := bytes.Cut(data, []byte(") "))
	f := strings.Fields(string(rest))
	if !ok || len(f) < 13 {
		return 0, false
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	s, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return time.Duration(u+s) * 10 * time.Millisecond, true
}

// TestCommitInterval: commits start at least CommitInterval apart, so that
// records arriving meanwhile share one; one after a quiet spell is
// committed without waiting it out.
func TestCommitInterval(t *testing.T) {
	const interval = 50 * time.Millisecond
	var mu sync.Mutex
	var at []time.Time
	setFdatasync(t, func(f *os.File) error {
		mu.Lock()
		at = append(at, time.Now())
		mu.Unlock()
		return datasync(f)
	})
	j := openT(t, Options{Dir: t.TempDir(), CommitInterval: interval})
	time.Sleep(interval) // the segment's header was synced as it opened
	exp := time.Now().Add(time.Hour)
	mu.Lock()
	at = at[:0]
	mu.Unlock()
	for i := range 4 {
		if err := j.Sync(rec(i, exp, "acme")); err != nil {
			t.Fatal(err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(at) != 4 {
		t.Fatalf("%d fdatasyncs for 4 commits", len(at))
	}
	for i := 1; i < len(at); i++ {
		// Writing the batch comes between the start and the fdatasync:
		// a little of the interval may look shorter.
		if gap := at[i].Sub(at[i-1]); gap < interval-10*time.Millisecond {
			t.Errorf("commit %d started %v after the one before, want at least %v", i, gap, interval)
		}
	}
}
