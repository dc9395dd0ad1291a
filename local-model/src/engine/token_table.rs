//! The token embedding table: looked up for every input token, and for
//! models with tied embeddings also the output projection.

use std::io::{BufReader, Read, Seek, SeekFrom};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Result, Tensor};

use super::kernels::{GroupedWeights, Q8_0Matrix};
use super::linear::{grouped_kernels_cover, lacks_simd_kernel, with_simd_kernel, Linear};

/// `token_embd.weight`, held once.
#[derive(Debug, Clone)]
pub(crate) enum TokenTable {
    /// Q8_0 regrouped for Cascade's kernel: a tied output projection then
    /// shares these bytes instead of keeping candle's layout beside them
    /// (Gemma 3's table is 178 MB).
    Grouped(Arc<GroupedWeights>),
    /// Any other format, or a CPU without the kernel.
    Candle(Arc<QTensor>),
}

impl TokenTable {
    /// Reads the table; `exact` keeps candle's layout (the exact path
    /// dequantises it anyway).
    pub(crate) fn load<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        exact: bool,
        device: &Device,
    ) -> Result<Self> {
        let name = "token_embd.weight";
        if let Some(info) = content.tensor_infos.get(name) {
            if !exact && info.ggml_dtype == GgmlDType::Q8_0 && device.is_cpu() {
                // Straight from the file into the grouped layout: through
                // candle's reader the table would be held twice (its
                // layout and ours) at the peak of loading. (`read_gguf`
                // has checked that the tensor lies inside the file.)
                let (rows, cols) = info.shape.dims2()?;
                reader.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))?;
                let mut buffered = BufReader::with_capacity(1 << 20, &mut *reader);
                if let Some(table) = Q8_0Matrix::read(&mut buffered, rows, cols)
                    .map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?
                {
                    return Ok(TokenTable::Grouped(Arc::new(GroupedWeights::Q8_0(table))));
                }
            }
        }
        // Exact, another format or device, or a CPU without Cascade's
        // kernels (where `read` declines): candle's layout.
        Ok(TokenTable::Candle(Arc::new(
            content.tensor(reader, name, device)?,
        )))
    }

    /// The rows of `tokens`, dequantised: `[tokens, width]`.
    pub(crate) fn lookup(&self, tokens: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            TokenTable::Grouped(grouped) => {
                let GroupedWeights::Q8_0(table) = grouped.as_ref() else {
                    candle_core::bail!("only Q8_0 embedding tables are regrouped")
                };
                let mut values = Vec::with_capacity(tokens.len() * table.cols());
                for &token in tokens {
                    let row = table.row(token as usize).ok_or_else(|| {
                        candle_core::Error::msg(format!(
                            "token {token} is outside the embedding table of {} rows",
                            table.rows()
                        ))
                    })?;
                    values.extend(row);
                }
                Tensor::from_vec(values, (tokens.len(), table.cols()), device)
            }
            TokenTable::Candle(table) => {
                QMatMul::from_arc(table.clone())?.embedding(&Tensor::new(tokens, device)?)
            }
        }
    }
}

/// The output projection: `output.weight`, or for tied embeddings the
/// embedding table itself (one copy in memory) unless its format needs
/// converting. `exact` keeps it dense in F32.
pub(crate) fn output_projection<R: Read + Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    table: &TokenTable,
    exact: bool,
    device: &Device,
) -> Result<Linear> {
    match content.tensor(reader, "output.weight", device) {
        Ok(t) if exact => Linear::exact(t, device),
        Ok(t) => Linear::new(with_simd_kernel(t, device)?, false, device),
        Err(_) => match table {
            TokenTable::Grouped(table) => Ok(Linear::from_grouped(table.clone())),
            TokenTable::Candle(table) if exact => Ok(Linear::from_matmul(QMatMul::Tensor(
                table.dequantize(device)?,
            ))),
            TokenTable::Candle(table) => {
                let row = table.shape().dims().last().copied().unwrap_or(0);
                // A format that our kernels or candle's need converted
                // gets its own copy; lookups keep reading the table.
                if lacks_simd_kernel(table.dtype(), row) || grouped_kernels_cover(table.dtype()) {
                    let copy = content.tensor(reader, "token_embd.weight", device)?;
                    Linear::new(with_simd_kernel(copy, device)?, false, device)
                } else {
                    QMatMul::from_arc(table.clone()).map(Linear::from_matmul)
                }
            }
        },
    }
}
