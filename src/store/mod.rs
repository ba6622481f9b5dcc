//! The user store: users, their limits and their usage, kept in a database. The rest of the
//! program sees plain structs; SQL lives in `sqlite.rs` only.

pub mod sqlite;
