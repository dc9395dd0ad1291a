//! Q8_0 weights (blocks of 32 signed bytes and an F16 scale) times
//! activations quantized the same way, held and multiplied as Q4_1 is
//! (`q4_1.rs`): sixteen rows side by side, lane `r` of every vector row
//! `r`, four values a lane.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so a weight `w` is held
//! as the unsigned `w + 128` (its sign bit flipped) and the product taken
//! as `d·Σ (w+128)·y - 128·d·Σ y`: the minimum's term of Q4_1, with the
//! minimum `-128·d`. The integer sums are exact on every path, and the
//! activations meet the weights as they are, without the sign trick the
//! earlier four-row kernel applied per row and block (`|w|` times `y` with
//! `w`'s sign). Without VNNI, `maddubs` would saturate on those bytes
//! (two products of up to 255 × 127 in 16 bits): the AVX-512 path
//! multiplies the two nibbles of each byte apart, the AVX2 path takes
//! `Σ w·y` with the sign trick and adds `128·Σ y` back once per block
//! (`SideLayout::FULL_BYTES`); the integer sums are the same on every path.
//!
//! Gemma 3's embedding table is Q8_0 and doubles as its output projection
//! (262,144 rows): in batched decode it is the largest product of a step,
//! and in this layout each block's sums need one conversion and two fused
//! multiply-adds for sixteen rows instead of sums across lanes per row.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::q4_1::{SideLayout, SideMatrix, LANES, QUAD_BYTES};
use super::{activation_rows, check_blocks, quantize_block, KernelError, Simd};

/// Values per Q8_0 block.
const BLOCK: usize = 32;
/// Where a held block's values start: after the sixteen F16 scales.
const VALUES_AT: usize = 2 * LANES;

/// Activation rows quantized to 8 bits per 32-value block, with an F32
/// scale per block (llama.cpp and candle round the scale to F16), and each
/// block's sum of its rounded values: scaled, the minimum's term of the
/// formats with a minimum (Q4_1, and Q8_0 held offset); as it is, what the
/// AVX2 path adds back to Q8_0's sign-trick sums (`full_byte_sums`).
#[derive(Debug, Clone)]
pub(super) struct Activations {
    scales: Vec<f32>,
    values: Vec<[i8; BLOCK]>,
    value_sums: Vec<i32>,
    blocks_per_row: usize,
}

impl Activations {
    pub(super) fn quantize(simd: Simd, x: &[f32], cols: usize) -> Result<Self, KernelError> {
        activation_rows(x, cols)?;
        check_blocks(GgmlDType::Q8_0, cols)?;
        let blocks = x.len() / BLOCK;
        let mut scales = Vec::with_capacity(blocks);
        let mut values = Vec::with_capacity(blocks);
        let mut value_sums = Vec::with_capacity(blocks);
        for chunk in x.chunks_exact(BLOCK) {
            let mut q = [0i8; BLOCK];
            let mut sum = [0i32];
            scales.push(quantize_block(simd, chunk, &mut q, &mut sum));
            value_sums.push(sum[0]);
            values.push(q);
        }
        Ok(Self {
            scales,
            values,
            value_sums,
            blocks_per_row: cols / BLOCK,
        })
    }

    /// How many rows it holds.
    pub(super) fn rows(&self) -> usize {
        self.scales
            .len()
            .checked_div(self.blocks_per_row)
            .unwrap_or(0)
    }

    /// Row `i`'s blocks.
    pub(super) fn row(&self, i: usize) -> ActivationRow<'_> {
        let range = i * self.blocks_per_row..(i + 1) * self.blocks_per_row;
        ActivationRow {
            scales: &self.scales[range.clone()],
            values: &self.values[range.clone()],
            value_sums: &self.value_sums[range],
        }
    }
}

/// Q8_0: per block an F16 scale and 32 signed bytes; held as the sixteen
/// scales, then the values four a row (bytes `4r..4r+4` of each 64 are row
/// `r`'s), each as `w + 128`.
#[derive(Debug, Clone)]
pub struct Q8_0Layout;

/// Q8_0 weights, `rows x cols`, held sixteen rows side by side.
pub type Q8_0Matrix = SideMatrix<Q8_0Layout>;

/// Flips a signed byte's sign bit: `w + 128` as an unsigned byte, and back.
fn offset(byte: u8) -> u8 {
    byte ^ 0x80
}

impl SideLayout for Q8_0Layout {
    const FORMAT: GgmlDType = GgmlDType::Q8_0;
    const MIN_PER_SCALE: f32 = -128.0;
    const BLOCK_BYTES: usize = 34;
    const VALUES_AT: usize = VALUES_AT;
    const FULL_BYTES: bool = true;

    fn pack_block(block: &[u8], lane: usize, step: &mut [u8]) {
        step[2 * lane..2 * lane + 2].copy_from_slice(&block[..2]);
        for (k, quad) in block[2..].chunks_exact(4).enumerate() {
            let at = VALUES_AT + k * QUAD_BYTES + 4 * lane;
            for (held, &value) in step[at..at + 4].iter_mut().zip(quad) {
                *held = offset(value);
            }
        }
    }

    /// Step `s`: quads `2s` and `2s + 1`, one 64-byte vector each.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn values_wide(
        _simd: pulp::x86::V4,
        step: &[u8],
        s: usize,
    ) -> (std::arch::x86_64::__m512i, std::arch::x86_64::__m512i) {
        let at = VALUES_AT + 2 * s * QUAD_BYTES;
        (
            pulp::bytemuck::pod_read_unaligned(&step[at..at + QUAD_BYTES]),
            pulp::bytemuck::pod_read_unaligned(&step[at + QUAD_BYTES..at + 2 * QUAD_BYTES]),
        )
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn values_narrow(
        _simd: pulp::x86::V3,
        step: &[u8],
        s: usize,
        half: usize,
    ) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
        let at = VALUES_AT + 2 * s * QUAD_BYTES + 32 * half;
        (
            pulp::bytemuck::pod_read_unaligned(&step[at..at + 32]),
            pulp::bytemuck::pod_read_unaligned(&step[at + QUAD_BYTES..at + QUAD_BYTES + 32]),
        )
    }
}

impl Q8_0Matrix {
    /// Row `row`, dequantised (an embedding lookup in a table shared with
    /// an output projection).
    pub fn row(&self, row: usize) -> Option<Vec<f32>> {
        let (blocks, lane) = self.held_row(row)?;
        let mut out = Vec::with_capacity(self.cols());
        for step in blocks {
            let scale = f16::from_le_bytes([step[2 * lane], step[2 * lane + 1]]).to_f32();
            for k in 0..BLOCK / 4 {
                let at = VALUES_AT + k * QUAD_BYTES + 4 * lane;
                out.extend(
                    step[at..at + 4]
                        .iter()
                        .map(|&held| f32::from(offset(held) as i8) * scale),
                );
            }
        }
        Some(out)
    }
}

/// Why weights could not be read into the held layout.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Layout(#[from] KernelError),
    #[error("reading quantized weights: {0}")]
    Io(#[from] std::io::Error),
}

/// One activation row's blocks: scales, rounded values, and each block's
/// sum of its rounded values.
#[derive(Debug, Clone, Copy)]
pub(super) struct ActivationRow<'a> {
    pub(super) scales: &'a [f32],
    pub(super) values: &'a [[i8; BLOCK]],
    pub(super) value_sums: &'a [i32],
}

impl ActivationRow<'_> {
    /// Block `b`'s sum in activation units: its scale times the sum of its
    /// rounded values.
    pub(super) fn sum(&self, b: usize) -> f32 {
        self.scales[b] * self.value_sums[b] as f32
    }
}
