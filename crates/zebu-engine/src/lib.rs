//! Zebu's engine: the replica wire protocol ([`proto`]), the replica server ([`server`]) and client
//! ([`client`]), and the replicating [`engine::Engine`] with snapshots and rebuild.

pub mod client;
pub mod engine;
pub mod proto;
pub mod server;
pub mod stats;

pub use client::{ClientError, ReplicaClient};
pub use engine::{
    Engine, EngineConfig, EngineError, EngineHook, LogHook, Mode, RebuildStats, ReplicaReport,
};
pub use server::ReplicaService;
