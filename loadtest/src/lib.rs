//! Kakehashi's harness crate: the local cluster the dev command and the end-to-end tests
//! run on, the real-service harness for Redis and etcd, and (in its own issue) the load
//! generator.
//!
//! # Layout
//! - [`cluster`]: an in-process coordinator and relays on loopback ports.
//! - [`services`]: real Redis / etcd for tests, from the environment or started here.
//! - [`dev`]: the dev command: one real session through a local cluster, step by step.
//! - [`latency`]: percentile summaries of frame latency.
//! - [`proxy`]: a UDP impairment proxy (delay, jitter, loss, blackhole).

pub mod cluster;
pub mod dev;
pub mod latency;
pub mod proxy;
pub mod services;

pub use cluster::{ClusterBuilder, LocalCluster};
