package journal

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"math"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

// reference parses a segment the plain way, all in memory: the records of
// the sound frames before the first that is not, and whether it stopped at
// damage (not at the end of data).
func reference(data []byte) (recs []Record, damaged bool) {
	if len(data) < headerSize {
		return nil, !bytes.HasPrefix(header[:], data)
	}
	if !bytes.Equal(data[:headerSize], header[:]) {
		return nil, true
	}
	data = data[headerSize:]
	for {
		if len(data) < 4 {
			return recs, strings.Trim(string(data), "\x00") != ""
		}
		n := int(binary.LittleEndian.Uint32(data))
		if n == 0 {
			return recs, false
		}
		if n < fixedPayload || n > fixedPayload+MaxAccount || len(data) < frameHead+n {
			return recs, true
		}
		p := data[frameHead : frameHead+n]
		if crc32.Checksum(p, crc32.MakeTable(crc32.Castagnoli)) != binary.LittleEndian.Uint32(data[4:]) ||
			(p[0] != OpAdd && p[0] != OpRelease) || int(p[25]) != n-fixedPayload {
			return recs, true
		}
		r := Record{Op: p[0], Expires: int64(binary.LittleEndian.Uint64(p[1:])), Account: string(p[26:])}
		copy(r.ID[:], p[9:25])
		recs = append(recs, r)
		data = data[frameHead+n:]
	}
}

// FuzzReplaySegment gives Replay arbitrary bytes as a segment file, raw or
// after a valid header: it must not panic, and must return exactly the
// records of the sound frames before the first that is not, warning iff it
// met damage. scan with its smallest buffer must agree, so that frames
// across buffer refills are covered with small inputs too.
func FuzzReplaySegment(f *testing.F) {
	exp := t0.Add(time.Hour)
	valid, offs := segmentBytes(rec(1, exp, "acme"), rec(2, exp, ""), rec(3, t0, strings.Repeat("z", MaxAccount)), Record{Op: OpRelease, Expires: exp.UnixNano(), Account: "acme"})
	f.Add(valid, false)
	f.Add(valid[headerSize:], true)
	f.Add(valid[:offs[2]+7], false)                                // torn
	f.Add(append(slices.Clone(valid), make([]byte, 64)...), false) // zero tail
	garbled := slices.Clone(valid)
	garbled[offs[1]+9] ^= 0x80
	f.Add(garbled, false)
	long := slices.Clone(valid)
	binary.LittleEndian.PutUint32(long[offs[1]:], 1<<31)
	f.Add(long, false)
	f.Add([]byte("TSJ"), false)
	f.Add([]byte{}, true)
	f.Add([]byte{0, 0, 0}, true)

	// No fsyncs: this is about parsing, and Open makes a segment each time.
	saved, savedDir := fdatasync, syncDir
	fdatasync = func(*os.File) error { return nil }
	syncDir = func(*os.File) error { return nil }
	f.Cleanup(func() { fdatasync, syncDir = saved, savedDir })

	// Nothing is expired at the dawn of time but what expires then.
	dawn := time.Unix(0, math.MinInt64)
	f.Fuzz(func(t *testing.T, data []byte, withHeader bool) {
		if withHeader {
			data = append(header[:len(header):len(header)], data...)
		}
		want, damaged := reference(data)
		want = slices.DeleteFunc(want, func(r Record) bool { return r.Expires <= dawn.UnixNano() })

		var small []Record
		_, dmg, err := scan(bytes.NewReader(data), int64(len(data)), make([]byte, 2*maxFrame), func(p []byte) {
			r := Record{Op: p[0], Expires: int64(binary.LittleEndian.Uint64(p[1:])), Account: string(p[26:])}
			copy(r.ID[:], p[9:25])
			if r.Expires > dawn.UnixNano() {
				small = append(small, r)
			}
		})
		if err != nil {
			t.Fatal(err)
		}
		if (dmg != nil) != damaged || !slices.Equal(small, want) {
			t.Fatalf("scan with a small buffer: %v (damage %v), want %v (damage %v)", small, dmg, want, damaged)
		}

		dir := t.TempDir()
		writeSegment(t, dir, 1, data)
		var w warnings
		j, err := Open(Options{Dir: dir, Warn: w.warn, Now: func() time.Time { return dawn }})
		if err != nil {
			t.Fatal(err)
		}
		var got []Record
		err = j.Replay(dawn, func(r Record) { got = append(got, r) })
		if cerr := j.Close(); cerr != nil {
			t.Fatal(cerr)
		}
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("replay: %v, want %v", got, want)
		}
		if n := len(w.list()); n != 0 != damaged || n > 1 {
			t.Fatalf("warnings %q, damaged %v", w.list(), damaged)
		}
	})
}
