package trivialsecwebhook

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"hash"
	"math"
	"mime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/google/uuid"
)

// This file is verification as a pure function: an Authorization value, a
// Content-Type and a body in, a verified event or a reasonCode out. It knows
// nothing of HTTP servers or Caddy; module.go wires it in.

// eventNames are the 15 event names the sender uses, in its own order.
var eventNames = [...]string{
	"hosted_monitoring",
	"hosted_scanner",
	"self_hosted_uploads",
	"early_warning_email",
	"early_warning_domain",
	"early_warning_ip",
	"new_findings_certificates",
	"new_findings_domains",
	"client_status",
	"client_activity",
	"scanner_configurations",
	"report_created",
	"report_deleted",
	"account_activity",
	"member_activity",
}

// eventIndex returns the position of name in eventNames, or -1.
func eventIndex(name []byte) int {
	for i, n := range eventNames {
		if string(name) == n {
			return i
		}
	}
	return -1
}

// eventSet is a set of event names as bits of their eventNames index.
type eventSet uint16

const allEvents eventSet = 1<<len(eventNames) - 1

// maxTokenLength bounds the token before anything is decoded. A production
// token is about 600 bytes; 8 KiB leaves room for long account names and
// endpoint URLs.
const maxTokenLength = 8 << 10

// Unix seconds of 9999-12-31T23:59:59Z: the last instant a timestamp or a
// NumericDate claim may name.
const maxUnixSeconds = 253402300799

var b64 = base64.RawURLEncoding.Strict()

// verifierConfig is what a verifier checks against, prepared at provision.
type verifierConfig struct {
	keys     [][]byte  // the signing secrets, tried in turn
	account  string    // aud must hold urn:trivialsec:webhook:client_endpoint:<account>
	issuer   string    // iss must equal it
	subject  uuid.UUID // sub must parse to it
	endpoint string    // when set, cep (if present) must equal it
	leeway   time.Duration
	events   eventSet         // event names accepted
	body     jsonLimits       // what the body's JSON may hold
	now      func() time.Time // the clock
}

// verifier checks deliveries. It is safe for concurrent use.
type verifier struct {
	verifierConfig
	audience string
	macs     []sync.Pool // per key: keyed HMAC-SHA256 states, reset and reused
}

func newVerifier(c verifierConfig) *verifier {
	if c.now == nil {
		c.now = time.Now
	}
	v := &verifier{
		verifierConfig: c,
		audience:       "urn:trivialsec:webhook:client_endpoint:" + c.account,
		macs:           make([]sync.Pool, len(c.keys)),
	}
	for i, key := range c.keys {
		v.macs[i].New = func() any { return hmac.New(sha256.New, key) }
	}
	return v
}

// verifiedToken is what a token whose signature verified says.
type verifiedToken struct {
	EventID   uuid.UUID // the eid claim's UUID, when eid is urn:uuid:<uuid>
	EventName string    // the evn claim when it is one of eventNames
	Endpoint  string    // the cep claim
	IssuedAt  time.Time
	ExpiresAt time.Time

	hasEndpoint bool // the cep claim is present, empty or not
	eidValid    bool // eid is urn:uuid: and a hyphenated UUID
	evn         int  // evnAbsent, evnUnknown, or the evn claim's index in eventNames
}

const (
	evnAbsent  = -1
	evnUnknown = -2
)

// event is a verified delivery.
type event struct {
	ID        uuid.UUID
	Name      string // one of eventNames
	Timestamp time.Time
	token     verifiedToken
	nameIndex int // Name's index in eventNames
}

// tokenFrom returns the token in an Authorization value: the documented
// "Bearer <jwt>" (scheme in any case) or the production sender's bare
// "<jwt>", blanks trimmed around it.
func tokenFrom(authorization string) string {
	s := strings.Trim(authorization, " \t")
	if len(s) >= 6 && strings.EqualFold(s[:6], "bearer") && (len(s) == 6 || s[6] == ' ' || s[6] == '\t') {
		s = strings.TrimLeft(s[6:], " \t")
	}
	return s
}

// tokenScratch is the memory one token check decodes into. It is pooled, so
// that decoding a token allocates nothing; nothing in it outlives the check.
// (A check allocates once, for a token with a cep claim: the claim's string,
// which the endpoint placeholder hands on.) The members and the claims read
// from the decoded parts are on the check's stack: written there, their
// pointers cost the garbage collector nothing.
type tokenScratch struct {
	raw, header, payload, sig, mac []byte
}

var tokenScratchPool = sync.Pool{New: func() any {
	return &tokenScratch{
		raw:     make([]byte, 0, 1024),
		header:  make([]byte, 0, 64),
		payload: make([]byte, 0, 1024),
		sig:     make([]byte, 0, sha256.Size),
		mac:     make([]byte, 0, sha256.Size),
	}
}}

// hs256Headers are the encoded headers the senders write (golang-jwt and
// current PyJWT sort the keys; older PyJWT put typ first), taken without
// decoding them: each decodes to the JSON beside it, which says alg HS256
// and has no crit, as reading it would find (TestHS256Headers holds them to
// that). Any other header, however encoded, is decoded and read.
var hs256Headers = [...]string{
	"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9", // {"alg":"HS256","typ":"JWT"}
	"eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9", // {"typ":"JWT","alg":"HS256"}
	"eyJhbGciOiJIUzI1NiJ9",                 // {"alg":"HS256"}
}

// verifyToken runs check 3: the JWT, its signature and its claims.
func (v *verifier) verifyToken(authorization string) (verifiedToken, reasonCode) {
	token := tokenFrom(authorization)
	if token == "" {
		return verifiedToken{}, reasonMissingToken
	}
	if len(token) > maxTokenLength {
		return verifiedToken{}, reasonMalformedToken
	}
	// No defer: the check has too many returns for Go to open-code one.
	// A panic inside leaves the scratch to the garbage collector.
	s := tokenScratchPool.Get().(*tokenScratch)
	tok, reason := v.checkToken(s, token)
	tokenScratchPool.Put(s)
	return tok, reason
}

// checkToken is verifyToken's work, on a token of bounded length, decoded
// into s.
func (v *verifier) checkToken(s *tokenScratch, token string) (verifiedToken, reasonCode) {
	s.raw = append(s.raw[:0], token...)
	raw := s.raw
	dot1 := bytes.IndexByte(raw, '.')
	dot2 := bytes.LastIndexByte(raw, '.')
	if dot1 < 0 || dot1 == dot2 || bytes.IndexByte(raw[dot1+1:dot2], '.') >= 0 {
		return verifiedToken{}, reasonMalformedToken
	}

	// The algorithm is pinned: the header may only confirm it.
	var scratch [16]member
	var err error
	if !slices.Contains(hs256Headers[:], token[:dot1]) {
		if s.header, err = b64.AppendDecode(s.header[:0], raw[:dot1]); err != nil {
			return verifiedToken{}, reasonMalformedToken
		}
		members, status := readObject(s.header, scratch[:0], defaultJSONLimits)
		if status != jsonOK {
			return verifiedToken{}, reasonMalformedToken
		}
		var alg []byte
		crit := false
		for _, m := range members {
			switch string(m.key) {
			case "alg":
				alg, _ = jsonString(m.value)
			case "crit":
				crit = true
			}
		}
		if string(alg) != jwt.SigningMethodHS256.Alg() {
			return verifiedToken{}, reasonBadAlgorithm
		}
		// A critical extension (b64: false, say) must be understood or the
		// token refused (RFC 7515 4.1.11); the module understands none.
		if crit {
			return verifiedToken{}, reasonCriticalHeader
		}
	}

	// The token's shape is checked whole before its signature: from there
	// on, every refusal is of something the signer wrote.
	if s.payload, err = b64.AppendDecode(s.payload[:0], raw[dot1+1:dot2]); err != nil {
		return verifiedToken{}, reasonMalformedToken
	}
	if s.sig, err = b64.AppendDecode(s.sig[:0], raw[dot2+1:]); err != nil {
		return verifiedToken{}, reasonMalformedToken
	}
	if !v.signatureValid(s, raw[:dot2]) {
		return verifiedToken{}, reasonBadSignature
	}

	var c claims
	reason := c.read(s.payload, scratch[:0])
	// The signature verified: what the claims say is the sender's word, and
	// names the event in the log even when a check below refuses it.
	tok := verifiedToken{IssuedAt: c.iat, ExpiresAt: c.exp, evn: evnAbsent}
	tok.EventID, tok.eidValid = eidUUID(c.eid)
	if c.evn != nil {
		tok.evn = eventIndex(c.evn)
		if tok.evn < 0 {
			tok.evn = evnUnknown
		} else {
			tok.EventName = eventNames[tok.evn]
		}
	}
	if c.cep != nil {
		tok.Endpoint, tok.hasEndpoint = string(c.cep), true
	}
	if reason != reasonNone {
		return tok, reason
	}
	if reason := checkTimes(v.now(), c.exp, notBefore(c.iat, c.nbf), v.leeway); reason != reasonNone {
		return tok, reason
	}
	if !audienceHolds(c.aud, v.audience) {
		return tok, reasonBadAudience
	}
	if string(c.iss) != v.issuer {
		return tok, reasonBadIssuer
	}
	if sub, ok := parseUUID(c.sub); !ok || sub != v.subject {
		return tok, reasonBadSubject
	}
	return tok, reasonNone
}

// signatureValid reports whether one of the secrets signs input with
// HMAC-SHA256 into s.sig, compared in constant time. It is crypto/hmac, as
// in golang-jwt's SigningMethodHS256.Verify, with the keyed state reused
// rather than made again for every token.
func (v *verifier) signatureValid(s *tokenScratch, input []byte) bool {
	for i := range v.macs {
		mac := v.macs[i].Get().(hash.Hash)
		mac.Reset()
		mac.Write(input)
		s.mac = mac.Sum(s.mac[:0])
		v.macs[i].Put(mac)
		if hmac.Equal(s.mac, s.sig) {
			return true
		}
	}
	return false
}

// checkTimes checks exp and nbf as golang-jwt's Validator does with
// WithLeeway: expired once now reaches exp + leeway, not yet valid while now
// is before nbf - leeway, expiry reported first. Two comparisons in place of
// the Validator spare 180 ns and an allocation per token;
// TestCheckTimesMatchesGolangJWT holds them to the Validator at the edges.
func checkTimes(now, exp, nbf time.Time, leeway time.Duration) reasonCode {
	if !now.Before(exp.Add(leeway)) {
		return reasonExpired
	}
	if now.Before(nbf.Add(-leeway)) {
		return reasonNotYetValid
	}
	return reasonNone
}

// senderHeadStart is how far ahead of iat the production sender sets nbf
// (nbf = iat + 3 s) before it posts the delivery at once.
const senderHeadStart = 3 * time.Second

// notBefore is when a token becomes valid by its design: nbf, less the head
// start of up to 3 s that the production sender gives nbf over iat. That head
// start is not clock skew, and must not use up the leeway: with it taken
// off, a production delivery passes whenever the two clocks are within the
// leeway of each other, in either direction, whatever the leeway. A token
// whose nbf is no later than iat (the documented form) keeps its nbf; one
// further ahead than the sender ever sets it keeps all but 3 s of it.
func notBefore(iat, nbf time.Time) time.Time {
	return nbf.Add(-min(max(nbf.Sub(iat), 0), senderHeadStart))
}

// claims are the JWT claims the module reads, as decoded bytes and times.
type claims struct {
	iat, nbf, exp time.Time
	aud           []byte // the raw JSON value: a string or an array
	iss, sub      []byte
	eid, evn, cep []byte // evn and cep: nil when absent
}

// read fills c from the claims JSON, checking presence and types. It runs
// once the signature verified, so its refusals are the signer's doing:
// claims that are not one JSON object without duplicate names are
// malformed_claim, as a claim of the wrong type is.
func (c *claims) read(payload []byte, scratch []member) reasonCode {
	members, status := readObject(payload, scratch, defaultJSONLimits)
	if status != jsonOK {
		return reasonMalformedClaim
	}
	const (
		hasIat = 1 << iota
		hasNbf
		hasExp
		hasAud
		hasIss
		hasSub
		hasEID
		required = 1<<iota - 1
	)
	var has int
	for _, m := range members {
		var ok bool
		switch string(m.key) {
		case "iat":
			has |= hasIat
			c.iat, ok = numericDate(m.value)
		case "nbf":
			has |= hasNbf
			c.nbf, ok = numericDate(m.value)
		case "exp":
			has |= hasExp
			c.exp, ok = numericDate(m.value)
		case "aud":
			has |= hasAud
			c.aud, ok = m.value, audienceWellTyped(m.value)
		case "iss":
			has |= hasIss
			c.iss, ok = jsonString(m.value)
		case "sub":
			has |= hasSub
			c.sub, ok = jsonString(m.value)
		case "eid":
			has |= hasEID
			c.eid, ok = jsonString(m.value)
		case "evn":
			c.evn, ok = jsonString(m.value)
		case "cep":
			c.cep, ok = jsonString(m.value)
		default:
			ok = true
		}
		if !ok {
			return reasonMalformedClaim
		}
	}
	if has != required {
		return reasonMissingClaim
	}
	return reasonNone
}

// numericDate reads a NumericDate claim: a JSON number of seconds, its
// fraction dropped as PyJWT and golang-jwt drop it.
func numericDate(value []byte) (time.Time, bool) {
	secs, ok := unixSeconds(value)
	if !ok {
		return time.Time{}, false
	}
	return time.Unix(int64(secs), 0), true
}

// unixSeconds reads a raw JSON number of seconds since 1970 up to the end of
// year 9999.
func unixSeconds(value []byte) (float64, bool) {
	if len(value) == 0 || (value[0] != '-' && (value[0] < '0' || value[0] > '9')) {
		return 0, false
	}
	if len(value) <= 12 { // the sender's whole seconds: no float parsing
		if n, ok := digits(value); ok {
			return float64(n), n <= maxUnixSeconds
		}
	}
	f, err := strconv.ParseFloat(string(value), 64)
	if err != nil || math.IsNaN(f) || f < 0 || f > maxUnixSeconds {
		return 0, false
	}
	return f, true
}

// audienceWellTyped reports whether aud is a string or an array of strings.
func audienceWellTyped(value []byte) bool {
	ok := true
	eachAudience(value, func(_ []byte, isString bool) bool {
		ok = ok && isString
		return ok
	})
	return ok && (value[0] == '"' || value[0] == '[')
}

// audienceHolds reports whether aud, a string or an array of strings, holds
// want.
func audienceHolds(value []byte, want string) bool {
	found := false
	eachAudience(value, func(s []byte, _ bool) bool {
		found = string(s) == want
		return !found
	})
	return found
}

// eachAudience calls fn with each string of aud (a string, or the elements
// of an array), until fn returns false. aud is well-formed JSON already.
func eachAudience(value []byte, fn func(s []byte, isString bool) bool) {
	if value[0] != '[' {
		s, ok := jsonString(value)
		fn(s, ok)
		return
	}
	i := skipBlanks(value, 1)
	for i < len(value) && value[i] != ']' {
		end, _ := scanValue(value, i, defaultJSONLimits)
		s, ok := jsonString(value[i:end])
		if !fn(s, ok) {
			return
		}
		i = skipBlanks(value, end)
		if value[i] == ',' {
			i = skipBlanks(value, i+1)
		}
	}
}

// checkContentType runs check 5: no Content-Type, or a JSON one
// (application/json or application/*+json, parameters allowed).
func checkContentType(contentType string) reasonCode {
	if contentType == "" {
		return reasonNone
	}
	mediaType, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		return reasonUnsupportedMediaType
	}
	if mediaType == "application/json" ||
		(strings.HasPrefix(mediaType, "application/") && strings.HasSuffix(mediaType, "+json") && len(mediaType) > len("application/+json")) {
		return reasonNone
	}
	return reasonUnsupportedMediaType
}

// verifyBody runs checks 7 to 10 on a body already bounded by max_body,
// against the token that came with it.
func (v *verifier) verifyBody(tok verifiedToken, body []byte) (event, reasonCode) {
	var buf [8]member
	members, status := readObject(body, buf[:0], v.body)
	switch status {
	case jsonMalformed:
		return event{}, reasonMalformedBody
	case jsonDuplicateKey:
		return event{}, reasonDuplicateKey
	case jsonTooDeep:
		return event{}, reasonTooDeep
	case jsonNumberTooLong:
		return event{}, reasonNumberTooLong
	}

	var id, name, timestamp, payload []byte
	for _, m := range members {
		switch string(m.key) {
		case "event_id":
			id = m.value
		case "event_name":
			name = m.value
		case "timestamp":
			timestamp = m.value
		case "payload":
			payload = m.value
		default:
			if foldsOntoField(m.key) {
				return event{}, reasonFoldedKey
			}
		}
	}
	if id == nil || name == nil || timestamp == nil || payload == nil {
		return event{}, reasonMissingField
	}
	var ev event
	s, ok := jsonString(id)
	if !ok {
		return event{}, reasonInvalidEventID
	}
	ev.ID, ok = parseUUID(s)
	if !ok {
		return event{}, reasonInvalidEventID
	}
	s, ok = jsonString(name)
	index := -1
	if ok {
		index = eventIndex(s)
	}
	if index < 0 {
		return event{}, reasonInvalidEventName
	}
	ev.Name, ev.nameIndex = eventNames[index], index
	ev.Timestamp, ok = parseTimestamp(timestamp)
	if !ok {
		return event{}, reasonInvalidTimestamp
	}
	if payload[0] != '{' {
		return event{}, reasonInvalidPayload
	}

	if !tok.eidValid || tok.EventID != ev.ID {
		return event{}, reasonEIDMismatch
	}
	if tok.evn != evnAbsent && tok.evn != index {
		return event{}, reasonEVNMismatch
	}
	if v.endpoint != "" && tok.hasEndpoint && tok.Endpoint != v.endpoint {
		return event{}, reasonEndpointMismatch
	}
	if v.events&(1<<index) == 0 {
		return event{}, reasonEventNotAllowed
	}
	ev.token = tok
	return ev, reasonNone
}

// foldsOntoField reports whether a top-level key that is not one of the four
// field names is one of them but for case, under Unicode simple folding
// ("EVENT_ID", "Payload", "time\u017ftamp"). Go's encoding/json, .NET's and
// other case-insensitive binders read such a key as the field, and the last
// one wins: the service would read a value the module never checked.
func foldsOntoField(key []byte) bool {
	for _, name := range fieldNames {
		if bytes.EqualFold(key, name) {
			return true
		}
	}
	return false
}

var fieldNames = [...][]byte{[]byte("event_id"), []byte("event_name"), []byte("timestamp"), []byte("payload")}

// parseUUID accepts the textual forms of a UUID: hyphenated, urn:uuid:,
// braces, or 32 hex digits, in any case.
func parseUUID(s []byte) (uuid.UUID, bool) {
	id, err := uuid.ParseBytes(s)
	return id, err == nil
}

// eidUUID reads the eid claim: urn:uuid: (any case) and a hyphenated UUID.
func eidUUID(eid []byte) (uuid.UUID, bool) {
	if len(eid) != len("urn:uuid:")+36 {
		return uuid.UUID{}, false
	}
	return parseUUID(eid)
}

// parseTimestamp reads the timestamp field: a JSON number of Unix seconds,
// or a string holding an RFC 3339 / ISO 8601 date-time with "T", "t" or a
// space between date and time, an optional fraction of up to 9 digits, and
// an optional offset (Z, +HH:MM or +HHMM; none means UTC). The result is UTC.
func parseTimestamp(value []byte) (time.Time, bool) {
	if value[0] != '"' {
		f, ok := unixSeconds(value)
		if !ok {
			return time.Time{}, false
		}
		sec := math.Floor(f)
		usec := math.Round((f - sec) * 1e6)
		return time.Unix(int64(sec), int64(usec)*1e3).UTC(), true
	}
	s, _ := jsonString(value)
	// YYYY-MM-DDTHH:MM:SS is 19 bytes.
	if len(s) < 19 || s[4] != '-' || s[7] != '-' || s[13] != ':' || s[16] != ':' ||
		(s[10] != 'T' && s[10] != 't' && s[10] != ' ') {
		return time.Time{}, false
	}
	year, ok1 := digits(s[0:4])
	month, ok2 := digits(s[5:7])
	day, ok3 := digits(s[8:10])
	hour, ok4 := digits(s[11:13])
	minute, ok5 := digits(s[14:16])
	second, ok6 := digits(s[17:19])
	if !(ok1 && ok2 && ok3 && ok4 && ok5 && ok6) || year < 1 ||
		month < 1 || month > 12 || day < 1 || hour > 23 || minute > 59 || second > 59 {
		return time.Time{}, false
	}
	rest := s[19:]
	nsec := 0
	if len(rest) > 0 && rest[0] == '.' {
		n := skipDigits(rest, 1)
		if n == 1 || n > 10 {
			return time.Time{}, false
		}
		frac, _ := digits(rest[1:n])
		for i := n; i < 10; i++ {
			frac *= 10
		}
		nsec, rest = frac, rest[n:]
	}
	offset := 0
	switch {
	case len(rest) == 0:
	case len(rest) == 1 && (rest[0] == 'Z' || rest[0] == 'z'):
	case (len(rest) == 6 && rest[3] == ':') || len(rest) == 5:
		if rest[0] != '+' && rest[0] != '-' {
			return time.Time{}, false
		}
		oh, okh := digits(rest[1:3])
		om, okm := digits(rest[len(rest)-2:])
		if !okh || !okm || oh > 23 || om > 59 {
			return time.Time{}, false
		}
		offset = (oh*60 + om) * 60
		if rest[0] == '-' {
			offset = -offset
		}
	default:
		return time.Time{}, false
	}
	t := time.Date(year, time.Month(month), day, hour, minute, second, nsec, time.UTC)
	if t.Day() != day { // February 30th and the like
		return time.Time{}, false
	}
	return t.Add(-time.Duration(offset) * time.Second), true
}

// digits reads a short run of ASCII digits.
func digits(b []byte) (int, bool) {
	n := 0
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, true
}
