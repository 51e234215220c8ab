// Package e2e tests Caddy with the module the way users run it: a binary
// built by xcaddy, configured from a Caddyfile, driven over loopback by
// `caddy trivialsec-webhook send` and by a plain HTTP client.
package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
)

const (
	modulePath    = "github.com/trivialsec/caddy-trivialsec-webhook"
	xcaddyVersion = "v0.4.5"
	caddyVersion  = "v2.11.9"
)

// caddyBin is the binary TestMain builds.
var caddyBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "trivialsec-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	caddyBin = filepath.Join(dir, "caddy")
	if err := buildCaddy(caddyBin); err != nil {
		// Never skip: a suite that cannot build what users build fails.
		fmt.Fprintln(os.Stderr, "e2e: building caddy with xcaddy failed:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// buildCaddy builds Caddy with this module as users do:
// xcaddy build --with <module path>=<this checkout>.
func buildCaddy(out string) error {
	repo, err := filepath.Abs("..")
	if err != nil {
		return err
	}
	// A module proxy that answers 403 for a path it does not serve (this
	// module's own) stops `go get`; "|off" makes Go take the answer as "not
	// there", and changes nothing where the proxy answers 404.
	proxy, err := exec.Command("go", "env", "GOPROXY").Output()
	if err != nil {
		return err
	}
	first := strings.SplitN(strings.TrimSpace(string(proxy)), ",", 2)[0]
	cmd := exec.Command("go", "run", "github.com/caddyserver/xcaddy/cmd/xcaddy@"+xcaddyVersion,
		"build", caddyVersion, "--with", modulePath+"="+repo, "--output", out)
	cmd.Env = append(os.Environ(), "GOPROXY="+first+"|off")
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	go func() {
		<-ctx.Done()
		if cmd.Process != nil {
			_ = cmd.Process.Kill()
		}
	}()
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%v\n%s", err, log.String())
	}
	return nil
}

// run runs the binary to completion and returns its exit code and output.
func run(t *testing.T, env []string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(caddyBin, args...)
	cmd.Env = append(cleanEnv(), env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("caddy %s did not finish", strings.Join(args, " "))
	}
	return cmd.ProcessState.ExitCode(), out.String(), errOut.String()
}

// cleanEnv is the environment without the variables the tests set.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "TRIVIALSEC_") {
			env = append(env, kv)
		}
	}
	return append(env, "HOME="+os.TempDir(), "XDG_DATA_HOME="+filepath.Join(os.TempDir(), "trivialsec-e2e-data"),
		"XDG_CONFIG_HOME="+filepath.Join(os.TempDir(), "trivialsec-e2e-config"))
}

func freePort(t *testing.T) int {
	t.Helper()
	port, err := testkit.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// server is a running `caddy run`.
type server struct {
	*testkit.Caddy
	log    *bytes.Buffer
	logMu  *sync.Mutex
	config string
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// startServer writes the Caddyfile and runs Caddy on it until the test ends.
// It waits until Caddy answers on port, and fails the test if it does not.
// Caddy's data directory, where the spool is by default, is the test's own
// unless env sets XDG_DATA_HOME.
func startServer(t *testing.T, caddyfile string, port int, env []string) *server {
	t.Helper()
	dir := t.TempDir()
	config := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(config, []byte(caddyfile), 0o600); err != nil {
		t.Fatal(err)
	}
	s := &server{log: new(bytes.Buffer), logMu: new(sync.Mutex), config: config}
	env = append(append(cleanEnv(), "XDG_DATA_HOME="+filepath.Join(dir, "data")), env...)
	caddy, err := testkit.StartCaddy(caddyBin, config, env, lockedWriter{s.logMu, s.log}, fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatalf("%v\n%s", err, s.logs())
	}
	s.Caddy = caddy
	t.Cleanup(func() {
		caddy.Stop()
		if t.Failed() {
			t.Logf("caddy's log:\n%s", s.logs())
		}
	})
	return s
}

func (s *server) logs() string {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	return s.log.String()
}

// upstream is the customer's service: it keeps what it receives.
type upstream struct {
	*httptest.Server
	mu     sync.Mutex
	bodies []string
	delay  time.Duration
}

func startUpstream(t *testing.T, delay time.Duration) *upstream {
	u := &upstream{delay: delay}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if r.ContentLength != int64(len(body)) {
			t.Errorf("upstream: Content-Length %d for %d bytes", r.ContentLength, len(body))
		}
		time.Sleep(u.delay)
		u.mu.Lock()
		u.bodies = append(u.bodies, string(body))
		u.mu.Unlock()
		w.WriteHeader(http.StatusAccepted)
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *upstream) received() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]string(nil), u.bodies...)
}

// mint signs a genuine production-style delivery for account, with code
// independent of the module's.
func mint(secret, account, eventID string, now time.Time) (authorization, body string) {
	return testkit.Mint(secret, account, eventID, eventID, now)
}

// sender is a plain HTTP client that, like the production sender's one-shot
// requests.post, opens a connection per delivery. (A client that reuses an
// idle keep-alive connection can see it reset when a reload closes it; Go
// retries only idempotent requests on such a connection, never a POST.)
var sender = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 30 * time.Second}

// post sends a delivery with a plain HTTP client and returns the status.
func post(t *testing.T, url, authorization, body string) int {
	t.Helper()
	status, err := postStatus(url, authorization, body)
	if err != nil {
		t.Error(err)
	}
	return status
}

func postStatus(url, authorization, body string) (int, error) {
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		return 0, err
	}
	if authorization != "" {
		req.Header.Set("Authorization", authorization)
	}
	resp, err := sender.Do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}
