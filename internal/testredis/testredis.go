// Package testredis runs a real redis-server on a free loopback port for
// the tests (or a primary, a replica and three redis-sentinel processes:
// sentinel.go), and stops it when the test ends. A test that cannot start
// it fails; it never skips.
package testredis

import (
	"bufio"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Server is a redis-server the test started.
type Server struct {
	t    testing.TB
	Port int
	dir  string   // where a durable server keeps its append-only file
	args []string // more of redis-server's settings, as StartWith gave them
	cmd  *exec.Cmd
	done chan struct{}
}

// Start runs redis-server without persistence on a free loopback port.
func Start(t testing.TB) *Server {
	t.Helper()
	return start(t, "")
}

// StartDurable runs redis-server as docs/several-instances.md asks for a shared spool:
// every write in its append-only file, fsync'd before Redis answers. What
// it acknowledged survives Stop (a SIGKILL) and Restart.
func StartDurable(t testing.TB) *Server {
	t.Helper()
	return start(t, t.TempDir())
}

// StartWith runs redis-server without persistence, with more settings
// (such as "--maxmemory-policy", "allkeys-lru").
func StartWith(t testing.TB, args ...string) *Server {
	t.Helper()
	return start(t, "", args...)
}

func start(t testing.TB, dir string, args ...string) *Server {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatal("redis-server is not installed: apt-get install redis-server (.ci/run does)")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{t: t, Port: l.Addr().(*net.TCPAddr).Port, dir: dir, args: args}
	l.Close()
	s.Restart()
	t.Cleanup(s.Stop)
	return s
}

// URL is the server's redis:// URL.
func (s *Server) URL() string { return fmt.Sprintf("redis://127.0.0.1:%d/0", s.Port) }

// Restart starts the server again on the same port after Stop, as a
// primary: with the data of its append-only file if it is durable, empty
// if not. (Behind Sentinel, bring a primary back with RestartReplicaOf.)
func (s *Server) Restart() {
	s.t.Helper()
	s.restart()
}

// restart runs redis-server with the server's settings, then extra ones,
// and waits until it answers.
func (s *Server) restart(extra ...string) {
	s.t.Helper()
	args := []string{"--port", fmt.Sprint(s.Port), "--bind", "127.0.0.1", "--save", "", "--daemonize", "no", "--loglevel", "warning"}
	if s.dir != "" {
		args = append(args, "--dir", s.dir, "--appendonly", "yes", "--appendfsync", "always")
	} else {
		args = append(args, "--appendonly", "no")
	}
	args = append(args, s.args...)
	args = append(args, extra...)
	s.cmd = exec.Command("redis-server", args...)
	if err := s.cmd.Start(); err != nil {
		s.t.Fatalf("redis-server: %v", err)
	}
	s.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { _ = cmd.Wait(); close(done) }(s.cmd, s.done)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if s.ping() == nil {
			return
		}
		if time.Now().After(deadline) {
			s.Stop()
			s.t.Fatalf("redis-server did not answer on port %d within 10s", s.Port)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Pause stops the server's process (SIGSTOP), as a slow fork or a failover
// would: connections stay open, and calls wait without an answer.
func (s *Server) Pause() { _ = s.cmd.Process.Signal(syscall.SIGSTOP) }

// Resume lets a paused server go on (SIGCONT): what was sent meanwhile runs.
func (s *Server) Resume() { _ = s.cmd.Process.Signal(syscall.SIGCONT) }

// Stop kills the server and waits until it is gone.
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	<-s.done
	s.cmd = nil
}

// ping sends PING and expects PONG.
func (s *Server) ping() error {
	conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", s.Port), time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+PONG") {
		return fmt.Errorf("redis answered %q", line)
	}
	return nil
}

// ConnectedClients asks the server how many clients are connected, this
// query's own connection included.
func (s *Server) ConnectedClients() (int, error) {
	conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", s.Port), time.Second)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte("INFO clients\r\n")); err != nil {
		return 0, err
	}
	r := bufio.NewReader(conn)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return 0, err
		}
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "connected_clients:"); ok {
			var n int
			_, err := fmt.Sscan(v, &n)
			return n, err
		}
	}
}
