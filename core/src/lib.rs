//! FFI-free protocol logic of nginx-authentik.
//!
//! Everything here runs without nginx, so `cargo test -p authentik-core` and fuzzers exercise it.
//! The nginx glue (the `nginx-authentik` cdylib) only moves bytes between nginx and these types.
//!
//! Data flows one way on the hot path: cookie -> [`session::SessionId`] -> shared-memory lookup (in
//! the glue) -> [`session::SessionRecord`] -> [`identity`] headers -> upstream. The login path
//! ([`oidc::login`] -> provider -> [`oidc::flow::complete_login`] -> new session) sits beside it.

pub mod config;
pub mod cookie;
pub mod forward;
pub mod identity;
pub mod metrics;
pub mod oidc;
pub mod outpost;
pub mod page;
pub mod paths;
pub mod provider;
pub mod redirect;
pub mod remote;
pub mod request;
pub mod rules;
pub mod session;
pub mod store;
mod wire;

/// Seconds since the Unix epoch. Every time-dependent function takes `now` explicitly, so tests
/// can pin the clock.
pub type UnixTime = i64;
