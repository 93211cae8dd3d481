//! Kakehashi's harness crate: the local cluster the dev command and the end-to-end tests
//! run on, the real-service harness for Redis and etcd, and (in its own issue) the load
//! generator.
//!
//! # Layout
//! - [`cluster`]: an in-process coordinator and relays on loopback ports.
//! - [`services`]: real Redis / etcd for tests, from the environment or started here.
//! - [`dev`]: the dev command: one real session through a local cluster, step by step.
//! - [`latency`]: percentile summaries of frame latency.
//! - [`procs`]: a cluster of separate processes (N coordinators, M relays) against
//!   real etcd, with kill / terminate / restart, for fault tests and ops scripts.
//! - [`relay_kill`]: the relay-kill fail-over scenario over separate relay processes.
//! - [`proxy`]: a UDP impairment proxy (delay, jitter, loss, blackhole).
//! - [`load`]: the load generator (`run`): many sessions, open-loop, beside a no-relay
//!   baseline; [`report`]: its JSON, table and SVG plot.

pub mod cluster;
pub mod dev;
pub mod latency;
pub mod load;
pub mod procs;
pub mod proxy;
pub mod relay_kill;
pub mod report;
pub mod services;
pub mod testkit;

pub use cluster::{ClusterBuilder, LocalCluster};
