//! Cascade: the gateway library behind the `cascade` binary.
//!
//! Where each concern lives:
//! - `http` (routes, middleware, handlers) and `app` (the server's state and lifecycle): the
//!   HTTP frame, thin over the rest;
//! - `cascade`: one request's path, top to bottom ([`cascade::Gateway::complete`]), with its
//!   context, the local engine and the confidence signals; the verdict itself is the
//!   `policies` crate's;
//! - `openai`: the wire types (request parsing, responses, SSE);
//! - `upstream`: paid calls to remotes (chain, retries, breaker, streams) and the gate every
//!   call passes; `budget`: that gate over storage;
//! - `ledger` (writer and spool), `storage` (the database), `accounts` (usage and spend);
//! - `config`, `reload` (live configuration), `auth`, `error`, `metrics`, `clock`, `limits`;
//! - `commands`, `cli`, `eval`, `reporting`: the binary's subcommands and their tools.

pub mod accounts;
pub mod app;
pub mod auth;
pub mod budget;
pub mod cascade;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod error;
pub mod eval;
pub mod http;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod openai;
pub mod reload;
pub mod reporting;

pub mod storage;
pub mod upstream;
