//! Tokenization with the model's own `tokenizer.json`, truncated like sentence-transformers.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::EmbedError;

pub struct TextTokenizer {
    inner: Tokenizer,
}

/// One text's token ids, truncated to the model's window.
#[derive(Debug, Clone)]
pub struct TokenizedText {
    pub ids: Vec<u32>,
    /// Byte offset where the text the model cannot see begins, when it was truncated.
    pub truncated_at: Option<usize>,
}

impl TextTokenizer {
    /// `max_seq_length` overrides the file's own truncation: all-MiniLM-L6-v2's
    /// `tokenizer.json` says 128, while sentence-transformers embeds up to 256 tokens.
    pub fn load(path: &Path, max_seq_length: usize) -> Result<Self, EmbedError> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| EmbedError::Load(format!("{}: {e}", path.display())))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| EmbedError::Load(e.to_string()))?;
        // We pad per batch ourselves, so no padding here.
        inner.with_padding(None);
        Ok(Self { inner })
    }

    pub fn tokenize(&self, text: &str) -> Result<TokenizedText, EmbedError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
        let truncated_at = if encoding.get_overflowing().is_empty() {
            None
        } else {
            encoding.get_offsets().iter().map(|(_, end)| *end).max()
        };
        Ok(TokenizedText {
            ids: encoding.get_ids().to_vec(),
            truncated_at,
        })
    }
}
