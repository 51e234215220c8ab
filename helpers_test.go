package trivialsecwebhook

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
)

// Test fixtures: deliveries minted exactly as each sender mints them.

const (
	testAccount = "acme"
	testSecret  = "s3cr3t-signing-key-for-tests-only"
	testEventID = "0b7e3f51-9a2c-4d7e-8f10-2a3b4c5d6e7f"
	testPayload = `{"report_id": "r-1", "name": "caf\u00e9"}`
)

// testNow is the clock of the tests: the instant the sender signs.
var testNow = time.Date(2026, 11, 28, 18, 33, 38, 32435000, time.UTC)

// delivery is one webhook delivery under construction.
type delivery struct {
	header  map[string]any
	claims  map[string]any
	key     string
	bearer  bool
	eventID string
	name    string
	stamp   string
	payload string
}

// productionDelivery is what Trivial Security's API sends: a bare token,
// sub as 32 hex digits, aud an array, nbf = now + 3 s, evn and cep claims.
func productionDelivery() *delivery {
	now := testNow.Unix()
	return &delivery{
		header: map[string]any{"alg": "HS256", "typ": "JWT"},
		claims: map[string]any{
			"iat": now,
			"nbf": now + 3,
			"exp": now + 24*3600,
			"aud": []string{"urn:trivialsec:webhook:client_endpoint:" + testAccount},
			"iss": "https://www.trivialsec.com",
			"sub": "bc6e2cd51f59487fb05b49946bd078b2",
			"eid": "urn:uuid:" + testEventID,
			"evn": "report_created",
			"cep": "https://hooks.example.com/webhook/trivialsec",
		},
		key:     testSecret,
		eventID: testEventID,
		name:    "report_created",
		stamp:   "2026-11-28T18:33:38.032435+00:00",
		payload: testPayload,
	}
}

// documentedDelivery is what the published receiver example expects:
// Bearer, sub as urn:uuid:..., aud a string, no evn or cep.
func documentedDelivery() *delivery {
	d := productionDelivery()
	d.bearer = true
	d.claims["nbf"] = testNow.Unix()
	d.claims["aud"] = "urn:trivialsec:webhook:client_endpoint:" + testAccount
	d.claims["sub"] = "urn:uuid:bc6e2cd5-1f59-487f-b05b-49946bd078b2"
	delete(d.claims, "evn")
	delete(d.claims, "cep")
	return d
}

var styles = []struct {
	name string
	make func() *delivery
}{
	{"production", productionDelivery},
	{"documented", documentedDelivery},
}

func (d *delivery) token() string {
	return signToken(mustJSON(d.header), mustJSON(d.claims), d.key)
}

func (d *delivery) authorization() string {
	if d.bearer {
		return "Bearer " + d.token()
	}
	return d.token()
}

// body is the body as Python's json.dumps writes it.
func (d *delivery) body() string {
	return fmt.Sprintf(`{"event_id": "%s", "event_name": "%s", "timestamp": "%s", "payload": %s}`,
		d.eventID, d.name, d.stamp, d.payload)
}

// withEventID sets event_id and the eid claim together.
func (d *delivery) withEventID(id string) *delivery {
	d.eventID = id
	d.claims["eid"] = "urn:uuid:" + id
	return d
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(b)
}

var rawURL = base64.RawURLEncoding

// signToken signs a header and claims, given as raw JSON, with HS256,
// whatever the header says.
func signToken(header, claims, key string) string {
	return signParts(rawURL.EncodeToString([]byte(header)), rawURL.EncodeToString([]byte(claims)), key)
}

// signParts signs two encoded token parts as they are.
func signParts(header, claims, key string) string {
	input := header + "." + claims
	mac := hmac.New(sha256.New, []byte(key))
	mac.Write([]byte(input))
	return input + "." + rawURL.EncodeToString(mac.Sum(nil))
}

func testVerifier(t testing.TB, change func(*verifierConfig)) *verifier {
	t.Helper()
	c := verifierConfig{
		keys:    [][]byte{[]byte(testSecret)},
		account: testAccount,
		issuer:  defaultIssuer,
		subject: uuid.MustParse(defaultSubject),
		leeway:  defaultLeeway,
		events:  allEvents,
		body:    defaultJSONLimits,
		now:     func() time.Time { return testNow },
	}
	if change != nil {
		change(&c)
	}
	return newVerifier(c)
}

// swapPart replaces part i (0 header, 1 claims, 2 signature) of a token.
func swapPart(token string, i int, part string) string {
	parts := strings.Split(token, ".")
	parts[i] = part
	return strings.Join(parts, ".")
}

func uuidString() string { return uuid.NewString() }
