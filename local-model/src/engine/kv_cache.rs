//! A key/value cache that grows in place and can be cut back to a prefix.

use candle_core::{Result, Tensor};

/// Positions added each time the cache grows.
const GROW_BY: usize = 256;

/// Keys and values of one attention layer, `[1, kv_heads, positions, head_dim]`,
/// written in place: appending a token copies only that token, where
/// `Tensor::cat` would copy the whole history on every step.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerCache {
    keys: Option<Tensor>,
    values: Option<Tensor>,
    len: usize,
}

impl LayerCache {
    /// Positions held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Forgets every position from `len` on (a shared prompt prefix is kept).
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Appends `[1, kv_heads, n, head_dim]` keys and values and returns views
    /// of everything held.
    pub(crate) fn append(&mut self, keys: &Tensor, values: &Tensor) -> Result<(Tensor, Tensor)> {
        let added = keys.dim(2)?;
        let needed = self.len + added;
        let capacity = self.keys.as_ref().map_or(0, |k| k.dims()[2]);
        if needed > capacity {
            let new_capacity = needed.div_ceil(GROW_BY) * GROW_BY;
            self.keys = Some(grow(self.keys.take(), keys, self.len, new_capacity)?);
            self.values = Some(grow(self.values.take(), values, self.len, new_capacity)?);
        }
        let (Some(all_keys), Some(all_values)) = (&self.keys, &self.values) else {
            candle_core::bail!("kv cache: storage missing after growth")
        };
        all_keys.slice_set(&keys.contiguous()?, 2, self.len)?;
        all_values.slice_set(&values.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((
            all_keys.narrow(2, 0, self.len)?,
            all_values.narrow(2, 0, self.len)?,
        ))
    }
}

/// A zeroed buffer of `capacity` positions holding the first `keep` of `old`.
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
        let mut cache = LayerCache::default();
        cache.append(&step(1.0, GROW_BY - 1), &step(-1.0, GROW_BY - 1)).unwrap();
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
        let mut cache = LayerCache::default();
        cache.append(&step(1.0, 5), &step(1.0, 5)).unwrap();
        cache.truncate(2);
        assert_eq!(cache.len(), 2);
        let (k, _) = cache.append(&step(7.0, 1), &step(7.0, 1)).unwrap();
        assert_eq!(k.dims(), [1, 2, 3, 4]);
        let head0: Vec<f32> = k.get(0).unwrap().get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&head0[..8], &[1.0; 8]);
        assert_eq!(&head0[8..], &[7.0; 4]);
        cache.truncate(10);
        assert_eq!(cache.len(), 3, "truncating beyond the length keeps it");
    }
}
