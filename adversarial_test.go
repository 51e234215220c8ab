package trivialsecwebhook

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
)

// TestAdversarialCorpus sends hostile requests to a real Caddy over raw TCP.
// Each gets its expected status, never a 5xx; what is refused never reaches
// the upstream, and what passes reaches it byte for byte.
func TestAdversarialCorpus(t *testing.T) {
	base, up := startProxy(t, "")
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

// TestTrailersDoNotPass: a chunked delivery that declares trailers, one of
// them the token, reaches the upstream as the verified bytes with a
// Content-Length and the request's own headers: no trailer, no token.
func TestTrailersDoNotPass(t *testing.T) {
	base, up := startProxy(t, "strip_authorization")
	d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
	body := d.body()
	raw := "POST /webhook/trivialsec HTTP/1.1\r\nHost: " + strings.TrimPrefix(base, "http://") + "\r\nConnection: close\r\n" +
		"Authorization: " + d.authorization() + "\r\n" +
		"Transfer-Encoding: chunked\r\nTrailer: Authorization, X-Trivialsec-Event\r\n\r\n" +
		fmt.Sprintf("%x\r\n%s\r\n", len(body), body) +
		"0\r\nAuthorization: " + d.authorization() + "\r\nX-Trivialsec-Event: forged\r\n\r\n"
	if status := rawStatus(t, strings.TrimPrefix(base, "http://"), raw, false); status != http.StatusAccepted {
		t.Fatalf("status %d", status)
	}
	got := up.received()
	if len(got) != 1 {
		t.Fatalf("the upstream got %d requests", len(got))
	}
	r := got[0]
	if r.body != body || r.chunked || r.length != int64(len(body)) {
		t.Errorf("upstream got %d bytes, length %d, chunked %v", len(r.body), r.length, r.chunked)
	}
	if len(r.trailer) != 0 || r.header.Get("Trailer") != "" {
		t.Errorf("trailers reached the upstream: %v, Trailer: %q", r.trailer, r.header.Get("Trailer"))
	}
	if r.header.Get("Authorization") != "" || r.header.Get("X-Trivialsec-Event") != "" {
		t.Errorf("the upstream got Authorization %.12q, X-Trivialsec-Event %q",
			r.header.Get("Authorization"), r.header.Get("X-Trivialsec-Event"))
	}
}

// TestRefusalIsNotHeldOnTheWire: a request refused before its body is read
// is answered at once, though the client has not sent the body (nor will,
// before it hears back). Over HTTP/1.x the answer closes the connection,
// which net/http would otherwise drain first; over HTTP/2 only the stream
// ends, and the connection serves the next delivery.
func TestRefusalIsNotHeldOnTheWire(t *testing.T) {
	up := startUpstream(t)
	t.Setenv("TRIVIALSEC_IT_SECRET", testSecret)
	port := freePort(t)
	loadCaddyfile(t, fmt.Sprintf(`{
	admin off
	persist_config off
	servers {
		protocols h1 h2c
	}
}

http://127.0.0.1:%d {
	trivialsec_webhook {
		account %s
		secret {env.TRIVIALSEC_IT_SECRET}
	}
	reverse_proxy %s
}
`, port, testAccount, up.Listener.Addr()))
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	forged := productionDelivery().at(time.Now())
	forged.key = "a guess"

	for _, tc := range []struct{ name, headers string }{
		{"content_length_unsent", "Content-Length: 10485760\r\n"},
		{"expect_100_continue", "Content-Length: 10485760\r\nExpect: 100-continue\r\n"},
		{"chunked_unsent", "Transfer-Encoding: chunked\r\n"},
		{"too_large_unsent", "Content-Length: 1099511627776\r\n"},
	} {
		t.Run("http1/"+tc.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			auth := forged.authorization()
			if tc.name == "too_large_unsent" {
				auth = productionDelivery().withEventID(uuid.NewString()).at(time.Now()).authorization()
			}
			start := time.Now()
			fmt.Fprintf(conn, "POST /webhook/trivialsec HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\n%s\r\n", addr, auth, tc.headers)
			// Generous: the body never comes, and before the fix the answer
			// waited for it until this deadline.
			_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatalf("no answer while the body is held back: %v", err)
			}
			resp.Body.Close()
			t.Logf("answered %d in %s", resp.StatusCode, time.Since(start).Round(time.Microsecond))
			if resp.StatusCode != http.StatusForbidden && resp.StatusCode != http.StatusRequestEntityTooLarge {
				t.Fatalf("status %d", resp.StatusCode)
			}
			if !resp.Close {
				t.Error("the answer keeps the connection open with the body unread")
			}
		})
	}

	t.Run("h2c", func(t *testing.T) {
		var protocols http.Protocols
		protocols.SetUnencryptedHTTP2(true)
		client := &http.Client{Transport: &http.Transport{Protocols: &protocols}, Timeout: 10 * time.Second}
		defer client.CloseIdleConnections()
		pr, pw := io.Pipe() // a body that never comes
		defer pw.Close()
		req, _ := http.NewRequest(http.MethodPost, "http://"+addr+"/webhook/trivialsec", pr)
		req.Header.Set("Authorization", forged.authorization())
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("no answer while the body is held back: %v", err)
		}
		resp.Body.Close()
		t.Logf("answered %d over %s in %s", resp.StatusCode, resp.Proto, time.Since(start).Round(time.Microsecond))
		if resp.StatusCode != http.StatusForbidden || resp.ProtoMajor != 2 {
			t.Fatalf("%s %d", resp.Proto, resp.StatusCode)
		}
		// The next delivery goes over the same connection.
		d := productionDelivery().withEventID(uuid.NewString()).at(time.Now())
		req, _ = http.NewRequest(http.MethodPost, "http://"+addr+"/webhook/trivialsec", strings.NewReader(d.body()))
		req.Header.Set("Authorization", d.authorization())
		reused := false
		req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
			GotConn: func(info httptrace.GotConnInfo) { reused = info.Reused },
		}))
		resp, err = client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusAccepted || !reused {
			t.Fatalf("next delivery: %s %d, connection reused %v", resp.Proto, resp.StatusCode, reused)
		}
	})
	if n := len(up.received()); n != 1 {
		t.Errorf("the upstream got %d requests, want the one valid delivery", n)
	}
}
