//! Chat Completions requests as cache keys.
//!
//! The semantic key is the text of the last user message. Everything else that can
//! change the answer — model, system and developer messages, every earlier turn, tools,
//! tool_choice, response_format, sampling and length parameters — goes into an exact
//! scope fingerprint, so the same question in another conversation, for another model or
//! with other tools never shares an answer. Fields that cannot change the answer
//! (streaming, user ids, metadata) are left out of it.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub mod sse;

/// Attribute under which chat entries carry their scope fingerprint.
pub const SCOPE_ATTRIBUTE: &str = "semcache.chat";

/// Request fields that do not change the completion.
const IGNORED_FIELDS: &[&str] = &[
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
];

/// Why a request or response may not be cached.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Uncacheable {
    #[error("the request is not a Chat Completions request: {0}")]
    Invalid(String),
    #[error("the last message is not a user message, so there is no question to key on")]
    LastNotUser,
    #[error("the last user message has non-text content ({0}); only text is cached")]
    NonText(String),
    #[error("the last user message has no text")]
    EmptyPrompt,
    #[error("the request samples ({0}); set allowSampled on the cache to cache it")]
    Sampled(String),
    #[error("the response is an error")]
    ErrorResponse,
    #[error("the response is incomplete: {0}")]
    Incomplete(String),
    #[error("the response is a refusal")]
    Refusal,
}

impl Uncacheable {
    /// Short token for the `x-semcache-bypass` header.
    pub fn code(&self) -> &'static str {
        match self {
            Uncacheable::Invalid(_) => "invalid",
            Uncacheable::LastNotUser => "last-not-user",
            Uncacheable::NonText(_) => "non-text",
            Uncacheable::EmptyPrompt => "empty-prompt",
            Uncacheable::Sampled(_) => "sampled",
            Uncacheable::ErrorResponse => "error-response",
            Uncacheable::Incomplete(_) => "incomplete",
            Uncacheable::Refusal => "refusal",
        }
    }
}

/// What a chat request contributes to a lookup.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatKey {
    /// The last user message's text.
    pub prompt: String,
    /// Hex sha256 of everything else that changes the answer.
    pub fingerprint: String,
}

/// A chat request as an object, its messages, and the text of its last message.
type Parsed<'a> = (&'a Map<String, Value>, &'a Vec<Value>, String);

/// A chat request's messages and the text of its last message, which must be the
/// user's (what caching, routing and guards look at).
fn last_user(request: &Value) -> Result<Parsed<'_>, Uncacheable> {
    let object = request
        .as_object()
        .ok_or_else(|| Uncacheable::Invalid("the body must be a JSON object".into()))?;
    let messages = object
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| Uncacheable::Invalid("`messages` must be a non-empty array".into()))?;
    let last = messages
        .last()
        .and_then(Value::as_object)
        .ok_or_else(|| Uncacheable::Invalid("every message must be an object".into()))?;
    if last.get("role").and_then(Value::as_str) != Some("user") {
        return Err(Uncacheable::LastNotUser);
    }
    let prompt = text_of(last.get("content"))?;
    if prompt.trim().is_empty() {
        return Err(Uncacheable::EmptyPrompt);
    }
    Ok((object, messages, prompt))
}

/// The last user message of a chat request (`{"messages": [...]}`).
pub fn last_user_message(request: &Value) -> Result<String, Uncacheable> {
    last_user(request).map(|(_, _, prompt)| prompt)
}

/// The text of every user message, in order: what guards check. Every part that carries
/// text counts, whatever its type, so that no shape of content slips past a guard;
/// images and other parts without text are skipped.
pub fn user_texts(request: &Value) -> Vec<String> {
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return Vec::new();
    };
    messages
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .filter_map(|m| {
            let text = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => String::new(),
            };
            (!text.trim().is_empty()).then_some(text)
        })
        .collect()
}

/// Derives the cache key; `allow_sampled` is the cache's setting.
pub fn key(request: &Value, allow_sampled: bool) -> Result<ChatKey, Uncacheable> {
    let (object, messages, prompt) = last_user(request)?;
    if !allow_sampled {
        if let Some(reason) = sampling(object) {
            return Err(Uncacheable::Sampled(reason));
        }
    }

    // The scope: the request without the ignored fields and without the last
    // message's content (its other fields, e.g. `name`, stay in).
    let mut scope = Map::new();
    for (k, v) in object {
        if !IGNORED_FIELDS.contains(&k.as_str()) {
            scope.insert(k.clone(), v.clone());
        }
    }
    let mut history = messages.clone();
    if let Some(Value::Object(last)) = history.last_mut() {
        last.remove("content");
    }
    scope.insert("messages".into(), Value::Array(history));
    let mut canonical = String::new();
    write_canonical(&Value::Object(scope), &mut canonical);
    Ok(ChatKey {
        prompt,
        fingerprint: hex::encode(Sha256::digest(canonical.as_bytes())),
    })
}

/// Why a request samples, if it does. An absent temperature is the API default, 1.
fn sampling(request: &Map<String, Value>) -> Option<String> {
    let temperature = request
        .get("temperature")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    if temperature > 0.0 {
        return Some(format!("temperature {temperature}"));
    }
    let n = request.get("n").and_then(Value::as_u64).unwrap_or(1);
    if n > 1 {
        return Some(format!("n = {n}"));
    }
    None
}

fn text_of(content: Option<&Value>) -> Result<String, Uncacheable> {
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::new();
            for part in parts {
                let kind = part
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown");
                match (kind, part.get("text").and_then(Value::as_str)) {
                    ("text", Some(text)) => texts.push(text),
                    _ => return Err(Uncacheable::NonText(kind.to_string())),
                }
            }
            Ok(texts.join("\n"))
        }
        None | Some(Value::Null) => Err(Uncacheable::EmptyPrompt),
        Some(_) => Err(Uncacheable::Invalid(
            "message content must be a string or an array of parts".into(),
        )),
    }
}

/// Checks that a completion is complete, successful and not a refusal.
pub fn check_response(response: &Value) -> Result<(), Uncacheable> {
    let object = response
        .as_object()
        .ok_or_else(|| Uncacheable::Invalid("the response must be a JSON object".into()))?;
    if object.get("error").is_some_and(|e| !e.is_null()) {
        return Err(Uncacheable::ErrorResponse);
    }
    if object.get("object").and_then(Value::as_str) == Some("chat.completion.chunk") {
        return Err(Uncacheable::Incomplete(
            "a stream chunk, not an assembled completion".into(),
        ));
    }
    let choices = object
        .get("choices")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| Uncacheable::Incomplete("no choices".into()))?;
    for choice in choices {
        match choice.get("finish_reason").and_then(Value::as_str) {
            Some("stop") | Some("tool_calls") => {}
            Some(other) => return Err(Uncacheable::Incomplete(format!("finish_reason {other}"))),
            None => return Err(Uncacheable::Incomplete("no finish_reason".into())),
        }
        let refusal = choice.pointer("/message/refusal");
        if refusal.is_some_and(|r| r.as_str().is_some_and(|s| !s.is_empty())) {
            return Err(Uncacheable::Refusal);
        }
    }
    Ok(())
}

/// JSON with object keys sorted, whatever order they arrived in.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                write_canonical(&map[*k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The text of an answer as stored: a chat completion's message contents, else the
/// stored text itself (LangCache entries store plain answers).
pub fn answer_text(response: &str) -> std::borrow::Cow<'_, str> {
    let Ok(Value::Object(completion)) = serde_json::from_str::<Value>(response) else {
        return response.into();
    };
    let Some(Value::Array(choices)) = completion.get("choices") else {
        return response.into();
    };
    let contents: Vec<&str> = choices
        .iter()
        .filter_map(|c| c.pointer("/message/content").and_then(Value::as_str))
        .collect();
    if contents.is_empty() {
        response.into()
    } else {
        contents.join("\n").into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model": "gpt-4o", "temperature": 0, "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"}
        ]})
    }

    #[test]
    fn the_last_user_message_is_the_key_and_the_rest_is_scope() {
        let k = key(&base(), false).unwrap();
        assert_eq!(k.prompt, "What is the capital of France?");
        let mut other_question = base();
        other_question["messages"][1]["content"] = json!("Name France's capital");
        assert_eq!(
            key(&other_question, false).unwrap().fingerprint,
            k.fingerprint
        );
        for (field, value) in [
            ("model", json!("gpt-4o-mini")),
            ("max_tokens", json!(5)),
            ("seed", json!(1)),
            ("top_p", json!(0.5)),
            (
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            ("tool_choice", json!("none")),
            ("response_format", json!({"type": "json_object"})),
        ] {
            let mut changed = base();
            changed[field] = value;
            assert_ne!(
                key(&changed, false).unwrap().fingerprint,
                k.fingerprint,
                "{field}"
            );
        }
        let mut system = base();
        system["messages"][0]["content"] = json!("You are verbose.");
        assert_ne!(key(&system, false).unwrap().fingerprint, k.fingerprint);
        // Streaming and user ids do not change the answer.
        let mut streamed = base();
        streamed["stream"] = json!(true);
        streamed["user"] = json!("u1");
        assert_eq!(key(&streamed, false).unwrap().fingerprint, k.fingerprint);
    }

    #[test]
    fn key_order_does_not_matter() {
        let a: Value = serde_json::from_str(
            r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let b: Value = serde_json::from_str(
            r#"{"messages":[{"content":"hi","role":"user"}],"temperature":0,"model":"m"}"#,
        )
        .unwrap();
        assert_eq!(key(&a, false).unwrap(), key(&b, false).unwrap());
    }

    #[test]
    fn earlier_turns_scope_the_same_question() {
        let convo = |topic: &str| {
            json!({"model": "m", "temperature": 0, "messages": [
                {"role": "user", "content": format!("Tell me about {topic}")},
                {"role": "assistant", "content": format!("{topic} is a city.")},
                {"role": "user", "content": "How many people live there?"}
            ]})
        };
        let paris = key(&convo("Paris"), false).unwrap();
        let tokyo = key(&convo("Tokyo"), false).unwrap();
        assert_eq!(paris.prompt, tokyo.prompt);
        assert_ne!(paris.fingerprint, tokyo.fingerprint);
    }

    #[test]
    fn uncacheable_requests() {
        let mut sampled = base();
        sampled.as_object_mut().unwrap().remove("temperature");
        assert!(matches!(key(&sampled, false), Err(Uncacheable::Sampled(_))));
        assert!(key(&sampled, true).is_ok());
        let mut n = base();
        n["n"] = json!(2);
        assert!(matches!(key(&n, false), Err(Uncacheable::Sampled(_))));
        let mut image = base();
        image["messages"][1]["content"] = json!([{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "x"}}]);
        assert!(matches!(key(&image, false), Err(Uncacheable::NonText(_))));
        let mut parts = base();
        parts["messages"][1]["content"] = json!([{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]);
        assert_eq!(
            key(&parts, false).unwrap().prompt,
            "What is the capital\nof France?"
        );
        let mut tool_last = base();
        tool_last["messages"] = json!([{"role": "user", "content": "x"}, {"role": "tool", "content": "42", "tool_call_id": "1"}]);
        assert_eq!(key(&tool_last, false), Err(Uncacheable::LastNotUser));
        assert!(matches!(
            key(&json!({"model": "m"}), false),
            Err(Uncacheable::Invalid(_))
        ));
    }

    #[test]
    fn responses_must_be_complete_successes() {
        let ok = json!({"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Paris"}}]});
        assert!(check_response(&ok).is_ok());
        let mut truncated = ok.clone();
        truncated["choices"][0]["finish_reason"] = json!("length");
        assert!(matches!(
            check_response(&truncated),
            Err(Uncacheable::Incomplete(_))
        ));
        let mut filtered = ok.clone();
        filtered["choices"][0]["finish_reason"] = json!("content_filter");
        assert!(check_response(&filtered).is_err());
        let mut refusal = ok.clone();
        refusal["choices"][0]["message"]["refusal"] = json!("I can't help with that.");
        assert_eq!(check_response(&refusal), Err(Uncacheable::Refusal));
        assert_eq!(
            check_response(&json!({"error": {"message": "rate limited"}})),
            Err(Uncacheable::ErrorResponse)
        );
        assert!(
            check_response(&json!({"object": "chat.completion.chunk", "choices": []})).is_err()
        );
        assert!(check_response(&json!({"choices": []})).is_err());
    }
}
