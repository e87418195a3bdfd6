//! The OpenAPI document of the REST API, committed as docs/openapi.json and served as is.

pub const DOCUMENT: &str = include_str!("../../../docs/openapi.json");
