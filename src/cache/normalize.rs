//! The exact-match key: a prompt with case and whitespace folded.

use sha2::{Digest, Sha256};

/// Lowercases (Unicode), collapses runs of whitespace to one space, and trims.
pub fn normalize_prompt(prompt: &str) -> String {
    let mut out = String::with_capacity(prompt.len());
    for word in prompt.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

/// Hex sha256 of the normalised prompt.
pub fn prompt_hash(prompt: &str) -> String {
    hex::encode(Sha256::digest(normalize_prompt(prompt).as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_and_whitespace_fold() {
        assert_eq!(
            normalize_prompt("  What is\tthe   CAPITAL\nof France? "),
            "what is the capital of france?"
        );
        assert_eq!(prompt_hash("Hello  World"), prompt_hash("hello world"));
        assert_ne!(prompt_hash("hello world"), prompt_hash("hello world!"));
        assert_eq!(normalize_prompt("ÉCOLE"), "école");
    }
}
