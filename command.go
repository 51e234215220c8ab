package trivialsecwebhook

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/dustin/go-humanize"
	"github.com/golang-jwt/jwt/v5"
	"github.com/google/uuid"
	"github.com/spf13/cobra"
)

// The `caddy trivialsec-webhook` command mints deliveries exactly as Trivial
// Security's production sender does, to test a receiver end to end without
// the SaaS; salvages a damaged spool store (spool salvage); and lists and
// drains the spool of a running Caddy (spool list|summary|retry|delete,
// spool_command.go).

// secretEnv is the environment variable the command reads the signing
// secret from, unless --secret-file is given.
const secretEnv = "TRIVIALSEC_WEBHOOK_SECRET"

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "trivialsec-webhook",
		Usage: "sign|send --account <name> [flags] | spool salvage <dir> | spool list|summary|retry|delete [flags]",
		Short: "Mints or sends a Trivial Security webhook delivery; watches, drains and salvages the spool",
		Long: `
Mints a webhook delivery exactly as Trivial Security's production sender does:
a bare HS256 token (no "Bearer"), sub as 32 hex digits, aud an array, nbf 3 s
ahead, evn and cep claims, and a body written as Python's json.dumps writes it.
--style documented mints the published example's form instead: "Bearer", sub
as urn:uuid:..., aud a string, no evn or cep.

  sign   prints the Authorization value on the first line, the body on the second
  send   posts the delivery to --url as the sender does (no Content-Type,
         User-Agent "Trivial Security"), prints the status line, and exits 0 on
         2xx, 1 otherwise

The signing secret comes from the file named by --secret-file, or from the
TRIVIALSEC_WEBHOOK_SECRET environment variable; never from a flag value,
which other users could read in the process list.

  spool salvage <dir>
         copies every readable delivery and replay reservation of the damaged
         spool store <dir>/spool.db into a new spool.db, and keeps the damaged
         file beside it as spool.db.damaged-<time>; prints what it copied and
         what it could not read, and exits 0 once the new file is in place.
         Caddy says when a spool store is damaged, and runs without it until
         it opens; a Caddy running with the store open holds its lock, and
         the store is then not damaged: salvage refuses it.

  spool list [filters] [--limit <n>] [--next <cursor> | --all-pages] [--json]
         lists the entries of a running Caddy's spool, oldest first, a page
         at a time
  spool summary [--json]
         sums it up: by state, by event name, the oldest pending entry, the
         next attempt, the breakers
  spool retry <event_id>... | [filters] | --all
         delivers the entries again now, dead letters too
  spool delete <event_id>... | [filters] | --all
         drops them
         These four ask the admin API of the running Caddy, at --address,
         or at the admin address of the config --config names, or at
         localhost:2019; --json prints its answer, one JSON document. The
         filters are --state, --event-name, --spooled-after and
         --spooled-before. Exit status 0 when done, 1 when the admin API
         refused or failed or could not be reached, 2 for a usage mistake
         (nothing was asked of Caddy), 3 when retry or delete was given an
         event ID that is not in the spool. See "spool <command> --help".

A usage mistake (an unknown flag or subcommand, a stray argument, a bad value)
gives one line on stderr and exit status 2.
`,
		CobraFunc: func(cmd *cobra.Command) {
			sign := &cobra.Command{
				Use:   "sign --account <name> [flags]",
				Short: "Prints a signed delivery: the Authorization value, then the body",
				Args:  noArgs,
			}
			send := &cobra.Command{
				Use:   "send --url <url> --account <name> [flags]",
				Short: "Posts a signed delivery to a receiver, as the production sender does",
				Args:  noArgs,
			}
			for _, c := range []*cobra.Command{sign, send} {
				f := c.Flags()
				f.String("account", "", "account name: aud is urn:trivialsec:webhook:client_endpoint:<account> (required)")
				f.String("event", "report_created", "event name, one of the 15")
				f.String("event-id", "", "event ID, a UUID (default: a random one)")
				f.String("payload", "{}", "the payload, a JSON object, or @FILE to read it from a file")
				f.String("style", "production", "production or documented")
				f.String("issuer", defaultIssuer, "the iss claim")
				f.String("subject", defaultSubject, "the sub claim's UUID")
				f.String("endpoint", "", "the cep claim (default: --url for send, none for sign)")
				f.Duration("lifetime", 24*time.Hour, "the token's lifetime: exp = iat + lifetime")
				f.String("secret-file", "", "a file holding the signing secret (default: $"+secretEnv+")")
			}
			send.Flags().String("url", "", "the receiver's URL (required)")
			sign.RunE = func(c *cobra.Command, _ []string) error {
				d, err := deliveryFromFlags(c, "")
				if err != nil {
					return commandError(c, err)
				}
				fmt.Fprintf(c.OutOrStdout(), "Authorization: %s\n%s\n", d.authorization, d.body)
				return nil
			}
			send.RunE = func(c *cobra.Command, _ []string) error {
				url, _ := c.Flags().GetString("url")
				if url == "" {
					return commandError(c, errors.New("--url is required"))
				}
				d, err := deliveryFromFlags(c, url)
				if err != nil {
					return commandError(c, err)
				}
				code, status, body, err := d.send(url)
				if err != nil {
					return commandError(c, err)
				}
				fmt.Fprintln(c.OutOrStdout(), status)
				if code/100 == 2 {
					return nil
				}
				if reason := refusalReason(body); reason != "" {
					fmt.Fprintln(c.OutOrStdout(), "reason:", reason)
					status += " (" + reason + ")"
				}
				return commandError(c, fmt.Errorf("the receiver refused the delivery: %s", status))
			}

			spool := &cobra.Command{
				Use:   "spool salvage|list|summary|retry|delete",
				Short: "Watches and drains a running Caddy's spool; salvages a damaged spool store",
				Args:  cobra.ArbitraryArgs,
				RunE:  subcommandMissing("salvage, list, summary, retry or delete"),
			}
			salvage := &cobra.Command{
				Use:   "salvage <dir>",
				Short: "Copies what can be read of a damaged spool store into a new one",
				Long: `
Copies every readable delivery (its metadata, request and body, all three
sound) and every unexpired replay reservation of <dir>/spool.db into a new
spool.db, and keeps the old file as spool.db.damaged-<time> (UTC), beside it.
spool.db is never missing meanwhile: a Caddy that keeps trying to open the
damaged store opens the new one at its next try. Prints what it copied and
what it could not read; exits 0 once the new spool.db is in place, 1 when
nothing was changed. A spool store that a running Caddy holds open is not
damaged (Caddy keeps no damaged store open), and is refused.
`,
				Args: func(c *cobra.Command, args []string) error {
					switch {
					case len(args) == 0:
						return usageError(c, errors.New("which spool directory? give the one that holds spool.db"))
					case len(args) > 1:
						return usageError(c, fmt.Errorf("one spool directory, not %d: %q", len(args), args))
					}
					return nil
				},
				RunE: func(c *cobra.Command, args []string) error {
					report, err := salvageSpool(args[0], time.Now())
					if err != nil {
						return commandError(c, err)
					}
					fmt.Fprint(c.OutOrStdout(), salvageSummary(report))
					return nil
				},
			}
			spool.AddCommand(salvage)
			addSpoolAdminCommands(spool)
			cmd.AddCommand(sign, send, spool)

			// Every mistake is said here, once, as one line on stderr;
			// cobra says none (Caddy's root prints a returned error as
			// "Error: ..." unless the command silences it), and Caddy's
			// Main exits 1 on the error returned, 2 on a usage mistake.
			cmd.Args = cobra.ArbitraryArgs
			cmd.RunE = subcommandMissing("sign, send or spool")
			cmd.SuggestionsMinimumDistance = 2
			cmd.SetFlagErrorFunc(usageError) // the subcommands' too
			for _, c := range []*cobra.Command{cmd, sign, send, spool, salvage} {
				c.SilenceErrors = true
				c.SilenceUsage = true
			}
		},
	})
}

// commandError prints err as one line on stderr; Caddy then exits 1.
func commandError(c *cobra.Command, err error) error {
	fmt.Fprintf(c.ErrOrStderr(), "%s: %v\n", c.CommandPath(), err)
	return err
}

// usageError prints a usage mistake as one line on stderr, with where to
// read the usage; Caddy then exits 2.
func usageError(c *cobra.Command, err error) error {
	return exitStatus(c, exitUsage, commandError(c, fmt.Errorf("%w (see \"%s --help\")", err, c.CommandPath())))
}

// noArgs refuses arguments: the commands that take flags only.
func noArgs(c *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usageError(c, fmt.Errorf("unexpected argument %q: %s takes flags only", args[0], c.Name()))
	}
	return nil
}

// subcommandMissing is the RunE of a command that only has subcommands
// (named in names): it runs when none of them was given, or an unknown one.
func subcommandMissing(names string) func(*cobra.Command, []string) error {
	return func(c *cobra.Command, args []string) error {
		switch {
		case len(args) == 0:
			return usageError(c, fmt.Errorf("which subcommand? %s", names))
		case args[0] == "help":
			return c.Help()
		}
		msg := fmt.Sprintf("unknown subcommand %q: use %s", args[0], names)
		if s := c.SuggestionsFor(args[0]); len(s) > 0 {
			msg = fmt.Sprintf("unknown subcommand %q: did you mean %s?", args[0], s[0])
		}
		return usageError(c, errors.New(msg))
	}
}

// salvageSummary says, in a few lines, what a salvage did.
func salvageSummary(r salvageReport) string {
	var b strings.Builder
	fmt.Fprintf(&b, "salvaged %s and %s into %s\n", plural(r.entries, "delivery", "deliveries"),
		plural(r.reservations, "replay reservation", "replay reservations"), r.path)
	if r.healthy {
		b.WriteString("the old file was not damaged: the new one holds all it held\n")
	}
	if r.lost > 0 {
		fmt.Fprintf(&b, "%s could not be read\n", plural(r.lost, "delivery", "deliveries"))
	}
	if len(r.unreadable) > 0 {
		var parts []string
		for _, name := range spoolBuckets {
			if n := r.unreadable[string(name)]; n > 0 {
				parts = append(parts, fmt.Sprintf("%s %d", name, n))
			}
		}
		fmt.Fprintf(&b, "damaged regions, each a page (with all it held) or one entry: %s\n", strings.Join(parts, ", "))
	}
	if r.orphans > 0 {
		fmt.Fprintf(&b, "%s cut off by a damaged page above them were found and read\n", plural(r.orphans, "page", "pages"))
	}
	if r.freelistLost && len(r.unreadable) > 0 {
		b.WriteString("the freelist is damaged too: pages cut off by a damaged page cannot be told from free ones, and were left\n")
	}
	if r.expired > 0 {
		fmt.Fprintf(&b, "%s had expired, and were left out\n", plural(r.expired, "replay reservation", "replay reservations"))
	}
	old := "damaged"
	if r.healthy {
		old = "old"
	}
	fmt.Fprintf(&b, "the %s file is kept as %s\n", old, r.keptAs)
	return b.String()
}

// plural writes n things, with thousands separators.
func plural(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return humanize.Comma(int64(n)) + " " + many
}

// mintOptions says what delivery to mint.
type mintOptions struct {
	secret    []byte
	account   string
	event     string
	eventID   uuid.UUID
	payload   []byte // a JSON object, as given
	style     string // "production" or "documented"
	issuer    string
	subject   uuid.UUID
	endpoint  string // the cep claim; none when empty
	lifetime  time.Duration
	now       time.Time
	timestamp time.Time // the body's timestamp
}

// minted is a delivery ready to send.
type minted struct {
	authorization string
	body          []byte
}

func deliveryFromFlags(c *cobra.Command, url string) (*minted, error) {
	f := c.Flags()
	str := func(name string) string { v, _ := f.GetString(name); return v }
	o := mintOptions{
		account:  str("account"),
		event:    str("event"),
		style:    str("style"),
		issuer:   str("issuer"),
		endpoint: str("endpoint"),
		now:      time.Now(),
	}
	o.timestamp = o.now
	o.lifetime, _ = f.GetDuration("lifetime")
	if o.endpoint == "" {
		o.endpoint = url
	}
	if o.account == "" {
		return nil, errors.New("--account is required: the Trivial Security account name")
	}
	if eventIndex([]byte(o.event)) < 0 {
		return nil, fmt.Errorf("unknown event %q: use one of %s", o.event, strings.Join(eventNames[:], ", "))
	}
	if o.style != "production" && o.style != "documented" {
		return nil, fmt.Errorf("unknown style %q: use production or documented", o.style)
	}
	if o.lifetime <= 0 {
		return nil, fmt.Errorf("--lifetime %s must be positive", o.lifetime)
	}
	var err error
	if id := str("event-id"); id != "" {
		if o.eventID, err = uuid.Parse(id); err != nil {
			return nil, fmt.Errorf("--event-id %q is not a UUID", id)
		}
	} else {
		o.eventID = uuid.New()
	}
	if o.subject, err = uuid.Parse(str("subject")); err != nil {
		return nil, fmt.Errorf("--subject %q is not a UUID", str("subject"))
	}
	if o.payload, err = readPayload(str("payload")); err != nil {
		return nil, err
	}
	if o.secret, err = readSecret(str("secret-file")); err != nil {
		return nil, err
	}
	return mint(o)
}

// readPayload reads --payload: JSON, or @FILE.
func readPayload(arg string) ([]byte, error) {
	payload := []byte(arg)
	if name, ok := strings.CutPrefix(arg, "@"); ok {
		f, err := os.Open(name)
		if err != nil {
			return nil, fmt.Errorf("cannot read the payload file: %v", err)
		}
		defer f.Close()
		payload, err = io.ReadAll(io.LimitReader(f, defaultMaxBody+1))
		if err != nil {
			return nil, fmt.Errorf("cannot read the payload file: %v", err)
		}
		if len(payload) > defaultMaxBody {
			return nil, fmt.Errorf("the payload file %s is larger than %d bytes", name, defaultMaxBody)
		}
	}
	// Any well-formed object: what a receiver makes of a deep one, or of a
	// long number, is for the receiver to say.
	if _, status := readObject(payload, nil, jsonLimits{depth: maxJSONDepth, number: math.MaxInt}); status != jsonOK {
		return nil, errors.New("--payload is not a JSON object: give one like {\"report_id\": \"r-1\"}, or @FILE")
	}
	return payload, nil
}

// readSecret reads the signing secret from a file (one trailing newline
// dropped, as Caddy's {file.*} drops it) or from the environment.
func readSecret(file string) ([]byte, error) {
	var secret []byte
	if file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("cannot read the secret file: %v", err)
		}
		secret = bytes.TrimSuffix(bytes.TrimSuffix(b, []byte("\n")), []byte("\r"))
	} else {
		secret = []byte(os.Getenv(secretEnv))
	}
	if len(secret) == 0 {
		return nil, fmt.Errorf("no signing secret: set %s, or give --secret-file FILE", secretEnv)
	}
	return secret, nil
}

// senderClaims are the production sender's claims, in its order.
type senderClaims struct {
	IssuedAt  int64  `json:"iat"`
	NotBefore int64  `json:"nbf"`
	ExpiresAt int64  `json:"exp"`
	Audience  any    `json:"aud"`
	Issuer    string `json:"iss"`
	Subject   string `json:"sub"`
	EventID   string `json:"eid"`
	EventName string `json:"evn,omitempty"`
	Endpoint  string `json:"cep,omitempty"`
}

// The methods jwt.Claims asks for; signing does not use them.
func (senderClaims) GetExpirationTime() (*jwt.NumericDate, error) { return nil, nil }
func (senderClaims) GetIssuedAt() (*jwt.NumericDate, error)       { return nil, nil }
func (senderClaims) GetNotBefore() (*jwt.NumericDate, error)      { return nil, nil }
func (senderClaims) GetIssuer() (string, error)                   { return "", nil }
func (senderClaims) GetSubject() (string, error)                  { return "", nil }
func (senderClaims) GetAudience() (jwt.ClaimStrings, error)       { return nil, nil }

// mint signs a delivery as the production sender (or, with style
// "documented", the published example) signs it: see the README, Sending test
// deliveries.
func mint(o mintOptions) (*minted, error) {
	audience := "urn:trivialsec:webhook:client_endpoint:" + o.account
	iat := o.now.Unix()
	c := senderClaims{
		IssuedAt:  iat,
		NotBefore: iat + 3,
		ExpiresAt: iat + int64(o.lifetime/time.Second),
		Audience:  []string{audience},
		Issuer:    o.issuer,
		Subject:   strings.ReplaceAll(o.subject.String(), "-", ""),
		EventID:   o.eventID.URN(),
		EventName: o.event,
		Endpoint:  o.endpoint,
	}
	if o.style == "documented" {
		c.NotBefore = iat
		c.Audience = audience
		c.Subject = o.subject.URN()
		c.EventName, c.Endpoint = "", ""
	}
	token, err := jwt.NewWithClaims(jwt.SigningMethodHS256, c).SignedString(o.secret)
	if err != nil {
		return nil, err
	}
	authorization := token
	if o.style == "documented" {
		authorization = "Bearer " + token
	}

	var body bytes.Buffer
	body.WriteString(`{"event_id": `)
	writePythonString(&body, []byte(o.eventID.String()))
	body.WriteString(`, "event_name": `)
	writePythonString(&body, []byte(o.event))
	body.WriteString(`, "timestamp": `)
	writePythonString(&body, []byte(pythonISOFormat(o.timestamp)))
	body.WriteString(`, "payload": `)
	if err := writePythonJSON(&body, o.payload); err != nil {
		return nil, err
	}
	body.WriteString("}")
	return &minted{authorization: authorization, body: body.Bytes()}, nil
}

// send posts the delivery as the production sender does and returns the
// response's status code, status line, and the start of its body.
func (m *minted) send(url string) (code int, status string, body []byte, err error) {
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(m.body))
	if err != nil {
		return 0, "", nil, fmt.Errorf("bad --url: %v", err)
	}
	req.Header.Set("Authorization", m.authorization)
	req.Header.Set("User-Agent", "Trivial Security")
	client := &http.Client{Timeout: 30 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", nil, fmt.Errorf("cannot reach %s: %v", url, errors.Unwrap(err))
	}
	defer resp.Body.Close()
	body, _ = io.ReadAll(io.LimitReader(resp.Body, 1<<10))
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, resp.Proto + " " + resp.Status, body, nil
}

// refusalReason reads the module's reason code from a refusal's body, as a
// handle_errors route writes {http.trivialsec_webhook.reason} (the README's
// examples: "<status> <reason>", or the reason alone): "" if the body is
// not that.
func refusalReason(body []byte) string {
	fields := strings.Fields(string(body))
	if len(fields) == 2 {
		if _, err := strconv.Atoi(fields[0]); err == nil {
			fields = fields[1:]
		}
	}
	if len(fields) != 1 {
		return ""
	}
	if !slices.Contains(reasonCodes[reasonMethodNotAllowed:], fields[0]) {
		return ""
	}
	return fields[0]
}

// pythonISOFormat writes t as Python's datetime.isoformat() writes an aware
// UTC datetime: microseconds unless they are zero, and +00:00.
func pythonISOFormat(t time.Time) string {
	t = t.UTC()
	if t.Nanosecond()/1000 == 0 {
		return t.Format("2006-01-02T15:04:05+00:00")
	}
	return t.Format("2006-01-02T15:04:05.000000+00:00")
}

// writePythonJSON writes a well-formed JSON value again as Python's
// json.dumps writes it: ", " and ": " between items, non-ASCII characters as
// \u escapes. Key order and number text are kept.
func writePythonJSON(w *bytes.Buffer, value []byte) error {
	for i := 0; i < len(value); {
		switch c := value[i]; c {
		case ' ', '\t', '\n', '\r':
			i++
		case ',':
			w.WriteString(", ")
			i++
		case ':':
			w.WriteString(": ")
			i++
		case '"':
			end, _, ok := scanString(value, i)
			if !ok {
				return errors.New("malformed JSON string")
			}
			s, _ := jsonString(value[i:end])
			writePythonString(w, s)
			i = end
		default:
			w.WriteByte(c)
			i++
		}
	}
	return nil
}

// writePythonString writes s (UTF-8, or WTF-8 for lone surrogates, as
// unescape leaves them) as a JSON string with ensure_ascii.
func writePythonString(w *bytes.Buffer, s []byte) {
	const hex = "0123456789abcdef"
	u := func(r rune) {
		w.WriteString(`\u`)
		w.WriteByte(hex[r>>12&0xF])
		w.WriteByte(hex[r>>8&0xF])
		w.WriteByte(hex[r>>4&0xF])
		w.WriteByte(hex[r&0xF])
	}
	w.WriteByte('"')
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == '"':
			w.WriteString(`\"`)
		case c == '\\':
			w.WriteString(`\\`)
		case c == '\n':
			w.WriteString(`\n`)
		case c == '\r':
			w.WriteString(`\r`)
		case c == '\t':
			w.WriteString(`\t`)
		case c == '\b':
			w.WriteString(`\b`)
		case c == '\f':
			w.WriteString(`\f`)
		case c < 0x20 || c == 0x7F:
			u(rune(c))
		case c < utf8.RuneSelf:
			w.WriteByte(c)
		default:
			r, size := utf8.DecodeRune(s[i:])
			if r == utf8.RuneError && size <= 1 && i+3 <= len(s) && s[i] == 0xED {
				// A lone surrogate kept as three bytes.
				r, size = rune(s[i]&0x0F)<<12|rune(s[i+1]&0x3F)<<6|rune(s[i+2]&0x3F), 3
			}
			if r >= 0x10000 {
				r -= 0x10000
				u(0xD800 + r>>10)
				u(0xDC00 + r&0x3FF)
			} else {
				u(r)
			}
			i += size
			continue
		}
		i++
	}
	w.WriteByte('"')
}
