package control

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// IsNetNS reports whether path is a network namespace: a file on nsfs (a bind mount such as
// /run/netns/<name>, or /proc/<pid>/ns/net).
func IsNetNS(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return fmt.Errorf("statfs: %w", err)
	}
	if st.Type != unix.NSFS_MAGIC {
		return errors.New("not a namespace file (nsfs)")
	}
	return nil
}

// IsUnixSocket reports whether path is an existing unix socket.
func IsUnixSocket(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if fi.Mode().Type() != os.ModeSocket {
		return errors.New("not a unix socket")
	}
	return nil
}
