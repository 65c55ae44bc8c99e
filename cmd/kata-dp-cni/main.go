// Command kata-dp-cni is a chained CNI plugin that hands the container interface of a CNI
// network to a Kata-style VM through the kata-dp agent's BPF datapath. See docs/cni.md and
// package control/cni.
package main

import (
	"fmt"
	"os"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/kata-dp/kata-dp/control/cni"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = "dev"

func main() {
	// A CNI runtime passes no arguments (it talks through CNI_* variables and stdin); an
	// operator checking what is installed asks with --version.
	if len(os.Args) == 2 && os.Args[1] == "--version" {
		fmt.Printf("kata-dp-cni %s\n", version)
		return
	}
	// The DaemonSet's init container installs the plugin into the node's CNI bin dir.
	if len(os.Args) == 3 && os.Args[1] == "--install" {
		self, err := os.Executable()
		if err == nil {
			err = install(self, os.Args[2])
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "kata-dp-cni:", err)
			os.Exit(1)
		}
		fmt.Printf("kata-dp-cni %s installed in %s\n", version, os.Args[2])
		return
	}
	p := &cni.Plugin{}
	skel.PluginMainFuncs(p.Funcs(), cni.VersionInfo(), "kata-dp-cni "+version+": joins a Kata VM's tap to the container interface with kata-dp's BPF datapath")
}
