package trivialsecwebhook

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// TestParseRedisURL: a plain URL makes go-redis's client, one with
// master_name its failover client, whose user and password are the
// primary's; wait_replicas and wait_timeout are read and taken out of
// what go-redis sees; both clients get the module's timeouts and one
// retry. No error shows the password, even when the URL is malformed
// around it.
func TestParseRedisURL(t *testing.T) {
	t.Run("plain", func(t *testing.T) {
		r, err := parseRedisURL("redis://webhook:secret@127.0.0.1:6380/2")
		if err != nil {
			t.Fatal(err)
		}
		o := r.plain
		if r.failover != nil || o.Addr != "127.0.0.1:6380" || o.Username != "webhook" || o.Password != "secret" || o.DB != 2 || r.waitReplicas != 0 {
			t.Fatalf("%+v", r)
		}
		if o.DialTimeout != redisTimeout || o.ReadTimeout != redisTimeout || o.WriteTimeout != redisTimeout || o.MaxRetries != 1 {
			t.Errorf("timeouts %v %v %v, retries %d", o.DialTimeout, o.ReadTimeout, o.WriteTimeout, o.MaxRetries)
		}
	})
	t.Run("plain_wait", func(t *testing.T) {
		for raw, want := range map[string]time.Duration{
			"redis://127.0.0.1:6379?wait_replicas=2":                      defaultWaitTimeout,
			"redis://127.0.0.1:6379/0?wait_replicas=2&wait_timeout=250ms": 250 * time.Millisecond,
		} {
			r, err := parseRedisURL(raw)
			if err != nil {
				t.Fatalf("%s: %v", raw, err)
			}
			if r.plain == nil || r.waitReplicas != 2 || r.waitTimeout != want {
				t.Errorf("%s: %+v", raw, r)
			}
		}
	})
	t.Run("allow_eviction", func(t *testing.T) {
		for raw, want := range map[string]bool{
			"redis://127.0.0.1:6379":                                          false,
			"redis://127.0.0.1:6379?allow_eviction=true":                      true,
			"redis://127.0.0.1:6379?allow_eviction=false":                     false,
			"redis://127.0.0.1:26379?master_name=m&allow_eviction=true":       true,
			"redis://127.0.0.1:6379?wait_replicas=1&allow_eviction=true&db=1": true,
		} {
			r, err := parseRedisURL(raw)
			if err != nil || r.allowEviction != want {
				t.Errorf("%s: %v %v, want %v", raw, r.allowEviction, err, want)
			}
		}
	})
	t.Run("sentinel", func(t *testing.T) {
		r, err := parseRedisURL("redis://webhook:secret@127.0.0.1:26379/1?master_name=mymaster&addr=127.0.0.1:26380&addr=127.0.0.1:26381" +
			"&sentinel_username=watcher&sentinel_password=other&wait_replicas=1&wait_timeout=2s")
		if err != nil {
			t.Fatal(err)
		}
		f := r.failover
		if r.plain != nil || f.MasterName != "mymaster" || f.DB != 1 || strings.Join(f.SentinelAddrs, " ") != "127.0.0.1:26379 127.0.0.1:26380 127.0.0.1:26381" {
			t.Fatalf("%+v", f)
		}
		if f.Username != "webhook" || f.Password != "secret" || f.SentinelUsername != "watcher" || f.SentinelPassword != "other" {
			t.Errorf("primary %q:%q, Sentinels %q:%q", f.Username, f.Password, f.SentinelUsername, f.SentinelPassword)
		}
		if f.DialTimeout != redisTimeout || f.ReadTimeout != redisTimeout || f.WriteTimeout != redisTimeout || f.MaxRetries != 1 {
			t.Errorf("timeouts %v %v %v, retries %d", f.DialTimeout, f.ReadTimeout, f.WriteTimeout, f.MaxRetries)
		}
		if r.waitReplicas != 1 || r.waitTimeout != 2*time.Second {
			t.Errorf("wait %d %v", r.waitReplicas, r.waitTimeout)
		}
	})
	t.Run("sentinel_tls", func(t *testing.T) {
		r, err := parseRedisURL("rediss://sentinel1.example:26379?master_name=mymaster&addr=sentinel2.example:26379")
		if err != nil {
			t.Fatal(err)
		}
		if tc := r.failover.TLSConfig; tc == nil || tc.ServerName != "" || tc.InsecureSkipVerify {
			t.Fatalf("TLS config %+v: want one that checks each host dialled against its own name", tc)
		}
	})
	t.Run("sentinel_without_passwords", func(t *testing.T) {
		r, err := parseRedisURL("redis://127.0.0.1:26379?master_name=mymaster")
		if err != nil {
			t.Fatal(err)
		}
		if f := r.failover; f.Username != "" || f.Password != "" || f.SentinelUsername != "" || f.SentinelPassword != "" || len(f.SentinelAddrs) != 1 {
			t.Fatalf("%+v", f)
		}
	})

	for _, c := range []struct {
		name, url, want string
	}{
		{"wait_replicas_negative", "redis://:secret@h:6379?wait_replicas=-1", "wait_replicas is a number of replicas, 0 or more"},
		{"wait_replicas_not_a_number", "redis://:secret@h:6379?wait_replicas=all", "wait_replicas is a number of replicas"},
		{"wait_timeout_zero_waits_for_ever", "redis://:secret@h:6379?wait_replicas=1&wait_timeout=0s", "wait_timeout is a duration of 1ms or more"},
		{"wait_timeout_below_a_millisecond", "redis://:secret@h:6379?wait_replicas=1&wait_timeout=500us", "wait_timeout is a duration of 1ms or more"},
		{"allow_eviction_not_a_bool", "redis://:secret@h:6379?allow_eviction=yes please", "allow_eviction is true or false"},
		{"wait_timeout_alone", "redis://:secret@h:6379?wait_timeout=1s", "wait_timeout is for wait_replicas"},
		{"sentinel_password_without_master_name", "redis://h:6379?sentinel_password=secret", "sentinel_username and sentinel_password are for a Sentinel URL"},
		{"addr_without_master_name", "redis://:secret@h:6379?addr=h2:26379", "addr names further Sentinels"},
		{"master_name_empty", "redis://:secret@h:26379?master_name=", "master_name is empty"},
		{"sentinel_without_host", "redis://:secret@/?master_name=m", "names a Sentinel as its host"},
		{"sentinel_password_query", "redis://h:26379?master_name=m&password=secret", "give the primary's user and password before the host"},
		{"sentinel_username_query", "redis://:secret@h:26379?master_name=m&username=u", "give the primary's user and password before the host"},
		{"replica_only", "redis://:secret@h:26379?master_name=m&replica_only=true", "replica_only is not supported"},
		{"route_randomly_panics_go_redis", "redis://:secret@h:26379?master_name=m&route_randomly=true", "route_randomly is not supported"},
		{"route_by_latency_panics_go_redis", "redis://:secret@h:26379?master_name=m&route_by_latency=true", "route_by_latency is not supported"},
		{"unknown_option", "redis://:secret@h:6379?pool=3", "unexpected option: pool"},
		{"unknown_sentinel_option", "redis://:secret@h:26379?master_name=m&pool=3", "an unknown or malformed query parameter"},
		// An & in sentinel_password, not percent-encoded, makes its tail a
		// parameter of its own: the error must not name it.
		{"unencoded_sentinel_password", "redis://h:26379?master_name=m&sentinel_password=ab&cdsecret", "an unknown or malformed query parameter"},
		{"bad_scheme", "http://:secret@h:6379", "invalid URL scheme"},
		// A password with a reserved character not percent-encoded cuts
		// the URL short: its tail reads as a port, a path, a query or a
		// fragment, which url.Parse's and go-redis's errors would quote.
		{"password_slash_port", "redis://u:se/cret@h:6379", "does not parse"},
		{"password_slash_path", "redis://u:123/secret@h:6379/0", "has an @ after its host"},
		{"password_question_mark", "redis://u:123?secret@h:6379", "has an @ after its host"},
		{"password_question_mark_value", "redis://u:123?db=secret@h:6379", "has an @ after its host"},
		{"password_question_mark_own_parameter", "redis://u:123?wait_replicas=secret@h:6379", "has an @ after its host"},
		{"password_hash", "redis://u:123#secret@h:6379", "has an @ after its host"},
		{"password_percent", "redis://u:sec%zzret@h:6379", "does not parse"},
		{"sentinel_password_slash", "redis://u:123/secret@h:26379?master_name=m", "has an @ after its host"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := parseRedisURL(c.url)
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("%v, want %q", err, c.want)
			}
			for _, part := range []string{"secret", "cret", "sec"} {
				if strings.Contains(err.Error(), part) {
					t.Errorf("the error shows %q of the password: %v", part, err)
				}
			}
		})
	}
}

// writeScript sets a key and returns the value it set.
var writeScript = redis.NewScript(`redis.call('SET', KEYS[1], ARGV[1]) return ARGV[1]`)

// testRedisClient takes the client of rawURL, given back when the test ends.
func testRedisClient(t testing.TB, rawURL string) *redisClient {
	t.Helper()
	c, err := loadRedisClient(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.release() })
	return c
}

// TestRedisEvalWaitsForReplicas: with wait_replicas, a script's write is
// on the replica by the time eval returns; with the replica gone, eval
// says errNotReplicated, and the write is on the primary all the same;
// a script Redis does not have yet (NOSCRIPT) is sent whole, its WAIT
// with it; the Redis user SECURITY.md describes may run WAIT. Without wait_replicas there is no WAIT: the replica's absence
// changes nothing.
func TestRedisEvalWaitsForReplicas(t *testing.T) {
	primary, replica := testredis.StartReplicated(t)
	ctx := context.Background()
	c := testRedisClient(t, primary.URL()+"?wait_replicas=1&wait_timeout=100ms")
	onReplica := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", replica.Port)})
	defer onReplica.Close()

	// A script of this test's own: the first eval meets NOSCRIPT.
	script := redis.NewScript(`redis.call('SET', KEYS[1], ARGV[1]) return 'set ' .. ARGV[1]`)
	for i := range 3 {
		if i == 2 {
			if err := c.ScriptFlush(ctx).Err(); err != nil {
				t.Fatal(err)
			}
		}
		v := fmt.Sprint("v", i)
		if got, err := c.eval(ctx, script, []string{"k"}, v).Text(); err != nil || got != "set "+v {
			t.Fatalf("eval %d: %q %v", i, got, err)
		}
		// No polling: WAIT said the replica has it.
		if got, err := onReplica.Get(ctx, "k").Result(); err != nil || got != v {
			t.Fatalf("eval %d confirmed, but the replica holds %q (%v)", i, got, err)
		}
	}

	// A script that fails fails as itself, not as a replication failure.
	failing := redis.NewScript(`return redis.error_reply('ERR nope')`)
	if err := c.eval(ctx, failing, nil).Err(); err == nil || errors.Is(err, errNotReplicated) || !strings.Contains(err.Error(), "nope") {
		t.Errorf("a failing script: %v", err)
	}

	// More replicas asked for than there are.
	two := testRedisClient(t, primary.URL()+"?wait_replicas=2&wait_timeout=50ms")
	cmd := two.eval(ctx, writeScript, []string{"k"}, "two")
	if err := cmd.Err(); !errors.Is(err, errNotReplicated) || !strings.Contains(err.Error(), "only 1 of 2 replicas confirmed it within 50ms") {
		t.Errorf("wait_replicas=2 with one replica: %v", err)
	}

	// WAIT is in @connection: the user SECURITY.md describes may run it.
	limited := testRedisClient(t, leastPrivilegeUser(t, primary.Port, "trivialsec")+"?wait_replicas=1&wait_timeout=100ms")
	if err := limited.eval(ctx, writeScript, []string{"trivialsec_webhook:k"}, "limited").Err(); err != nil {
		t.Errorf("as the user SECURITY.md describes: %v", err)
	}

	replica.Stop()
	cmd = c.eval(ctx, writeScript, []string{"k"}, "alone")
	if err := cmd.Err(); !errors.Is(err, errNotReplicated) || !strings.Contains(err.Error(), "written on the primary, but only 0 of 1 replicas confirmed it within 100ms") {
		t.Fatalf("with the replica stopped: %v", err)
	}
	if cmd.Val() != "alone" {
		t.Errorf("the script's value is lost with the error: %v", cmd.Val())
	}
	if got, err := c.Get(ctx, "k").Result(); err != nil || got != "alone" {
		t.Errorf("the primary holds %q (%v): the write happened there", got, err)
	}

	plain := testRedisClient(t, primary.URL())
	if plain.waiting != nil {
		t.Error("a client without wait_replicas has a WAIT client")
	}
	if got, err := plain.eval(ctx, writeScript, []string{"k"}, "no wait").Text(); err != nil || got != "no wait" {
		t.Errorf("without wait_replicas, with the replica gone: %q %v", got, err)
	}
}

// TestRedisSentinelFailover: a client made from a Sentinel URL finds the
// primary through the Sentinels and writes to it; once the primary is
// killed, its writes fail until the Sentinels promote the replica, then
// succeed there, within a bound; what wait_replicas=1 confirmed before
// the kill is on the promoted replica. With no replica left,
// wait_replicas=1 fails each write as not replicated.
func TestRedisSentinelFailover(t *testing.T) {
	s := testredis.StartSentinels(t)
	ctx := context.Background()
	waiting := testRedisClient(t, s.URL()+"&wait_replicas=1&wait_timeout=200ms")
	plain := testRedisClient(t, s.URL())

	if err := waiting.eval(ctx, writeScript, []string{"confirmed"}, "before").Err(); err != nil {
		t.Fatalf("before the failover: %v", err)
	}
	onPrimary := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", s.Servers[0].Port)})
	defer onPrimary.Close()
	if got, err := onPrimary.Get(ctx, "confirmed").Result(); err != nil || got != "before" {
		t.Fatalf("the Sentinels' primary holds %q (%v)", got, err)
	}

	old := s.KillMaster()
	var failed int
	var err error
	for deadline := time.Now().Add(60 * time.Second); ; {
		if err = plain.eval(ctx, writeScript, []string{"after"}, "promoted").Err(); err == nil {
			break
		}
		failed++
		if time.Now().After(deadline) {
			t.Fatalf("no write went through within 60s of the kill (%d failed): %v", failed, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	promoted := s.WaitFailover(old)
	if failed == 0 {
		t.Error("the first write after the kill went through: was the primary killed?")
	}
	onPromoted := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", promoted.Port)})
	defer onPromoted.Close()
	for key, want := range map[string]string{"confirmed": "before", "after": "promoted"} {
		if got, err := onPromoted.Get(ctx, key).Result(); err != nil || got != want {
			t.Errorf("the promoted replica holds %s = %q (%v), want %q", key, got, err, want)
		}
	}

	// No replica is left: the waiting client's writes reach the new
	// primary, and fail as not replicated.
	var werr error
	for deadline := time.Now().Add(60 * time.Second); ; {
		werr = waiting.eval(ctx, writeScript, []string{"unconfirmed"}, "x").Err()
		if errors.Is(werr, errNotReplicated) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !errors.Is(werr, errNotReplicated) {
		t.Errorf("wait_replicas=1 with no replica left: %v", werr)
	}
}

// TestRedisSentinelPrimaryPassword: in a Sentinel URL, the user info is
// the primary's password, as in a plain URL (go-redis would give it to the
// Sentinels): a client with it writes to a primary that asks for one, a
// client without it is refused by the primary.
func TestRedisSentinelPrimaryPassword(t *testing.T) {
	s := testredis.StartSentinels(t)
	ctx := context.Background()
	const password = "primary-pass"
	for _, port := range s.Ports {
		sentinel := redis.NewSentinelClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", port)})
		err := sentinel.Set(ctx, testredis.MasterName, "auth-pass", password).Err()
		sentinel.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, srv := range s.Servers {
		admin := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", srv.Port)})
		err := admin.ConfigSet(ctx, "requirepass", password).Err()
		admin.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	withPassword := testRedisClient(t, strings.Replace(s.URL(), "redis://", "redis://:"+password+"@", 1))
	if err := withPassword.eval(ctx, writeScript, []string{"k"}, "v").Err(); err != nil {
		t.Errorf("with the primary's password: %v", err)
	}
	without := testRedisClient(t, s.URL())
	if err := without.eval(ctx, writeScript, []string{"k"}, "v").Err(); err == nil || !strings.Contains(err.Error(), "NOAUTH") {
		t.Errorf("without a password: %v, want the primary's NOAUTH", err)
	}
}

// BenchmarkRedisEval: what wait_replicas=1 adds to a write, with the
// primary and its replica on loopback (docs/several-instances.md, Redis Sentinel): one
// writer at a time, then as many as GOMAXPROCS x 16 at once, as
// concurrent deliveries write.
func BenchmarkRedisEval(b *testing.B) {
	primary, _ := testredis.StartReplicated(b)
	ctx := context.Background()
	for _, wait := range []string{"0", "1"} {
		c := testRedisClient(b, primary.URL()+"?wait_replicas="+wait)
		b.Run("wait_replicas="+wait, func(b *testing.B) {
			for b.Loop() {
				if err := c.eval(ctx, writeScript, []string{"bench"}, "v").Err(); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("wait_replicas="+wait+"/parallel", func(b *testing.B) {
			b.SetParallelism(16)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := c.eval(ctx, writeScript, []string{"bench"}, "v").Err(); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
