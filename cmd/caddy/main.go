// Command caddy is Caddy with the standard modules and trivialsec_webhook:
// what `xcaddy build --with github.com/trivialsec/caddy-trivialsec-webhook`
// produces, buildable from this repository with `go run ./cmd/caddy`.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/trivialsec/caddy-trivialsec-webhook"
)

func main() {
	caddycmd.Main()
}
