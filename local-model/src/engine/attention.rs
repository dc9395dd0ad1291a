//! Pieces shared by the tuned engine's architectures: the rotary rows of a
//! forward call, splitting a stacked projection into heads, grouped-query
//! attention over the cache (and the decode step's one query per sequence).

use std::sync::OnceLock;

use candle_core::{Result, Tensor, D};

use super::kv_cache::LayerCache;

/// The attention of a prefill part: `q` (`[1, heads, n, head_dim]`,
/// rotated) holds the queries of the `n` positions that follow what
/// `cache` holds, `k` and `v` (`[1, kv_heads, n, head_dim]`) their keys and
/// values, appended to the cache first; row `i` then attends over positions
/// up to its own (the last `window` of them when given). Returns
/// `[1, n, heads * head_dim]`.
///
/// Each row runs the decode step's attention (`decode_attention`) over its
/// prefix, reading the cache in place, spread over the pool by key/value
/// head and row. candle's tensor path here (two `gemm` products, a mask and
/// a softmax per part) ran on rayon's threads while the pool's thread spun
/// beside them on two cores, and converted the whole F16 cache to F32 for
/// every part. On an AMD Zen 3 host (AVX2, 2 threads), 256-token prompts:
/// SmolLM2 478 -> 548 tok/s, Gemma 3 480 -> 492, Phi-1.5 96 -> 105; a
/// 1,500-token SmolLM2 prompt 335 -> 417 (docs/benchmarks.md, session 14).
/// The arithmetic per row is the decode step's, so a prompt's last token
/// gets the same attention whether it ran inside a prefill part or as a
/// decode step.
pub(crate) fn prefill_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cache: &mut LayerCache,
    kv_heads: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let (_, heads, n, head_dim) = q.dims4()?;
    let position = cache.len();
    cache.push(k, v)?;
    let cache = &*cache;
    let kv_heads = kv_heads.max(1);
    let width = heads * head_dim;
    let queries = q.transpose(1, 2)?.flatten_all()?.to_vec1::<f32>()?;
    let slot = heads / kv_heads * head_dim;
    // Task `t` is row `n - 1 - t % n` of key/value head `t / n`:
    // consecutive tasks read the same head's keys and values, which then
    // stay in cache, and the longest rows (the last, attending over the
    // most positions) go first, so that the pool's threads, taking tasks
    // in order, end together: in order, the last task taken was the
    // longest, and with one key/value head (Gemma 3 270M) a thread waited
    // for it.
    let parts = on_pool(n * kv_heads, "prefill", |range, done| {
        for t in range {
            let (kv, i) = (t / n, n - 1 - t % n);
            let query = &queries[i * width..(i + 1) * width];
            let end = position + i + 1;
            done(
                t,
                cache.attend_heads(query, heads, kv_heads, window, kv..kv + 1, end),
            );
        }
    })?;
    let mut mixed = vec![0f32; n * width];
    for (t, part) in parts.into_iter().enumerate() {
        let at = (n - 1 - t % n) * width + (t / n) * slot;
        mixed[at..at + slot].copy_from_slice(&part);
    }
    Tensor::from_vec(mixed, (1, n, width), q.device())
}

/// Runs `tasks` independent attention tasks over the kernels' pool (inline
/// when there is one) and returns their results in task order. `run` gets a
/// range of tasks and hands each task's result to `done(t, result)`; the
/// first failed task in order gives the error, and one `run` never reached
/// fails with `what` in its message.
fn on_pool(
    tasks: usize,
    what: &str,
    run: impl Fn(std::ops::Range<usize>, &dyn Fn(usize, Result<Vec<f32>>)) + Sync,
) -> Result<Vec<Vec<f32>>> {
    let outputs: Vec<OnceLock<Result<Vec<f32>>>> = (0..tasks).map(|_| OnceLock::new()).collect();
    let done = |t: usize, out: Result<Vec<f32>>| {
        let _ = outputs[t].set(out);
    };
    if tasks == 1 {
        run(0..1, &done);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(tasks, |range| run(range, &done));
    }
    outputs
        .into_iter()
        .map(|output| match output.into_inner() {
            Some(part) => part,
            None => candle_core::bail!("{what}: a head's attention did not run"),
        })
        .collect()
}

/// Attention of `q` (`[1, heads, n, head_dim]`, rotated) over `keys` and
/// `values` (`[1, kv_heads, positions, head_dim]`), with an additive `mask`
/// (`[n, positions]`) for more than one query; returns `[1, n, heads * head_dim]`:
/// candle's tensor path, the reference the tests hold the in-place
/// attention to.
///
/// Query heads that share a key/value head are adjacent, so they are
/// viewed as one block of rows per key/value head: each key/value head is
/// read once for its whole group instead of being copied per query head.
#[cfg(test)]
pub(crate) fn grouped(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    mask: Option<&Tensor>,
    kv_heads: usize,
) -> Result<Tensor> {
    let (_, heads, n, head_dim) = q.dims4()?;
    let positions = keys.dim(2)?;
    let group = heads / kv_heads;
    let q = q.reshape((1, kv_heads, group * n, head_dim))?;
    let scores = (q.matmul(&keys.t()?)? * (1.0 / (head_dim as f64).sqrt()))?;
    let scores = match mask {
        Some(mask) => scores
            .reshape((1, kv_heads, group, n, positions))?
            .broadcast_add(mask)?
            .reshape((1, kv_heads, group * n, positions))?,
        None => scores,
    };
    let weights = candle_nn::ops::softmax_last_dim(&scores)?;
    weights
        .matmul(values)?
        .reshape((1, heads, n, head_dim))?
        .transpose(1, 2)?
        .reshape((1, n, heads * head_dim))
}

/// The rotary tables of the positions a forward call runs: `[n, dim / 2]`
/// tensors, and for a decode step (`n == 1`) the same row as plain values
/// for the attention that runs outside candle's tensors.
pub(crate) struct Rotary {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) row: Option<(Vec<f32>, Vec<f32>)>,
}

impl Rotary {
    /// Rows `position..position + n` of the tables `cos` and `sin`
    /// (`[positions, dim / 2]`).
    pub(crate) fn at(cos: &Tensor, sin: &Tensor, position: usize, n: usize) -> Result<Self> {
        let cos = cos.narrow(0, position, n)?;
        let sin = sin.narrow(0, position, n)?;
        let row = if n == 1 {
            Some((cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?))
        } else {
            None
        };
        Ok(Self { cos, sin, row })
    }

    /// The row of the tables at one `position`, as plain values.
    pub(crate) fn row_at(
        cos: &Tensor,
        sin: &Tensor,
        position: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        match Self::at(cos, sin, position, 1)?.row {
            Some(row) => Ok(row),
            None => candle_core::bail!("no rotary row for a one-token step"),
        }
    }
}

/// The query, key and value heads of a stacked projection `qkv`
/// (`[1, n, (heads + 2 * kv_heads) * head_dim]`), each
/// `[1, count, n, head_dim]` and contiguous.
pub(crate) fn split_heads(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = qkv.dim(1)?;
    let split = |start: usize, count: usize| -> Result<Tensor> {
        qkv.narrow(D::Minus1, start * head_dim, count * head_dim)?
            .reshape((1, n, count, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    Ok((
        split(0, heads)?,
        split(heads, kv_heads)?,
        split(heads + kv_heads, kv_heads)?,
    ))
}

/// The attention of a decode step, outside candle's tensors, for one or
/// several sequences: row `i` of `qkv` (`[1, rows, ..]`, the `[q | k | v]`
/// projection of every row in one batched product) is the new token of the
/// sequence whose layer cache is the `i`-th of `caches`. `prepare` rotates
/// (and normalises) row `i`'s query and key in place; the key and value
/// are appended to the row's cache and the query attends over that cache
/// only, the last `window` positions when given, with the same arithmetic
/// whatever else is in the batch. Returns `[1, rows, heads * head_dim]`.
pub(crate) fn decode_rows<'c>(
    qkv: &Tensor,
    caches: impl IntoIterator<Item = &'c mut LayerCache>,
    heads: usize,
    kv_heads: usize,
    window: Option<usize>,
    prepare: impl Fn(usize, &mut [f32], &mut [f32]),
) -> Result<Tensor> {
    let rows = qkv.dim(1)?;
    let width = qkv.dim(D::Minus1)?.max(1);
    let head_dim = width / (heads + 2 * kv_heads).max(1);
    let mut values = qkv.flatten_all()?.to_vec1::<f32>()?;
    let mut appended: Vec<&LayerCache> = Vec::with_capacity(rows);
    for ((i, row), cache) in values.chunks_exact_mut(width).enumerate().zip(caches) {
        let (q, rest) = row.split_at_mut(heads * head_dim);
        let (k, v) = rest.split_at_mut(kv_heads * head_dim);
        prepare(i, q, k);
        cache.append_one(k, v, kv_heads, qkv.device())?;
        appended.push(cache);
    }
    if appended.len() != rows {
        candle_core::bail!("decode step of {rows} rows with {} caches", appended.len())
    }
    let query = |i: usize| &values[i * width..i * width + heads * head_dim];
    // One task per row and key/value head: the tasks are independent, and
    // each head's arithmetic is the same on whichever thread runs it and
    // whatever runs beside it. Spread over the pool, which would otherwise
    // wait through this part of every step: in a batch over the rows, and
    // alone (one sequence) over its heads.
    let kv_heads = kv_heads.max(1);
    let slot = heads / kv_heads * head_dim;
    let parts = on_pool(rows * kv_heads, "decode step", |range, done| {
        let mut t = range.start;
        while t < range.end {
            let (i, first) = (t / kv_heads, t % kv_heads);
            let last = kv_heads.min(first + (range.end - t));
            let cache = appended[i];
            match cache.attend_heads(query(i), heads, kv_heads, window, first..last, cache.len()) {
                Ok(out) => {
                    for (k, part) in out.chunks_exact(slot).enumerate() {
                        done(t + k, Ok(part.to_vec()));
                    }
                }
                // The first task of the failed call carries the error; the
                // ones after it stay empty, and are never reached.
                Err(error) => done(t, Err(error)),
            }
            t += last - first;
        }
    })?;
    let mixed = parts.concat();
    Tensor::from_vec(mixed, (1, rows, heads * head_dim), qkv.device())
}
