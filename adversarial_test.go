package trivialsecwebhook

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
)

// TestAdversarialCorpus sends hostile requests to a real Caddy over raw TCP.
// Each gets its expected status, never a 5xx; what is refused never reaches
// the upstream, and what passes reaches it byte for byte.
func TestAdversarialCorpus(t *testing.T) {
	base, up := startDefaultProxy(t)
	addr := strings.TrimPrefix(base, "http://")
	now := time.Now()

	// fresh is a genuine delivery of a new event, its payload replaced.
	fresh := func(payload string) *delivery {
		d := productionDelivery().withEventID(uuid.NewString()).at(now)
		if payload != "" {
			d.payload = payload
		}
		return d
	}
	// request writes an HTTP/1.1 POST with the given headers and body.
	request := func(headers map[string]string, body string) string {
		var b strings.Builder
		b.WriteString("POST /webhook/trivialsec HTTP/1.1\r\nHost: " + addr + "\r\nUser-Agent: Trivial Security\r\nConnection: close\r\n")
		if _, ok := headers["Content-Length"]; !ok && headers["Transfer-Encoding"] == "" {
			headers["Content-Length"] = fmt.Sprint(len(body))
		}
		for k, v := range headers {
			b.WriteString(k + ": " + v + "\r\n")
		}
		b.WriteString("\r\n" + body)
		return b.String()
	}
	deliver := func(d *delivery, body string) string {
		return request(map[string]string{"Authorization": d.authorization()}, body)
	}
	chunked := func(body string) string {
		var b strings.Builder
		for i := 0; i < len(body); i += 100 {
			chunk := body[i:min(i+100, len(body))]
			fmt.Fprintf(&b, "%x\r\n%s\r\n", len(chunk), chunk)
		}
		return b.String() + "0\r\n\r\n"
	}

	d := fresh("")
	tok := d.token()
	parts := strings.Split(tok, ".")
	type tc struct {
		name    string
		raw     string // the whole request
		want    int
		forward string // the body the upstream must get, if it passes
	}
	var cases []tc
	add := func(name, raw string, want int, forward string) {
		cases = append(cases, tc{name, raw, want, forward})
	}

	// Tokens.
	// Caddy takes headers up to 16 KiB (its default max_header_size); the
	// module refuses a token over 8 KiB before decoding anything.
	add("authorization_near_header_limit", request(map[string]string{"Authorization": "Bearer " + strings.Repeat("A", 15<<10)}, d.body()), 403, "")
	add("authorization_over_header_limit", request(map[string]string{"Authorization": "Bearer " + strings.Repeat("A", 21<<10)}, d.body()), http.StatusRequestHeaderFieldsTooLarge, "")
	big := fresh("")
	big.claims["pad"] = strings.Repeat("x", 1<<20)
	add("jwt_with_1MiB_claim", deliver(big, big.body()), http.StatusRequestHeaderFieldsTooLarge, "")
	add("base64_padding", request(map[string]string{"Authorization": tok + "="}, d.body()), 403, "")
	add("base64_spaces", request(map[string]string{"Authorization": parts[0] + ". " + parts[1] + "." + parts[2]}, d.body()), 403, "")
	add("base64_standard_alphabet", request(map[string]string{"Authorization": strings.NewReplacer("-", "+", "_", "/").Replace(tok) + "+/"}, d.body()), 403, "")

	// Bodies under genuine tokens.
	for _, c := range []struct {
		name    string
		payload string
		raw     func(d *delivery) string // the body, when not d.body()
		want    int
	}{
		{"deep_nesting", `{"a": ` + strings.Repeat("[", 100000) + strings.Repeat("]", 100000) + `}`, nil, 400},
		{"invalid_utf8", "{\"a\": \"\xff\xfe\"}", nil, 400},
		{"lone_surrogate_escapes_pass", `{"a": "\ud800", "b": "\udfff x"}`, nil, 202},
		{"huge_numbers_pass", `{"a": 1e400, "b": -1e400, "c": 123456789012345678901234567890e-999}`, nil, 202},
		{"nan", `{"a": NaN}`, nil, 400},
		{"nested_duplicate_keys_pass", `{"a": {"k": 1, "k": 2}}`, nil, 202},
		{"utf8_bom", "", func(d *delivery) string { return "\ufeff" + d.body() }, 400},
		{"data_after_object", "", func(d *delivery) string { return d.body() + ` {"event_id": 1}` }, 400},
		{"comment", "", func(d *delivery) string { return d.body() + " // done" }, 400},
		{"top_level_duplicate_keys", "", func(d *delivery) string {
			return strings.Replace(d.body(), `{`, `{"event_name": "report_deleted", `, 1)
		}, 400},
	} {
		d := fresh(c.payload)
		body := d.body()
		if c.raw != nil {
			body = c.raw(d)
		}
		forward := ""
		if c.want == 202 {
			forward = body
		}
		add(c.name, deliver(d, body), c.want, forward)
	}

	// Framing.
	d1 := fresh("")
	add("content_length_smaller_than_body", request(map[string]string{"Authorization": d1.authorization(), "Content-Length": fmt.Sprint(len(d1.body()) - 20)}, d1.body()), 400, "")
	d2 := fresh("")
	add("chunked", request(map[string]string{"Authorization": d2.authorization(), "Transfer-Encoding": "chunked"}, chunked(d2.body())), 202, d2.body())
	d3 := fresh("")
	add("expect_100_continue", request(map[string]string{"Authorization": d3.authorization(), "Expect": "100-continue"}, d3.body()), 202, d3.body())
	add("expect_100_continue_without_token", request(map[string]string{"Expect": "100-continue"}, d3.body()), 403, "")

	var forwarded []string
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			status := rawStatus(t, addr, c.raw, false)
			if status != c.want {
				t.Fatalf("status %d, want %d", status, c.want)
			}
			if c.forward != "" {
				forwarded = append(forwarded, c.forward)
			}
		})
	}

	// A Content-Length larger than the body: the client stops sending.
	t.Run("content_length_larger_than_body", func(t *testing.T) {
		d := fresh("")
		raw := request(map[string]string{"Authorization": d.authorization(), "Content-Length": fmt.Sprint(len(d.body()) + 100)}, d.body())
		if status := rawStatus(t, addr, raw, true); status != 400 {
			t.Fatalf("status %d, want 400", status)
		}
	})

	got := up.received()
	if len(got) != len(forwarded) {
		t.Fatalf("upstream got %d requests, want %d", len(got), len(forwarded))
	}
	for i, r := range got {
		if r.body != forwarded[i] {
			t.Errorf("upstream request %d: %q\nwant %q", i, r.body, forwarded[i])
		}
	}
}

// TestTrickledBodyIsBounded: a body sent one byte a second is cut off by
// Caddy's read_body timeout, and never reaches the upstream.
func TestTrickledBodyIsBounded(t *testing.T) {
	up := startUpstream(t)
	t.Setenv("TRIVIALSEC_IT_SECRET", testSecret)
	port := freePort(t)
	caddyfile := fmt.Sprintf(`{
	admin off
	persist_config off
	servers {
		timeouts {
			read_body 2s
		}
	}
}

http://127.0.0.1:%d {
	trivialsec_webhook {
		account %s
		secret {env.TRIVIALSEC_IT_SECRET}
	}
	reverse_proxy %s
}
`, port, testAccount, up.Listener.Addr())
	loadCaddyfile(t, caddyfile)
	d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
	conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "POST / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: %s\r\nContent-Length: %d\r\n\r\n", port, d.authorization(), len(d.body()))
	start := time.Now()
	answered := make(chan int, 1)
	go func() {
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			answered <- 0 // closed without an answer
			return
		}
		answered <- resp.StatusCode
	}()
	body := d.body()
	for i := 0; i < len(body); i++ {
		select {
		case status := <-answered:
			if elapsed := time.Since(start); elapsed > 4*time.Second {
				t.Fatalf("cut off only after %s", elapsed)
			}
			if status >= 500 || status == 200 {
				t.Fatalf("status %d", status)
			}
			t.Logf("cut off after %s with status %d (0: closed without an answer)", time.Since(start).Round(time.Millisecond), status)
			if n := len(up.received()); n != 0 {
				t.Fatalf("the upstream got %d requests", n)
			}
			return
		case <-time.After(time.Second):
		}
		if _, err := conn.Write([]byte{body[i]}); err != nil {
			break
		}
		if i > 10 {
			t.Fatal("the trickle went on for more than 10 s")
		}
	}
}

// rawStatus writes raw to a new connection and returns the status of the
// first answer. halfClose closes the sending side after writing, as a
// client that stops sending does.
func rawStatus(t *testing.T, addr, raw string, halfClose bool) int {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	go func() {
		_, _ = io.WriteString(conn, raw)
		if halfClose {
			_ = conn.(*net.TCPConn).CloseWrite()
		}
	}()
	br := bufio.NewReader(conn)
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("no answer: %v", err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusContinue {
			return resp.StatusCode
		}
	}
}
