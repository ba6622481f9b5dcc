//! Flow control and accounts: per-user token buckets and their refill tick (`limiter`), the
//! per-user state every connection shares (`account`), usage sampling (`usage`), and the fleet's
//! bandwidth leases from Redis (`lease`). No sockets.

pub mod account;
pub mod lease;
pub mod limiter;
pub mod usage;
