// Package testkit holds what the end-to-end tests and the bench tools share:
// deliveries minted by code independent of the module's own, and loopback
// ports.
package testkit

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"time"
)

// Mint signs a delivery in the production sender's style: a bare HS256
// token whose eid is tokenEventID, and a body, written as Python writes it,
// whose event_id is bodyEventID (the same, for a genuine delivery).
func Mint(key, account, tokenEventID, bodyEventID string, now time.Time) (authorization, body string) {
	b64 := base64.RawURLEncoding
	claims, _ := json.Marshal(map[string]any{
		"iat": now.Unix(), "nbf": now.Unix() + 3, "exp": now.Unix() + 86400,
		"aud": []string{"urn:trivialsec:webhook:client_endpoint:" + account},
		"iss": "https://www.trivialsec.com", "sub": "bc6e2cd51f59487fb05b49946bd078b2",
		"eid": "urn:uuid:" + tokenEventID, "evn": "client_activity",
	})
	input := b64.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`)) + "." + b64.EncodeToString(claims)
	mac := hmac.New(sha256.New, []byte(key))
	mac.Write([]byte(input))
	body = fmt.Sprintf(`{"event_id": "%s", "event_name": "client_activity", "timestamp": "%s", "payload": {"n": 1}}`,
		bodyEventID, now.UTC().Format("2006-01-02T15:04:05.000000+00:00"))
	return input + "." + b64.EncodeToString(mac.Sum(nil)), body
}

// FreePort returns a loopback port nobody listens on.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// WaitForListener waits until something accepts connections at addr.
func WaitForListener(addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("nothing listens on %s after %s", addr, timeout)
}
