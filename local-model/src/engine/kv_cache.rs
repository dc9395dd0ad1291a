//! A key/value cache that grows in place and can be cut back to a prefix.
//!
//! Keys and values are held in F16 or F32, chosen per model by
//! [`held_dtype`]. F16 is what llama.cpp holds by default: half the memory
//! per position, and half the bytes each decode step reads, which in batched
//! decode came to as many bytes per step as the weights. Every position is
//! rounded once, when it is appended, and every reader (prefill's attention
//! and the decode step's) sees the same values, so a request's keys do not
//! depend on how its prompt was cut or batched.

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Result, Tensor};
use half::f16;
#[cfg(test)]
use half::slice::HalfFloatSliceExt;

/// The type a model's keys and values are held in: F16 where the weights
/// are quantized and the tuned kernels run (the activations are rounded to
/// 8 bits there already, and F16 halves the cache's memory and the decode
/// step's reads: SmolLM2 at eight sequences 357 -> 504 tok/s on Zen 4), F32
/// where the arithmetic is meant to be exact: the `exact` kernels, the
/// accuracy tests' yardstick, and float weights (F32/F16/BF16 files, whose
/// answers are compared with candle's own models within 1e-3 nats; an F16
/// cache drifted to 2e-3 there).
pub(crate) fn held_dtype(exact: bool, weights: GgmlDType) -> DType {
    let float_weights = matches!(weights, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    if exact || float_weights {
        DType::F32
    } else {
        DType::F16
    }
}

/// [`held_dtype`] for a GGUF file's layers, read off the first block's down
/// projection (every tuned architecture has one; F32 if it is missing, the
/// type that rounds nothing).
pub(crate) fn held_for_file(content: &gguf_file::Content, exact: bool) -> DType {
    let weights = content
        .tensor_infos
        .get("blk.0.ffn_down.weight")
        .map_or(GgmlDType::F32, |info| info.ggml_dtype);
    held_dtype(exact, weights)
}

/// Keys or values of a layer as held: F16 or F32.
enum HeldValues<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl<'a> HeldValues<'a> {
    fn of(cpu: &'a candle_core::CpuStorage, offset: usize) -> Result<Self> {
        Ok(match cpu {
            candle_core::CpuStorage::F16(values) => Self::F16(&values[offset..]),
            _ => Self::F32(&cpu.as_slice::<f32>()?[offset..]),
        })
    }
}

/// Positions added each time the cache grows.
const GROW_BY: usize = 256;

/// Keys and values of one attention layer, `[1, kv_heads, positions, head_dim]`
/// in the model's held type ([`held_dtype`]), written in place: appending a
/// token copies only that token, where `Tensor::cat` would copy the whole
/// history on every step.
#[derive(Debug, Clone)]
pub(crate) struct LayerCache {
    keys: Option<Tensor>,
    values: Option<Tensor>,
    len: usize,
    held: DType,
}

/// The KV caches of one sequence, one per layer: what lets several
/// sequences share the model's weights and run in the same decode step
/// (see `worker`), each at its own position.
/// `Default` is an empty placeholder of no layers (what `mem::take` leaves
/// while a model's own cache is lent out).
#[derive(Debug, Clone, Default)]
pub(crate) struct SeqCache {
    pub(crate) layers: Vec<LayerCache>,
}

impl SeqCache {
    /// An empty cache for a model of `layers` layers, holding `held`.
    pub(crate) fn new(layers: usize, held: DType) -> Self {
        Self {
            layers: vec![LayerCache::new(held); layers],
        }
    }

    /// Positions held.
    pub(crate) fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    /// Forgets every position from `len` on.
    pub(crate) fn truncate(&mut self, len: usize) {
        for layer in &mut self.layers {
            layer.truncate(len);
        }
    }

    /// Checks that this cache belongs to a model of `layers` layers.
    pub(crate) fn check(&self, layers: usize) -> Result<()> {
        if self.layers.len() != layers {
            candle_core::bail!(
                "a cache of {} layers for a model of {layers}",
                self.layers.len()
            )
        }
        Ok(())
    }
}

/// Positions a cache of `needed` positions actually allocates: it grows
/// in steps, so a budget must count whole steps.
pub(crate) fn allocated_positions(needed: usize) -> usize {
    needed.div_ceil(GROW_BY) * GROW_BY
}

impl LayerCache {
    /// An empty cache holding keys and values in `held` (F16 or F32).
    pub(crate) fn new(held: DType) -> Self {
        Self {
            keys: None,
            values: None,
            len: 0,
            held,
        }
    }

    /// Positions held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Forgets every position from `len` on (a shared prompt prefix is kept).
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Appends `[1, kv_heads, n, head_dim]` keys and values (a prefill
    /// part's), to be read in place by [`LayerCache::attend_heads`].
    pub(crate) fn push(&mut self, keys: &Tensor, values: &Tensor) -> Result<()> {
        self.store(keys, values)
    }

    /// Appends `[1, kv_heads, n, head_dim]` keys and values and returns
    /// everything held, in F32: the tensor path the tests hold the in-place
    /// attention to.
    #[cfg(test)]
    pub(crate) fn append(&mut self, keys: &Tensor, values: &Tensor) -> Result<(Tensor, Tensor)> {
        self.store(keys, values)?;
        self.held()
    }

    /// Everything held, in F32.
    #[cfg(test)]
    pub(crate) fn held(&self) -> Result<(Tensor, Tensor)> {
        let (Some(all_keys), Some(all_values)) = (&self.keys, &self.values) else {
            candle_core::bail!("kv cache: storage missing after growth")
        };
        Ok((self.held_f32(all_keys)?, self.held_f32(all_values)?))
    }

    /// The first `len` positions of `held` (keys or values) in F32,
    /// `[1, kv_heads, len, head_dim]`: each head's run converted in one
    /// vectorized call (F16C where the CPU has it).
    #[cfg(test)]
    fn held_f32(&self, held: &Tensor) -> Result<Tensor> {
        let (_, kv_heads, capacity, head_dim) = held.dims4()?;
        let (storage, layout) = held.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return held.narrow(2, 0, self.len)?.to_dtype(DType::F32);
        };
        let all = HeldValues::of(cpu, layout.start_offset())?;
        let run = self.len * head_dim;
        let mut out = vec![0f32; kv_heads * run];
        for (head, out) in out.chunks_exact_mut(run.max(1)).enumerate() {
            let at = head * capacity * head_dim;
            match &all {
                HeldValues::F16(values) => values[at..at + run].convert_to_f32_slice(out),
                HeldValues::F32(values) => out.copy_from_slice(&values[at..at + run]),
            }
        }
        Tensor::from_vec(out, (1, kv_heads, self.len, head_dim), held.device())
    }

    /// Appends `[1, kv_heads, n, head_dim]` keys and values.
    fn store(&mut self, keys: &Tensor, values: &Tensor) -> Result<()> {
        let keys = keys.to_dtype(self.held)?;
        let values = values.to_dtype(self.held)?;
        let added = keys.dim(2)?;
        let needed = self.len + added;
        let capacity = self.keys.as_ref().map_or(0, |k| k.dims()[2]);
        if needed > capacity {
            let new_capacity = allocated_positions(needed);
            self.keys = Some(grow(self.keys.take(), &keys, self.len, new_capacity)?);
            self.values = Some(grow(self.values.take(), &values, self.len, new_capacity)?);
        }
        let (Some(all_keys), Some(all_values)) = (&self.keys, &self.values) else {
            candle_core::bail!("kv cache: storage missing after growth")
        };
        all_keys.slice_set(&keys.contiguous()?, 2, self.len)?;
        all_values.slice_set(&values.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok(())
    }
}

impl LayerCache {
    /// Appends one position's keys and values (`kv_heads * head_dim` each,
    /// head-major), for decoding.
    pub(crate) fn append_one(
        &mut self,
        keys: &[f32],
        values: &[f32],
        kv_heads: usize,
        device: &candle_core::Device,
    ) -> Result<()> {
        let head_dim = keys.len() / kv_heads.max(1);
        let shape = (1, kv_heads, 1, head_dim);
        let keys = Tensor::from_slice(keys, shape, device)?;
        let values = Tensor::from_slice(values, shape, device)?;
        self.store(&keys, &values)
    }

    /// Attention of one query position (`q`: `heads * head_dim`, rotated)
    /// over the cached positions, the last `window` only when given;
    /// returns `heads * head_dim` values. Reads the cache in place: this is
    /// the decode step, where candle's tensor operations cost more in
    /// dispatch and copies than the arithmetic itself.
    #[cfg(test)]
    pub(crate) fn attend_one(
        &self,
        q: &[f32],
        heads: usize,
        kv_heads: usize,
        window: Option<usize>,
    ) -> Result<Vec<f32>> {
        self.attend_heads(q, heads, kv_heads, window, 0..kv_heads, self.len)
    }

    /// Attention of the query at position `end - 1` (`q`: `heads *
    /// head_dim`, rotated) over the cached positions before `end` (the last
    /// `window` of them when given), as `attend_one` (the tests'
    /// whole-query form, at the cache's end), for the query heads of
    /// key/value heads `kv_range` only: `kv_range.len() · heads / kv_heads ·
    /// head_dim` values. Each head's arithmetic is the same whichever others
    /// run with it, so a step can spread a sequence's heads over threads;
    /// `end` below the cache's length is a prefill part's row, its later
    /// rows appended with it.
    pub(crate) fn attend_heads(
        &self,
        q: &[f32],
        heads: usize,
        kv_heads: usize,
        window: Option<usize>,
        kv_range: std::ops::Range<usize>,
        end: usize,
    ) -> Result<Vec<f32>> {
        let (Some(keys), Some(values)) = (&self.keys, &self.values) else {
            candle_core::bail!("attention over an empty cache")
        };
        if end == 0 || end > self.len {
            candle_core::bail!("attention up to position {end} of a cache of {}", self.len)
        }
        let head_dim = q.len() / heads.max(1);
        let capacity = keys.dim(2)?;
        let start = window.map_or(0, |w| end.saturating_sub(w));
        let (key_storage, key_layout) = keys.storage_and_layout();
        let (value_storage, value_layout) = values.storage_and_layout();
        let (candle_core::Storage::Cpu(key_cpu), candle_core::Storage::Cpu(value_cpu)) =
            (&*key_storage, &*value_storage)
        else {
            candle_core::bail!("decode attention runs on the CPU only")
        };
        let all_keys = HeldValues::of(key_cpu, key_layout.start_offset())?;
        let all_values = HeldValues::of(value_cpu, value_layout.start_offset())?;
        let span = HeldSpan {
            capacity,
            start,
            end,
            head_dim,
            group: heads / kv_heads.max(1),
        };
        match (all_keys, all_values) {
            (HeldValues::F16(keys), HeldValues::F16(values)) => {
                Ok(span.attend(q, keys, values, kv_range))
            }
            (HeldValues::F32(keys), HeldValues::F32(values)) => {
                Ok(span.attend(q, keys, values, kv_range))
            }
            _ => candle_core::bail!("kv cache: keys and values held in different types"),
        }
    }
}

/// Where a layer's cached positions lie in its held storage, for the decode
/// step's attention.
struct HeldSpan {
    /// Positions allocated per head.
    capacity: usize,
    /// First position attended (a sliding window starts later).
    start: usize,
    /// Positions held.
    end: usize,
    head_dim: usize,
    /// Query heads per key/value head.
    group: usize,
}

impl HeldSpan {
    /// Attention of the query heads of key/value heads `kv_range` (`q`: all
    /// heads, rotated) over keys and values as held, read in place.
    fn attend<T: super::decode_attention::HeldValue>(
        &self,
        q: &[f32],
        keys: &[T],
        values: &[T],
        kv_range: std::ops::Range<usize>,
    ) -> Vec<f32> {
        let Self {
            capacity,
            start,
            end,
            head_dim,
            group,
        } = *self;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut out = vec![0f32; kv_range.len() * group * head_dim];
        let mut scores = vec![0f32; end - start];
        // Query heads `kv·group..(kv+1)·group` share key/value head `kv`.
        for ((kv, queries), out) in q
            .chunks_exact(group * head_dim)
            .enumerate()
            .skip(kv_range.start)
            .take(kv_range.len())
            .zip(out.chunks_exact_mut(group * head_dim))
        {
            let span = |kv: usize| {
                let base = kv * capacity * head_dim;
                base + start * head_dim..base + end * head_dim
            };
            let cached = span(kv);
            // The next head of this call, read right after this one.
            let next = if kv + 1 < kv_range.end {
                span(kv + 1)
            } else {
                0..0
            };
            let sharing = super::decode_attention::HeadGroup {
                queries,
                keys: &keys[cached.clone()],
                values: &values[cached],
                head_dim,
                scale,
                next_keys: keys.get(next.clone()).unwrap_or_default(),
                next_values: values.get(next).unwrap_or_default(),
            };
            super::decode_attention::attend_group(&sharing, &mut scores, out);
        }
        out
    }
}

/// Rotary embeddings at one position, in place, on each `head_dim` vector
/// of `x`: the first `rope_dim` dimensions rotate, in interleaved pairs
/// (`2i`, `2i+1`: llama GGUF) or split halves (`i`, `i + rope_dim/2`: NeoX,
/// Gemma, Phi); `cos`, `sin`: `rope_dim / 2` values.
pub(crate) fn rope_one(
    x: &mut [f32],
    head_dim: usize,
    rope_dim: usize,
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
) {
    let half = rope_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half.min(cos.len()) {
            let (a, b) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// A zeroed buffer of `capacity` positions holding the first `keep` of
/// `old`, of `like`'s type.
fn grow(old: Option<Tensor>, like: &Tensor, keep: usize, capacity: usize) -> Result<Tensor> {
    let mut shape = like.dims().to_vec();
    shape[2] = capacity;
    let fresh = Tensor::zeros(shape, like.dtype(), like.device())?;
    if let Some(old) = old {
        if keep > 0 {
            fresh.slice_set(&old.narrow(2, 0, keep)?.contiguous()?, 2, 0)?;
        }
    }
    Ok(fresh)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::Device;

    fn step(value: f32, n: usize) -> Tensor {
        Tensor::full(value, (1, 2, n, 4), &Device::Cpu).unwrap()
    }

    #[test]
    fn appends_grow_past_capacity_and_keep_every_position() {
        for held in [DType::F16, DType::F32] {
            appends_grow_in(held);
        }
    }

    fn appends_grow_in(held: DType) {
        let mut cache = LayerCache::new(held);
        cache
            .append(&step(1.0, GROW_BY - 1), &step(-1.0, GROW_BY - 1))
            .unwrap();
        let (k, v) = cache.append(&step(2.0, 3), &step(-2.0, 3)).unwrap();
        assert_eq!(cache.len(), GROW_BY + 2);
        assert_eq!(k.dims(), [1, 2, GROW_BY + 2, 4]);
        let k: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
        // Position-major within each head: the last three are the new ones.
        let per_head = (GROW_BY + 2) * 4;
        assert!(k[..per_head - 12].iter().all(|&x| x == 1.0));
        assert!(k[per_head - 12..per_head].iter().all(|&x| x == 2.0));
        assert!(v[per_head - 12..per_head].iter().all(|&x| x == -2.0));
    }

    #[test]
    fn truncation_keeps_a_prefix_and_later_appends_overwrite_the_rest() {
        for held in [DType::F16, DType::F32] {
            truncation_in(held);
        }
    }

    fn truncation_in(held: DType) {
        let mut cache = LayerCache::new(held);
        cache.append(&step(1.0, 5), &step(1.0, 5)).unwrap();
        cache.truncate(2);
        assert_eq!(cache.len(), 2);
        let (k, _) = cache.append(&step(7.0, 1), &step(7.0, 1)).unwrap();
        assert_eq!(k.dims(), [1, 2, 3, 4]);
        let head0: Vec<f32> = k
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(&head0[..8], &[1.0; 8]);
        assert_eq!(&head0[8..], &[7.0; 4]);
        cache.truncate(10);
        assert_eq!(cache.len(), 3, "truncating beyond the length keeps it");
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32
                    / 500.0
                    - 1.0
            })
            .collect()
    }

    /// The largest difference between the tensor path's result and ours.
    fn largest_gap(want: &Tensor, got: &[f32]) -> f32 {
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(want.len(), got.len());
        want.iter()
            .zip(got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn one_query_attention_matches_the_tensor_path() {
        for held in [DType::F16, DType::F32] {
            one_query_attention_in(held);
        }
    }

    fn one_query_attention_in(held_type: DType) {
        let (heads, kv_heads, head_dim, positions) = (6, 2, 8, 11);
        let device = Device::Cpu;
        let mut cache = LayerCache::new(held_type);
        let keys = Tensor::from_vec(
            values(kv_heads * positions * head_dim, 1),
            (1, kv_heads, positions, head_dim),
            &device,
        )
        .unwrap();
        let vals = Tensor::from_vec(
            values(kv_heads * positions * head_dim, 2),
            (1, kv_heads, positions, head_dim),
            &device,
        )
        .unwrap();
        cache.append(&keys, &vals).unwrap();
        let last_k = values(kv_heads * head_dim, 3);
        let last_v = values(kv_heads * head_dim, 4);
        cache
            .append_one(&last_k, &last_v, kv_heads, &device)
            .unwrap();
        let q = values(heads * head_dim, 5);
        let (all_keys, all_values) = {
            let k = Tensor::from_vec(last_k.clone(), (1, kv_heads, 1, head_dim), &device).unwrap();
            let v = Tensor::from_vec(last_v.clone(), (1, kv_heads, 1, head_dim), &device).unwrap();
            // What the cache holds: every value rounded to its type once.
            let held = |t: Tensor| t.to_dtype(held_type).unwrap().to_dtype(DType::F32).unwrap();
            (
                held(Tensor::cat(&[&keys, &k], 2).unwrap()),
                held(Tensor::cat(&[&vals, &v], 2).unwrap()),
            )
        };
        let q_tensor = Tensor::from_vec(q.clone(), (1, heads, 1, head_dim), &device).unwrap();
        for window in [None, Some(5)] {
            let (k, v) = match window {
                Some(w) => (
                    all_keys.narrow(2, positions + 1 - w, w).unwrap(),
                    all_values.narrow(2, positions + 1 - w, w).unwrap(),
                ),
                None => (all_keys.clone(), all_values.clone()),
            };
            let want = super::super::attention::grouped(&q_tensor, &k, &v, None, kv_heads).unwrap();
            let got = cache.attend_one(&q, heads, kv_heads, window).unwrap();
            let gap = largest_gap(&want, &got);
            assert!(gap < 1e-5, "{held_type:?}, window {window:?}: {gap}");
        }
    }

    #[test]
    fn prefill_rows_match_the_tensor_path_with_a_causal_mask() {
        for held in [DType::F16, DType::F32] {
            for window in [None, Some(4)] {
                prefill_rows_in(held, window);
            }
        }
    }

    /// A cached prefix of 7 positions, then a part of 5 rows: each row's
    /// in-place attention against candle's masked tensor path over what the
    /// cache holds (every value rounded to its type once).
    fn prefill_rows_in(held: DType, window: Option<usize>) {
        let (heads, kv_heads, head_dim, prefix, n) = (6, 2, 8, 7, 5);
        let device = Device::Cpu;
        let tensor = |seed: u32, heads: usize, len: usize| {
            Tensor::from_vec(
                values(heads * len * head_dim, seed),
                (1, heads, len, head_dim),
                &device,
            )
            .unwrap()
        };
        let mut cache = LayerCache::new(held);
        cache
            .push(&tensor(1, kv_heads, prefix), &tensor(2, kv_heads, prefix))
            .unwrap();
        let (k, v) = (tensor(3, kv_heads, n), tensor(4, kv_heads, n));
        let q = tensor(5, heads, n);
        let got: Vec<f32> =
            super::super::attention::prefill_rows(&q, &k, &v, &mut cache, kv_heads, window)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
        let (keys, values) = cache.held().unwrap();
        let mask = super::super::llama::causal_mask(n, prefix, window, &device).unwrap();
        let want =
            super::super::attention::grouped(&q, &keys, &values, Some(&mask), kv_heads).unwrap();
        assert_eq!(cache.len(), prefix + n);
        assert_eq!(got.len(), n * heads * head_dim);
        let gap = largest_gap(&want, &got);
        assert!(gap < 1e-5, "{held:?}, window {window:?}: {gap}");
    }

    #[test]
    fn attention_past_the_cache_is_an_error() {
        let mut cache = LayerCache::new(DType::F32);
        cache.push(&step(1.0, 3), &step(1.0, 3)).unwrap();
        let q = vec![0.5f32; 2 * 4];
        assert!(cache.attend_heads(&q, 2, 2, None, 0..2, 3).is_ok());
        assert!(cache.attend_heads(&q, 2, 2, None, 0..2, 4).is_err());
        assert!(cache.attend_heads(&q, 2, 2, None, 0..2, 0).is_err());
    }

    #[test]
    fn float_weights_and_exact_kernels_hold_f32_quantized_weights_f16() {
        assert_eq!(held_dtype(true, GgmlDType::Q4_1), DType::F32);
        assert_eq!(held_dtype(false, GgmlDType::F32), DType::F32);
        assert_eq!(held_dtype(false, GgmlDType::F16), DType::F32);
        assert_eq!(held_dtype(false, GgmlDType::Q4_1), DType::F16);
        assert_eq!(held_dtype(false, GgmlDType::Q4K), DType::F16);
        let cache = SeqCache::new(3, DType::F16);
        assert!(cache.layers.iter().all(|l| l.held == DType::F16));
    }

    #[test]
    fn rotary_layouts_match_candles() {
        let device = Device::Cpu;
        let (heads, head_dim) = (2, 8);
        let x = values(heads * head_dim, 6);
        let angles: Vec<f32> = (0..head_dim / 2).map(|i| 0.3 + i as f32).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let t = Tensor::from_vec(x.clone(), (1, heads, 1, head_dim), &device).unwrap();
        let c = Tensor::from_vec(cos.clone(), (1, head_dim / 2), &device).unwrap();
        let s = Tensor::from_vec(sin.clone(), (1, head_dim / 2), &device).unwrap();
        for interleaved in [true, false] {
            let want: Vec<f32> = if interleaved {
                candle_nn::rotary_emb::rope_i(&t, &c, &s)
            } else {
                candle_nn::rotary_emb::rope(&t, &c, &s)
            }
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
            let mut got = x.clone();
            rope_one(&mut got, head_dim, head_dim, &cos, &sin, interleaved);
            let gap = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(gap < 1e-6, "interleaved {interleaved}: {gap}");
        }
    }
}
