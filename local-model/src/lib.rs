//! Local inference.
