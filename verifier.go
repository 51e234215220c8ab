package trivialsecwebhook

import (
	"encoding/base64"
	"errors"
	"math"
	"mime"
	"strconv"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/google/uuid"
)

// This file is verification as a pure function: an Authorization value, a
// Content-Type and a body in, a verified event or a Reason out. It knows
// nothing of HTTP servers or Caddy; module.go wires it in.

// EventNames are the 15 event names the sender uses, in its own order.
var EventNames = [...]string{
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

// eventIndex returns the position of name in EventNames, or -1.
func eventIndex(name []byte) int {
	for i, n := range EventNames {
		if string(name) == n {
			return i
		}
	}
	return -1
}

// eventSet is a set of event names as bits of their EventNames index.
type eventSet uint16

const allEvents eventSet = 1<<len(EventNames) - 1

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
	maxBody  int64
	events   eventSet         // event names accepted
	now      func() time.Time // the clock
}

// verifier checks deliveries. It is safe for concurrent use.
type verifier struct {
	verifierConfig
	validator *jwt.Validator
}

func newVerifier(c verifierConfig) *verifier {
	if c.now == nil {
		c.now = time.Now
	}
	return &verifier{
		verifierConfig: c,
		validator: jwt.NewValidator(
			jwt.WithLeeway(c.leeway),
			jwt.WithAudience("urn:trivialsec:webhook:client_endpoint:"+c.account),
			jwt.WithIssuer(c.issuer),
			jwt.WithExpirationRequired(),
			jwt.WithTimeFunc(c.now),
		),
	}
}

// Token is what a verified token says.
type Token struct {
	EventID   string // the eid claim, as sent
	EventName string // the evn claim; empty when absent
	Endpoint  string // the cep claim; empty when absent
	IssuedAt  time.Time
	NotBefore time.Time
	ExpiresAt time.Time
}

// Event is a verified delivery.
type Event struct {
	ID        uuid.UUID
	Name      string // one of EventNames
	Timestamp time.Time
	Token     Token
	nameIndex int // Name's index in EventNames
}

// Verify runs checks 2 to 10 of SPEC section 2 on one delivery: the pure form
// of what ServeHTTP does around reading the body.
func (v *verifier) Verify(authorization, contentType string, body []byte) (Event, Reason) {
	tok, reason := v.VerifyToken(authorization)
	if reason != reasonNone {
		return Event{}, reason
	}
	if reason := CheckContentType(contentType); reason != reasonNone {
		return Event{}, reason
	}
	if int64(len(body)) > v.maxBody {
		return Event{}, ReasonBodyTooLarge
	}
	return v.VerifyBody(tok, body)
}

// TokenFrom returns the token in an Authorization value: the documented
// "Bearer <jwt>" (scheme in any case) or the production sender's bare
// "<jwt>", blanks trimmed around it.
func TokenFrom(authorization string) string {
	s := strings.Trim(authorization, " \t")
	if len(s) >= 6 && strings.EqualFold(s[:6], "bearer") && (len(s) == 6 || s[6] == ' ' || s[6] == '\t') {
		s = strings.TrimLeft(s[6:], " \t")
	}
	return s
}

// VerifyToken runs check 3: the JWT, its signature and its claims.
func (v *verifier) VerifyToken(authorization string) (Token, Reason) {
	raw := TokenFrom(authorization)
	if raw == "" {
		return Token{}, ReasonMissingToken
	}
	if len(raw) > maxTokenLength {
		return Token{}, ReasonMalformedToken
	}
	dot1 := strings.IndexByte(raw, '.')
	dot2 := strings.LastIndexByte(raw, '.')
	if dot1 < 0 || dot1 == dot2 || strings.IndexByte(raw[dot1+1:dot2], '.') >= 0 {
		return Token{}, ReasonMalformedToken
	}

	// The algorithm is pinned: the header may only confirm it.
	header, err := b64.DecodeString(raw[:dot1])
	if err != nil {
		return Token{}, ReasonMalformedToken
	}
	var buf [8]member
	members, status := readObject(header, buf[:0])
	if status != jsonOK {
		return Token{}, ReasonMalformedToken
	}
	alg := []byte(nil)
	for _, m := range members {
		if string(m.key) == "alg" {
			alg, _ = jsonString(m.value)
		}
	}
	if string(alg) != jwt.SigningMethodHS256.Alg() {
		return Token{}, ReasonBadAlgorithm
	}

	sig, err := b64.DecodeString(raw[dot2+1:])
	if err != nil {
		return Token{}, ReasonMalformedToken
	}
	if !v.signatureValid(raw[:dot2], sig) {
		return Token{}, ReasonBadSignature
	}

	payload, err := b64.DecodeString(raw[dot1+1 : dot2])
	if err != nil {
		return Token{}, ReasonMalformedToken
	}
	var c claims
	reason := c.read(payload)
	// The signature verified: what the claims say is the sender's word, and
	// names the event in the log even when a check below refuses it.
	tok := Token{
		EventID:   c.eid,
		EventName: c.evn,
		Endpoint:  c.cep,
		IssuedAt:  c.iat.Time,
		NotBefore: c.nbf.Time,
		ExpiresAt: c.exp.Time,
	}
	if reason != reasonNone {
		return tok, reason
	}
	if err := v.validator.Validate(&c); err != nil {
		switch {
		case errors.Is(err, jwt.ErrTokenExpired):
			return tok, ReasonExpired
		case errors.Is(err, jwt.ErrTokenNotValidYet):
			return tok, ReasonNotYetValid
		// The validator calls an empty aud or iss missing.
		case errors.Is(err, jwt.ErrTokenInvalidAudience),
			errors.Is(err, jwt.ErrTokenRequiredClaimMissing) && c.iss != "":
			return tok, ReasonBadAudience
		case errors.Is(err, jwt.ErrTokenInvalidIssuer),
			errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
			return tok, ReasonBadIssuer
		default:
			return tok, ReasonMalformedClaim
		}
	}
	if sub, err := uuid.Parse(c.sub); err != nil || sub != v.subject {
		return tok, ReasonBadSubject
	}
	return tok, reasonNone
}

// signatureValid reports whether one of the secrets signs signingInput with
// HMAC-SHA256 into sig. golang-jwt compares in constant time.
func (v *verifier) signatureValid(signingInput string, sig []byte) bool {
	for _, key := range v.keys {
		if jwt.SigningMethodHS256.Verify(signingInput, sig, key) == nil {
			return true
		}
	}
	return false
}

// claims are the JWT claims the module reads. It implements jwt.Claims so
// that golang-jwt's Validator checks exp, nbf, aud and iss.
type claims struct {
	iat, nbf, exp jwt.NumericDate
	aud           jwt.ClaimStrings
	iss, sub      string
	eid, evn, cep string
}

// read fills c from the claims JSON, checking presence and types.
func (c *claims) read(payload []byte) Reason {
	var buf [12]member
	members, status := readObject(payload, buf[:0])
	if status != jsonOK {
		return ReasonMalformedToken
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
			c.aud, ok = audience(m.value)
		case "iss":
			has |= hasIss
			c.iss, ok = stringClaim(m.value)
		case "sub":
			has |= hasSub
			c.sub, ok = stringClaim(m.value)
		case "eid":
			has |= hasEID
			c.eid, ok = stringClaim(m.value)
		case "evn":
			c.evn, ok = stringClaim(m.value)
		case "cep":
			c.cep, ok = stringClaim(m.value)
		default:
			ok = true
		}
		if !ok {
			return ReasonMalformedClaim
		}
	}
	if has != required {
		return ReasonMissingClaim
	}
	return reasonNone
}

func (c *claims) GetExpirationTime() (*jwt.NumericDate, error) { return &c.exp, nil }
func (c *claims) GetNotBefore() (*jwt.NumericDate, error)      { return &c.nbf, nil }
func (c *claims) GetIssuedAt() (*jwt.NumericDate, error)       { return &c.iat, nil }
func (c *claims) GetIssuer() (string, error)                   { return c.iss, nil }
func (c *claims) GetSubject() (string, error)                  { return c.sub, nil }
func (c *claims) GetAudience() (jwt.ClaimStrings, error)       { return c.aud, nil }

// numericDate reads a NumericDate claim: a JSON number of seconds, its
// fraction dropped as PyJWT and golang-jwt drop it.
func numericDate(value []byte) (jwt.NumericDate, bool) {
	secs, ok := unixSeconds(value)
	if !ok {
		return jwt.NumericDate{}, false
	}
	return jwt.NumericDate{Time: time.Unix(int64(secs), 0)}, true
}

// unixSeconds reads a raw JSON number of seconds since 1970 up to the end of
// year 9999.
func unixSeconds(value []byte) (float64, bool) {
	if len(value) == 0 || (value[0] != '-' && (value[0] < '0' || value[0] > '9')) {
		return 0, false
	}
	f, err := strconv.ParseFloat(string(value), 64)
	if err != nil || math.IsNaN(f) || f < 0 || f > maxUnixSeconds {
		return 0, false
	}
	return f, true
}

func stringClaim(value []byte) (string, bool) {
	s, ok := jsonString(value)
	return string(s), ok
}

// audience reads aud: a string, or an array of strings.
func audience(value []byte) (jwt.ClaimStrings, bool) {
	if s, ok := stringClaim(value); ok {
		return jwt.ClaimStrings{s}, true
	}
	if len(value) == 0 || value[0] != '[' {
		return nil, false
	}
	// The array is already known to be well-formed JSON.
	var aud jwt.ClaimStrings
	i := skipBlanks(value, 1)
	if i < len(value) && value[i] == ']' {
		return aud, true
	}
	for {
		end, ok := scanValue(value, i)
		if !ok {
			return nil, false
		}
		s, ok := stringClaim(value[i:end])
		if !ok {
			return nil, false
		}
		aud = append(aud, s)
		i = skipBlanks(value, end)
		if i < len(value) && value[i] == ']' {
			return aud, true
		}
		if i >= len(value) || value[i] != ',' {
			return nil, false
		}
		i = skipBlanks(value, i+1)
	}
}

// CheckContentType runs check 5: no Content-Type, or a JSON one
// (application/json or application/*+json, parameters allowed).
func CheckContentType(contentType string) Reason {
	if contentType == "" {
		return reasonNone
	}
	mediaType, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		return ReasonUnsupportedMediaType
	}
	if mediaType == "application/json" ||
		(strings.HasPrefix(mediaType, "application/") && strings.HasSuffix(mediaType, "+json") && len(mediaType) > len("application/+json")) {
		return reasonNone
	}
	return ReasonUnsupportedMediaType
}

// VerifyBody runs checks 7 to 10 on a body already bounded by max_body,
// against the token that came with it.
func (v *verifier) VerifyBody(tok Token, body []byte) (Event, Reason) {
	var buf [8]member
	members, status := readObject(body, buf[:0])
	switch status {
	case jsonMalformed:
		return Event{}, ReasonMalformedBody
	case jsonDuplicateKey:
		return Event{}, ReasonDuplicateKey
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
		}
	}
	if id == nil || name == nil || timestamp == nil || payload == nil {
		return Event{}, ReasonMissingField
	}
	var ev Event
	s, ok := jsonString(id)
	if !ok {
		return Event{}, ReasonInvalidEventID
	}
	ev.ID, ok = parseUUID(s)
	if !ok {
		return Event{}, ReasonInvalidEventID
	}
	s, ok = jsonString(name)
	index := -1
	if ok {
		index = eventIndex(s)
	}
	if index < 0 {
		return Event{}, ReasonInvalidEventName
	}
	ev.Name, ev.nameIndex = EventNames[index], index
	ev.Timestamp, ok = parseTimestamp(timestamp)
	if !ok {
		return Event{}, ReasonInvalidTimestamp
	}
	if payload[0] != '{' {
		return Event{}, ReasonInvalidPayload
	}

	if eid, ok := eidUUID(tok.EventID); !ok || eid != ev.ID {
		return Event{}, ReasonEIDMismatch
	}
	if tok.EventName != "" && tok.EventName != ev.Name {
		return Event{}, ReasonEVNMismatch
	}
	if v.endpoint != "" && tok.Endpoint != "" && tok.Endpoint != v.endpoint {
		return Event{}, ReasonEndpointMismatch
	}
	if v.events&(1<<index) == 0 {
		return Event{}, ReasonEventNotAllowed
	}
	ev.Token = tok
	return ev, reasonNone
}

// parseUUID accepts the textual forms of a UUID: hyphenated, urn:uuid:,
// braces, or 32 hex digits, in any case.
func parseUUID(s []byte) (uuid.UUID, bool) {
	id, err := uuid.ParseBytes(s)
	return id, err == nil
}

// eidUUID reads the eid claim: urn:uuid: (any case) and a hyphenated UUID.
func eidUUID(eid string) (uuid.UUID, bool) {
	if len(eid) != len("urn:uuid:")+36 {
		return uuid.UUID{}, false
	}
	id, err := uuid.Parse(eid)
	return id, err == nil
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
