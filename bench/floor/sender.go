package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
)

// batch is a run of pre-encoded HTTP/1.1 requests, each a unique delivery,
// end to end in one buffer: request i is buf[off[i]:off[i+1]].
type batch struct {
	buf []byte
	off []int
}

func (b *batch) len() int { return len(b.off) - 1 }

func (b *batch) request(i int) []byte { return b.buf[b.off[i]:b.off[i+1]] }

// slice is requests [from, to) of b, sharing its buffer.
func (b *batch) slice(from, to int) batch { return batch{buf: b.buf, off: b.off[from : to+1]} }

// padding fills bodies up to -body; mint grows it as it needs.
var padding = bytes.Repeat([]byte("x"), 4096)

// mint fills b with count unique deliveries for account, addressed to host,
// each with its own event ID, and a body of bodySize bytes (or testkit's
// own size, if that is larger): testkit.Mint's body with a "pad" member
// added to its payload. The token binds the event ID, not the body, so the
// padded delivery stays valid. It reuses b's memory.
func (b *batch) mint(account, host string, count, bodySize int) error {
	b.buf, b.off = b.buf[:0], append(b.off[:0], 0)
	now := time.Now()
	for range count {
		id := uuid.NewString()
		auth, body := testkit.Mint(secret, account, id, id, now)
		const end = `{"n": 1}}`
		const padMember = `, "pad": ""`
		if len(body) < len(end) || body[len(body)-len(end):] != end {
			return fmt.Errorf("testkit.Mint's body no longer ends in %s: teach bench/floor to pad it", end)
		}
		size, pad := len(body), 0
		if bodySize > len(body)+len(padMember) {
			pad = bodySize - len(body) - len(padMember)
			if pad > len(padding) {
				padding = bytes.Repeat([]byte("x"), pad)
			}
			size = len(body) + len(padMember) + pad
		}
		b.buf = append(b.buf, "POST /webhook/trivialsec HTTP/1.1\r\nHost: "...)
		b.buf = append(b.buf, host...)
		b.buf = append(b.buf, "\r\nUser-Agent: Trivial Security\r\nAuthorization: "...)
		b.buf = append(b.buf, auth...)
		b.buf = append(b.buf, "\r\nContent-Length: "...)
		b.buf = strconv.AppendInt(b.buf, int64(size), 10)
		b.buf = append(b.buf, "\r\n\r\n"...)
		if pad == 0 {
			b.buf = append(b.buf, body...)
		} else {
			b.buf = append(b.buf, body[:len(body)-2]...)
			b.buf = append(b.buf, `, "pad": "`...)
			b.buf = append(b.buf, padding[:pad]...)
			b.buf = append(b.buf, `"}}`...)
		}
		b.off = append(b.off, len(b.buf))
	}
	return nil
}

// stallLimit is how long the sender waits for any answer before it gives up.
const stallLimit = 30 * time.Second

// sender holds conc keep-alive connections to one site, each used by one
// goroutine at a time, which writes a pre-encoded request and reads the
// answer with a small parser: no net/http client, so that the sender's own
// CPU stays small beside Caddy's.
type sender struct {
	addr string
	mu   sync.Mutex // guards conns, which a stall closes
	// conns are the open connections, one per goroutine.
	conns []*conn
}

type conn struct {
	nc net.Conn
	br *bufio.Reader
}

func dial(addr string) (*conn, error) {
	nc, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	return &conn{nc: nc, br: bufio.NewReaderSize(nc, 4096)}, nil
}

func newSender(addr string, conc int) (*sender, error) {
	s := &sender{addr: addr}
	for range conc {
		c, err := dial(addr)
		if err != nil {
			s.close()
			return nil, err
		}
		s.conns = append(s.conns, c)
	}
	return s, nil
}

func (s *sender) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.nc.Close()
	}
}

// send posts every request of b, len(s.conns) at a time, and puts each one's
// latency (from the write to the end of the answer) in lat[i]. An answer
// other than 200 or 202, a broken connection, or no answer at all for
// stallLimit is an error.
func (s *sender) send(b batch, lat []time.Duration) error {
	n := b.len()
	var next, answered atomic.Int64
	var failed atomic.Bool
	var errOnce sync.Once
	var firstErr error
	fail := func(err error) {
		errOnce.Do(func() { firstErr = err })
		failed.Store(true)
	}
	stop := make(chan struct{})
	watchdogDone := make(chan struct{})
	go func() {
		// The watchdog: a stall closes the connections, which ends the
		// reads in progress.
		defer close(watchdogDone)
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		last, since := answered.Load(), time.Now()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if a := answered.Load(); a != last {
				last, since = a, time.Now()
				continue
			}
			if time.Since(since) > stallLimit {
				fail(fmt.Errorf("no answer for %s (%d of %d answered)", stallLimit, last, n))
				s.close()
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for w := range s.conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := s.conns[w]
			var snippet [512]byte
			for !failed.Load() {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				start := time.Now()
				if _, err := c.nc.Write(b.request(i)); err != nil {
					fail(fmt.Errorf("writing delivery %d: %w", i, err))
					return
				}
				status, body, closing, err := readAnswer(c.br, snippet[:0])
				lat[i] = time.Since(start)
				answered.Add(1)
				if err != nil {
					fail(fmt.Errorf("reading the answer to delivery %d: %w", i, err))
					return
				}
				if status != 200 && status != 202 {
					fail(fmt.Errorf("delivery %d answered %d: %q", i, status, body))
					return
				}
				if closing {
					nc, err := dial(s.addr)
					if err != nil {
						fail(err)
						return
					}
					s.mu.Lock()
					c.nc.Close()
					s.conns[w], c = nc, nc
					s.mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-watchdogDone
	return firstErr
}

// maxHeaders bounds the header lines of one answer.
const maxHeaders = 100

// readAnswer reads one HTTP/1.1 answer: its status, up to cap(snippet) bytes
// of its body when the status is neither 200 nor 202 (for the error), and
// whether the server closes the connection after it. It reads bodies by
// Content-Length or chunked; interim 1xx answers are skipped.
func readAnswer(br *bufio.Reader, snippet []byte) (status int, body []byte, closing bool, err error) {
	for range 10 {
		status, closing, err = readAnswerOnce(br, &snippet)
		if err != nil || status >= 200 || status == 101 {
			return status, snippet, closing, err
		}
	}
	return 0, nil, false, errors.New("more than 10 interim answers")
}

func readAnswerOnce(br *bufio.Reader, snippet *[]byte) (status int, closing bool, err error) {
	line, err := br.ReadSlice('\n')
	if err != nil {
		return 0, false, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || line[8] != ' ' {
		return 0, false, fmt.Errorf("not an HTTP/1.x status line: %q", line)
	}
	status, err = strconv.Atoi(string(line[9:12]))
	if err != nil {
		return 0, false, fmt.Errorf("status line %q: %w", line, err)
	}
	closing = line[7] == '0' // HTTP/1.0 closes unless it says keep-alive; the sender does not ask
	length, chunked := int64(-1), false
	for h := 0; ; h++ {
		if h == maxHeaders {
			return 0, false, fmt.Errorf("more than %d header lines", maxHeaders)
		}
		line, err := br.ReadSlice('\n')
		if err != nil {
			return 0, false, err
		}
		line = bytes.TrimRight(line, "\r\n")
		if len(line) == 0 {
			break
		}
		name, value, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return 0, false, fmt.Errorf("malformed header line %q", line)
		}
		value = bytes.TrimSpace(value)
		switch {
		case bytes.EqualFold(name, []byte("Content-Length")):
			if length, err = strconv.ParseInt(string(value), 10, 64); err != nil || length < 0 {
				return 0, false, fmt.Errorf("bad Content-Length %q", value)
			}
		case bytes.EqualFold(name, []byte("Transfer-Encoding")):
			chunked = bytes.Contains(bytes.ToLower(value), []byte("chunked"))
		case bytes.EqualFold(name, []byte("Connection")):
			closing = bytes.EqualFold(value, []byte("close"))
		}
	}
	keep := status != 200 && status != 202
	switch {
	case status < 200 || status == 204 || status == 304:
		return status, closing, nil
	case chunked:
		for range 1 << 20 {
			line, err := br.ReadSlice('\n')
			if err != nil {
				return 0, false, err
			}
			hexSize, _, _ := bytes.Cut(bytes.TrimRight(line, "\r\n"), []byte(";"))
			size, err := strconv.ParseInt(string(bytes.TrimSpace(hexSize)), 16, 64)
			if err != nil || size < 0 {
				return 0, false, fmt.Errorf("bad chunk size %q", line)
			}
			if size == 0 {
				// Trailers, up to the empty line.
				for range maxHeaders {
					line, err := br.ReadSlice('\n')
					if err != nil {
						return 0, false, err
					}
					if len(bytes.TrimRight(line, "\r\n")) == 0 {
						return status, closing, nil
					}
				}
				return 0, false, fmt.Errorf("more than %d trailer lines", maxHeaders)
			}
			if err := discard(br, size, keep, snippet); err != nil {
				return 0, false, err
			}
			if err := discard(br, 2, false, nil); err != nil { // the chunk's CRLF
				return 0, false, err
			}
		}
		return 0, false, errors.New("more than 2^20 chunks")
	case length >= 0:
		return status, closing, discard(br, length, keep, snippet)
	default:
		// No length: the body runs to the end of the connection. Neither
		// Caddy nor net/http answers so; read a little for the error.
		if keep {
			if err := discard(br, min(int64(br.Buffered()), 512), keep, snippet); err != nil {
				return 0, false, err
			}
		}
		return status, true, errors.New("an answer without Content-Length or chunked encoding")
	}
}

// discard skips n bytes of br, and copies the first of them into snippet if
// keep is set.
func discard(br *bufio.Reader, n int64, keep bool, snippet *[]byte) error {
	if keep {
		room := int64(cap(*snippet) - len(*snippet))
		if peek, _ := br.Peek(int(min(n, room, int64(br.Size())))); len(peek) > 0 {
			*snippet = append(*snippet, peek...)
		}
	}
	for n > 0 {
		step := int(min(n, 1<<30))
		d, err := br.Discard(step)
		n -= int64(d)
		if err != nil {
			return err
		}
	}
	return nil
}
