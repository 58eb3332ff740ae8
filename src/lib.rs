//! # tether
//!
//! A sticky-session HTTP reverse proxy for stateful conversation workers.
//!
//! ```text
//! client ──TLS/TCP──▶ server (accept, TLS, hyper-util auto h1+h2)
//!    ──▶ proxy::screen   reserved prefix, smuggling checks, body limit
//!    ──▶ proxy::route    affinity cookie / request key ──▶ decision table
//!                        keep │ new (balancer) │ move
//!    ──▶ admission       rate limits; a slot at the worker (FIFO queue)
//!    ──▶ restore         the move: pending captures, fenced re-pin (CAS),
//!                        restore every stored thread, announce
//!    ──▶ proxy::forward  upstream connection verified to reach the pinned
//!                        process; classified failures, safe retries
//!    ◀── response        hop-by-hop stripped, Set-Cookie on (re)pin,
//!                        Tether-Checkpoint ──▶ continuity (capture)
//! ```
//!
//! One module per concern: [`config`] (TOML → validated `Config`),
//! [`server`] (listeners, TLS, accept loop, shutdown), [`proxy`] (the
//! request phases), [`affinity`] (cookie codec, pins, live sessions),
//! [`admission`] (rate limits, per-worker slots and queue),
//! [`balancer`], [`backends`] (the workers and their state), `health`
//! (probes), `upstream` (verified, pooled worker connections), `restore`
//! (the move), `continuity` (capture, the store link, the outage buffer),
//! `store` (SQL), `admin`, `metrics`, [`upgrade`] (hand the listeners to a
//! new binary), [`worker`] (the reference worker),
//! [`demo`].

pub mod admission;
pub mod affinity;
pub mod backends;
pub mod balancer;
pub mod clock;
pub mod config;
pub mod demo;
pub mod proxy;
pub mod server;
pub mod upgrade;
pub mod worker;

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;

pub(crate) mod admin;
pub(crate) mod continuity;
pub(crate) mod deadline;
pub(crate) mod discovery;
pub(crate) mod health;
pub(crate) mod last;
pub(crate) mod live;
pub(crate) mod metrics;
pub(crate) mod restore;
pub(crate) mod store;
pub(crate) mod upstream;
pub(crate) mod wire;
