package trivialsecwebhook

import (
	"bytes"
	"encoding/binary"
	"math/bits"
	"unicode/utf8"
)

// This file is a strict RFC 8259 reader for the three JSON texts the module
// reads: the JWT header, the JWT claims and the delivery body. It checks a text
// in one pass without reflection, hands back the members of its top-level
// object as raw byte spans, and refuses what a lenient parser would guess at
// (invalid UTF-8, a BOM, comments, NaN, trailing data). Values inside members
// are checked for well-formedness only and never rewritten, so what passes is
// forwarded exactly as it came.

// jsonLimits bound what the reader accepts beyond the grammar, as RFC 8259
// section 9 allows a parser to: a body the module forwards must not be one
// that the service behind it cannot parse.
type jsonLimits struct {
	depth  int // arrays and objects open at once, the outermost object counted
	number int // bytes of one number's text
}

// defaultJSONLimits are the default limits, and those of the token's header
// and claims. Mainstream parsers stop at these depths by default: .NET's
// System.Text.Json past 64, Ruby's JSON past 100, Python's json near 1,000;
// and at these numbers: Python refuses an integer of more than 4,300 digits,
// Jackson a number of more than 1,000 characters. 64 levels and 100
// characters (more than any 64-bit or decimal128 number needs) pass all of
// them, and a genuine delivery is a few levels deep.
var defaultJSONLimits = jsonLimits{depth: 64, number: 100}

// maxJSONDepth is the largest depth the max_depth setting takes.
const maxJSONDepth = 10000

// member is one member of a JSON object: its key, unescaped, and its value as
// the raw bytes of the text.
type member struct {
	key   []byte
	value []byte
}

// jsonStatus says why a text was refused, in the words of the body checks.
type jsonStatus uint8

const (
	jsonOK jsonStatus = iota
	jsonMalformed
	jsonDuplicateKey
	jsonTooDeep       // nested deeper than jsonLimits.depth
	jsonNumberTooLong // a number longer than jsonLimits.number
)

// readObject reads data, which must be exactly one JSON object with blanks
// around it and within lim, and appends its members to dst in order. Keys
// are unescaped so that "\u0065vent_id" and "event_id" are seen as the same
// key; two members with the same key are refused, since parsers disagree on
// which one wins.
func readObject(data []byte, dst []member, lim jsonLimits) ([]member, jsonStatus) {
	inner := lim // a member's value opens its arrays and objects one level in
	inner.depth--
	// UTF-8 is checked inside strings, by scanString: anywhere else, a byte
	// outside ASCII is malformed JSON already.
	i := skipBlanks(data, 0)
	if i >= len(data) || data[i] != '{' {
		return dst, jsonMalformed
	}
	i = skipBlanks(data, i+1)
	if i < len(data) && data[i] == '}' {
		i++
	} else {
		for {
			if i >= len(data) || data[i] != '"' {
				return dst, jsonMalformed
			}
			end, escaped, ok := scanString(data, i)
			if !ok {
				return dst, jsonMalformed
			}
			key := data[i+1 : end-1]
			if escaped {
				key = unescape(key)
			}
			i = skipBlanks(data, end)
			if i >= len(data) || data[i] != ':' {
				return dst, jsonMalformed
			}
			i = skipBlanks(data, i+1)
			end, status := scanValue(data, i, inner)
			if status != jsonOK {
				return dst, status
			}
			dst = append(dst, member{key: key, value: data[i:end]})
			i = skipBlanks(data, end)
			if i >= len(data) {
				return dst, jsonMalformed
			}
			if data[i] == '}' {
				i++
				break
			}
			if data[i] != ',' {
				return dst, jsonMalformed
			}
			i = skipBlanks(data, i+1)
		}
	}
	if skipBlanks(data, i) != len(data) {
		return dst, jsonMalformed
	}
	if hasDuplicateKey(dst) {
		return dst, jsonDuplicateKey
	}
	return dst, jsonOK
}

// hasDuplicateKey reports whether two members share a key. A handful of keys
// is the rule, so pairs are compared directly, by a print of each key first
// (keyPrint) and byte for byte only where the prints match; a map takes over
// past that.
func hasDuplicateKey(members []member) bool {
	if len(members) <= 16 {
		var prints [16]uint32
		for i, m := range members {
			p := keyPrint(m.key)
			for j, q := range prints[:i] {
				if p == q && bytes.Equal(m.key, members[j].key) {
					return true
				}
			}
			prints[i] = p
		}
		return false
	}
	seen := make(map[string]struct{}, len(members))
	for _, m := range members {
		if _, dup := seen[string(m.key)]; dup {
			return true
		}
		seen[string(m.key)] = struct{}{}
	}
	return false
}

// keyPrint is a key's length and its first and last bytes: equal keys have
// equal prints, and the keys of the claims, of the header and of the body's
// fields all have different ones.
func keyPrint(key []byte) uint32 {
	if len(key) == 0 {
		return 0
	}
	return uint32(len(key))<<16 | uint32(key[0])<<8 | uint32(key[len(key)-1])
}

func skipBlanks(data []byte, i int) int {
	for i < len(data) {
		switch data[i] {
		case ' ', '\t', '\n', '\r':
			i++
		default:
			return i
		}
	}
	return i
}

// scanString checks the string that starts at data[i] (a quote) and returns
// the index just past its closing quote, and whether it holds an escape.
// Its text must be valid UTF-8.
func scanString(data []byte, i int) (end int, escaped, ok bool) {
	for i++; i < len(data); {
		i = skipPlain(data, i)
		for i < len(data) && plain[data[i]] {
			i++
		}
		if i == len(data) {
			break
		}
		switch c := data[i]; {
		case c == '"':
			return i + 1, escaped, true
		case c == '\\':
			escaped = true
			if i+1 >= len(data) {
				return 0, false, false
			}
			switch data[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				if i+6 > len(data) || !isHex4(data[i+2:i+6]) {
					return 0, false, false
				}
				i += 6
			default:
				return 0, false, false
			}
		case c < 0x20:
			return 0, false, false
		default: // c >= 0x80
			r, size := utf8.DecodeRune(data[i:])
			if r == utf8.RuneError && size <= 1 {
				return 0, false, false
			}
			i += size
		}
	}
	return 0, false, false
}

// skipPlain returns the index of the first byte from data[i] on that a string
// does not hold as it is (specialBytes), or of one of the last seven bytes:
// sixteen bytes at a time while none needs a look, then eight.
func skipPlain(data []byte, i int) int {
	rest := data[i:]
	for len(rest) >= 16 {
		lo := specialBytes(binary.LittleEndian.Uint64(rest))
		hi := specialBytes(binary.LittleEndian.Uint64(rest[8:]))
		if lo|hi != 0 {
			if lo == 0 {
				return len(data) - len(rest) + 8 + bits.TrailingZeros64(hi)/8
			}
			return len(data) - len(rest) + bits.TrailingZeros64(lo)/8
		}
		rest = rest[16:]
	}
	if len(rest) >= 8 {
		if special := specialBytes(binary.LittleEndian.Uint64(rest)); special != 0 {
			return len(data) - len(rest) + bits.TrailingZeros64(special)/8
		}
		rest = rest[8:]
	}
	return len(data) - len(rest)
}

// specialBytes sets the top bit of each byte of x, read little-endian, that a
// string does not hold as it is: a control character, the quote, the
// backslash, or a byte outside ASCII. Bits above the lowest may be set
// falsely (a borrow runs on); the lowest set bit is exact.
func specialBytes(x uint64) uint64 {
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	control := (x - 0x20*ones) &^ x
	quote := x ^ '"'*ones
	quote = (quote - ones) &^ quote
	backslash := x ^ '\\'*ones
	backslash = (backslash - ones) &^ backslash
	return (control | quote | backslash | x) & highs
}

// plain marks the bytes a string holds as they are, without a look: ASCII
// but control characters, the quote and the backslash.
var plain = func() (t [256]bool) {
	for c := 0x20; c < 0x80; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

func isHex4(b []byte) bool {
	for _, c := range b[:4] {
		if hexValue(c) < 0 {
			return false
		}
	}
	return true
}

func hexValue(c byte) int {
	switch {
	case '0' <= c && c <= '9':
		return int(c - '0')
	case 'a' <= c && c <= 'f':
		return int(c-'a') + 10
	case 'A' <= c && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

// scanNumber checks the number that starts at data[i] against the grammar of
// RFC 8259 section 6, and its length against maxLength, and returns the index
// just past it.
func scanNumber(data []byte, i, maxLength int) (int, jsonStatus) {
	start := i
	if i < len(data) && data[i] == '-' {
		i++
	}
	switch {
	case i < len(data) && data[i] == '0':
		i++
	case i < len(data) && '1' <= data[i] && data[i] <= '9':
		i = skipDigits(data, i+1)
	default:
		return 0, jsonMalformed
	}
	if i < len(data) && data[i] == '.' {
		j := skipDigits(data, i+1)
		if j == i+1 {
			return 0, jsonMalformed
		}
		i = j
	}
	if i < len(data) && (data[i] == 'e' || data[i] == 'E') {
		i++
		if i < len(data) && (data[i] == '+' || data[i] == '-') {
			i++
		}
		j := skipDigits(data, i)
		if j == i {
			return 0, jsonMalformed
		}
		i = j
	}
	if i-start > maxLength {
		return 0, jsonNumberTooLong
	}
	return i, jsonOK
}

func skipDigits(data []byte, i int) int {
	for i < len(data) && '0' <= data[i] && data[i] <= '9' {
		i++
	}
	return i
}

// scanValue checks the value that starts at data[i], which may open
// lim.depth arrays and objects, and returns the index just past it. Strings,
// numbers and literals are read directly; arrays and objects go to
// scanNested.
func scanValue(data []byte, i int, lim jsonLimits) (int, jsonStatus) {
	if i >= len(data) {
		return 0, jsonMalformed
	}
	switch data[i] {
	case '"':
		if end, _, ok := scanString(data, i); ok {
			return end, jsonOK
		}
		return 0, jsonMalformed
	case '{', '[':
		return scanNested(data, i, lim)
	case 't':
		return scanLiteral(data, i, "true")
	case 'f':
		return scanLiteral(data, i, "false")
	case 'n':
		return scanLiteral(data, i, "null")
	}
	return scanNumber(data, i, lim.number)
}

// scanNested checks the array or object that starts at data[i] and returns
// the index just past it; at most lim.depth arrays and objects may be open at
// once. It keeps no recursion: the open arrays and objects are bits on a
// stack, inline up to a depth of 128 and on the heap past it.
func scanNested(data []byte, i int, lim jsonLimits) (int, jsonStatus) {
	var inline [2]uint64
	open := inline[:] // bit set: an object; clear: an array
	depth := 0
	push := func(object bool) bool {
		if depth >= lim.depth {
			return false
		}
		if depth == len(open)*64 {
			open = append(open, make([]uint64, lim.depth/64+1-len(open))...)
		}
		if object {
			open[depth/64] |= 1 << (depth % 64)
		} else {
			open[depth/64] &^= 1 << (depth % 64)
		}
		depth++
		return true
	}
	inObject := func() bool { return open[(depth-1)/64]&(1<<((depth-1)%64)) != 0 }
	// key reads `"key" :` at i inside an object and returns the index of the
	// value that follows.
	key := func(i int) (int, bool) {
		if i >= len(data) || data[i] != '"' {
			return 0, false
		}
		end, _, ok := scanString(data, i)
		if !ok {
			return 0, false
		}
		i = skipBlanks(data, end)
		if i >= len(data) || data[i] != ':' {
			return 0, false
		}
		return skipBlanks(data, i+1), true
	}

	var ok bool
	var status jsonStatus
	for {
		// A value starts at i.
		if i >= len(data) {
			return 0, jsonMalformed
		}
		if c := data[i]; c == '{' || c == '[' {
			object, closer := c == '{', byte(']')
			if object {
				closer = '}'
			}
			if !push(object) {
				return 0, jsonTooDeep
			}
			i = skipBlanks(data, i+1)
			if i >= len(data) || data[i] != closer {
				if object {
					if i, ok = key(i); !ok {
						return 0, jsonMalformed
					}
				}
				continue
			}
			i++
			depth--
		} else if i, status = scanValue(data, i, lim); status != jsonOK {
			return 0, status
		}
		// After a complete value: close what ends here, or move to the next
		// element of the innermost open array or object.
		for {
			if depth == 0 {
				return i, jsonOK
			}
			i = skipBlanks(data, i)
			if i >= len(data) {
				return 0, jsonMalformed
			}
			object := inObject()
			if data[i] == ',' {
				i = skipBlanks(data, i+1)
				if object {
					if i, ok = key(i); !ok {
						return 0, jsonMalformed
					}
				}
				break
			}
			if (object && data[i] == '}') || (!object && data[i] == ']') {
				i++
				depth--
				continue
			}
			return 0, jsonMalformed
		}
	}
}

func scanLiteral(data []byte, i int, lit string) (int, jsonStatus) {
	if len(data)-i < len(lit) || string(data[i:i+len(lit)]) != lit {
		return 0, jsonMalformed
	}
	return i + len(lit), jsonOK
}

// jsonString returns the unescaped content of a raw JSON value that is a
// string, or false if the value is of another type.
func jsonString(value []byte) ([]byte, bool) {
	if len(value) < 2 || value[0] != '"' {
		return nil, false
	}
	content := value[1 : len(value)-1]
	if bytes.IndexByte(content, '\\') >= 0 {
		return unescape(content), true
	}
	return content, true
}

// unescape decodes the escapes of a string already checked by scanString.
// A lone surrogate escape is kept as its own three-byte sequence (WTF-8),
// so that two different lone surrogates never compare equal, as they do not
// in the sender's Python.
func unescape(s []byte) []byte {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); {
		c := s[i]
		if c != '\\' {
			out = append(out, c)
			i++
			continue
		}
		switch s[i+1] {
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'u':
			r := hex4(s[i+2:])
			i += 6
			if 0xD800 <= r && r < 0xDC00 && i+6 <= len(s) && s[i] == '\\' && s[i+1] == 'u' {
				if lo := hex4(s[i+2:]); 0xDC00 <= lo && lo < 0xE000 {
					out = utf8.AppendRune(out, 0x10000+(r-0xD800)<<10+(lo-0xDC00))
					i += 6
					continue
				}
			}
			if 0xD800 <= r && r < 0xE000 {
				out = append(out, 0xE0|byte(r>>12), 0x80|byte(r>>6)&0x3F, 0x80|byte(r)&0x3F)
			} else {
				out = utf8.AppendRune(out, r)
			}
			continue
		default: // '"', '\\', '/'
			out = append(out, s[i+1])
		}
		i += 2
	}
	return out
}

func hex4(b []byte) rune {
	return rune(hexValue(b[0])<<12 | hexValue(b[1])<<8 | hexValue(b[2])<<4 | hexValue(b[3]))
}
