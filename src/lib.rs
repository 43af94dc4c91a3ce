//! konsul-edge: the edge node of a Konsul deployment.
//!
//! One library behind one binary. Data flows one way: inputs (HTTP, MQTT,
//! later D-Bus and sync) -> [`registry`] -> [`store`] (+ outbox) -> sync.
//! See `docs/architecture.md` for the module map.

// No blocking call on the executor (clippy.toml lists them; tests may block).
#![cfg_attr(not(test), warn(clippy::disallowed_methods))]

pub(crate) mod acl;
pub(crate) mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub(crate) mod crdt;
pub mod daemon;
pub(crate) mod dbus;
pub mod devices;
pub mod firmware;
#[cfg(feature = "hawkbit")]
pub mod hawkbit;
pub mod http;
pub mod limits;
pub mod logging;
pub(crate) mod metrics;
pub mod mqtt;
pub mod ota;
pub mod registry;
#[cfg(feature = "sparkplug")]
pub(crate) mod sparkplug;
pub mod store;
pub(crate) mod support;
pub mod sync;
pub(crate) mod systemd;
