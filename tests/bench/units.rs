//! The benchmark's unit tests: a second crate root over the benchmark's modules, so `make test`
//! runs their `#[test]`s with the normal harness while `make bench` runs `bench.rs`'s `main`.
//! A new scenario file needs a line here only when another module uses it.

// Only the tests' callers are used in this crate; the rest serves `bench.rs`.
#![allow(dead_code)]

mod accuracy;
mod client;
mod control;
mod origin;
mod peers;
mod procs;
mod proxies;
mod scale;
mod shares;
mod stage;
mod table;
mod throughput;
mod tls;

pub use stage::{Config, Ctx};
