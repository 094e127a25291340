//! The vswitchd daemon: configuration, the control logic over the datapath with persisted
//! state, and the HTTP/JSON control API on a unix socket.

pub mod cluster;
pub mod config;
pub mod control;
pub mod server;
