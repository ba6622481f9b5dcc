//! The one integration test binary: real servers on 127.0.0.1:0, a loopback origin, temp
//! databases. Suites live in subdirectories so Cargo does not build each as its own binary.

mod support;

mod abuse;
mod accounting;
mod cli;
mod fleet;
mod forward;
mod layers;
mod limits;
mod local;
mod server;
mod tls;
