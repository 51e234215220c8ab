package journal

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// datasync flushes f's data, and its size if that changed, but not its
// other metadata: what a journal needs, for less than fsync.
func datasync(f *os.File) error {
	for {
		err := syscall.Fdatasync(int(f.Fd()))
		if err != syscall.EINTR {
			if err != nil {
				return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: err}
			}
			return nil
		}
	}
}

// openDir opens dir, for syncing its entries, and locks it: two journals
// appending to one directory would delete each other's segments.
func openDir(dir string) (*os.File, error) {
	d, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("opening journal directory: %w", err)
	}
	if err := syscall.Flock(int(d.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		d.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("journal directory %s is in use by another journal: open it once and share it", dir)
		}
		return nil, fmt.Errorf("locking journal directory %s: %w", dir, err)
	}
	return d, nil
}

func dirSync(d *os.File) error { return d.Sync() }
