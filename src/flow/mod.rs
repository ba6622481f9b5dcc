//! Flow control and accounts: per-user token buckets and their refill tick (`limiter`), the
//! per-user state every connection shares (`account`), and usage sampling (`usage`). No sockets.

pub mod account;
pub mod limiter;
pub mod usage;
