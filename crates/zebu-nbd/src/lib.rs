//! Zebu's NBD frontend: a server for the Network Block Device protocol, independent of the rest of
//! Zebu. Anything implementing [`BlockDevice`] can be exported by name.

pub mod client;
pub mod mem;
pub mod proto;
pub mod server;

pub use server::{
    BlockDevice, ConnError, DeviceError, Exports, Extent, MAX_PAYLOAD, handle_client, serve,
};
