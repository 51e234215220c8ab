package trivialsecwebhook

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// newTestHandler provisions a handler with the test clock, the test secret
// from the environment, and its logs observed.
func newTestHandler(t *testing.T, change func(*Handler)) (*Handler, *observer.ObservedLogs) {
	t.Helper()
	t.Setenv("TRIVIALSEC_TEST_SECRET", testSecret)
	h := &Handler{
		Account: testAccount,
		Secret:  []string{"{env.TRIVIALSEC_TEST_SECRET}"},
		now:     func() time.Time { return testNow },
		Replay:  &Replay{Store: "memory"},
		Spool:   &Spool{Store: "off"}, // the spool's tests run a real Caddy
	}
	if change != nil {
		change(h)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		t.Fatalf("provision: %v", err)
	}
	if err := h.Validate(); err != nil {
		t.Fatalf("validate: %v", err)
	}
	t.Cleanup(func() { _ = h.Cleanup() })
	if _, ok := h.store.(*memoryStore); ok {
		h.store = newMemoryStore(h.Replay.MaxEntries) // a store of its own for each test
	}
	core, logs := observer.New(zapcore.DebugLevel)
	h.logger = zap.New(core)
	return h, logs
}

// recordingNext is a next handler that keeps what it was given.
type recordingNext struct {
	mu      sync.Mutex
	calls   int
	body    []byte
	header  http.Header
	length  int64
	chunked bool
	status  int   // what it answers; 200 by default
	err     error // what it returns
}

func (n *recordingNext) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return err
	}
	n.mu.Lock()
	n.calls++
	n.body, n.header, n.length, n.chunked = body, r.Header.Clone(), r.ContentLength, len(r.TransferEncoding) > 0
	status, nerr := n.status, n.err
	n.mu.Unlock()
	if nerr != nil {
		return nerr
	}
	if status == 0 {
		status = http.StatusOK
	}
	w.WriteHeader(status)
	return nil
}

// serve runs one request through the handler and returns the status Caddy
// would answer, and the request's replacer.
func serve(t *testing.T, h *Handler, next caddyhttp.Handler, r *http.Request) (int, *caddy.Replacer) {
	t.Helper()
	repl := caddy.NewReplacer()
	r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, repl))
	w := httptest.NewRecorder()
	err := h.ServeHTTP(w, r, next)
	if err == nil {
		return w.Code, repl
	}
	var he caddyhttp.HandlerError
	if !errors.As(err, &he) {
		t.Fatalf("ServeHTTP returned %v, not a caddyhttp.HandlerError", err)
	}
	return he.StatusCode, repl
}

func deliveryRequest(d *delivery) *http.Request {
	r := httptest.NewRequest(http.MethodPost, "/webhook/trivialsec", strings.NewReader(d.body()))
	r.Header.Set("Authorization", d.authorization())
	r.Header.Set("User-Agent", "Trivial Security")
	return r
}

func TestServeHTTPAccepts(t *testing.T) {
	for _, style := range styles {
		t.Run(style.name, func(t *testing.T) {
			h, logs := newTestHandler(t, nil)
			next := &recordingNext{}
			d := style.make()
			status, repl := serve(t, h, next, deliveryRequest(d))
			if status != http.StatusOK || next.calls != 1 {
				t.Fatalf("status %d, next called %d times", status, next.calls)
			}
			if string(next.body) != d.body() {
				t.Errorf("next got body %q, want %q", next.body, d.body())
			}
			if next.length != int64(len(d.body())) || next.header.Get("Content-Length") != strconv.Itoa(len(d.body())) {
				t.Errorf("Content-Length %d / %q", next.length, next.header.Get("Content-Length"))
			}
			if next.header.Get("Authorization") == "" {
				t.Error("Authorization removed without strip_authorization")
			}
			for name, want := range map[string]string{
				"event_id":   testEventID,
				"event_name": "report_created",
				"timestamp":  "2026-11-28T18:33:38.032435Z",
				"issued_at":  "2026-11-28T18:33:38Z",
				"expires_at": "2026-11-29T18:33:38Z",
				"reason":     "",
			} {
				if got, _ := repl.GetString("http.trivialsec_webhook." + name); got != want {
					t.Errorf("placeholder %s = %q, want %q", name, got, want)
				}
			}
			wantEndpoint := ""
			if style.name == "production" {
				wantEndpoint = "https://hooks.example.com/webhook/trivialsec"
			}
			if got, _ := repl.GetString("http.trivialsec_webhook.endpoint"); got != wantEndpoint {
				t.Errorf("endpoint placeholder %q, want %q", got, wantEndpoint)
			}
			entries := logs.FilterMessage("accepted delivery").All()
			if len(entries) != 1 || entries[0].Level != zapcore.DebugLevel {
				t.Errorf("acceptance logs: %v", entries)
			}
		})
	}
}

func TestServeHTTPChunkedUpload(t *testing.T) {
	h, _ := newTestHandler(t, nil)
	next := &recordingNext{}
	d := productionDelivery()
	r := deliveryRequest(d)
	r.Body = io.NopCloser(strings.NewReader(d.body())) // no length known
	r.ContentLength = -1
	r.TransferEncoding = []string{"chunked"}
	if status, _ := serve(t, h, next, r); status != http.StatusOK {
		t.Fatalf("status %d", status)
	}
	if string(next.body) != d.body() || next.length != int64(len(d.body())) || next.chunked {
		t.Errorf("next got %d bytes, length %d, chunked %v", len(next.body), next.length, next.chunked)
	}
}

func TestServeHTTPStripAuthorization(t *testing.T) {
	h, _ := newTestHandler(t, func(h *Handler) { h.StripAuthorization = true })
	next := &recordingNext{}
	if status, _ := serve(t, h, next, deliveryRequest(productionDelivery())); status != http.StatusOK {
		t.Fatalf("status %d", status)
	}
	if _, ok := next.header["Authorization"]; ok {
		t.Error("Authorization reached the next handler")
	}
}

// failingBody fails the test if anything reads it.
type failingBody struct{ t *testing.T }

func (b failingBody) Read([]byte) (int, error) {
	b.t.Error("the body of a refused request was read")
	return 0, io.EOF
}
func (failingBody) Close() error { return nil }

func TestServeHTTPRefuses(t *testing.T) {
	for _, tc := range []struct {
		name       string
		request    func(t *testing.T, d *delivery) *http.Request
		change     func(*Handler)
		wantStatus int
		wantReason string
		wantLevel  zapcore.Level
	}{
		{"get", func(t *testing.T, d *delivery) *http.Request {
			r := deliveryRequest(d)
			r.Method = http.MethodGet
			r.Body = failingBody{t}
			return r
		}, nil, 405, "method_not_allowed", zapcore.DebugLevel},
		{"no_token_body_unread", func(t *testing.T, d *delivery) *http.Request {
			r := deliveryRequest(d)
			r.Header.Del("Authorization")
			r.Body = failingBody{t}
			return r
		}, nil, 403, "missing_token", zapcore.DebugLevel},
		{"forged_token_body_unread", func(t *testing.T, d *delivery) *http.Request {
			d.key = "guess"
			r := deliveryRequest(d)
			r.Body = failingBody{t}
			return r
		}, nil, 403, "bad_signature", zapcore.DebugLevel},
		{"two_authorization_headers", func(t *testing.T, d *delivery) *http.Request {
			r := deliveryRequest(d)
			r.Header.Add("Authorization", d.authorization())
			r.Body = failingBody{t}
			return r
		}, nil, 403, "malformed_token", zapcore.DebugLevel},
		{"expired_is_a_warning", func(t *testing.T, d *delivery) *http.Request {
			d.claims["exp"] = testNow.Unix() - 3600
			r := deliveryRequest(d)
			r.Body = failingBody{t}
			return r
		}, nil, 403, "expired", zapcore.WarnLevel},
		{"signed_claims_malformed_is_a_warning", func(t *testing.T, d *delivery) *http.Request {
			r := deliveryRequest(d)
			r.Header.Set("Authorization", signToken(mustJSON(d.header), `{"eid": "urn:uuid:`+testEventID+`", "eid": 1}`, d.key))
			r.Body = failingBody{t}
			return r
		}, nil, 403, "malformed_claim", zapcore.WarnLevel},
		{"text_plain_body_unread", func(t *testing.T, d *delivery) *http.Request {
			r := deliveryRequest(d)
			r.Header.Set("Content-Type", "text/plain")
			r.Body = failingBody{t}
			return r
		}, nil, 415, "unsupported_media_type", zapcore.WarnLevel},
		{"two_content_types", func(t *testing.T, d *delivery) *http.Request {
			r := deliveryRequest(d)
			r.Header.Add("Content-Type", "application/json")
			r.Header.Add("Content-Type", "text/plain")
			return r
		}, nil, 415, "unsupported_media_type", zapcore.WarnLevel},
		{"content_length_over_max_body_unread", func(t *testing.T, d *delivery) *http.Request {
			r := deliveryRequest(d)
			r.Body = failingBody{t}
			r.ContentLength = 1 << 20
			return r
		}, func(h *Handler) { h.MaxBody = 1000 }, 413, "body_too_large", zapcore.WarnLevel},
		{"chunked_one_byte_over_max_body", func(t *testing.T, d *delivery) *http.Request {
			r := deliveryRequest(d)
			r.Body = io.NopCloser(strings.NewReader(d.body()))
			r.ContentLength = -1
			return r
		}, func(h *Handler) { h.MaxBody = int64(len(productionDelivery().body())) - 1 }, 413, "body_too_large", zapcore.WarnLevel},
		{"body_read_fails", func(t *testing.T, d *delivery) *http.Request {
			r := deliveryRequest(d)
			r.Body = io.NopCloser(io.MultiReader(strings.NewReader(`{"event_id": `), errReader{}))
			r.ContentLength = -1
			return r
		}, nil, 400, "body_read_failed", zapcore.WarnLevel},
		{"body_limited_by_request_body", func(t *testing.T, d *delivery) *http.Request {
			r := deliveryRequest(d)
			r.Body = http.MaxBytesReader(httptest.NewRecorder(), io.NopCloser(strings.NewReader(d.body())), 10)
			r.ContentLength = -1
			return r
		}, nil, 413, "body_too_large", zapcore.WarnLevel},
		{"duplicate_key", func(t *testing.T, d *delivery) *http.Request {
			r := deliveryRequest(d)
			body := strings.Replace(d.body(), `{`, `{"event_id": "`+testEventID+`", `, 1)
			r.Body, r.ContentLength = io.NopCloser(strings.NewReader(body)), int64(len(body))
			return r
		}, nil, 400, "duplicate_key", zapcore.WarnLevel},
		{"payload_array", func(t *testing.T, d *delivery) *http.Request {
			d.payload = `[]`
			return deliveryRequest(d)
		}, nil, 422, "invalid_payload", zapcore.WarnLevel},
		{"eid_mismatch", func(t *testing.T, d *delivery) *http.Request {
			d.eventID = "11111111-2222-3333-4444-555555555555"
			return deliveryRequest(d)
		}, nil, 403, "eid_mismatch", zapcore.WarnLevel},
		{"event_not_allowed", func(t *testing.T, d *delivery) *http.Request {
			return deliveryRequest(d)
		}, func(h *Handler) { h.Events = []string{"report_deleted"} }, 403, "event_not_allowed", zapcore.WarnLevel},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, logs := newTestHandler(t, tc.change)
			next := &recordingNext{}
			d := productionDelivery()
			status, repl := serve(t, h, next, tc.request(t, d))
			if status != tc.wantStatus {
				t.Errorf("status %d, want %d", status, tc.wantStatus)
			}
			if next.calls != 0 {
				t.Errorf("a refused request reached the next handler")
			}
			if got, _ := repl.GetString("http.trivialsec_webhook.reason"); got != tc.wantReason {
				t.Errorf("reason placeholder %q, want %q", got, tc.wantReason)
			}
			if got, _ := repl.GetString("http.trivialsec_webhook.event_id"); got != "" {
				t.Errorf("event_id placeholder set on refusal: %q", got)
			}
			entries := logs.FilterMessage("refused delivery").All()
			if len(entries) != 1 {
				t.Fatalf("%d refusal log lines", len(entries))
			}
			e := entries[0]
			if e.Level != tc.wantLevel || e.ContextMap()["reason"] != tc.wantReason {
				t.Errorf("logged %s %v", e.Level, e.ContextMap())
			}
			for _, f := range e.Context {
				if s := f.String; strings.Contains(s, testSecret) || strings.Contains(s, d.token()[:20]) {
					t.Errorf("log field %s holds the secret or the token", f.Key)
				}
			}
			if tc.wantLevel == zapcore.WarnLevel && tc.wantReason != "malformed_claim" &&
				e.ContextMap()["event_id"] == nil {
				t.Errorf("a refusal after the signature verified does not name the event: %v", e.ContextMap())
			}
		})
	}
}

// TestRefusalClosesOnlyBeforeTheBody: a refusal made before the body was
// read closes an HTTP/1.x connection, so that net/http answers at once
// instead of draining the body; one after, or over HTTP/2, does not.
func TestRefusalClosesOnlyBeforeTheBody(t *testing.T) {
	for _, tc := range []struct {
		name       string
		forged     bool
		protoMajor int
		want       string
	}{
		{"forged_http1", true, 1, "close"},
		{"forged_http2", true, 2, ""},
		{"after_the_body", false, 1, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, _ := newTestHandler(t, func(h *Handler) { h.Events = []string{"report_deleted"} })
			d := productionDelivery()
			if tc.forged {
				d.key = "a guess"
			}
			r := deliveryRequest(d)
			r.ProtoMajor = tc.protoMajor
			r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer()))
			w := httptest.NewRecorder()
			if err := h.ServeHTTP(w, r, &recordingNext{}); err == nil {
				t.Fatal("accepted")
			}
			if got := w.Header().Get("Connection"); got != tc.want {
				t.Errorf("Connection: %q, want %q", got, tc.want)
			}
		})
	}
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errors.New("connection reset by peer") }

func TestServeHTTPMethodNotAllowedSetsAllow(t *testing.T) {
	h, _ := newTestHandler(t, nil)
	r := deliveryRequest(productionDelivery())
	r.Method = http.MethodPut
	repl := caddy.NewReplacer()
	r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, repl))
	w := httptest.NewRecorder()
	err := h.ServeHTTP(w, r, &recordingNext{})
	var he caddyhttp.HandlerError
	if !errors.As(err, &he) || he.StatusCode != 405 || w.Header().Get("Allow") != "POST" {
		t.Fatalf("err %v, Allow %q", err, w.Header().Get("Allow"))
	}
}

func TestServeHTTPReplay(t *testing.T) {
	t.Run("second_delivery_refused", func(t *testing.T) {
		h, logs := newTestHandler(t, nil)
		next := &recordingNext{}
		d := productionDelivery()
		if status, _ := serve(t, h, next, deliveryRequest(d)); status != 200 {
			t.Fatalf("first: %d", status)
		}
		// A replay with another payload under the same token.
		d.payload = `{"report_id": "forged"}`
		status, repl := serve(t, h, next, deliveryRequest(d))
		if status != http.StatusConflict || next.calls != 1 {
			t.Fatalf("replay: status %d, next called %d times", status, next.calls)
		}
		if got, _ := repl.GetString("http.trivialsec_webhook.reason"); got != "replayed" {
			t.Errorf("reason %q", got)
		}
		if n := logs.FilterLevelExact(zapcore.WarnLevel).FilterField(zap.String("reason", "replayed")).Len(); n != 1 {
			t.Errorf("%d WARN lines for the replay", n)
		}
	})
	t.Run("off_lets_replays_through", func(t *testing.T) {
		h, _ := newTestHandler(t, func(h *Handler) { h.Replay = &Replay{Store: "off"} })
		next := &recordingNext{}
		d := productionDelivery()
		serve(t, h, next, deliveryRequest(d))
		if status, _ := serve(t, h, next, deliveryRequest(d)); status != 200 || next.calls != 2 {
			t.Fatalf("status %d, calls %d", status, next.calls)
		}
	})
	for _, tc := range []struct {
		name        string
		next        *recordingNext
		wantRelease bool
	}{
		{"released_after_next_error", &recordingNext{err: caddyhttp.Error(502, errors.New("upstream down"))}, true},
		{"released_after_503", &recordingNext{status: 503}, true},
		{"kept_after_404", &recordingNext{status: 404}, false},
		{"kept_after_204", &recordingNext{status: 204}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, _ := newTestHandler(t, nil)
			d := productionDelivery()
			serve(t, h, tc.next, deliveryRequest(d))
			next := &recordingNext{}
			status, _ := serve(t, h, next, deliveryRequest(d))
			if released := status == 200; released != tc.wantRelease {
				t.Fatalf("redelivery answered %d; want released=%v", status, tc.wantRelease)
			}
		})
	}
	t.Run("released_after_panic", func(t *testing.T) {
		h, _ := newTestHandler(t, nil)
		d := productionDelivery()
		func() {
			defer func() { _ = recover() }()
			serve(t, h, caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { panic("boom") }), deliveryRequest(d))
		}()
		if status, _ := serve(t, h, &recordingNext{}, deliveryRequest(d)); status != 200 {
			t.Fatalf("redelivery after a panic: %d", status)
		}
	})
	t.Run("store_full_fails_closed", func(t *testing.T) {
		h, logs := newTestHandler(t, func(h *Handler) { h.Replay = &Replay{Store: "memory", MaxEntries: 1} })
		next := &recordingNext{}
		serve(t, h, next, deliveryRequest(productionDelivery()))
		d := productionDelivery().withEventID("22222222-3333-4444-5555-666666666666")
		status, _ := serve(t, h, next, deliveryRequest(d))
		if status != http.StatusServiceUnavailable || next.calls != 1 {
			t.Fatalf("status %d, calls %d", status, next.calls)
		}
		if logs.FilterLevelExact(zapcore.WarnLevel).FilterField(zap.String("reason", "replay_store_full")).Len() != 1 {
			t.Error("no WARN line for the full store")
		}
	})
}

// TestServeHTTPConcurrentDuplicates: of concurrent deliveries of one event,
// exactly one reaches the next handler.
func TestServeHTTPConcurrentDuplicates(t *testing.T) {
	h, _ := newTestHandler(t, nil)
	release := make(chan struct{})
	var calls atomic.Int32
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		calls.Add(1)
		<-release // hold the first one inside the next handler
		w.WriteHeader(http.StatusOK)
		return nil
	})
	d := productionDelivery()
	var wg sync.WaitGroup
	statuses := make(chan int, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, _ := serve(t, h, next, deliveryRequest(d))
			statuses <- status
		}()
	}
	// Seven are refused while the first is held.
	conflicts := 0
	for conflicts < 7 {
		if s := <-statuses; s == http.StatusConflict {
			conflicts++
		} else {
			t.Fatalf("status %d before the first one finished", s)
		}
	}
	close(release)
	wg.Wait()
	if s := <-statuses; s != http.StatusOK || calls.Load() != 1 {
		t.Fatalf("last status %d, next called %d times", s, calls.Load())
	}
}

func TestProvisionSecrets(t *testing.T) {
	dir := t.TempDir()
	secretFile := filepath.Join(dir, "secret")
	if err := os.WriteFile(secretFile, []byte("from-a-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TS_SET", "from-env")
	t.Setenv("TS_EMPTY", "")
	for _, tc := range []struct {
		name     string
		secrets  []string
		wantKeys []string
		wantErr  string
		warns    int
	}{
		{"env", []string{"{env.TS_SET}"}, []string{"from-env"}, "", 0},
		{"file_trailing_newline_trimmed", []string{"{file." + secretFile + "}"}, []string{"from-a-file"}, "", 0},
		{"rotation", []string{"{env.TS_SET}", "{file." + secretFile + "}"}, []string{"from-env", "from-a-file"}, "", 0},
		{"literal_warns", []string{"literal-secret"}, []string{"literal-secret"}, "", 1},
		{"unset_env", []string{"{env.TS_UNSET}"}, nil, "secret 1: evaluated placeholder {env.TS_UNSET} is empty", 0},
		{"empty_env", []string{"{env.TS_SET}", "{env.TS_EMPTY}"}, nil, "secret 2: evaluated placeholder {env.TS_EMPTY} is empty", 0},
		{"missing_file", []string{"{file." + dir + "/nope}"}, nil, "secret 1: evaluated placeholder {file." + dir + "/nope} is empty", 0},
		{"placeholder_not_alone", []string{"{env.TS_SET}-suffix"}, nil, "secret 1: write a placeholder alone", 0},
		{"empty", []string{""}, nil, "secret 1 is empty", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			core, logs := observer.New(zapcore.WarnLevel)
			h := &Handler{Secret: tc.secrets, logger: zap.New(core)}
			keys, err := h.resolveSecrets()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				if strings.Contains(err.Error(), "from-env") || strings.Contains(err.Error(), "from-a-file") {
					t.Fatalf("error shows a secret: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, k := range keys {
				got = append(got, string(k))
			}
			if strings.Join(got, ",") != strings.Join(tc.wantKeys, ",") {
				t.Errorf("keys %q", got)
			}
			if logs.Len() != tc.warns {
				t.Errorf("%d warnings, want %d", logs.Len(), tc.warns)
			}
			for _, e := range logs.All() {
				if strings.Contains(e.Message+fmt.Sprint(e.ContextMap()), "literal-secret") {
					t.Error("the warning shows the secret")
				}
			}
		})
	}
}

func TestProvisionAndValidateErrors(t *testing.T) {
	t.Setenv("TS_SET", "x")
	for _, tc := range []struct {
		name    string
		h       Handler
		wantErr string
	}{
		{"no_account", Handler{Secret: []string{"{env.TS_SET}"}}, "account is required"},
		{"no_secret", Handler{Account: "a"}, "secret is required"},
		{"bad_subject", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, Subject: "nope"}, `subject "nope" is not a UUID`},
		{"unknown_event", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, Events: []string{"report_updated"}}, `unknown event name "report_updated"`},
		{"max_depth_out_of_range", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, MaxDepth: 10001}, "max_depth 10001 is out of range: use 1 to 10000"},
		{"negative_leeway", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, Leeway: durationPtr(-time.Second)}, "leeway must not be negative"},
		{"redis_without_url", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, Replay: &Replay{Store: "redis"}}, "replay store redis needs a url"},
		{"redis_bad_url", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, Replay: &Replay{Store: "redis", URL: "http://u:hunter2@x"}}, "replay redis: the URL does not parse (redis: invalid URL scheme: http)"},
		{"redis_url_unset", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, Replay: &Replay{Store: "redis", URL: "{env.TS_REDIS_UNSET}"}}, "replay redis url: evaluated placeholder {env.TS_REDIS_UNSET} is empty"},
		{"unknown_store", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, Replay: &Replay{Store: "disk"}}, `unknown replay store "disk"`},
		{"spool_unknown_mode", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, Spool: &Spool{Mode: "sometimes"}}, `unknown spool mode "sometimes": use fallback or always`},
		{"spool_unknown_store", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, Spool: &Spool{Store: "disk"}}, `unknown spool store "disk": use file, redis or off`},
		{"spool_redis_without_url", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, Spool: &Spool{Store: "redis"}}, "spool store redis needs a url"},
		{"spool_claim_after_with_file", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, Spool: &Spool{ClaimAfter: caddy.Duration(time.Minute)}}, "spool url, key_prefix and claim_after are for store redis"},
		{"spool_backoff_one_value", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, Spool: &Spool{Backoff: []caddy.Duration{1}}}, "spool backoff takes two positive durations"},
		{"spool_backoff_reversed", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, Spool: &Spool{Backoff: []caddy.Duration{2e9, 1e9}}}, "spool backoff takes two positive durations"},
		{"spool_negative_max_age", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, Spool: &Spool{MaxAge: -1}}, "spool max_age must be positive"},
		{"spool_outside_a_server", Handler{Account: "a", Secret: []string{"{env.TS_SET}"}, Spool: &Spool{}}, "spool: the handler is not in the routes of an HTTP server"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
			defer cancel()
			h := tc.h
			if h.Spool == nil {
				h.Spool = &Spool{Store: "off"}
			}
			err := h.Provision(ctx)
			if err == nil {
				err = h.Validate()
				_ = h.Cleanup()
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want %q", err, tc.wantErr)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Fatalf("the error shows a password: %v", err)
			}
		})
	}
}

func durationPtr(d time.Duration) *caddy.Duration {
	cd := caddy.Duration(d)
	return &cd
}

// TestReadBody reads bodies around the sizes where the buffer grows, with
// and without a Content-Length, byte for byte.
func TestReadBody(t *testing.T) {
	const limit = 3 << 20
	for _, size := range []int{0, 1, firstBodyBuffer - 1, firstBodyBuffer, firstBodyBuffer + 1, 1<<20 + 3, limit} {
		body := strings.Repeat("x", size)
		for _, known := range []bool{true, false} {
			r := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(body))
			if !known {
				r.Body, r.ContentLength = io.NopCloser(iotest.HalfReader(strings.NewReader(body))), -1
			}
			got, reason := readBody(r, limit)
			if reason != reasonNone || string(got) != body {
				t.Errorf("size %d, length known %v: %d bytes, %q", size, known, len(got), reason)
			}
		}
	}
	r := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(strings.Repeat("x", limit+1)))
	r.ContentLength = -1
	if _, reason := readBody(r, limit); reason != reasonBodyTooLarge {
		t.Errorf("one byte over the limit, no length: %q", reason)
	}
}

// TestReadBodyAllocatesWithTheData: a Content-Length of 10 MiB followed by a
// few bytes makes readBody allocate for what arrived, not for 10 MiB.
func TestReadBodyAllocatesWithTheData(t *testing.T) {
	r := httptest.NewRequest(http.MethodPost, "/", nil)
	r.Body = io.NopCloser(io.MultiReader(strings.NewReader(`{"event_id": `), errReader{}))
	r.ContentLength = 10 << 20
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	if _, reason := readBody(r, defaultMaxBody); reason != reasonBodyReadFailed {
		t.Fatalf("reason %q", reason)
	}
	runtime.ReadMemStats(&after)
	if allocated := after.TotalAlloc - before.TotalAlloc; allocated > 1<<20 {
		t.Fatalf("allocated %d bytes for a 13-byte body", allocated)
	}
}
