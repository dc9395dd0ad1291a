//! Cascade: the gateway library behind the `cascade` binary.

pub mod accounts;
pub mod auth;
pub mod breaker;
pub mod budget;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod context;
pub mod error;
pub mod eval;
pub mod gateway;
pub mod ledger;
pub mod limits;
pub mod live;
pub mod local;
pub mod metrics;
pub mod openai;
pub mod report;
pub mod routing;
pub mod server;
pub mod spool;
pub mod storage;
pub mod upstream;
