package trivialsecwebhook

import "net/http"

// reasonCode is why a delivery was refused: a short, stable code for logs, the
// {http.trivialsec_webhook.reason} placeholder and metrics, and the HTTP
// status that answers it. The zero reasonCode means the delivery passed.
type reasonCode uint8

// The reasons, in the order of the checks that give them.
const (
	reasonNone reasonCode = iota

	reasonMethodNotAllowed // 1: not a POST

	reasonMissingToken   // 2: no Authorization header, or an empty one
	reasonMalformedToken // 3: not three base64url parts, bad JSON, too long, or two Authorization headers
	reasonBadAlgorithm   // 3: header alg is not exactly HS256
	reasonCriticalHeader // 3: the header lists crit: an extension the module does not support (RFC 7515 4.1.11)
	reasonBadSignature   // 3: no configured secret verifies the signature
	reasonMissingClaim   // 3: one of iat nbf exp aud iss sub eid is absent
	reasonMalformedClaim // 3: signed claims that are not one JSON object without duplicate names, a claim of the wrong JSON type, or a time out of range
	reasonExpired        // 3: exp + leeway has passed
	reasonNotYetValid    // 3: nbf - leeway has not come yet
	reasonBadAudience    // 3: aud does not hold the account's audience
	reasonBadIssuer      // 3: iss is not the configured issuer
	reasonBadSubject     // 3: sub is not the configured subject UUID

	reasonUnsupportedMediaType // 5: Content-Type is neither absent nor JSON
	reasonBodyTooLarge         // 6: the body is larger than max_body
	reasonBodyReadFailed       // 6: the client stopped sending the body
	reasonMalformedBody        // 7: not one well-formed JSON object
	reasonDuplicateKey         // 7: a top-level key appears twice
	reasonFoldedKey            // 7: a top-level key differs from event_id, event_name, timestamp or payload only in case (Unicode simple folding)
	reasonTooDeep              // 7: arrays and objects nested deeper than max_depth
	reasonNumberTooLong        // 7: a number of more than 100 characters

	reasonMissingField     // 8: event_id, event_name, timestamp or payload is absent
	reasonInvalidEventID   // 8: event_id is not a UUID
	reasonInvalidEventName // 8: event_name is not one of the 15 names
	reasonInvalidTimestamp // 8: timestamp is neither a date-time nor Unix seconds
	reasonInvalidPayload   // 8: payload is not a JSON object
	reasonEIDMismatch      // 9: eid is not urn:uuid:<event_id>
	reasonEVNMismatch      // 9: evn differs from event_name
	reasonEndpointMismatch // 9: cep differs from the configured endpoint
	reasonEventNotAllowed  // 10: event_name is not in the events allow-list
	reasonReplayed         // 11: this eid was accepted before
	reasonReplayStoreFull  // 11: the memory replay store is at its cap
	reasonReplayStoreDown  // 11: the Redis replay store did not answer
	reasonCount
)

var reasonCodes = [reasonCount]string{
	reasonNone:                 "",
	reasonMethodNotAllowed:     "method_not_allowed",
	reasonMissingToken:         "missing_token",
	reasonMalformedToken:       "malformed_token",
	reasonBadAlgorithm:         "bad_algorithm",
	reasonCriticalHeader:       "critical_header",
	reasonBadSignature:         "bad_signature",
	reasonMissingClaim:         "missing_claim",
	reasonMalformedClaim:       "malformed_claim",
	reasonExpired:              "expired",
	reasonNotYetValid:          "not_yet_valid",
	reasonBadAudience:          "bad_audience",
	reasonBadIssuer:            "bad_issuer",
	reasonBadSubject:           "bad_subject",
	reasonUnsupportedMediaType: "unsupported_media_type",
	reasonBodyTooLarge:         "body_too_large",
	reasonBodyReadFailed:       "body_read_failed",
	reasonMalformedBody:        "malformed_body",
	reasonDuplicateKey:         "duplicate_key",
	reasonFoldedKey:            "folded_key",
	reasonTooDeep:              "too_deep",
	reasonNumberTooLong:        "number_too_long",
	reasonMissingField:         "missing_field",
	reasonInvalidEventID:       "invalid_event_id",
	reasonInvalidEventName:     "invalid_event_name",
	reasonInvalidTimestamp:     "invalid_timestamp",
	reasonInvalidPayload:       "invalid_payload",
	reasonEIDMismatch:          "eid_mismatch",
	reasonEVNMismatch:          "evn_mismatch",
	reasonEndpointMismatch:     "endpoint_mismatch",
	reasonEventNotAllowed:      "event_not_allowed",
	reasonReplayed:             "replayed",
	reasonReplayStoreFull:      "replay_store_full",
	reasonReplayStoreDown:      "replay_store_unavailable",
}

// String returns the reason's stable code, such as "bad_signature".
func (r reasonCode) String() string {
	if r >= reasonCount {
		return "unknown"
	}
	return reasonCodes[r]
}

// status is the HTTP status that answers a refusal for this reason.
func (r reasonCode) status() int {
	switch {
	case r == reasonMethodNotAllowed:
		return http.StatusMethodNotAllowed
	case r <= reasonBadSubject:
		return http.StatusForbidden
	case r == reasonUnsupportedMediaType:
		return http.StatusUnsupportedMediaType
	case r == reasonBodyTooLarge:
		return http.StatusRequestEntityTooLarge
	case r <= reasonNumberTooLong:
		return http.StatusBadRequest
	case r <= reasonInvalidPayload:
		return http.StatusUnprocessableEntity
	case r <= reasonEventNotAllowed:
		return http.StatusForbidden
	case r == reasonReplayed:
		return http.StatusConflict
	default:
		return http.StatusServiceUnavailable
	}
}

// authenticated reports whether a refusal for this reason comes after the
// token's signature verified: such a delivery is a lost event or an attack
// by someone holding a signed token, and is logged at WARN. Refusals before
// that are internet noise, logged at DEBUG.
func (r reasonCode) authenticated() bool {
	return r > reasonBadSignature
}

// bodyUnread reports whether a refusal for this reason comes before the body
// was read to its end.
func (r reasonCode) bodyUnread() bool {
	return r != reasonNone && r <= reasonBodyReadFailed
}

// Error makes a reasonCode usable as the error inside caddyhttp.Error:
// "trivialsec_webhook: refused: " and the code, never a token, a secret or a
// value from the request.
func (r reasonCode) Error() string {
	return "trivialsec_webhook: refused: " + r.String()
}
