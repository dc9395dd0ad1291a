//! Reports over the ledger: per-variant experiment statistics and spend
//! tables, shared by the admin API and `cascade report`.

pub mod stats;
pub mod table;

pub use stats::{variant_stats, Estimate, VariantStats};
