//! Cascade.
