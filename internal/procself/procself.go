// Package procself reads the small files of /proc/self that the packages initialised before
// os (internal/prefault, internal/headstart) need at their init: the command line, the
// auxiliary vector. It imports nothing but syscall, so that depending on it keeps them early
// in the binary's initialisation.
package procself

import "syscall"

// ReadFile reads up to len(b) bytes of the small file name (procfs) into b and returns how
// many it read: 0 when it cannot be opened.
func ReadFile(name string, b []byte) int {
	fd, err := syscall.Open(name, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return 0
	}
	defer syscall.Close(fd)
	n := 0
	for n < len(b) {
		m, err := syscall.Read(fd, b[n:])
		if err == syscall.EINTR {
			continue
		}
		if err != nil || m <= 0 {
			break
		}
		n += m
	}
	return n
}
