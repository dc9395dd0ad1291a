//! Q5_0 weights (blocks of 32 five-bit values with an F16 scale; a value is
//! its five bits minus 16) times activations quantized to 8 bits per 32
//! values, held and multiplied as Q4_1 is (`q4_1.rs`).
//!
//! candle 0.11 runs Q5_0 through a scalar loop, so the engine converted it
//! to Q8_0 at load: 34 bytes per 32 values where the file has 22. Gemma 3
//! 270M holds most of its layer weights in Q5_0. Held here, each step's
//! fifth bits sit beside its nibbles as two 64-bit masks (one bit per
//! byte of the step's low and high values), which AVX-512 adds as 16 with
//! one masked add each; the minimum of `d·Σ q·y + m·Σ y` is `-16·d`.

use candle_core::quantized::GgmlDType;

#[cfg(target_arch = "x86_64")]
use super::q4_1::{nibbles_narrow, nibbles_wide, QUAD_BYTES};
use super::q4_1::{pack_nibbles, SideLayout, SideMatrix, LANES};

/// Q5_0: per block an F16 scale, 32 fifth bits, 16 bytes of nibbles; held
/// as the sixteen scales, each step's fifth bits, then the nibbles.
#[derive(Debug, Clone)]
pub struct Q5_0Layout;

/// Q5_0 weights, `rows x cols`, held sixteen rows side by side.
pub type Q5_0Matrix = SideMatrix<Q5_0Layout>;

/// Values per block.
const BLOCK: usize = 32;
/// Where a held block's fifth bits lie: per step, the mask of its low
/// values, then that of its high values (bit `4r + t` is row `r`'s value
/// `t` of the four), each a little-endian u64.
const HIGH_AT: usize = 2 * LANES;
const HIGH_BYTES: usize = 16;
/// Steps per block.
const STEPS: usize = 4;

impl SideLayout for Q5_0Layout {
    const FORMAT: GgmlDType = GgmlDType::Q5_0;
    const MIN_PER_SCALE: f32 = -16.0;
    const BLOCK_BYTES: usize = 22;
    const VALUES_AT: usize = HIGH_AT + STEPS * HIGH_BYTES;
    const MAX_VALUE: i32 = 31;
    const UNPACK: bool = true;

    fn pack_block(block: &[u8], lane: usize, step: &mut [u8]) {
        step[2 * lane..2 * lane + 2].copy_from_slice(&block[..2]);
        // GGUF: bit `i` of the u32 at 2 is value `i`'s fifth bit; value `i`
        // in the low nibble of byte `6 + i`, `16 + i` in the high.
        let high_bits = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
        let mut values = [0u8; BLOCK];
        for (i, &byte) in block[6..].iter().enumerate() {
            values[i] = byte & 0xF;
            values[BLOCK / 2 + i] = byte >> 4;
        }
        pack_nibbles(&values, lane, step, Self::VALUES_AT);
        for s in 0..STEPS {
            for (half, at) in [
                (0, HIGH_AT + HIGH_BYTES * s),
                (1, HIGH_AT + HIGH_BYTES * s + 8),
            ] {
                let mut mask = [0u8; 8];
                mask.copy_from_slice(&step[at..at + 8]);
                let mut mask = u64::from_le_bytes(mask);
                for t in 0..4 {
                    let value = 8 * s + 4 * half + t;
                    if high_bits >> value & 1 == 1 {
                        mask |= 1 << (4 * lane + t);
                    }
                }
                step[at..at + 8].copy_from_slice(&mask.to_le_bytes());
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn values_wide(
        simd: pulp::x86::V4,
        step: &[u8],
        s: usize,
    ) -> (std::arch::x86_64::__m512i, std::arch::x86_64::__m512i) {
        let (low, high) = nibbles_wide(simd, step, Self::VALUES_AT + s * QUAD_BYTES);
        let sixteen = simd.avx512f._mm512_set1_epi8(16);
        let (low_mask, high_mask) = masks(step, s);
        (
            simd.avx512bw
                ._mm512_mask_add_epi8(low, low_mask, low, sixteen),
            simd.avx512bw
                ._mm512_mask_add_epi8(high, high_mask, high, sixteen),
        )
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn values_narrow(
        simd: pulp::x86::V3,
        step: &[u8],
        s: usize,
        half: usize,
    ) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
        let (low, high) = nibbles_narrow(simd, step, Self::VALUES_AT + s * QUAD_BYTES + 32 * half);
        // This half's 32 bits of a mask (low values at 0, high at 8), one
        // per byte: byte `j` takes the mask's byte `j / 8` and keeps bit
        // `j % 8`, then becomes 16 where it is set. The four bytes are
        // broadcast straight from the held step (a load, where going
        // through a general register cost two vector instructions more).
        let spread = |mask_at: usize| {
            let at = HIGH_AT + HIGH_BYTES * s + mask_at + 4 * half;
            let bits: [u8; 4] = std::array::from_fn(|k| step[at + k]);
            let bytes = simd.avx._mm256_set1_epi32(i32::from_le_bytes(bits));
            let which: [u8; 32] = std::array::from_fn(|j| (j / 8) as u8);
            let spread = simd
                .avx2
                ._mm256_shuffle_epi8(bytes, pulp::bytemuck::cast(which));
            let bit: [u8; 32] = std::array::from_fn(|j| 1 << (j % 8));
            let bit = pulp::bytemuck::cast(bit);
            let set = simd
                .avx2
                ._mm256_cmpeq_epi8(simd.avx2._mm256_and_si256(spread, bit), bit);
            simd.avx2
                ._mm256_and_si256(set, simd.avx._mm256_set1_epi8(16))
        };
        (
            simd.avx2._mm256_or_si256(low, spread(0)),
            simd.avx2._mm256_or_si256(high, spread(8)),
        )
    }
}

/// Step `s`'s masks of fifth bits: of its low values, of its high ones.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn masks(step: &[u8], s: usize) -> (u64, u64) {
    let at = HIGH_AT + HIGH_BYTES * s;
    let mut low = [0u8; 8];
    let mut high = [0u8; 8];
    low.copy_from_slice(&step[at..at + 8]);
    high.copy_from_slice(&step[at + 8..at + 16]);
    (u64::from_le_bytes(low), u64::from_le_bytes(high))
}
