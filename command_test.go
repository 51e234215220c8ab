package trivialsecwebhook

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
)

func testMintOptions(style string) mintOptions {
	return mintOptions{
		secret:    []byte(testSecret),
		account:   testAccount,
		event:     "new_findings_domains",
		eventID:   uuid.MustParse(testEventID),
		payload:   []byte(`{"domain":"caf` + "\u00e9" + `.example","ids":[1,2]}`),
		style:     style,
		issuer:    defaultIssuer,
		subject:   uuid.MustParse(defaultSubject),
		endpoint:  "https://hooks.example.com/webhook/trivialsec",
		lifetime:  24 * time.Hour,
		now:       testNow,
		timestamp: testNow,
	}
}

// TestMintMatchesSender: what the command mints is what each sender sends
// (README: Features), and the module accepts it.
func TestMintMatchesSender(t *testing.T) {
	for _, style := range []string{"production", "documented"} {
		t.Run(style, func(t *testing.T) {
			m, err := mint(testMintOptions(style))
			if err != nil {
				t.Fatal(err)
			}
			wantBody := `{"event_id": "` + testEventID + `", "event_name": "new_findings_domains", ` +
				`"timestamp": "2026-11-28T18:33:38.032435+00:00", "payload": {"domain": "caf\u00e9.example", "ids": [1, 2]}}`
			if string(m.body) != wantBody {
				t.Errorf("body %s\nwant %s", m.body, wantBody)
			}
			token := strings.TrimPrefix(m.authorization, "Bearer ")
			if (token != m.authorization) != (style == "documented") {
				t.Errorf("Authorization %q", m.authorization[:20])
			}
			parts := strings.Split(token, ".")
			claims, _ := rawURL.DecodeString(parts[1])
			iat := testNow.Unix()
			want := map[string]string{
				"production": `{"iat":` + i64(iat) + `,"nbf":` + i64(iat+3) + `,"exp":` + i64(iat+86400) +
					`,"aud":["urn:trivialsec:webhook:client_endpoint:acme"],"iss":"https://www.trivialsec.com",` +
					`"sub":"bc6e2cd51f59487fb05b49946bd078b2","eid":"urn:uuid:` + testEventID + `","evn":"new_findings_domains",` +
					`"cep":"https://hooks.example.com/webhook/trivialsec"}`,
				"documented": `{"iat":` + i64(iat) + `,"nbf":` + i64(iat) + `,"exp":` + i64(iat+86400) +
					`,"aud":"urn:trivialsec:webhook:client_endpoint:acme","iss":"https://www.trivialsec.com",` +
					`"sub":"urn:uuid:bc6e2cd5-1f59-487f-b05b-49946bd078b2","eid":"urn:uuid:` + testEventID + `"}`,
			}[style]
			if string(claims) != want {
				t.Errorf("claims %s\nwant   %s", claims, want)
			}
			reason, repl := deliverTo(t, testVerifier(t, nil), 0, m.authorization, "", string(m.body))
			if name, _ := repl.GetString("http.trivialsec_webhook.event_name"); reason != reasonNone || name != "new_findings_domains" {
				t.Errorf("the module says %q", reason)
			}
		})
	}
}

func i64(n int64) string { b, _ := json.Marshal(n); return string(b) }

func TestWritePythonJSON(t *testing.T) {
	for in, want := range map[string]string{
		`{}`:                                 `{}`,
		`{"a":1,"b":[1,2,{"c":null}]}`:       `{"a": 1, "b": [1, 2, {"c": null}]}`,
		` { "z" : 1 , "a" : 2 } `:            `{"z": 1, "a": 2}`,
		`{"s":"é😀\u0041\/\n` + "\x7f" + `"}`: `{"s": "\u00e9\ud83d\ude00A/\n\u007f"}`,
		`{"s":"\ud800 \"q\" \\"}`:            `{"s": "\ud800 \"q\" \\"}`,
		`{"n":1e400,"m":-0.0}`:               `{"n": 1e400, "m": -0.0}`,
	} {
		var b bytes.Buffer
		if err := writePythonJSON(&b, []byte(in)); err != nil {
			t.Fatal(err)
		}
		if b.String() != want {
			t.Errorf("%s: %s, want %s", in, b.String(), want)
		}
	}
}

func TestPythonISOFormat(t *testing.T) {
	for in, want := range map[time.Time]string{
		testNow: "2026-11-28T18:33:38.032435+00:00",
		time.Date(2026, 11, 28, 18, 33, 38, 0, time.UTC):                    "2026-11-28T18:33:38+00:00",
		time.Date(2026, 11, 28, 18, 33, 38, 999, time.UTC):                  "2026-11-28T18:33:38+00:00",
		time.Date(2026, 11, 28, 19, 33, 38, 5000, time.FixedZone("", 3600)): "2026-11-28T18:33:38.000005+00:00",
	} {
		if got := pythonISOFormat(in); got != want {
			t.Errorf("%v: %s, want %s", in, got, want)
		}
	}
}
