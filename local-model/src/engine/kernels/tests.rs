//! Checks of both kernels against the weights' own values and candle's
//! kernels, on small random matrices.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

use super::{GroupedWeights, KernelError, Q4KMatrix, Q4_1Matrix, Q8_0Matrix, ReadError};

fn random(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    crate::engine::test_values(rows * cols, seed)
        .into_iter()
        .map(|v| v - 0.5)
        .collect()
}

/// Weights of `format` in GGUF's layout and their dequantised values.
fn quantized(format: GgmlDType, rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let dense = Tensor::from_vec(random(rows, cols, seed), (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&dense, format).unwrap();
    let values = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (q.data().unwrap().to_vec(), values)
}

/// Whether candle's kernel takes rows of `cols` values of `format`: its
/// Q4_1 and Q5_0 products (debug builds assert it) want an even number of
/// blocks per row.
fn candle_takes(format: GgmlDType, cols: usize) -> bool {
    let blocks = cols / format.block_size();
    !matches!(format, GgmlDType::Q4_1 | GgmlDType::Q5_0) || blocks.is_multiple_of(2)
}

fn candle_product(
    format: GgmlDType,
    bytes: &[u8],
    x: &[f32],
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    let QStorage::Cpu(blocks) =
        QStorage::from_data(bytes.to_vec().into(), &Device::Cpu, format).unwrap()
    else {
        panic!("CPU storage")
    };
    let m = x.len() / cols;
    let mut out = vec![0f32; m * rows];
    blocks.matmul_t((m, cols, rows), x, &mut out).unwrap();
    out
}

/// Our product on every path this CPU has (AVX2, AVX-VNNI, AVX-512,
/// AVX-512 VNNI) against the exact one on the dequantised weights (bounded
/// by rounding the activations: half a step of a block's 8-bit grid per
/// value, values within ±0.5) and against candle's kernel. VNNI only
/// replaces how the same integer sums are formed, so each VNNI path must
/// equal its path without VNNI bit for bit. Paths the CPU lacks are
/// reported as skipped on stderr (not captured by the test harness).
fn check_format(format: GgmlDType, rows: usize, cols: usize, m: usize, candle_tolerance: f32) {
    let (bytes, weights) = quantized(format, rows, cols, 1);
    let grouped = GroupedWeights::new(format, &bytes, rows, cols)
        .unwrap()
        .expect("the test build targets x86-64-v3, which has AVX2 and FMA");
    let x = random(m, cols, 2);
    let candle = candle_takes(format, cols).then(|| candle_product(format, &bytes, &x, rows, cols));
    let check = |grouped: &GroupedWeights| {
        check_product(
            format,
            grouped,
            &weights,
            &x,
            candle.as_deref(),
            candle_tolerance,
        )
    };
    // 19 rows for the tiles: a whole tile of 16 and a partial one.
    let x_tiles = random(19, cols, 3);
    let candle_tiles =
        candle_takes(format, cols).then(|| candle_product(format, &bytes, &x_tiles, rows, cols));
    check_amx(
        format,
        &grouped,
        &weights,
        &x_tiles,
        candle_tiles.as_deref(),
        candle_tolerance,
    );
    let grouped = grouped.without_amx();
    let narrow = grouped.clone().without_avx512();
    assert!(!narrow.uses_avx512());
    let mut ran = Vec::new();
    for (weights, wide) in [(grouped, true), (narrow, false)] {
        let plain = weights.clone().without_vnni();
        if wide && !plain.uses_avx512() {
            skipped(format, "AVX-512 and AVX-512 VNNI", "AVX-512 F/BW/CD/DQ/VL");
            continue;
        }
        check(&plain);
        ran.push(plain.path());
        if weights.path() == plain.path() {
            let vnni = if wide { "AVX-512 VNNI" } else { "AVX-VNNI" };
            skipped(
                format,
                vnni,
                "its VNNI instructions, or the format has no VNNI path",
            );
            continue;
        }
        check(&weights);
        ran.push(weights.path());
        assert_eq!(
            weights.matmul(&x).unwrap(),
            plain.matmul(&x).unwrap(),
            "{format:?}: {} differs from {}",
            weights.path().name(),
            plain.path().name()
        );
    }
    let names: Vec<_> = ran.iter().map(|p| p.name()).collect();
    report(&format!("{format:?}: checked {}", names.join(", ")));
}

/// The AMX paths (16 activation rows or more; opt-in, so enabled here
/// wherever the CPU and kernel allow) against the same bounds, and against
/// the AVX path: the tiles must give the AVX-512 kernel's bits. Run for 16
/// to 113 rows (whole runs of 16, odd and even counts of them, and the rows
/// after them; Q4_K's tiles start at 64).
fn check_amx(
    format: GgmlDType,
    grouped: &GroupedWeights,
    weights: &[f32],
    x: &[f32],
    candle: Option<&[f32]>,
    candle_tolerance: f32,
) {
    let grouped = &grouped.clone().with_available_amx();
    if !grouped.uses_amx() {
        skipped(
            format,
            "AMX",
            "AMX-INT8, the kernel's grant of the tile state, or AVX-512",
        );
        return;
    }
    check_product(format, grouped, weights, x, candle, candle_tolerance);
    let cols = weights.len() / grouped.rows();
    for m in [16, 17, 32, 33, 40, 64, 65, 80, 113] {
        let x = random(m, cols, 11 + m as u64);
        let tiles = grouped.matmul(&x).unwrap();
        let avx = grouped.clone().without_amx().matmul(&x).unwrap();
        assert_eq!(
            tiles, avx,
            "{format:?} AMX, {m} rows: not the AVX-512 kernel's bits"
        );
    }
    report(&format!("{format:?}: checked AMX"));
}

/// Writes to the process's stderr directly, past the harness's capture, so
/// that every run shows which paths were not tested on this host.
fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "kernels: {line}");
}

fn skipped(format: GgmlDType, path: &str, lacks: &str) {
    report(&format!(
        "{format:?}: SKIPPED the {path} path: this CPU lacks {lacks} (or CASCADE_NO_AVX512 / CASCADE_NO_VNNI is set)"
    ));
}

fn check_product(
    format: GgmlDType,
    grouped: &GroupedWeights,
    weights: &[f32],
    x: &[f32],
    candle: Option<&[f32]>,
    candle_tolerance: f32,
) {
    let (rows, cols) = (grouped.rows(), weights.len() / grouped.rows());
    let m = x.len() / cols;
    let ours = grouped.matmul(x).unwrap();
    assert_eq!(ours.len(), m * rows);
    for i in 0..m {
        for r in 0..rows {
            let w = &weights[r * cols..(r + 1) * cols];
            let exact: f32 = w.iter().zip(&x[i * cols..]).map(|(w, x)| w * x).sum();
            let bound: f32 = w.iter().map(|w| w.abs() * 0.25 / 127.0).sum::<f32>() + 1e-4;
            let got = ours[i * rows + r];
            assert!(
                (got - exact).abs() <= bound,
                "{format:?} row {r} of input {i}: {got} against {exact} (bound {bound})"
            );
            if let Some(candle) = candle {
                let theirs = candle[i * rows + r];
                assert!(
                    (got - theirs).abs() <= candle_tolerance,
                    "{format:?} row {r} of input {i}: {got} against candle's {theirs}"
                );
            }
        }
    }
}

#[test]
fn q8_0_products_match_the_weights_values_and_candles_kernel() {
    // 21 rows: a full group of sixteen and a padded one; 15 inputs: the
    // eight-, four-, two- and one-row passes. Six blocks a row, then five
    // (an odd last block on tiles).
    check_format(GgmlDType::Q8_0, 21, 192, 15, 2e-3);
    check_format(GgmlDType::Q8_0, 21, 160, 15, 2e-3);
}

#[test]
fn q4_1_products_match_the_weights_values_and_candles_kernel() {
    // candle's Q4_1 product rounds activations the same way (Q8_1).
    // 21 rows: a full group of sixteen and a padded one; 15 inputs: the
    // eight-, four-, two- and one-row passes. Six blocks a row, then five
    // (an odd last block on tiles; candle's kernel wants an even count).
    check_format(GgmlDType::Q4_1, 21, 192, 15, 2e-3);
    check_format(GgmlDType::Q4_1, 21, 160, 15, 2e-3);
}

#[test]
fn q5_0_products_match_the_weights_values_and_candles_kernel() {
    // candle's Q5_0 product rounds activations the same way (Q8_0).
    // 21 rows: a full group of sixteen and a padded one; 15 inputs: the
    // eight-, four-, two- and one-row passes. Six blocks a row, then five
    // (an odd last block on tiles; candle's kernel wants an even count).
    check_format(GgmlDType::Q5_0, 21, 192, 15, 2e-3);
    check_format(GgmlDType::Q5_0, 21, 160, 15, 2e-3);
}

#[test]
fn q4_k_products_match_the_weights_values_and_candles_kernel() {
    // candle quantizes activations per 256 values on a -128..127 grid,
    // we on a symmetric one: both within the rounding bound, not equal.
    // 21 rows: a full group of sixteen and a padded one; 15 inputs: the
    // eight-, four-, two- and one-row passes.
    check_format(GgmlDType::Q4K, 21, 512, 15, 0.05);
}

#[test]
fn q8_0_rows_come_back_from_the_held_layout_unchanged() {
    let (rows, cols) = (6, 64);
    let (bytes, weights) = quantized(GgmlDType::Q8_0, rows, cols, 3);
    let m = Q8_0Matrix::new(&bytes, rows, cols).unwrap().unwrap();
    for r in 0..rows {
        assert_eq!(m.row(r).unwrap(), weights[r * cols..(r + 1) * cols]);
    }
    assert_eq!(m.row(rows), None);
    // Padding to whole groups of sixteen is all the memory it adds.
    assert_eq!(m.size_in_bytes(), 16 * 2 * 34);
}

#[test]
fn q4_k_keeps_its_size_but_for_unpacked_scales() {
    let (bytes, _) = quantized(GgmlDType::Q4K, 32, 512, 4);
    let m = Q4KMatrix::new(&bytes, 32, 512).unwrap().unwrap();
    assert_eq!(m.size_in_bytes(), bytes.len() / 144 * 148);
    // Padding to whole groups of sixteen rows is all the memory it adds.
    let (bytes, _) = quantized(GgmlDType::Q4K, 8, 512, 4);
    let m = Q4KMatrix::new(&bytes, 8, 512).unwrap().unwrap();
    assert_eq!(m.size_in_bytes(), 16 * 2 * 148);
}

#[test]
fn q4_1_keeps_its_size() {
    let (bytes, _) = quantized(GgmlDType::Q4_1, 32, 160, 4);
    let m = Q4_1Matrix::new(&bytes, 32, 160).unwrap().unwrap();
    assert_eq!(m.size_in_bytes(), bytes.len());
    // Padding to whole groups of sixteen rows is all the memory it adds.
    let (bytes, _) = quantized(GgmlDType::Q4_1, 8, 160, 4);
    let m = Q4_1Matrix::new(&bytes, 8, 160).unwrap().unwrap();
    assert_eq!(m.size_in_bytes(), 16 * 5 * 20);
}

#[test]
fn malformed_inputs_are_errors() {
    let (bytes, _) = quantized(GgmlDType::Q8_0, 4, 64, 5);
    assert!(matches!(
        Q8_0Matrix::new(&bytes, 4, 48),
        Err(KernelError::PartialBlock { cols: 48, .. })
    ));
    assert!(matches!(
        Q8_0Matrix::new(&bytes[1..], 4, 64),
        Err(KernelError::Size { .. })
    ));
    assert!(matches!(
        Q4KMatrix::new(&bytes, 4, 64),
        Err(KernelError::PartialBlock { block: 256, .. })
    ));
    let m = Q8_0Matrix::new(&bytes, 4, 64).unwrap().unwrap();
    assert_eq!(
        m.matmul(&[0.0; 65]).err(),
        Some(KernelError::Activations {
            cols: 64,
            actual: 65
        })
    );
    // Formats without a kernel here are left to candle.
    assert!(GroupedWeights::new(GgmlDType::Q6K, &bytes, 4, 64)
        .unwrap()
        .is_none());
}

#[test]
fn zero_activations_give_zero_products() {
    let (bytes, _) = quantized(GgmlDType::Q4K, 4, 256, 6);
    let out = Q4KMatrix::new(&bytes, 4, 256)
        .unwrap()
        .unwrap()
        .matmul(&[0.0; 512])
        .unwrap();
    assert_eq!(out, vec![0.0; 8]);
}

#[test]
fn q8_0_weights_read_from_a_stream_equal_those_regrouped_in_memory() {
    let (rows, cols) = (7, 96);
    let (bytes, weights) = quantized(GgmlDType::Q8_0, rows, cols, 8);
    let read = Q8_0Matrix::read(&mut bytes.as_slice(), rows, cols)
        .unwrap()
        .unwrap();
    let regrouped = Q8_0Matrix::new(&bytes, rows, cols).unwrap().unwrap();
    for r in 0..rows {
        assert_eq!(read.row(r).unwrap(), weights[r * cols..(r + 1) * cols]);
    }
    let x = random(3, cols, 9);
    assert_eq!(read.matmul(&x).unwrap(), regrouped.matmul(&x).unwrap());
    // A stream that ends early is an error, not a short table.
    assert!(matches!(
        Q8_0Matrix::read(&mut &bytes[..bytes.len() - 1], rows, cols),
        Err(ReadError::Io(_))
    ));
    assert!(matches!(
        Q8_0Matrix::read(&mut bytes.as_slice(), rows, 48),
        Err(ReadError::Layout(KernelError::PartialBlock { .. }))
    ));
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[test]
fn amx_tiles_stay_configured_after_a_nested_call_returns() {
    use super::unsafe_simd::{Amx, AMX_BLOCK, AMX_SIDE_ROWS, AMX_SIDE_WEIGHT_TILE};
    let Some(amx) = Amx::try_new() else {
        report("SKIPPED the AMX nesting test: this CPU lacks AMX-INT8 or the tile state");
        return;
    };
    let weights = [1u8; AMX_SIDE_WEIGHT_TILE];
    let activations = [[2u8; AMX_BLOCK]; AMX_SIDE_ROWS];
    let mut out = [[[0i32; AMX_SIDE_ROWS]; AMX_SIDE_ROWS]; 2];
    let pair = |tiles: &super::unsafe_simd::Tiles, out: &mut _| {
        tiles.side_block_pair([&activations; 2], [&weights; 2], out)
    };
    amx.with_tiles(|outer| {
        amx.with_tiles(|inner| pair(inner, &mut out));
        assert_eq!(out, [[[64; AMX_SIDE_ROWS]; AMX_SIDE_ROWS]; 2]);
        // The inner call left the configuration in place for the outer one.
        out = [[[0; AMX_SIDE_ROWS]; AMX_SIDE_ROWS]; 2];
        pair(outer, &mut out);
    });
    assert_eq!(
        out, [[[64; AMX_SIDE_ROWS]; AMX_SIDE_ROWS]; 2],
        "32 products of 2 x 1 per output"
    );
}

/// A row's product does not depend on the rows beside it: `m` rows at once equal each row
/// alone, bit for bit, on every format and every count of rows (the grouping of 4, 2 and 1
/// rows per pass changes with `m`, and from 64 rows Q4_K runs on AMX tiles where the CPU
/// has them).
#[test]
fn each_rows_product_is_the_same_whatever_rows_run_beside_it() {
    for (format, cols) in [
        (GgmlDType::Q8_0, 576),
        (GgmlDType::Q4_1, 576),
        (GgmlDType::Q5_0, 576),
        (GgmlDType::Q4K, 512),
    ] {
        let rows = 12;
        let (bytes, _) = quantized(format, rows, cols, 7);
        // With the tiles where the CPU has them (Q4_K's from 64 rows): a
        // row alone never runs on them.
        let grouped = GroupedWeights::new(format, &bytes, rows, cols)
            .unwrap()
            .unwrap()
            .with_available_amx();
        for m in (1..=40).chain([64, 77, 96]) {
            let x = random(m, cols, 11 + m as u64);
            let together = grouped.matmul(&x).unwrap();
            for r in 0..m {
                let alone = grouped.matmul(&x[r * cols..(r + 1) * cols]).unwrap();
                assert_eq!(
                    &together[r * rows..(r + 1) * rows],
                    &alone[..],
                    "{format:?}: row {r} of {m}"
                );
            }
        }
    }
}

/// The AVX2 kernel unpacks a Q5_0 group's values once from 32 activation
/// rows on (every host has the AVX2 path, so this runs everywhere): the
/// products must be the bits of the kernel that reads the held values on
/// every pass, for whole and partial passes of four rows, and each row's
/// the bits of that row alone (which never unpacks). Q4_1 never unpacks:
/// the same comparison holds it to the bits of its own held path.
#[test]
fn unpacked_groups_give_the_held_kernels_bits() {
    for (format, cols) in [(GgmlDType::Q4_1, 576), (GgmlDType::Q5_0, 160)] {
        let rows = 21;
        let (bytes, _) = quantized(format, rows, cols, 5);
        let grouped = GroupedWeights::new(format, &bytes, rows, cols)
            .unwrap()
            .unwrap()
            .without_amx()
            .without_avx512();
        let per_pass = grouped.clone().without_unpacking();
        for m in [8, 31, 32, 33, 34, 35, 37, 64] {
            let x = random(m, cols, 40 + m as u64);
            let unpacked = grouped.matmul(&x).unwrap();
            assert_eq!(
                unpacked,
                per_pass.matmul(&x).unwrap(),
                "{format:?}, {m} rows"
            );
            for r in [0, m / 2, m - 1] {
                let alone = grouped.matmul(&x[r * cols..(r + 1) * cols]).unwrap();
                assert_eq!(
                    &unpacked[r * rows..(r + 1) * rows],
                    &alone[..],
                    "{format:?}: row {r} of {m}"
                );
            }
        }
    }
}

/// The activations' rounding as written first, one value at a time:
/// scale = max |v| / 127, `roundf` (half away from zero).
#[cfg(target_arch = "x86_64")]
fn quantize_block_scalar(chunk: &[f32], out: &mut [i8]) -> f32 {
    let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (q, v) in out.iter_mut().zip(chunk) {
        *q = (v * inverse).round() as i8;
    }
    scale
}

#[cfg(target_arch = "x86_64")]
#[test]
fn activations_round_as_the_scalar_reference_does_value_for_value() {
    let simd = pulp::x86::V3::try_new().expect("the test build targets x86-64-v3");
    let check = |chunk: &[f32]| {
        let (mut fast, mut reference) = (vec![0i8; chunk.len()], vec![0i8; chunk.len()]);
        let mut sums = vec![0i32; chunk.len() / 32];
        let scale = super::quantize_block(simd, chunk, &mut fast, &mut sums);
        assert_eq!(
            scale.to_bits(),
            quantize_block_scalar(chunk, &mut reference).to_bits()
        );
        assert_eq!(fast, reference, "{chunk:?}");
        let reference_sums: Vec<i32> = reference
            .chunks_exact(32)
            .map(|block| block.iter().map(|&v| i32::from(v)).sum())
            .collect();
        assert_eq!(sums, reference_sums);
    };
    // Random blocks of Q8_0's 32 values and Q4_K's 256, at several scales.
    for (len, seed) in [(32, 1), (256, 2), (32, 3), (256, 4)] {
        for magnitude in [1e-6, 0.5, 3.0, 1e4] {
            let chunk: Vec<f32> = random(1, len, seed).iter().map(|v| v * magnitude).collect();
            check(&chunk);
        }
    }
    check(&[0.0; 32]);
    // With 127 in the block the scale is 1, so the other values are
    // rounded as they are: every tie `k + ½`, the floats around it, and a
    // sweep of every 4099th float up to 127.5, both signs.
    let mut values = Vec::new();
    for k in -128..128 {
        let tie = k as f32 + 0.5;
        for ulps in -3i32..=3 {
            values.push(f32::from_bits(tie.to_bits().wrapping_add_signed(ulps)));
        }
    }
    let mut bits = 0u32;
    while f32::from_bits(bits) < 127.5 {
        values.push(f32::from_bits(bits));
        values.push(-f32::from_bits(bits));
        bits += 4099;
    }
    for values in values.chunks(31) {
        let mut chunk = vec![127.0f32];
        chunk.extend(values.iter().map(|v| v.clamp(-127.0, 127.0)));
        chunk.resize(32, 0.25);
        check(&chunk);
    }
}
