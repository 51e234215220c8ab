package trivialsecwebhook

import (
	"errors"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("trivialsec_webhook", parseCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("trivialsec_webhook", httpcaddyfile.After, "request_body")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Handler)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	trivialsec_webhook [<matcher>] {
//		account  <account name>
//		secret   <secret> [<secret>...]
//		subject  <uuid>
//		issuer   <url>
//		endpoint <url>
//		leeway   <duration>
//		max_body <size>
//		max_depth <levels>
//		events   <name> [<name>...]
//		replay   off | memory [<max_entries>] | redis <url> [<key_prefix>]
//		strip_authorization
//		spool    off
//		spool {
//			store    file [<dir>] | redis <url> [<key_prefix>]
//			claim_after <duration>
//			mode     fallback | always
//			backoff  <min> <max>
//			max_age  <duration>
//			max_size <size>
//			attempt_timeout <duration>
//		}
//	}
//
// account and secret are required; everything else has a default.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.Errf("trivialsec_webhook takes its settings in a block, not as arguments: found %q", d.Val())
	}
	seen := make(map[string]bool)
	for d.NextBlock(0) {
		sub := d.Val()
		if seen[sub] {
			return d.Errf("%s is set twice: give it once (it takes several values on one line where that makes sense)", sub)
		}
		seen[sub] = true

		switch sub {
		case "account":
			if !d.AllArgs(&h.Account) {
				return d.ArgErr()
			}
		case "secret":
			h.Secret = d.RemainingArgs()
			if len(h.Secret) == 0 {
				return d.Errf("secret needs a value: {env.NAME} or {file.PATH}, several during a key rotation")
			}
		case "subject":
			if !d.AllArgs(&h.Subject) {
				return d.ArgErr()
			}
			if _, err := parseSubject(h.Subject); err != nil {
				return d.WrapErr(err)
			}
		case "issuer":
			if !d.AllArgs(&h.Issuer) {
				return d.ArgErr()
			}
		case "endpoint":
			if !d.AllArgs(&h.Endpoint) {
				return d.ArgErr()
			}
		case "leeway":
			var s string
			if !d.AllArgs(&s) {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(s)
			if err != nil {
				return d.Errf("leeway %q is not a duration: write it like 3s", s)
			}
			if dur < 0 {
				return d.Errf("leeway %q is negative: write it like 3s", s)
			}
			leeway := caddy.Duration(dur)
			h.Leeway = &leeway
		case "max_body":
			var s string
			if !d.AllArgs(&s) {
				return d.ArgErr()
			}
			size, err := humanize.ParseBytes(s)
			if err != nil || size == 0 || size > 1<<40 {
				return d.Errf("max_body %q is not a size: write it like 10MiB", s)
			}
			h.MaxBody = int64(size)
		case "max_depth":
			var s string
			if !d.AllArgs(&s) {
				return d.ArgErr()
			}
			n, err := strconv.Atoi(s)
			if err != nil || n < 1 || n > maxJSONDepth {
				return d.Errf("max_depth %q: write a whole number from 1 to %d", s, maxJSONDepth)
			}
			h.MaxDepth = n
		case "events":
			h.Events = d.RemainingArgs()
			if len(h.Events) == 0 {
				return d.Errf("events needs at least one event name: %s", strings.Join(eventNames[:], ", "))
			}
			if _, err := parseEvents(h.Events); err != nil {
				return d.WrapErr(err)
			}
		case "replay":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.Errf("replay needs a store: off, memory [<max_entries>] or redis <url> [<key_prefix>]")
			}
			h.Replay = &Replay{Store: args[0]}
			switch {
			case args[0] == "off" && len(args) == 1:
			case args[0] == "memory" && len(args) == 1:
			case args[0] == "memory" && len(args) == 2:
				n, err := strconv.Atoi(args[1])
				if err != nil || n <= 0 {
					return d.Errf("replay memory %q: max_entries must be a positive whole number", args[1])
				}
				h.Replay.MaxEntries = n
			case args[0] == "redis" && (len(args) == 2 || len(args) == 3):
				if err := checkRedisURL(args[1]); err != nil {
					return d.Errf("replay redis: %v", err)
				}
				h.Replay.URL = args[1]
				if len(args) == 3 {
					h.Replay.KeyPrefix = args[2]
				}
			case args[0] == "redis":
				return d.Errf("replay redis takes a URL and an optional key prefix: replay redis redis://127.0.0.1:6379 [<key_prefix>]")
			default:
				return d.Errf("replay takes off, memory [<max_entries>] or redis <url> [<key_prefix>]: found %q", strings.Join(args, " "))
			}
		case "strip_authorization":
			if d.NextArg() {
				return d.ArgErr()
			}
			h.StripAuthorization = true
		case "spool":
			spool, err := parseSpool(d)
			if err != nil {
				return err
			}
			h.Spool = spool
		default:
			return d.Errf("unknown subdirective %q: use account, secret, subject, issuer, endpoint, leeway, max_body, max_depth, events, replay, strip_authorization or spool", sub)
		}
	}
	if err := h.checkRequired(); err != nil {
		d.Reset() // report it at the directive's own line
		d.Next()
		return d.WrapErr(err)
	}
	return nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Handler)(nil)

// checkRedisURL checks the form of a Redis URL; Provision parses it.
func checkRedisURL(raw string) error {
	if !strings.HasPrefix(raw, "redis://") && !strings.HasPrefix(raw, "rediss://") && !secretPlaceholder.MatchString(raw) {
		return errors.New("the URL must start with redis:// or rediss://, or be a placeholder such as {env.REDIS_URL}")
	}
	return nil
}

// parseSpool reads `spool off`, or a spool block.
func parseSpool(d *caddyfile.Dispenser) (*Spool, error) {
	s := new(Spool)
	switch args := d.RemainingArgs(); {
	case len(args) == 1 && args[0] == "off":
		s.Store = "off"
	case len(args) > 0:
		return nil, d.Errf("spool takes off, or its settings in a block: found %q", strings.Join(args, " "))
	}
	seen := make(map[string]bool)
	var claimErr error // claim_after without store redis, at its line
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if s.Store == "off" {
			return nil, d.Errf("spool off takes no settings: found %q", sub)
		}
		if seen[sub] {
			return nil, d.Errf("spool %s is set twice", sub)
		}
		seen[sub] = true
		args := d.RemainingArgs()
		duration := func(v string) (caddy.Duration, error) {
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur <= 0 {
				return 0, d.Errf("spool %s %q is not a positive duration: write it like 30s, 10m or 72h", sub, v)
			}
			return caddy.Duration(dur), nil
		}
		var err error
		switch {
		case sub == "store" && len(args) >= 1 && len(args) <= 2 && args[0] == "file":
			s.Store = "file"
			if len(args) == 2 {
				s.Dir = args[1]
			}
		case sub == "store" && len(args) >= 2 && len(args) <= 3 && args[0] == "redis":
			if err := checkRedisURL(args[1]); err != nil {
				return nil, d.Errf("spool store redis: %v", err)
			}
			s.Store, s.URL = "redis", args[1]
			if len(args) == 3 {
				s.KeyPrefix = args[2]
			}
		case sub == "store":
			return nil, d.Errf("spool store takes file [<dir>] or redis <url> [<key_prefix>]: found %q", strings.Join(args, " "))
		case sub == "mode" && len(args) == 1:
			s.Mode = args[0]
		case sub == "backoff" && len(args) == 2:
			s.Backoff = make([]caddy.Duration, 2)
			for i, v := range args {
				if s.Backoff[i], err = duration(v); err != nil {
					return nil, err
				}
			}
		case (sub == "max_age" || sub == "attempt_timeout" || sub == "claim_after") && len(args) == 1:
			dur, err := duration(args[0])
			if err != nil {
				return nil, err
			}
			switch sub {
			case "max_age":
				s.MaxAge = dur
			case "attempt_timeout":
				s.AttemptTimeout = dur
			default:
				s.ClaimAfter = dur
			}
		case sub == "redrive_concurrency" && len(args) == 1:
			n, err := strconv.Atoi(args[0])
			if err != nil || n < 1 {
				return nil, d.Errf("spool redrive_concurrency %q is not a positive whole number: write it like 4", args[0])
			}
			s.RedriveConcurrency = n
		case sub == "redrive_rate" && len(args) == 1:
			r, err := strconv.ParseFloat(args[0], 64)
			if err != nil || !(r > 0) {
				return nil, d.Errf("spool redrive_rate %q is not a positive number of deliveries a second: write it like 50, or 0.5", args[0])
			}
			s.RedriveRate = r
		case sub == "max_size" && len(args) == 1:
			size, err := humanize.ParseBytes(args[0])
			if err != nil || size == 0 || size > 1<<50 {
				return nil, d.Errf("spool max_size %q is not a size: write it like 1GiB", args[0])
			}
			s.MaxSize = int64(size)
		case sub == "mode" || sub == "backoff" || sub == "max_age" || sub == "attempt_timeout" || sub == "max_size" || sub == "claim_after" ||
			sub == "redrive_concurrency" || sub == "redrive_rate":
			return nil, d.ArgErr()
		default:
			return nil, d.Errf("unknown spool setting %q: use store, mode, backoff, max_age, max_size, attempt_timeout, claim_after, redrive_concurrency or redrive_rate", sub)
		}
		if sub == "claim_after" && s.Store != "redis" {
			claimErr = d.Errf("spool claim_after is for store redis: store redis <url> [<key_prefix>]")
		}
		if err := s.validateFields(); err != nil {
			return nil, d.WrapErr(err)
		}
	}
	if claimErr != nil && s.Store != "redis" {
		return nil, claimErr
	}
	return s, nil
}
