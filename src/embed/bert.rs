//! The BERT backend on candle: token ids in, mean-pooled L2-normalised vectors out.
//!
//! The forward pass is Hugging Face's `BertModel` (post-norm encoder, exact GELU,
//! additive attention mask), written here rather than taken from candle-transformers so
//! that on CPU the dense layers run as packed kernels ([`super::kernels`]) with Q, K
//! and V fused into one product and GELU fused into the intermediate layer. On other
//! devices (CUDA) the same layers are candle matmuls.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

use super::adapter::Adapter;
use super::kernels::{self, Activation, PackedLinear, Precision};
use super::provision::ModelFiles;
use super::tokenize::TokenizedText;
use super::EmbedError;

/// The fields of a Hugging Face BERT `config.json` that the forward pass uses.
#[derive(Debug, Deserialize)]
struct BertConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    hidden_act: String,
    layer_norm_eps: f64,
    max_position_embeddings: usize,
    type_vocab_size: usize,
    #[serde(default)]
    position_embedding_type: Option<String>,
}

impl BertConfig {
    fn check(&self) -> Result<(), String> {
        if self.hidden_act != "gelu" {
            return Err(format!(
                "hidden_act {:?} is not supported (only \"gelu\")",
                self.hidden_act
            ));
        }
        if let Some(kind) = &self.position_embedding_type {
            if kind != "absolute" {
                return Err(format!("position_embedding_type {kind:?} is not supported"));
            }
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }
}

pub struct BertBackend {
    words: Embedding,
    positions: Tensor,
    token_type: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    heads: usize,
    max_positions: usize,
    device: Device,
    dimensions: usize,
    /// Batches without padding, on the CPU kernels; see [`BertBackend::ragged`].
    ragged: bool,
    /// The CPU kernel in use (`None` on a GPU).
    kernel: Option<kernels::Kernel>,
}

impl BertBackend {
    /// Loads the model; `adapter`'s updates are merged into the weights first.
    pub fn load(
        files: &ModelFiles,
        adapter: Option<&Adapter>,
        device: &Device,
    ) -> Result<Self, EmbedError> {
        let load_error = |e: &dyn std::fmt::Display, path: &std::path::Path| {
            EmbedError::Load(format!("{}: {e}", path.display()))
        };
        let config_text =
            std::fs::read_to_string(&files.config).map_err(|e| load_error(&e, &files.config))?;
        let config: BertConfig =
            serde_json::from_str(&config_text).map_err(|e| load_error(&e, &files.config))?;
        config.check().map_err(|e| load_error(&e, &files.config))?;
        let vb = match adapter {
            // SAFETY: the weights file is ours (hash-verified at provisioning) and is not
            // modified while mapped.
            None => unsafe {
                VarBuilder::from_mmaped_safetensors(&[&files.weights], DType::F32, device)
            }
            .map_err(|e| load_error(&e, &files.weights))?,
            Some(adapter) => {
                let mut weights = candle_core::safetensors::load(&files.weights, &Device::Cpu)
                    .map_err(|e| load_error(&e, &files.weights))?;
                let layers = adapter.merge_into(&mut weights)?;
                tracing::info!(adapter = %adapter.id(), layers, "adapter merged into the weights");
                VarBuilder::from_tensors(weights, DType::F32, device)
            }
        };
        let kernel = device.is_cpu().then(kernels::Kernel::chosen);
        if let Some(kernel) = kernel {
            tracing::info!(
                kernel = kernel.name(),
                "dense layers run on this CPU kernel (SEMCACHE_EMBED_KERNEL overrides)"
            );
        }
        let packing = kernel.and_then(kernels::Kernel::packing);
        let mut backend = Self::from_weights(vb, &config, device, packing)
            .map_err(|e| load_error(&e, &files.weights))?;
        backend.kernel = kernel;
        Ok(backend)
    }

    /// `packing`: run the dense layers as packed CPU kernels of that precision instead of
    /// candle matmuls.
    fn from_weights(
        vb: VarBuilder,
        config: &BertConfig,
        device: &Device,
        packing: Option<Precision>,
    ) -> candle_core::Result<Self> {
        // Checkpoints exported from BertFor* models prefix every tensor with "bert.".
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let hidden = config.hidden_size;
        let emb = vb.pp("embeddings");
        let words = candle_nn::embedding(config.vocab_size, hidden, emb.pp("word_embeddings"))?;
        let positions = emb.get(
            (config.max_position_embeddings, hidden),
            "position_embeddings.weight",
        )?;
        // Every input is one segment: token type 0 for every position.
        let token_type = emb
            .get(
                (config.type_vocab_size, hidden),
                "token_type_embeddings.weight",
            )?
            .get(0)?;
        let embeddings_norm =
            candle_nn::layer_norm(hidden, config.layer_norm_eps, emb.pp("LayerNorm"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(vb.pp(format!("encoder.layer.{i}")), config, packing))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            words,
            positions,
            token_type,
            embeddings_norm,
            layers,
            heads: config.num_attention_heads,
            max_positions: config.max_position_embeddings,
            device: device.clone(),
            dimensions: hidden,
            ragged: packing.is_some(),
            kernel: None,
        })
    }

    /// The CPU kernel the dense layers run on, or `"gpu"`.
    pub fn kernel_name(&self) -> &'static str {
        self.kernel.map_or("gpu", kernels::Kernel::name)
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Whether batches run without padding (the CPU kernels), so texts of any lengths
    /// batch together at no cost; otherwise every text is padded to the longest.
    pub fn ragged(&self) -> bool {
        self.ragged
    }

    /// Embeds the texts of one batch.
    pub fn embed(&self, batch: &[&TokenizedText]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let result = if self.ragged {
            self.embed_ragged(batch)
        } else {
            self.embed_padded(batch)
        };
        result.map_err(|e| EmbedError::Inference(e.to_string()))
    }

    fn check_lengths(&self, batch: &[&TokenizedText]) -> candle_core::Result<()> {
        let longest = batch.iter().map(|t| t.ids.len()).max().unwrap_or(0);
        if longest > self.max_positions {
            candle_core::bail!(
                "{longest} tokens exceed the model's {} positions",
                self.max_positions
            );
        }
        Ok(())
    }

    /// All texts' tokens back to back as one `(tokens, width)` sequence: dense layers
    /// are per token, and the attention kernel keeps each text to itself.
    fn embed_ragged(&self, batch: &[&TokenizedText]) -> candle_core::Result<Vec<Vec<f32>>> {
        self.check_lengths(batch)?;
        let lengths: Vec<usize> = batch.iter().map(|t| t.ids.len()).collect();
        let ids: Vec<u32> = batch.iter().flat_map(|t| t.ids.iter().copied()).collect();
        let positions: Vec<u32> = lengths.iter().flat_map(|&len| 0..len as u32).collect();
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let positions = Tensor::from_vec(positions, total, &self.device)?;
        let embedded = (self.words.forward(&ids)? + self.positions.index_select(&positions, 0)?)?
            .broadcast_add(&self.token_type)?;
        let mut hidden = self.embeddings_norm.forward(&embedded)?;
        for layer in &self.layers {
            hidden = layer.forward(&hidden, Attend::Ragged(&lengths), self.heads)?;
        }
        // Mean pooling per text, then L2 normalisation (sentence-transformers).
        let hidden = hidden.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        let mut start = 0;
        Ok(lengths
            .iter()
            .map(|&len| {
                let rows = &hidden[start..start + len];
                start += len;
                let mut mean = vec![0f32; self.dimensions];
                for row in rows {
                    mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
                }
                let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                mean.iter_mut().for_each(|m| *m /= norm);
                mean
            })
            .collect())
    }

    /// Texts padded to the longest one, with an attention mask (candle ops, any device).
    fn embed_padded(&self, batch: &[&TokenizedText]) -> candle_core::Result<Vec<Vec<f32>>> {
        self.check_lengths(batch)?;
        let max_len = batch.iter().map(|t| t.ids.len()).max().unwrap_or(0);
        let n = batch.len();
        let mut ids = vec![0u32; n * max_len];
        let mut mask = vec![0f32; n * max_len];
        for (row, text) in batch.iter().enumerate() {
            let start = row * max_len;
            ids[start..start + text.ids.len()].copy_from_slice(&text.ids);
            mask[start..start + text.ids.len()].fill(1.0);
        }
        let padded = batch.iter().any(|t| t.ids.len() < max_len);
        let ids = Tensor::from_vec(ids, (n, max_len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, max_len), &self.device)?;

        let embedded = self
            .words
            .forward(&ids)?
            .broadcast_add(&self.positions.narrow(0, 0, max_len)?)?
            .broadcast_add(&self.token_type)?;
        let mut hidden = self.embeddings_norm.forward(&embedded)?;
        // Padding positions get the most negative score before the softmax, so they
        // receive no attention; a batch without padding skips the addition.
        let bias = if padded {
            Some(((1.0 - &mask)? * f64::from(f32::MIN))?.reshape((n, 1, 1, max_len))?)
        } else {
            None
        };
        for layer in &self.layers {
            hidden = layer.forward(&hidden, Attend::Masked(bias.as_ref()), self.heads)?;
        }

        // Mean pooling over real tokens, then L2 normalisation (sentence-transformers).
        let mask = mask.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9f32, f32::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12f32, f32::MAX)?;
        mean.broadcast_div(&norms)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()
    }
}

/// How a layer's attention keeps texts apart.
#[derive(Clone, Copy)]
enum Attend<'a> {
    /// `(tokens, width)` hidden states, texts back to back with these lengths.
    Ragged(&'a [usize]),
    /// `(texts, seq, width)` padded hidden states; the bias is added to attention scores
    /// (the most negative f32 at padding keys), `None` when no text is padded.
    Masked(Option<&'a Tensor>),
}

/// One transformer block: self-attention, then the feed-forward layers, each followed by
/// a residual connection and layer norm.
struct EncoderLayer {
    /// Q, K and V in one product; Q pre-scaled by 1/√head_size.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: Norm,
    intermediate: Dense,
    output: Dense,
    output_norm: Norm,
}

impl EncoderLayer {
    fn load(
        vb: VarBuilder,
        config: &BertConfig,
        packing: Option<Precision>,
    ) -> candle_core::Result<Self> {
        let hidden = config.hidden_size;
        let head_size = hidden / config.num_attention_heads;
        let attention = vb.pp("attention.self");
        let part = |name: &str| -> candle_core::Result<(Tensor, Tensor)> {
            let vb = attention.pp(name);
            Ok((vb.get((hidden, hidden), "weight")?, vb.get(hidden, "bias")?))
        };
        let scale = 1.0 / (head_size as f64).sqrt();
        let (qw, qb) = part("query")?;
        let (kw, kb) = part("key")?;
        let (vw, vbias) = part("value")?;
        let qkv = Dense::new(
            Tensor::cat(&[(qw * scale)?, kw, vw], 0)?,
            Tensor::cat(&[(qb * scale)?, kb, vbias], 0)?,
            Activation::Identity,
            packing,
        )?;
        let dense = |vb: VarBuilder, inputs: usize, outputs: usize, activation| {
            Dense::new(
                vb.get((outputs, inputs), "weight")?,
                vb.get(outputs, "bias")?,
                activation,
                packing,
            )
        };
        let norm =
            |vb: VarBuilder| Norm::load(vb, hidden, config.layer_norm_eps, packing.is_some());
        Ok(Self {
            qkv,
            attention_out: dense(
                vb.pp("attention.output.dense"),
                hidden,
                hidden,
                Activation::Identity,
            )?,
            attention_norm: norm(vb.pp("attention.output.LayerNorm"))?,
            intermediate: dense(
                vb.pp("intermediate.dense"),
                hidden,
                config.intermediate_size,
                Activation::Gelu,
            )?,
            output: dense(
                vb.pp("output.dense"),
                config.intermediate_size,
                hidden,
                Activation::Identity,
            )?,
            output_norm: norm(vb.pp("output.LayerNorm"))?,
        })
    }

    fn forward(
        &self,
        hidden: &Tensor,
        attend: Attend,
        heads: usize,
    ) -> candle_core::Result<Tensor> {
        let qkv = self.qkv.forward(hidden)?;
        let context = match attend {
            Attend::Ragged(lengths) => qkv.apply_op1_no_bwd(&kernels::Attention {
                heads,
                lengths: lengths.to_vec(),
            })?,
            Attend::Masked(bias) => attention(&qkv, bias, heads)?,
        };
        let attended = self
            .attention_norm
            .forward(&self.attention_out.forward(&context)?, hidden)?;
        let inner = self.intermediate.forward(&attended)?;
        self.output_norm
            .forward(&self.output.forward(&inner)?, &attended)
    }
}

/// `LayerNorm(x + residual)`: one kernel on CPU, candle's addition and layer norm
/// elsewhere.
enum Norm {
    Fused(kernels::AddNorm),
    Candle(LayerNorm),
}

impl Norm {
    fn load(vb: VarBuilder, width: usize, eps: f64, fused: bool) -> candle_core::Result<Self> {
        if !fused {
            return Ok(Self::Candle(candle_nn::layer_norm(width, eps, vb)?));
        }
        Ok(Self::Fused(kernels::AddNorm {
            weight: vb.get(width, "weight")?.to_vec1()?,
            bias: vb.get(width, "bias")?.to_vec1()?,
            eps: eps as f32,
        }))
    }

    fn forward(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Fused(norm) => x
                .contiguous()?
                .apply_op2_no_bwd(&residual.contiguous()?, norm),
            Self::Candle(norm) => norm.forward(&(x + residual)?),
        }
    }
}

/// Self-attention with candle ops: `(n, seq, 3·width)` fused Q/K/V in, `(n, seq, width)`
/// out.
fn attention(qkv: &Tensor, bias: Option<&Tensor>, heads: usize) -> candle_core::Result<Tensor> {
    let (n, seq, fused) = qkv.dims3()?;
    let width = fused / 3;
    // (n, seq, 3·width) → three (n, heads, seq, head_size) tensors.
    let qkv = qkv
        .reshape((n, seq, 3, heads, width / heads))?
        .permute((2, 0, 3, 1, 4))?;
    let query = qkv.get(0)?.contiguous()?;
    let key = qkv.get(1)?.contiguous()?;
    let value = qkv.get(2)?.contiguous()?;
    let mut scores = query.matmul(&key.t()?)?;
    if let Some(bias) = bias {
        scores = scores.broadcast_add(bias)?;
    }
    let probabilities = candle_nn::ops::softmax_last_dim(&scores)?;
    probabilities
        .matmul(&value)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, seq, width))
}

/// A dense layer `x·Wᵀ + b` (then the activation): packed on CPU, a candle matmul
/// elsewhere.
enum Dense {
    Packed(PackedLinear),
    Candle {
        weight: Tensor,
        bias: Tensor,
        activation: Activation,
    },
}

impl Dense {
    fn new(
        weight: Tensor,
        bias: Tensor,
        activation: Activation,
        packing: Option<Precision>,
    ) -> candle_core::Result<Self> {
        if let Some(precision) = packing {
            let (outputs, inputs) = weight.dims2()?;
            if let Some(layer) = PackedLinear::with_precision(
                &weight.flatten_all()?.to_vec1::<f32>()?,
                &bias.to_vec1::<f32>()?,
                outputs,
                inputs,
                activation,
                precision,
            ) {
                return Ok(Self::Packed(layer));
            }
        }
        Ok(Self::Candle {
            weight,
            bias,
            activation,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Packed(layer) => x.contiguous()?.apply_op1_no_bwd(layer),
            Self::Candle {
                weight,
                bias,
                activation,
            } => {
                let y = x.broadcast_matmul(&weight.t()?)?.broadcast_add(bias)?;
                match activation {
                    Activation::Identity => Ok(y),
                    Activation::Gelu => y.gelu_erf(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A two-layer BERT with random weights, as a Hugging Face checkpoint names them.
    fn tiny_bert(prefix: &str) -> (BertConfig, HashMap<String, Tensor>) {
        let config: BertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 3, "intermediate_size": 40, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "max_position_embeddings": 32, "type_vocab_size": 2
        }))
        .unwrap();
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("embeddings.word_embeddings.weight".into(), vec![50, h]),
            ("embeddings.position_embeddings.weight".into(), vec![32, h]),
            ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            for name in [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
            ] {
                shapes.push((format!("{p}.{name}.weight"), vec![h, h]));
                shapes.push((format!("{p}.{name}.bias"), vec![h]));
            }
            shapes.push((format!("{p}.intermediate.dense.weight"), vec![i, h]));
            shapes.push((format!("{p}.intermediate.dense.bias"), vec![i]));
            shapes.push((format!("{p}.output.dense.weight"), vec![h, i]));
            shapes.push((format!("{p}.output.dense.bias"), vec![h]));
            for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
                shapes.push((format!("{p}.{norm}.weight"), vec![h]));
                shapes.push((format!("{p}.{norm}.bias"), vec![h]));
            }
        }
        let tensors = shapes
            .into_iter()
            .map(|(name, shape)| {
                let t = Tensor::randn(0f32, 0.5, shape, &Device::Cpu).unwrap();
                (format!("{prefix}{name}"), t)
            })
            .collect();
        (config, tensors)
    }

    fn text(ids: &[u32]) -> TokenizedText {
        TokenizedText {
            ids: ids.to_vec(),
            truncated_at: None,
        }
    }

    #[test]
    fn packed_kernels_and_candle_matmuls_give_the_same_embeddings() {
        let (config, tensors) = tiny_bert("bert.");
        let vb = || VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
        let plain = BertBackend::from_weights(vb(), &config, &Device::Cpu, None).unwrap();
        // A padded batch (three lengths) and a batch of one.
        let texts = [
            text(&[1, 7, 9, 2]),
            text(&[1, 30, 2]),
            text(&[1, 4, 5, 6, 8, 11, 49, 2]),
        ];
        let batch: Vec<&TokenizedText> = texts.iter().collect();
        // Both precisions where the CPU runs them (AVX2-only CPUs run f16).
        let precisions = [Precision::F16, Precision::Bf16]
            .into_iter()
            .filter(|p| *p == Precision::F16 || kernels::Kernel::Avx512Bf16.runs_here().is_ok());
        for precision in precisions {
            let packed =
                BertBackend::from_weights(vb(), &config, &Device::Cpu, Some(precision)).unwrap();
            for batch in [&batch[..], &batch[2..]] {
                let a = packed.embed(batch).unwrap();
                let b = plain.embed(batch).unwrap();
                for (a, b) in a.iter().zip(&b) {
                    let cosine: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                    assert!(cosine > 0.99999, "{precision:?}: cosine {cosine}");
                }
            }
            // Padding does not change a text's embedding.
            let alone = packed.embed(&[&texts[1]]).unwrap();
            let in_batch = packed.embed(&batch).unwrap();
            let cosine: f32 = alone[0].iter().zip(&in_batch[1]).map(|(x, y)| x * y).sum();
            assert!(cosine > 0.99999, "{precision:?}: padded cosine {cosine}");
        }
    }

    #[test]
    fn inputs_longer_than_the_position_table_are_an_error() {
        let (config, tensors) = tiny_bert("");
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let model =
            BertBackend::from_weights(vb, &config, &Device::Cpu, Some(Precision::F16)).unwrap();
        let long = text(&[3; 33]);
        assert!(matches!(
            model.embed(&[&long]),
            Err(EmbedError::Inference(_))
        ));
    }

    #[test]
    fn unsupported_configs_are_refused() {
        let base = serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "max_position_embeddings": 16, "type_vocab_size": 2
        });
        let config: BertConfig = serde_json::from_value(base.clone()).unwrap();
        assert!(config.check().is_ok());
        for (field, value) in [
            ("hidden_act", serde_json::json!("relu")),
            ("position_embedding_type", serde_json::json!("relative_key")),
            ("num_attention_heads", serde_json::json!(3)),
        ] {
            let mut changed = base.clone();
            changed[field] = value;
            let config: BertConfig = serde_json::from_value(changed).unwrap();
            assert!(config.check().is_err(), "{field} accepted");
        }
    }
}
