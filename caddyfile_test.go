package trivialsecwebhook

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	d := caddyfile.NewTestDispenser(`trivialsec_webhook {
		account  acme
		secret   {env.TRIVIALSEC_SECRET} {file./run/secrets/old}
		subject  BC6E2CD51F59487FB05B49946BD078B2
		issuer   https://dev.trivialsec.com
		endpoint https://hooks.example.com/webhook/trivialsec
		leeway   5s
		max_body 1MiB
		max_depth 32
		events   report_created report_deleted
		replay   memory 5000
		strip_authorization
	}`)
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	got, _ := json.Marshal(h)
	want := `{"account":"acme","secret":["{env.TRIVIALSEC_SECRET}","{file./run/secrets/old}"],` +
		`"subject":"BC6E2CD51F59487FB05B49946BD078B2","issuer":"https://dev.trivialsec.com",` +
		`"endpoint":"https://hooks.example.com/webhook/trivialsec","leeway":5000000000,"max_body":1048576,"max_depth":32,` +
		`"events":["report_created","report_deleted"],"replay":{"store":"memory","max_entries":5000},` +
		`"strip_authorization":true}`
	if string(got) != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
}

func TestUnmarshalCaddyfileMinimal(t *testing.T) {
	var h Handler
	d := caddyfile.NewTestDispenser("trivialsec_webhook {\n account acme\n secret {env.S}\n}")
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	got, _ := json.Marshal(h)
	if string(got) != `{"account":"acme","secret":["{env.S}"]}` {
		t.Errorf("got %s: defaults belong to Provision, not the JSON", got)
	}
	for input, want := range map[string]string{
		"leeway 0s":  `"leeway":0`,
		"replay off": `"replay":{"store":"off"}`,
		"replay redis redis://:pw@10.0.0.1:6379/2": `"replay":{"store":"redis","url":"redis://:pw@10.0.0.1:6379/2"}`,
		"replay redis {env.REDIS_URL} acme:":       `"replay":{"store":"redis","url":"{env.REDIS_URL}","key_prefix":"acme:"}`,
		"spool off":                                `"spool":{"store":"off"}`,
		"spool {\n store file /var/lib/spool\n mode always\n backoff 2s 1h\n max_age 24h\n max_size 10MiB\n attempt_timeout 5s\n }": `"spool":{"store":"file","dir":"/var/lib/spool","mode":"always","backoff":[2000000000,3600000000000],"max_age":86400000000000,"max_size":10485760,"attempt_timeout":5000000000}`,
		"spool {\n store file\n }": `"spool":{"store":"file"}`,
		"spool {\n claim_after 30s\n store redis {env.REDIS_URL} acme:spool:\n }": `"spool":{"store":"redis","url":"{env.REDIS_URL}","key_prefix":"acme:spool:","claim_after":30000000000}`,
	} {
		var h Handler
		d := caddyfile.NewTestDispenser("trivialsec_webhook {\n account acme\n secret {env.S}\n " + input + "\n}")
		if err := h.UnmarshalCaddyfile(d); err != nil {
			t.Fatalf("%q: %v", input, err)
		}
		if b, _ := json.Marshal(h); !strings.Contains(string(b), want) {
			t.Errorf("%q: %s, want %s", input, b, want)
		}
	}
}

func TestUnmarshalCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct {
		name, input, want string
	}{
		{"unknown_subdirective", "trivialsec_webhook {\n account a\n secret s\n sekret s\n}", `@4@unknown subdirective "sekret"`},
		{"duplicate_subdirective", "trivialsec_webhook {\n account a\n account b\n secret s\n}", "@3@account is set twice"},
		{"duplicate_secret", "trivialsec_webhook {\n account a\n secret s\n secret t\n}", "@4@secret is set twice"},
		{"bad_subject", "trivialsec_webhook {\n account a\n secret s\n subject bc6e2cd5\n}", `@4@subject "bc6e2cd5" is not a UUID`},
		{"unknown_event", "trivialsec_webhook {\n account a\n secret s\n events report_created report_updated\n}", `@4@unknown event name "report_updated": use one of hosted_monitoring,`},
		{"missing_account", "trivialsec_webhook {\n secret s\n}", "@1@account is required"},
		{"missing_secret", "trivialsec_webhook {\n account a\n}", "@1@secret is required"},
		{"no_block", "trivialsec_webhook", "@1@account is required"},
		{"arguments", "trivialsec_webhook acme", `@1@trivialsec_webhook takes its settings in a block`},
		{"secret_without_value", "trivialsec_webhook {\n account a\n secret\n}", "@3@secret needs a value"},
		{"account_two_values", "trivialsec_webhook {\n account a b\n secret s\n}", "@2@wrong argument count"},
		{"negative_leeway", "trivialsec_webhook {\n account a\n secret s\n leeway -1s\n}", `@4@leeway "-1s" is negative`},
		{"bad_leeway", "trivialsec_webhook {\n account a\n secret s\n leeway soon\n}", `@4@leeway "soon" is not a duration`},
		{"bad_max_body", "trivialsec_webhook {\n account a\n secret s\n max_body lots\n}", `@4@max_body "lots" is not a size`},
		{"zero_max_depth", "trivialsec_webhook {\n account a\n secret s\n max_depth 0\n}", `@4@max_depth "0": write a whole number from 1 to 10000`},
		{"max_depth_too_deep", "trivialsec_webhook {\n account a\n secret s\n max_depth 10001\n}", `@4@max_depth "10001": write a whole number from 1 to 10000`},
		{"max_depth_word", "trivialsec_webhook {\n account a\n secret s\n max_depth deep\n}", `@4@max_depth "deep": write a whole number`},
		{"zero_max_body", "trivialsec_webhook {\n account a\n secret s\n max_body 0\n}", `@4@max_body "0" is not a size`},
		{"replay_redis_without_url", "trivialsec_webhook {\n account a\n secret s\n replay redis\n}", "@4@replay redis takes a URL and an optional key prefix"},
		{"replay_redis_bad_url", "trivialsec_webhook {\n account a\n secret s\n replay redis 127.0.0.1:6379\n}", "@4@replay redis: the URL must start with redis:// or rediss://"},
		{"replay_unknown", "trivialsec_webhook {\n account a\n secret s\n replay disk\n}", `@4@replay takes off, memory [<max_entries>] or redis <url> [<key_prefix>]: found "disk"`},
		{"replay_bad_max", "trivialsec_webhook {\n account a\n secret s\n replay memory -5\n}", `@4@replay memory "-5": max_entries must be a positive whole number`},
		{"spool_argument", "trivialsec_webhook {\n account a\n secret s\n spool on\n}", `@4@spool takes off, or its settings in a block: found "on"`},
		{"spool_off_with_block", "trivialsec_webhook {\n account a\n secret s\n spool off {\n mode always\n }\n}", `@5@spool off takes no settings: found "mode"`},
		{"spool_unknown_setting", "trivialsec_webhook {\n account a\n secret s\n spool {\n retries 5\n }\n}", `@5@unknown spool setting "retries": use store, mode, backoff, max_age, max_size, attempt_timeout, claim_after, redrive_concurrency or redrive_rate`},
		{"spool_redrive_concurrency", "trivialsec_webhook {\n account a\n secret s\n spool {\n redrive_concurrency 0\n }\n}", `@5@spool redrive_concurrency "0" is not a positive whole number: write it like 4`},
		{"spool_redrive_concurrency_large", "trivialsec_webhook {\n account a\n secret s\n spool {\n redrive_concurrency 1025\n }\n}", `@5@spool redrive_concurrency must be 1 to 1024: write it like 4`},
		{"spool_redrive_rate_tiny", "trivialsec_webhook {\n account a\n secret s\n spool {\n redrive_rate 0.009\n }\n}", `@5@spool redrive_rate must be at least 0.01 deliveries a second: write it like 50, or 0.5`},
		{"spool_redrive_rate", "trivialsec_webhook {\n account a\n secret s\n spool {\n redrive_rate NaN\n }\n}", `@5@spool redrive_rate "NaN" is not a positive number of deliveries a second: write it like 50, or 0.5`},
		{"spool_duplicate_setting", "trivialsec_webhook {\n account a\n secret s\n spool {\n mode always\n mode always\n }\n}", `@6@spool mode is set twice`},
		{"spool_unknown_mode", "trivialsec_webhook {\n account a\n secret s\n spool {\n mode sometimes\n }\n}", `@5@unknown spool mode "sometimes": use fallback or always`},
		{"spool_unknown_store", "trivialsec_webhook {\n account a\n secret s\n spool {\n store disk\n }\n}", `@5@spool store takes file [<dir>] or redis <url> [<key_prefix>]: found "disk"`},
		{"spool_redis_no_url", "trivialsec_webhook {\n account a\n secret s\n spool {\n store redis\n }\n}", `@5@spool store takes file [<dir>] or redis <url> [<key_prefix>]: found "redis"`},
		{"spool_redis_bad_url", "trivialsec_webhook {\n account a\n secret s\n spool {\n store redis 127.0.0.1:6379\n }\n}", `@5@spool store redis: the URL must start with redis://`},
		{"spool_claim_after_file", "trivialsec_webhook {\n account a\n secret s\n spool {\n claim_after 1m\n store file\n }\n}", `@5@spool claim_after is for store redis`},
		{"spool_backoff_one", "trivialsec_webhook {\n account a\n secret s\n spool {\n backoff 1s\n }\n}", `@5@wrong argument count`},
		{"spool_backoff_reversed", "trivialsec_webhook {\n account a\n secret s\n spool {\n backoff 1m 1s\n }\n}", `@5@spool backoff takes two positive durations, the first no larger than the second`},
		{"spool_backoff_zero", "trivialsec_webhook {\n account a\n secret s\n spool {\n backoff 0s 1s\n }\n}", `@5@spool backoff "0s" is not a positive duration`},
		{"spool_max_age_negative", "trivialsec_webhook {\n account a\n secret s\n spool {\n max_age -1h\n }\n}", `@5@spool max_age "-1h" is not a positive duration`},
		{"spool_max_size_word", "trivialsec_webhook {\n account a\n secret s\n spool {\n max_size lots\n }\n}", `@5@spool max_size "lots" is not a size`},
		{"strip_with_argument", "trivialsec_webhook {\n account a\n secret s\n strip_authorization yes\n}", "@4@wrong argument count"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			// tc.want is "@line@message": the message, then ", at Testfile:<line>".
			parts := strings.SplitN(tc.want, "@", 3)
			msg, at := parts[2], ", at Testfile:"+parts[1]
			if err == nil || !strings.HasPrefix(err.Error(), msg) || !strings.HasSuffix(err.Error(), at) {
				t.Fatalf("error %v\nwant %q ... %q", err, msg, at)
			}
		})
	}
}

// TestDirectiveOrder: the directive runs after request_body and before
// the handlers that answer, with no order line.
func TestDirectiveOrder(t *testing.T) {
	adapter := caddyfile.Adapter{ServerType: httpcaddyfile.ServerType{}}
	out, warnings, err := adapter.Adapt([]byte(":8080 {\n"+
		"\treverse_proxy 127.0.0.1:9000\n"+
		"\ttrivialsec_webhook {\n\t\taccount acme\n\t\tsecret {env.S}\n\t}\n"+
		"\trequest_body {\n\t\tmax_size 1MB\n\t}\n"+
		"}\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) > 0 {
		t.Errorf("warnings: %v", warnings)
	}
	s := string(out)
	rb, tw, rp := strings.Index(s, `"handler":"request_body"`), strings.Index(s, `"handler":"trivialsec_webhook"`), strings.Index(s, `"handler":"reverse_proxy"`)
	if rb < 0 || tw < 0 || rp < 0 || !(rb < tw && tw < rp) {
		t.Errorf("handlers out of order (request_body %d, trivialsec_webhook %d, reverse_proxy %d):\n%s", rb, tw, rp, s)
	}
}
