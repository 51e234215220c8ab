package trivialsecwebhook

import (
	"context"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(new(Handover))
}

// Handover is a listener wrapper for a socket that outlives the Caddy
// process, as a systemd socket unit's does (`bind fd/3`): it lets the
// connections that arrive while one process stops and the next starts wait
// in the kernel's accept queue, rather than be accepted by a process that
// cannot serve them (docs/deploying.md). The sender never retries, so each
// such connection is a lost delivery.
//
//   - A stopping config accepts nothing more: Caddy stops its servers with
//     Go's http.Server.Shutdown, which closes a connection it accepted but
//     had not read a request from yet, unanswered. With shutdown_delay, the
//     connections accepted before the stop began are read, and answered,
//     before Shutdown. On a reload, the new config already accepts on the
//     same sockets; on an exit, the next process will.
//   - A config accepts nothing on a TLS server until Caddy's certificate
//     cache holds a certificate for each of the server's names that has one
//     in storage (at most cert_wait): Caddy loads certificates in the
//     background once its listeners are open, and a handshake before then
//     fails. A name with none yet is being obtained, which can take an
//     ACME challenge on these very listeners: it is not waited for. On a
//     reload, the cache has them already.
type Handover struct {
	// CertWait bounds the wait for certificates at start. Default: 10s.
	CertWait caddy.Duration `json:"cert_wait,omitempty"`

	ctx       caddy.Context
	server    *caddyhttp.Server // the server whose listeners it wraps
	mu        sync.Mutex
	listeners []*handoverListener
}

// CaddyModule returns the Caddy module information.
func (*Handover) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.listeners.trivialsec_webhook_handover",
		New: func() caddy.Module { return new(Handover) },
	}
}

const defaultCertWait = 10 * time.Second

// Provision subscribes to the config's stop.
func (h *Handover) Provision(ctx caddy.Context) error {
	h.ctx = ctx
	h.server, _ = ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if h.CertWait == 0 {
		h.CertWait = caddy.Duration(defaultCertWait)
	}
	events, err := ctx.App("events")
	if err != nil {
		return err
	}
	return events.(*caddyevents.App).On("stopping", h)
}

// Handle stops the listeners from accepting when the config stops.
func (h *Handover) Handle(context.Context, caddy.Event) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, l := range h.listeners {
		l.stopAccepting()
	}
	return nil
}

// WrapListener wraps a server's listener.
func (h *Handover) WrapListener(inner net.Listener) net.Listener {
	l := &handoverListener{Listener: inner, h: h, closed: make(chan struct{})}
	h.mu.Lock()
	h.listeners = append(h.listeners, l)
	h.mu.Unlock()
	return l
}

// UnmarshalCaddyfile reads `trivialsec_webhook_handover [{ cert_wait <duration> }]`.
func (h *Handover) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the wrapper's name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "cert_wait":
			if !d.NextArg() {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(d.Val())
			if err != nil || dur <= 0 {
				return d.Errf("cert_wait %q: want a positive duration, such as 10s", d.Val())
			}
			h.CertWait = caddy.Duration(dur)
			if d.NextArg() {
				return d.ArgErr()
			}
		default:
			return d.Errf("unknown setting %q of trivialsec_webhook_handover: use cert_wait", d.Val())
		}
	}
	return nil
}

type handoverListener struct {
	net.Listener
	h       *Handover
	ready   sync.Once
	stop    sync.Once
	stopped bool // guarded by stop: set before the inner listener is closed
	closed  chan struct{}
	close   sync.Once
}

// Accept waits for the certificates once, then accepts, until the config
// stops: then it accepts nothing more, and waits for Shutdown to close it.
func (l *handoverListener) Accept() (net.Conn, error) {
	l.ready.Do(func() { l.h.waitForCertificates(l.closed) })
	conn, err := l.Listener.Accept()
	if err != nil && l.isStopped() {
		<-l.closed
		return nil, net.ErrClosed
	}
	return conn, err
}

func (l *handoverListener) isStopped() bool {
	l.h.mu.Lock()
	defer l.h.mu.Unlock()
	return l.stopped
}

// stopAccepting ends the Accept under way and every later one: closing
// the config's listener leaves the socket, and its queue, to the next
// config, or (held by systemd, or the launcher) to the next process. Call
// with l.h.mu held.
func (l *handoverListener) stopAccepting() {
	l.stopped = true
	l.stop.Do(func() { _ = l.Listener.Close() })
}

// Close is Shutdown's: it releases an Accept that stopped.
func (l *handoverListener) Close() error {
	l.close.Do(func() { close(l.closed) })
	l.h.mu.Lock()
	defer l.h.mu.Unlock()
	var err error
	l.stop.Do(func() { err = l.Listener.Close() })
	return err
}

// waitForCertificates waits, at most cert_wait or until the listener is
// closed, until Caddy's certificate cache holds a certificate for each
// name the server serves over TLS, by its host matchers (those automatic
// HTTPS does not skip). It reads the cache through its lock only: the TLS
// app itself is still being started (Manage) as the servers accept.
func (h *Handover) waitForCertificates(closed <-chan struct{}) {
	deadline := time.Now().Add(time.Duration(h.CertWait))
	// Storage is read for the names the cache lacks only (on a reload,
	// none), within the wait.
	names := uncached(h.tlsNames())
	if len(names) == 0 {
		return
	}
	ctx, cancel := context.WithDeadline(h.ctx, deadline)
	names = h.stored(ctx, names)
	cancel()
	for len(names) > 0 {
		missing := uncached(names)
		if len(missing) == 0 {
			return
		}
		if time.Now().After(deadline) {
			caddy.Log().Named("trivialsec_webhook_handover").Warn("accepting connections without a certificate for some names: TLS handshakes for them fail until one is loaded",
				zap.Strings("names", missing), zap.Duration("waited", time.Duration(h.CertWait)))
			return
		}
		select {
		case <-closed:
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// uncached are those of names that Caddy's certificate cache holds no
// certificate for.
func uncached(names []string) []string {
	var out []string
	for _, name := range names {
		if len(caddytls.AllMatchingCertificates(name)) == 0 {
			out = append(out, name)
		}
	}
	return out
}

// stored are those of names with a certificate in Caddy's storage, from
// any issuer: certmagic keeps one at certificates/<issuer>/<name>/<name>.crt.
func (h *Handover) stored(ctx context.Context, names []string) []string {
	keys, err := h.ctx.Storage().List(ctx, "certificates", true)
	if err != nil {
		return nil
	}
	var out []string
	for _, name := range names {
		safe := certmagic.StorageKeys.Safe(name)
		for _, k := range keys {
			if strings.HasSuffix(k, "/"+safe+"/"+safe+".crt") {
				out = append(out, name)
				break
			}
		}
	}
	return out
}

// tlsNames are the host names of the server's routes, if it has TLS
// connection policies, but those with a wildcard or a placeholder and those
// automatic HTTPS skips.
func (h *Handover) tlsNames() []string {
	srv := h.server
	if srv == nil || len(srv.TLSConnPolicies) == 0 {
		return nil
	}
	skip := map[string]bool{}
	if a := srv.AutoHTTPS; a != nil {
		for _, n := range append(a.Skip, a.SkipCerts...) {
			skip[n] = true
		}
	}
	var names []string
	for _, route := range srv.Routes {
		for _, set := range route.MatcherSets {
			for _, m := range set {
				var hosts caddyhttp.MatchHost
				switch hm := m.(type) {
				case caddyhttp.MatchHost:
					hosts = hm
				case *caddyhttp.MatchHost:
					hosts = *hm
				}
				for _, n := range hosts {
					if !skip[n] && !strings.ContainsAny(n, "*{") {
						names = append(names, n)
					}
				}
			}
		}
	}
	return names
}

var (
	_ caddy.ListenerWrapper = (*Handover)(nil)
	_ caddy.Provisioner     = (*Handover)(nil)
	_ caddyfile.Unmarshaler = (*Handover)(nil)
	_ caddyevents.Handler   = (*Handover)(nil)
)
