package dataplane_test

import (
	"os"
	"testing"

	"github.com/kata-dp/kata-dp/control/qmp/qmptest"
)

// TestMain fails the run when descriptors leak: a leaked link, map or program fd (a program
// left attached), a netns handle or a tap queue shows here.
func TestMain(m *testing.M) { os.Exit(qmptest.RunCheckingFDs(m)) }
