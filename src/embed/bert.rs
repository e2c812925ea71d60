//! The candle BERT backend: token ids in, mean-pooled L2-normalised vectors out.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};

use super::provision::ModelFiles;
use super::tokenize::TokenizedText;
use super::EmbedError;

pub struct BertBackend {
    model: BertModel,
    device: Device,
    dimensions: usize,
}

impl BertBackend {
    pub fn load(files: &ModelFiles, device: &Device) -> Result<Self, EmbedError> {
        let config_text = std::fs::read_to_string(&files.config)
            .map_err(|e| EmbedError::Load(format!("{}: {e}", files.config.display())))?;
        let config: Config = serde_json::from_str(&config_text)
            .map_err(|e| EmbedError::Load(format!("{}: {e}", files.config.display())))?;
        // SAFETY: the weights file is ours (hash-verified at provisioning) and is not
        // modified while mapped.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[&files.weights], DType::F32, device) }
                .map_err(|e| EmbedError::Load(format!("{}: {e}", files.weights.display())))?;
        let model = BertModel::load(vb, &config).map_err(|e| EmbedError::Load(e.to_string()))?;
        Ok(Self {
            model,
            device: device.clone(),
            dimensions: config.hidden_size,
        })
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Embeds texts of one padded batch. All inputs are padded to the longest one.
    pub fn embed(&self, batch: &[&TokenizedText]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.embed_inner(batch)
            .map_err(|e| EmbedError::Inference(e.to_string()))
    }

    fn embed_inner(&self, batch: &[&TokenizedText]) -> candle_core::Result<Vec<Vec<f32>>> {
        let max_len = batch.iter().map(|t| t.ids.len()).max().unwrap_or(0);
        let n = batch.len();
        let mut ids = vec![0u32; n * max_len];
        let mut mask = vec![0u32; n * max_len];
        for (row, text) in batch.iter().enumerate() {
            let start = row * max_len;
            ids[start..start + text.ids.len()].copy_from_slice(&text.ids);
            mask[start..start + text.ids.len()].fill(1);
        }
        let ids = Tensor::from_vec(ids, (n, max_len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, max_len), &self.device)?;
        let token_types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &token_types, Some(&mask))?;

        // Mean pooling over real tokens, then L2 normalisation (sentence-transformers).
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
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
