//! Integration tests: the real server on 127.0.0.1:0 in front of mock
//! workers, driven by real HTTP clients. One binary, one module a concern.

#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod support;

mod admission;
mod affinity;
mod binary;
mod browser;
mod continuity;
mod dashboard;
mod edge;
mod edge_requests;
mod edge_slow;
mod edge_tls;
mod faults;
mod forwarding;
mod health;
mod interleavings;
mod recovery;
mod tls;
mod upgrade;
mod websocket;
