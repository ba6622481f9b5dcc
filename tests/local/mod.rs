//! `sluice local` end to end (local → server → origin).
