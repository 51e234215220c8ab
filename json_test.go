package trivialsecwebhook

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/go-json-experiment/json/jsontext"
)

// jsonTexts are values to hold against encoding/json, which follows
// RFC 8259 too but does not check UTF-8.
var jsonTexts = []string{
	`0`, `-0`, `-0.5e+10`, `1E5`, `01`, `1.`, `.5`, `-`, `+1`, `1e`, `1e+`, `0x10`, `1_000`,
	`""`, `"a\"b"`, `"\u00e9\ud83d\ude00"`, `"\ud800"`, `"\u12"`, `"\x41"`, `"\'"`, `"a` + "\t" + `b"`, `"`, `"\"`,
	`true`, `false`, `null`, `tru`, `nul`, `True`, `NaN`, `Infinity`, `-Infinity`, `undefined`,
	`[]`, `[ ]`, `[1,2]`, `[1,]`, `[,1]`, `[1 2]`, `[`, `]`, `[[[]]]`, `[[[]]`, `[{}]`, `[{]`,
	`{}`, `{ }`, `{"a":1}`, `{"a":1,}`, `{"a" 1}`, `{a:1}`, `{'a':1}`, `{"a":1 "b":2}`, `{"a":}`, `{1:2}`,
	`{"a":[1,{"b":null}],"c":"d"}`, `{"a":{"a":{"a":{}}}}`, `{"a":1}}`, `{"a":1`, `{"a"`, `{"a":1,"a":2}`,
	` {"a" : [ true , false ] } `, "\t[\n1\r]\n", `[1]/* c */`, `// c` + "\n" + `1`,
}

func TestScanValueMatchesEncodingJSON(t *testing.T) {
	for _, text := range jsonTexts {
		data := []byte(text)
		i := skipBlanks(data, 0)
		end, status := scanValue(data, i, wideJSONLimits)
		got := status == jsonOK && skipBlanks(data, end) == len(data)
		want := json.Valid(data)
		if got != want {
			t.Errorf("%q: scanValue says %v, encoding/json says %v", text, got, want)
		}
	}
}

func TestReadObject(t *testing.T) {
	for _, tc := range []struct {
		text string
		want jsonStatus
		keys []string
	}{
		{`{}`, jsonOK, nil},
		{` { "a" : 1 , "b" : [2] } `, jsonOK, []string{"a", "b"}},
		{`{"\u0061":1,"b\n":2}`, jsonOK, []string{"a", "b\n"}},
		{`{"a":1,"a":2}`, jsonDuplicateKey, nil},
		{`{"a":1,"\u0061":2}`, jsonDuplicateKey, nil},
		{`{"\ud800":1,"\udbff":2}`, jsonOK, []string{"\xed\xa0\x80", "\xed\xaf\xbf"}},
		{`{"\ud83d\ude00":1,"😀":2}`, jsonDuplicateKey, nil},
		{`{"a":{"x":1,"x":2}}`, jsonOK, []string{"a"}},
		{`[]`, jsonMalformed, nil},
		{`{"a":1} {}`, jsonMalformed, nil},
		{"\xef\xbb\xbf{}", jsonMalformed, nil},
		{"{\"a\":\"\xff\"}", jsonMalformed, nil},
		{`{"a":1,}`, jsonMalformed, nil},
		{``, jsonMalformed, nil},
	} {
		members, got := readObject([]byte(tc.text), nil, defaultJSONLimits)
		if got != tc.want {
			t.Errorf("%q: status %d, want %d", tc.text, got, tc.want)
			continue
		}
		if tc.keys == nil {
			continue
		}
		var keys []string
		for _, m := range members {
			keys = append(keys, string(m.key))
		}
		if strings.Join(keys, "|") != strings.Join(tc.keys, "|") {
			t.Errorf("%q: keys %q, want %q", tc.text, keys, tc.keys)
		}
	}
}

func TestReadObjectManyKeys(t *testing.T) {
	var b strings.Builder
	b.WriteString("{")
	for i := range 100 {
		if i > 0 {
			b.WriteString(",")
		}
		b.WriteString(`"k` + strings.Repeat("x", i) + `":1`)
	}
	if _, st := readObject([]byte(b.String()+"}"), nil, defaultJSONLimits); st != jsonOK {
		t.Fatalf("100 distinct keys: status %d", st)
	}
	if _, st := readObject([]byte(b.String()+`,"kxxxxx":2}`), nil, defaultJSONLimits); st != jsonDuplicateKey {
		t.Fatalf("101 keys, one repeated: status %d", st)
	}
}

// TestHasDuplicateKey holds the print-first comparison to comparing every
// pair byte for byte: keys of one print that differ (same length, first and
// last bytes), empty keys, and the map past 16 members.
func TestHasDuplicateKey(t *testing.T) {
	naive := func(keys []string) bool {
		for i := range keys {
			for j := range i {
				if keys[i] == keys[j] {
					return true
				}
			}
		}
		return false
	}
	alphabet := []string{"", "a", "b", "ab", "ba", "aab", "abb", "a_b", "a\x00b", "abab", "event_id", "eVent_id", "evenT_id"}
	r := rand.New(rand.NewPCG(13, 17))
	for range 20000 {
		keys := make([]string, r.IntN(20))
		for i := range keys {
			keys[i] = alphabet[r.IntN(len(alphabet))]
		}
		members := make([]member, len(keys))
		for i, k := range keys {
			members[i] = member{key: []byte(k)}
		}
		if got, want := hasDuplicateKey(members), naive(keys); got != want {
			t.Fatalf("%q: duplicate %v, want %v", keys, got, want)
		}
	}
	if keyPrint([]byte("a_b")) != keyPrint([]byte("axb")) || keyPrint(nil) == keyPrint([]byte("\x00")) {
		t.Fatal("keyPrint is not what the test assumes")
	}
}

func TestUnescapeMatchesEncodingJSON(t *testing.T) {
	for _, s := range []string{`plain`, `a\"b\\c\/d`, `\b\f\n\r\t`, `\u00e9\u20ac`, `\ud83d\ude00`, `caf\u00E9`, `\u0000`} {
		var want string
		if err := json.Unmarshal([]byte(`"`+s+`"`), &want); err != nil {
			t.Fatal(err)
		}
		if got := string(unescape([]byte(s))); got != want {
			t.Errorf("%q: %q, want %q", s, got, want)
		}
	}
	// Lone surrogates stay distinct, where encoding/json would turn both
	// into U+FFFD.
	a, b := unescape([]byte(`\ud800`)), unescape([]byte(`\udc00`))
	if string(a) == string(b) || utf8.Valid(a) {
		t.Errorf("lone surrogates: %q and %q", a, b)
	}
}

// wideJSONLimits let through anything well-formed up to the deepest
// max_depth, for the tests that hold the grammar to encoding/json.
var wideJSONLimits = jsonLimits{depth: maxJSONDepth, number: math.MaxInt}

// TestReadObjectLimits: depth counts the outermost object, and a number's
// length its whole text; one past either limit is refused with its status.
func TestReadObjectLimits(t *testing.T) {
	for _, limit := range []int{1, 2, defaultJSONLimits.depth, 128, 129, maxJSONDepth} {
		lim := jsonLimits{depth: limit, number: 100}
		for _, depth := range []int{limit - 1, limit, limit + 1} {
			if depth < 1 {
				continue
			}
			want := jsonOK
			if depth > limit {
				want = jsonTooDeep
			}
			// The outermost object, then arrays, and objects.
			arrays := `{"a":` + strings.Repeat("[", depth-1) + "0" + strings.Repeat("]", depth-1) + "}"
			objects := strings.Repeat(`{"a":`, depth) + "1" + strings.Repeat("}", depth)
			for _, text := range []string{arrays, objects} {
				if _, got := readObject([]byte(text), nil, lim); got != want {
					t.Errorf("limit %d, depth %d, %.12s...: status %d, want %d", limit, depth, text, got, want)
				}
			}
		}
	}
	if _, got := readObject([]byte(strings.Repeat("[", 100000)), nil, defaultJSONLimits); got != jsonMalformed {
		t.Errorf("100,000 open brackets: status %d", got)
	}
	for _, tc := range []struct {
		number string
		want   jsonStatus
	}{
		{strings.Repeat("9", 100), jsonOK},
		{strings.Repeat("9", 101), jsonNumberTooLong},
		{"-" + strings.Repeat("9", 99), jsonOK},
		{"-" + strings.Repeat("9", 100), jsonNumberTooLong},
		{"1." + strings.Repeat("0", 94) + "e+100", jsonNumberTooLong},
		{"1e" + strings.Repeat("0", 98), jsonOK},
		{strings.Repeat("9", 99) + "x", jsonMalformed},
	} {
		for _, text := range []string{`{"n":` + tc.number + `}`, `{"a":[{"n":` + tc.number + `}]}`} {
			if _, got := readObject([]byte(text), nil, defaultJSONLimits); got != tc.want {
				t.Errorf("%d-byte number %.10s... in %.8s: status %d, want %d", len(tc.number), tc.number, text, got, tc.want)
			}
		}
	}
}

// TestScanStringEachByte puts every byte value at every position of a
// string of 27 bytes, so that each is met in both words of the sixteen-byte
// scan, by the eight-byte scan, and by the byte loop behind them.
func TestScanStringEachByte(t *testing.T) {
	const n = 27
	for c := range 256 {
		for pos := range n {
			text := []byte(`"` + strings.Repeat("a", n) + `"`)
			text[1+pos] = byte(c)
			end, _, ok := scanString(text, 0)
			switch {
			case c == '"':
				if !ok || end != pos+2 {
					t.Errorf("quote at %d: end %d ok %v, want %d true", pos, end, ok, pos+2)
				}
			case c == '\\', c < 0x20, c >= 0x80: // a bad escape, a control character, a lone UTF-8 byte
				if ok {
					t.Errorf("byte %#x at %d: accepted", c, pos)
				}
			default:
				if !ok || end != len(text) {
					t.Errorf("byte %#x at %d: end %d ok %v, want %d true", c, pos, end, ok, len(text))
				}
			}
		}
	}
	// Two special bytes in one word: the first decides.
	if end, _, ok := scanString([]byte(`"ab"c`+"\x01"+`defgh"`), 0); !ok || end != 4 {
		t.Errorf("quote before a control character: end %d ok %v", end, ok)
	}
	if _, _, ok := scanString([]byte(`"ab`+"\x01"+`c"defgh"`), 0); ok {
		t.Error("control character before a quote: accepted")
	}
	// In the sixteen-byte scan: the first of two words decides, and the
	// second only when the first holds none.
	if end, _, ok := scanString([]byte(`"abcdef"hijklmno`+"\x01"+`qrstuvwxyz"`), 0); !ok || end != 8 {
		t.Errorf("quote in the first word, a control character in the second: end %d ok %v", end, ok)
	}
	if _, _, ok := scanString([]byte(`"abcdef`+"\x01"+`hijklmno"qrstuvwxyz"`), 0); ok {
		t.Error("control character in the first word, a quote in the second: accepted")
	}
	if end, _, ok := scanString([]byte(`"abcdefghijk"mn`+"\x01"+`pqrstuvwxyz"`), 0); !ok || end != 13 {
		t.Errorf("quote then a control character in the second word: end %d ok %v", end, ok)
	}
}

// TestScanNestedAcrossTheInlineStack mixes arrays and objects past the
// depth of 128 the bit stack holds inline, so that a closer is checked
// against a bit from before and after the stack moved to the heap.
func TestScanNestedAcrossTheInlineStack(t *testing.T) {
	for _, depth := range []int{127, 128, 129, 200} {
		var open, closeAll strings.Builder
		for d := range depth {
			if d%3 == 0 {
				open.WriteString(`{"k":`)
			} else {
				open.WriteString("[")
			}
		}
		for d := depth - 1; d >= 0; d-- {
			if d%3 == 0 {
				closeAll.WriteString("}")
			} else {
				closeAll.WriteString("]")
			}
		}
		good := open.String() + "1" + closeAll.String()
		if end, status := scanValue([]byte(good), 0, wideJSONLimits); status != jsonOK || end != len(good) {
			t.Errorf("depth %d: end %d status %d", depth, end, status)
		}
		// The outermost closer swapped: refused only by the bit of depth 0.
		bad := good[:len(good)-1] + "]"
		if _, status := scanValue([]byte(bad), 0, wideJSONLimits); status == jsonOK {
			t.Errorf("depth %d: a wrong outermost closer accepted", depth)
		}
		if json.Valid([]byte(good)) != true || json.Valid([]byte(bad)) != false {
			t.Fatalf("depth %d: encoding/json disagrees with the test", depth)
		}
	}
}

// BenchmarkReadObject times the JSON reader on delivery bodies beside
// jsontext doing the same work: check the text and hand back the top-level
// members as raw values (the Decoder), or only check it (Value.IsValid).
func BenchmarkReadObject(b *testing.B) {
	for _, size := range []int{1 << 10, 1 << 20} {
		body := []byte(benchDelivery(size).body())
		b.Run(fmt.Sprintf("readObject/body=%dKiB", size>>10), func(b *testing.B) {
			var buf [8]member
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				if _, status := readObject(body, buf[:0], defaultJSONLimits); status != jsonOK {
					b.Fatal(status)
				}
			}
		})
		b.Run(fmt.Sprintf("jsontext.Decoder/body=%dKiB", size>>10), func(b *testing.B) {
			var r bytes.Reader
			dec := jsontext.NewDecoder(&r)
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				r.Reset(body)
				dec.Reset(&r)
				if _, err := dec.ReadToken(); err != nil {
					b.Fatal(err)
				}
				for dec.PeekKind() != '}' {
					if _, err := dec.ReadToken(); err != nil {
						b.Fatal(err)
					}
					if _, err := dec.ReadValue(); err != nil {
						b.Fatal(err)
					}
				}
				if _, err := dec.ReadToken(); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("jsontext.Value.IsValid/body=%dKiB", size>>10), func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				if !jsontext.Value(body).IsValid() {
					b.Fatal("invalid")
				}
			}
		})
	}
}
