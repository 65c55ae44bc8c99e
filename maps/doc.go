// Package maps gives typed Go views of the datapath's BPF maps.
//
// Every key and value type here mirrors a C struct of bpf/lib/common.h field for field; a test
// compares them against the BTF of the compiled object, so a change on one side without the
// other fails the build's tests instead of corrupting state at run time. Addresses are kept in
// network byte order ([4]byte), as the datapath reads them off the wire.
//
// The views are thin: they hold no state of their own and are safe for concurrent use to the
// extent the underlying maps are (single-element updates are atomic).
package maps
