package e2e

import (
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
)

// spooling is a receiver for account acme whose spool retries after an
// hour, in front of upstream, with its admin endpoint on a port of its own.
type spooling struct {
	*server
	url   string // where deliveries go
	admin string // the admin endpoint, host:port
}

// spool sends n new client_activity deliveries, each of which must be
// answered 202 (spooled), and returns their event IDs.
func (rx spooling) spool(t *testing.T, n int) []string {
	t.Helper()
	ids, _ := spoolTo(t, rx.url, n)
	return ids
}

func startSpooling(t *testing.T, upstream string) spooling {
	t.Helper()
	port, adminPort := freePort(t), freePort(t)
	srv := startServer(t, fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
}

http://127.0.0.1:%d {
	trivialsec_webhook {
		account acme
		secret {env.TRIVIALSEC_WEBHOOK_SECRET}
		spool {
			backoff 1h 2h
		}
	}
	reverse_proxy %s
}
`, adminPort, port, upstream), port, []string{"TRIVIALSEC_WEBHOOK_SECRET=" + secret})
	return spooling{srv, fmt.Sprintf("http://127.0.0.1:%d/", port), fmt.Sprintf("127.0.0.1:%d", adminPort)}
}

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

// startDownUpstream starts an upstream, down: its port refuses connections
// until the test brings it up.
func startDownUpstream(t *testing.T) *testkit.Upstream {
	t.Helper()
	up, err := testkit.StartUpstream()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(up.Close)
	up.Down()
	return up
}

// TestSpoolSurvivesSIGKILL: deliveries answered 202 while the upstream is
// down are on disk: Caddy killed right after the last 202 and started again
// delivers every one, exactly once, without a new delivery to wake it.
func TestSpoolSurvivesSIGKILL(t *testing.T) {
	up := startDownUpstream(t)
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

// TestSpoolStoreLocked: a second Caddy on the same spool directory starts
// (its other sites, and its webhook route without the spool), says at
// ERROR that the store is locked by another process, and takes the store
// over once the first Caddy stops, delivering what the first one spooled;
// `caddy validate` of that config passes, as it opens no store.
func TestSpoolStoreLocked(t *testing.T) {
	up := startDownUpstream(t)
	dir := filepath.Join(t.TempDir(), "spool")
	env := []string{"TRIVIALSEC_WEBHOOK_SECRET=" + secret}
	port := freePort(t)
	first := startServer(t, spoolConfig(port, dir, up.Addr), port, env)
	var ids []string
	for range 5 {
		id := uuid.NewString()
		auth, body := mint(secret, "acme", id, time.Now())
		if status := post(t, fmt.Sprintf("http://127.0.0.1:%d/", port), auth, body); status != 202 {
			t.Fatalf("with the upstream down: %d, want 202", status)
		}
		ids = append(ids, id)
	}

	port2 := freePort(t)
	secondConfig := spoolConfig(port2, dir, up.Addr)
	second := startServer(t, secondConfig, port2, env)
	auth, body := mint(secret, "acme", uuid.NewString(), time.Now())
	if status := post(t, fmt.Sprintf("http://127.0.0.1:%d/", port2), auth, body); status != 502 {
		t.Errorf("the second Caddy, its store locked, the upstream down: %d, want the upstream's 502, never a 202", status)
	}
	// The log comes through a pipe: it may trail the answer a little.
	waitLog(t, second, "spool store "+filepath.Join(dir, "spool.db")+" is locked by another process: give each Caddy its own spool directory")
	// caddy validate provisions the config without starting it: it does
	// not touch the store the running Caddy holds.
	if code, _, errOut := run(t, env, "validate", "--config", second.config); code != 0 {
		t.Fatalf("validate beside a running Caddy exited %d:\n%s", code, logMessages(errOut))
	}
	for _, line := range strings.Split(first.logs(), "\n") {
		if strings.Contains(line, `"level":"error"`) && strings.Contains(line, `"logger":"http.handlers.trivialsec_webhook"`) {
			t.Errorf("the first Caddy's spool logged an error: %s", line)
		}
	}
	first.Stop()
	if err := up.Up(); err != nil {
		t.Fatal(err)
	}
	if _, err := up.WaitTaken(ids, 30*time.Second); err != nil {
		t.Fatalf("the second Caddy did not deliver what the first spooled: %v\n%s", err, second.logs())
	}
	time.Sleep(300 * time.Millisecond) // several backoffs: room for a second delivery, if there were one
	for _, id := range ids {
		if n := up.Taken()[id]; n != 1 {
			t.Errorf("event %s taken %d times", id, n)
		}
	}
}

// TestSpoolDamagedStore: a damaged spool.db (truncated, or pages written
// over) does not take Caddy down: it starts, serves its other sites, runs
// the webhook route without the spool, and says at ERROR which file is
// damaged and how to salvage it. `caddy trivialsec-webhook spool salvage`
// then keeps what can be read, and the running Caddy opens the salvaged
// store by itself and delivers it.
func TestSpoolDamagedStore(t *testing.T) {
	for _, damage := range []string{"truncated", "scribbled"} {
		t.Run(damage, func(t *testing.T) {
			up := startDownUpstream(t)
			dir := filepath.Join(t.TempDir(), "spool")
			env := []string{"TRIVIALSEC_WEBHOOK_SECRET=" + secret}
			port, other := freePort(t), freePort(t)
			config := spoolConfig(port, dir, up.Addr) + fmt.Sprintf("\nhttp://127.0.0.1:%d {\n\trespond \"other site\" 200\n}\n", other)
			srv := startServer(t, config, port, env)
			url := fmt.Sprintf("http://127.0.0.1:%d/", port)
			var ids []string
			for range 200 {
				id := uuid.NewString()
				auth, body := mint(secret, "acme", id, time.Now())
				body = strings.Replace(body, `"payload": {`, `"payload": {"pad": "`+strings.Repeat("x", 2000)+`", `, 1)
				if status := post(t, url, auth, body); status != 202 {
					t.Fatalf("with the upstream down: %d, want 202", status)
				}
				ids = append(ids, id)
			}
			srv.Stop()
			damageFile(t, filepath.Join(dir, "spool.db"), damage)

			srv = startServer(t, config, other, env) // it starts: the other site answers
			if status, err := postStatus(fmt.Sprintf("http://127.0.0.1:%d/", other), "", ""); err != nil || status != 200 {
				t.Fatalf("the other site: %d %v", status, err)
			}
			waitLog(t, srv, "is damaged")
			if !strings.Contains(srv.logs(), `trivialsec-webhook spool salvage `+dir) {
				t.Errorf("the log does not say how to salvage:\n%s", srv.logs())
			}
			auth, body := mint(secret, "acme", uuid.NewString(), time.Now())
			if status := post(t, url, auth, body); status != 502 {
				t.Errorf("with the store damaged and the upstream down: %d, want the upstream's 502", status)
			}

			code, out, errOut := run(t, env, "trivialsec-webhook", "spool", "salvage", dir)
			kept := 0
			switch {
			case code == 0:
				t.Logf("salvage: %s", strings.TrimSpace(out))
				m := regexp.MustCompile(`salvaged ([0-9,]+) deliver`).FindStringSubmatch(out)
				if m == nil {
					t.Fatalf("salvage did not say how many it kept: %q", out)
				}
				kept, _ = strconv.Atoi(strings.ReplaceAll(m[1], ",", ""))
			case damage == "truncated" && strings.Contains(errOut, "nothing in it can be found: move it aside"):
				// The cut took the page that lists the buckets (bbolt
				// writes it last, at the end of the file): nothing can be
				// found. The operator does as told.
				t.Logf("salvage: %s", strings.TrimSpace(errOut))
				if err := os.Rename(filepath.Join(dir, "spool.db"), filepath.Join(dir, "spool.db.unreadable")); err != nil {
					t.Fatal(err)
				}
			default:
				t.Fatalf("salvage exited %d:\n%s%s", code, out, errOut)
			}
			if err := up.Up(); err != nil {
				t.Fatal(err)
			}
			waitLog(t, srv, "spool: the store is open: deliveries are spooled again")
			// What salvage kept is delivered, each once; the rest is
			// what it said it lost.
			delivered := 0
			for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
				delivered = 0
				taken := up.Taken()
				for _, id := range ids {
					delivered += min(taken[id], 1)
				}
				if delivered >= kept {
					break
				}
			}
			time.Sleep(300 * time.Millisecond) // several backoffs: room for a second delivery, if there were one
			for id, n := range up.Taken() {
				if n > 1 {
					t.Errorf("event %s taken %d times", id, n)
				}
			}
			t.Logf("%s: %d of %d spooled deliveries delivered after salvage", damage, delivered, len(ids))
			if delivered != kept {
				t.Errorf("salvage kept %d deliveries, and %d were delivered", kept, delivered)
			}
			if delivered == 0 && damage == "scribbled" {
				t.Errorf("nothing was delivered after salvage")
			}
		})
	}
}

// damageFile damages a bbolt file: truncated to 256 KiB, or four pages in
// its middle written over with random bytes.
func damageFile(t *testing.T, path, how string) {
	t.Helper()
	switch how {
	case "truncated":
		if err := os.Truncate(path, 256<<10); err != nil {
			t.Fatal(err)
		}
	case "scribbled":
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		info, _ := f.Stat()
		junk := make([]byte, 4*4096)
		_, _ = rand.Read(junk)
		if _, err := f.WriteAt(junk, (info.Size()/2)&^4095); err != nil {
			t.Fatal(err)
		}
	}
}

// waitLog waits until the server's log says want.
func waitLog(t *testing.T, srv *server, want string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(srv.logs(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("the log never said %q:\n%s", want, srv.logs())
		}
		time.Sleep(50 * time.Millisecond)
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
