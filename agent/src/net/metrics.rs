//! The network signal's instruments. Observable ones read the latest
//! `NetSnapshot`; the lifetime histogram is fed from each new snapshot.

use opentelemetry::metrics::{Histogram, Meter};
use opentelemetry::KeyValue;

use super::NetSnapshot;
use crate::snapshot::Shared;

pub const TARGET: &str = "nodescope.target";
const PEER_ADDRESS: &str = "network.peer.address";
const CONN_DIRECTION: &str = "nodescope.connection.direction";
const IO_DIRECTION: &str = "network.io.direction";
const SERVICE: &str = "nodescope.service";
const NETGROUP: &str = "nodescope.netgroup";
/// ipv4, ipv6, or onion / i2p / proxy for peers behind the node's proxies
const PEER_NETWORK: &str = "nodescope.network";
const ERROR_TYPE: &str = "error.type";

/// Instruments whose attribute sets grow with peers; views raise their
/// cardinality limit to what `limits.top_peers` allows.
pub const PER_PEER_INSTRUMENTS: &[&str] = &["nodescope.peer.io", "nodescope.netgroup.io"];

pub struct NetMetrics {
    lifetime: Histogram<f64>,
}

impl NetMetrics {
    pub fn register(meter: &Meter, net: Shared<NetSnapshot>) -> NetMetrics {
        let s = net.clone();
        meter
            .u64_observable_counter("nodescope.p2p.io")
            .with_unit("By")
            .with_description(
                "TCP payload bytes the node exchanged with all its P2P peers, per connection direction: the sum that \
                 per-peer series cannot give once peers leave the top N or expire",
            )
            .with_callback(move |o| {
                for t in &s.get().targets {
                    for (dir, bytes) in &t.p2p_io {
                        for (io, v) in [("transmit", bytes.sent), ("receive", bytes.received)] {
                            o.observe(
                                v,
                                &[
                                    KeyValue::new(TARGET, t.name.clone()),
                                    KeyValue::new(CONN_DIRECTION, dir.as_str()),
                                    KeyValue::new(IO_DIRECTION, io),
                                ],
                            );
                        }
                    }
                }
            })
            .build();

        let s = net.clone();
        meter
            .u64_observable_counter("nodescope.peer.io")
            .with_unit("By")
            .with_description(
                "TCP payload bytes the node exchanged with each P2P peer (top N peers by bytes, the rest as \"other\")",
            )
            .with_callback(move |o| {
                for t in &s.get().targets {
                    for (key, bytes) in &t.peer_io {
                        let (addr, dir, network) = match key {
                            Some((ip, d, n)) => (ip.to_string(), d.as_str(), n.as_str()),
                            None => ("other".to_string(), "all", "all"),
                        };
                        for (io, v) in [("transmit", bytes.sent), ("receive", bytes.received)] {
                            o.observe(
                                v,
                                &[
                                    KeyValue::new(TARGET, t.name.clone()),
                                    KeyValue::new(PEER_ADDRESS, addr.clone()),
                                    KeyValue::new(CONN_DIRECTION, dir),
                                    KeyValue::new(PEER_NETWORK, network),
                                    KeyValue::new(IO_DIRECTION, io),
                                ],
                            );
                        }
                    }
                }
            })
            .build();

        let s = net.clone();
        meter
            .u64_observable_counter("nodescope.netgroup.io")
            .with_unit("By")
            .with_description("TCP payload bytes exchanged with P2P peers per netgroup (IPv4 /16, IPv6 /32)")
            .with_callback(move |o| {
                for t in &s.get().targets {
                    for (group, bytes) in &t.netgroup_io {
                        let group = group.clone().unwrap_or_else(|| "other".into());
                        for (io, v) in [("transmit", bytes.sent), ("receive", bytes.received)] {
                            o.observe(
                                v,
                                &[
                                    KeyValue::new(TARGET, t.name.clone()),
                                    KeyValue::new(NETGROUP, group.clone()),
                                    KeyValue::new(IO_DIRECTION, io),
                                ],
                            );
                        }
                    }
                }
            })
            .build();

        for (name, desc, pick) in [
            ("nodescope.connection.opened", "TCP connections established", 0usize),
            ("nodescope.connection.closed", "TCP connections closed after being established", 1),
        ] {
            let s = net.clone();
            meter
                .u64_observable_counter(name)
                .with_description(desc)
                .with_callback(move |o| {
                    for t in &s.get().targets {
                        for ((dir, svc), c) in &t.churn {
                            let v = if pick == 0 { c.opened } else { c.closed };
                            o.observe(
                                v,
                                &[
                                    KeyValue::new(TARGET, t.name.clone()),
                                    KeyValue::new(CONN_DIRECTION, dir.as_str()),
                                    KeyValue::new(SERVICE, svc.as_str()),
                                ],
                            );
                        }
                    }
                })
                .build();
        }

        let s = net.clone();
        meter
            .u64_observable_gauge("nodescope.connection.open")
            .with_description("TCP connections open now")
            .with_callback(move |o| {
                for t in &s.get().targets {
                    for ((dir, svc), c) in &t.churn {
                        o.observe(
                            c.open,
                            &[
                                KeyValue::new(TARGET, t.name.clone()),
                                KeyValue::new(CONN_DIRECTION, dir.as_str()),
                                KeyValue::new(SERVICE, svc.as_str()),
                            ],
                        );
                    }
                }
            })
            .build();

        let s = net.clone();
        meter
            .u64_observable_counter("nodescope.connection.failed")
            .with_description("Outbound connects that never established (refused, timed out, reset)")
            .with_callback(move |o| {
                for t in &s.get().targets {
                    for ((svc, reason), n) in &t.failed {
                        o.observe(
                            *n,
                            &[
                                KeyValue::new(TARGET, t.name.clone()),
                                KeyValue::new(CONN_DIRECTION, "outbound"),
                                KeyValue::new(SERVICE, svc.as_str()),
                                KeyValue::new(ERROR_TYPE, *reason),
                            ],
                        );
                    }
                }
            })
            .build();

        let s = net.clone();
        meter
            .u64_observable_gauge("nodescope.peer.netgroups")
            .with_description("Distinct netgroups (IPv4 /16, IPv6 /32) among connected P2P peers")
            .with_callback(move |o| {
                for t in &s.get().targets {
                    for (dir, n) in &t.netgroups {
                        o.observe(
                            *n,
                            &[KeyValue::new(TARGET, t.name.clone()), KeyValue::new(CONN_DIRECTION, dir.as_str())],
                        );
                    }
                }
            })
            .build();

        let s = net.clone();
        meter
            .u64_observable_counter("nodescope.peer.overflowed")
            .with_description("Peers whose bytes went to \"other\" because limits.max_peers peers were already tracked")
            .with_callback(move |o| {
                for t in &s.get().targets {
                    o.observe(t.peers_overflowed, &[KeyValue::new(TARGET, t.name.clone())]);
                }
            })
            .build();

        let s = net.clone();
        meter
            .u64_observable_counter("nodescope.net.connections.dropped")
            .with_description(
                "Connections the kernel could not track because limits.max_connections records were in use",
            )
            .with_callback(move |o| o.observe(s.get().kernel.conn_dropped, &[]))
            .build();

        let s = net.clone();
        meter
            .u64_observable_counter("nodescope.net.close_events.deferred")
            .with_description("Connection opens and closes the kernel kept as map records for the next read because the event log of the CPU they happened on was full")
            .with_callback(move |o| o.observe(s.get().kernel.events_full, &[]))
            .build();

        // The scope maps (scope.bpf.h): what the kernel could not add as
        // processes started and cgroups were made, because a map was full.
        let s = net;
        meter
            .u64_observable_counter("nodescope.scope.dropped")
            .with_description("Processes, cgroups, ports or exec events the kernel could not add to the watched set because its map or ring buffer was full")
            .with_callback(move |o| {
                let k = s.get().kernel.scope;
                for (what, n) in [("pid", k.pids_full), ("cgroup", k.cgroups_full), ("port", k.ports_full), ("exec_event", k.events_lost)] {
                    o.observe(n, &[KeyValue::new("kind", what)]);
                }
            })
            .build();

        let lifetime = meter
            .f64_histogram("nodescope.connection.duration")
            .with_unit("s")
            .with_description("Lifetime of TCP connections at close, from establishment")
            .with_boundaries(super::LIFETIME_BUCKETS.to_vec())
            .build();
        NetMetrics { lifetime }
    }

    /// Feeds what a new snapshot adds to synchronous instruments.
    pub fn record(&self, snap: &NetSnapshot) {
        for t in &snap.targets {
            for (dir, svc, secs, n) in &t.closed_lifetimes {
                let attrs = [
                    KeyValue::new(TARGET, t.name.clone()),
                    KeyValue::new(CONN_DIRECTION, dir.as_str()),
                    KeyValue::new(SERVICE, svc.as_str()),
                ];
                for _ in 0..*n {
                    self.lifetime.record(*secs, &attrs);
                }
            }
        }
    }
}
