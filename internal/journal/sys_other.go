//go:build !linux

package journal

import (
	"fmt"
	"os"
)

func datasync(f *os.File) error { return f.Sync() }

// openDir opens dir, for syncing its entries. Only Linux locks it.
func openDir(dir string) (*os.File, error) {
	d, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("opening journal directory: %w", err)
	}
	return d, nil
}

// dirSync syncs d where the system can sync a directory; not every one can.
func dirSync(d *os.File) error {
	d.Sync()
	return nil
}
