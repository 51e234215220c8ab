package trivialsecwebhook

import (
	"crypto/hmac"
	"crypto/sha512"
	"encoding/base64"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/golang-jwt/jwt/v5"
	"github.com/google/uuid"
	"go.uber.org/zap"
)

// verifyCase is one row of the check table, run in both sender styles.
type verifyCase struct {
	name        string
	edit        func(d *delivery)                        // change the delivery before it is built
	config      func(c *verifierConfig)                  // change the verifier
	auth        func(d *delivery) string                 // replace the Authorization value
	body        func(d *delivery) string                 // replace the body
	contentType string                                   // Content-Type sent; none by default
	maxBody     int64                                    // max_body; the default when 0
	want        reasonCode                               // reasonNone: accepted
	check       func(t *testing.T, repl *caddy.Replacer) // more about an accepted event
}

func TestVerify(t *testing.T) {
	now := testNow.Unix()
	leeway := int64(defaultLeeway / time.Second)
	cases := []verifyCase{
		{name: "accepted"},

		// Check 2: a token is present.
		{name: "no_authorization", auth: func(*delivery) string { return "" }, want: reasonMissingToken},
		{name: "blank_authorization", auth: func(*delivery) string { return " \t " }, want: reasonMissingToken},
		{name: "bearer_without_token", auth: func(*delivery) string { return "Bearer " }, want: reasonMissingToken},
		{name: "bearer_lowercase", auth: func(d *delivery) string { return "bearer " + d.token() }},
		{name: "bearer_uppercase_extra_blanks", auth: func(d *delivery) string { return "  BEARER   " + d.token() + " \t" }},
		{name: "bare_token_with_blanks", auth: func(d *delivery) string { return "\t " + d.token() + "  " }},
		{name: "basic_scheme", auth: func(*delivery) string { return "Basic dXNlcjpwYXNz" }, want: reasonMalformedToken},

		// Check 3: the JWT's shape.
		{name: "two_parts", auth: func(d *delivery) string { return d.token()[:strings.LastIndexByte(d.token(), '.')] }, want: reasonMalformedToken},
		{name: "four_parts", auth: func(d *delivery) string { return d.token() + ".e30" }, want: reasonMalformedToken},
		{name: "base64_padding_in_claims", auth: func(d *delivery) string {
			raw := mustJSON(d.claims)
			for len(raw)%3 == 0 { // a length that base64 pads
				raw += " "
			}
			claims := base64.URLEncoding.EncodeToString([]byte(raw))
			return signParts(rawURL.EncodeToString([]byte(mustJSON(d.header))), claims, d.key)
		}, want: reasonMalformedToken},
		{name: "base64_padding_in_signature", auth: func(d *delivery) string { return d.token() + "=" }, want: reasonMalformedToken},
		{name: "base64_nonzero_trailing_bits", auth: func(d *delivery) string {
			// 32 bytes take 43 characters; the last one has 2 bits to spare.
			tok := d.token()
			last := strings.IndexByte(base64url, tok[len(tok)-1])
			return tok[:len(tok)-1] + string(base64url[last^1])
		}, want: reasonMalformedToken},
		{name: "base64_standard_alphabet_in_claims", auth: func(d *delivery) string {
			claims := base64.RawStdEncoding.EncodeToString([]byte(mustJSON(d.claims) + strings.Repeat(" ", 3)))
			for !strings.ContainsAny(claims, "+/") {
				d.claims["x"] = d.claims["x"].(string) + "?"
				claims = base64.RawStdEncoding.EncodeToString([]byte(mustJSON(d.claims)))
			}
			return signParts(rawURL.EncodeToString([]byte(mustJSON(d.header))), claims, d.key)
		}, edit: func(d *delivery) { d.claims["x"] = "\xff?>" }, want: reasonMalformedToken},
		{name: "base64_standard_alphabet", auth: func(d *delivery) string { return swapPart(d.token(), 2, "ab+/"+strings.Repeat("A", 39)) }, want: reasonMalformedToken},
		{name: "space_inside_token", auth: func(d *delivery) string { tok := d.token(); return tok[:10] + " " + tok[10:] }, want: reasonMalformedToken},
		{name: "token_too_long", edit: func(d *delivery) { d.claims["pad"] = strings.Repeat("x", maxTokenLength) }, want: reasonMalformedToken},
		{name: "header_not_json", auth: func(d *delivery) string { return swapPart(d.token(), 0, rawURL.EncodeToString([]byte("alg=HS256"))) }, want: reasonMalformedToken},
		{name: "signature_too_short", auth: func(d *delivery) string { return swapPart(d.token(), 2, rawURL.EncodeToString(make([]byte, 31))) }, want: reasonBadSignature},
		{name: "signature_empty", auth: func(d *delivery) string { tok := d.token(); return tok[:strings.LastIndexByte(tok, '.')+1] }, want: reasonBadSignature},

		// Check 3: the algorithm is pinned.
		{name: "alg_none_unsigned", auth: func(d *delivery) string {
			return rawURL.EncodeToString([]byte(`{"alg":"none","typ":"JWT"}`)) + "." + rawURL.EncodeToString([]byte(mustJSON(d.claims))) + "."
		}, want: reasonBadAlgorithm},
		{name: "alg_none_with_hmac", edit: func(d *delivery) { d.header["alg"] = "none" }, want: reasonBadAlgorithm},
		{name: "alg_hs384", auth: func(d *delivery) string { return signOther(d, "HS384") }, want: reasonBadAlgorithm},
		{name: "alg_hs512", auth: func(d *delivery) string { return signOther(d, "HS512") }, want: reasonBadAlgorithm},
		{name: "alg_rs256_header_over_hmac", edit: func(d *delivery) { d.header["alg"] = "RS256" }, want: reasonBadAlgorithm},
		{name: "alg_lowercase", edit: func(d *delivery) { d.header["alg"] = "hs256" }, want: reasonBadAlgorithm},
		{name: "alg_missing", edit: func(d *delivery) { delete(d.header, "alg") }, want: reasonBadAlgorithm},
		{name: "alg_not_string", edit: func(d *delivery) { d.header["alg"] = 256 }, want: reasonBadAlgorithm},
		{name: "crit", edit: func(d *delivery) { d.header["crit"] = []string{"exp"} }, want: reasonCriticalHeader},
		{name: "crit_b64_false", edit: func(d *delivery) { d.header["b64"], d.header["crit"] = false, []string{"b64"} }, want: reasonCriticalHeader},
		{name: "crit_empty", edit: func(d *delivery) { d.header["crit"] = []string{} }, want: reasonCriticalHeader},
		{name: "crit_with_wrong_alg", edit: func(d *delivery) { d.header["alg"], d.header["crit"] = "none", []string{"exp"} }, want: reasonBadAlgorithm},
		{name: "alg_duplicate_key", auth: func(d *delivery) string {
			return signToken(`{"alg":"HS256","alg":"none"}`, mustJSON(d.claims), d.key)
		}, want: reasonMalformedToken},

		// Check 3: the signature.
		{name: "wrong_secret", edit: func(d *delivery) { d.key = "another-secret" }, want: reasonBadSignature},
		{name: "second_secret_of_rotation", edit: func(d *delivery) { d.key = "the-new-secret" },
			config: func(c *verifierConfig) { c.keys = append(c.keys, []byte("the-new-secret")) }},
		{name: "claims_swapped_under_old_signature", auth: func(d *delivery) string {
			tok := d.token()
			d.claims["eid"] = "urn:uuid:" + uuid.NewString()
			return swapPart(tok, 1, rawURL.EncodeToString([]byte(mustJSON(d.claims))))
		}, want: reasonBadSignature},
		{name: "header_swapped_under_old_signature", auth: func(d *delivery) string {
			return swapPart(d.token(), 0, rawURL.EncodeToString([]byte(`{"typ":"JWT","alg":"HS256"}`)))
		}, want: reasonBadSignature},

		// Check 3: required claims present.
		{name: "missing_iat", edit: func(d *delivery) { delete(d.claims, "iat") }, want: reasonMissingClaim},
		{name: "missing_nbf", edit: func(d *delivery) { delete(d.claims, "nbf") }, want: reasonMissingClaim},
		{name: "missing_exp", edit: func(d *delivery) { delete(d.claims, "exp") }, want: reasonMissingClaim},
		{name: "missing_aud", edit: func(d *delivery) { delete(d.claims, "aud") }, want: reasonMissingClaim},
		{name: "missing_iss", edit: func(d *delivery) { delete(d.claims, "iss") }, want: reasonMissingClaim},
		{name: "missing_sub", edit: func(d *delivery) { delete(d.claims, "sub") }, want: reasonMissingClaim},
		{name: "missing_eid", edit: func(d *delivery) { delete(d.claims, "eid") }, want: reasonMissingClaim},

		// Check 3: claim types.
		{name: "iat_string", edit: func(d *delivery) { d.claims["iat"] = "1764354818" }, want: reasonMalformedClaim},
		{name: "nbf_bool", edit: func(d *delivery) { d.claims["nbf"] = true }, want: reasonMalformedClaim},
		{name: "exp_null", edit: func(d *delivery) { d.claims["exp"] = nil }, want: reasonMalformedClaim},
		{name: "exp_huge", edit: func(d *delivery) { d.claims["exp"] = 1e300 }, want: reasonMalformedClaim},
		{name: "exp_fraction", edit: func(d *delivery) { d.claims["exp"] = float64(now) + 3600.75 }},
		{name: "aud_number", edit: func(d *delivery) { d.claims["aud"] = 7 }, want: reasonMalformedClaim},
		{name: "aud_array_of_number", edit: func(d *delivery) { d.claims["aud"] = []any{1} }, want: reasonMalformedClaim},
		{name: "iss_number", edit: func(d *delivery) { d.claims["iss"] = 1 }, want: reasonMalformedClaim},
		{name: "sub_array", edit: func(d *delivery) { d.claims["sub"] = []string{defaultSubject} }, want: reasonMalformedClaim},
		{name: "eid_number", edit: func(d *delivery) { d.claims["eid"] = 5 }, want: reasonMalformedClaim},
		{name: "evn_number", edit: func(d *delivery) { d.claims["evn"] = 5 }, want: reasonMalformedClaim},
		{name: "cep_null", edit: func(d *delivery) { d.claims["cep"] = nil }, want: reasonMalformedClaim},
		{name: "claims_duplicate_key", auth: func(d *delivery) string {
			c := mustJSON(d.claims)
			return signToken(mustJSON(d.header), c[:len(c)-1]+`,"iss":"https://evil.example"}`, d.key)
		}, want: reasonMalformedClaim},
		{name: "claims_not_object", auth: func(d *delivery) string { return signToken(mustJSON(d.header), `[1]`, d.key) }, want: reasonMalformedClaim},
		{name: "claims_not_object_unsigned", auth: func(d *delivery) string { return signToken(mustJSON(d.header), `[1]`, "guess") }, want: reasonBadSignature},

		// Check 3: exp and nbf within the leeway.
		{name: "exp_inside_leeway", edit: func(d *delivery) { d.claims["exp"] = now - leeway + 1 }},
		{name: "exp_at_leeway_edge", edit: func(d *delivery) { d.claims["exp"] = now - leeway }, want: reasonExpired},
		{name: "exp_long_past", edit: func(d *delivery) { d.claims["exp"] = now - 86400 }, want: reasonExpired},
		{name: "nbf_at_leeway_edge", edit: func(d *delivery) { d.claims["nbf"] = now + leeway }},
		{name: "nbf_before_iat", edit: func(d *delivery) { d.claims["nbf"] = now - 10 }},
		// The sender's 3 s head start of nbf over iat is not skew: a sender
		// clock up to the leeway ahead passes, whatever the leeway.
		{name: "sender_clock_ahead_by_leeway", edit: func(d *delivery) { d.claims["iat"], d.claims["nbf"] = now+leeway, now+leeway+3 }},
		{name: "sender_clock_ahead_beyond_leeway", edit: func(d *delivery) { d.claims["iat"], d.claims["nbf"] = now+leeway+1, now+leeway+4 },
			want: reasonNotYetValid},
		{name: "zero_leeway_production_nbf_ahead", edit: func(d *delivery) { d.claims["nbf"] = now + 3 },
			config: func(c *verifierConfig) { c.leeway = 0 }},
		{name: "zero_leeway_sender_clock_ahead", edit: func(d *delivery) { d.claims["iat"], d.claims["nbf"] = now+1, now+4 },
			config: func(c *verifierConfig) { c.leeway = 0 }, want: reasonNotYetValid},
		// A head start beyond the sender's 3 s counts as nbf, less 3 s.
		{name: "nbf_far_ahead_of_iat_edge", edit: func(d *delivery) { d.claims["nbf"] = now + leeway + 3 }},
		{name: "nbf_far_ahead_of_iat", edit: func(d *delivery) { d.claims["nbf"] = now + leeway + 4 }, want: reasonNotYetValid},
		{name: "iat_in_future_is_not_checked", edit: func(d *delivery) { d.claims["iat"] = now + 60 }},

		// Check 3: aud, iss, sub.
		{name: "aud_other_account", edit: func(d *delivery) { d.claims["aud"] = "urn:trivialsec:webhook:client_endpoint:other" }, want: reasonBadAudience},
		{name: "aud_prefix_only", edit: func(d *delivery) { d.claims["aud"] = "urn:trivialsec:webhook:client_endpoint:acm" }, want: reasonBadAudience},
		{name: "aud_array_with_ours_second", edit: func(d *delivery) {
			d.claims["aud"] = []string{"urn:trivialsec:webhook:client_endpoint:other", "urn:trivialsec:webhook:client_endpoint:acme"}
		}},
		{name: "aud_empty_array", edit: func(d *delivery) { d.claims["aud"] = []string{} }, want: reasonBadAudience},
		{name: "iss_dev_stage", edit: func(d *delivery) { d.claims["iss"] = "https://dev.trivialsec.com" }, want: reasonBadIssuer},
		{name: "iss_dev_stage_configured", edit: func(d *delivery) { d.claims["iss"] = "https://dev.trivialsec.com" },
			config: func(c *verifierConfig) { c.issuer = "https://dev.trivialsec.com" }},
		{name: "iss_trailing_slash", edit: func(d *delivery) { d.claims["iss"] = "https://www.trivialsec.com/" }, want: reasonBadIssuer},
		{name: "iss_empty", edit: func(d *delivery) { d.claims["iss"] = "" }, want: reasonBadIssuer},
		{name: "sub_hyphenated", edit: func(d *delivery) { d.claims["sub"] = "bc6e2cd5-1f59-487f-b05b-49946bd078b2" }},
		{name: "sub_braces_uppercase", edit: func(d *delivery) { d.claims["sub"] = "{BC6E2CD5-1F59-487F-B05B-49946BD078B2}" }},
		{name: "sub_urn_uppercase", edit: func(d *delivery) { d.claims["sub"] = "URN:UUID:BC6E2CD5-1F59-487F-B05B-49946BD078B2" }},
		{name: "sub_other_uuid", edit: func(d *delivery) { d.claims["sub"] = uuid.NewString() }, want: reasonBadSubject},
		{name: "sub_not_uuid", edit: func(d *delivery) { d.claims["sub"] = "trivialsec" }, want: reasonBadSubject},

		// Check 5: Content-Type.
		{name: "content_type_json", contentType: "application/json"},
		{name: "content_type_json_charset", contentType: "application/json; charset=utf-8"},
		{name: "content_type_plus_json", contentType: "application/cloudevents+json"},
		{name: "content_type_uppercase", contentType: "Application/JSON"},
		{name: "content_type_text", contentType: "text/plain", want: reasonUnsupportedMediaType},
		{name: "content_type_form", contentType: "application/x-www-form-urlencoded", want: reasonUnsupportedMediaType},
		{name: "content_type_bare_plus_json", contentType: "application/+json", want: reasonUnsupportedMediaType},
		{name: "content_type_garbage", contentType: "json;;;", want: reasonUnsupportedMediaType},
		{name: "content_type_after_bad_token", contentType: "text/plain", edit: func(d *delivery) { d.key = "x" }, want: reasonBadSignature},

		// Check 6: max_body.
		{name: "body_at_max_body", maxBody: int64(len(productionDelivery().body()))},
		{name: "body_one_byte_over_max_body", maxBody: int64(len(productionDelivery().body())) - 1, want: reasonBodyTooLarge},

		// Check 7: one well-formed JSON object.
		{name: "body_empty", body: func(*delivery) string { return "" }, want: reasonMalformedBody},
		{name: "body_not_json", body: func(*delivery) string { return "event_id=1" }, want: reasonMalformedBody},
		{name: "body_array", body: func(d *delivery) string { return "[" + d.body() + "]" }, want: reasonMalformedBody},
		{name: "body_bom", body: func(d *delivery) string { return "\ufeff" + d.body() }, want: reasonMalformedBody},
		{name: "body_trailing_object", body: func(d *delivery) string { return d.body() + "{}" }, want: reasonMalformedBody},
		{name: "body_trailing_blanks", body: func(d *delivery) string { return " \n" + d.body() + "\r\n\t " }},
		{name: "body_comment", body: func(d *delivery) string { return "/* hi */" + d.body() }, want: reasonMalformedBody},
		{name: "body_nan", edit: func(d *delivery) { d.payload = `{"score": NaN}` }, want: reasonMalformedBody},
		{name: "body_infinity", edit: func(d *delivery) { d.payload = `{"score": -Infinity}` }, want: reasonMalformedBody},
		{name: "body_invalid_utf8", edit: func(d *delivery) { d.payload = "{\"name\": \"caf\xe9\"}" }, want: reasonMalformedBody},
		{name: "body_raw_control_char", edit: func(d *delivery) { d.payload = "{\"name\": \"a\tb\"}" }, want: reasonMalformedBody},
		{name: "body_bad_escape", edit: func(d *delivery) { d.payload = `{"name": "\x41"}` }, want: reasonMalformedBody},
		{name: "body_single_quotes", edit: func(d *delivery) { d.payload = `{'name': 1}` }, want: reasonMalformedBody},
		{name: "body_trailing_comma", edit: func(d *delivery) { d.payload = `{"a": 1,}` }, want: reasonMalformedBody},
		{name: "body_leading_zero", edit: func(d *delivery) { d.payload = `{"a": 01}` }, want: reasonMalformedBody},
		{name: "body_duplicate_top_level_key", body: func(d *delivery) string {
			return strings.Replace(d.body(), `{"event_id"`, `{"event_name": "report_deleted", "event_id"`, 1)
		}, want: reasonDuplicateKey},
		{name: "body_duplicate_escaped_key", body: func(d *delivery) string {
			return strings.Replace(d.body(), `{"event_id"`, `{"\u0065vent_id": "`+uuid.NewString()+`", "event_id"`, 1)
		}, want: reasonDuplicateKey},
		{name: "body_deep_nesting", edit: func(d *delivery) {
			d.payload = `{"a": ` + strings.Repeat("[", maxJSONDepth+1) + strings.Repeat("]", maxJSONDepth+1) + `}`
		}, want: reasonTooDeep},
		// Depth counts the body's own object: the payload's "a" is at 3.
		{name: "body_at_max_depth", edit: func(d *delivery) { d.payload = `{"a": ` + nested(62) + `}` }},
		{name: "body_one_past_max_depth", edit: func(d *delivery) { d.payload = `{"a": ` + nested(63) + `}` }, want: reasonTooDeep},
		{name: "body_at_max_depth_10000", edit: func(d *delivery) { d.payload = `{"a": ` + nested(maxJSONDepth-2) + `}` },
			config: func(c *verifierConfig) { c.body.depth = maxJSONDepth }},
		{name: "body_10001_deep", edit: func(d *delivery) { d.payload = `{"a": ` + nested(maxJSONDepth-1) + `}` },
			config: func(c *verifierConfig) { c.body.depth = maxJSONDepth }, want: reasonTooDeep},
		{name: "number_of_100_chars", edit: func(d *delivery) { d.payload = `{"n": -` + strings.Repeat("9", 99) + `}` }},
		{name: "integer_of_4301_digits", edit: func(d *delivery) { d.payload = `{"n": [` + strings.Repeat("1", 4301) + `]}` }, want: reasonNumberTooLong},
		{name: "number_too_long_at_top_level", body: func(d *delivery) string {
			return strings.Replace(d.body(), `{`, `{"n": 1.`+strings.Repeat("0", 99)+`, `, 1)
		}, want: reasonNumberTooLong},
		// Keys that fold onto a field name: a case-insensitive binder
		// downstream reads them as the field.
		{name: "folded_key_event_id", body: func(d *delivery) string {
			return d.body()[:len(d.body())-1] + `, "EVENT_ID": "` + uuid.NewString() + `"}`
		}, want: reasonFoldedKey},
		{name: "folded_key_event_name", body: func(d *delivery) string {
			return d.body()[:len(d.body())-1] + `, "Event_Name": "hosted_scanner"}`
		}, want: reasonFoldedKey},
		{name: "folded_key_payload", body: func(d *delivery) string { return strings.Replace(d.body(), `{`, `{"Payload": {}, `, 1) }, want: reasonFoldedKey},
		{name: "folded_key_long_s_escaped", body: func(d *delivery) string {
			return strings.Replace(d.body(), `{`, `{"time\u017ftamp": 1, `, 1)
		}, want: reasonFoldedKey},
		{name: "folded_key_long_s_utf8", body: func(d *delivery) string { return strings.Replace(d.body(), `{`, `{"timeſtamp": 1, `, 1) }, want: reasonFoldedKey},
		{name: "near_keys_pass", body: func(d *delivery) string {
			return strings.Replace(d.body(), `{`, `{"event-id": 1, "eventid": 2, "payloads": 3, "timestamp_": 4, "event_idſ": 5, `, 1)
		}},
		{name: "payload_nested_duplicate_keys_pass", edit: func(d *delivery) { d.payload = `{"a": {"k": 1, "k": 2}, "a2": [{"x": 1, "x": 1}]}` }},
		{name: "payload_lone_surrogate_passes", edit: func(d *delivery) { d.payload = `{"s": "\ud800", "t": "\udfff\ud83d\ude00"}` }},
		{name: "payload_big_numbers_pass", edit: func(d *delivery) { d.payload = `{"n": 1e400, "m": -0.0, "big": 123456789012345678901234567890}` }},
		{name: "compact_separators", body: func(d *delivery) string { return strings.ReplaceAll(d.body(), `": `, `":`) }},
		{name: "escaped_key_accepted", body: func(d *delivery) string { return strings.Replace(d.body(), `"event_id"`, `"\u0065vent_id"`, 1) }},
		{name: "other_top_level_keys_ignored", body: func(d *delivery) string { return strings.Replace(d.body(), `{`, `{"extra": [1, {"x": null}], `, 1) }},

		// Check 8: fields.
		{name: "missing_event_id", body: func(d *delivery) string { return dropField(d.body(), "event_id") }, want: reasonMissingField},
		{name: "missing_event_name", body: func(d *delivery) string { return dropField(d.body(), "event_name") }, want: reasonMissingField},
		{name: "missing_timestamp", body: func(d *delivery) string { return dropField(d.body(), "timestamp") }, want: reasonMissingField},
		{name: "missing_payload", body: func(d *delivery) string {
			return strings.Replace(d.body(), `, "payload": `+d.payload, ``, 1)
		}, want: reasonMissingField},
		{name: "event_id_not_uuid", edit: func(d *delivery) { d.eventID = "not-a-uuid" }, want: reasonInvalidEventID},
		{name: "event_id_number", body: func(d *delivery) string { return strings.Replace(d.body(), `"`+d.eventID+`"`, `42`, 1) }, want: reasonInvalidEventID},
		{name: "event_id_urn_form", edit: func(d *delivery) { d.eventID = "urn:uuid:" + testEventID }},
		{name: "event_id_braces_uppercase", edit: func(d *delivery) { d.eventID = "{" + strings.ToUpper(testEventID) + "}" }},
		{name: "event_id_hex", edit: func(d *delivery) { d.eventID = strings.ReplaceAll(testEventID, "-", "") }},
		{name: "event_name_unknown", edit: func(d *delivery) { d.name = "report_updated"; delete(d.claims, "evn") }, want: reasonInvalidEventName},
		{name: "event_name_case", edit: func(d *delivery) { d.name = "REPORT_CREATED"; delete(d.claims, "evn") }, want: reasonInvalidEventName},
		{name: "event_name_number", body: func(d *delivery) string { return strings.Replace(d.body(), `"report_created"`, `12`, 1) }, want: reasonInvalidEventName},
		{name: "event_name_escaped", body: func(d *delivery) string {
			return strings.Replace(d.body(), `"report_created"`, `"\u0072eport_created"`, 1)
		}},
		{name: "timestamp_invalid", edit: func(d *delivery) { d.stamp = "yesterday" }, want: reasonInvalidTimestamp},
		{name: "timestamp_bad_month", edit: func(d *delivery) { d.stamp = "2026-13-01T00:00:00Z" }, want: reasonInvalidTimestamp},
		{name: "timestamp_february_30", edit: func(d *delivery) { d.stamp = "2026-02-30T00:00:00Z" }, want: reasonInvalidTimestamp},
		{name: "timestamp_leap_second", edit: func(d *delivery) { d.stamp = "2026-12-31T23:59:60Z" }, want: reasonInvalidTimestamp},
		{name: "timestamp_bad_offset", edit: func(d *delivery) { d.stamp = "2026-11-28T18:33:38+25:00" }, want: reasonInvalidTimestamp},
		{name: "timestamp_ten_digit_fraction", edit: func(d *delivery) { d.stamp = "2026-11-28T18:33:38.0123456789Z" }, want: reasonInvalidTimestamp},
		{name: "timestamp_null", body: func(d *delivery) string { return strings.Replace(d.body(), `"`+d.stamp+`"`, `null`, 1) }, want: reasonInvalidTimestamp},
		{name: "timestamp_negative_number", body: func(d *delivery) string { return strings.Replace(d.body(), `"`+d.stamp+`"`, `-5`, 1) }, want: reasonInvalidTimestamp},
		{name: "timestamp_python_isoformat", check: wantTimestamp("2026-11-28T18:33:38.032435Z")},
		{name: "timestamp_offset_converted_to_utc", edit: func(d *delivery) { d.stamp = "2026-11-28T13:33:38-05:00" }, check: wantTimestamp("2026-11-28T18:33:38Z")},
		{name: "timestamp_offset_without_colon", edit: func(d *delivery) { d.stamp = "2026-11-29T00:03:38.5+0530" }, check: wantTimestamp("2026-11-28T18:33:38.5Z")},
		{name: "timestamp_naive_is_utc", edit: func(d *delivery) { d.stamp = "2026-11-28T18:33:38.032435" }, check: wantTimestamp("2026-11-28T18:33:38.032435Z")},
		{name: "timestamp_space_separator", edit: func(d *delivery) { d.stamp = "2026-11-28 18:33:38" }, check: wantTimestamp("2026-11-28T18:33:38Z")},
		{name: "timestamp_z_no_fraction", edit: func(d *delivery) { d.stamp = "2026-11-28T18:33:38Z" }, check: wantTimestamp("2026-11-28T18:33:38Z")},
		{name: "timestamp_unix_seconds", body: func(d *delivery) string { return strings.Replace(d.body(), `"`+d.stamp+`"`, `1795890818`, 1) }, check: wantTimestamp("2026-11-28T18:33:38Z")},
		{name: "timestamp_unix_fraction", body: func(d *delivery) string { return strings.Replace(d.body(), `"`+d.stamp+`"`, `1795890818.25`, 1) }, check: wantTimestamp("2026-11-28T18:33:38.25Z")},
		{name: "payload_array", edit: func(d *delivery) { d.payload = `[["a", 1]]` }, want: reasonInvalidPayload},
		{name: "payload_null", edit: func(d *delivery) { d.payload = `null` }, want: reasonInvalidPayload},
		{name: "payload_string", edit: func(d *delivery) { d.payload = `"{}"` }, want: reasonInvalidPayload},
		{name: "payload_empty_object", edit: func(d *delivery) { d.payload = `{}` }},
		{name: "malformed_before_invalid_field", body: func(d *delivery) string { return strings.Replace(d.body(), d.eventID, "x", 1) + "}" }, want: reasonMalformedBody},

		// Check 9: the token binds the body.
		{name: "eid_other_event", edit: func(d *delivery) { d.eventID = uuid.NewString() }, want: reasonEIDMismatch},
		{name: "eid_without_urn", edit: func(d *delivery) { d.claims["eid"] = testEventID }, want: reasonEIDMismatch},
		{name: "eid_hex_form", edit: func(d *delivery) { d.claims["eid"] = "urn:uuid:" + strings.ReplaceAll(testEventID, "-", "") }, want: reasonEIDMismatch},
		{name: "eid_uppercase", edit: func(d *delivery) { d.claims["eid"] = "URN:UUID:" + strings.ToUpper(testEventID) }},
		{name: "evn_mismatch", edit: func(d *delivery) { d.claims["evn"] = "report_deleted" }, want: reasonEVNMismatch},
		{name: "cep_mismatch", edit: func(d *delivery) { d.claims["cep"] = "https://elsewhere.example/hook" },
			config: func(c *verifierConfig) { c.endpoint = "https://hooks.example.com/webhook/trivialsec" }, want: reasonEndpointMismatch},
		{name: "cep_match", edit: func(d *delivery) { d.claims["cep"] = "https://hooks.example.com/webhook/trivialsec" },
			config: func(c *verifierConfig) { c.endpoint = "https://hooks.example.com/webhook/trivialsec" }},
		{name: "cep_ignored_without_endpoint", edit: func(d *delivery) { d.claims["cep"] = "https://elsewhere.example/hook" }},
		{name: "cep_empty", edit: func(d *delivery) { d.claims["cep"] = "" },
			config: func(c *verifierConfig) { c.endpoint = "https://hooks.example.com/webhook/trivialsec" }, want: reasonEndpointMismatch},
		{name: "cep_empty_without_endpoint", edit: func(d *delivery) { d.claims["cep"] = "" }},
		{name: "cep_absent", edit: func(d *delivery) { delete(d.claims, "cep") },
			config: func(c *verifierConfig) { c.endpoint = "https://hooks.example.com/webhook/trivialsec" }},

		// Check 10: the events allow-list.
		{name: "event_not_allowed", config: func(c *verifierConfig) { c.events = 1 << 0 }, want: reasonEventNotAllowed},
		{name: "event_allowed", config: func(c *verifierConfig) { c.events = 1 << eventIndex([]byte("report_created")) }},
	}
	for _, style := range styles {
		for _, tc := range cases {
			t.Run(style.name+"/"+tc.name, func(t *testing.T) {
				d := style.make()
				if tc.edit != nil {
					tc.edit(d)
				}
				v := testVerifier(t, tc.config)
				auth := d.authorization()
				if tc.auth != nil {
					if d.bearer && !strings.HasPrefix(tc.name, "bearer") && !strings.HasPrefix(tc.name, "bare") {
						auth = "Bearer " + tc.auth(d)
					} else {
						auth = tc.auth(d)
					}
				}
				body := d.body()
				if tc.body != nil {
					body = tc.body(d)
				}
				got, repl := deliverTo(t, v, tc.maxBody, auth, tc.contentType, body)
				if got != tc.want {
					t.Fatalf("refused for %q, want %q", got, tc.want)
				}
				if got != reasonNone {
					return
				}
				if id, _ := repl.GetString("http.trivialsec_webhook.event_id"); id != testEventID {
					t.Errorf("event ID = %s", id)
				}
				if tc.check != nil {
					tc.check(t, repl)
				}
			})
		}
	}
}

func TestVerifyAllEventNames(t *testing.T) {
	v := testVerifier(t, nil)
	for _, style := range styles {
		for _, name := range eventNames {
			d := style.make()
			d.name = name
			if _, ok := d.claims["evn"]; ok {
				d.claims["evn"] = name
			}
			reason, repl := deliverTo(t, v, 0, d.authorization(), "", d.body())
			if got, _ := repl.GetString("http.trivialsec_webhook.event_name"); reason != reasonNone || got != name {
				t.Errorf("%s/%s: reason %q, name %q", style.name, name, reason, got)
			}
		}
	}
}

// TestVerifyClock moves the clock, not the token, across exp and nbf. A
// production token's nbf is iat + 3 s, the sender's head start, which the
// module takes off: it is valid from iat - leeway.
func TestVerifyClock(t *testing.T) {
	for _, style := range styles {
		d := style.make()
		auth, body := d.authorization(), d.body()
		exp := time.Unix(d.claims["exp"].(int64), 0)
		iat := time.Unix(d.claims["iat"].(int64), 0)
		for _, tc := range []struct {
			now  time.Time
			want reasonCode
		}{
			{iat.Add(-defaultLeeway - time.Nanosecond), reasonNotYetValid},
			{iat.Add(-defaultLeeway), reasonNone},
			{exp.Add(defaultLeeway - time.Nanosecond), reasonNone},
			{exp.Add(defaultLeeway), reasonExpired},
		} {
			v := testVerifier(t, func(c *verifierConfig) { c.now = func() time.Time { return tc.now } })
			if got, _ := deliverTo(t, v, 0, auth, "", body); got != tc.want {
				t.Errorf("%s at %s: %q, want %q", style.name, tc.now, got, tc.want)
			}
		}
	}
}

// TestVerifyClockSkew: a delivery minted by a sender whose clock is off by
// up to the leeway, either way, and received at once or a little later,
// passes for any leeway; one from a clock further ahead does not.
func TestVerifyClockSkew(t *testing.T) {
	for _, leeway := range []time.Duration{0, time.Second, 2 * time.Second, defaultLeeway, 10 * time.Second} {
		for _, style := range styles {
			for _, skew := range []time.Duration{-leeway, -leeway / 2, 0, leeway / 2, leeway, leeway + time.Second} {
				for _, latency := range []time.Duration{0, 300 * time.Millisecond} {
					want := reasonNone
					if skew > leeway {
						want = reasonNotYetValid
					}
					d := style.make().at(testNow.Add(skew)) // the sender's clock
					v := testVerifier(t, func(c *verifierConfig) {
						c.leeway = leeway
						c.now = func() time.Time { return testNow.Add(latency) }
					})
					if got, _ := deliverTo(t, v, 0, d.authorization(), "", d.body()); got != want {
						t.Errorf("leeway %v, %s sender %v ahead, received %v later: %q, want %q",
							leeway, style.name, skew, latency, got, want)
					}
				}
			}
		}
	}
}

// TestHS256Headers: each header the module takes without decoding it is
// the only strict encoding of a header it would read as HS256 without crit,
// and a token with it verifies; the same header encoded otherwise is read
// the long way and verifies too; anything else is read as before.
func TestHS256Headers(t *testing.T) {
	v := testVerifier(t, nil)
	claims := rawURL.EncodeToString([]byte(mustJSON(productionDelivery().claims)))
	for _, enc := range hs256Headers {
		header, err := b64.DecodeString(enc)
		if err != nil || rawURL.EncodeToString(header) != enc {
			t.Fatalf("%s: decodes to %q (%v), which encodes otherwise", enc, header, err)
		}
		members, status := readObject(header, nil, defaultJSONLimits)
		if status != jsonOK {
			t.Fatalf("%s: %q does not read", enc, header)
		}
		for _, m := range members {
			if alg, _ := jsonString(m.value); string(m.key) == "crit" || (string(m.key) == "alg" && string(alg) != "HS256") {
				t.Fatalf("%s: %q", enc, header)
			}
		}
		if _, reason := v.verifyToken(signParts(enc, claims, testSecret)); reason != reasonNone {
			t.Errorf("%s: %s", header, reason)
		}
		spaced := strings.Replace(string(header), ":", ": ", 1)
		if _, reason := v.verifyToken(signParts(rawURL.EncodeToString([]byte(spaced)), claims, testSecret)); reason != reasonNone {
			t.Errorf("%s: %s", spaced, reason)
		}
		if _, reason := v.verifyToken(signParts(enc, claims, "another-secret")); reason != reasonBadSignature {
			t.Errorf("%s under another secret: %s", header, reason)
		}
	}
	for header, want := range map[string]reasonCode{
		`{"alg":"HS256","typ":"JWT","crit":["exp"]}`: reasonCriticalHeader,
		`{"alg":"HS512","typ":"JWT"}`:                reasonBadAlgorithm,
		`{"alg":"HS256","alg":"HS256"}`:              reasonMalformedToken,
	} {
		if _, reason := v.verifyToken(signParts(rawURL.EncodeToString([]byte(header)), claims, testSecret)); reason != want {
			t.Errorf("%s: %s, want %s", header, reason, want)
		}
	}
}

// TestNotBefore: the sender's head start of up to 3 s comes off nbf, and
// nothing else does.
func TestNotBefore(t *testing.T) {
	iat := time.Unix(1_800_000_000, 0)
	for _, tc := range []struct{ nbf, want time.Duration }{
		{-10 * time.Second, -10 * time.Second}, // before iat: as it is
		{0, 0},
		{time.Second, 0},
		{senderHeadStart, 0},
		{senderHeadStart + time.Second, time.Second},
		{time.Hour, time.Hour - senderHeadStart},
	} {
		if got := notBefore(iat, iat.Add(tc.nbf)); !got.Equal(iat.Add(tc.want)) {
			t.Errorf("nbf = iat%+v: valid from iat%+v, want iat%+v", tc.nbf, got.Sub(iat), tc.want)
		}
	}
}

// deliverTo runs one delivery through ServeHTTP, as Caddy would, with v as
// the handler's verifier and no replay store. It returns the reason the
// delivery was refused for (reasonNone when it reached the next handler,
// byte for byte) and the request's replacer.
func deliverTo(t *testing.T, v *verifier, maxBody int64, auth, contentType, body string) (reasonCode, *caddy.Replacer) {
	t.Helper()
	if maxBody == 0 {
		maxBody = defaultMaxBody
	}
	leeway := caddy.Duration(v.leeway)
	h := &Handler{verifier: v, MaxBody: maxBody, Leeway: &leeway, logger: zap.NewNop(), now: v.now}
	r := httptest.NewRequest(http.MethodPost, "/webhook/trivialsec", strings.NewReader(body))
	if auth != "" {
		r.Header.Set("Authorization", auth)
	}
	if contentType != "" {
		r.Header.Set("Content-Type", contentType)
	}
	next := &recordingNext{}
	status, repl := serve(t, h, next, r)
	if status == http.StatusOK {
		if next.calls != 1 || string(next.body) != body {
			t.Fatalf("accepted, but the next handler got %q (%d calls)", next.body, next.calls)
		}
		return reasonNone, repl
	}
	code, _ := repl.GetString("http.trivialsec_webhook.reason")
	for r := reasonNone + 1; r < reasonCount; r++ {
		if r.String() == code {
			if r.status() != status || next.calls != 0 {
				t.Fatalf("refused as %s with status %d (%d calls to next)", code, status, next.calls)
			}
			return r, repl
		}
	}
	t.Fatalf("status %d with reason %q", status, code)
	return 0, nil
}

func TestReasons(t *testing.T) {
	seen := map[string]bool{}
	for r := reasonMethodNotAllowed; r < reasonCount; r++ {
		code := r.String()
		if code == "" || seen[code] || strings.Trim(code, "abcdefghijklmnopqrstuvwxyz_") != "" {
			t.Errorf("reason %d has code %q", r, code)
		}
		seen[code] = true
		if s := r.status(); s < 400 || s > 599 {
			t.Errorf("%s: status %d", code, s)
		}
	}
	for r, want := range map[reasonCode]int{
		reasonMethodNotAllowed: 405, reasonMissingToken: 403, reasonBadSubject: 403,
		reasonUnsupportedMediaType: 415, reasonBodyTooLarge: 413, reasonBodyReadFailed: 400,
		reasonDuplicateKey: 400, reasonMissingField: 422, reasonInvalidPayload: 422,
		reasonEIDMismatch: 403, reasonEventNotAllowed: 403, reasonReplayed: 409, reasonReplayStoreFull: 503,
		reasonReplayStoreDown: 503,
		reasonCriticalHeader:  403, reasonFoldedKey: 400, reasonTooDeep: 400, reasonNumberTooLong: 400,
	} {
		if r.status() != want {
			t.Errorf("%s: status %d, want %d", r, r.status(), want)
		}
	}
}

func wantTimestamp(want string) func(*testing.T, *caddy.Replacer) {
	return func(t *testing.T, repl *caddy.Replacer) {
		t.Helper()
		if got, _ := repl.GetString("http.trivialsec_webhook.timestamp"); got != want {
			t.Errorf("timestamp = %s, want %s", got, want)
		}
	}
}

// nested is n arrays, one in the other, around a 0.
func nested(n int) string {
	return strings.Repeat("[", n) + "0" + strings.Repeat("]", n)
}

// signOther signs the delivery with another HMAC algorithm, named in the
// header as such.
func signOther(d *delivery, alg string) string {
	d.header["alg"] = alg
	input := rawURL.EncodeToString([]byte(mustJSON(d.header))) + "." + rawURL.EncodeToString([]byte(mustJSON(d.claims)))
	h := sha512.New384
	if alg == "HS512" {
		h = sha512.New
	}
	mac := hmac.New(h, []byte(d.key))
	mac.Write([]byte(input))
	return input + "." + rawURL.EncodeToString(mac.Sum(nil))
}

const base64url = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

// dropField removes a string field of the Python-style body.
func dropField(body, key string) string {
	i := strings.Index(body, `"`+key+`": "`)
	j := i + len(key) + 5 + strings.IndexByte(body[i+len(key)+5:], '"') + 1
	if body[j:j+2] == ", " {
		j += 2
	}
	return body[:i] + body[j:]
}

// TestCheckTimesMatchesGolangJWT holds checkTimes to golang-jwt's Validator,
// which it stands in for, around every edge: exp and nbf from two leeways
// before now to two after, by the nanosecond near each edge.
func TestCheckTimesMatchesGolangJWT(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	for _, leeway := range []time.Duration{0, time.Second, defaultLeeway} {
		var offsets []time.Duration
		for _, edge := range []time.Duration{-2 * leeway, -leeway, 0, leeway, 2 * leeway} {
			offsets = append(offsets, edge-time.Nanosecond, edge, edge+time.Nanosecond)
		}
		validator := jwt.NewValidator(jwt.WithLeeway(leeway), jwt.WithExpirationRequired(),
			jwt.WithTimeFunc(func() time.Time { return now }))
		for _, expOffset := range offsets {
			for _, nbfOffset := range offsets {
				exp, nbf := now.Add(expOffset), now.Add(nbfOffset)
				want := reasonNone
				switch err := validator.Validate(jwt.RegisteredClaims{
					ExpiresAt: &jwt.NumericDate{Time: exp}, NotBefore: &jwt.NumericDate{Time: nbf},
				}); {
				case err == nil:
				case errors.Is(err, jwt.ErrTokenExpired):
					want = reasonExpired
				case errors.Is(err, jwt.ErrTokenNotValidYet):
					want = reasonNotYetValid
				default:
					t.Fatalf("golang-jwt: %v", err)
				}
				if got := checkTimes(now, exp, nbf, leeway); got != want {
					t.Errorf("leeway %v, exp now%+v, nbf now%+v: %v, golang-jwt says %v", leeway, expOffset, nbfOffset, got, want)
				}
			}
		}
	}
}
