package testkit

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestStartCaddyProcessExits: a process that exits before it listens is
// reported at once, not after the 30 s wait.
func TestStartCaddyProcessExits(t *testing.T) {
	bin, err := exec.LookPath("false")
	if err != nil {
		t.Fatal(err)
	}
	port, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = StartCaddy(bin, "Caddyfile", nil, nil, fmt.Sprintf("127.0.0.1:%d", port))
	if err == nil || !strings.Contains(err.Error(), "exited before listening") {
		t.Fatalf("error %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("took %s", d)
	}
}
