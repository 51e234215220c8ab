package e2e

// docs/deploying.md and the unit files of dist/systemd: every code block of
// the page is run or checked against the files it installs, and the units
// are checked by systemd-analyze where it exists, as INI everywhere.

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
)

const deployingPage = "docs/deploying.md"

// unit is a systemd unit file: section, then key, then values in order.
type unit map[string]map[string][]string

// readUnit parses a unit file as systemd does for the subset it uses:
// comments, [Section] lines, Key=Value lines.
func readUnit(t *testing.T, path string) unit {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := unit{}
	section := ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			if u[section] == nil {
				u[section] = map[string][]string{}
			}
		default:
			key, value, ok := strings.Cut(line, "=")
			if !ok || section == "" || strings.TrimSpace(key) == "" {
				t.Fatalf("%s:%d: not a Key=Value line in a section: %q", path, n, line)
			}
			u[section][strings.TrimSpace(key)] = append(u[section][strings.TrimSpace(key)], strings.TrimSpace(value))
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return u
}

func (u unit) get(section, key string) string {
	v := u[section][key]
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

// TestDistUnits: the unit files say what the recipe needs, and agree with
// the Caddyfile and the install steps; systemd-analyze verify accepts
// them where it exists.
func TestDistUnits(t *testing.T) {
	dir := filepath.Join(testkit.Root(), "dist", "systemd")
	socket := readUnit(t, filepath.Join(dir, "caddy.socket"))
	service := readUnit(t, filepath.Join(dir, "caddy.service"))

	// The sockets, in the order systemd passes them: fd 3, fd 4.
	if got := socket["Socket"]["ListenStream"]; strings.Join(got, " ") != "80 443" {
		t.Errorf("caddy.socket: ListenStream %q, want 80 (fd 3) then 443 (fd 4)", got)
	}
	if got := socket.get("Socket", "Service"); got != "caddy.service" {
		t.Errorf("caddy.socket: Service=%q", got)
	}
	if socket.get("Install", "WantedBy") != "sockets.target" {
		t.Errorf("caddy.socket: WantedBy=%q, want sockets.target", socket.get("Install", "WantedBy"))
	}
	caddyfile, err := os.ReadFile(filepath.Join(dir, "Caddyfile"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"http://webhooks.example.com {\n\tbind fd/3\n", "https://webhooks.example.com {\n\tbind fd/4\n"} {
		if !strings.Contains(string(caddyfile), want) {
			t.Errorf("the Caddyfile does not bind %q as caddy.socket passes it", want)
		}
	}
	// The handover wrapper on every server (`servers` without an address),
	// before Caddy's tls wrapper.
	if !strings.Contains(string(caddyfile), "\tservers {\n") || !strings.Contains(string(caddyfile), handoverBlock) {
		t.Errorf("the Caddyfile's `servers` options have no listener_wrappers block %q", handoverBlock)
	}
	// The admin endpoint on a normal address: systemctl reload reaches it.
	if m := regexp.MustCompile(`(?m)^\tadmin (\S+)$`).FindStringSubmatch(string(caddyfile)); m == nil || strings.Contains(m[1], "/") {
		t.Errorf("the Caddyfile's admin endpoint is not on a network address: %v", m)
	}

	for key, want := range map[string]string{
		"Type": "notify", "User": "caddy", "Group": "caddy",
		"ExecStart":      "/usr/bin/caddy run --config /etc/caddy/Caddyfile",
		"ExecReload":     "/usr/bin/caddy reload --config /etc/caddy/Caddyfile --force",
		"ReadWritePaths": "/var/lib/caddy",
		"ProtectSystem":  "strict",
		"Restart":        "on-failure",
	} {
		if got := service.get("Service", key); got != want {
			t.Errorf("caddy.service: %s=%q, want %q", key, got, want)
		}
	}
	for _, key := range []string{"Requires", "After"} {
		if !strings.Contains(strings.Join(service["Unit"][key], " "), "caddy.socket") {
			t.Errorf("caddy.service: %s= does not name caddy.socket", key)
		}
	}
	if strings.Contains(service.get("Service", "ExecStart"), "--environ") {
		t.Errorf("caddy.service: --environ prints the environment, and a secret in it, to the journal")
	}
	// A stop takes shutdown_delay, then at most grace_period for the
	// requests in flight, then at most grace_period again for the spool's
	// re-drives: systemd must not kill Caddy first. The connections that
	// arrive meanwhile wait in the queue for all of it and the next start,
	// and the sender gives up after 30 s: the stop must leave room for the
	// start.
	delay, grace := stopOptions(t, string(caddyfile))
	if delay <= 0 || grace <= 0 {
		t.Errorf("the Caddyfile sets shutdown_delay %s and grace_period %s: want both", delay, grace)
	}
	stop, err := time.ParseDuration(service.get("Service", "TimeoutStopSec"))
	if err != nil || stop <= delay+2*grace {
		t.Errorf("caddy.service: TimeoutStopSec=%q, want more than shutdown_delay + 2 × grace_period (%s)", service.get("Service", "TimeoutStopSec"), delay+2*grace)
	}
	if delay+2*grace > 25*time.Second {
		t.Errorf("shutdown_delay + 2 × grace_period is %s: the connections waiting in the queue would outwait the sender (30 s)", delay+2*grace)
	}
	if service.get("Install", "WantedBy") != "multi-user.target" {
		t.Errorf("caddy.service: WantedBy=%q", service.get("Install", "WantedBy"))
	}

	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Logf("systemd-analyze is not on the PATH: the units were checked as INI only")
		return
	}
	// verify wants the programs the unit runs to exist: the copies run the
	// binary TestMain built in place of /usr/bin/caddy, and nothing else
	// changes.
	tmp := t.TempDir()
	for _, name := range []string{"caddy.socket", "caddy.service"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(tmp, name), []byte(strings.ReplaceAll(string(b), "/usr/bin/caddy", caddyBin)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out, err := exec.Command(analyze, "verify", "--man=no", filepath.Join(tmp, "caddy.socket"), filepath.Join(tmp, "caddy.service")).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "" {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// TestDeployingInstall: the install steps of docs/deploying.md are valid
// shell and install what the units and the Caddyfile expect where they
// expect it, and the Caddyfile they install validates. (They need root and
// systemd: the test reads them rather than runs them.)
func TestDeployingInstall(t *testing.T) {
	script := testkit.Example(t, deployingPage, "deploy-install")
	if out, err := exec.Command("bash", "-n", "-c", script).CombinedOutput(); err != nil {
		t.Fatalf("bash -n: %v\n%s", err, out)
	}
	for _, m := range regexp.MustCompile(`dist/systemd/\S+`).FindAllString(script, -1) {
		if _, err := os.Stat(filepath.Join(testkit.Root(), m)); err != nil {
			t.Errorf("the install steps use %s: %v", m, err)
		}
	}
	for _, want := range []string{
		"--home-dir /var/lib/caddy",                   // ReadWritePaths, and the spool under it
		"dist/systemd/Caddyfile /etc/caddy/Caddyfile", // ExecStart's --config
		"/etc/caddy/trivialsec-webhook.secret",        // the Caddyfile's secret
		"dist/systemd/caddy.socket",
		"dist/systemd/caddy.service",
		"/etc/systemd/system/",
		"systemctl daemon-reload",
		"systemctl enable --now caddy.socket caddy.service",
		"caddy validate --config /etc/caddy/Caddyfile",
	} {
		if !strings.Contains(script, want) {
			t.Errorf("the install steps do not say %q", want)
		}
	}
	// The validate step, on the shipped Caddyfile.
	dir := t.TempDir()
	secretFile := filepath.Join(dir, "secret")
	if err := os.WriteFile(secretFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(config, []byte(distCaddyfile(t, freePort(t), secretFile, "127.0.0.1:9000")), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, _, errOut := run(t, nil, "validate", "--config", config); code != 0 {
		t.Fatalf("caddy validate exited %d:\n%s", code, logMessages(errOut))
	}
}

// stopOptions are the shutdown_delay and grace_period global options of a
// Caddyfile (0 for one it does not set).
func stopOptions(t *testing.T, caddyfile string) (delay, grace time.Duration) {
	t.Helper()
	for _, line := range strings.Split(caddyfile, "\n") {
		f := strings.Fields(line)
		if len(f) != 2 || (f[0] != "shutdown_delay" && f[0] != "grace_period") {
			continue
		}
		d, err := time.ParseDuration(f[1])
		if err != nil {
			t.Fatalf("%q: %v", line, err)
		}
		if f[0] == "shutdown_delay" {
			delay = d
		} else {
			grace = d
		}
	}
	return delay, grace
}

// TestDeployingHandoverOptions: the global options docs/deploying.md shows
// are those of dist/systemd/Caddyfile, line for line but its comments and
// blank lines, so that the page shows what the tests run.
func TestDeployingHandoverOptions(t *testing.T) {
	shown := testkit.Example(t, deployingPage, "deploy-handover")
	raw, err := os.ReadFile(filepath.Join(testkit.Root(), "dist", "systemd", "Caddyfile"))
	if err != nil {
		t.Fatal(err)
	}
	lines := func(text string) []string {
		var out []string
		for _, line := range strings.Split(text, "\n") {
			if trimmed := strings.TrimSpace(line); trimmed != "" && !strings.HasPrefix(trimmed, "#") {
				out = append(out, line)
			}
		}
		return out
	}
	// The global options block: from the first line "{" to the first "}".
	file := lines(string(raw))
	start, end := slices.Index(file, "{"), slices.Index(file, "}")
	if start < 0 || end < start {
		t.Fatalf("dist/systemd/Caddyfile has no global options block")
	}
	if got, want := strings.Join(lines(shown), "\n"), strings.Join(file[start:end+1], "\n"); got != want {
		t.Errorf("%s (deploy-handover) shows\n%s\nbut dist/systemd/Caddyfile's global options are\n%s", deployingPage, got, want)
	}
}

// caddyBlockBody is the inside of a `{ ... }` block of a Caddyfile example.
func caddyBlockBody(t *testing.T, block string) string {
	t.Helper()
	s := strings.TrimSpace(block)
	if !strings.HasPrefix(s, "{") || !strings.HasSuffix(s, "}") {
		t.Fatalf("not a global options block:\n%s", block)
	}
	return strings.Trim(strings.TrimSuffix(strings.TrimPrefix(s, "{"), "}"), "\n")
}

// TestDeployingLoadBalancer: the changes docs/deploying.md makes to the
// recipe for an instance behind a load balancer: no handover wrapper, and
// its own shutdown_delay and grace_period. Once Caddy is told to stop, the
// health check answers 503 and says how long is left, while deliveries
// are still answered; a new Caddy's health check answers 200. The
// drop-in's TimeoutStopSec leaves room for shutdown_delay and twice
// grace_period (the servers', then the spool's).
func TestDeployingLoadBalancer(t *testing.T) {
	options := caddyBlockBody(t, testkit.Example(t, deployingPage, "deploy-lb-options"))
	health := testkit.Example(t, deployingPage, "deploy-lb-health")
	delay, grace := stopOptions(t, options)
	if delay == 0 || grace <= 20*time.Second {
		t.Fatalf("the options set shutdown_delay %s and grace_period %s: want a delay, and a grace period longer than attempt_timeout (20s)", delay, grace)
	}
	dropIn := testkit.Example(t, deployingPage, "deploy-lb-timeout")
	m := regexp.MustCompile(`(?m)^TimeoutStopSec=(\S+)$`).FindStringSubmatch(dropIn)
	if m == nil || !strings.HasPrefix(strings.TrimSpace(dropIn), "[Service]") {
		t.Fatalf("the drop-in sets no TimeoutStopSec in [Service]:\n%s", dropIn)
	}
	if stop, err := time.ParseDuration(m[1]); err != nil || stop <= delay+2*grace {
		t.Errorf("the drop-in's TimeoutStopSec=%s does not leave shutdown_delay (%s) + 2 × grace_period (%s)", m[1], delay, grace)
	}

	up, err := testkit.StartUpstream()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(up.Close)
	healthPort := freePort(t)
	if !strings.Contains(health, "http://:8081 {") {
		t.Fatalf("the health check site is not http://:8081:\n%s", health)
	}
	// The health check on loopback, on a free port.
	health = strings.Replace(health, "http://:8081 {", fmt.Sprintf("http://127.0.0.1:%d {", healthPort), 1)
	d := newDeployment(t, true, up.Addr, func(caddyfile string) string {
		caddyfile = withoutHandover(t)(caddyfile)
		// The page's options in place of the recipe's.
		for _, line := range strings.Split(caddyfile, "\n") {
			if f := strings.Fields(line); len(f) == 2 && (f[0] == "shutdown_delay" || f[0] == "grace_period") {
				caddyfile = strings.Replace(caddyfile, line+"\n", "", 1)
			}
		}
		if d, g := stopOptions(t, caddyfile); d != 0 || g != 0 {
			t.Fatalf("the recipe's shutdown_delay and grace_period are still there")
		}
		caddyfile = strings.Replace(caddyfile, "\tskip_install_trust\n", "\tskip_install_trust\n"+options+"\n", 1)
		return caddyfile + "\n" + health
	})
	d.start(caddyBin)
	healthURL := fmt.Sprintf("http://127.0.0.1:%d/", healthPort)
	check := func() (int, string) {
		resp, err := sender.Get(healthURL)
		if err != nil {
			t.Fatalf("health check: %v", err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	if status, body := check(); status != http.StatusOK {
		t.Fatalf("health check of a running Caddy: %d %q, want 200", status, body)
	}
	_ = d.proc.cmd.Process.Signal(syscall.SIGTERM)
	deadline := time.Now().Add(5 * time.Second)
	for {
		status, body := check()
		if status == http.StatusServiceUnavailable {
			if !strings.HasPrefix(body, "stopping in ") {
				t.Errorf("health check while stopping: %q", body)
			}
			t.Logf("health check after SIGTERM: %d %q", status, body)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("health check 5 s after SIGTERM: %d %q, want 503", status, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The delay is for the load balancer to notice: Caddy still serves.
	for range 20 {
		auth, body := mint(secret, restartAccount, uuid.NewString(), time.Now())
		if status, stage, err := deliver(d.client, d.url(), auth, body); err != nil || status != 200 {
			t.Fatalf("a delivery during shutdown_delay: %d %s %v", status, stage, err)
		}
	}
	if !strings.Contains(d.logTail(1<<20), `"msg":"shutdown scheduled"`) {
		t.Errorf("Caddy did not log the scheduled shutdown")
	}
	// Not worth the wait of the whole delay here: a new Caddy is healthy.
	d.kill()
	d.start(caddyBin)
	if status, body := check(); status != http.StatusOK {
		t.Errorf("health check of the new Caddy: %d %q, want 200", status, body)
	}
	d.kill() // a stop would wait out shutdown_delay
}
