package control

import (
	"errors"
	"strings"
	"testing"
)

// TestValidSandboxID: the id rule (it names files and bpffs directories), the length limit
// included now that the pattern leaves it out.
func TestValidSandboxID(t *testing.T) {
	for _, id := range []string{"a", "sb-1", "A.b_c-9", strings.Repeat("x", 128)} {
		if err := ValidSandboxID(id); err != nil {
			t.Errorf("%q: %v", id, err)
		}
	}
	for _, id := range []string{"", "-a", ".a", "_a", "a/b", "a b", "ä", strings.Repeat("x", 129)} {
		if err := ValidSandboxID(id); !errors.Is(err, ErrInvalid) {
			t.Errorf("%q: got %v, want ErrInvalid", id, err)
		}
	}
}
