// Package testkit holds what the tests and the bench tools share: deliveries
// minted by code independent of the module's own, loopback ports, and Caddy
// processes.
package testkit

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os/exec"
	"syscall"
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

// FreePort returns a loopback port nobody listens on, for a listener to
// take at once. It is free: a later FreePort may return it again while
// nothing listens on it. An address that must stay down is ReservePort's.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Caddy is a `caddy run` process started by StartCaddy.
type Caddy struct {
	Cmd    *exec.Cmd
	exited chan struct{}
}

// StartCaddy runs `bin run` on the Caddyfile at config, with env as its whole
// environment and its output to out (nil discards it), and waits until
// something accepts connections at addr. It fails if Caddy exits first, or if
// addr stays closed for 30 s.
func StartCaddy(bin, config string, env []string, out io.Writer, addr string) (*Caddy, error) {
	c := &Caddy{Cmd: exec.Command(bin, "run", "--config", config, "--adapter", "caddyfile"), exited: make(chan struct{})}
	c.Cmd.Env, c.Cmd.Stdout, c.Cmd.Stderr = env, out, out
	if err := c.Cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = c.Cmd.Wait(); close(c.exited) }()
	if err := waitForListener(addr, 30*time.Second, c.exited); err != nil {
		c.Stop()
		return nil, fmt.Errorf("caddy: %w", err)
	}
	return c, nil
}

// Stop asks Caddy to stop, kills it if it is still running 15 s later, and
// waits for it to exit.
func (c *Caddy) Stop() {
	_ = c.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.exited:
	case <-time.After(15 * time.Second):
		_ = c.Cmd.Process.Kill()
		<-c.exited
	}
}

// Kill ends Caddy with SIGKILL, as a crash or the OOM killer would, and
// waits for it to exit.
func (c *Caddy) Kill() {
	_ = c.Cmd.Process.Kill()
	<-c.exited
}

// waitForListener waits until something accepts connections at addr, and
// gives up early once exited is closed.
func waitForListener(addr string, timeout time.Duration, exited <-chan struct{}) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("exited before listening on %s", addr)
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("nothing listens on %s after %s", addr, timeout)
}
