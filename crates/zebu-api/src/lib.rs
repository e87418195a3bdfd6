//! Zebu's API as both ends see it: the object model ([`model`]), the messages between nodes and
//! the manager, the typed REST client ([`client`]) and the domain error with stable codes
//! ([`error`]). No HTTP server, store or object-store dependency: node agents and the CLI use it
//! without the manager.

pub mod client;
pub mod error;
pub mod model;

pub use error::{Error, ErrorKind, body_message};
