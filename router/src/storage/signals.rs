//! A local answer's confidence signals as the ledger keeps them (`request_signals`, when the
//! policy's `log_signals` asks): compact bytes, encoded once when the record is built and
//! decoded only by `cascade calibrate --ledger`.
//!
//! Tokens are little-endian f32 triples (log-prob, entropy, margin: 12 bytes a token; an
//! impossible token's log-prob stays `-inf`). Hidden-state features are little-endian f16, the
//! four vectors one after the other (final_mean, final_last, middle_mean, middle_last): half
//! precision keeps three significant digits, far below what a probe fitted on standardised,
//! projected values notices, at half the size (4.5 KiB a request for SmolLM2-135M).

use local_model::ProbeFeatures;
use policies::TokenSignal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes one token's signals take.
const TOKEN_BYTES: usize = 12;

/// The hidden vectors in the order they are stored.
const HIDDEN_VECTORS: usize = 4;

/// One request's signals, encoded for storage. Serialized (in the spool file, while the
/// database is unavailable) as hexadecimal strings, so a JSON line holds them exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedSignals {
    /// The generated tokens' signals.
    #[serde(serialize_with = "to_hex", deserialize_with = "from_hex")]
    pub tokens: Vec<u8>,
    /// The hidden-state features, when kept and the engine returned them.
    #[serde(
        default,
        serialize_with = "to_hex_opt",
        deserialize_with = "from_hex_opt"
    )]
    pub hidden: Option<Vec<u8>>,
}

/// One request's signals, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSignals {
    /// Per generated token.
    pub tokens: Vec<TokenSignal>,
    /// The hidden-state features (rounded to half precision), when kept.
    pub hidden: Option<ProbeFeatures>,
}

/// Stored bytes that are not signals this version wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalDecodeError {
    /// The token bytes are not whole triples.
    #[error("stored token signals are {0} bytes, not a multiple of {TOKEN_BYTES}")]
    Tokens(usize),
    /// The hidden bytes are not four equal vectors of f16.
    #[error("stored hidden features are {0} bytes, not four equal, non-empty vectors of f16")]
    Hidden(usize),
}

impl EncodedSignals {
    /// Encodes the tokens, and the hidden features when given.
    pub fn encode(tokens: &[TokenSignal], hidden: Option<&ProbeFeatures>) -> Self {
        let mut bytes = Vec::with_capacity(tokens.len() * TOKEN_BYTES);
        for t in tokens {
            for v in [t.logprob, t.entropy, t.margin] {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        let hidden = hidden.map(|p| {
            let vectors = [&p.final_mean, &p.final_last, &p.middle_mean, &p.middle_last];
            let mut out = Vec::with_capacity(vectors.iter().map(|v| v.len() * 2).sum());
            for v in vectors {
                for x in v.iter() {
                    out.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes());
                }
            }
            out
        });
        Self {
            tokens: bytes,
            hidden,
        }
    }

    /// Decodes what [`EncodedSignals::encode`] wrote.
    pub fn decode(&self) -> Result<RequestSignals, SignalDecodeError> {
        if !self.tokens.len().is_multiple_of(TOKEN_BYTES) {
            return Err(SignalDecodeError::Tokens(self.tokens.len()));
        }
        let f32_at = |chunk: &[u8], i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&chunk[4 * i..4 * i + 4]);
            f32::from_le_bytes(b)
        };
        let tokens = self
            .tokens
            .chunks_exact(TOKEN_BYTES)
            .map(|c| TokenSignal {
                logprob: f32_at(c, 0),
                entropy: f32_at(c, 1),
                margin: f32_at(c, 2),
            })
            .collect();
        let hidden = match &self.hidden {
            None => None,
            Some(bytes) => {
                let vector_bytes = bytes.len() / HIDDEN_VECTORS;
                if bytes.is_empty() || !bytes.len().is_multiple_of(2 * HIDDEN_VECTORS) {
                    return Err(SignalDecodeError::Hidden(bytes.len()));
                }
                let vector = |k: usize| -> Vec<f32> {
                    bytes[k * vector_bytes..(k + 1) * vector_bytes]
                        .chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect()
                };
                Some(ProbeFeatures {
                    final_mean: vector(0),
                    final_last: vector(1),
                    middle_mean: vector(2),
                    middle_last: vector(3),
                })
            }
        };
        Ok(RequestSignals { tokens, hidden })
    }
}

fn to_hex<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}

fn from_hex<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(d)?;
    hex::decode(text).map_err(serde::de::Error::custom)
}

fn to_hex_opt<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match bytes {
        Some(b) => s.serialize_some(&hex::encode(b)),
        None => s.serialize_none(),
    }
}

fn from_hex_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|text| hex::decode(text).map_err(serde::de::Error::custom))
        .transpose()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tokens() -> Vec<TokenSignal> {
        vec![
            TokenSignal {
                logprob: -0.25,
                entropy: 1.5,
                margin: 0.75,
            },
            TokenSignal {
                logprob: f32::NEG_INFINITY,
                entropy: 0.0,
                margin: 1.0,
            },
        ]
    }

    fn features() -> ProbeFeatures {
        ProbeFeatures {
            final_mean: vec![1.0, -2.0, 0.333_333],
            final_last: vec![65_000.0, 0.0, -0.5],
            middle_mean: vec![3.0, 4.0, 5.0],
            middle_last: vec![-1e-3, 7.25, 1234.567],
        }
    }

    #[test]
    fn tokens_round_trip_exactly_and_hidden_features_to_half_precision() {
        let encoded = EncodedSignals::encode(&tokens(), Some(&features()));
        assert_eq!(encoded.tokens.len(), 24);
        assert_eq!(encoded.hidden.as_ref().map(Vec::len), Some(24));
        let decoded = encoded.decode().unwrap();
        assert_eq!(decoded.tokens, tokens());
        let hidden = decoded.hidden.unwrap();
        let want = features();
        for (got, want) in [
            (&hidden.final_mean, &want.final_mean),
            (&hidden.final_last, &want.final_last),
            (&hidden.middle_mean, &want.middle_mean),
            (&hidden.middle_last, &want.middle_last),
        ] {
            assert_eq!(got.len(), 3);
            for (g, w) in got.iter().zip(want.iter()) {
                // f16 keeps 11 significant bits: a relative error of at most 2^-11.
                assert!((g - w).abs() <= w.abs() / 2048.0, "{g} against {w}");
            }
        }
        // Exact where half precision is exact.
        assert_eq!(hidden.final_mean[..2], [1.0, -2.0]);
        assert_eq!(hidden.middle_last[1], 7.25);
    }

    #[test]
    fn the_spool_form_is_json_that_reads_back_to_the_same_bytes() {
        for encoded in [
            EncodedSignals::encode(&tokens(), Some(&features())),
            EncodedSignals::encode(&tokens(), None),
            EncodedSignals::encode(&[], None),
        ] {
            let line = serde_json::to_string(&encoded).unwrap();
            let back: EncodedSignals = serde_json::from_str(&line).unwrap();
            assert_eq!(back, encoded);
        }
        let no_hidden: EncodedSignals = serde_json::from_str(r#"{"tokens": ""}"#).unwrap();
        assert_eq!(no_hidden.hidden, None);
        assert!(serde_json::from_str::<EncodedSignals>(r#"{"tokens": "zz"}"#).is_err());
    }

    #[test]
    fn bytes_of_the_wrong_length_are_refused() {
        let bad_tokens = EncodedSignals {
            tokens: vec![0; 13],
            hidden: None,
        };
        assert_eq!(bad_tokens.decode(), Err(SignalDecodeError::Tokens(13)));
        for len in [0, 6, 10] {
            let bad_hidden = EncodedSignals {
                tokens: Vec::new(),
                hidden: Some(vec![0; len]),
            };
            assert_eq!(bad_hidden.decode(), Err(SignalDecodeError::Hidden(len)));
        }
    }
}
