//! LoRA adapters: low-rank updates to the model's dense layers, merged into the weights
//! at load (`W += alpha/rank · B·A`), so an adapted model costs exactly what the base
//! model costs per text.
//!
//! One adapter ships inside the binary: `qqp`, trained by `training/qqp-adapter/` on
//! Quora duplicate labels to separate paraphrases from near-misses (pinned by sha256
//! below). Others can be loaded from a file in the same layout: per adapted layer
//! `{layer}.lora_a` `[rank, in]` and `{layer}.lora_b` `[out, rank]`, with `rank`,
//! `alpha` and `base` (the model it was trained on) in the safetensors metadata.

use std::borrow::Cow;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::EmbedError;

/// The built-in adapter's file and its pinned sha256.
const QQP_BYTES: &[u8] = include_bytes!("../../models/adapters/qqp-lora-r8.safetensors");
pub const QQP_SHA256: &str = "169ebaaff38fcdd6f63a521dd5f52f70c3bcb0dbd88de3cf261f60b408121d19";

/// The built-in adapter's default similarity threshold: on the validation part of its
/// training split, the first at which it is at least as precise as the base model at
/// 0.90 (training/qqp-adapter/calibrate.py).
pub const QQP_THRESHOLD: f32 = 0.935;

/// Which adapter to apply, as named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterChoice {
    /// The base model as published.
    None,
    /// An adapter compiled into the binary, by name.
    Builtin(String),
    /// An adapter file.
    File(std::path::PathBuf),
}

impl std::str::FromStr for AdapterChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "none" => Ok(Self::None),
            "qqp" => Ok(Self::Builtin(s.to_string())),
            path if path.contains('/') || path.ends_with(".safetensors") => {
                Ok(Self::File(path.into()))
            }
            other => Err(format!(
                "unknown adapter {other:?}: use none, qqp, or the path of a .safetensors file"
            )),
        }
    }
}

impl std::fmt::Display for AdapterChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Builtin(name) => f.write_str(name),
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

impl AdapterChoice {
    /// Reads (and for a built-in one, verifies) the adapter; `None` for the base model.
    pub fn load(&self) -> Result<Option<Adapter>, EmbedError> {
        match self {
            Self::None => Ok(None),
            Self::Builtin(name) => Adapter::parse(name.clone(), Cow::Borrowed(QQP_BYTES))
                .and_then(|a| a.pinned(QQP_SHA256))
                .map(|a| {
                    Some(Adapter {
                        threshold: Some(QQP_THRESHOLD),
                        ..a
                    })
                }),
            Self::File(path) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| EmbedError::Load(format!("adapter {}: {e}", path.display())))?;
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "adapter".into());
                Adapter::parse(name, Cow::Owned(bytes)).map(Some)
            }
        }
    }
}

/// A parsed adapter: its identity and the low-rank factors of each adapted layer.
pub struct Adapter {
    pub name: String,
    pub sha256: String,
    /// The model it was trained on (`base` in its metadata).
    pub base: String,
    /// The default similarity threshold with this adapter (`threshold` in its
    /// metadata; the built-in one's is pinned here).
    pub threshold: Option<f32>,
    scale: f64,
    bytes: Cow<'static, [u8]>,
}

impl Adapter {
    fn parse(name: String, bytes: Cow<'static, [u8]>) -> Result<Self, EmbedError> {
        let bad = |why: String| EmbedError::Load(format!("adapter {name}: {why}"));
        let sha256 = hex(&Sha256::digest(&bytes));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let number = |key: &str| -> Result<f64, EmbedError> {
            meta.get(key)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| bad(format!("metadata {key:?} missing or not a positive number")))
        };
        let scale = number("alpha")? / number("rank")?;
        let base = meta
            .get("base")
            .cloned()
            .ok_or_else(|| bad("metadata \"base\" missing".into()))?;
        let threshold = meta
            .get("threshold")
            .and_then(|t| t.parse::<f32>().ok())
            .filter(|t| (0.0..=1.0).contains(t));
        Ok(Self {
            name,
            sha256,
            base,
            threshold,
            scale,
            bytes,
        })
    }

    fn pinned(self, sha256: &str) -> Result<Self, EmbedError> {
        if self.sha256 != sha256 {
            return Err(EmbedError::Load(format!(
                "built-in adapter {} has sha256 {}, expected {sha256}",
                self.name, self.sha256
            )));
        }
        Ok(self)
    }

    /// `name@sha256[..12]`: what a store records as part of its embedding space.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, &self.sha256[..12])
    }

    /// Adds each layer's update to its weight in `weights` (safetensors names, with or
    /// without a `bert.` prefix). Every factor must meet a weight of its shape.
    pub(crate) fn merge_into(
        &self,
        weights: &mut HashMap<String, Tensor>,
    ) -> Result<usize, EmbedError> {
        let bad = |why: String| EmbedError::Load(format!("adapter {}: {why}", self.name));
        let factors = candle_core::safetensors::load_buffer(&self.bytes, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?;
        let mut merged = 0;
        for (key, a) in &factors {
            let Some(layer) = key.strip_suffix(".lora_a") else {
                continue;
            };
            let b = factors
                .get(&format!("{layer}.lora_b"))
                .ok_or_else(|| bad(format!("{layer}.lora_b missing")))?;
            let name = [format!("{layer}.weight"), format!("bert.{layer}.weight")]
                .into_iter()
                .find(|n| weights.contains_key(n))
                .ok_or_else(|| bad(format!("the model has no layer {layer}")))?;
            let weight = &weights[&name];
            let update = (b
                .to_dtype(DType::F32)
                .and_then(|b| b.matmul(&a.to_dtype(DType::F32)?)))
            .and_then(|u| u * self.scale)
            .map_err(|e| bad(format!("{layer}: {e}")))?;
            if update.dims() != weight.dims() {
                return Err(bad(format!(
                    "{layer}: update {:?} does not fit weight {:?}",
                    update.dims(),
                    weight.dims()
                )));
            }
            let sum = (weight.to_device(&Device::Cpu).and_then(|w| w + update))
                .and_then(|w| w.to_device(weight.device()))
                .map_err(|e| bad(format!("{layer}: {e}")))?;
            weights.insert(name, sum);
            merged += 1;
        }
        if merged == 0 {
            return Err(bad("no lora_a/lora_b pairs".into()));
        }
        Ok(merged)
    }
}

/// The adapter a server starts with, given what its store's vectors were made with.
///
/// `recorded` is the store's embedding space (`model` or `model+name@sha`); a store
/// that holds vectors but no record was written by an older semcache with the base
/// model. Unset, the choice follows the store (a new one gets the base model); set, it
/// must agree with the store — vectors from two spaces are never compared, so a
/// mismatch refuses to start rather than serving wrong hits.
pub fn for_store(
    choice: Option<AdapterChoice>,
    recorded: Option<String>,
    holds_vectors: bool,
    model: &str,
) -> Result<Option<Adapter>, EmbedError> {
    let recorded = recorded.or_else(|| holds_vectors.then(|| model.to_string()));
    let choice = match (choice, &recorded) {
        (Some(choice), _) => choice,
        (None, None) => AdapterChoice::None,
        (None, Some(space)) => match space.strip_prefix(model) {
            Some("") => AdapterChoice::None,
            Some(rest) => {
                let name = rest
                    .trim_start_matches('+')
                    .split('@')
                    .next()
                    .unwrap_or_default();
                name.parse::<AdapterChoice>()
                    .ok()
                    .filter(|c| matches!(c, AdapterChoice::Builtin(_)))
                    .ok_or_else(|| {
                        EmbedError::Load(format!(
                            "this data dir's vectors were made with {space}; pass --adapter with that adapter's file"
                        ))
                    })?
            }
            None => {
                return Err(EmbedError::Load(format!(
                    "this data dir's vectors were made with {space}, not {model}"
                )))
            }
        },
    };
    let adapter = choice.load()?;
    let space = space(model, adapter.as_ref().map(Adapter::id).as_deref());
    if let Some(recorded) = recorded.filter(|r| *r != space) {
        return Err(EmbedError::Load(format!(
            "this data dir's vectors were made with {recorded}, but this server embeds with {space}; \
             start with the adapter it was made with (--adapter), or use a new --data-dir"
        )));
    }
    Ok(adapter)
}

/// The embedding space's name: the model, and the adapter's id if any.
pub fn space(model: &str, adapter_id: Option<&str>) -> String {
    match adapter_id {
        Some(id) => format!("{model}+{id}"),
        None => model.to_string(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks an adapter against the model it is applied to.
pub(crate) fn check_base(adapter: &Adapter, model: &str) -> Result<(), EmbedError> {
    if adapter.base != model {
        return Err(EmbedError::Load(format!(
            "adapter {} was trained on {}, not {model}",
            adapter.name, adapter.base
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_adapter_is_the_pinned_one() {
        let adapter = AdapterChoice::Builtin("qqp".into())
            .load()
            .unwrap()
            .unwrap();
        assert_eq!(adapter.sha256, QQP_SHA256);
        assert_eq!(adapter.base, "sentence-transformers/all-MiniLM-L6-v2");
        assert!(adapter.id().starts_with("qqp@"));
    }

    #[test]
    fn a_store_keeps_its_space() {
        let qqp = || Some(AdapterChoice::Builtin("qqp".into()));
        let id = format!("qqp@{}", &QQP_SHA256[..12]);
        let name = |r: Result<Option<Adapter>, EmbedError>| r.map(|a| a.map(|a| a.name));
        // A new store takes the choice, or the base model.
        assert_eq!(name(for_store(None, None, false, "m")).unwrap(), None);
        assert_eq!(
            name(for_store(qqp(), None, false, "m")).unwrap(),
            Some("qqp".into())
        );
        // An older store with vectors and no record was made with the base model.
        assert_eq!(name(for_store(None, None, true, "m")).unwrap(), None);
        assert!(for_store(qqp(), None, true, "m").is_err());
        // Unset follows the record; a different choice is refused.
        let recorded = Some(format!("m+{id}"));
        assert_eq!(
            name(for_store(None, recorded.clone(), true, "m")).unwrap(),
            Some("qqp".into())
        );
        assert!(for_store(Some(AdapterChoice::None), recorded, true, "m").is_err());
        // Another build of the adapter, another model, an adapter file: refused, unset.
        assert!(for_store(None, Some("m+qqp@000000000000".into()), true, "m").is_err());
        assert!(for_store(None, Some("other".into()), true, "m").is_err());
        let file = for_store(None, Some("m+mine@0123456789ab".into()), true, "m");
        assert!(matches!(file, Err(EmbedError::Load(why)) if why.contains("--adapter")));
    }

    #[test]
    fn choices_parse() {
        assert_eq!("none".parse::<AdapterChoice>(), Ok(AdapterChoice::None));
        assert_eq!(
            "qqp".parse::<AdapterChoice>(),
            Ok(AdapterChoice::Builtin("qqp".into()))
        );
        assert!(matches!(
            "./mine.safetensors".parse::<AdapterChoice>(),
            Ok(AdapterChoice::File(_))
        ));
        assert!("turbo".parse::<AdapterChoice>().is_err());
    }

    #[test]
    fn an_update_lands_on_its_weight_and_a_misfit_is_refused() {
        // W (2×3) += (alpha/rank) · B (2×1) · A (1×3), alpha/rank = 2.
        let a = Tensor::new(&[[1f32, 0.0, 2.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1f32], [3.0]], &Device::Cpu).unwrap();
        let mut meta = HashMap::new();
        meta.insert("rank".to_string(), "1".to_string());
        meta.insert("alpha".to_string(), "2".to_string());
        meta.insert("base".to_string(), "m".to_string());
        let factors: HashMap<String, Tensor> = [
            ("enc.d.lora_a".to_string(), a),
            ("enc.d.lora_b".to_string(), b),
        ]
        .into();
        let bytes = safetensors::serialize(factors.iter().map(|(k, v)| (k.clone(), v)), Some(meta))
            .unwrap();
        let adapter = Adapter::parse("t".into(), Cow::Owned(bytes)).unwrap();
        let mut weights: HashMap<String, Tensor> = [(
            "bert.enc.d.weight".to_string(),
            Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        )]
        .into();
        assert_eq!(adapter.merge_into(&mut weights).unwrap(), 1);
        let w: Vec<Vec<f32>> = weights["bert.enc.d.weight"].to_vec2().unwrap();
        assert_eq!(w, vec![vec![2.0, 0.0, 4.0], vec![6.0, 0.0, 12.0]]);
        let mut wrong: HashMap<String, Tensor> = [(
            "enc.d.weight".to_string(),
            Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
        )]
        .into();
        assert!(adapter.merge_into(&mut wrong).is_err());
        let mut missing: HashMap<String, Tensor> = HashMap::new();
        assert!(adapter.merge_into(&mut missing).is_err());
    }
}
