package trivialsecwebhook

import (
	"bytes"
	"encoding/json"
	"fmt"
	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/google/uuid"
	"github.com/spf13/cobra"
)

func testMintOptions(style string) mintOptions {
	return mintOptions{
		secret:    []byte(testSecret),
		account:   testAccount,
		event:     "new_findings_domains",
		eventID:   uuid.MustParse(testEventID),
		payload:   []byte(`{"domain":"caf` + "\u00e9" + `.example","ids":[1,2]}`),
		style:     style,
		issuer:    defaultIssuer,
		subject:   uuid.MustParse(defaultSubject),
		endpoint:  "https://hooks.example.com/webhook/trivialsec",
		lifetime:  24 * time.Hour,
		now:       testNow,
		timestamp: testNow,
	}
}

// TestMintMatchesSender: what the command mints is what each sender sends
// (docs/checks.md), and the module accepts it.
func TestMintMatchesSender(t *testing.T) {
	for _, style := range []string{"production", "documented"} {
		t.Run(style, func(t *testing.T) {
			m, err := mint(testMintOptions(style))
			if err != nil {
				t.Fatal(err)
			}
			wantBody := `{"event_id": "` + testEventID + `", "event_name": "new_findings_domains", ` +
				`"timestamp": "2026-11-28T18:33:38.032435+00:00", "payload": {"domain": "caf\u00e9.example", "ids": [1, 2]}}`
			if string(m.body) != wantBody {
				t.Errorf("body %s\nwant %s", m.body, wantBody)
			}
			token := strings.TrimPrefix(m.authorization, "Bearer ")
			if (token != m.authorization) != (style == "documented") {
				t.Errorf("Authorization %q", m.authorization[:20])
			}
			parts := strings.Split(token, ".")
			claims, _ := rawURL.DecodeString(parts[1])
			iat := testNow.Unix()
			want := map[string]string{
				"production": `{"iat":` + i64(iat) + `,"nbf":` + i64(iat+3) + `,"exp":` + i64(iat+86400) +
					`,"aud":["urn:trivialsec:webhook:client_endpoint:acme"],"iss":"https://www.trivialsec.com",` +
					`"sub":"bc6e2cd51f59487fb05b49946bd078b2","eid":"urn:uuid:` + testEventID + `","evn":"new_findings_domains",` +
					`"cep":"https://hooks.example.com/webhook/trivialsec"}`,
				"documented": `{"iat":` + i64(iat) + `,"nbf":` + i64(iat) + `,"exp":` + i64(iat+86400) +
					`,"aud":"urn:trivialsec:webhook:client_endpoint:acme","iss":"https://www.trivialsec.com",` +
					`"sub":"urn:uuid:bc6e2cd5-1f59-487f-b05b-49946bd078b2","eid":"urn:uuid:` + testEventID + `"}`,
			}[style]
			if string(claims) != want {
				t.Errorf("claims %s\nwant   %s", claims, want)
			}
			reason, repl := deliverTo(t, testVerifier(t, nil), 0, m.authorization, "", string(m.body))
			if name, _ := repl.GetString("http.trivialsec_webhook.event_name"); reason != reasonNone || name != "new_findings_domains" {
				t.Errorf("the module says %q", reason)
			}
		})
	}
}

func i64(n int64) string { b, _ := json.Marshal(n); return string(b) }

func TestWritePythonJSON(t *testing.T) {
	for in, want := range map[string]string{
		`{}`:                                 `{}`,
		`{"a":1,"b":[1,2,{"c":null}]}`:       `{"a": 1, "b": [1, 2, {"c": null}]}`,
		` { "z" : 1 , "a" : 2 } `:            `{"z": 1, "a": 2}`,
		`{"s":"é😀\u0041\/\n` + "\x7f" + `"}`: `{"s": "\u00e9\ud83d\ude00A/\n\u007f"}`,
		`{"s":"\ud800 \"q\" \\"}`:            `{"s": "\ud800 \"q\" \\"}`,
		`{"n":1e400,"m":-0.0}`:               `{"n": 1e400, "m": -0.0}`,
	} {
		var b bytes.Buffer
		if err := writePythonJSON(&b, []byte(in)); err != nil {
			t.Fatal(err)
		}
		if b.String() != want {
			t.Errorf("%s: %s, want %s", in, b.String(), want)
		}
	}
}

func TestPythonISOFormat(t *testing.T) {
	for in, want := range map[time.Time]string{
		testNow: "2026-11-28T18:33:38.032435+00:00",
		time.Date(2026, 11, 28, 18, 33, 38, 0, time.UTC):                    "2026-11-28T18:33:38+00:00",
		time.Date(2026, 11, 28, 18, 33, 38, 999, time.UTC):                  "2026-11-28T18:33:38+00:00",
		time.Date(2026, 11, 28, 19, 33, 38, 5000, time.FixedZone("", 3600)): "2026-11-28T18:33:38.000005+00:00",
	} {
		if got := pythonISOFormat(in); got != want {
			t.Errorf("%v: %s, want %s", in, got, want)
		}
	}
}

// runCommand runs `caddy <args...>` in-process: the registered
// trivialsec-webhook command under a root made as Caddy makes its own
// (caddycmd: SilenceUsage, and cobra printing a returned error as
// "Error: ..." unless the command silences it). It returns what went to
// stdout and stderr, and the error Caddy's Main exits 1 on.
func runCommand(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	registered, ok := caddycmd.Commands()["trivialsec-webhook"]
	if !ok {
		t.Fatal("trivialsec-webhook is not registered")
	}
	root := &cobra.Command{Use: "caddy", SilenceUsage: true}
	cmd := &cobra.Command{Use: registered.Name + " " + registered.Usage, Short: registered.Short, Long: registered.Long}
	registered.CobraFunc(cmd)
	root.AddCommand(cmd)
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs(args)
	err = root.Execute()
	return out.String(), errOut.String(), err
}

// TestCommandUsageMistakes: each usage mistake is one line on stderr that
// names it and where the usage is, and exit status 2; nothing
// on stdout, no help.
func TestCommandUsageMistakes(t *testing.T) {
	t.Setenv(secretEnv, testSecret)
	for _, tc := range []struct {
		args []string
		want string // the line on stderr
	}{
		{[]string{"trivialsec-webhook", "sign", "--account", "acme", "--bogus"},
			`caddy trivialsec-webhook sign: unknown flag: --bogus (see "caddy trivialsec-webhook sign --help")`},
		{[]string{"trivialsec-webhook", "send", "-x", "--account", "acme"},
			`caddy trivialsec-webhook send: unknown shorthand flag: 'x' in -x (see "caddy trivialsec-webhook send --help")`},
		{[]string{"trivialsec-webhook", "sign", "--account", "acme", "stray"},
			`caddy trivialsec-webhook sign: unexpected argument "stray": sign takes flags only (see "caddy trivialsec-webhook sign --help")`},
		{[]string{"trivialsec-webhook", "sign", "--account", "acme", "--lifetime", "soon"},
			`caddy trivialsec-webhook sign: invalid argument "soon" for "--lifetime" flag: time: invalid duration "soon" (see "caddy trivialsec-webhook sign --help")`},
		{[]string{"trivialsec-webhook", "sign", "--account"},
			`caddy trivialsec-webhook sign: flag needs an argument: --account (see "caddy trivialsec-webhook sign --help")`},
		{[]string{"trivialsec-webhook", "bogus"},
			`caddy trivialsec-webhook: unknown subcommand "bogus": use sign, send or spool (see "caddy trivialsec-webhook --help")`},
		{[]string{"trivialsec-webhook", "sing", "--account", "acme"},
			`caddy trivialsec-webhook: unknown flag: --account (see "caddy trivialsec-webhook --help")`},
		{[]string{"trivialsec-webhook", "sing"},
			`caddy trivialsec-webhook: unknown subcommand "sing": did you mean sign? (see "caddy trivialsec-webhook --help")`},
		{[]string{"trivialsec-webhook"},
			`caddy trivialsec-webhook: which subcommand? sign, send or spool (see "caddy trivialsec-webhook --help")`},
		{[]string{"trivialsec-webhook", "--bogus"},
			`caddy trivialsec-webhook: unknown flag: --bogus (see "caddy trivialsec-webhook --help")`},
		{[]string{"trivialsec-webhook", "spool"},
			`caddy trivialsec-webhook spool: which subcommand? salvage, list, summary, retry or delete (see "caddy trivialsec-webhook spool --help")`},
		{[]string{"trivialsec-webhook", "spool", "salvag"},
			`caddy trivialsec-webhook spool: unknown subcommand "salvag": did you mean salvage? (see "caddy trivialsec-webhook spool --help")`},
		{[]string{"trivialsec-webhook", "spool", "salvage"},
			`caddy trivialsec-webhook spool salvage: which spool directory? give the one that holds spool.db (see "caddy trivialsec-webhook spool salvage --help")`},
		{[]string{"trivialsec-webhook", "spool", "salvage", "a", "b"},
			`caddy trivialsec-webhook spool salvage: one spool directory, not 2: ["a" "b"] (see "caddy trivialsec-webhook spool salvage --help")`},
		{[]string{"trivialsec-webhook", "spool", "salvage", "--force", "a"},
			`caddy trivialsec-webhook spool salvage: unknown flag: --force (see "caddy trivialsec-webhook spool salvage --help")`},
		// Not usage, but bad input: one line too, without the pointer to
		// the help.
		{[]string{"trivialsec-webhook", "sign"},
			`caddy trivialsec-webhook sign: --account is required: the Trivial Security account name`},
		{[]string{"trivialsec-webhook", "sign", "--account", "acme", "--lifetime", "-1h"},
			`caddy trivialsec-webhook sign: --lifetime -1h0m0s must be positive`},
	} {
		t.Run(strings.Join(tc.args[1:], "_"), func(t *testing.T) {
			stdout, stderr, err := runCommand(t, tc.args...)
			want := exitUsage // a usage mistake points at the help
			if !strings.HasSuffix(tc.want, "--help\")") {
				want = 1
			}
			if code := exitCode(err); code != want {
				t.Errorf("exit status %d, want %d", code, want)
			}
			if stderr != tc.want+"\n" || stdout != "" {
				t.Errorf("stderr %q\nwant   %q\nstdout %q", stderr, tc.want+"\n", stdout)
			}
		})
	}
}

// TestCommandHelpAndSign: help is asked for, and given, exit status 0;
// sign still prints a delivery.
func TestCommandHelpAndSign(t *testing.T) {
	t.Setenv(secretEnv, testSecret)
	for _, args := range [][]string{
		{"trivialsec-webhook", "--help"},
		{"trivialsec-webhook", "help"},
		{"trivialsec-webhook", "spool", "--help"},
		{"trivialsec-webhook", "spool", "salvage", "-h"},
		{"help", "trivialsec-webhook"},
	} {
		stdout, stderr, err := runCommand(t, args...)
		if err != nil || stderr != "" || !strings.Contains(stdout, "Usage:") || !strings.Contains(stdout, "salvage") {
			t.Errorf("%v: %v, stderr %q, stdout %q", args, err, stderr, stdout)
		}
	}
	stdout, stderr, err := runCommand(t, "trivialsec-webhook", "sign", "--account", "acme", "--event-id", testEventID)
	if err != nil || stderr != "" || !strings.HasPrefix(stdout, "Authorization: ") || !strings.Contains(stdout, `{"event_id": "`+testEventID+`"`) {
		t.Errorf("sign: %v, stderr %q, stdout %q", err, stderr, stdout)
	}
}

// TestCommandSpoolSalvage: the command salvages a damaged store and says
// what it copied and lost; one it cannot salvage is one line on stderr,
// and exit status 1.
func TestCommandSpoolSalvage(t *testing.T) {
	dir := t.TempDir()
	want := writeTestSpoolDB(t, dir, 120, 9)
	scribbleLeaves(t, filepath.Join(dir, "spool.db"))
	// The command as the spool's page gives it, on this directory.
	args := strings.Fields(testkit.Example(t, "docs/spool.md", "spool-salvage"))
	if len(args) != 5 || args[0] != "caddy" {
		t.Fatalf("the page's salvage example is %q", args)
	}
	args[4] = dir
	stdout, stderr, err := runCommand(t, args[1:]...)
	if err != nil || stderr != "" {
		t.Fatalf("%v, stderr %q", err, stderr)
	}
	t.Logf("stdout:\n%s", stdout)
	entries, reservations := salvaged(t, filepath.Join(dir, "spool.db"))
	lost := len(want.entries) - len(entries)
	kept, _ := filepath.Glob(filepath.Join(dir, "spool.db.damaged-*"))
	if lost == 0 || len(kept) != 1 ||
		!strings.HasPrefix(stdout, "salvaged "+plural(len(entries), "delivery", "deliveries")+" and "+
			plural(len(reservations), "replay reservation", "replay reservations")+" into "+filepath.Join(dir, "spool.db")+"\n") ||
		!strings.Contains(stdout, "\n"+plural(lost, "delivery", "deliveries")+" could not be read\n") ||
		!strings.Contains(stdout, "\ndamaged regions, each a page (with all it held) or one entry: ") ||
		!strings.HasSuffix(stdout, "\nthe damaged file is kept as "+kept[0]+"\n") {
		t.Errorf("%d lost, kept %v; stdout:\n%s", lost, kept, stdout)
	}

	hopeless := t.TempDir()
	if err := os.WriteFile(filepath.Join(hopeless, "spool.db"), make([]byte, 64<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err = runCommand(t, "trivialsec-webhook", "spool", "salvage", hopeless)
	if err == nil || stdout != "" || strings.Count(stderr, "\n") != 1 ||
		!strings.HasPrefix(stderr, "caddy trivialsec-webhook spool salvage: "+filepath.Join(hopeless, "spool.db")+" cannot be salvaged: ") {
		t.Errorf("%v, stdout %q, stderr %q", err, stdout, stderr)
	}
}

// TestRefusalReason: send prints a reason only from a body that is one, as
// the README's handle_errors examples write it.
func TestRefusalReason(t *testing.T) {
	for body, want := range map[string]string{
		"409 replayed":          "replayed",
		"bad_signature\n":       "bad_signature",
		"403 Forbidden":         "",
		"session expired":       "",
		"409 replayed, or not":  "",
		"502 Bad Gateway":       "",
		"":                      "",
		"expired expired":       "",
		"422 invalid_event_id ": "invalid_event_id",
	} {
		if got := refusalReason([]byte(body)); got != want {
			t.Errorf("%q: %q, want %q", body, got, want)
		}
	}
	for r := reasonMethodNotAllowed; r < reasonCount; r++ {
		for _, body := range []string{fmt.Sprintf("%d %s", r.status(), r.String()), r.String()} {
			if got := refusalReason([]byte(body)); got != r.String() {
				t.Errorf("%q: %q, want %q", body, got, r.String())
			}
		}
		if got := refusalReason([]byte(strings.ToUpper(r.String()))); got != "" {
			t.Errorf("%q: %q, want none: the codes are lowercase", strings.ToUpper(r.String()), got)
		}
	}
}
