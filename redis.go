package trivialsecwebhook

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// The Redis replay store is shared by every Caddy instance behind a load
// balancer: a delivery accepted by one is refused by all. It fails closed:
// when Redis does not answer, a delivery is never passed on unchecked: it
// is held on this instance's disk, checked once Redis answers (the spool
// on), or refused with 503 (the spool off).

// redisTimeout bounds every Redis call, dial included.
const redisTimeout = time.Second

// defaultRedisKeyPrefix starts every key the store writes; the event ID
// follows.
const defaultRedisKeyPrefix = "trivialsec_webhook:replay:"

// releaseScript deletes the key only if it still holds our reservation's
// token: a reservation that expired and was taken by another delivery is
// never removed.
var releaseScript = redis.NewScript(`
if redis.call("GET", KEYS[1]) == ARGV[1] then
	return redis.call("DEL", KEYS[1])
end
return 0`)

// reserveScript takes the key for a reservation's token, unless another
// token holds it; the same token again finds it taken already, and is
// reserved: a held delivery checked again, or a write whose outcome was
// unknown, is not its own replay.
var reserveScript = redis.NewScript(`
local v = redis.call("GET", KEYS[1])
if v == ARGV[1] then return 1 end
if v then return 0 end
redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
return 1`)

type redisStore struct {
	client *redisClient
	prefix string
	guard  *redisGuard

	// Reservations to give back once Redis answers: their write, or their
	// release, failed without an answer, and may have run.
	mu        sync.Mutex
	unsettled []unsettled
	settling  bool
	done      chan struct{} // closed by Destruct
}

// unsettled is a reservation that may be in Redis, and should not be.
type unsettled struct {
	id      uuid.UUID
	token   string
	expires time.Time
}

// maxUnsettled bounds what waits to be released: past it, a reservation
// that ran is refused until it expires, as the log says.
const maxUnsettled = 100_000

// newRedisStore takes the client for the URL; it connects on first use.
func newRedisStore(rawURL, prefix string) (*redisStore, error) {
	client, err := loadRedisClient(rawURL)
	if err != nil {
		return nil, fmt.Errorf("replay redis: %w", err)
	}
	return &redisStore{client: client, prefix: prefix, guard: client.guard(replayUse, prefix), done: make(chan struct{})}, nil
}

func (s *redisStore) reserve(ctx context.Context, id uuid.UUID, expires, now time.Time) (reservation, replayResult, error) {
	r := reservation{token: randomHex(16), expires: expires.UnixNano()}
	result, err := s.reserveAs(ctx, id, r.token, expires, now)
	return r, result, err
}

// reserveAs reserves id for token: replayReserved if the key was free or
// holds token already.
func (s *redisStore) reserveAs(ctx context.Context, id uuid.UUID, token string, expires, now time.Time) (replayResult, error) {
	ttl := expires.Sub(now)
	if ttl <= 0 {
		return replayReserved, nil // nothing to remember
	}
	ctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	if err := s.guard.usable(ctx); err != nil {
		return 0, err
	}
	ok, err := s.client.eval(ctx, reserveScript, []string{s.prefix + id.String()}, token, ttl.Milliseconds()).Int()
	switch {
	case err != nil:
		s.guard.stale()
		return 0, err
	case ok == 0:
		return replayDuplicate, nil
	}
	return replayReserved, nil
}

func (s *redisStore) release(ctx context.Context, id uuid.UUID, r reservation) error {
	if r.token == "" {
		return nil
	}
	// The request's context may be done already (the client went away);
	// the release must still happen.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), redisTimeout)
	defer cancel()
	err := s.client.eval(ctx, releaseScript, []string{s.prefix + id.String()}, r.token).Err()
	if err != nil {
		s.guard.stale()
	}
	return err
}

// settleLater releases r once Redis answers: its reservation, or its
// release, failed without an answer, and may have run (or run later, when
// Redis resumes). A reservation that is no longer ours, or has expired, is
// left alone.
func (s *redisStore) settleLater(id uuid.UUID, r reservation) {
	if r.token == "" {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.unsettled) >= maxUnsettled {
		caddy.Log().Named("http.handlers.trivialsec_webhook").Warn("replay store redis: too many reservations wait to be released: this one is not; if its write ran, a resend of the event is refused until its token expires",
			zap.String("event_id", id.String()))
		return
	}
	s.unsettled = append(s.unsettled, unsettled{id: id, token: r.token, expires: time.Unix(0, r.expires)})
	if !s.settling {
		s.settling = true
		go s.settle()
	}
}

// settle releases the unsettled reservations, trying again every
// storeDownWait while Redis does not answer, until none is left or the
// store stops.
func (s *redisStore) settle() {
	log := caddy.Log().Named("http.handlers.trivialsec_webhook")
	for {
		s.mu.Lock()
		batch := s.unsettled
		s.unsettled = nil
		if len(batch) == 0 {
			s.settling = false
			s.mu.Unlock()
			return
		}
		s.mu.Unlock()
		var left []unsettled
		for i, u := range batch {
			if time.Now().After(u.expires) {
				continue // if it ran, it has expired
			}
			ctx, cancel := context.WithTimeout(context.Background(), redisTimeout)
			n, err := s.client.eval(ctx, releaseScript, []string{s.prefix + u.id.String()}, u.token).Int()
			cancel()
			if err != nil {
				left = append(left, batch[i:]...)
				break
			}
			if n == 1 {
				log.Info("replay store redis: a reservation whose outcome was unknown had been written: released it, so that a resend of the event is accepted",
					zap.String("event_id", u.id.String()))
			}
		}
		if len(left) == 0 {
			continue
		}
		s.mu.Lock()
		s.unsettled = append(left, s.unsettled...)
		s.mu.Unlock()
		select {
		case <-s.done:
			log.Warn("replay store redis: stopped with reservations whose outcome is unknown: if they were written, a resend of those events is refused until their tokens expire",
				zap.Int("reservations", len(left)))
			return
		case <-time.After(storeDownWait):
		}
	}
}

// randomHex is n random bytes, in hex: a lease's or a reservation's value.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Destruct lets go of the client, with the last config using the store.
func (s *redisStore) Destruct() error {
	close(s.done)
	return s.client.release()
}

// loadRedisStore takes the client for this URL and prefix over from an
// earlier config, or makes it, and returns it with its key in replayStores.
func loadRedisStore(rawURL, prefix string) (*redisStore, string, error) {
	key := "redis:" + prefix + "|" + rawURL
	v, _, err := replayStores.LoadOrNew(key, func() (caddy.Destructor, error) {
		return newRedisStore(rawURL, prefix)
	})
	if err != nil {
		return nil, "", err
	}
	return v.(*redisStore), key, nil
}
