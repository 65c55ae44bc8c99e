// Package netdev holds the kernel network device helpers that kata-dp needs
// around a sandbox: entering a network namespace, creating, opening and
// deleting the tap that a VM's virtio-net NIC sits on, looking links up, and
// toggling GRO (XDP-redirected frames are dropped by a veth whose peer has
// neither XDP nor GRO).
//
// Everything goes through netlink and ioctls; nothing shells out to ip, tc or
// ethtool, because the agent is a long-running daemon that must not depend on
// what binaries a node happens to have.
//
// Every function takes the path of a network namespace (for example
// /run/netns/foo or /proc/<pid>/ns/net); the empty string means the caller's
// current namespace. Names resolve in that namespace. The functions are safe
// for concurrent use: each switches a locked OS thread of its own.
package netdev
