package journal

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// The segment format. A segment is a header, then frames:
//
//	header:  "TSJ\x00", format version (uint32, little-endian)
//	frame:   payload length (uint32 LE), CRC-32C of the payload (uint32 LE), payload
//	payload: op (1), expires (int64 LE), ID (16), account length (1), account
//
// A zero length ends the data, so that a preallocated tail, or one a crash
// left zero-filled, reads as the end. Anything else that does not parse is
// damage: reading stops there and keeps what came before.
const (
	headerSize    = 8
	formatVersion = 1
	frameHead     = 8  // length + CRC
	fixedPayload  = 26 // op, expires, ID, account length
	maxFrame      = frameHead + fixedPayload + MaxAccount
	segmentSuffix = ".seg"
)

var (
	header     = [headerSize]byte{'T', 'S', 'J', 0, formatVersion}
	castagnoli = crc32.MakeTable(crc32.Castagnoli)
)

// encode writes r's frame into f, all but its checksum, and returns its
// length. The committer fills in the checksums of a batch (checksum): the
// CRC routine's argument escapes, so computing it here would put f on the
// heap for every record.
func encode(f *[maxFrame]byte, r *Record) int {
	n := fixedPayload + len(r.Account)
	p := f[frameHead : frameHead+n]
	p[0] = r.Op
	binary.LittleEndian.PutUint64(p[1:], uint64(r.Expires))
	copy(p[9:25], r.ID[:])
	p[25] = byte(len(r.Account))
	copy(p[26:], r.Account)
	binary.LittleEndian.PutUint32(f[0:], uint32(n))
	return frameHead + n
}

// checksum fills in the CRC of every frame in buf, a batch of encoded frames.
func checksum(buf []byte) {
	for len(buf) > 0 {
		n := frameHead + int(binary.LittleEndian.Uint32(buf))
		binary.LittleEndian.PutUint32(buf[4:], crc32.Checksum(buf[frameHead:n], castagnoli))
		buf = buf[n:]
	}
}

// A segment is one file of the journal. Its fields that other goroutines
// read are atomic; f, end, front and born belong to the committer.
type segment struct {
	seq  uint64
	path string
	old  bool // found at Open: what it holds is learned by reading it

	size     atomic.Int64 // bytes that count: synced (this process) or found (older)
	maxExp   atomic.Int64 // largest Expires of its records, once known
	known    atomic.Bool  // maxExp is known: it may be deleted when that has passed
	live     atomic.Bool  // the active segment: never deleted
	bad      atomic.Bool  // its header is not ours: skipped, never deleted
	warned   atomic.Bool  // its damage has been reported
	deleting atomic.Bool  // being deleted: a reader that finds it gone says nothing

	f     *os.File
	end   int64     // bytes written and synced
	front int64     // bytes preallocated (zeros beyond end)
	born  time.Time // when it was made, for rotation by age
}

func segmentName(seq uint64) string {
	return fmt.Sprintf("%012d%s", seq, segmentSuffix)
}

// listSegments finds the segments in dir, oldest first, without reading them.
func listSegments(dir string) ([]*segment, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var segs []*segment
	for _, e := range entries {
		base, ok := strings.CutSuffix(e.Name(), segmentSuffix)
		if !ok || !e.Type().IsRegular() {
			continue
		}
		seq, err := strconv.ParseUint(base, 10, 64)
		if err != nil {
			continue
		}
		info, err := e.Info()
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		s := &segment{seq: seq, path: filepath.Join(dir, e.Name()), old: true}
		s.size.Store(info.Size())
		segs = append(segs, s)
	}
	slices.SortFunc(segs, func(a, b *segment) int {
		switch {
		case a.seq < b.seq:
			return -1
		case a.seq > b.seq:
			return 1
		}
		return 0
	})
	return segs, nil
}

// damage is where a segment stops making sense.
type damage struct {
	off    int64
	reason string
	header bool // the file is not a segment of this format: skip it, keep it
}

// scan reads one segment from r, at most limit bytes, and calls fn with the
// payload of each sound frame in order, until the end of data or damage.
// buf (at least 2*maxFrame bytes) is its read buffer, so that a caller
// reading many segments reads them all with one. It returns the largest
// Expires it saw (math.MinInt64 if none), the damage if there was any,
// and a read error.
func scan(r io.Reader, limit int64, buf []byte, fn func(p []byte)) (maxExp int64, dmg *damage, err error) {
	maxExp = minExpires
	lr := &io.LimitedReader{R: r, N: limit}
	n, err := io.ReadFull(lr, buf[:headerSize])
	switch {
	case err == nil:
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		// Cut short while it was made: an empty segment, if what is there is ours.
		if !bytes.Equal(buf[:n], header[:n]) {
			return maxExp, &damage{reason: "not a journal segment (header cut short)", header: true}, nil
		}
		return maxExp, nil, nil
	default:
		return maxExp, nil, err
	}
	if !bytes.Equal(buf[:4], header[:4]) {
		return maxExp, &damage{reason: "not a journal segment (bad magic)", header: true}, nil
	}
	if v := binary.LittleEndian.Uint32(buf[4:]); v != formatVersion {
		return maxExp, &damage{reason: fmt.Sprintf("format version %d, this build reads %d", v, formatVersion), header: true}, nil
	}

	off := int64(headerSize) // file offset of buf[lo]
	lo, hi := 0, 0
	eof := false
	for {
		if hi-lo < maxFrame && !eof {
			hi = copy(buf, buf[lo:hi])
			lo = 0
			n, err := io.ReadFull(lr, buf[hi:])
			hi += n
			switch {
			case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
				eof = true
			case err != nil:
				return maxExp, nil, err
			}
		}
		rest := buf[lo:hi]
		if len(rest) < 4 {
			if len(bytes.TrimLeft(rest, "\x00")) == 0 {
				return maxExp, nil, nil
			}
			return maxExp, &damage{off: off, reason: "frame cut short"}, nil
		}
		size := binary.LittleEndian.Uint32(rest)
		switch {
		case size == 0:
			return maxExp, nil, nil
		case size < fixedPayload || size > fixedPayload+MaxAccount:
			return maxExp, &damage{off: off, reason: fmt.Sprintf("frame length %d out of bounds", size)}, nil
		case len(rest) < frameHead+int(size):
			return maxExp, &damage{off: off, reason: "frame cut short"}, nil
		}
		p := rest[frameHead : frameHead+int(size)]
		switch {
		case crc32.Checksum(p, castagnoli) != binary.LittleEndian.Uint32(rest[4:]):
			return maxExp, &damage{off: off, reason: "checksum mismatch"}, nil
		case p[0] != OpAdd && p[0] != OpRelease:
			return maxExp, &damage{off: off, reason: fmt.Sprintf("unknown op %d", p[0])}, nil
		case int(p[25]) != len(p)-fixedPayload:
			return maxExp, &damage{off: off, reason: "account length does not match the frame length"}, nil
		}
		maxExp = max(maxExp, int64(binary.LittleEndian.Uint64(p[1:])))
		fn(p)
		lo += frameHead + int(size)
		off += frameHead + int64(size)
	}
}
