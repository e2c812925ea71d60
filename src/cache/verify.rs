//! The verification stage between HNSW candidates and an answer.
//!
//! A small embedder scores "I want a refund" and "I do not want a refund", "2+2" and
//! "2+3", or "… in Anchorage County" and "… in Denali County" as near-identical. Each
//! rule here catches one such class with a cheap lexical comparison of the two prompts
//! and says why it rejected, so `?explain=true` can show it. The rules only fire when
//! the prompts are *near-identical edits* of each other (most words shared): a real
//! paraphrase rewords freely, and then the embedding's judgement stands.

use std::collections::HashSet;

use serde::Serialize;

/// Why a candidate was not served.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rule", rename_all = "camelCase")]
pub enum Rejection {
    /// Similarity under the threshold in force.
    #[serde(rename_all = "camelCase")]
    BelowThreshold { threshold: f32 },
    /// The numbers (and the arithmetic between them) differ.
    #[serde(rename_all = "camelCase")]
    NumbersDiffer {
        query: Vec<String>,
        entry: Vec<String>,
    },
    /// One prompt negates what the other asserts.
    #[serde(rename_all = "camelCase")]
    NegationDiffers { query: usize, entry: usize },
    /// A name in one prompt is replaced by a different name in the other.
    #[serde(rename_all = "camelCase")]
    EntitiesDiffer {
        query: Vec<String>,
        entry: Vec<String>,
    },
    /// A prompt is longer than the model's window and the parts it cannot see differ.
    TailDiffers,
    /// Someone reported this entry as a wrong answer for a prompt like this one.
    #[serde(rename_all = "camelCase")]
    ReportedWrong { similarity: f32 },
    /// `maxErrorRate`: the bound on P(correct) (or the cache's error budget) does not
    /// allow serving it.
    #[serde(rename_all = "camelCase")]
    NotConfident { lower_bound: f32, required: f32 },
}

impl Rejection {
    pub fn name(&self) -> &'static str {
        match self {
            Rejection::BelowThreshold { .. } => "belowThreshold",
            Rejection::NumbersDiffer { .. } => "numbersDiffer",
            Rejection::NegationDiffers { .. } => "negationDiffers",
            Rejection::EntitiesDiffer { .. } => "entitiesDiffer",
            Rejection::TailDiffers => "tailDiffers",
            Rejection::ReportedWrong { .. } => "reportedWrong",
            Rejection::NotConfident { .. } => "notConfident",
        }
    }
}

/// Lexical facts about one prompt, computed once per lookup.
#[derive(Debug, Clone, Default)]
pub struct Signature {
    words: HashSet<String>,
    /// Numbers (sorted), then arithmetic expressions like `3-5` (sorted).
    numbers: Vec<String>,
    negations: usize,
    entities: HashSet<String>,
}

/// The number-bearing skeleton of a prompt, in order.
enum Tok {
    Num(String),
    Op(char),
    Break,
}

const STOPWORDS: &[&str] = &[
    "a", "an", "the", "is", "are", "was", "were", "be", "been", "being", "am", "do", "does", "did",
    "of", "in", "on", "at", "to", "for", "from", "by", "with", "about", "as", "into", "like",
    "through", "over", "after", "before", "between", "under", "and", "or", "but", "if", "then",
    "so", "than", "that", "this", "these", "those", "it", "its", "i", "me", "my", "we", "our",
    "you", "your", "he", "she", "they", "them", "their", "what", "which", "who", "whom", "whose",
    "when", "where", "why", "how", "can", "could", "should", "would", "will", "shall", "may",
    "might", "must", "has", "have", "had", "there", "here", "some", "any", "all", "most", "more",
    "much", "many", "very", "just", "also", "too", "please", "tell", "give", "get", "i'm", "it's",
    "what's", "s", "way", "ways", "best", "good", "someone", "one",
];

const NEGATIONS: &[&str] = &[
    "not", "no", "never", "none", "nothing", "nobody", "neither", "nor", "without", "cannot",
    "nowhere",
];

/// Spelled numbers ("one" is left out: "one of the…" is rarely a count).
const NUMBER_WORDS: &[(&str, &str)] = &[
    ("zero", "0"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
    ("eleven", "11"),
    ("twelve", "12"),
    ("twenty", "20"),
    ("thirty", "30"),
    ("hundred", "100"),
    ("thousand", "1000"),
    ("million", "1000000"),
    ("billion", "1000000000"),
];

const OPERATOR_WORDS: &[(&str, char)] = &[("plus", '+'), ("minus", '-'), ("times", '*')];

/// Scale words that name no number after a vague quantifier ("several thousand").
const SCALE_WORDS: &[&str] = &["hundred", "thousand", "million", "billion"];
const VAGUE_QUANTIFIERS: &[&str] = &["several", "few", "many", "some", "multiple", "numerous"];

/// What the word before this one was, as far as the rules care.
#[derive(Clone, Copy, Default, PartialEq)]
enum Previous {
    #[default]
    Other,
    /// "several", "few", …: a scale word after it is no number.
    VagueQuantifier,
    /// "… or not?": the question offers both answers; it negates nothing.
    Or,
    /// "If not, why?" likewise.
    If,
}

/// Where a word stands in its text, as far as the rules care.
#[derive(Clone, Copy)]
struct Context<'a> {
    sentence_start: bool,
    previous: Previous,
    /// Joined by a hyphen to a word ("non-zero", "zero-copy", "two-step").
    hyphenated: bool,
    /// The alternative after a slash ("should/shouldn't").
    after_slash: bool,
    /// The text after the word.
    rest: &'a str,
}

impl Context<'_> {
    /// A negation that poses both answers or answers the question rather than
    /// negating it: "No, …", "… or not?", "Why or why not?", "If not, why?",
    /// "should/shouldn't".
    fn negates_nothing(&self, word: &str) -> bool {
        let next_word = || {
            let rest = self.rest.trim_start();
            let end = rest
                .find(|c: char| !c.is_alphabetic())
                .unwrap_or(rest.len());
            rest[..end].to_lowercase()
        };
        match word {
            "no" => self.sentence_start && self.rest.starts_with(','),
            "not" if self.previous == Previous::Or => true,
            "not" if self.previous == Previous::If => {
                self.rest.trim_start().starts_with([',', '?', '.'])
                    || matches!(next_word().as_str(), "then" | "why")
            }
            _ => self.after_slash && word.ends_with("n't"),
        }
    }
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '\''
}

impl Signature {
    pub fn of(text: &str) -> Self {
        let text = text.replace(['’', '‘'], "'");
        let mut sig = Signature::default();
        let mut skeleton = Vec::new();
        let mut sentence_start = true;
        let mut previous = Previous::Other;
        let mut open_parens = 0usize;
        let mut chars = text.char_indices().peekable();
        while let Some((start, c)) = chars.next() {
            if is_word_char(c) {
                let mut end = start + c.len_utf8();
                while let Some(&(i, c)) = chars.peek() {
                    // "2.10.0" and "1,000" are one number; "Rs.500" and "500,1000" are not.
                    let after_digit = text[..i].ends_with(|c: char| c.is_ascii_digit());
                    let joins = match c {
                        '.' => after_digit && next_is_digit(&text, i),
                        ',' => after_digit && thousands_group_follows(&text, i),
                        _ => false,
                    };
                    if is_word_char(c) || joins {
                        end = i + c.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let raw = text[start..end].trim_matches('\'');
                let (before, after) = (&text[..start], &text[end..]);
                let joined = |hyphen: Option<char>, letter: Option<char>| {
                    hyphen == Some('-') && letter.is_some_and(char::is_alphabetic)
                };
                let mut back = before.chars().rev();
                let mut ahead = after.chars();
                let context = Context {
                    sentence_start,
                    previous,
                    after_slash: before.ends_with('/'),
                    hyphenated: joined(back.next(), back.next())
                        || joined(ahead.next(), ahead.next()),
                    rest: after,
                };
                previous = sig.add_word(raw, context, &mut skeleton);
                sentence_start = false;
            } else if c == '(' {
                open_parens += 1;
            } else if c == ')' && open_parens > 0 {
                open_parens -= 1;
            } else if c == ')' {
                // "1) download, 2) generate": list markers, not quantities.
                let after_digit = text[..start].ends_with(|c: char| c.is_ascii_digit());
                if after_digit && matches!(skeleton.last(), Some(Tok::Num(_))) {
                    skeleton.pop();
                    skeleton.push(Tok::Break);
                }
            } else if matches!(
                c,
                '+' | '-' | '*' | '/' | '^' | '%' | '=' | '<' | '>' | '×' | '÷'
            ) {
                skeleton.push(Tok::Op(c));
            } else if matches!(c, '.' | '!' | '?' | ':' | ';' | ',' | '\n') {
                sentence_start = c != ',';
                skeleton.push(Tok::Break);
            }
        }
        sig.numbers = number_signature(&skeleton);
        sig
    }

    /// Records one word; returns what the next word needs to know of it.
    fn add_word(&mut self, raw: &str, at: Context, skeleton: &mut Vec<Tok>) -> Previous {
        if raw.is_empty() {
            return Previous::Other;
        }
        let lower = raw.to_lowercase();
        // "France's" names France.
        let lower = lower
            .strip_suffix("'s")
            .map(str::to_string)
            .unwrap_or(lower);
        // "v2.10.0" is version 2.10.0.
        let version = lower
            .strip_prefix('v')
            .filter(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
        let spelled = NUMBER_WORDS.iter().find(|(w, _)| *w == lower).filter(|_| {
            let vague =
                SCALE_WORDS.contains(&lower.as_str()) && at.previous == Previous::VagueQuantifier;
            !at.hyphenated && !vague
        });
        if raw.starts_with(|c: char| c.is_ascii_digit()) {
            skeleton.push(Tok::Num(expand_thousands(&lower.replace(',', ""))));
        } else if let Some(number) = version {
            skeleton.push(Tok::Num(number.replace(',', "")));
        } else if let Some((_, n)) = spelled {
            skeleton.push(Tok::Num(n.to_string()));
        } else if let Some((_, op)) = OPERATOR_WORDS.iter().find(|(w, _)| *w == lower) {
            skeleton.push(Tok::Op(*op));
        } else {
            skeleton.push(Tok::Break);
        }
        if (NEGATIONS.contains(&lower.as_str()) || lower.ends_with("n't"))
            && !at.negates_nothing(&lower)
        {
            self.negations += 1;
        }
        let first = raw.chars().next().unwrap_or(' ');
        let has_inner_capital = raw.chars().skip(1).any(|c| c.is_uppercase());
        let capitalised = (first.is_uppercase() && !at.sentence_start) || has_inner_capital;
        if capitalised && !STOPWORDS.contains(&lower.as_str()) {
            self.entities.insert(lower.clone());
        }
        let kind = match lower.as_str() {
            // "… or why not?"
            "or" => Previous::Or,
            "why" if at.previous == Previous::Or => Previous::Or,
            "if" => Previous::If,
            w if VAGUE_QUANTIFIERS.contains(&w) => Previous::VagueQuantifier,
            _ => Previous::Other,
        };
        self.words.insert(lower);
        kind
    }

    /// Share of words the two prompts have in common (Jaccard), negations aside, so
    /// "the payment did not go through" is an edit of "the payment went through".
    pub fn overlap(&self, other: &Signature) -> f32 {
        let plain = |w: &&String| !NEGATIONS.contains(&w.as_str()) && !w.ends_with("n't");
        let shared = self.words.intersection(&other.words).filter(plain).count();
        let all = self.words.union(&other.words).filter(plain).count();
        if all == 0 {
            1.0
        } else {
            shared as f32 / all as f32
        }
    }
}

/// Sorted numbers, then sorted expressions (`number op number …`, order kept inside
/// each), so "3 minus 5" and "5 minus 3" differ while reordered clauses do not.
fn number_signature(skeleton: &[Tok]) -> Vec<String> {
    let mut numbers: Vec<String> = Vec::new();
    let mut expressions: Vec<String> = Vec::new();
    let mut i = 0;
    while i < skeleton.len() {
        if let Tok::Num(n) = &skeleton[i] {
            numbers.push(n.clone());
            let mut expr = n.clone();
            let mut j = i;
            while let (Some(Tok::Op(op)), Some(Tok::Num(m))) =
                (skeleton.get(j + 1), skeleton.get(j + 2))
            {
                expr.push(*op);
                expr.push_str(m);
                numbers.push(m.clone());
                j += 2;
            }
            if j > i {
                expressions.push(expr);
            }
            i = j + 1;
        } else {
            i += 1;
        }
    }
    numbers.sort();
    expressions.sort();
    numbers.extend(expressions);
    numbers
}

/// Whether exactly three digits follow the comma at `i`, as in "30,000".
fn thousands_group_follows(text: &str, i: usize) -> bool {
    let mut rest = text[i + 1..].chars();
    (0..3).all(|_| rest.next().is_some_and(|c| c.is_ascii_digit()))
        && !rest.next().is_some_and(|c| c.is_ascii_digit())
}

/// "25k" is 25000.
fn expand_thousands(number: &str) -> String {
    match number.strip_suffix('k') {
        Some(digits) if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) => {
            format!("{digits}000")
        }
        _ => number.to_string(),
    }
}

fn next_is_digit(text: &str, i: usize) -> bool {
    text[i + 1..]
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit())
}

/// Prompts with more distinct words than this are not checked for negation.
const MAX_NEGATION_WORDS: usize = 24;

/// Rule settings. Defaults are the documented operating point.
#[derive(Debug, Clone, Copy)]
pub struct VerifyRules {
    pub enabled: bool,
    /// Word overlap (Jaccard) from which two prompts count as edits of each other.
    pub edit_overlap: f32,
}

impl Default for VerifyRules {
    fn default() -> Self {
        Self {
            enabled: true,
            edit_overlap: 0.5,
        }
    }
}

/// Checks a candidate whose similarity already passed the threshold.
pub fn check(rules: &VerifyRules, query: &Signature, entry: &Signature) -> Result<(), Rejection> {
    if !rules.enabled {
        return Ok(());
    }
    if query.numbers != entry.numbers {
        return Err(Rejection::NumbersDiffer {
            query: query.numbers.clone(),
            entry: entry.numbers.clone(),
        });
    }
    if query.overlap(entry) < rules.edit_overlap {
        return Ok(());
    }
    // Long passages reword negations freely ("without streaming", "in non-streaming
    // mode"); a flipped question or request is short.
    let short = query.words.len().max(entry.words.len()) <= MAX_NEGATION_WORDS;
    if short && query.negations != entry.negations {
        return Err(Rejection::NegationDiffers {
            query: query.negations,
            entry: entry.negations,
        });
    }
    let unmatched = |a: &Signature, b: &Signature| -> Vec<String> {
        let mut v: Vec<String> = a
            .entities
            .iter()
            .filter(|e| !b.words.contains(*e))
            .cloned()
            .collect();
        v.sort();
        v
    };
    let (eq, ee) = (unmatched(query, entry), unmatched(entry, query));
    if !eq.is_empty() && !ee.is_empty() {
        return Err(Rejection::EntitiesDiffer {
            query: eq,
            entry: ee,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(a: &str, b: &str) -> Result<(), Rejection> {
        check(
            &VerifyRules::default(),
            &Signature::of(a),
            &Signature::of(b),
        )
    }

    #[test]
    fn numbers_and_arithmetic() {
        assert!(matches!(
            verdict("2+2", "2+3"),
            Err(Rejection::NumbersDiffer { .. })
        ));
        assert!(matches!(
            verdict("What is 3 minus 5?", "What is 5 minus 3?"),
            Err(Rejection::NumbersDiffer { .. })
        ));
        assert!(matches!(
            verdict("2*2", "2+2"),
            Err(Rejection::NumbersDiffer { .. })
        ));
        assert!(verdict("What is 2+2?", "what is 2 + 2").is_ok());
        assert!(verdict("Is 1,000 a lot?", "is 1000 a lot").is_ok());
        assert!(matches!(
            verdict("I need two tickets", "I need 3 tickets"),
            Err(Rejection::NumbersDiffer { .. })
        ));
    }

    #[test]
    fn counts_that_are_not_quantities() {
        // Versions, list markers, vague scales and hyphenated compounds (GPTCache's pairs).
        assert!(verdict(
            "No, it doesn't exist in v2.10.0.",
            "It is not available in version 2.10.0."
        )
        .is_ok());
        assert!(verdict(
            "It loads several thousand audio files",
            "It loads thousands of audio files"
        )
        .is_ok());
        assert!(verdict("Set it to a non-zero value", "Set it to a nonzero value").is_ok());
        assert!(
            Signature::of("Arrow allows zero-copy reads in two-step jobs")
                .numbers
                .is_empty()
        );
        assert!(verdict(
            "It works in steps: 1) download the files, 2) build the dataset",
            "It works in steps: download the files, then build the dataset"
        )
        .is_ok());
        // Notation: "25k" is 25000, "Rs.500" is Rs 500, "500,1000" is two numbers.
        for (a, b) in [
            ("Best laptop under 25k?", "Best laptop under 25,000?"),
            ("Best phone under 10K", "Best phone under 10000"),
            (
                "Will banning Rs.500 and Rs.1000 notes help?",
                "Will banning Rs 500 and Rs 1000 notes help?",
            ),
            (
                "Will banning 500,1000 notes help?",
                "Will banning 500 and 1000 notes help?",
            ),
        ] {
            assert!(verdict(a, b).is_ok(), "{a} / {b}");
        }
        // Real quantities still count.
        for (a, b) in [
            (
                "It loads two thousand files",
                "It loads three thousand files",
            ),
            ("Is v2 faster than v3?", "Is v2 faster than v4?"),
            ("What is (2) plus 2?", "What is (2) plus 3?"),
            ("Best laptop under 25k?", "Best laptop under 30k?"),
            ("Is 2.5 more than 2.05?", "Is 2.5 more than 2.5?"),
        ] {
            assert!(
                matches!(verdict(a, b), Err(Rejection::NumbersDiffer { .. })),
                "{a} / {b}"
            );
        }
    }

    #[test]
    fn negations_that_pose_both_answers_negate_nothing() {
        // QQP duplicates that differ only by an alternative-question tail.
        for (a, b) in [
            ("Are tachyons real or not?", "Are tachyons real?"),
            (
                "Is Daniel Tosh funny? Why or why not?",
                "Is Daniel Tosh funny?",
            ),
            (
                "Can we travel back in time? If not then why?",
                "Can we travel back in time?",
            ),
            ("Is it safe? If not, why?", "Is it safe?"),
            (
                "Why should/shouldn't Puerto Rico become a state?",
                "Why should Puerto Rico become a state?",
            ),
        ] {
            assert!(verdict(a, b).is_ok(), "{a} / {b}");
        }
        assert!(matches!(
            verdict("Is it safe if not cooked?", "Is it safe if cooked?"),
            Err(Rejection::NegationDiffers { .. })
        ));
        assert!(verdict("No, I don't want a refund", "I don't want a refund").is_ok());
        assert!(verdict("No, it is not there", "It is not there").is_ok());
        assert!(matches!(
            verdict("No, I want a refund", "I don't want a refund"),
            Err(Rejection::NegationDiffers { .. })
        ));
        assert!(matches!(
            verdict("There is no refund", "There is a refund"),
            Err(Rejection::NegationDiffers { .. })
        ));
    }

    #[test]
    fn negation() {
        assert!(matches!(
            verdict("I want a refund.", "I do not want a refund."),
            Err(Rejection::NegationDiffers { .. })
        ));
        assert!(matches!(
            verdict("I don't want a refund", "I want a refund"),
            Err(Rejection::NegationDiffers { .. })
        ));
        assert!(verdict("I don’t want a refund", "I do not want a refund").is_ok());
    }

    #[test]
    fn entities() {
        let r = verdict(
            "What is the population of Anchorage County?",
            "What is the population of Denali County?",
        );
        assert!(matches!(r, Err(Rejection::EntitiesDiffer { .. })), "{r:?}");
        assert!(verdict("Who is the CEO of Apple?", "Who is the CEO of Apple Inc?").is_ok());
        assert!(verdict(
            "Tell me about Paris. It is nice.",
            "Tell me about Paris. Is it nice?"
        )
        .is_ok());
    }

    #[test]
    fn paraphrases_pass() {
        assert!(verdict(
            "How do I reset my password?",
            "How can I reset my password?"
        )
        .is_ok());
        assert!(verdict(
            "What is the capital of France?",
            "Tell me the capital city of France."
        )
        .is_ok());
    }
}
