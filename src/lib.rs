//! # tether
//!
//! A sticky-session HTTP reverse proxy for stateful conversation workers.
//!
//! ```text
//! client ──TLS/TCP──▶ server (accept, TLS, hyper-util auto h1+h2)
//!    ──▶ proxy::screen   reserved prefix, smuggling checks, body limit
//!    ──▶ proxy::route    affinity cookie / request key ──▶ decision table
//!                        keep │ new (balancer) │ move (rendezvous on session)
//!    ──▶ proxy::forward  pooled client, streaming, safe retries elsewhere
//!    ◀── response        hop-by-hop stripped, Set-Cookie on (re)pin
//! ```
//!
//! Modules, one per concern: [`config`] (TOML → validated `Config`),
//! [`server`] (listeners, TLS, accept loop, shutdown), [`proxy`] (the
//! request phases), [`affinity`] (cookie codec, pins), [`balancer`],
//! [`backends`] (worker set and state), [`health`] (probes), [`admin`],
//! [`metrics`], [`demo`] (local demo workers).

pub mod admin;
pub mod affinity;
pub mod backends;
pub mod balancer;
pub mod clock;
pub mod config;
pub mod continuity;
pub mod demo;
pub mod discovery;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod store;
pub mod worker;
