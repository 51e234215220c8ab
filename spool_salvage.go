package trivialsecwebhook

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// A damaged spool.db (truncated, or pages overwritten) must not take Caddy
// down. bbolt trusts its file: opening one read-write reads the freelist
// page wherever the header says it is, a page past the end of a truncated
// file faults (SIGBUS, fatal in Go), a page that is not what its parent
// says panics, and tx.Check runs in a goroutine of its own, out of reach of
// recover and debug.SetPanicOnFault. So openSpoolDB checks a file before
// bbolt reads anything but its headers: it opens it read-only without the
// freelist, walks every page bbolt would read with plain file reads
// (boltFile, which cannot fault), and only then lets tx.Check see it, and
// opens it read-write. salvageSpool reads a damaged file the same way,
// page by page, and copies what it can into a new one.

// errSpoolDamaged is what openSpoolDB's error wraps when spool.db is
// damaged: errors.Is(err, errSpoolDamaged).
var errSpoolDamaged = errors.New("the spool store is damaged")

// spoolDamagedError says that a spool.db is damaged, what is wrong with
// it, and what to do.
type spoolDamagedError struct {
	path string // spool.db
	what string // what is wrong, in a few words
}

// Error says what is wrong, and what to do.
func (e *spoolDamagedError) Error() string {
	return fmt.Sprintf("spool store %s is damaged (%s): Caddy runs the webhook routes without the spool meanwhile; "+
		`run "caddy trivialsec-webhook spool salvage %s", which copies every readable delivery and reservation `+
		"into a new spool.db and keeps the damaged file as spool.db.damaged-<time>", e.path, e.what, filepath.Dir(e.path))
}

// Unwrap makes the error errSpoolDamaged.
func (e *spoolDamagedError) Unwrap() error { return errSpoolDamaged }

// spoolDamaged is the error for a damaged spool.db; what (an error, or a
// panic's value) says what is wrong.
func spoolDamaged(path string, what any) error {
	return &spoolDamagedError{path: path, what: boundText(fmt.Sprint(what), 200)}
}

// boundText cuts s to at most n bytes, on a character boundary.
func boundText(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "..."
}

// spoolLockedError is what opening a spool.db that another process holds
// says.
func spoolLockedError(path string) error {
	return fmt.Errorf("spool store %s is locked by another process: give each Caddy its own spool directory (spool { store file <dir> })", path)
}

// errSpoolReplaced: spool.db was replaced (renamed over, by a salvage)
// while it was being opened.
var errSpoolReplaced = errors.New("spool.db was replaced while it was being opened")

// spoolOpenError says why bolt.Open failed: another process holds the
// lock; the system refused (permissions, a full disk, a path that is not a
// directory); or anything else, which is the file: damaged.
func spoolOpenError(path string, err error) error {
	var pathErr *fs.PathError
	var errno syscall.Errno
	dir := filepath.Dir(path)
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return spoolLockedError(path)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("spool store %s cannot be opened: %v: give the Caddy user read and write access to %s and the files in it", path, err, dir)
	case errors.Is(err, syscall.ENOSPC):
		return fmt.Errorf("spool store %s cannot be opened: %v: free some space on the disk that holds %s", path, err, dir)
	case errors.As(err, &pathErr), errors.As(err, &errno):
		return fmt.Errorf("spool store %s cannot be opened: %v", path, err)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrChecksum), errors.Is(err, bolterrors.ErrVersionMismatch):
		return spoolDamaged(path, fmt.Sprintf("neither of its two meta pages is sound: %v", err))
	}
	return spoolDamaged(path, err)
}

// keepFile is a bolt.Options.OpenFile that keeps the file bbolt opens in
// *f: to read the very file bbolt locked, and to close it if bbolt panics
// before it returns.
func keepFile(f **os.File) func(string, int, os.FileMode) (*os.File, error) {
	return func(name string, flag int, perm os.FileMode) (*os.File, error) {
		file, err := os.OpenFile(name, flag, perm)
		*f = file
		return file, err
	}
}

// openSpoolDB opens (or creates) the spool.db at path, read-write, once
// it has checked it all (tx.Check): a damaged file is an error that wraps
// errSpoolDamaged, never a panic or a fault. On any error nothing is left
// open or locked.
func openSpoolDB(path string) (*bolt.DB, error) {
	for range 3 {
		db, err := openSpoolDBOnce(path)
		if !errors.Is(err, errSpoolReplaced) {
			return db, err
		}
	}
	return nil, fmt.Errorf("spool store %s cannot be opened: it was replaced while it was opened, three times over: try again", path)
}

// openSpoolDBOnce checks the file at path read-only (checkSpoolFile), then
// opens it read-write. Its bbolt reads run with SetPanicOnFault, so that a
// file that changed in between faults into a panic, recovered.
func openSpoolDBOnce(path string) (db *bolt.DB, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	var file *os.File
	defer func() {
		if r := recover(); r != nil {
			if db != nil {
				closeQuietly(db)
			} else if file != nil {
				_ = file.Close() // bbolt panicked in Open: its lock goes with the file
			}
			db, err = nil, spoolDamaged(path, r)
		}
	}()
	checked, err := checkSpoolFile(path)
	if err != nil {
		return nil, err
	}
	db, err = bolt.Open(path, 0o600, &bolt.Options{Timeout: spoolLockTimeout, OpenFile: keepFile(&file)})
	if err != nil {
		return nil, spoolOpenError(path, err)
	}
	opened, err := file.Stat()
	if err == nil {
		err = stillAt(path, opened)
	}
	if err == nil && checked != nil && !os.SameFile(checked, opened) {
		err = errSpoolReplaced
	}
	if err == nil && checked == nil {
		// New, or empty and made new by bbolt: quick to check, and a file
		// put there meanwhile is checked too.
		err = verifySpoolDB(path, db, file)
	}
	if err != nil {
		_ = db.Close()
		return nil, err
	}
	return db, nil
}

// stillAt says whether path still names the file opened: a salvage may
// have renamed a new spool.db over it since it was opened.
func stillAt(path string, opened os.FileInfo) error {
	now, err := os.Stat(path)
	if err != nil || !os.SameFile(now, opened) {
		return errSpoolReplaced
	}
	return nil
}

// closeQuietly closes db after a panic, which may have left it in any
// state.
func closeQuietly(db *bolt.DB) {
	defer func() { _ = recover() }()
	_ = db.Close()
}

// checkSpoolFile checks the spool.db at path, opened read-only (a shared
// lock, and no freelist read), and returns the file it checked; nil when
// there is none yet, or it is empty (bbolt makes a new store of it).
func checkSpoolFile(path string) (os.FileInfo, error) {
	info, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, nil
	case err != nil:
		return nil, spoolOpenError(path, err)
	case !info.Mode().IsRegular():
		return nil, fmt.Errorf("spool store %s cannot be opened: it is not a file", path)
	case info.Size() == 0:
		return nil, nil
	}
	var file *os.File
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: spoolLockTimeout, ReadOnly: true, OpenFile: keepFile(&file)})
	if err != nil {
		return nil, spoolOpenError(path, err)
	}
	defer db.Close()
	if info, err = file.Stat(); err != nil {
		return nil, spoolOpenError(path, err)
	}
	if err := stillAt(path, info); err != nil {
		return nil, err
	}
	if err := verifySpoolDB(path, db, file); err != nil {
		return nil, err
	}
	return info, nil
}

// verifySpoolDB checks an open spool.db: first that every page bbolt would
// read is in the file and is what its parent says (checkLayout, with plain
// reads of file), then all of bbolt's own checks (tx.Check).
func verifySpoolDB(path string, db *bolt.DB, file *os.File) error {
	info, err := file.Stat()
	if err != nil {
		return spoolOpenError(path, err)
	}
	bf, err := readBoltFile(file, info.Size(), db.Info().PageSize)
	if err == nil {
		err = bf.sameMeta(db)
	}
	if err == nil {
		err = bf.checkLayout()
	}
	if err != nil {
		return spoolDamaged(path, err)
	}
	var first error
	problems := 0
	err = db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			if first == nil {
				first = err
			}
			problems++
		}
		return nil
	})
	switch {
	case err != nil:
		return spoolOpenError(path, err)
	case problems > 1:
		return spoolDamaged(path, fmt.Sprintf("%s; and %d more problems", boundText(first.Error(), 160), problems-1))
	case first != nil:
		return spoolDamaged(path, first)
	}
	return nil
}

// The bbolt file format (version 2), read with plain file reads rather than
// through a memory map: a damaged file gives errors, never faults. All
// numbers are in the machine's byte order, as bbolt writes them.
const (
	boltPageHeader   = 16 // id uint64, flags uint16, count uint16, overflow uint32
	boltElement      = 16 // branch: pos, ksize uint32, pgid uint64; leaf: flags, pos, ksize, vsize uint32
	boltBucketHeader = 16 // a bucket's value: root pgid uint64, sequence uint64, then its page if inline
	boltMetaSize     = 64 // magic, version, page size, flags uint32; root bucket (16); freelist, pgid, txid, checksum uint64

	boltBranchPage   = 0x01
	boltLeafPage     = 0x02
	boltMetaPage     = 0x04
	boltFreelistPage = 0x10
	boltBucketLeaf   = 0x01 // a leaf element that is a bucket

	boltMagic      = 0xED0CDAED
	boltVersion    = 2
	boltNoFreelist = ^uint64(0)

	// boltMaxDepth bounds the walk down the trees: a B+tree of pages that
	// hold at least two keys each is never this deep.
	boltMaxDepth = 64
)

// boltOrder is the byte order of bbolt's numbers: the machine's.
var boltOrder = binary.NativeEndian

// boltMeta is a meta page: where the root bucket and the freelist are, and
// how many pages the file has.
type boltMeta struct {
	valid    bool
	root     uint64 // the root bucket's page
	freelist uint64 // the freelist's page
	pages    uint64 // the high water mark: pages in use
	txid     uint64
}

// boltFile reads a bbolt file's pages.
type boltFile struct {
	r        io.ReaderAt
	size     int64 // the file's size
	pageSize int64
	metas    [2]boltMeta
	meta     boltMeta // the one bbolt reads: the newer valid one
}

// readBoltFile reads the two meta pages of the file r of size bytes and
// picks the one bbolt would, as DB.meta does.
func readBoltFile(r io.ReaderAt, size int64, pageSize int) (*boltFile, error) {
	bf := &boltFile{r: r, size: size, pageSize: int64(pageSize)}
	if pageSize < 1024 {
		return nil, fmt.Errorf("page size %d", pageSize)
	}
	for i := range bf.metas {
		buf := make([]byte, boltPageHeader+boltMetaSize)
		if n, _ := r.ReadAt(buf, int64(i)*bf.pageSize); n < len(buf) {
			continue
		}
		m := buf[boltPageHeader:]
		h := fnv.New64a()
		h.Write(m[:56])
		bf.metas[i] = boltMeta{
			valid: boltOrder.Uint32(m[0:]) == boltMagic && boltOrder.Uint32(m[4:]) == boltVersion && boltOrder.Uint64(m[56:]) == h.Sum64() &&
				boltOrder.Uint32(m[8:]) == uint32(pageSize),
			root:     boltOrder.Uint64(m[16:]),
			freelist: boltOrder.Uint64(m[32:]),
			pages:    boltOrder.Uint64(m[40:]),
			txid:     boltOrder.Uint64(m[48:]),
		}
	}
	a, b := bf.metas[0], bf.metas[1]
	if b.txid > a.txid {
		a, b = b, a
	}
	switch {
	case a.valid:
		bf.meta = a
	case b.valid:
		bf.meta = b
	default:
		return nil, errors.New("both meta pages are damaged")
	}
	return bf, nil
}

// sameMeta checks that bbolt reads the meta page bf picked.
func (bf *boltFile) sameMeta(db *bolt.DB) error {
	return db.View(func(tx *bolt.Tx) error {
		if uint64(tx.ID()) != bf.meta.txid || tx.Size() != int64(bf.meta.pages)*bf.pageSize {
			return fmt.Errorf("its meta pages read two ways (transaction %d of %d pages, or %d of %d bytes)",
				bf.meta.txid, bf.meta.pages, tx.ID(), tx.Size())
		}
		return nil
	})
}

// boltPage is a page with its overflow pages.
type boltPage struct {
	flags uint16
	count int
	data  []byte // the page, header first
	off   int64  // where data is in the file
}

// page reads page id, or says why it cannot.
func (bf *boltFile) page(id uint64) (boltPage, error) { return bf.pageIn(nil, id) }

// pageIn reads page id, from w when it holds it.
func (bf *boltFile) pageIn(w *pageWindow, id uint64) (boltPage, error) {
	last := uint64(bf.size / bf.pageSize) // pages wholly in the file
	switch {
	case id < 2:
		return boltPage{}, fmt.Errorf("page %d is a meta page", id)
	case id >= bf.meta.pages:
		return boltPage{}, fmt.Errorf("page %d is past the last page in use, %d", id, bf.meta.pages-1)
	case id >= last:
		return boltPage{}, fmt.Errorf("page %d is past the end of the file (truncated to %d pages)", id, last)
	}
	off := int64(id) * bf.pageSize
	ps := int(bf.pageSize)
	var data []byte
	if w != nil && id >= w.start && id < w.end {
		at := int(id-w.start) * ps
		data = w.buf[at : at+ps]
	} else {
		data = make([]byte, ps)
		if _, err := bf.r.ReadAt(data, off); err != nil {
			return boltPage{}, fmt.Errorf("page %d: %v", id, err)
		}
	}
	self, flags, overflow := boltOrder.Uint64(data), boltOrder.Uint16(data[8:]), uint64(boltOrder.Uint32(data[12:]))
	switch {
	case self != id:
		return boltPage{}, fmt.Errorf("page %d is overwritten: it says it is page %d", id, self)
	case flags != boltBranchPage && flags != boltLeafPage && flags != boltMetaPage && flags != boltFreelistPage:
		return boltPage{}, fmt.Errorf("page %d is overwritten: its type is %#x", id, flags)
	case overflow >= bf.meta.pages-id:
		return boltPage{}, fmt.Errorf("page %d runs past the last page in use", id)
	case overflow >= last-id:
		return boltPage{}, fmt.Errorf("page %d runs past the end of the file (truncated to %d pages)", id, last)
	}
	if overflow > 0 {
		size := int(overflow+1) * ps
		if w != nil && id >= w.start && id+overflow < w.end {
			at := int(id-w.start) * ps
			data = w.buf[at : at+size]
		} else {
			whole := make([]byte, size)
			copy(whole, data)
			if _, err := bf.r.ReadAt(whole[ps:], off+bf.pageSize); err != nil {
				return boltPage{}, fmt.Errorf("page %d: %v", id, err)
			}
			data = whole
		}
	}
	return boltPage{flags: flags, count: int(boltOrder.Uint16(data[10:])), data: data, off: off}, nil
}

// pageWindow holds pages read at once: walk reads the pages of a level of
// its trees in order, and nearby ones together, rather than one read each.
type pageWindow struct {
	buf        []byte
	start, end uint64 // the pages buf holds
}

// The most pages a window holds, and the most pages between two that one
// read takes in.
const (
	windowPages = 256
	windowGap   = 4
)

// cover makes w hold the page of items[0], and the pages of those after it
// (sorted) that are close enough.
func (w *pageWindow) cover(bf *boltFile, items []walkItem) {
	id := items[0].page
	if id >= w.start && id < w.end {
		return
	}
	end := id + 1
	for _, it := range items[1:] {
		if it.page < end {
			continue
		}
		if it.page-end > windowGap || it.page-id >= windowPages {
			break
		}
		end = it.page + 1
	}
	w.start, w.end = id, min(end, uint64(bf.size/bf.pageSize))
	if w.end <= w.start {
		w.start, w.end = 0, 0
		return
	}
	if w.buf == nil {
		w.buf = make([]byte, windowPages*int(bf.pageSize))
	}
	buf := w.buf[:int(w.end-w.start)*int(bf.pageSize)]
	if _, err := bf.r.ReadAt(buf, int64(w.start)*bf.pageSize); err != nil {
		w.start, w.end = 0, 0 // each page is read on its own, and says what is wrong
	}
}

// inlinePage is the page of an inline bucket, inside its value.
func inlinePage(value []byte, off int64) (boltPage, error) {
	if len(value) < boltBucketHeader+boltPageHeader {
		return boltPage{}, fmt.Errorf("an inline bucket of %d bytes", len(value))
	}
	data := value[boltBucketHeader:]
	if flags := boltOrder.Uint16(data[8:]); flags != boltLeafPage {
		return boltPage{}, fmt.Errorf("an inline bucket's page of type %#x", flags)
	}
	return boltPage{flags: boltLeafPage, count: int(boltOrder.Uint16(data[10:])), data: data, off: off + boltBucketHeader}, nil
}

// boltEntry is one element of a page.
type boltEntry struct {
	key   []byte
	value []byte // leaf only
	off   int64  // where value is in the file
	flags uint32 // leaf only: boltBucketLeaf for a bucket
	child uint64 // branch only
}

// entry reads element i of p.
func (p boltPage) entry(i int) (boltEntry, error) {
	at := boltPageHeader + i*boltElement
	if at+boltElement > len(p.data) {
		return boltEntry{}, fmt.Errorf("element %d is past the end of its page", i)
	}
	el := p.data[at : at+boltElement]
	var e boltEntry
	var pos, ksize, vsize uint64
	if p.flags == boltBranchPage {
		pos, ksize, e.child = uint64(boltOrder.Uint32(el)), uint64(boltOrder.Uint32(el[4:])), boltOrder.Uint64(el[8:])
	} else {
		e.flags, pos, ksize, vsize = boltOrder.Uint32(el), uint64(boltOrder.Uint32(el[4:])), uint64(boltOrder.Uint32(el[8:])), uint64(boltOrder.Uint32(el[12:]))
	}
	start := uint64(at) + pos
	if start+ksize+vsize > uint64(len(p.data)) {
		return boltEntry{}, fmt.Errorf("element %d's key or value is past the end of its page", i)
	}
	e.key = p.data[start : start+ksize]
	e.value = p.data[start+ksize : start+ksize+vsize]
	e.off = p.off + int64(start+ksize)
	return e, nil
}

// bucket reads a bucket element's value: its root page, or its inline page.
func (e boltEntry) bucket() (root uint64, inline []byte, err error) {
	if len(e.value) < boltBucketHeader {
		return 0, nil, fmt.Errorf("a bucket's value of %d bytes", len(e.value))
	}
	if root = boltOrder.Uint64(e.value); root == 0 {
		return 0, e.value, nil
	}
	return root, nil, nil
}

// walkItem is a page to walk: a page of the file, or an inline bucket's.
type walkItem struct {
	page   uint64
	inline []byte // the bucket's value, when inline
	off    int64  // where inline is in the file
	depth  int
	lo, hi []byte // the keys its parent says it holds: lo <= key < hi (nil: no bound)
	first  []byte // the key its parent says it begins with (nil: no parent)
}

// walk reads the tree of pages from start, and calls fn with each leaf
// element; fn must not keep the slices it gets past its return. It reads a
// level of the tree at a time, in the order of the pages in the file. seen
// holds the pages read, to read none twice.
//
// Strict (checkLayout), it stops at the first page or element that is not
// sound, and walks down into nested buckets too; it returns what is wrong.
// Otherwise (salvage) it skips what it cannot read, and counts it: a page,
// with all it holds, or an element; and fn gets bucket elements, to walk
// them or not.
func (bf *boltFile) walk(start walkItem, seen map[uint64]bool, strict bool, fn func(boltEntry)) (unreadable int, err error) {
	level := []walkItem{start}
	var w pageWindow
	for len(level) > 0 {
		slices.SortFunc(level, func(a, b walkItem) int { return cmp.Compare(a.page, b.page) })
		var next []walkItem
		for i, item := range level {
			if item.inline == nil {
				w.cover(bf, level[i:])
			}
			skipped, err := bf.walkPage(&w, item, seen, strict, fn, &next)
			if err != nil {
				return unreadable, err
			}
			unreadable += skipped
		}
		level = next
	}
	return unreadable, nil
}

// walkPage reads one page for walk, and adds its children to *children.
// A panic (a bug here, whatever the file holds) loses this page only.
func (bf *boltFile) walkPage(w *pageWindow, item walkItem, seen map[uint64]bool, strict bool, fn func(boltEntry), children *[]walkItem) (skipped int, err error) {
	had := len(*children)
	defer func() {
		if r := recover(); r != nil {
			*children = (*children)[:had]
			skipped, err = 1, nil
			if strict {
				err = fmt.Errorf("page %d: %v", item.page, r)
			}
		}
	}()
	fail := func(e error) (int, error) {
		if strict {
			return 0, e
		}
		return 1, nil
	}
	if item.depth > boltMaxDepth {
		return fail(fmt.Errorf("page %d is deeper than %d pages", item.page, boltMaxDepth))
	}
	var p boltPage
	if item.inline != nil {
		if p, err = inlinePage(item.inline, item.off); err != nil {
			return fail(err)
		}
	} else {
		if seen[item.page] {
			return fail(fmt.Errorf("page %d is referenced twice", item.page))
		}
		if p, err = bf.pageIn(w, item.page); err != nil {
			return fail(err)
		}
		for i := range uint64(len(p.data)) / uint64(bf.pageSize) {
			if seen[item.page+i] {
				return fail(fmt.Errorf("page %d is referenced twice", item.page+i))
			}
			seen[item.page+i] = true
		}
	}
	if strict && item.first != nil {
		// bbolt's writes find a page in its parent by its first key: a
		// parent's key that is not it (tx.Check lets a smaller one pass)
		// makes the next write free the page and keep it in the tree.
		if p.count == 0 {
			return 0, fmt.Errorf("page %d is empty, and in the tree", item.page)
		}
		if e, err := p.entry(0); err == nil && !bytes.Equal(e.key, item.first) {
			return 0, fmt.Errorf("page %d begins with key %x, where its parent says %x", item.page, e.key, item.first)
		}
	}
	switch p.flags {
	case boltBranchPage:
		if p.count == 0 {
			return fail(fmt.Errorf("branch page %d is empty", item.page))
		}
		// The children's bounds outlive the page (read into w): copied.
		entries := make([]*boltEntry, p.count)
		size := 0
		for i := range p.count {
			e, err := p.entry(i)
			if err != nil {
				if strict {
					return 0, fmt.Errorf("page %d: %v", item.page, err)
				}
				skipped++
				continue
			}
			entries[i] = &e
			size += len(e.key)
		}
		keys := make([]byte, 0, size)
		for _, e := range entries {
			if e != nil {
				keys = append(keys, e.key...)
				e.key = keys[len(keys)-len(e.key):]
			}
		}
		for i, e := range entries {
			if e == nil {
				continue
			}
			lo, hi := e.key, item.hi
			if bytes.Compare(lo, item.lo) < 0 {
				lo = item.lo
			}
			for _, next := range entries[i+1:] {
				if next != nil {
					if item.hi == nil || bytes.Compare(next.key, item.hi) < 0 {
						hi = next.key
					}
					break
				}
			}
			*children = append(*children, walkItem{page: e.child, depth: item.depth + 1, lo: lo, hi: hi, first: e.key})
		}
	case boltLeafPage:
		for i := range p.count {
			e, err := p.entry(i)
			if err == nil && (bytes.Compare(e.key, item.lo) < 0 || item.hi != nil && bytes.Compare(e.key, item.hi) >= 0) {
				err = fmt.Errorf("element %d's key is out of its page's range", i)
			}
			if err == nil && strict && e.flags&boltBucketLeaf != 0 {
				var root uint64
				var inline []byte
				if root, inline, err = e.bucket(); err == nil {
					*children = append(*children, walkItem{page: root, inline: bytes.Clone(inline), off: e.off, depth: item.depth + 1})
				}
			}
			if err != nil {
				if strict {
					return 0, fmt.Errorf("page %d: %v", item.page, err)
				}
				skipped++
				continue
			}
			if fn != nil {
				fn(e)
			}
		}
	default:
		return fail(fmt.Errorf("page %d, in a tree, is a meta or freelist page", item.page))
	}
	return skipped, nil
}

// checkLayout checks that every page bbolt reads (the freelist, and the
// trees of every bucket) is in the file, where its parent says, of the
// type it should be, read once, and not free; that it begins with the key
// its parent says; and that every key and value is within its page. A
// file that passes can be read by bbolt (tx.Check, cursors) without a
// fault, a panic or an endless loop, and written without freeing a page
// twice.
func (bf *boltFile) checkLayout() error {
	if m := bf.meta; m.pages > uint64(bf.size/bf.pageSize) {
		return fmt.Errorf("truncated: it holds %d of its %d pages", bf.size/bf.pageSize, m.pages)
	}
	seen := map[uint64]bool{0: true, 1: true}
	free, err := bf.freePages(seen)
	if err != nil {
		return err
	}
	if _, err := bf.walk(walkItem{page: bf.meta.root}, seen, true, nil); err != nil {
		return err
	}
	// tx.Check looks for the first page of each page in use in the
	// freelist, not for its overflow pages; a write would free them twice.
	for id := range free {
		if seen[id] {
			return fmt.Errorf("page %d is in use, and in the freelist", id)
		}
	}
	return nil
}

// freePages reads the freelist of bf.meta, and checks it: where bbolt
// reads it, it holds the page IDs its header says, each of a page in use.
// It returns the pages free for reuse, which hold old versions of pages,
// or nothing; and adds the freelist's own pages to seen.
func (bf *boltFile) freePages(seen map[uint64]bool) (map[uint64]bool, error) {
	id := bf.meta.freelist
	if id == boltNoFreelist {
		return nil, errors.New("it keeps no freelist (bbolt's NoFreelistSync), which the spool never writes")
	}
	p, err := bf.page(id)
	if err != nil {
		return nil, fmt.Errorf("freelist: %v", err)
	}
	if p.flags != boltFreelistPage {
		return nil, fmt.Errorf("freelist: page %d is not a freelist page", id)
	}
	for i := range uint64(len(p.data)) / uint64(bf.pageSize) {
		seen[id+i] = true
	}
	start, count := uint64(boltPageHeader), uint64(p.count)
	if count == 0xFFFF { // the count is the first element
		if len(p.data) < boltPageHeader+8 {
			return nil, errors.New("freelist: its count is past its end")
		}
		start, count = boltPageHeader+8, boltOrder.Uint64(p.data[boltPageHeader:])
	}
	if count > (uint64(len(p.data))-start)/8 {
		return nil, fmt.Errorf("freelist: page %d holds fewer than the %d page IDs it counts", id, count)
	}
	free := make(map[uint64]bool, count)
	for i := range count {
		id := boltOrder.Uint64(p.data[start+8*i:])
		if id < 2 || id >= bf.meta.pages {
			return nil, fmt.Errorf("freelist: it holds page %d, out of the file's %d pages", id, bf.meta.pages)
		}
		free[id] = true
	}
	return free, nil
}

// salvageReport says what salvageSpool did.
type salvageReport struct {
	path         string         // the new spool.db
	keptAs       string         // where the old spool.db is kept
	entries      int            // deliveries copied
	lost         int            // deliveries seen in part (a key in meta, request or body) that could not be copied
	reservations int            // replay reservations copied
	expired      int            // replay reservations left out as expired
	unreadable   map[string]int // bucket -> regions that could not be read: a page, with all it held, or one element
	orphans      int            // pages read that no tree reached (their parent was damaged)
	freelistLost bool           // the freelist could not be read, so no page was looked for outside the trees
	healthy      bool           // the old spool.db passed openSpoolDB's checks
}

// spoolBuckets are the buckets of spool.db, in the order salvage reads
// and reports them.
var spoolBuckets = [][]byte{bucketMeta, bucketRequest, bucketBody, bucketReplay}

// nothingToSalvage is what to do with a spool.db that salvage can read
// nothing of.
const nothingToSalvage = "nothing in it can be found: move it aside, and Caddy makes a new, empty store at its next try"

// salvageRef is where a value is in the damaged file.
type salvageRef struct {
	off int64
	n   int
}

// salvageRead is what salvage read of a damaged spool.db.
type salvageRead struct {
	values       [3]map[uuid.UUID]salvageRef // meta, request, body: the sound ones
	seen         map[uuid.UUID]bool          // every key of meta, request, body that could be read
	replay       map[string]salvageRef       // key -> account
	expired      int
	unreadable   map[string]int
	orphans      int  // pages read that no tree reached
	freelistLost bool // the freelist could not be read: no page was looked for outside the trees
}

// salvageSpool copies every readable delivery (its meta, request and
// body, all three sound) and unexpired replay reservation of
// <dir>/spool.db into a new spool.db, and keeps the old one as
// spool.db.damaged-<now>: for `caddy trivialsec-webhook spool salvage`.
// spool.db is never missing meanwhile: a Caddy that keeps trying to open
// it finds the old one or the new one. Whatever the file holds, it returns
// an error or a report, and on an error it has written and renamed
// nothing.
func salvageSpool(dir string, now time.Time) (rep salvageReport, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	path := filepath.Join(dir, "spool.db")
	tmp := path + ".salvage"
	wrote := false
	defer func() {
		if r := recover(); r != nil {
			rep, err = salvageReport{}, fmt.Errorf("salvaging %s failed: %v", path, boundText(fmt.Sprint(r), 200))
		}
		if err != nil && wrote {
			_ = os.Remove(tmp)
		}
	}()

	info, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return rep, fmt.Errorf("%s does not exist: give the spool directory, which holds spool.db", path)
	case err != nil:
		return rep, fmt.Errorf("%s cannot be read: %v", path, err)
	case !info.Mode().IsRegular():
		return rep, fmt.Errorf("%s is not a file", path)
	case info.Size() == 0:
		return rep, fmt.Errorf("%s is empty: nothing to salvage (Caddy makes a new store of an empty file)", path)
	}
	var file *os.File
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, PreLoadFreelist: false, Timeout: spoolLockTimeout, OpenFile: keepFile(&file)})
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return rep, fmt.Errorf("%s is open in a running Caddy, which means it opened and checked it: nothing to salvage; stop that Caddy first if you must", path)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrChecksum), errors.Is(err, bolterrors.ErrVersionMismatch):
		return rep, fmt.Errorf("%s cannot be salvaged: both of its meta pages, which say where everything is, are damaged (%v); %s", path, err, nothingToSalvage)
	case err != nil:
		return rep, fmt.Errorf("%s cannot be salvaged: %v", path, err)
	}
	closed := false
	defer func() {
		if !closed {
			closeQuietly(db)
		}
	}()
	if info, err = file.Stat(); err != nil {
		return rep, fmt.Errorf("%s cannot be read: %v", path, err)
	}
	if stillAt(path, info) != nil {
		return rep, fmt.Errorf("%s was replaced while it was opened: try again", path)
	}
	bf, err := readBoltFile(file, info.Size(), db.Info().PageSize)
	if err == nil {
		err = bf.sameMeta(db)
	}
	if err != nil {
		return rep, fmt.Errorf("%s cannot be salvaged: %v", path, err)
	}
	rep.healthy = verifySpoolDB(path, db, file) == nil

	read, err := bf.readSpool(now)
	if err != nil {
		return rep, fmt.Errorf("%s cannot be salvaged: %v; %s", path, err, nothingToSalvage)
	}
	rep.path, rep.unreadable, rep.expired = path, read.unreadable, read.expired
	rep.reservations, rep.orphans, rep.freelistLost = len(read.replay), read.orphans, read.freelistLost

	wrote = true
	if rep.entries, err = writeSalvage(tmp, bf, read); err != nil {
		return rep, fmt.Errorf("cannot write the salvaged store %s: %v", tmp, err)
	}
	rep.lost = len(read.seen) - rep.entries

	// Swap: the old file gets a second name, then the new one takes its
	// place at once; spool.db is never missing.
	if runtime.GOOS == "windows" { // a file open there cannot be renamed over
		closed = true
		_ = db.Close()
	}
	if rep.keptAs, err = linkAside(path, now); err != nil {
		return rep, fmt.Errorf("cannot keep %s aside: %v", path, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		_ = os.Remove(rep.keptAs)
		return rep, fmt.Errorf("cannot put the salvaged store in place of %s: %v", path, err)
	}
	if err := syncDir(dir); err != nil {
		return rep, fmt.Errorf("salvaged into %s, and kept the old file as %s, but the directory could not be synced: %v", path, rep.keptAs, err)
	}
	return rep, nil
}

// readSpool reads what can be read of the spool's buckets. When the newer
// meta page's root cannot be read, the older one's is tried (bbolt never
// overwrites the tree of the meta page before the last).
func (bf *boltFile) readSpool(now time.Time) (*salvageRead, error) {
	var firstErr error
	for _, m := range []boltMeta{bf.meta, bf.otherMeta()} {
		if !m.valid {
			continue
		}
		read, err := bf.salvageFrom(m, now)
		if err == nil {
			return read, nil
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	return nil, firstErr
}

// otherMeta is the meta page bbolt does not read; invalid when there is
// no other valid one.
func (bf *boltFile) otherMeta() boltMeta {
	for _, m := range bf.metas {
		if m.valid && m.txid != bf.meta.txid {
			return m
		}
	}
	return boltMeta{}
}

// salvageFrom reads the spool's buckets from the root that meta m names,
// then the pages cut off from them (salvageOrphans).
func (bf *boltFile) salvageFrom(m boltMeta, now time.Time) (*salvageRead, error) {
	saved := bf.meta
	bf.meta = m
	defer func() { bf.meta = saved }()

	seen := map[uint64]bool{0: true, 1: true}
	buckets := make(map[string]boltEntry)
	rootUnreadable, _ := bf.walk(walkItem{page: m.root}, seen, false, func(e boltEntry) {
		if e.flags&boltBucketLeaf != 0 {
			e.value = bytes.Clone(e.value)
			buckets[string(e.key)] = e
		}
	})
	read := &salvageRead{
		seen:       make(map[uuid.UUID]bool),
		replay:     make(map[string]salvageRef),
		unreadable: make(map[string]int),
	}
	for i := range read.values {
		read.values[i] = make(map[uuid.UUID]salvageRef)
	}
	for i, name := range spoolBuckets {
		b, ok := buckets[string(name)]
		if !ok {
			read.unreadable[string(name)]++
			continue
		}
		root, inline, err := b.bucket()
		if err != nil {
			read.unreadable[string(name)]++
			continue
		}
		n, _ := bf.walk(walkItem{page: root, inline: inline, off: b.off}, seen, false, func(e boltEntry) {
			if !read.take(i, e, now) {
				read.unreadable[string(name)]++
			}
		})
		read.unreadable[string(name)] += n
	}
	if rootUnreadable > 0 || len(read.unreadable) > 0 {
		read.orphans, read.freelistLost = bf.salvageOrphans(seen, read, now)
	}
	for name, n := range read.unreadable {
		if n == 0 {
			delete(read.unreadable, name)
		}
	}
	if len(buckets) == 0 && read.orphans == 0 {
		if rootUnreadable > 0 {
			return nil, errors.New("the page that lists its buckets is damaged, and no page of theirs was found without it")
		}
		return nil, errors.New("it holds none of the spool's buckets (is it a spool store?)")
	}
	return read, nil
}

// take keeps entry e of bucket i (meta, request, body, replay) when it is
// sound, and says whether it was. A sound reservation that expired at now
// is counted and left.
func (read *salvageRead) take(i int, e boltEntry, now time.Time) bool {
	if e.flags&boltBucketLeaf != 0 {
		return false
	}
	if i == 3 { // replay
		switch {
		case len(e.key) != 24 || len(e.value) == 0:
			return false
		case int64(binary.BigEndian.Uint64(e.key)) <= now.UnixNano():
			read.expired++
		default:
			read.replay[string(e.key)] = salvageRef{off: e.off, n: len(e.value)}
		}
		return true
	}
	if len(e.key) != 16 {
		return false
	}
	id := uuid.UUID(e.key)
	read.seen[id] = true
	if soundValue(i, id, e.value) {
		read.values[i][id] = salvageRef{off: e.off, n: len(e.value)}
	}
	return true
}

// salvageOrphans reads the leaf pages that no tree reached (seen) and that
// the freelist does not list: pages of the spool's buckets cut off by a
// damaged page above them. Each goes to the bucket its entries say
// (orphanBucket). Without a sound freelist it reads none, and says so:
// free pages hold old versions of pages, and entries delivered since,
// which must not come back. It returns how many pages it read.
func (bf *boltFile) salvageOrphans(seen map[uint64]bool, read *salvageRead, now time.Time) (pages int, freelistLost bool) {
	free, err := bf.freePages(seen)
	if err != nil {
		return 0, true
	}
	end := min(bf.meta.pages, uint64(bf.size/bf.pageSize))
	for id := uint64(2); id < end; id++ {
		if seen[id] || free[id] {
			continue
		}
		if bf.salvageOrphan(id, seen, read, now) {
			pages++
		}
	}
	return pages, false
}

// salvageOrphan reads page id for salvageOrphans, if it is a leaf page all
// of one bucket, and says whether it was.
func (bf *boltFile) salvageOrphan(id uint64, seen map[uint64]bool, read *salvageRead, now time.Time) (ok bool) {
	defer func() {
		if recover() != nil {
			ok = false
		}
	}()
	p, err := bf.page(id)
	if err != nil || p.flags != boltLeafPage || p.count == 0 {
		return false
	}
	for i := range uint64(len(p.data)) / uint64(bf.pageSize) {
		seen[id+i] = true
	}
	entries := make([]boltEntry, 0, p.count)
	bucket := -1
	for i := range p.count {
		e, err := p.entry(i)
		if err != nil {
			continue
		}
		b := orphanBucket(e)
		if b < 0 || bucket >= 0 && b != bucket {
			return false
		}
		bucket = b
		entries = append(entries, e)
	}
	if bucket < 0 {
		return false
	}
	for _, e := range entries {
		if _, ok := read.values[min(bucket, 2)][uuid.UUID(e.key)]; bucket < 3 && ok {
			continue // the tree's copy
		}
		read.take(bucket, e, now)
	}
	return true
}

// orphanBucket says which bucket an entry on a page cut off from its tree
// is of, by its key and value: 24-byte keys are replay's; of 16-byte keys,
// a value that is an entry's metadata is meta's, one that is a request is
// request's, and any other is body's. -1: none.
func orphanBucket(e boltEntry) int {
	if e.flags&boltBucketLeaf != 0 {
		return -1
	}
	switch len(e.key) {
	case 24:
		return 3
	case 16:
	default:
		return -1
	}
	var m spoolMeta
	if json.Unmarshal(e.value, &m) == nil && m.EventID == uuid.UUID(e.key) && (m.State == statePending || m.State == stateDead) {
		return 0
	}
	var r spoolRequest
	if json.Unmarshal(e.value, &r) == nil && r.Method != "" && r.RequestURI != "" {
		return 1
	}
	return 2
}

// soundValue says whether a value of bucket i (meta, request, body) of
// entry id can be copied: meta and request must parse, and meta must be
// id's.
func soundValue(i int, id uuid.UUID, value []byte) bool {
	switch i {
	case 0:
		var m spoolMeta
		return json.Unmarshal(value, &m) == nil && m.EventID == id
	case 1:
		var r spoolRequest
		return json.Unmarshal(value, &r) == nil
	case 2:
		// bbolt keeps no checksum of a value: bytes written over a body
		// pass its checks. A body was a verified delivery: one strict
		// JSON object, with this event ID.
		if _, status := readObject(value, nil, jsonLimits{depth: maxJSONDepth, number: math.MaxInt}); status != jsonOK {
			return false
		}
		var b struct {
			EventID string `json:"event_id"`
		}
		if json.Unmarshal(value, &b) != nil {
			return false
		}
		got, err := uuid.Parse(b.EventID)
		return err == nil && got == id
	}
	return true
}

// salvageBatch is how much one transaction of writeSalvage writes, at most.
const salvageBatch = 16 << 20

// writeSalvage writes what was read into a new bbolt file at tmp (made
// anew), synced, and returns how many deliveries it holds.
func writeSalvage(tmp string, bf *boltFile, read *salvageRead) (int, error) {
	if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return 0, err
	}
	var ids []uuid.UUID
	for id := range read.values[0] {
		_, hasRequest := read.values[1][id]
		_, hasBody := read.values[2][id]
		if hasRequest && hasBody {
			ids = append(ids, id)
		}
	}
	slices.SortFunc(ids, func(a, b uuid.UUID) int { return bytes.Compare(a[:], b[:]) })
	replay := make([]string, 0, len(read.replay))
	for k := range read.replay {
		replay = append(replay, k)
	}
	slices.Sort(replay)

	db, err := bolt.Open(tmp, 0o600, &bolt.Options{Timeout: spoolLockTimeout})
	if err != nil {
		return 0, err
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, name := range spoolBuckets {
			if _, err := tx.CreateBucket(name); err != nil {
				return err
			}
		}
		return nil
	})
	value := func(ref salvageRef) ([]byte, error) {
		buf := make([]byte, ref.n)
		_, err := bf.r.ReadAt(buf, ref.off)
		return buf, err
	}
	// put writes items from n on, in one transaction, until salvageBatch
	// bytes; it returns where it stopped.
	put := func(n, items int, one func(tx *bolt.Tx, i int) (int, error)) (int, error) {
		err := db.Update(func(tx *bolt.Tx) error {
			for size := 0; n < items && size < salvageBatch; n++ {
				written, err := one(tx, n)
				if err != nil {
					return err
				}
				size += written
			}
			return nil
		})
		return n, err
	}
	entry := func(tx *bolt.Tx, i int) (int, error) {
		id := ids[i]
		size := 0
		for b, name := range spoolBuckets[:3] {
			v, err := value(read.values[b][id])
			if err != nil {
				return 0, err
			}
			if err := tx.Bucket(name).Put(id[:], v); err != nil {
				return 0, err
			}
			size += len(v)
		}
		return size, nil
	}
	reservation := func(tx *bolt.Tx, i int) (int, error) {
		v, err := value(read.replay[replay[i]])
		if err != nil {
			return 0, err
		}
		return len(v) + 24, tx.Bucket(bucketReplay).Put([]byte(replay[i]), v)
	}
	for n := 0; err == nil && n < len(ids); {
		n, err = put(n, len(ids), entry)
	}
	for n := 0; err == nil && n < len(replay); {
		n, err = put(n, len(replay), reservation)
	}
	if closeErr := db.Close(); err == nil {
		err = closeErr
	}
	if err != nil {
		return 0, err
	}
	return len(ids), nil
}

// linkAside gives the file at path a second name,
// <path>.damaged-<now, UTC>, and returns it.
func linkAside(path string, now time.Time) (string, error) {
	base := path + ".damaged-" + now.UTC().Format("20060102T150405Z")
	kept := base
	for i := 2; ; i++ {
		err := os.Link(path, kept)
		if err == nil {
			return kept, nil
		}
		if !errors.Is(err, fs.ErrExist) || i > 100 {
			return "", err
		}
		kept = fmt.Sprintf("%s-%d", base, i)
	}
}

// syncDir makes a directory's entries durable (not on Windows, where a
// directory cannot be synced, nor needs to be).
func syncDir(dir string) error {
	if runtime.GOOS == "windows" {
		return nil
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
