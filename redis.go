package trivialsecwebhook

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
)

// The Redis replay store is shared by every Caddy instance behind a load
// balancer: a delivery accepted by one is refused by all. It fails closed:
// when Redis does not answer, deliveries get 503, never an unchecked pass.

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

type redisStore struct {
	client *redisClient
	prefix string
}

// newRedisStore takes the client for the URL; it connects on first use.
func newRedisStore(rawURL, prefix string) (*redisStore, error) {
	client, err := loadRedisClient(rawURL)
	if err != nil {
		return nil, fmt.Errorf("replay redis: %w", err)
	}
	return &redisStore{client: client, prefix: prefix}, nil
}

// redisClient is one Redis client, shared by every store (replay and spool)
// that names its URL, and kept across reloads.
type redisClient struct {
	*redis.Client
	key string // in redisClients
}

// Destruct closes the client with the last store using it.
func (c *redisClient) Destruct() error { return c.Close() }

// redisClients keeps one client per URL.
var redisClients = caddy.NewUsagePool()

// loadRedisClient takes the client of rawURL over from an earlier config or
// another store, or makes it. Give it back with release. Errors never show
// the URL, which may hold a password.
func loadRedisClient(rawURL string) (*redisClient, error) {
	v, _, err := redisClients.LoadOrNew(rawURL, func() (caddy.Destructor, error) {
		opts, err := redis.ParseURL(rawURL)
		if err != nil {
			if urlErr, ok := errors.AsType[*url.Error](err); ok {
				err = urlErr.Err
			}
			return nil, fmt.Errorf("the URL does not parse (%v): write it as redis://[user:password@]host:port[/db], or rediss:// for TLS", err)
		}
		opts.DialTimeout, opts.ReadTimeout, opts.WriteTimeout = redisTimeout, redisTimeout, redisTimeout
		opts.MaxRetries = 1
		return &redisClient{Client: redis.NewClient(opts), key: rawURL}, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*redisClient), nil
}

// release lets go of the client.
func (c *redisClient) release() error {
	_, err := redisClients.Delete(c.key)
	return err
}

func (s *redisStore) reserve(ctx context.Context, id uuid.UUID, expires, now time.Time) (reservation, replayResult, error) {
	ttl := expires.Sub(now)
	if ttl <= 0 {
		return reservation{}, replayReserved, nil // nothing to remember
	}
	r := reservation{token: randomHex(16)}
	ctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	ok, err := s.client.SetNX(ctx, s.prefix+id.String(), r.token, ttl).Result()
	switch {
	case err != nil:
		return r, 0, err
	case !ok:
		return r, replayDuplicate, nil
	}
	return r, replayReserved, nil
}

func (s *redisStore) release(ctx context.Context, id uuid.UUID, r reservation) error {
	if r.token == "" {
		return nil
	}
	// The request's context may be done already (the client went away);
	// the release must still happen.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), redisTimeout)
	defer cancel()
	return releaseScript.Run(ctx, s.client, []string{s.prefix + id.String()}, r.token).Err()
}

// randomHex is n random bytes, in hex: a lease's or a reservation's value.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// ping checks that Redis answers.
func (s *redisStore) ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, redisTimeout)
	defer cancel()
	return s.client.Ping(ctx).Err()
}

// Destruct lets go of the client, with the last config using the store.
func (s *redisStore) Destruct() error { return s.client.release() }

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
