package trivialsecwebhook

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"hash/fnv"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// testSpoolFile is what writeTestSpoolDB wrote.
type testSpoolFile struct {
	entries      map[uuid.UUID][3][]byte // meta, request, body
	reservations map[string][]byte       // key -> account; unexpired at testNow
	expired      int
}

// writeTestSpoolDB writes a spool.db in dir through bbolt, as the file
// store lays it out: n entries with bodies of 1 to 4 KiB, and a replay
// reservation for each, some expired at testNow. It writes a few entries
// per transaction and deletes some, as the store does, so that pages are
// freed and reused and the freelist holds some.
func writeTestSpoolDB(t testing.TB, dir string, n int, seed uint64) *testSpoolFile {
	t.Helper()
	db, err := bolt.Open(filepath.Join(dir, "spool.db"), 0o600, &bolt.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	defer db.Sync()
	r := rand.New(rand.NewPCG(seed, 7))
	want := &testSpoolFile{entries: make(map[uuid.UUID][3][]byte), reservations: make(map[string][]byte)}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, name := range spoolBuckets {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var deleted []uuid.UUID
	for written := 0; written < n; {
		err = db.Update(func(tx *bolt.Tx) error {
			for range 8 {
				var id uuid.UUID
				for i := range id {
					id[i] = byte(r.UintN(256))
				}
				req, _ := json.Marshal(&spoolRequest{Method: "POST", RequestURI: "/webhook/trivialsec", Proto: "HTTP/1.1",
					Host: "hooks.example.com", Header: map[string][]string{"X-N": {string(rune('a' + r.IntN(26)))}}, RemoteAddr: "192.0.2.1:1234"})
				body := salvageTestBody(id, 1024+r.IntN(3*1024), r)
				meta, _ := json.Marshal(&spoolMeta{EventID: id, EventName: "report_created", State: statePending,
					Attempts: r.IntN(5), SpooledAt: testNow, NextAttempt: testNow.Add(time.Minute), Account: testAccount,
					Size: int64(len(req) + len(body))})
				for b, v := range [][]byte{meta, req, body} {
					if err := tx.Bucket(spoolBuckets[b]).Put(id[:], v); err != nil {
						return err
					}
				}
				expires := testNow.Add(time.Duration(r.IntN(48)-12) * time.Hour)
				key := replayKey(id, expires)
				if err := tx.Bucket(bucketReplay).Put(key, []byte(testAccount)); err != nil {
					return err
				}
				if expires.After(testNow) {
					want.reservations[string(key)] = []byte(testAccount)
				} else {
					want.expired++
				}
				if r.IntN(10) == 0 { // delivered later
					deleted = append(deleted, id)
				} else {
					want.entries[id] = [3][]byte{meta, req, body}
					written++
				}
			}
			if len(deleted) > 2 {
				for _, id := range deleted {
					if err := deleteEntry(tx, id); err != nil {
						return err
					}
				}
				deleted = deleted[:0]
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, id := range deleted {
			if err := deleteEntry(tx, id); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return want
}

// testPageSize is the page size bbolt gives a new file.
var testPageSize = os.Getpagesize()

// testLayout is where bbolt put the pages of a healthy file.
type testLayout struct {
	leaves, branches []int64 // in use, in the buckets' trees
	free             []int64 // in the freelist
	bucketRoots      []int64 // the buckets' root pages
	root, freelist   int64   // the page of the root bucket, of the freelist
}

// layoutOf reads where the pages of a healthy file are, from bbolt
// (tx.Page tells pages in use from free ones) and from its meta pages.
func layoutOf(t testing.TB, path string) testLayout {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, PreLoadFreelist: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var l testLayout
	err = db.View(func(tx *bolt.Tx) error {
		for _, name := range spoolBuckets {
			l.bucketRoots = append(l.bucketRoots, int64(tx.Bucket(name).Root()))
		}
		for id := 2; id < int(tx.Size())/testPageSize; id++ {
			info, err := tx.Page(id)
			if err != nil {
				return err
			}
			switch info.Type {
			case "leaf":
				l.leaves = append(l.leaves, int64(id))
			case "branch":
				l.branches = append(l.branches, int64(id))
			case "freelist":
				l.freelist = int64(id)
			case "free":
				l.free = append(l.free, int64(id))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	meta := raw[16:] // the meta page with the higher transaction ID: its root
	if other := raw[testPageSize+16:]; binary.NativeEndian.Uint64(other[48:]) > binary.NativeEndian.Uint64(meta[48:]) {
		meta = other
	}
	l.root = int64(binary.NativeEndian.Uint64(meta[16:]))
	if !slices.Contains(l.leaves, l.root) || l.freelist == 0 || len(l.branches) == 0 {
		t.Fatalf("layout %+v", l)
	}
	return l
}

// damage is a way a spool.db gets damaged.
type damage struct {
	name string
	do   func(t testing.TB, path string)
}

func truncateTo(size int64) func(testing.TB, string) {
	return func(t testing.TB, path string) {
		if err := os.Truncate(path, size); err != nil {
			t.Fatal(err)
		}
	}
}

// scribble overwrites pages with random bytes.
func scribble(t testing.TB, path string, pages ...int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := rand.New(rand.NewPCG(uint64(pages[0]), 11))
	buf := make([]byte, testPageSize)
	for _, id := range pages {
		for i := range buf {
			buf[i] = byte(r.UintN(256))
		}
		if _, err := f.WriteAt(buf, id*int64(testPageSize)); err != nil {
			t.Fatal(err)
		}
	}
}

// scribbleLeaves overwrites three leaf pages in use in the middle of the
// file.
func scribbleLeaves(t testing.TB, path string) {
	leaves := layoutOf(t, path).leaves
	mid := len(leaves) / 2
	scribble(t, path, leaves[mid-4], leaves[mid], leaves[mid+4])
}

// scribbleBranch overwrites a branch page, one that is not a bucket's root
// if there is one; with freelist, the freelist too.
func scribbleBranch(freelist bool) func(testing.TB, string) {
	return func(t testing.TB, path string) {
		l := layoutOf(t, path)
		branch := l.branches[0]
		for _, id := range l.branches {
			if !slices.Contains(l.bucketRoots, id) {
				branch = id
			}
		}
		scribble(t, path, branch)
		if freelist {
			scribble(t, path, l.freelist)
		}
	}
}

// replaceWith makes the file size bytes of what fill gives.
func replaceWith(fill func([]byte)) func(testing.TB, string) {
	return func(t testing.TB, path string) {
		info, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, info.Size())
		fill(buf)
		if err := os.WriteFile(path, buf, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// damages are the ways of damage that leave something to salvage, and
// that openSpoolDB must refuse.
var damages = []damage{
	{"truncated_8KiB", truncateTo(8 << 10)},
	{"truncated_16KiB", truncateTo(16 << 10)},
	{"truncated_256KiB", truncateTo(256 << 10)},
	{"truncated_mid_page", func(t testing.TB, path string) {
		info, _ := os.Stat(path)
		truncateTo(info.Size()/2+100)(t, path)
	}},
	{"scribbled_leaf_pages", scribbleLeaves},
	{"scribbled_branch_page", scribbleBranch(false)},
	{"scribbled_root_page", func(t testing.TB, path string) { scribble(t, path, layoutOf(t, path).root) }},
	{"scribbled_branch_page_and_freelist", scribbleBranch(true)},
}

// hopeless are damages that leave nothing to salvage.
var hopeless = []damage{
	{"all_zero", replaceWith(func([]byte) {})},
	{"random_bytes", replaceWith(func(b []byte) {
		r := rand.New(rand.NewPCG(3, 4))
		for i := range b {
			b[i] = byte(r.UintN(256))
		}
	})},
	{"both_meta_pages", func(t testing.TB, path string) { scribble(t, path, 0, 1) }},
	{"one_byte", truncateTo(1)},
}

// mappedOrLocked says whether this process still maps path, or holds the
// lock on it.
func mappedOrLocked(t testing.TB, path string) string {
	t.Helper()
	if runtime.GOOS == "linux" {
		maps, err := os.ReadFile("/proc/self/maps")
		if err == nil && bytes.Contains(maps, []byte(path)) {
			return "still mapped"
		}
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: 50 * time.Millisecond})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return "still locked"
	}
	if err == nil {
		db.Close()
	}
	return ""
}

// openFiles counts this process's open files (Linux only; -1 elsewhere).
func openFiles() int {
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(fds)
}

// TestOpenSpoolDBRefusesDamage: a damaged spool.db is an error that says
// so and what to do, never a panic or a fault, and leaves nothing open.
func TestOpenSpoolDBRefusesDamage(t *testing.T) {
	healthy := filepath.Join(t.TempDir(), "spool.db")
	writeTestSpoolDB(t, filepath.Dir(healthy), 500, 1)
	raw, err := os.ReadFile(healthy)
	if err != nil {
		t.Fatal(err)
	}
	before := openFiles()
	for _, d := range slices.Concat(damages, hopeless) {
		t.Run(d.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "spool.db")
			if err := os.WriteFile(path, raw, 0o600); err != nil {
				t.Fatal(err)
			}
			d.do(t, path)
			db, err := openSpoolDB(path)
			if err == nil {
				db.Close()
				t.Fatal("opened")
			}
			if !errors.Is(err, errSpoolDamaged) || !strings.Contains(err.Error(), "spool store "+path+" is damaged (") ||
				!strings.Contains(err.Error(), `run "caddy trivialsec-webhook spool salvage `+filepath.Dir(path)+`"`) {
				t.Fatalf("%v", err)
			}
			t.Logf("%v", err)
			if what := mappedOrLocked(t, path); what != "" {
				t.Errorf("after the error, %s is %s", path, what)
			}
		})
	}
	if after := openFiles(); after != before {
		t.Errorf("%d files open before, %d after", before, after)
	}
}

// TestOpenSpoolDBOpens: a healthy file, a missing one, an empty one open,
// read-write; what is in a healthy one is there.
func TestOpenSpoolDBOpens(t *testing.T) {
	dir := t.TempDir()
	want := writeTestSpoolDB(t, dir, 100, 2)
	for name, path := range map[string]string{
		"healthy": filepath.Join(dir, "spool.db"),
		"missing": filepath.Join(t.TempDir(), "spool.db"),
		"empty":   filepath.Join(t.TempDir(), "spool.db"),
	} {
		t.Run(name, func(t *testing.T) {
			if name == "empty" {
				if err := os.WriteFile(path, nil, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			db, err := openSpoolDB(path)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			err = db.Update(func(tx *bolt.Tx) error {
				b, err := tx.CreateBucketIfNotExists(bucketMeta)
				if err != nil {
					return err
				}
				if n := b.Stats().KeyN; name == "healthy" && n != len(want.entries) || name != "healthy" && n != 0 {
					t.Errorf("%d entries", n)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestOpenSpoolDBLocked: a spool.db another process holds is refused, with
// the message that says so, and it is not called damaged.
func TestOpenSpoolDBLocked(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "spool.db")
	holder, err := bolt.Open(path, 0o600, nil) // a second open file: flock treats it as another process
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	db, err := openSpoolDB(path)
	if err == nil {
		db.Close()
		t.Fatal("opened")
	}
	want := "spool store " + path + " is locked by another process: give each Caddy its own spool directory (spool { store file <dir> })"
	if err.Error() != want || errors.Is(err, errSpoolDamaged) {
		t.Fatalf("%v", err)
	}
}

// TestOpenSpoolDBOtherErrors: what the system refuses is said as it is,
// with the fix when it is obvious.
func TestOpenSpoolDBOtherErrors(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := openSpoolDB(filepath.Join(file, "spool.db"))
	if err == nil || errors.Is(err, errSpoolDamaged) || !strings.HasPrefix(err.Error(), "spool store "+file+"/spool.db cannot be opened: ") {
		t.Errorf("not a directory: %v", err)
	}
	dir := filepath.Join(t.TempDir(), "spool.db")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err = openSpoolDB(dir); err == nil || errors.Is(err, errSpoolDamaged) || !strings.Contains(err.Error(), "it is not a file") {
		t.Errorf("a directory: %v", err)
	}
	if os.Geteuid() == 0 || runtime.GOOS == "windows" {
		t.Log("permissions are not checked: running as root")
		return
	}
	ro := t.TempDir()
	if err := os.Chmod(ro, 0o500); err != nil {
		t.Fatal(err)
	}
	defer os.Chmod(ro, 0o700)
	_, err = openSpoolDB(filepath.Join(ro, "spool.db"))
	if err == nil || !strings.Contains(err.Error(), "give the Caddy user read and write access to "+ro) {
		t.Errorf("read-only directory: %v", err)
	}
}

// salvaged reads a spool.db as salvage should have made it.
func salvaged(t testing.TB, path string) (entries map[uuid.UUID][3][]byte, reservations map[string][]byte) {
	t.Helper()
	db, err := openSpoolDB(path)
	if err != nil {
		t.Fatalf("the salvaged store does not open: %v", err)
	}
	defer db.Close()
	entries, reservations = make(map[uuid.UUID][3][]byte), make(map[string][]byte)
	err = db.View(func(tx *bolt.Tx) error {
		err := tx.Bucket(bucketMeta).ForEach(func(k, v []byte) error {
			entries[uuid.UUID(k)] = [3][]byte{bytes.Clone(v), bytes.Clone(tx.Bucket(bucketRequest).Get(k)), bytes.Clone(tx.Bucket(bucketBody).Get(k))}
			return nil
		})
		if err != nil {
			return err
		}
		if n := tx.Bucket(bucketRequest).Stats().KeyN + tx.Bucket(bucketBody).Stats().KeyN; n != 2*len(entries) {
			t.Errorf("%d requests and bodies for %d entries", n, len(entries))
		}
		return tx.Bucket(bucketReplay).ForEach(func(k, v []byte) error {
			reservations[string(k)] = bytes.Clone(v)
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	return entries, reservations
}

// checkSalvaged checks a salvage's outcome against what was written: what
// it copied is what was written, byte for byte; what it says it lost, with
// what it copied, is all that was written, when one of the entries'
// buckets could be read whole; the new file opens; the old one is kept.
func checkSalvaged(t testing.TB, dir string, want *testSpoolFile, damaged []byte, rep salvageReport) {
	t.Helper()
	entries, reservations := salvaged(t, filepath.Join(dir, "spool.db"))
	if len(entries) != rep.entries || len(reservations) != rep.reservations {
		t.Errorf("report %+v; the file holds %d entries, %d reservations", rep, len(entries), len(reservations))
	}
	for id, got := range entries {
		if w, ok := want.entries[id]; !ok || !bytes.Equal(got[0], w[0]) || !bytes.Equal(got[1], w[1]) || !bytes.Equal(got[2], w[2]) {
			t.Fatalf("entry %s is not what was written", id)
		}
	}
	for k, v := range reservations {
		if w, ok := want.reservations[k]; !ok || !bytes.Equal(v, w) {
			t.Fatalf("reservation %x is not what was written", k)
		}
	}
	if rep.unreadable["meta"] == 0 || rep.unreadable["request"] == 0 || rep.unreadable["body"] == 0 {
		if rep.entries+rep.lost != len(want.entries) {
			t.Errorf("%d copied and %d lost of %d written", rep.entries, rep.lost, len(want.entries))
		}
	} else if rep.entries+rep.lost > len(want.entries) {
		t.Errorf("%d copied and %d lost of %d written", rep.entries, rep.lost, len(want.entries))
	}
	if rep.unreadable["replay"] == 0 && rep.reservations != len(want.reservations) {
		t.Errorf("%d reservations copied of %d", rep.reservations, len(want.reservations))
	}
	kept, err := os.ReadFile(rep.keptAs)
	if err != nil || !bytes.Equal(kept, damaged) || filepath.Dir(rep.keptAs) != dir ||
		!strings.HasPrefix(filepath.Base(rep.keptAs), "spool.db.damaged-20261128T183338Z") {
		t.Errorf("the old file is not kept as it was at %q: %v", rep.keptAs, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "spool.db.salvage")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("spool.db.salvage is left: %v", err)
	}
}

// TestSalvageSpool: salvage copies what can be read of a damaged store,
// byte for byte, into a new one that opens, and keeps the old one.
func TestSalvageSpool(t *testing.T) {
	t.Parallel()
	src := t.TempDir()
	want := writeTestSpoolDB(t, src, 500, 1)
	raw, err := os.ReadFile(filepath.Join(src, "spool.db"))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range append([]damage{{"healthy", func(testing.TB, string) {}}}, damages...) {
		t.Run(d.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "spool.db")
			if err := os.WriteFile(path, raw, 0o600); err != nil {
				t.Fatal(err)
			}
			d.do(t, path)
			damaged, _ := os.ReadFile(path)
			rep, err := salvageSpool(dir, testNow)
			if err != nil {
				if strings.HasPrefix(d.name, "truncated_") && strings.Contains(err.Error(), "the page that lists its buckets is damaged") {
					t.Logf("nothing to salvage: %v", err)
					checkUntouched(t, dir, damaged)
					return
				}
				t.Fatal(err)
			}
			t.Logf("copied %d of %d entries (%d seen in part), %d of %d reservations (%d expired); unreadable regions %v; "+
				"%d pages found outside the trees (freelist lost: %v)",
				rep.entries, len(want.entries), rep.lost, rep.reservations, len(want.reservations), rep.expired, rep.unreadable,
				rep.orphans, rep.freelistLost)
			checkSalvaged(t, dir, want, damaged, rep)
			if rep.healthy != (d.name == "healthy") || rep.path != path {
				t.Errorf("healthy %v, path %s", rep.healthy, rep.path)
			}
			switch d.name {
			case "healthy":
				if rep.entries != len(want.entries) || rep.lost != 0 || len(rep.unreadable) != 0 || rep.expired != want.expired {
					t.Errorf("a healthy store is not copied whole: %+v", rep)
				}
			case "scribbled_leaf_pages":
				// Three leaf pages lost: what they held (a few dozen
				// entries, as bbolt lays them out), and no more.
				if rep.entries < len(want.entries)*3/4 || rep.entries == len(want.entries) {
					t.Errorf("%d entries of %d copied", rep.entries, len(want.entries))
				}
			case "scribbled_branch_page", "scribbled_root_page":
				// Every leaf is whole: found without its parent.
				if rep.entries != len(want.entries) || rep.reservations != len(want.reservations) || rep.orphans == 0 || rep.freelistLost {
					t.Errorf("not every entry was found: %+v", rep)
				}
			case "scribbled_branch_page_and_freelist":
				if !rep.freelistLost || rep.orphans != 0 || rep.entries == len(want.entries) {
					t.Errorf("pages were looked for without the freelist: %+v", rep)
				}
			}
		})
	}
}

// checkUntouched checks that a salvage that failed wrote and renamed
// nothing.
func checkUntouched(t testing.TB, dir string, was []byte) {
	t.Helper()
	names, _ := filepath.Glob(filepath.Join(dir, "*"))
	if len(names) != 1 || filepath.Base(names[0]) != "spool.db" {
		t.Errorf("the directory holds %v", names)
	}
	if now, err := os.ReadFile(filepath.Join(dir, "spool.db")); err != nil || !bytes.Equal(now, was) {
		t.Errorf("spool.db changed: %v", err)
	}
}

// TestSalvageSpoolHopeless: what has nothing to salvage is an error that
// says why, and nothing is written or renamed.
func TestSalvageSpoolHopeless(t *testing.T) {
	src := t.TempDir()
	writeTestSpoolDB(t, src, 50, 3)
	raw, err := os.ReadFile(filepath.Join(src, "spool.db"))
	if err != nil {
		t.Fatal(err)
	}
	notSpool := func(t testing.TB, path string) { // a sound bbolt file, of other buckets
		db, err := bolt.Open(path+".other", 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		db.Close()
		if err := os.Rename(path+".other", path); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range slices.Concat(hopeless, []damage{{"empty", truncateTo(0)}, {"not_a_spool_store", notSpool}}) {
		t.Run(d.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "spool.db")
			if err := os.WriteFile(path, raw, 0o600); err != nil {
				t.Fatal(err)
			}
			d.do(t, path)
			was, _ := os.ReadFile(path)
			_, err := salvageSpool(dir, testNow)
			if err == nil || !strings.HasPrefix(err.Error(), path+" ") {
				t.Fatalf("%v", err)
			}
			t.Log(err)
			checkUntouched(t, dir, was)
		})
	}
	if _, err := salvageSpool(t.TempDir(), testNow); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("no spool.db: %v", err)
	}
}

// TestSalvageSpoolAnyTruncation: truncated at any page boundary, salvage
// never panics, and copies only what was written.
func TestSalvageSpoolAnyTruncation(t *testing.T) {
	t.Parallel()
	src := t.TempDir()
	want := writeTestSpoolDB(t, src, 40, 4)
	raw, err := os.ReadFile(filepath.Join(src, "spool.db"))
	if err != nil {
		t.Fatal(err)
	}
	var pages int64
	func() {
		db, err := bolt.Open(filepath.Join(src, "spool.db"), 0o600, &bolt.Options{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		_ = db.View(func(tx *bolt.Tx) error { pages = tx.Size() / int64(testPageSize); return nil })
	}()
	salvagedSome := 0
	for n := int64(0); n < pages; n++ {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "spool.db"), raw[:n*int64(testPageSize)], 0o600); err != nil {
			t.Fatal(err)
		}
		if db, err := openSpoolDB(filepath.Join(dir, "spool.db")); n > 0 && !errors.Is(err, errSpoolDamaged) {
			if err == nil {
				db.Close()
			}
			t.Fatalf("truncated to %d pages, openSpoolDB says %v", n, err)
		} else if err == nil {
			db.Close()
			continue
		}
		rep, err := salvageSpool(dir, testNow)
		if err != nil {
			continue
		}
		salvagedSome++
		entries, _ := salvaged(t, filepath.Join(dir, "spool.db"))
		for id, got := range entries {
			if w := want.entries[id]; !bytes.Equal(got[0], w[0]) || !bytes.Equal(got[1], w[1]) || !bytes.Equal(got[2], w[2]) {
				t.Fatalf("truncated to %d pages: entry %s is not what was written", n, id)
			}
		}
		if rep.entries != len(entries) {
			t.Fatalf("truncated to %d pages: report %+v", n, rep)
		}
	}
	t.Logf("%d pages: salvage copied something at %d of the truncations", pages, salvagedSome)
}

// TestSalvageSpoolLocked: a store a running Caddy holds is not salvaged.
func TestSalvageSpoolLocked(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	writeTestSpoolDB(t, dir, 10, 5)
	holder, err := bolt.Open(filepath.Join(dir, "spool.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	_, err = salvageSpool(dir, testNow)
	want := filepath.Join(dir, "spool.db") + " is open in a running Caddy, which means it opened and checked it: nothing to salvage; stop that Caddy first if you must"
	if err == nil || err.Error() != want {
		t.Fatalf("%v", err)
	}
}

// TestSalvageSpoolTwice: a salvaged store salvages again, whole, and the
// old file kept the first time is kept.
func TestSalvageSpoolTwice(t *testing.T) {
	dir := t.TempDir()
	want := writeTestSpoolDB(t, dir, 60, 6)
	scribbleLeaves(t, filepath.Join(dir, "spool.db"))
	first, err := salvageSpool(dir, testNow)
	if err != nil {
		t.Fatal(err)
	}
	second, err := salvageSpool(dir, testNow)
	if err != nil {
		t.Fatal(err)
	}
	if !second.healthy || second.entries != first.entries || second.reservations != first.reservations || second.lost != 0 || first.keptAs == second.keptAs {
		t.Errorf("first %+v, second %+v", first, second)
	}
	if _, err := os.Stat(first.keptAs); err != nil {
		t.Error(err)
	}
	if first.entries >= len(want.entries) {
		t.Errorf("scribbled pages lost nothing: %+v", first)
	}
}

// BenchmarkOpenSpoolDB measures what checking spool.db costs at startup,
// on one of 100,000 entries with bodies of about 1 KiB (about 170 MB):
// openSpoolDB whole, against a plain bolt.Open, and its two checks alone.
//
//	go test -run '^$' -bench OpenSpoolDB -benchtime 5x .
func BenchmarkOpenSpoolDB(b *testing.B) {
	path := filepath.Join(b.TempDir(), "spool.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 1))
	for batch := range 100 {
		err = db.Update(func(tx *bolt.Tx) error {
			for _, name := range spoolBuckets {
				if _, err := tx.CreateBucketIfNotExists(name); err != nil {
					return err
				}
			}
			for range 1000 {
				id := uuid.New()
				body := salvageTestBody(id, 768+r.IntN(512), r)
				req, _ := json.Marshal(&spoolRequest{Method: "POST", RequestURI: "/webhook", Proto: "HTTP/1.1", Host: "hooks.example.com"})
				meta, _ := json.Marshal(&spoolMeta{EventID: id, EventName: "report_created", State: statePending, SpooledAt: testNow})
				for b, v := range [][]byte{meta, req, body} {
					if err := tx.Bucket(spoolBuckets[b]).Put(id[:], v); err != nil {
						return err
					}
				}
				if err := tx.Bucket(bucketReplay).Put(replayKey(id, testNow.Add(time.Duration(batch)*time.Minute)), []byte(testAccount)); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	if err := db.Sync(); err != nil {
		b.Fatal(err)
	}
	db.Close()
	info, _ := os.Stat(path)
	b.Logf("spool.db: %d bytes", info.Size())

	b.Run("openSpoolDB", func(b *testing.B) {
		for b.Loop() {
			db, err := openSpoolDB(path)
			if err != nil {
				b.Fatal(err)
			}
			db.Close()
		}
	})
	b.Run("bolt.Open", func(b *testing.B) {
		for b.Loop() {
			db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: spoolLockTimeout})
			if err != nil {
				b.Fatal(err)
			}
			db.Close()
		}
	})
	db, err = bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	b.Run("checkLayout", func(b *testing.B) {
		for b.Loop() {
			bf, err := readBoltFile(f, info.Size(), db.Info().PageSize)
			if err == nil {
				err = bf.checkLayout()
			}
			if err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("tx.Check", func(b *testing.B) {
		for b.Loop() {
			_ = db.View(func(tx *bolt.Tx) error {
				for err := range tx.Check() {
					b.Fatal(err)
				}
				return nil
			})
		}
	})
}

// bboltChecks says what bbolt's own tx.Check says of the file at path.
func bboltChecks(t testing.TB, path string) []error {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var errs []error
	_ = db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			errs = append(errs, err)
		}
		return nil
	})
	return errs
}

// TestOpenSpoolDBWhatCheckMisses: two damages that bbolt's tx.Check lets
// pass, and that make a later write free a page twice, a panic in the
// commit (Caddy's commit loop: a crash); openSpoolDB refuses both.
func TestOpenSpoolDBWhatCheckMisses(t *testing.T) {
	src := t.TempDir()
	writeTestSpoolDB(t, src, 150, 10)
	raw, err := os.ReadFile(filepath.Join(src, "spool.db"))
	if err != nil {
		t.Fatal(err)
	}
	l := layoutOf(t, filepath.Join(src, "spool.db"))
	ps := int64(testPageSize)
	for _, tc := range []struct {
		name, want string
		damage     func(b []byte)
	}{
		{"a_branch_key_lowered", "begins with key", func(b []byte) {
			// The last byte of the second key of a branch page: still in
			// order, and below its child's first key.
			for _, id := range l.branches {
				p := b[id*ps:]
				if binary.NativeEndian.Uint16(p[10:]) < 2 {
					continue
				}
				el := p[16+16:]
				key := el[binary.NativeEndian.Uint32(el) : binary.NativeEndian.Uint32(el)+binary.NativeEndian.Uint32(el[4:])]
				key[len(key)-1] = 0
				return
			}
			t.Fatal("no branch page with two keys")
		}},
		{"an_overflow_over_a_free_page", "in use, and in the freelist", func(b []byte) {
			for _, id := range l.leaves {
				if slices.Contains(l.free, id+1) && binary.NativeEndian.Uint32(b[id*ps+12:]) == 0 {
					binary.NativeEndian.PutUint32(b[id*ps+12:], 1)
					return
				}
			}
			t.Skip("no leaf page of one page before a free one")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "spool.db")
			b := bytes.Clone(raw)
			tc.damage(b)
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
			if errs := bboltChecks(t, path); len(errs) != 0 {
				t.Logf("bbolt's Check sees it now: %v", errs)
			}
			db, err := openSpoolDB(path)
			if err == nil {
				db.Close()
				t.Fatal("opened")
			}
			if !errors.Is(err, errSpoolDamaged) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%v", err)
			}
			if _, err := salvageSpool(filepath.Dir(path), testNow); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestOpenSpoolDBAndSalvageNeverCrash: files damaged at random, in the places
// that matter (page headers and elements, branch pointers, meta pages with
// a good checksum, bit flips): openSpoolDB and salvage never panic nor
// fault; what openSpoolDB accepts, and what salvage writes, bbolt reads
// and writes without a panic (no SetPanicOnFault there: a fault would
// crash the test).
func TestOpenSpoolDBAndSalvageNeverCrash(t *testing.T) {
	t.Parallel()
	src := t.TempDir()
	writeTestSpoolDB(t, src, 40, 8)
	raw, err := os.ReadFile(filepath.Join(src, "spool.db"))
	if err != nil {
		t.Fatal(err)
	}
	l := layoutOf(t, filepath.Join(src, "spool.db"))
	live := slices.Concat([]int64{l.root, l.freelist}, l.leaves, l.branches)
	r := rand.New(rand.NewPCG(12, 34))
	ps := int64(testPageSize)
	put := func(b []byte, at int64, v uint64, size int) {
		for i := range size {
			b[at+int64(i)] = byte(v >> (8 * i))
		}
	}
	outcomes := make(map[string]int)
	for range 50 {
		b := bytes.Clone(raw)
		p := live[r.IntN(len(live))] * ps
		switch kind := r.IntN(8); kind {
		case 0: // garbage under an intact header
			at := p + 16 + int64(r.IntN(int(ps-16)))
			for i := at; i < min(at+int64(1+r.IntN(64)), p+ps); i++ {
				b[i] = byte(r.UintN(256))
			}
		case 1: // one field of an element: pos, ksize, vsize, or half a pgid
			put(b, p+16+int64(r.IntN(8))*16+int64(r.IntN(4))*4, uint64(r.IntN(200)), 4)
		case 2: // a branch pointer, to another page or to its own
			bp := l.branches[r.IntN(len(l.branches))] * ps
			to := uint64(live[r.IntN(len(live))])
			if r.IntN(3) == 0 {
				to = uint64(bp / ps)
			}
			put(b, bp+16+int64(r.IntN(4))*16+8, to, 8)
		case 3: // bit flips
			for range 1 + r.IntN(8) {
				b[r.IntN(len(b))] ^= 1 << r.IntN(8)
			}
		case 4: // a meta page's root, freelist or page count, with a good checksum
			m := int64(r.IntN(2)) * ps
			v := []uint64{uint64(r.IntN(300)), uint64(live[r.IntN(len(live))]), r.Uint64()}[r.IntN(3)]
			put(b, m+16+[]int64{16, 32, 40}[r.IntN(3)], v, 8)
			h := fnv.New64a()
			h.Write(b[m+16 : m+16+56])
			put(b, m+16+56, h.Sum64(), 8)
		case 5: // a page's overflow
			put(b, p+12, []uint64{uint64(r.IntN(4)), uint64(r.Uint32())}[r.IntN(2)], 4)
		case 6: // a page's count
			put(b, p+10, []uint64{uint64(r.IntN(40)), uint64(r.Uint32())}[r.IntN(2)], 2)
		case 7: // a page's type
			b[p+8] = []byte{1, 2, 4, 16}[r.IntN(4)]
		}
		dir := t.TempDir()
		path := filepath.Join(dir, "spool.db")
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		db, err := openSpoolDB(path)
		switch {
		case err == nil:
			outcomes["opened"]++
			useWholly(t, db)
		case errors.Is(err, errSpoolDamaged):
			outcomes["damaged"]++
		default:
			t.Fatalf("neither opened nor damaged: %v", err)
		}
		if _, err := salvageSpool(dir, testNow); err != nil {
			outcomes["not salvaged"]++
			continue
		}
		if db, err = openSpoolDB(path); err != nil {
			t.Fatalf("the salvaged store: %v", err)
		}
		useWholly(t, db)
	}
	t.Logf("%v", outcomes)
}

// useWholly reads every entry of db and writes to every bucket, as the
// spool does, then closes db.
func useWholly(t *testing.T, db *bolt.DB) {
	t.Helper()
	defer db.Close()
	db.NoSync = true // a test of what bbolt does, not of the disk: fast
	err := db.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(_ []byte, b *bolt.Bucket) error {
			return b.ForEach(func(k, v []byte) error {
				_, _ = bytes.Clone(k), bytes.Clone(v)
				return nil
			})
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	for round := range 3 {
		err = db.Update(func(tx *bolt.Tx) error {
			for _, name := range spoolBuckets {
				b, err := tx.CreateBucketIfNotExists(name)
				if err != nil {
					return err
				}
				c := b.Cursor()
				for k, _ := c.First(); k != nil && round > 0; k, _ = c.Next() {
					if err := c.Delete(); err != nil {
						return err
					}
					break
				}
				for i := range 10 {
					if err := b.Put([]byte{byte(round), byte(i), 0xff}, bytes.Repeat([]byte("v"), 600)); err != nil {
						return err
					}
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// salvageTestBody is a delivery's body of about n bytes: a JSON object with
// the event ID, as every spooled body is (salvage checks it).
func salvageTestBody(id uuid.UUID, n int, r *rand.Rand) []byte {
	pad := make([]byte, n)
	for i := range pad {
		pad[i] = byte('a' + r.IntN(26))
	}
	return []byte(`{"event_id": "` + id.String() + `", "pad": "` + string(pad) + `"}`)
}
