package e2e

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
)

// spoolConfig is a receiver in front of upstream, its spool in dir.
func spoolConfig(port int, dir, upstream string) string {
	return fmt.Sprintf(`{
	admin off
	persist_config off
}

http://127.0.0.1:%d {
	trivialsec_webhook {
		account acme
		secret {env.TRIVIALSEC_WEBHOOK_SECRET}
		spool {
			store file %s
			backoff 50ms 200ms
		}
	}
	reverse_proxy %s
}
`, port, dir, upstream)
}

// TestSpoolSurvivesSIGKILL: deliveries answered 202 while the upstream is
// down are on disk: Caddy killed right after the last 202 and started again
// delivers every one, exactly once, without a new delivery to wake it.
func TestSpoolSurvivesSIGKILL(t *testing.T) {
	up, err := testkit.StartUpstream()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(up.Close)
	up.Down()
	dir := filepath.Join(t.TempDir(), "spool")
	port := freePort(t)
	env := []string{"TRIVIALSEC_WEBHOOK_SECRET=" + secret}
	srv := startServer(t, spoolConfig(port, dir, up.Addr), port, env)
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	var ids []string
	for range 20 {
		id := uuid.NewString()
		auth, body := mint(secret, "acme", id, time.Now())
		if status := post(t, url, auth, body); status != 202 {
			t.Fatalf("with the upstream down: %d, want 202", status)
		}
		ids = append(ids, id)
	}
	srv.Kill()

	if err := up.Up(); err != nil {
		t.Fatal(err)
	}
	startServer(t, spoolConfig(port, dir, up.Addr), port, env)
	if _, err := up.WaitTaken(ids, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond) // several backoffs: room for a second delivery, if there were one
	for _, id := range ids {
		if n := up.Taken()[id]; n != 1 {
			t.Errorf("event %s taken %d times", id, n)
		}
	}
}

// TestSpoolStoreLocked: a second Caddy on the same spool directory stops at
// startup with an error that says so, rather than hang; `caddy validate` of
// that config passes, as it opens no store.
func TestSpoolStoreLocked(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool")
	env := []string{"TRIVIALSEC_WEBHOOK_SECRET=" + secret}
	port := freePort(t)
	first := startServer(t, spoolConfig(port, dir, "127.0.0.1:9"), port, env)

	second := spoolConfig(freePort(t), dir, "127.0.0.1:9")
	config := filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(config, []byte(second), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, errOut := run(t, env, "run", "--config", config)
	errOut = logMessages(errOut)
	want := "spool store " + filepath.Join(dir, "spool.db") + " is locked by another process: give each Caddy its own spool directory"
	if code == 0 || !strings.Contains(errOut, want) {
		t.Fatalf("the second Caddy exited %d; want %q in:\n%s", code, want, errOut)
	}
	// caddy validate provisions the config without starting it: it does
	// not touch the store the running Caddy holds.
	if code, _, errOut := run(t, env, "validate", "--config", config); code != 0 {
		t.Fatalf("validate beside a running Caddy exited %d:\n%s", code, logMessages(errOut))
	}
	if strings.Contains(first.logs(), "error") {
		t.Errorf("the first Caddy logged an error:\n%s", first.logs())
	}
}

// TestReplayProtectionSurvivesRestart: the memory replay store keeps its
// reservations in the spool's store too, so that deliveries accepted before
// a SIGKILL are refused as replays after the restart. With the spool off,
// they are not: that is the difference the journal makes. The journal is
// written behind the deliveries, within a commit: the test kills Caddy once
// replay_journal_pending says it is all on disk.
func TestReplayProtectionSurvivesRestart(t *testing.T) {
	up := startUpstream(t, 0)
	for _, tc := range []struct {
		spool string
		want  int
	}{{"", 409}, {"spool off", 202}} {
		t.Run(fmt.Sprintf("want_%d", tc.want), func(t *testing.T) {
			port, admin := freePort(t), freePort(t)
			data := t.TempDir()
			env := []string{"TRIVIALSEC_WEBHOOK_SECRET=" + secret, "XDG_DATA_HOME=" + data}
			config := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
	metrics
}

http://127.0.0.1:%d {
	trivialsec_webhook {
		account acme
		secret {env.TRIVIALSEC_WEBHOOK_SECRET}
		%s
	}
	reverse_proxy %s
}
`, admin, port, tc.spool, up.Listener.Addr())
			srv := startServer(t, config, port, env)
			url := fmt.Sprintf("http://127.0.0.1:%d/", port)
			n := 128
			if tc.want == 202 {
				n = 8
			}
			type sent struct{ auth, body string }
			var deliveries []sent
			for range n {
				auth, body := mint(secret, "acme", uuid.NewString(), time.Now())
				if status := post(t, url, auth, body); status != 202 {
					t.Fatalf("first delivery: %d", status)
				}
				deliveries = append(deliveries, sent{auth, body})
			}
			metrics := fmt.Sprintf("http://127.0.0.1:%d/metrics", admin)
			deadline := time.Now().Add(10 * time.Second)
			for pending := metric(t, metrics, "caddy_trivialsec_webhook_replay_journal_pending"); pending != 0; pending = metric(t, metrics, "caddy_trivialsec_webhook_replay_journal_pending") {
				if time.Now().After(deadline) {
					t.Fatalf("%v reservations still not on disk after 10 s", pending)
				}
				time.Sleep(5 * time.Millisecond)
			}
			srv.Kill()
			startServer(t, config, port, env)
			replayed := 0
			for _, d := range deliveries {
				status := post(t, url, d.auth, d.body)
				if status != tc.want {
					t.Fatalf("after the restart, a replay: %d, want %d", status, tc.want)
				}
				if status == 409 {
					replayed++
				}
			}
			t.Logf("%q: %d of %d refused as replays after SIGKILL and restart", tc.spool, replayed, n)
		})
	}
}

// metric reads one series from Caddy's metrics.
func metric(t *testing.T, url, series string) float64 {
	t.Helper()
	resp, err := sender.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			var f float64
			if _, err := fmt.Sscan(v, &f); err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	t.Fatalf("no %s at %s", series, url)
	return 0
}
