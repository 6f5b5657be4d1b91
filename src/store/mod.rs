//! Where bets are kept.

pub mod file;
