// Package topo builds and tears down the network topologies that kata-dp's
// integration tests and benchmarks run in: throwaway network namespaces,
// veth pairs, addresses, and the standard Kata-like sandbox (a stand-in
// "host" netns joined by a veth pair to a sandbox netns that holds eth0 and a
// tap).
//
// It is test and benchmark support, not product code: it uses iproute2 (ip)
// through exec where that is the most readable way, and netlink where the
// caller needs typed answers. Every namespace it makes has a unique name
// built from a caller-chosen prefix (tests use "kdpt" plus something of their
// own), lives under /run/netns so other processes can enter it by path, and
// is deleted with everything in it by Close. Tests use the helpers of
// bench/topo/topotest (MustNetNS, MustSandbox, MustGuest: skip when not root,
// fail the test on error, clean up with t.Cleanup); topo itself does not
// import testing, since the kata-dp binary links it for `kata-dp bench`.
//
// Nothing here touches the caller's own network namespace: all links and
// addresses are made inside namespaces the package created.
//
// A *NetNS is safe for concurrent use; Close must not race with other calls.
package topo
