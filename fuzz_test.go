package trivialsecwebhook

import (
	"encoding/json"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/go-json-experiment/json/jsontext"
	"github.com/golang-jwt/jwt/v5"
	"github.com/google/uuid"
)

// Fuzz targets. Each checks, for any input: no panic; a refusal carries a
// known reason code; and nothing is accepted that an independent check
// (golang-jwt's own parser, jsontext and encoding/json) would not accept too.
// Seed corpora: testdata/fuzz/<target>/ and the f.Add calls.

// FuzzVerifyToken: a token is accepted only if golang-jwt, given the same
// rules, verifies it too: its parser for the algorithm, the encoding and the
// signature, its Validator for the claims. nbf is checked apart, 3 s later:
// the module takes the sender's head start of nbf over iat off (notBefore).
// A header with crit must be refused, as golang-jwt does not.
func FuzzVerifyToken(f *testing.F) {
	for _, style := range styles {
		d := style.make()
		f.Add(d.authorization())
		f.Add(signOther(d, "HS512"))
	}
	f.Add("")
	f.Add("Bearer e30.e30.")
	v := testVerifier(f, nil)
	parser := jwt.NewParser(
		jwt.WithValidMethods([]string{"HS256"}),
		jwt.WithStrictDecoding(),
		jwt.WithoutClaimsValidation(),
	)
	// A second more than the module's leeway: the module drops the fraction
	// of nbf and exp as PyJWT does; golang-jwt keeps it.
	leeway := jwt.WithLeeway(defaultLeeway + time.Second)
	validator := jwt.NewValidator(leeway, jwt.WithExpirationRequired(),
		jwt.WithAudience("urn:trivialsec:webhook:client_endpoint:"+testAccount),
		jwt.WithIssuer(defaultIssuer),
		jwt.WithTimeFunc(func() time.Time { return testNow }))
	nbfValidator := jwt.NewValidator(leeway,
		jwt.WithTimeFunc(func() time.Time { return testNow.Add(senderHeadStart) }))
	f.Fuzz(func(t *testing.T, authorization string) {
		tok, reason := v.verifyToken(authorization)
		checkReason(t, reason)
		if reason != reasonNone {
			return
		}
		claims := jwt.MapClaims{}
		parsed, err := parser.ParseWithClaims(tokenFrom(authorization), claims, func(*jwt.Token) (any, error) {
			return []byte(testSecret), nil
		})
		if err != nil {
			t.Fatalf("accepted a token golang-jwt refuses: %v", err)
		}
		if _, crit := parsed.Header["crit"]; crit {
			t.Fatal("accepted a token with crit")
		}
		nbf, hasNbf := claims["nbf"]
		delete(claims, "nbf")
		if err := validator.Validate(claims); err != nil {
			t.Fatalf("accepted claims golang-jwt refuses: %v", err)
		}
		if err := nbfValidator.Validate(jwt.MapClaims{"nbf": nbf}); !hasNbf || err != nil {
			t.Fatalf("accepted nbf %v: %v", nbf, err)
		}
		sub, _ := claims["sub"].(string)
		if id, err := uuid.Parse(sub); err != nil || id.String() != defaultSubject {
			t.Fatalf("accepted sub %q", sub)
		}
		if _, ok := claims["eid"].(string); !ok {
			t.Fatal("accepted a token without a string eid")
		}
		if tok.ExpiresAt.IsZero() {
			t.Fatal("accepted a token without exp")
		}
	})
}

// FuzzVerifyBody: under a genuine token, a body is accepted only if it is
// one valid UTF-8 JSON object without duplicate top-level keys, whose
// fields say what the module says they say.
func FuzzVerifyBody(f *testing.F) {
	for _, style := range styles {
		f.Add(style.make().body())
	}
	f.Add(`{"event_id": "` + testEventID + `", "event_name": "report_created", "timestamp": 1795890818, "payload": {"a": [1, {"b": "\ud800"}], "a": 2}}`)
	f.Add("\ufeff{}")
	v := testVerifier(f, nil)
	tok, reason := v.verifyToken(productionDelivery().authorization())
	if reason != reasonNone {
		f.Fatal(reason)
	}
	f.Fuzz(func(t *testing.T, body string) {
		ev, reason := v.verifyBody(tok, []byte(body))
		checkReason(t, reason)
		if reason != reasonNone {
			return
		}
		// Lone surrogate escapes pass (see FuzzReadObject); nothing else
		// jsontext refuses does.
		keys, err := strictKeys(body, jsontext.AllowInvalidUTF8(true))
		if err != nil || !utf8.ValidString(body) {
			t.Fatalf("accepted a body that is not one valid UTF-8 JSON object: %v", err)
		}
		if hasDuplicate(keys) {
			t.Fatalf("accepted a body with a top-level key twice: %q", keys)
		}
		var m map[string]json.RawMessage
		if err := json.Unmarshal([]byte(body), &m); err != nil {
			t.Fatalf("encoding/json: %v", err)
		}
		var fields struct{ EventID, EventName string }
		if json.Unmarshal(m["event_id"], &fields.EventID) != nil || json.Unmarshal(m["event_name"], &fields.EventName) != nil {
			t.Fatalf("accepted event_id %s, event_name %s", m["event_id"], m["event_name"])
		}
		if id, err := uuid.Parse(fields.EventID); err != nil || id != ev.ID || id != tok.EventID {
			t.Fatalf("accepted event_id %q as %s", fields.EventID, ev.ID)
		}
		if fields.EventName != ev.Name || eventIndex([]byte(ev.Name)) < 0 {
			t.Fatalf("accepted event_name %q as %q", fields.EventName, ev.Name)
		}
		if p := m["payload"]; len(p) == 0 || p[0] != '{' {
			t.Fatalf("accepted payload %s", p)
		}
	})
}

// FuzzReadObject holds the JSON reader to jsontext, the strict RFC 8259 /
// RFC 7493 decoder of Go's JSON v2 work, both ways: what one accepts the
// other accepts, and a duplicate top-level name is refused by both. The
// documented exceptions:
//   - a lone surrogate escape ("\ud800"): RFC 8259 allows it and readObject
//     lets it through untouched, as the sender's Python writes it; RFC 7493
//     and jsontext refuse it. Such a text must then be what jsontext accepts
//     with AllowInvalidUTF8, which lets lone surrogates by and nothing else
//     that is valid UTF-8, and the duplicate check must agree, but where
//     jsontext turned two different lone surrogates into U+FFFD;
//   - nesting past 9,000 levels is not compared: both stop at 10,000,
//     counted differently.
//
// That is with limits wide enough for any text (wideJSONLimits). With the
// default limits, the answer must be the same, unless the text is deeper or
// has a longer number than they allow, and then it is that limit's status.
func FuzzReadObject(f *testing.F) {
	for _, text := range jsonTexts {
		f.Add(text)
	}
	f.Add(`{"a":{"b":[1,2,{"c":"\u00e9"}]},"d":"\ud83d\ude00"}`)
	f.Add(`{"a":1,"\u0061":2}`)
	f.Add(`{"\ud800":1,"\udbff":2}`)
	f.Fuzz(func(t *testing.T, text string) {
		if depth(text) > maxJSONDepth-1000 {
			return
		}
		_, status := readObject([]byte(text), nil, wideJSONLimits)
		_, limited := readObject([]byte(text), nil, defaultJSONLimits)
		if status != jsonMalformed {
			tooDeep := depth(text) > defaultJSONLimits.depth
			tooLong := longestNumber(text) > defaultJSONLimits.number
			switch {
			case limited == jsonTooDeep && !tooDeep, limited == jsonNumberTooLong && !tooLong:
				t.Fatalf("limited without cause: %d", limited)
			case limited != jsonTooDeep && limited != jsonNumberTooLong && (tooDeep || tooLong || limited != status):
				t.Fatalf("default limits give %d, wide limits %d", limited, status)
			}
		} else if limited == jsonOK || limited == jsonDuplicateKey {
			t.Fatalf("default limits accept what wide limits refuse: %d", limited)
		}
		keys, err := strictKeys(text)
		want := jsonOK
		switch {
		case err != nil:
			want = jsonMalformed
		case hasDuplicate(keys):
			want = jsonDuplicateKey
		}
		if status == want {
			return
		}
		if want == jsonMalformed && status != jsonMalformed && utf8.ValidString(text) {
			if keys, err := strictKeys(text, jsontext.AllowInvalidUTF8(true)); err == nil {
				mangled := slices.ContainsFunc(keys, func(k string) bool { return strings.ContainsRune(k, utf8.RuneError) })
				if (status == jsonDuplicateKey) == hasDuplicate(keys) || (status == jsonOK && mangled) {
					return // a lone surrogate escape
				}
			}
		}
		t.Fatalf("readObject says %d, jsontext says %d (%v)", status, want, err)
	})
}

// FuzzUnmarshalCaddyfile: any Caddyfile block either fails with an error
// that names the file and line, or gives a config with what is required.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	// The input is what follows the directive's name, which Caddy has
	// matched before it calls UnmarshalCaddyfile.
	f.Add(" {\n\taccount acme\n\tsecret {env.S} {file./s}\n\tevents report_created\n\treplay memory 10\n}")
	f.Add(" {\n\taccount a\n\tsecret s\n\treplay redis redis://127.0.0.1:6379 p:\n\tleeway 2s\n\tmax_body 1MB\n\tmax_depth 16\n\tstrip_authorization\n}")
	f.Add(" {\n\tsubject x\n}")
	f.Add(" {\n\taccount a\n\tsecret s\n\tspool {\n\t\tstore file /tmp/s\n\t\tmode always\n\t\tbackoff 1s 1m\n\t\tmax_age 1h\n\t\tmax_size 1MB\n\t\tattempt_timeout 5s\n\t}\n}")
	f.Add(" {\n\taccount a\n\tsecret s\n\tspool off\n}")
	f.Fuzz(func(t *testing.T, input string) {
		// Caddy refuses a file its lexer cannot read before any directive
		// sees it (NewTestDispenser would log.Fatal on it instead).
		tokens, err := caddyfile.Tokenize([]byte("trivialsec_webhook"+input), "Testfile")
		if err != nil {
			return
		}
		var h Handler
		err = h.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens))
		if err != nil {
			if !strings.Contains(err.Error(), "Testfile:") {
				t.Fatalf("error without file and line: %v", err)
			}
			return
		}
		if h.Account == "" || len(h.Secret) == 0 {
			t.Fatalf("accepted without account or secret: %+v", h)
		}
		if h.Subject != "" {
			if _, err := uuid.Parse(h.Subject); err != nil {
				t.Fatalf("accepted subject %q", h.Subject)
			}
		}
		for _, name := range h.Events {
			if eventIndex([]byte(name)) < 0 {
				t.Fatalf("accepted event %q", name)
			}
		}
		if h.Leeway != nil && *h.Leeway < 0 {
			t.Fatal("accepted a negative leeway")
		}
		if h.MaxDepth < 0 || h.MaxDepth > maxJSONDepth {
			t.Fatalf("accepted max_depth %d", h.MaxDepth)
		}
		if h.Spool != nil {
			if err := h.Spool.validate(); err != nil {
				t.Fatalf("accepted a spool block that does not validate: %v", err)
			}
		}
	})
}

func checkReason(t *testing.T, r reasonCode) {
	t.Helper()
	if r >= reasonCount || (r != reasonNone && r.String() == "") {
		t.Fatalf("unknown reason %d", r)
	}
}

// strictKeys returns the names of the JSON object text, in order, as
// jsontext reads them: one object, valid UTF-8, no lone surrogate escape
// (unless opts allow it), nothing after it. Duplicate names are the
// caller's to find: readObject refuses them only at the top level.
func strictKeys(text string, opts ...jsontext.Options) ([]string, error) {
	dec := jsontext.NewDecoder(strings.NewReader(text), append(opts, jsontext.AllowDuplicateNames(true))...)
	tok, err := dec.ReadToken()
	if err != nil {
		return nil, err
	}
	if tok.Kind() != '{' {
		return nil, errors.New("not an object")
	}
	keys := []string{}
	for dec.PeekKind() != '}' {
		name, err := dec.ReadToken()
		if err != nil {
			return nil, err
		}
		keys = append(keys, name.String())
		if err := dec.SkipValue(); err != nil {
			return nil, err
		}
	}
	if _, err := dec.ReadToken(); err != nil {
		return nil, err
	}
	if _, err := dec.ReadToken(); err != io.EOF {
		return nil, errors.New("data after the object")
	}
	return keys, nil
}

func hasDuplicate(keys []string) bool {
	seen := make(map[string]bool, len(keys))
	for _, k := range keys {
		if seen[k] {
			return true
		}
		seen[k] = true
	}
	return false
}

// structure calls fn with each byte of JSON text that is not inside a
// string; a string's own bytes, its quotes included, come as one '"'.
func structure(text string, fn func(c byte)) {
	inString, escaped := false, false
	for i := 0; i < len(text); i++ {
		c := text[i]
		switch {
		case inString && escaped:
			escaped = false
		case inString && c == '\\':
			escaped = true
		case c == '"':
			inString = !inString
			if inString {
				fn('"')
			}
		case !inString:
			fn(c)
		}
	}
}

// longestNumber is the length of the longest number in valid JSON text.
func longestNumber(text string) int {
	longest, run := 0, 0
	structure(text, func(c byte) {
		if strings.IndexByte("-+.0123456789eE", c) < 0 {
			run = 0
			return
		}
		run++
		longest = max(longest, run)
	})
	return longest
}

// depth is the deepest nesting of arrays and objects in valid JSON text.
func depth(text string) int {
	d, deepest := 0, 0
	structure(text, func(c byte) {
		switch c {
		case '{', '[':
			d++
			deepest = max(deepest, d)
		case '}', ']':
			d--
		}
	})
	return deepest
}
