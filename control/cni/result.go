package cni

import (
	"fmt"
	"net"
	"os"
	"strconv"

	current "github.com/containernetworking/cni/pkg/types/100"
)

// containerIface returns the index in prev.Interfaces of the container interface called ifname
// in the netns at netns: the one the previous plugin made and the VM takes over.
func containerIface(prev *current.Result, ifname, netns string) (int, error) {
	for i, ifc := range prev.Interfaces {
		if ifc != nil && ifc.Name == ifname && ifc.Sandbox != "" && sameNetNS(ifc.Sandbox, netns) {
			return i, nil
		}
	}
	return -1, fmt.Errorf("prevResult has no interface %q in netns %s (is kata-dp-cni after the plugin that creates it?)", ifname, netns)
}

// sameNetNS reports whether two paths name the same netns (a runtime may pass /proc/<pid>/ns/net
// where the previous plugin printed the bind mount, or the other way round).
func sameNetNS(a, b string) bool {
	if a == b {
		return true
	}
	sa, err := os.Stat(a)
	if err != nil {
		return false
	}
	sb, err := os.Stat(b)
	if err != nil {
		return false
	}
	return os.SameFile(sa, sb)
}

// guestAddrs picks the addresses the VM takes over: the first IPv4 and the first IPv6 address
// (not link-local: the NIC derives its own) of the interface at index idx, IPv4 first.
// kata-network takes at most one address per family on a NIC.
func guestAddrs(prev *current.Result, idx int) []*net.IPNet {
	var v4, v6 *net.IPNet
	for _, ip := range prev.IPs {
		if ip == nil || ip.Interface == nil || *ip.Interface != idx {
			continue
		}
		if a := ip.Address.IP.To4(); a != nil {
			if v4 == nil {
				v4 = &net.IPNet{IP: a, Mask: ip.Address.Mask}
			}
		} else if a := ip.Address.IP.To16(); a != nil && !a.IsLinkLocalUnicast() && v6 == nil {
			v6 = &net.IPNet{IP: a, Mask: ip.Address.Mask}
		}
	}
	var out []*net.IPNet
	for _, a := range []*net.IPNet{v4, v6} {
		if a != nil {
			out = append(out, a)
		}
	}
	return out
}

// maskLen is the prefix length of a mask as kata-network writes it ("24").
func maskLen(m net.IPMask) string {
	ones, _ := m.Size()
	return strconv.Itoa(ones)
}

// withVM returns a copy of prev with the tap and the VM's NIC added in tc-redirect-tap's
// shape: the tap (sandbox = netns path, the tap's MAC), then the VM's NIC (named like the tap,
// sandbox = the container id, the veth's MAC), and every IP of the container interface again,
// now pointing at the VM's NIC. Runtimes that configure a VM from a CNI result
// (firecracker-go-sdk's vmconf does) find the pair by those rules.
func withVM(prev *current.Result, idx int, tap, tapMAC, netns, containerID, vethMAC string) *current.Result {
	r := &current.Result{CNIVersion: prev.CNIVersion, Routes: prev.Routes, DNS: prev.DNS}
	for _, ifc := range prev.Interfaces {
		r.Interfaces = append(r.Interfaces, ifc.Copy())
	}
	for _, ip := range prev.IPs {
		r.IPs = append(r.IPs, ip.Copy())
	}
	r.Interfaces = append(r.Interfaces, &current.Interface{Name: tap, Mac: tapMAC, Sandbox: netns})
	vm := len(r.Interfaces)
	r.Interfaces = append(r.Interfaces, &current.Interface{Name: tap, Mac: vethMAC, Sandbox: containerID})
	for _, ip := range prev.IPs {
		if ip == nil || ip.Interface == nil || *ip.Interface != idx {
			continue
		}
		c := *ip
		c.Interface = current.Int(vm)
		r.IPs = append(r.IPs, &c)
	}
	return r
}
