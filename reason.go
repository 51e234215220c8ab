package trivialsecwebhook

import "net/http"

// Reason is why a delivery was refused: a short, stable code for logs, the
// {http.trivialsec_webhook.reason} placeholder and metrics, and the HTTP
// status that answers it. The zero Reason means the delivery passed.
type Reason uint8

// The reasons, in the order of the checks that give them.
const (
	reasonNone Reason = iota

	ReasonMethodNotAllowed // 1: not a POST

	ReasonMissingToken   // 2: no Authorization header, or an empty one
	ReasonMalformedToken // 3: not three base64url parts, bad JSON, too long, or two Authorization headers
	ReasonBadAlgorithm   // 3: header alg is not exactly HS256
	ReasonBadSignature   // 3: no configured secret verifies the signature
	ReasonMissingClaim   // 3: one of iat nbf exp aud iss sub eid is absent
	ReasonMalformedClaim // 3: a claim of the wrong JSON type, or a time out of range
	ReasonExpired        // 3: exp + leeway has passed
	ReasonNotYetValid    // 3: nbf - leeway has not come yet
	ReasonBadAudience    // 3: aud does not hold the account's audience
	ReasonBadIssuer      // 3: iss is not the configured issuer
	ReasonBadSubject     // 3: sub is not the configured subject UUID

	ReasonUnsupportedMediaType // 5: Content-Type is neither absent nor JSON
	ReasonBodyTooLarge         // 6: the body is larger than max_body
	ReasonBodyReadFailed       // 6: the client stopped sending the body
	ReasonMalformedBody        // 7: not one well-formed JSON object
	ReasonDuplicateKey         // 7: a top-level key appears twice

	ReasonMissingField     // 8: event_id, event_name, timestamp or payload is absent
	ReasonInvalidEventID   // 8: event_id is not a UUID
	ReasonInvalidEventName // 8: event_name is not one of the 15 names
	ReasonInvalidTimestamp // 8: timestamp is neither a date-time nor Unix seconds
	ReasonInvalidPayload   // 8: payload is not a JSON object
	ReasonEIDMismatch      // 9: eid is not urn:uuid:<event_id>
	ReasonEVNMismatch      // 9: evn differs from event_name
	ReasonEndpointMismatch // 9: cep differs from the configured endpoint
	ReasonEventNotAllowed  // 10: event_name is not in the events allow-list
	ReasonReplayed         // 11: this eid was accepted before
	ReasonReplayStoreFull  // 11: the memory replay store is at its cap
	ReasonReplayStoreDown  // 11: the Redis replay store did not answer
	reasonCount
)

var reasonCodes = [reasonCount]string{
	reasonNone:                 "",
	ReasonMethodNotAllowed:     "method_not_allowed",
	ReasonMissingToken:         "missing_token",
	ReasonMalformedToken:       "malformed_token",
	ReasonBadAlgorithm:         "bad_algorithm",
	ReasonBadSignature:         "bad_signature",
	ReasonMissingClaim:         "missing_claim",
	ReasonMalformedClaim:       "malformed_claim",
	ReasonExpired:              "expired",
	ReasonNotYetValid:          "not_yet_valid",
	ReasonBadAudience:          "bad_audience",
	ReasonBadIssuer:            "bad_issuer",
	ReasonBadSubject:           "bad_subject",
	ReasonUnsupportedMediaType: "unsupported_media_type",
	ReasonBodyTooLarge:         "body_too_large",
	ReasonBodyReadFailed:       "body_read_failed",
	ReasonMalformedBody:        "malformed_body",
	ReasonDuplicateKey:         "duplicate_key",
	ReasonMissingField:         "missing_field",
	ReasonInvalidEventID:       "invalid_event_id",
	ReasonInvalidEventName:     "invalid_event_name",
	ReasonInvalidTimestamp:     "invalid_timestamp",
	ReasonInvalidPayload:       "invalid_payload",
	ReasonEIDMismatch:          "eid_mismatch",
	ReasonEVNMismatch:          "evn_mismatch",
	ReasonEndpointMismatch:     "endpoint_mismatch",
	ReasonEventNotAllowed:      "event_not_allowed",
	ReasonReplayed:             "replayed",
	ReasonReplayStoreFull:      "replay_store_full",
	ReasonReplayStoreDown:      "replay_store_unavailable",
}

// String returns the reason's stable code, such as "bad_signature".
func (r Reason) String() string {
	if r >= reasonCount {
		return "unknown"
	}
	return reasonCodes[r]
}

// Status is the HTTP status that answers a refusal for this reason.
func (r Reason) Status() int {
	switch {
	case r == ReasonMethodNotAllowed:
		return http.StatusMethodNotAllowed
	case r <= ReasonBadSubject:
		return http.StatusForbidden
	case r == ReasonUnsupportedMediaType:
		return http.StatusUnsupportedMediaType
	case r == ReasonBodyTooLarge:
		return http.StatusRequestEntityTooLarge
	case r <= ReasonDuplicateKey:
		return http.StatusBadRequest
	case r <= ReasonInvalidPayload:
		return http.StatusUnprocessableEntity
	case r <= ReasonEventNotAllowed:
		return http.StatusForbidden
	case r == ReasonReplayed:
		return http.StatusConflict
	default:
		return http.StatusServiceUnavailable
	}
}

// Authenticated reports whether a refusal for this reason comes after the
// token's signature verified: such a delivery is a lost event or an attack
// by someone holding a signed token, and is logged at WARN. Refusals before
// that are internet noise, logged at DEBUG.
func (r Reason) Authenticated() bool {
	return r > ReasonBadSignature
}

// Error makes a Reason usable as the error inside caddyhttp.Error. Its text
// is the code alone: never a token, a secret or a value from the request.
func (r Reason) Error() string {
	return "trivialsec_webhook: refused: " + r.String()
}
