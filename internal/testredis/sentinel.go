package testredis

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// MasterName is the name the Sentinels monitor the primary by.
const MasterName = "mymaster"

// Sentinels is a primary, one replica of it, and three Sentinels watching
// them, all on loopback, as a Redis high-availability setup runs them: the
// Sentinels agree (a quorum of 2) that the primary is down within about
// a second of its death, and promote the replica.
type Sentinels struct {
	t       testing.TB
	Servers []*Server // the primary as started, then its replica
	Ports   []int     // the Sentinels'
	dir     string
	cmds    []*exec.Cmd
	done    []chan struct{}
}

// StartSentinels starts the primary and its replica, waits until the
// replica has the primary's data, starts the Sentinels, and waits until
// every Sentinel names the primary, sees the replica and knows the other
// two. A test that cannot have them fails. Cleanup stops everything.
func StartSentinels(t testing.TB) *Sentinels {
	t.Helper()
	if _, err := exec.LookPath("redis-sentinel"); err != nil {
		t.Fatal("redis-sentinel is not installed: apt-get install redis-sentinel (.ci/run does)")
	}
	primary, replica := StartReplicated(t)
	s := &Sentinels{t: t, Servers: []*Server{primary, replica}, dir: t.TempDir()}

	t.Cleanup(s.stop) // before the servers' own (LIFO): no failover while they stop
	for i := range 3 {
		s.startSentinel(i, primary.Port)
	}
	s.wait("every Sentinel names the primary, sees its replica and knows the two others", func() error {
		for _, port := range s.Ports {
			if err := sentinelReady(port, primary.Port); err != nil {
				return fmt.Errorf("sentinel %d: %w", port, err)
			}
		}
		return nil
	})
	return s
}

// The user replicas log in to their primary as.
const (
	replicator         = "replicator"
	replicatorPassword = "testredis-replication"
)

// StartReplicated starts a primary and a replica of it, and waits until
// the replica confirms the primary's writes.
func StartReplicated(t testing.TB) (primary, replica *Server) {
	t.Helper()
	// Diskless both ways, on both (either may be the primary after a
	// failover): the servers have no directory of their own, and a full
	// sync must write no dump.rdb into the test's working directory.
	// Without the delay's 0 a primary waits 5 s for more replicas before
	// each sync. Replicas log in as a user of their own, which
	// CutReplicas disables.
	settings := []string{"--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0", "--repl-diskless-load", "swapdb",
		"--user", replicator, "on", ">" + replicatorPassword, "~*", "+@all",
		"--masteruser", replicator, "--masterauth", replicatorPassword}
	primary, replica = StartWith(t, settings...), StartWith(t, settings...)
	replica.ReplicaOf(primary)
	return primary, replica
}

// URL is go-redis's failover URL of the setup: the first Sentinel as the
// host, the others as addr.
func (s *Sentinels) URL() string {
	return fmt.Sprintf("redis://127.0.0.1:%d/0?master_name=%s&addr=127.0.0.1:%d&addr=127.0.0.1:%d",
		s.Ports[0], MasterName, s.Ports[1], s.Ports[2])
}

// Master is the server every Sentinel names as the primary now, in one
// configuration (the same config epoch, as a failover's winner spreads
// it), or an error if they do not agree, or name a server not of this
// setup.
func (s *Sentinels) Master() (*Server, error) {
	var port int
	var epoch string
	for i, p := range s.Ports {
		got, err := masterPort(p)
		if err != nil {
			return nil, fmt.Errorf("sentinel %d: %w", p, err)
		}
		master, err := command("127.0.0.1:"+strconv.Itoa(p), "SENTINEL", "MASTER", MasterName)
		if err != nil {
			return nil, fmt.Errorf("sentinel %d: %w", p, err)
		}
		e := field(master, "config-epoch")
		if i > 0 && (got != port || e != epoch) {
			return nil, fmt.Errorf("the Sentinels disagree: port %d in config epoch %s, and port %d in %s", port, epoch, got, e)
		}
		port, epoch = got, e
	}
	for _, srv := range s.Servers {
		if srv.Port == port {
			return srv, nil
		}
	}
	return nil, fmt.Errorf("the Sentinels name port %d, no server of this setup", port)
}

// KillMaster SIGKILLs the server the Sentinels name as the primary, and
// returns it.
func (s *Sentinels) KillMaster() *Server {
	s.t.Helper()
	srv, err := s.Master()
	if err != nil {
		s.t.Fatal(err)
	}
	srv.Stop()
	return srv
}

// WaitFailover waits until every Sentinel names another server than old as
// the primary, in one config epoch, and that server says it is one; it
// returns it.
func (s *Sentinels) WaitFailover(old *Server) *Server {
	s.t.Helper()
	var promoted *Server
	s.wait("the Sentinels promote another server than port "+strconv.Itoa(old.Port), func() error {
		srv, err := s.Master()
		switch {
		case err != nil:
			return err
		case srv == old:
			return errors.New("they still name the old primary")
		}
		role, err := command(srv.addr(), "ROLE")
		if err != nil {
			return err
		}
		if r, _ := role.([]any); len(r) == 0 || r[0] != "master" {
			return fmt.Errorf("port %d says it is %v", srv.Port, role)
		}
		promoted = srv
		return nil
	})
	return promoted
}

// ReplicaOf makes the server a replica of primary, and waits until it has
// the primary's data and confirms its new writes (WAIT counts it).
func (s *Server) ReplicaOf(primary *Server) {
	s.t.Helper()
	if _, err := command(s.addr(), "REPLICAOF", "127.0.0.1", strconv.Itoa(primary.Port)); err != nil {
		s.t.Fatalf("replicaof: %v", err)
	}
	s.waitReplicating(primary)
}

// RestartReplicaOf starts the server again after Stop as an operator
// brings back a primary that a failover replaced: a replica of primary
// from its first moment (--replicaof), never a primary of its own, and
// one the Sentinels may not promote (replica-priority 0) until it has
// primary's data and confirms its writes; then of Redis's default
// priority, 100. (A server without persistence restarted as a primary is
// empty, and the Sentinels, which list it as a replica since the
// failover, see it as a primary only when they next ask it, up to 10 s
// later: a failover meanwhile, as under load, when a Sentinel gets no
// answer from the primary it just promoted within down-after, can
// promote it, and every server then copies its empty data set. So can
// one while a replica is still syncing.)
func (s *Server) RestartReplicaOf(primary *Server) {
	s.t.Helper()
	s.restart("--replicaof", "127.0.0.1", strconv.Itoa(primary.Port), "--replica-priority", "0")
	s.waitReplicating(primary)
	if _, err := command(s.addr(), "CONFIG", "SET", "replica-priority", "100"); err != nil {
		s.t.Fatalf("port %d: replica-priority: %v", s.Port, err)
	}
}

// waitReplicating waits until the server is a replica of primary in sync
// (synced), for at most 20 s.
func (s *Server) waitReplicating(primary *Server) {
	s.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := s.synced(primary)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("port %d did not sync with port %d within 20s: %v", s.Port, primary.Port, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// synced checks that the server says it is a replica of primary with its
// link up (it has loaded primary's data), and that a write of primary's
// is confirmed by every replica primary has. After a diskless sync the
// primary streams a replica its writes, and WAIT counts it, only from its
// first acknowledgement, up to a second after its link is up: the write
// is a PUBLISH, which replicates and leaves no key.
func (s *Server) synced(primary *Server) error {
	info, err := command(s.addr(), "INFO", "replication")
	if err != nil {
		return err
	}
	text, _ := info.(string)
	got := map[string]string{}
	for line := range strings.Lines(text) {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), ":"); ok {
			got[k] = v
		}
	}
	if got["role"] != "slave" || got["master_port"] != strconv.Itoa(primary.Port) || got["master_link_status"] != "up" {
		return fmt.Errorf("port %d says role:%s master_port:%s master_link_status:%s, want a replica of port %d with its link up",
			s.Port, got["role"], got["master_port"], got["master_link_status"], primary.Port)
	}
	n, err := replicas(primary.addr())
	if err != nil {
		return err
	}
	replies, err := commands(primary.addr(), []string{"PUBLISH", "testredis:sync", "1"}, []string{"WAIT", strconv.Itoa(n), "100"})
	if err != nil {
		return err
	}
	if n == 0 || replies[1] != int64(n) {
		return fmt.Errorf("%v of port %d's %d replicas confirmed its write", replies[1], primary.Port, n)
	}
	return nil
}

// Rejoin brings old, the primary a failover replaced, back as a replica
// of primary, the server promoted (RestartReplicaOf), and waits until
// every Sentinel names one server as the primary, in one config epoch,
// that server says it is one, and every other is its replica, in sync
// (synced), and listed by every Sentinel as its replica, up. It returns
// that primary: primary, unless the Sentinels failed over again meanwhile
// (old then has the data: it is promoted only once in sync).
func (s *Sentinels) Rejoin(old, primary *Server) *Server {
	s.t.Helper()
	old.RestartReplicaOf(primary)
	var now *Server
	s.wait("the Sentinels agree on a primary, and the other server is its replica, in sync", func() error {
		srv, err := s.Master()
		if err != nil {
			return err
		}
		if role, err := command(srv.addr(), "ROLE"); err != nil {
			return err
		} else if r, _ := role.([]any); len(r) == 0 || r[0] != "master" {
			return fmt.Errorf("port %d, which the Sentinels name, says it is %v", srv.Port, role)
		}
		for _, replica := range s.Servers {
			if replica == srv {
				continue
			}
			if err := replica.synced(srv); err != nil {
				return err
			}
			for _, p := range s.Ports {
				v, err := command("127.0.0.1:"+strconv.Itoa(p), "SENTINEL", "REPLICAS", MasterName)
				if err != nil {
					return fmt.Errorf("sentinel %d: %w", p, err)
				}
				list, _ := v.([]any)
				i := slices.IndexFunc(list, func(entry any) bool { return field(entry, "port") == strconv.Itoa(replica.Port) })
				if i < 0 {
					return fmt.Errorf("sentinel %d does not list port %d: %v", p, replica.Port, v)
				}
				// master-port is 0 until the Sentinel has the replica's INFO.
				flags, of := field(list[i], "flags"), field(list[i], "master-port")
				if strings.Contains(flags, "down") || strings.Contains(flags, "disconnected") || of != strconv.Itoa(srv.Port) {
					return fmt.Errorf("sentinel %d sees port %d as %s, a replica of port %s", p, replica.Port, flags, of)
				}
			}
		}
		now = srv
		return nil
	})
	return now
}

// replicas is how many replicas the server at addr has connected.
func replicas(addr string) (int, error) {
	info, err := command(addr, "INFO", "replication")
	if err != nil {
		return 0, err
	}
	text, _ := info.(string)
	for line := range strings.Lines(text) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "connected_slaves:"); ok {
			return strconv.Atoi(v)
		}
	}
	return 0, errors.New("INFO replication has no connected_slaves")
}

// CutReplicas makes the server refuse its replicas, as a network partition
// between them would: their links are closed, and their new ones refused.
// Clients and Sentinels still reach every server; the replicas get none of
// the server's writes until it restarts.
func (s *Server) CutReplicas() {
	s.t.Helper()
	if _, err := commands(s.addr(), []string{"ACL", "SETUSER", replicator, "off"}, []string{"CLIENT", "KILL", "USER", replicator}); err != nil {
		s.t.Fatalf("cut replicas: %v", err)
	}
}

func (s *Server) addr() string { return "127.0.0.1:" + strconv.Itoa(s.Port) }

// startSentinel starts Sentinel i, watching the primary on primaryPort.
func (s *Sentinels) startSentinel(i, primaryPort int) {
	s.t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		s.t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	// Sentinel rewrites its config file as it learns: each has its own.
	// down-after 1s and a failover-timeout of 3s make a failover take a
	// few seconds; a failed election is tried again after 2 x 3s.
	conf := filepath.Join(s.dir, fmt.Sprintf("sentinel-%d.conf", i))
	body := fmt.Sprintf(`port %d
bind 127.0.0.1
daemonize no
dir %s
logfile %s
sentinel resolve-hostnames no
sentinel monitor %s 127.0.0.1 %d 2
sentinel down-after-milliseconds %s 1000
sentinel failover-timeout %s 3000
sentinel parallel-syncs %s 1
`, port, s.dir, s.logFile(i), MasterName, primaryPort, MasterName, MasterName, MasterName)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		s.t.Fatal(err)
	}
	// What it says before it opens its log file (a config it refuses)
	// goes to the same file.
	out, err := os.OpenFile(s.logFile(i), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		s.t.Fatal(err)
	}
	defer out.Close() // the child has its own descriptor
	cmd := exec.Command("redis-sentinel", conf)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("redis-sentinel: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	s.Ports = append(s.Ports, port)
	s.cmds = append(s.cmds, cmd)
	s.done = append(s.done, done)
}

func (s *Sentinels) logFile(i int) string {
	return filepath.Join(s.dir, fmt.Sprintf("sentinel-%d.log", i))
}

// stop kills the Sentinels and waits until they are gone.
func (s *Sentinels) stop() {
	for i, cmd := range s.cmds {
		_ = cmd.Process.Kill()
		<-s.done[i]
	}
	s.cmds = nil
}

// wait polls check until it returns nil, for at most 60 s; then the test
// fails with the last error and the Sentinels' logs.
func (s *Sentinels) wait(what string, check func() error) {
	s.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		err := check()
		if err == nil {
			return
		}
		for i, done := range s.done {
			select {
			case <-done: // a Sentinel that exited (its config, its port) will not come back
				err, deadline = fmt.Errorf("sentinel %d exited: %w", i, err), time.Time{}
			default:
			}
		}
		if time.Now().After(deadline) {
			var logs strings.Builder
			for i := range s.cmds {
				b, _ := os.ReadFile(s.logFile(i))
				fmt.Fprintf(&logs, "\n--- sentinel %d (port %d):\n%s", i, s.Ports[i], b)
			}
			s.t.Fatalf("gave up (60s at most) waiting until %s: %v%s", what, err, logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// masterPort asks the Sentinel on port which port the primary is on.
func masterPort(port int) (int, error) {
	v, err := command("127.0.0.1:"+strconv.Itoa(port), "SENTINEL", "get-master-addr-by-name", MasterName)
	if err != nil {
		return 0, err
	}
	addr, _ := v.([]any)
	if len(addr) != 2 {
		return 0, fmt.Errorf("get-master-addr-by-name answered %v", v)
	}
	p, _ := addr[1].(string)
	return strconv.Atoi(p)
}

// sentinelReady checks that the Sentinel on port names primaryPort, sees
// one replica of it up, and knows two other Sentinels.
func sentinelReady(port, primaryPort int) error {
	got, err := masterPort(port)
	if err != nil {
		return err
	}
	if got != primaryPort {
		return fmt.Errorf("names port %d as the primary", got)
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	for what, want := range map[string]int{"replicas": 1, "sentinels": 2} {
		v, err := command(addr, "SENTINEL", what, MasterName)
		if err != nil {
			return err
		}
		list, _ := v.([]any)
		up := 0
		for _, entry := range list {
			if flags := field(entry, "flags"); !strings.Contains(flags, "down") && !strings.Contains(flags, "disconnected") {
				up++
			}
		}
		if up != want {
			return fmt.Errorf("sees %d of %s up, want %d: %v", up, what, want, v)
		}
	}
	return nil
}

// field is a value of a Sentinel entry, a flat list of names and values.
func field(entry any, name string) string {
	kv, _ := entry.([]any)
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i] == name {
			s, _ := kv[i+1].(string)
			return s
		}
	}
	return ""
}

// command sends one command to the server or Sentinel at addr, on a
// connection of its own, and returns the reply: a string, an int64, nil or
// a []any of those. A Redis error is an error. The harness speaks RESP
// itself rather than through go-redis, the client under test.
func command(addr string, args ...string) (any, error) {
	replies, err := commands(addr, args)
	if err != nil {
		return nil, err
	}
	return replies[0], nil
}

// commands sends commands one after the other on one connection (WAIT
// counts the writes of its own connection), and returns their replies.
func commands(addr string, cmds ...[]string) ([]any, error) {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	var b strings.Builder
	for _, args := range cmds {
		fmt.Fprintf(&b, "*%d\r\n", len(args))
		for _, a := range args {
			fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
		}
	}
	if _, err := conn.Write([]byte(b.String())); err != nil {
		return nil, err
	}
	r := bufio.NewReader(conn)
	replies := make([]any, len(cmds))
	for i := range replies {
		if replies[i], err = readReply(r); err != nil {
			return nil, err
		}
	}
	return replies, nil
}

// readReply reads one RESP2 reply.
func readReply(r *bufio.Reader) (any, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	line = strings.TrimSuffix(line, "\r\n")
	if line == "" {
		return nil, errors.New("empty reply")
	}
	switch rest := line[1:]; line[0] {
	case '+':
		return rest, nil
	case '-':
		return nil, errors.New(rest)
	case ':':
		return strconv.ParseInt(rest, 10, 64)
	case '$':
		n, err := strconv.Atoi(rest)
		if err != nil || n < 0 {
			return nil, err
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, err
		}
		return string(buf[:n]), nil
	case '*':
		n, err := strconv.Atoi(rest)
		if err != nil || n < 0 {
			return nil, err
		}
		list := make([]any, n)
		for i := range list {
			if list[i], err = readReply(r); err != nil {
				return nil, err
			}
		}
		return list, nil
	}
	return nil, fmt.Errorf("unknown reply %q", line)
}
