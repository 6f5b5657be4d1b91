//! Programs over the library: the demo, the load tool, the operator views,
//! the compose file and synthetic data.

pub mod bench;
pub mod compose;
pub mod demo;
pub mod gen_data;
pub mod ops;
