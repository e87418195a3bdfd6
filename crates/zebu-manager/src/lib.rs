//! Zebu's manager: the store (redb, in-memory, cached and transactional views), the services,
//! the reconcile loop and the REST API.

pub mod api;
pub mod api_images;
pub mod api_system;
// The object model and the client live in zebu-api (shared with node agents and the CLI).
pub use zebu_api::{Error as ApiError, ErrorKind, body_message, client, model};
pub mod backing_images;
pub mod backups;
pub mod cache;
pub mod controller;
pub mod engines;
pub mod metrics;
pub mod nodes;
pub mod openapi;
pub mod planner;
pub mod reconcile;
pub mod restores;
pub mod revert;
pub mod store;
pub mod system_backups;
pub mod targets;
#[cfg(test)]
mod test_fixture;
pub mod txn;
pub mod volumes;
