// Package ipvs is the unprivileged heart of kata-dp's IPVS compatibility:
// it parses what openEuler's "kata-runtime kata-ipvs" accepts (ipvsadm 1.31's
// grammar, restricted to the contract in spec/kata-ipvs.md), keeps a
// sandbox's rules in a Table that behaves like the kernel's IPVS tables do
// under ipvsadm, prints ipvsadm's listings byte for byte, and computes the
// scheduler tables the BPF datapath enforces. It does no I/O of its own and
// needs no privileges; the agent stores a Table (encoding/json), the
// datapath programs its maps from it, and the CLI prints what Exec returns.
//
// # Model
//
// A Table holds virtual services (protocol, VIP:port, scheduler,
// persistence timeout and netmask) and their real servers (address:port,
// weight; NAT is the only forwarding method), plus the connection timeouts
// of --set. Real servers are kept in kernel order, newest first, because
// IPVS's schedulers walk that list and break ties in its order. Every
// service and real server gets a uint32 id at creation, from one counter
// that is never rewound while the table lives (Clear keeps it, the JSON
// keeps it), so the datapath can key maps and counters by id and tell a
// re-added server from the old one. At most MaxRules rules (services plus
// real servers) fit.
//
// Commands are validated completely before the table changes: a failed
// Exec changes nothing, and Restore applies a whole file to a scratch table
// and switches it in only when every line succeeded.
//
// Errors are *Error values carrying ipvsadm's message, the offending
// token, the restore line and ipvsadm's exit status (2 for argument
// errors, 255 for refusals such as "Service already exists"); errors.Is
// matches the sentinel in the var block of errors.go.
//
// # What is exact
//
//   - Parsing: popt's option syntax (long, short, clustered, attached and
//     "=" values, -p's optional value), ipvsadm's command/option legality
//     table, its defaults (scheduler wlc, weight 1, -p 360, mask /32, a
//     real server without port takes the service's) and its messages.
//     ParseKataParameters (the kata-ipvs front-end) adds openEuler's API
//     table: --scheduler and --persistent (1..2678400) are mandatory for
//     add-service and edit-service; restore files keep ipvsadm's rules.
//     IPv6 as ipvsadm takes it: bracketed with a port ("-t
//     [2001:db8::10]:80"), bare without one ("-r fd00::4"), -M as a prefix
//     length for an IPv6 service, a real server of the other family refused
//     ("Different address family is allowed only for tunneling servers");
//     listings print IPv6 bracketed in IPv4's columns, IPv4 services first.
//     Deliberate restrictions from the contract: dotted quads and IPv6
//     literals only (no host or service names, no zones, no IPv4-mapped
//     IPv6), ports 1..65535 (no port-0
//     services), -p 0..2678400 with 0 meaning no persistence, --set values
//     0..1296000, NAT only (-g, -i, -f and the sync-daemon, threshold and
//     connection-listing options are refused).
//   - Semantics: an edit replaces every parameter, as ipvsadm sends the
//     whole service or destination (an --edit-service without -p drops
//     persistence, an --edit-server without -w sets weight 1); errors are
//     checked in the kernel's order (existence before scheduler).
//   - Output: --list, --list -t|-u service, --stats, --rate, --timeout and
//     --save print what ipvsadm 1.31 prints against IPVS 1.2.1, including
//     its sort (libipvs's comparison of host-order addresses as a signed
//     32-bit difference, which wraps, run through glibc's merge sort).
//     Where that comparison is not transitive (addresses spanning more
//     than 2^31) the order also depends on the order the kernel dumps
//     services in, which hashes a kernel pointer; services are fed in
//     creation order there, real servers in kernel order (exact).
//   - Scheduler tables: sh and dh buckets and hashes, rr order, the lc,
//     wlc, sed and nq choices, all as in the kernel for servers without
//     thresholds (kata-ipvs has no -x/-y, so no server is ever
//     "overloaded" in IPVS's flag sense).
//
// # What is approximate
//
//   - rr is a sequence the datapath walks with a per-service counter; wrr
//     runs the kernel's cursor and current weight over the servers with
//     WRRWeights, restarting from the list head on every change of the
//     service (the kernel keeps its current weight). The kernel keeps a
//     cursor that survives rule changes.
//   - WRRSequence (a model of the picks) scales weights whose reduced sum
//     exceeds MaxSequence; the datapath does not.
//   - LBLC and LBLCR model the kernel's caches with a plain expiry; the
//     kernel collects them lazily by timer and table size.
//
// # For the datapath
//
// Only new connections are scheduled (a connection entry keeps its real
// server until it ends or times out). With persistence, a client's
// affinity entry (PersistenceKey, VIP, port) is looked up first; IPVS
// honours it even when that server's weight is now 0 (the kernel's default
// expire_quiescent_template=0), and drops it when the server was deleted.
// When a scheduler finds no destination, IPVS drops the packet and sends
// ICMP port unreachable. Per scheduler, with the servers in kernel order:
//
//   - rr: walk Service.Tables().Sequence with a per-service counter.
//   - wrr: ip_vs_wrr_schedule's walk over the servers with WRRWeights
//     (the picks of WRRSequence).
//   - sh: Buckets[SHHash(source address)]; dh: Buckets[DHHash(destination
//     address)], the VIP. -1: no destination (no fallback to another
//     bucket).
//   - lc, wlc, sed, nq: scan the servers with their live counts as LC, WLC,
//     SED and NQ do (Overhead = active*256 + inactive; ties to the first
//     in kernel order; 64-bit cross products). ActiveConn counts TCP
//     connections in ESTABLISHED; InActConn every other entry (TCP in
//     other states, all UDP); persistence entries count in neither.
//   - lblc, lblcr: keep a per-service map from destination address (the
//     VIP) to a server (a set of servers for lblcr) as LBLC and LBLCR do.
//
// # Concurrency
//
// A Table is not safe for concurrent use; the caller serializes access.
// Clone gives an independent deep copy. The scheduler functions are pure;
// LBLC and LBLCR values are not safe for concurrent use.
package ipvs
