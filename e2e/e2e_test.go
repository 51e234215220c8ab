package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
)

const secret = "e2e-signing-secret"

func TestListModules(t *testing.T) {
	code, out, _ := run(t, nil, "list-modules")
	if code != 0 || !strings.Contains(out, "http.handlers.trivialsec_webhook\n") {
		t.Fatalf("exit %d; the module is not listed:\n%s", code, out)
	}
}

// TestAdaptExample: example.Caddyfile adapts to the JSON the README
// documents in example.json.
func TestAdaptExample(t *testing.T) {
	code, out, errOut := run(t, nil, "adapt", "--config", "../example.Caddyfile")
	if code != 0 {
		t.Fatalf("adapt exited %d: %s", code, errOut)
	}
	if strings.Contains(errOut, "not formatted") {
		t.Errorf("example.Caddyfile is not formatted: %s", errOut)
	}
	want, err := os.ReadFile("../example.json")
	if err != nil {
		t.Fatal(err)
	}
	var got, wantJSON any
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(want, &wantJSON); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, wantJSON) {
		t.Fatalf("adapt gives\n%s\nwhich is not example.json", out)
	}
}

// TestValidateBrokenConfigs: every kind of broken config is refused by
// `caddy validate` with the file, the line and what to do.
func TestValidateBrokenConfigs(t *testing.T) {
	valid := "\taccount acme\n\tsecret {env.TRIVIALSEC_E2E_SECRET}\n"
	for _, tc := range []struct {
		name, block string
		line        int
		want        string
	}{
		{"unknown_subdirective", valid + "\tsecert x\n", 5, `unknown subdirective "secert": use account, secret,`},
		{"duplicate_subdirective", valid + "\taccount other\n", 5, "account is set twice"},
		{"bad_subject", valid + "\tsubject bc6e2cd5-1f59\n", 5, `subject "bc6e2cd5-1f59" is not a UUID: write it as bc6e2cd5-1f59-487f-b05b-49946bd078b2`},
		{"unknown_event", valid + "\tevents report_created reports_deleted\n", 5, `unknown event name "reports_deleted": use one of hosted_monitoring`},
		{"negative_leeway", valid + "\tleeway -3s\n", 5, `leeway "-3s" is negative`},
		{"bad_max_body", valid + "\tmax_body huge\n", 5, `max_body "huge" is not a size: write it like 10MiB`},
		{"replay_redis_without_url", valid + "\treplay redis\n", 5, "replay redis takes a URL and an optional key prefix"},
		{"missing_account", "\tsecret {env.TRIVIALSEC_E2E_SECRET}\n", 2, "account is required: the Trivial Security account name"},
		{"missing_secret", "\taccount acme\n", 2, "secret is required: the webhook signing secret"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			config := filepath.Join(t.TempDir(), "Caddyfile")
			body := ":8080 {\n\ttrivialsec_webhook {\n" + strings.ReplaceAll(tc.block, "\t", "\t\t") + "\t}\n\trespond 200\n}\n"
			if err := os.WriteFile(config, []byte(body), 0o600); err != nil {
				t.Fatal(err)
			}
			code, _, errOut := run(t, []string{"TRIVIALSEC_E2E_SECRET=x"}, "validate", "--config", config)
			errOut = logMessages(errOut)
			at := fmt.Sprintf("%s:%d", config, tc.line)
			if code == 0 || !strings.Contains(errOut, tc.want) || !strings.Contains(errOut, at) {
				t.Fatalf("validate exited %d; want %q at %s in:\n%s", code, tc.want, at, errOut)
			}
		})
	}
	t.Run("unset_secret", func(t *testing.T) {
		config := filepath.Join(t.TempDir(), "Caddyfile")
		if err := os.WriteFile(config, []byte(":8080 {\n\ttrivialsec_webhook {\n\t\taccount acme\n\t\tsecret {env.TRIVIALSEC_E2E_UNSET}\n\t}\n}\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		code, _, errOut := run(t, nil, "validate", "--config", config)
		errOut = logMessages(errOut)
		if code == 0 || !strings.Contains(errOut, "secret 1: evaluated placeholder {env.TRIVIALSEC_E2E_UNSET} is empty: set the variable or create the file") {
			t.Fatalf("validate exited %d:\n%s", code, errOut)
		}
	})
}

// logMessages turns Caddy's JSON log lines into their messages, one a line,
// as an operator reading them would.
func logMessages(log string) string {
	var b strings.Builder
	for _, line := range strings.Split(log, "\n") {
		var entry struct{ Msg string }
		if json.Unmarshal([]byte(line), &entry) == nil {
			line = entry.Msg
		}
		b.WriteString(line + "\n")
	}
	return b.String()
}

// TestCommandErrors: bad input to the sender gives one line on stderr and
// a non-zero exit.
func TestCommandErrors(t *testing.T) {
	withSecret := []string{"TRIVIALSEC_WEBHOOK_SECRET=" + secret}
	payloadFile := filepath.Join(t.TempDir(), "payload.json")
	if err := os.WriteFile(payloadFile, []byte(`{"a": [1, 2`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		want string
	}{
		{"no_secret", nil, []string{"sign", "--account", "acme"}, "no signing secret: set TRIVIALSEC_WEBHOOK_SECRET, or give --secret-file FILE"},
		{"missing_secret_file", nil, []string{"sign", "--account", "acme", "--secret-file", "/nonexistent/secret"}, "cannot read the secret file"},
		{"no_account", withSecret, []string{"sign"}, "--account is required"},
		{"bad_uuid", withSecret, []string{"sign", "--account", "acme", "--event-id", "1234"}, `--event-id "1234" is not a UUID`},
		{"unknown_event", withSecret, []string{"sign", "--account", "acme", "--event", "report_updated"}, `unknown event "report_updated"`},
		{"unreadable_payload_file", withSecret, []string{"sign", "--account", "acme", "--payload", "@/nonexistent/payload.json"}, "cannot read the payload file"},
		{"invalid_json_payload", withSecret, []string{"sign", "--account", "acme", "--payload", "@" + payloadFile}, "--payload is not a JSON object"},
		{"bad_style", withSecret, []string{"sign", "--account", "acme", "--style", "legacy"}, `unknown style "legacy"`},
		{"no_url", withSecret, []string{"send", "--account", "acme"}, "--url is required"},
		{"unreachable_url", withSecret, []string{"send", "--account", "acme", "--url", "http://" + testkit.ClosedAddr(t) + "/hook"}, "cannot reach http://127.0.0.1:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errOut := run(t, tc.env, append([]string{"trivialsec-webhook"}, tc.args...)...)
			lines := strings.Split(strings.TrimSpace(errOut), "\n")
			if code == 0 || len(lines) != 1 || !strings.Contains(lines[0], tc.want) {
				t.Fatalf("exit %d, stderr:\n%s\nwant one line with %q", code, errOut, tc.want)
			}
		})
	}
}

// TestDeliveries: Caddy from a Caddyfile in front of a real upstream. The
// upstream receives exactly the accepted deliveries, byte for byte.
func TestDeliveries(t *testing.T) {
	up := startUpstream(t, 0)
	port := freePort(t)
	env := []string{"TRIVIALSEC_WEBHOOK_SECRET=" + secret}
	startServer(t, fmt.Sprintf(`{
	admin off
	persist_config off
}

http://127.0.0.1:%d {
	trivialsec_webhook /webhook/trivialsec {
		account acme
		secret {env.TRIVIALSEC_WEBHOOK_SECRET}
	}
	reverse_proxy /webhook/trivialsec %s
	handle_errors {
		respond "{err.status_code} {http.trivialsec_webhook.reason}"
	}
}
`, port, up.Listener.Addr()), port, env)
	url := fmt.Sprintf("http://127.0.0.1:%d/webhook/trivialsec", port)
	var want []string

	// The sender command, in both styles; the body it sends is the one sign
	// prints for the same event.
	for _, style := range []string{"production", "documented"} {
		id := uuid.NewString()
		args := []string{"trivialsec-webhook", "send", "--url", url, "--account", "acme", "--style", style,
			"--event", "early_warning_ip", "--event-id", id, "--payload", `{"ip": "192.0.2.7", "note": "caf\u00e9"}`}
		code, out, errOut := run(t, env, args...)
		if code != 0 || strings.TrimSpace(out) != "HTTP/1.1 202 Accepted" {
			t.Fatalf("%s send: exit %d, %q %q", style, code, out, errOut)
		}
		got := up.received()
		want = append(want, got[len(got)-1])
		if !strings.Contains(got[len(got)-1], `"event_id": "`+id+`"`) || !strings.Contains(got[len(got)-1], `"note": "caf\u00e9"`) {
			t.Errorf("upstream got %s", got[len(got)-1])
		}
		// The same event again: a replay, refused, and send says so, with
		// the reason the handle_errors route wrote.
		code, out, _ = run(t, env, args...)
		if code != 1 || out != "HTTP/1.1 409 Conflict\nreason: replayed\n" {
			t.Fatalf("%s replay: exit %d, %q", style, code, out)
		}
	}

	// A plain HTTP client with tokens minted independently, forgeries too.
	now := time.Now()
	eventID := uuid.NewString()
	auth, body := mint(secret, "acme", eventID, now)
	if status := post(t, url, auth, body); status != 202 {
		t.Fatalf("plain client: %d", status)
	}
	want = append(want, body)
	forgedAuth, forgedBody := mint("a guessed secret", "acme", uuid.NewString(), now)
	otherAuth, otherBody := mint(secret, "other-account", uuid.NewString(), now)
	parts := strings.Split(auth, ".")
	for _, tc := range []struct {
		name, auth, body string
		want             int
	}{
		{"no_token", "", body, 403},
		{"replay", auth, body, 409},
		{"forged_secret", forgedAuth, forgedBody, 403},
		{"other_account", otherAuth, otherBody, 403},
		{"alg_none", "eyJhbGciOiJub25lIn0." + parts[1] + ".", body, 403},
		{"tampered_signature", parts[0] + "." + parts[1] + "." + strings.Repeat("A", 43), body, 403},
		{"payload_swapped_for_new_event", auth, strings.Replace(body, `"n": 1`, `"n": 2`, 1), 409},
		{"body_of_another_event", auth, strings.Replace(body, eventID, uuid.NewString(), 1), 403},
		{"not_json", auth, "event=1", 400},
	} {
		if status := post(t, url, tc.auth, tc.body); status != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, status, tc.want)
		}
	}
	got := up.received()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("upstream received %d deliveries:\n%q\nwant %d:\n%q", len(got), got, len(want), want)
	}
}

// TestReloadRotatesSecrets: `caddy reload` adds the new secret, then
// removes the old one; requests in flight during each reload all pass,
// and the replay store survives both.
func TestReloadRotatesSecrets(t *testing.T) {
	up := startUpstream(t, 20*time.Millisecond)
	port, adminPort := freePort(t), freePort(t)
	const oldSecret, newSecret = "the-old-secret", "the-new-secret"
	env := []string{"TRIVIALSEC_OLD=" + oldSecret, "TRIVIALSEC_NEW=" + newSecret}
	config := func(secrets string) string {
		return fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
}

http://127.0.0.1:%d {
	trivialsec_webhook {
		account acme
		secret %s
	}
	reverse_proxy %s
}
`, adminPort, port, secrets, up.Listener.Addr())
	}
	srv := startServer(t, config("{env.TRIVIALSEC_OLD}"), port, env)
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	reload := func(secrets string) {
		t.Helper()
		if err := os.WriteFile(srv.config, []byte(config(secrets)), 0o600); err != nil {
			t.Fatal(err)
		}
		code, _, errOut := run(t, env, "reload", "--config", srv.config, "--address", fmt.Sprintf("127.0.0.1:%d", adminPort))
		if code != 0 {
			t.Fatalf("reload exited %d: %s", code, errOut)
		}
	}
	// During fn, senders post deliveries signed with key, each a new event.
	// Every answer must be a 202. A connection that Caddy's listener hand-off
	// closes before any answer (EOF, reset: plain Caddy does the same, see
	// the README) is counted, and must not have reached the upstream.
	var accepted []string
	var acceptedMu sync.Mutex
	duringLoad := func(key string, fn func()) {
		t.Helper()
		var stop atomic.Bool
		var sent, refused, dropped atomic.Int32
		var wg sync.WaitGroup
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 500 && !stop.Load(); i++ {
					auth, body := mint(key, "acme", uuid.NewString(), time.Now())
					sent.Add(1)
					switch status, err := postStatus(url, auth, body); {
					case err != nil:
						dropped.Add(1)
					case status != 202:
						refused.Add(1)
						t.Errorf("in flight during reload: %d", status)
					default:
						acceptedMu.Lock()
						accepted = append(accepted, body)
						acceptedMu.Unlock()
					}
				}
			}()
		}
		time.Sleep(200 * time.Millisecond)
		fn()
		time.Sleep(200 * time.Millisecond)
		stop.Store(true)
		wg.Wait()
		t.Logf("during the reload: %d sent, %d refused, %d connections dropped before an answer", sent.Load(), refused.Load(), dropped.Load())
		if sent.Load() == dropped.Load() || refused.Load() > 0 {
			t.Fatalf("%d sent, %d refused", sent.Load(), refused.Load())
		}
	}

	beforeAuth, beforeBody := mint(oldSecret, "acme", uuid.NewString(), time.Now())
	if status := post(t, url, beforeAuth, beforeBody); status != 202 {
		t.Fatalf("before the rotation: %d", status)
	}
	accepted = append(accepted, beforeBody)
	if status := postNew(t, url, newSecret); status != 403 {
		t.Fatalf("the new secret before it was added: %d", status)
	}
	duringLoad(oldSecret, func() { reload("{env.TRIVIALSEC_OLD} {env.TRIVIALSEC_NEW}") })
	keptAuth, keptBody := mint(newSecret, "acme", uuid.NewString(), time.Now())
	if status := post(t, url, keptAuth, keptBody); status != 202 {
		t.Fatalf("the new secret after it was added: %d", status)
	}
	accepted = append(accepted, keptBody)
	duringLoad(newSecret, func() { reload("{env.TRIVIALSEC_NEW}") })
	if status := postNew(t, url, oldSecret); status != 403 {
		t.Fatalf("the old secret after it was removed: %d", status)
	}
	// A delivery accepted before the last reload is still remembered.
	if status := post(t, url, keptAuth, keptBody); status != 409 {
		t.Fatalf("a delivery accepted before the reload came again: %d", status)
	}
	got, want := up.received(), accepted
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("upstream received %d deliveries, want exactly the %d accepted", len(got), len(want))
	}
}

// postNew posts a delivery of a new event signed with key.
func postNew(t *testing.T, url, key string) int {
	t.Helper()
	auth, body := mint(key, "acme", uuid.NewString(), time.Now())
	return post(t, url, auth, body)
}
