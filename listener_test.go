package trivialsecwebhook

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// TestHandoverCaddyfile: the wrapper's setting, and its mistakes said with
// the file and line.
func TestHandoverCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		in, err string
		wait    time.Duration
	}{
		{in: "trivialsec_webhook_handover", wait: 0},
		{in: "trivialsec_webhook_handover {\n\tcert_wait 3s\n}", wait: 3 * time.Second},
		{in: "trivialsec_webhook_handover now", err: "wrong argument count"},
		{in: "trivialsec_webhook_handover {\n\tcert_wait soon\n}", err: `cert_wait "soon": want a positive duration, such as 10s, at Testfile:2`},
		{in: "trivialsec_webhook_handover {\n\tcert_wait 0s\n}", err: `cert_wait "0s": want a positive duration`},
		{in: "trivialsec_webhook_handover {\n\tdelay 1s\n}", err: `unknown setting "delay" of trivialsec_webhook_handover: use cert_wait, at Testfile:2`},
	} {
		var h Handover
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in))
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%q: %v", tc.in, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%q: %v, want %q", tc.in, err, tc.err)
		case tc.err == "" && time.Duration(h.CertWait) != tc.wait:
			t.Errorf("%q: cert_wait %v, want %v", tc.in, time.Duration(h.CertWait), tc.wait)
		}
	}
}

// TestHandoverServesAndReloads: behind the wrapper, a TLS site and a plain
// one answer, before and after a reload: the wrapper breaks neither
// serving nor the hand-over of a reload. (What it changes at a stop and a
// start, TestHandoverStopsAccepting and e2e/restart_test.go show.)
func TestHandoverServesAndReloads(t *testing.T) {
	httpPort, httpsPort, adminPort := freePort(t), freePort(t), freePort(t)
	config := func(body string) string {
		return fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
	skip_install_trust
	auto_https disable_redirects
	servers {
		listener_wrappers {
			trivialsec_webhook_handover
			tls
		}
	}
}

https://localhost:%d {
	tls internal
	respond %q
}

http://127.0.0.1:%d {
	respond %q
}
`, adminPort, httpsPort, body, httpPort, body)
	}
	g := &spoolRig{t: t, base: fmt.Sprintf("http://127.0.0.1:%d", httpPort)}
	loadCaddyfile(t, config("first"))
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, // Caddy's internal CA; the handshake is what is tested
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, strings.Replace(addr, "localhost:", "127.0.0.1:", 1))
		},
	}}
	check := func(want string) {
		t.Helper()
		for _, url := range []string{fmt.Sprintf("https://localhost:%d/", httpsPort), g.base + "/"} {
			resp, err := client.Get(url)
			if err != nil {
				t.Fatalf("%s: %v", url, err)
			}
			if body := readAll(t, resp.Body); body != want {
				t.Errorf("%s: %q, want %q", url, body, want)
			}
		}
	}
	check("first")
	g.load(config("second"))
	check("second")
}

// TestHandoverStopsAccepting: once its config stops, the wrapper accepts
// nothing more, though connections wait (they are the next config's, or
// process's), and its Accept returns only when the server closes it.
func TestHandoverStopsAccepting(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &Handover{}
	l := h.WrapListener(inner)
	accepted := make(chan error, 1)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				accepted <- err
				return
			}
			c.Close()
		}
	}()
	c, err := net.Dial("tcp", inner.Addr().String()) // accepted before the stop
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	stopping, err := caddy.NewEvent(caddy.Context{Context: context.Background()}, "stopping", nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Handle(context.Background(), stopping); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-accepted:
		t.Fatalf("Accept returned %v once the config stopped: the server would end before Shutdown", err)
	case <-time.After(100 * time.Millisecond):
	}
	if _, err := net.Dial("tcp", inner.Addr().String()); err == nil {
		t.Error("the listener still takes connections after the stop") // its socket closes here: no systemd holds it
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-accepted:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Accept did not return once the listener was closed")
	}
}
