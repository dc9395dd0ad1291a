//! Cascade: the gateway library behind the `cascade` binary.

pub mod cli;
pub mod commands;
pub mod report;
pub mod storage;
