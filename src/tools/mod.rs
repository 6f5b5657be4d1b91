//! Programs over the library: the demo, the load tool, the operator views,
//! the compose file and synthetic data, `verify` and `new-round`, and what they share to start a
//! central and agencies.

pub mod bench;
pub mod compose;
pub mod demo;
pub mod gen_data;
pub mod launch;
pub mod ops;
pub mod progress;
pub mod verify;
