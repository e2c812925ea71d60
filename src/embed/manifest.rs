//! The pinned description of an embedding model (see `models/`).

use serde::Deserialize;

/// Manifest of the default model, compiled into the binary.
pub const DEFAULT_MANIFEST_JSON: &str = include_str!("../../models/all-MiniLM-L6-v2.json");

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelManifest {
    pub name: String,
    pub hub_revision: String,
    pub dimensions: usize,
    pub pooling: String,
    pub normalize: bool,
    pub max_seq_length: usize,
    pub files: Vec<ManifestFile>,
    pub wheel: WheelSource,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestFile {
    pub name: String,
    pub sha256: String,
    pub wheel_path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WheelSource {
    pub package: String,
    pub version: String,
    pub filename: String,
    pub url: String,
    pub sha256: String,
}

impl ModelManifest {
    pub fn default_model() -> Self {
        serde_json::from_str(DEFAULT_MANIFEST_JSON)
            .expect("the embedded model manifest is valid JSON")
    }

    /// Folder name of this model inside the model directory.
    pub fn dir_name(&self) -> String {
        self.name.replace('/', "--")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_manifest_pins_every_file() {
        let m = ModelManifest::default_model();
        assert_eq!(m.dimensions, 384);
        assert_eq!(m.max_seq_length, 256);
        for name in ["config.json", "tokenizer.json", "model.safetensors"] {
            let f = m.files.iter().find(|f| f.name == name).expect(name);
            assert_eq!(f.sha256.len(), 64);
        }
    }
}
