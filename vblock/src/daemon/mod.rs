//! vblockd: configuration, control logic with persisted state, and the HTTP API server.

pub mod config;
pub mod control;
pub mod server;
