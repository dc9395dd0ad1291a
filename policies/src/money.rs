//! Money as integer nano-USD, and per-million-token price tables.
//!
//! Integers, not floats, so that summing thousands of small charges in the ledger is exact and
//! every replica agrees to the last nano-dollar. Arithmetic saturates instead of wrapping: a
//! saturated amount only ever over-states spend, which fails closed on budgets.

use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign};

use serde::{Deserialize, Serialize};

use crate::error::PolicyError;

/// Nano-USD per USD.
const NANOS_PER_USD: u64 = 1_000_000_000;

/// An amount of money in nano-USD (1e-9 USD); serialises as a bare integer.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct NanoUsd(pub u64);

/// Why a USD amount from configuration could not become [`NanoUsd`].
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum MoneyError {
    /// NaN or infinite.
    #[error("must be a finite number of USD, got {0}")]
    NotFinite(f64),
    /// Below zero.
    #[error("must be >= 0 USD, got {0}")]
    Negative(f64),
    /// Larger than `u64::MAX` nano-USD (about 18.4 billion USD).
    #[error("must be at most 18446744073 USD, got {0}")]
    TooLarge(f64),
}

impl NanoUsd {
    /// Zero dollars.
    pub const ZERO: Self = Self(0);
    /// The largest representable amount; saturated sums end here.
    pub const MAX: Self = Self(u64::MAX);

    /// Converts a USD amount from configuration, rounding to the nearest nano-dollar
    /// (so `0.15` is exactly 150_000_000 despite binary floating point).
    pub fn from_usd(usd: f64) -> Result<Self, MoneyError> {
        if !usd.is_finite() {
            return Err(MoneyError::NotFinite(usd));
        }
        if usd < 0.0 {
            return Err(MoneyError::Negative(usd));
        }
        let nanos = (usd * NANOS_PER_USD as f64).round();
        // 2^64 is exactly representable; anything at or above it does not fit in u64.
        if nanos >= 18_446_744_073_709_551_616.0 {
            return Err(MoneyError::TooLarge(usd));
        }
        // In range and integral, so the cast is exact.
        Ok(Self(nanos as u64))
    }

    /// The amount in USD, for display and metrics only (never for arithmetic).
    pub fn usd(self) -> f64 {
        self.0 as f64 / NANOS_PER_USD as f64
    }

    /// `self + other`, stopping at [`NanoUsd::MAX`].
    #[must_use]
    pub fn saturating_add(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0))
    }

    /// `self - other`, stopping at zero.
    #[must_use]
    pub fn saturating_sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }

    /// `self * factor`, stopping at [`NanoUsd::MAX`].
    #[must_use]
    pub fn saturating_mul(self, factor: u64) -> Self {
        Self(self.0.saturating_mul(factor))
    }
}

/// Saturating, like [`NanoUsd::saturating_add`].
impl Add for NanoUsd {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        self.saturating_add(other)
    }
}

/// Saturating, like [`NanoUsd::saturating_add`].
impl AddAssign for NanoUsd {
    fn add_assign(&mut self, other: Self) {
        *self = self.saturating_add(other);
    }
}

/// Saturating sum.
impl Sum for NanoUsd {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::ZERO, Self::saturating_add)
    }
}

/// Exact decimal USD with nine places (`0.000123000`), as used in `x-cascade-cost-usd`.
impl fmt::Display for NanoUsd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:09}",
            self.0 / NANOS_PER_USD,
            self.0 % NANOS_PER_USD
        )
    }
}

/// Validated prices of one model, in nano-USD per million tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PriceTable {
    /// Price of one million prompt tokens.
    pub input_per_million: NanoUsd,
    /// Price of one million generated tokens.
    pub output_per_million: NanoUsd,
}

impl PriceTable {
    /// Cost of a call, rounded UP to the next nano-dollar so that many tiny calls are never
    /// recorded as free. The sum is rounded once, not each part.
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> NanoUsd {
        // Each product fits in u128; only the sum of two maximal ones can overflow.
        let total = (u128::from(input_tokens) * u128::from(self.input_per_million.0))
            .saturating_add(u128::from(output_tokens) * u128::from(self.output_per_million.0));
        let nanos = total.div_ceil(1_000_000);
        NanoUsd(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// Prices as written in configuration: USD per million tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// USD per million prompt tokens.
    pub input_usd_per_million: f64,
    /// USD per million generated tokens.
    pub output_usd_per_million: f64,
}

impl TryFrom<PriceConfig> for PriceTable {
    type Error = PolicyError;

    fn try_from(config: PriceConfig) -> Result<Self, PolicyError> {
        Ok(Self {
            input_per_million: usd_at("input_usd_per_million", config.input_usd_per_million)?,
            output_per_million: usd_at("output_usd_per_million", config.output_usd_per_million)?,
        })
    }
}

/// Converts a configured USD amount, naming `key` on failure.
pub(crate) fn usd_at(key: &str, usd: f64) -> Result<NanoUsd, PolicyError> {
    NanoUsd::from_usd(usd).map_err(|source| PolicyError::Money {
        key: key.to_owned(),
        source,
    })
}

/// Converts an optional configured USD amount, naming `key` on failure.
pub(crate) fn opt_usd_at(key: &str, usd: Option<f64>) -> Result<Option<NanoUsd>, PolicyError> {
    usd.map(|v| usd_at(key, v)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_converts_to_nearest_nano_despite_binary_floats() {
        assert_eq!(NanoUsd::from_usd(0.15).unwrap(), NanoUsd(150_000_000));
        assert_eq!(NanoUsd::from_usd(2.5).unwrap(), NanoUsd(2_500_000_000));
        assert_eq!(NanoUsd::from_usd(0.0).unwrap(), NanoUsd::ZERO);
        assert_eq!(NanoUsd::from_usd(1e-9).unwrap(), NanoUsd(1));
    }

    #[test]
    fn usd_rejects_nan_infinite_negative_and_huge() {
        assert!(matches!(
            NanoUsd::from_usd(f64::NAN),
            Err(MoneyError::NotFinite(_))
        ));
        assert!(matches!(
            NanoUsd::from_usd(f64::INFINITY),
            Err(MoneyError::NotFinite(_))
        ));
        assert!(matches!(
            NanoUsd::from_usd(-0.01),
            Err(MoneyError::Negative(_))
        ));
        assert!(matches!(
            NanoUsd::from_usd(2e10),
            Err(MoneyError::TooLarge(_))
        ));
        assert!(NanoUsd::from_usd(1.8e10).is_ok());
    }

    #[test]
    fn arithmetic_saturates_instead_of_wrapping() {
        assert_eq!(NanoUsd::MAX + NanoUsd(1), NanoUsd::MAX);
        assert_eq!(NanoUsd(1).saturating_sub(NanoUsd(5)), NanoUsd::ZERO);
        assert_eq!(NanoUsd(u64::MAX / 2).saturating_mul(3), NanoUsd::MAX);
        let total: NanoUsd = [NanoUsd(1), NanoUsd::MAX, NanoUsd(2)].into_iter().sum();
        assert_eq!(total, NanoUsd::MAX);
        let mut acc = NanoUsd(2);
        acc += NanoUsd(3);
        assert_eq!(acc, NanoUsd(5));
    }

    #[test]
    fn display_is_exact_decimal_usd_and_usd_is_for_humans() {
        assert_eq!(NanoUsd(123_000).to_string(), "0.000123000");
        assert_eq!(NanoUsd(2_500_000_001).to_string(), "2.500000001");
        assert!((NanoUsd(2_500_000_000).usd() - 2.5).abs() < 1e-12);
    }

    #[test]
    fn cost_rounds_up_to_the_next_nano() {
        // $0.15 / M input: one token costs 150 nano exactly.
        let price = PriceTable {
            input_per_million: NanoUsd(150_000_000),
            output_per_million: NanoUsd(600_000_000),
        };
        assert_eq!(price.cost(1, 0), NanoUsd(150));
        assert_eq!(price.cost(1000, 500), NanoUsd(150_000 + 300_000));
        // $0.000001 / M: a single token is 0.000001 nano, still charged 1 nano.
        let tiny = PriceTable {
            input_per_million: NanoUsd(1),
            output_per_million: NanoUsd(3),
        };
        assert_eq!(tiny.cost(1, 0), NanoUsd(1));
        assert_eq!(
            tiny.cost(1, 1),
            NanoUsd(1),
            "the sum is rounded once, not each part"
        );
        assert_eq!(tiny.cost(1_000_000, 0), NanoUsd(1));
        assert_eq!(tiny.cost(1_000_001, 0), NanoUsd(2));
        assert_eq!(tiny.cost(0, 0), NanoUsd::ZERO);
    }

    #[test]
    fn cost_saturates_on_absurd_inputs() {
        let price = PriceTable {
            input_per_million: NanoUsd::MAX,
            output_per_million: NanoUsd::MAX,
        };
        assert_eq!(price.cost(u64::MAX, u64::MAX), NanoUsd::MAX);
    }

    #[test]
    fn price_config_converts_and_names_the_bad_key() {
        let config: PriceConfig = serde_json::from_value(serde_json::json!({
            "input_usd_per_million": 0.15, "output_usd_per_million": 0.6
        }))
        .unwrap();
        let table = PriceTable::try_from(config).unwrap();
        assert_eq!(table.output_per_million, NanoUsd(600_000_000));

        let bad = PriceConfig {
            input_usd_per_million: 1.0,
            output_usd_per_million: -1.0,
        };
        let err = PriceTable::try_from(bad).unwrap_err();
        assert_eq!(err.key(), "output_usd_per_million");
        assert!(
            err.to_string()
                .starts_with("output_usd_per_million: must be >= 0"),
            "{err}"
        );
    }
}
