// Package api is the agent's HTTP JSON API on a unix socket and its Go client (the metrics
// listener is control/metrics).
//
// The socket (default /run/kata-dp/kata-dp.sock) is created with mode 0600 and every
// connection's peer is checked with SO_PEERCRED: only root may talk to the agent, because every
// call can change the host's network. The CLI is a thin client of this API.
//
// This package owns both Kata wire contracts (spec/kata-network.md, spec/kata-ipvs.md): the
// operation names, the routes and request/response types, the exact stdout bytes and the null
// conventions. control has typed methods and knows no CLI bytes: KataNetwork turns a raw
// network file into the typed call and its result into what the CLI prints; the kata-ipvs calls
// run control/ipvsctl. kata-network calls carry the raw network file to the agent and get back
// the exact bytes the CLI prints on stdout (also on failure, where the error response carries
// both the message and the stdout).
//
// Endpoints (all JSON):
//
//	GET    /v1/version                                 {"version": ...}
//	GET    /v1/status                                  [control.SandboxStatus]
//	GET    /v1/sandboxes                               [control.Sandbox]
//	POST   /v1/sandboxes                               control.SandboxSpec -> control.Sandbox
//	DELETE /v1/sandboxes/{id}                          (id or unique prefix)
//	GET    /v1/sandboxes/{id}/health                   control.Sandbox, or the error
//	POST   /v1/sandboxes/{id}/kata-network/{op}        raw network file -> {"stdout": ...}
//	POST   /v1/sandboxes/{id}/kata-ipvs/{op}           IPVSRequest -> IPVSResult (op: ipvsadm,
//	                                                   restore, cleanup; when the agent has an LB)
//	POST   /v1/sandboxes/{id}/kata-ipvs/restore-rules  rules file (text) -> IPVSResult (restore,
//	                                                   without the JSON string; sent as read,
//	                                                   chunked when from a pipe, after the
//	                                                   agent's 100 Continue)
//	GET    /v1/cluster                                 kube.Report (with Kubernetes only; added
//	                                                   by the agent with Server.Handle)
//
// Errors are {"error": message, "code": kind, "stdout": what the CLI prints} with an HTTP
// status that matches the kind. Server.Handle adds endpoints; Client.Do calls them.
// Server and Client are safe for concurrent use.
package api
