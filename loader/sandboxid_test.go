package loader

import (
	"strings"
	"testing"
)

// TestSandboxIDs: the ids that can name a pin directory, with the length bound checked apart
// from the pattern.
func TestSandboxIDs(t *testing.T) {
	for id, want := range map[string]bool{
		"6ec7a98": true, "a.b_c-d": true, strings.Repeat("a", 128): true,
		"": false, ".x": false, "-x": false, "a/b": false, "a b": false, strings.Repeat("a", 129): false,
	} {
		if got := validSandboxID(id); got != want {
			t.Errorf("validSandboxID(%q) = %v, want %v", id, got, want)
		}
	}
}
