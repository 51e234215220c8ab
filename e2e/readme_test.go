package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
)

// The README's and the docs' shell examples, run as a user runs them: in
// sh, with the binary TestMain built in place of `go run ./cmd/caddy` and
// of `caddy` on the PATH, and loopback ports in place of :8080 and :2019.
// A line `# ...` after a command is what the command must print.

// shellStep is one command of an example, and what it must print.
type shellStep struct {
	command string
	want    []string
}

// shellSteps splits an example into its commands (a line ending in `\`
// goes on) and the `# ` lines after each, what it prints.
func shellSteps(example string) []shellStep {
	var steps []shellStep
	var cur string
	for _, line := range strings.Split(strings.TrimSuffix(example, "\n"), "\n") {
		switch {
		case strings.HasPrefix(line, "# ") && cur == "" && len(steps) > 0:
			steps[len(steps)-1].want = append(steps[len(steps)-1].want, strings.TrimPrefix(line, "# "))
		case strings.HasSuffix(line, "\\"):
			cur += strings.TrimSuffix(line, "\\") + " "
		default:
			steps = append(steps, shellStep{command: cur + line})
			cur = ""
		}
	}
	return steps
}

// shell runs a command in sh, in dir, with caddy on the PATH; it returns
// the exit status and stdout.
func shell(t *testing.T, dir, command string, env ...string) (int, string) {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(caddyBin, filepath.Join(bin, "caddy")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "sh", "-c", command)
	cmd.Dir = dir
	cmd.Env = append(cleanEnv(), append(env, "PATH="+bin+string(os.PathListSeparator)+os.Getenv("PATH"))...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	if _, exited := err.(*exec.ExitError); err != nil && !exited {
		t.Fatalf("%s: %v", command, err)
	}
	if errOut.Len() > 0 {
		t.Logf("%s\nstderr: %s", command, errOut.String())
	}
	return cmd.ProcessState.ExitCode(), out.String()
}

// checkPrints compares what a step printed with the lines the example
// shows; a shown line ending in " ..." is a prefix.
func checkPrints(t *testing.T, step shellStep, got string) {
	t.Helper()
	var lines []string
	if got != "" {
		lines = strings.Split(strings.TrimSuffix(got, "\n"), "\n")
	}
	if len(lines) != len(step.want) {
		t.Errorf("%s\nprinted %q, the example shows %q", step.command, got, step.want)
		return
	}
	for i, want := range step.want {
		if p, ok := strings.CutSuffix(want, " ..."); ok && strings.HasPrefix(lines[i], p+" ") || lines[i] == want {
			continue
		}
		t.Errorf("%s\nprinted %q, the example shows %q", step.command, lines[i], want)
	}
}

// quickStartServer runs the README's first command from a copy of the
// repository's example.Caddyfile on a loopback port, and returns the URL
// that stands for http://localhost:8080.
func quickStartServer(t *testing.T) string {
	t.Helper()
	runLine := strings.TrimSpace(testkit.Example(t, "README.md", "quickstart-run"))
	if !strings.Contains(runLine, "go run ./cmd/caddy run --config example.Caddyfile") {
		t.Fatalf("the quick start's run command is %q", runLine)
	}
	example, err := os.ReadFile(filepath.Join(testkit.Root(), "example.Caddyfile"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(string(example), "\n:8080 {\n") != 1 {
		t.Fatal("example.Caddyfile no longer serves :8080")
	}
	port := freePort(t)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "example.Caddyfile"),
		bytes.Replace(example, []byte("\n:8080 {\n"), fmt.Appendf(nil, "\nhttp://127.0.0.1:%d {\n", port), 1), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", "-c", strings.Replace(runLine, "go run ./cmd/caddy", caddyBin, 1))
	cmd.Dir = dir
	cmd.Env = append(cleanEnv(), "XDG_DATA_HOME="+filepath.Join(dir, "data"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("caddy's log:\n%s", log.String())
		}
	})
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the quick start's Caddy does not listen on %s", addr)
		}
	}
	return "http://" + addr
}

// TestReadmeQuickStart runs the quick start: Caddy on example.Caddyfile,
// then a delivery, its replay and a forgery, each printing what the README
// shows, and exiting 0 only when accepted.
func TestReadmeQuickStart(t *testing.T) {
	base := quickStartServer(t)
	var exports []string
	steps := shellSteps(testkit.Example(t, "README.md", "quickstart-send"))
	for _, step := range steps {
		command := strings.ReplaceAll(step.command, "go run ./cmd/caddy", caddyBin)
		command = strings.ReplaceAll(command, "http://localhost:8080", base)
		if strings.HasPrefix(command, "export ") {
			exports = append(exports, command)
			continue
		}
		code, out := shell(t, t.TempDir(), strings.Join(append(exports, command), "\n"))
		checkPrints(t, step, out)
		if want := len(step.want) > 0 && strings.Contains(step.want[0], " 2"); (code == 0) != want {
			t.Errorf("%s: exit status %d", step.command, code)
		}
	}
	if len(steps) != 4 {
		t.Errorf("the quick start has %d steps, want an export and three sends", len(steps))
	}
}

// TestReadmeSignWithCurl runs the README's sign-and-curl example against the
// quick start's Caddy.
func TestReadmeSignWithCurl(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatal("curl is not installed: the README's curl example cannot run (apt-get install curl)")
	}
	base := quickStartServer(t)
	dir := t.TempDir()
	for _, step := range shellSteps(testkit.Example(t, "README.md", "sign-curl")) {
		code, out := shell(t, dir, strings.ReplaceAll(step.command, "http://localhost:8080", base), "TRIVIALSEC_WEBHOOK_SECRET=<your signing secret>")
		if code != 0 {
			t.Errorf("%s: exit status %d", step.command, code)
		}
		checkPrints(t, step, out)
	}
}

// TestReadmeBuilding: the README's build command is the one TestMain runs
// (xcaddy build --with the module; TestMain pins xcaddy and Caddy, the
// README takes the latest), the xcaddy it installs runs, the binary lists
// the modules the README shows, and the Dockerfile holds the same build on
// the Caddy version this module is tested with. (No image registry is
// reachable here: the Dockerfile itself is not built.)
func TestReadmeBuilding(t *testing.T) {
	steps := shellSteps(testkit.Example(t, "README.md", "build-xcaddy"))
	if len(steps) != 3 {
		t.Fatalf("the build example has %d steps, want 3", len(steps))
	}
	if want := "xcaddy build --with " + modulePath; steps[1].command != want {
		t.Errorf("the README builds with %q; TestMain builds with %q (and =<this checkout>)", steps[1].command, want)
	}
	gobin := t.TempDir()
	if code, _ := shell(t, t.TempDir(), steps[0].command, "GOBIN="+gobin); code != 0 {
		t.Errorf("%s: exit status %d", steps[0].command, code)
	} else if out, err := exec.Command(filepath.Join(gobin, "xcaddy"), "version").CombinedOutput(); err != nil {
		t.Errorf("the xcaddy the README installs does not run: %v\n%s", err, out)
	}
	code, out := shell(t, t.TempDir(), strings.Replace(steps[2].command, "./caddy", "caddy", 1))
	if code != 0 {
		t.Errorf("%s: exit status %d", steps[2].command, code)
	}
	checkPrints(t, steps[2], out)

	dockerfile := testkit.Example(t, "README.md", "build-dockerfile")
	version := strings.TrimPrefix(caddyVersion, "v")
	for _, want := range []string{"FROM caddy:" + version + "-builder AS builder\n", "RUN " + steps[1].command + "\n", "FROM caddy:" + version + "\n",
		"COPY --from=builder /usr/bin/caddy /usr/bin/caddy\n"} {
		if !strings.Contains(dockerfile, want) {
			t.Errorf("the Dockerfile has no line %q", strings.TrimSpace(want))
		}
	}
}

// TestReadmeTestCommand: the README's test command is the one CI runs.
func TestReadmeTestCommand(t *testing.T) {
	command := strings.TrimSpace(testkit.Example(t, "README.md", "test-suite"))
	ci, err := os.ReadFile(filepath.Join(testkit.Root(), ".ci", "run"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(ci), "\n"+command+"\n") {
		t.Errorf(".ci/run does not run the README's test command %q", command)
	}
}

// TestSpoolAdminExample runs the spool page's admin API example against a
// Caddy whose service is down: the listing shows both spooled deliveries,
// a retry keeps one, and a delete drops the other.
func TestSpoolAdminExample(t *testing.T) {
	rx := startSpooling(t, testkit.ClosedAddr(t)) // nothing listens there
	ids := rx.spool(t, 2)
	steps := shellSteps(testkit.Example(t, "docs/spool.md", "spool-admin"))
	if len(steps) != 3 {
		t.Fatalf("the admin example has %d commands, want 3", len(steps))
	}
	admin := rx.admin
	type entry struct {
		State    string `json:"state"`
		Attempts int    `json:"attempts"`
	}
	listing := func() map[string]entry {
		_, out := shell(t, t.TempDir(), strings.ReplaceAll(steps[0].command, "localhost:2019", admin))
		var page struct {
			Entries []struct {
				EventID string `json:"event_id"`
				entry
			}
		}
		if err := json.Unmarshal([]byte(out), &page); err != nil {
			t.Fatalf("the listing %q: %v", out, err)
		}
		states := map[string]entry{}
		for _, e := range page.Entries {
			states[e.EventID] = e.entry
		}
		return states
	}
	before := listing()
	if len(before) != 2 || before[ids[0]].State != "pending" || before[ids[1]].State != "pending" {
		t.Fatalf("listing %v, want both pending", before)
	}
	for i, step := range steps[1:] {
		command := strings.ReplaceAll(strings.ReplaceAll(step.command, "localhost:2019", admin), "<event_id>", ids[i])
		if code, out := shell(t, t.TempDir(), command); code != 0 {
			t.Errorf("%s: exit status %d, %q", command, code, out)
		}
	}
	// The retry is an attempt at once (the backoff would wait an hour),
	// which fails: the service is still down.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		got := listing()
		if len(got) == 1 && got[ids[0]].State == "pending" && got[ids[0]].Attempts > before[ids[0]].Attempts {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("listing %v, want only %s, retried (more than %d attempts) and pending again", got, ids[0], before[ids[0]].Attempts)
		}
	}
}

// TestBacklogExamples runs the README's and the backlog page's `spool`
// commands, as they are written but for the admin address, against a
// Caddy whose service is down: three client_activity deliveries (one made
// a dead letter by a 422) and two report_created ones.
func TestBacklogExamples(t *testing.T) {
	up, err := testkit.StartUpstream()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(up.Close)
	up.Answer(func(http.Header, *http.Request) int { return http.StatusServiceUnavailable })
	env := []string{"TRIVIALSEC_WEBHOOK_SECRET=" + secret}
	rx := startSpooling(t, up.Addr)
	url, admin := rx.url, rx.admin
	// spool runs one of the examples' commands, asking the test's Caddy:
	// 0 and its stdout, or the test fails.
	withAddress := regexp.MustCompile(`(caddy trivialsec-webhook spool \w+)`)
	dir := t.TempDir()
	spool := func(command string) string {
		t.Helper()
		command = withAddress.ReplaceAllString(command, "$1 --address "+admin)
		code, out := shell(t, dir, command)
		if code != 0 {
			t.Fatalf("%s: exit status %d, stdout %q", command, code, out)
		}
		return out
	}
	activity := rx.spool(t, 3)
	for range 2 {
		if code, out, errOut := run(t, env, "trivialsec-webhook", "send", "--url", url, "--account", "acme", "--event", "report_created"); code != 0 {
			t.Fatalf("send: exit %d, %q %q", code, out, errOut)
		}
	}
	// One dead letter: retried, the service refuses it.
	up.Answer(func(http.Header, *http.Request) int { return http.StatusUnprocessableEntity })
	spool("caddy trivialsec-webhook spool retry " + activity[0])
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(spool("caddy trivialsec-webhook spool list --state dead"), activity[0]) {
		if time.Now().After(deadline) {
			t.Fatal("no dead letter after 15 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	up.Answer(func(http.Header, *http.Request) int { return http.StatusServiceUnavailable })

	// The backlog page: the summary, three listings, three bulk actions.
	summary := spool(testkit.Example(t, "docs/backlog.md", "backlog-summary"))
	for _, want := range []string{`(?m)^pending +4 `, `(?m)^dead +1 `, `(?m)^client_activity +2 +0 +1$`, `(?m)^report_created +2 +0 +0$`} {
		if !regexp.MustCompile(want).MatchString(summary) {
			t.Errorf("summary: no %s in:\n%s", want, summary)
		}
	}
	lists := shellSteps(testkit.Example(t, "docs/backlog.md", "backlog-list"))
	if len(lists) != 3 {
		t.Fatalf("backlog-list has %d commands, want 3", len(lists))
	}
	if out := spool(lists[0].command); !regexp.MustCompile(`(?m)^`+activity[0]+` +client_activity +acme +dead +2 .* 422 Unprocessable Entity$`).MatchString(out) || !strings.HasSuffix(out, "\n1 entry\n") {
		t.Errorf("%s:\n%s", lists[0].command, out)
	}
	if out := spool(lists[1].command); strings.Count(out, " report_created ") != 2 || !strings.HasSuffix(out, "\n2 entries\n") {
		t.Errorf("%s:\n%s", lists[1].command, out)
	}
	spool(lists[2].command)
	raw, err := os.ReadFile(filepath.Join(dir, "backlog.json"))
	var page struct {
		Total   int               `json:"total"`
		Entries []json.RawMessage `json:"entries"`
	}
	if err != nil || json.Unmarshal(raw, &page) != nil || page.Total != 5 || len(page.Entries) != 5 {
		t.Errorf("%s wrote %q (%v)", lists[2].command, raw, err)
	}
	bulk := shellSteps(testkit.Example(t, "docs/backlog.md", "backlog-bulk"))
	if len(bulk) != 3 {
		t.Fatalf("backlog-bulk has %d commands, want 3", len(bulk))
	}
	if out := spool(bulk[0].command); out != "retried 1 of 1 (0 gone, 0 refused)\n" {
		t.Errorf("%s: %q", bulk[0].command, out)
	}
	if out := spool(bulk[1].command); out != "deleted 0 of 0 (0 gone, 0 refused)\n" { // none is a day old
		t.Errorf("%s: %q", bulk[1].command, out)
	}
	one := regexp.MustCompile(`[0-9a-f-]{36}`).ReplaceAllString(bulk[2].command, activity[1])
	if out := spool(one); out != "retried 1 of 1 (0 gone, 0 refused)\n" {
		t.Errorf("%s: %q", one, out)
	}

	// The README's four, in order: the last deletes nothing (none is a
	// day old), and the dead letter, retried, is pending again.
	steps := shellSteps(testkit.Example(t, "README.md", "readme-backlog"))
	if len(steps) != 4 {
		t.Fatalf("readme-backlog has %d commands, want 4", len(steps))
	}
	for deadline := time.Now().Add(15 * time.Second); strings.Contains(spool(steps[1].command), activity[0]); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the dead letter, retried, is still dead after 15 s")
		}
	}
	if out := spool(steps[0].command); !regexp.MustCompile(`(?m)^pending +5 `).MatchString(out) {
		t.Errorf("%s:\n%s", steps[0].command, out)
	}
	if out := spool(steps[2].command); out != "retried 0 of 0 (0 gone, 0 refused)\n" {
		t.Errorf("%s: %q", steps[2].command, out)
	}
	if out := spool(steps[3].command); out != "deleted 0 of 0 (0 gone, 0 refused)\n" {
		t.Errorf("%s: %q", steps[3].command, out)
	}
}
