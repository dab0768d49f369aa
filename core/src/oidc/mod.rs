//! The OpenID Connect relying party: discovery, login requests, token validation, and the
//! blocking provider client that runs on nginx's thread pool (never on the event loop).

pub mod client;
pub mod discovery;
pub mod flow;
pub mod header_auth;
pub mod jwt;
pub mod login;
pub mod metadata;

pub use client::{CallTimer, Endpoint, ProviderClient, ProviderError};
pub use discovery::{Discovery, Jwks};
pub use flow::{complete_login, LoginError, ProviderContext};
pub use login::{authorize_url, PendingLogin};
pub use metadata::MetadataCache;

#[cfg(test)]
pub(crate) mod test_server;
#[cfg(test)]
pub(crate) mod test_support;
