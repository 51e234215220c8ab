// Command memory measures how much the resident memory of a Caddy with
// trivialsec_webhook rises under two loads, on loopback:
//   - 200 concurrent unauthenticated uploads of 10 MiB each (target: < 20 MiB),
//   - 64 concurrent valid deliveries of 1 MiB each (target: < 96 MiB).
//
// Run from the repository: go run ./bench/memory [-caddy bench/out/caddy]
// It starts its own Caddy (replay off, max_body 10 MiB) and stops it.
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
)

const secret = "memory-bench-secret"

func main() {
	caddyBin := flag.String("caddy", "bench/out/caddy", "the Caddy binary with the module (go build -o bench/out/caddy ./cmd/caddy)")
	flag.Parse()
	if err := run(*caddyBin); err != nil {
		fmt.Fprintln(os.Stderr, "memory:", err)
		os.Exit(1)
	}
}

func run(caddyBin string) error {
	dir, err := os.MkdirTemp("", "trivialsec-memory-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	port, err := testkit.FreePort()
	if err != nil {
		return err
	}
	config := filepath.Join(dir, "Caddyfile")
	err = os.WriteFile(config, []byte(fmt.Sprintf(`{
	admin off
	persist_config off
}
http://127.0.0.1:%d {
	trivialsec_webhook {
		account bench
		secret {env.TRIVIALSEC_WEBHOOK_SECRET}
		replay off
	}
	respond 200
}
`, port)), 0o600)
	if err != nil {
		return err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	caddy, err := testkit.StartCaddy(caddyBin, config, append(os.Environ(), "TRIVIALSEC_WEBHOOK_SECRET="+secret), nil, addr)
	if err != nil {
		return err
	}
	defer caddy.Stop()

	// A valid 1 MiB delivery, minted by the binary's own sender command.
	payload := filepath.Join(dir, "payload.json")
	if err := os.WriteFile(payload, []byte(`{"pad": "`+strings.Repeat("x", 1<<20-200)+`"}`), 0o600); err != nil {
		return err
	}
	sign := exec.Command(caddyBin, "trivialsec-webhook", "sign", "--account", "bench", "--payload", "@"+payload)
	sign.Env = append(os.Environ(), "TRIVIALSEC_WEBHOOK_SECRET="+secret)
	out, err := sign.Output()
	if err != nil {
		return fmt.Errorf("sign: %v", err)
	}
	lines := strings.SplitN(string(out), "\n", 3)
	auth, body := strings.TrimPrefix(lines[0], "Authorization: "), []byte(lines[1])

	// Warm up: a few of each kind, then the baseline.
	for range 4 {
		if code, err := post(addr, auth, body); err != nil || code != 200 {
			return fmt.Errorf("warm-up delivery: %d %v", code, err)
		}
	}
	pid := caddy.Cmd.Process.Pid
	time.Sleep(500 * time.Millisecond)

	fmt.Printf("caddy pid %d, %s\n", pid, caddyBin)
	rise1, n1, err := measure(pid, func() (int, error) { return unauthenticatedUploads(addr, 200, 10<<20) })
	if err != nil {
		return err
	}
	fmt.Printf("200 concurrent unauthenticated 10 MiB uploads: %d refused with 403; RSS rose by %.1f MiB at most (target < 20)\n", n1, rise1)
	time.Sleep(time.Second)
	rise2, n2, err := measure(pid, func() (int, error) { return validDeliveries(addr, 64, auth, body) })
	if err != nil {
		return err
	}
	fmt.Printf("64 concurrent valid 1 MiB deliveries: %d accepted; RSS rose by %.1f MiB at most (target < 96)\n", n2, rise2)
	if rise1 >= 20 || rise2 >= 96 {
		return fmt.Errorf("a target was missed")
	}
	return nil
}

// measure runs load while sampling the process's RSS every 2 ms, and
// returns the largest rise over the RSS before the load, in MiB.
func measure(pid int, load func() (int, error)) (float64, int, error) {
	base, err := rss(pid)
	if err != nil {
		return 0, 0, err
	}
	var peak atomic.Int64
	peak.Store(base)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(2 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				if v, err := rss(pid); err == nil && v > peak.Load() {
					peak.Store(v)
				}
			}
		}
	}()
	n, err := load()
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wg.Wait()
	return float64(peak.Load()-base) / (1 << 20), n, err
}

// unauthenticatedUploads opens n connections at once, each sending headers
// for a size-byte upload without a token, then the body, as fast as the
// server takes it. Each must get 403.
func unauthenticatedUploads(addr string, n, size int) (int, error) {
	chunk := bytes.Repeat([]byte("A"), 64<<10)
	var refused atomic.Int32
	var firstErr error
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				mu.Lock()
				firstErr = err
				mu.Unlock()
				return
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
			<-start
			fmt.Fprintf(conn, "POST /webhook/trivialsec HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n", addr, size)
			// Send the body while reading the answer: the server answers
			// 403 without reading, and then closes.
			done := make(chan int, 1)
			go func() {
				resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
				if err != nil {
					done <- 0
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				done <- resp.StatusCode
			}()
			for sent := 0; sent < size; sent += len(chunk) {
				if _, err := conn.Write(chunk); err != nil {
					break // the server closed the connection: expected
				}
			}
			if <-done == http.StatusForbidden {
				refused.Add(1)
			}
		}()
	}
	close(start)
	wg.Wait()
	if firstErr != nil {
		return 0, firstErr
	}
	if int(refused.Load()) != n {
		return int(refused.Load()), fmt.Errorf("%d of %d uploads got 403", refused.Load(), n)
	}
	return n, nil
}

func validDeliveries(addr string, n int, auth string, body []byte) (int, error) {
	var ok atomic.Int32
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if code, err := post(addr, auth, body); err == nil && code == 200 {
				ok.Add(1)
			}
		}()
	}
	close(start)
	wg.Wait()
	if int(ok.Load()) != n {
		return int(ok.Load()), fmt.Errorf("%d of %d deliveries accepted", ok.Load(), n)
	}
	return n, nil
}

var client = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 60 * time.Second}

func post(addr, auth string, body []byte) (int, error) {
	req, err := http.NewRequest(http.MethodPost, "http://"+addr+"/webhook/trivialsec", bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", auth)
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

// rss reads VmRSS of a process, in bytes.
func rss(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no VmRSS for pid %d", pid)
}
