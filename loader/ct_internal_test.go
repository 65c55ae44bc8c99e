package loader

import (
	"errors"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// TestMapCTSize: mapCT maps exactly the kernel's value area of a BPF_F_MMAPABLE array
// (arrayMapSize): the whole of it, writable and shared (a value written through the mapping
// is what a lookup returns, at round_up(value_size, 8) strides), and one page more is refused
// (EINVAL). Sizes that fill whole pages and sizes the kernel pads, with values of a size
// that is not a multiple of 8. An array without the flag is not mapped (ErrNotSupported).
func TestMapCTSize(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates BPF maps")
	}
	page := os.Getpagesize()
	for _, c := range []struct{ value, entries uint32 }{
		{192, 4096}, // the default table: 192 pages exactly
		{192, 100},  // 19200 bytes: padded to 5 pages
		{20, 100},   // values at 24-byte strides: 2400 bytes, one page
		{192, 1},
		{4096, 3},
	} {
		m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: c.value, MaxEntries: c.entries, Flags: unix.BPF_F_MMAPABLE})
		if err != nil {
			t.Fatal(err)
		}
		size := arrayMapSize(c.value, c.entries, page)
		stride := (int(c.value) + 7) &^ 7
		if size%page != 0 || size < stride*int(c.entries) || size >= stride*int(c.entries)+page {
			t.Errorf("%d values of %d bytes: size %d", c.entries, c.value, size)
		}
		b, err := mapCT(m)
		if err != nil {
			t.Fatalf("%d values of %d bytes: %v", c.entries, c.value, err)
		}
		if len(b) != size {
			t.Errorf("%d values of %d bytes: mapped %d bytes, want %d", c.entries, c.value, len(b), size)
		}
		last := c.entries - 1
		b[int(last)*stride] = 0xa5
		b[int(last)*stride+int(c.value)-1] = 0x5a
		v := make([]byte, c.value)
		if err := m.Lookup(last, v); err != nil || v[0] != 0xa5 || v[len(v)-1] != 0x5a {
			t.Errorf("%d values of %d bytes: the last value after a write in the mapping: %x (%v)", c.entries, c.value, v, err)
		}
		if more, err := unix.Mmap(m.FD(), 0, size+page, unix.PROT_READ, unix.MAP_SHARED); !errors.Is(err, unix.EINVAL) {
			t.Errorf("%d values of %d bytes: a mapping of %d bytes: %v, want EINVAL", c.entries, c.value, size+page, err)
			if err == nil {
				unix.Munmap(more)
			}
		}
		if err := unix.Munmap(b); err != nil {
			t.Error(err)
		}
		m.Close()
	}

	plain, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 192, MaxEntries: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if b, err := mapCT(plain); !errors.Is(err, ebpf.ErrNotSupported) {
		t.Errorf("an array without BPF_F_MMAPABLE: %d bytes, %v; want ErrNotSupported", len(b), err)
		if err == nil {
			unix.Munmap(b)
		}
	}
}
