// Package kube makes the cluster's Services every managed sandbox's load balancer, as
// kube-proxy makes them every pod's: client-go shared informers (watches, no polling; through the
// dynamic client, see informer) follow Services and EndpointSlices, Translate turns each ClusterIP service port
// into a virtual service of control/ipvs with kube-proxy's endpoint semantics, and a Syncer
// hands what changed to a Target (control/clusterlb), which writes it into every sandbox's
// datapath beside, and below, that sandbox's kata-ipvs rules.
//
// The API server is the source of truth: nothing here is saved. Until the first sync after a
// start the datapath keeps what it had (clusterlb defers its rewrite), so an agent restart
// drops nothing. When the API server is unreachable the last programmed state stays; client-go's
// reflectors reconnect with their own backoff, and Status says since when nothing was heard.
//
// Service and real-server ids of the cluster table come from a range of their own
// ([IDBase, IDLimit)), derived from a hash of what they name, so they never collide with
// kata-ipvs ids (which stay below IDBase) and a restarted agent gives the same service the same
// ids: the datapath's backend entries, counters and persistence keep meaning the same thing
// across the restart's full rewrite.
//
// A Syncer is safe for concurrent use; Translate and Table are plain functions and data.
package kube
