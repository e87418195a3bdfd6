//! Zebu's control plane: the object model, the store, the controllers and the REST API.

pub mod api;
pub mod backups;
pub mod client;
pub mod controller;
pub mod model;
pub mod openapi;
pub mod revert;
pub mod store;
