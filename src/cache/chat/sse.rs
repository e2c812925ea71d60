//! Streamed Chat Completions (`text/event-stream` of `chat.completion.chunk` events):
//! assembling a streamed answer into the `chat.completion` we store, and replaying a
//! stored completion as a stream, so either kind of request is served from either kind
//! of answer.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::Uncacheable;

/// Fields a completion and each of its chunks share.
const ENVELOPE: [&str; 5] = [
    "id",
    "created",
    "model",
    "system_fingerprint",
    "service_tier",
];

#[derive(Debug, Default)]
struct ToolCall {
    id: Option<String>,
    kind: Option<String>,
    name: String,
    arguments: String,
}

#[derive(Debug, Default)]
struct Choice {
    role: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: BTreeMap<u64, ToolCall>,
    finish_reason: Option<String>,
}

/// Collects a stream's chunks as they pass; [`Assembler::finish`] gives the completion.
#[derive(Debug, Default)]
pub struct Assembler {
    /// Bytes after the last newline seen: a line split across body chunks.
    partial: Vec<u8>,
    /// `data:` lines of the event being read (an event ends at a blank line).
    event: Vec<String>,
    envelope: Map<String, Value>,
    choices: BTreeMap<u64, Choice>,
    usage: Option<Value>,
    done: bool,
    /// Why the stream cannot be stored, once known.
    spoiled: Option<Uncacheable>,
}

impl Assembler {
    /// Feeds the next bytes of the stream, split anywhere.
    pub fn push(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(at) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=at).collect();
            self.line(&line[..line.len() - 1]);
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch();
            return;
        }
        let Ok(line) = std::str::from_utf8(line) else {
            self.spoil(Uncacheable::Invalid("the stream is not UTF-8".into()));
            return;
        };
        if let Some(data) = line.strip_prefix("data:") {
            self.event
                .push(data.strip_prefix(' ').unwrap_or(data).to_string());
        }
        // Comments (`:`), `event:`, `id:` and `retry:` lines carry no answer.
    }

    fn dispatch(&mut self) {
        if self.event.is_empty() {
            return;
        }
        let data = self.event.join("\n");
        self.event.clear();
        if self.spoiled.is_some() {
            return;
        }
        if data.trim() == "[DONE]" {
            self.done = true;
            return;
        }
        if self.done {
            self.spoil(Uncacheable::Invalid("data after [DONE]".into()));
            return;
        }
        match serde_json::from_str::<Value>(&data) {
            Ok(chunk) => self.chunk(chunk),
            Err(_) => self.spoil(Uncacheable::Invalid("a stream event is not JSON".into())),
        }
    }

    fn spoil(&mut self, why: Uncacheable) {
        if self.spoiled.is_none() {
            self.spoiled = Some(why);
        }
    }

    fn chunk(&mut self, chunk: Value) {
        let Value::Object(mut chunk) = chunk else {
            self.spoil(Uncacheable::Invalid(
                "a stream event is not an object".into(),
            ));
            return;
        };
        if chunk.get("error").is_some_and(|e| !e.is_null()) {
            self.spoil(Uncacheable::ErrorResponse);
            return;
        }
        for field in ENVELOPE {
            if let Some(v) = chunk.remove(field).filter(|v| !v.is_null()) {
                self.envelope.entry(field).or_insert(v);
            }
        }
        if let Some(usage) = chunk.remove("usage").filter(|u| !u.is_null()) {
            self.usage = Some(usage);
        }
        let Some(Value::Array(choices)) = chunk.remove("choices") else {
            return;
        };
        for choice in choices {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let acc = self.choices.entry(index).or_default();
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                acc.finish_reason = Some(reason.to_string());
            }
            let Some(delta) = choice.get("delta") else {
                continue;
            };
            if let Some(role) = delta.get("role").and_then(Value::as_str) {
                acc.role = Some(role.to_string());
            }
            if let Some(text) = delta.get("content").and_then(Value::as_str) {
                acc.content.get_or_insert_with(String::new).push_str(text);
            }
            if let Some(text) = delta.get("refusal").and_then(Value::as_str) {
                acc.refusal.get_or_insert_with(String::new).push_str(text);
            }
            for call in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let i = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                let tool = acc.tool_calls.entry(i).or_default();
                if let Some(id) = call.get("id").and_then(Value::as_str) {
                    tool.id = Some(id.to_string());
                }
                if let Some(kind) = call.get("type").and_then(Value::as_str) {
                    tool.kind = Some(kind.to_string());
                }
                if let Some(f) = call.get("function") {
                    if let Some(name) = f.get("name").and_then(Value::as_str) {
                        tool.name.push_str(name);
                    }
                    if let Some(args) = f.get("arguments").and_then(Value::as_str) {
                        tool.arguments.push_str(args);
                    }
                }
            }
        }
    }

    /// The assembled `chat.completion`, or why the stream cannot be stored (it ended
    /// before `data: [DONE]`, carried an error, or was not a Chat Completions stream).
    pub fn finish(mut self) -> Result<Value, Uncacheable> {
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.line(&rest);
        }
        self.dispatch();
        if let Some(why) = self.spoiled {
            return Err(why);
        }
        if !self.done {
            return Err(Uncacheable::Incomplete(
                "the stream ended before data: [DONE]".into(),
            ));
        }
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(index, c)| {
                let mut message = Map::new();
                message.insert(
                    "role".into(),
                    json!(c.role.unwrap_or_else(|| "assistant".into())),
                );
                message.insert("content".into(), json!(c.content));
                if let Some(refusal) = c.refusal {
                    message.insert("refusal".into(), json!(refusal));
                }
                if !c.tool_calls.is_empty() {
                    let calls: Vec<Value> = c
                        .tool_calls
                        .into_values()
                        .map(|t| {
                            json!({
                                "id": t.id,
                                "type": t.kind.unwrap_or_else(|| "function".into()),
                                "function": {"name": t.name, "arguments": t.arguments},
                            })
                        })
                        .collect();
                    message.insert("tool_calls".into(), Value::Array(calls));
                }
                json!({
                    "index": index,
                    "message": message,
                    "logprobs": null,
                    "finish_reason": c.finish_reason,
                })
            })
            .collect();
        let mut completion = self.envelope;
        completion.insert("object".into(), json!("chat.completion"));
        completion.insert("choices".into(), Value::Array(choices));
        if let Some(usage) = self.usage {
            completion.insert("usage".into(), usage);
        }
        Ok(Value::Object(completion))
    }
}

/// A stored `chat.completion` as the events a streaming client expects: per choice a
/// role chunk, its content (or tool calls) and its finish reason; then, if asked, a
/// usage chunk with no choices; then `data: [DONE]`.
pub fn replay(completion: &Value, include_usage: bool) -> String {
    let mut envelope = Map::new();
    for field in ENVELOPE {
        if let Some(v) = completion.get(field) {
            envelope.insert(field.into(), v.clone());
        }
    }
    envelope.insert("object".into(), json!("chat.completion.chunk"));
    let mut out = String::new();
    let mut emit = |choices: Value, usage: Option<&Value>| {
        let mut chunk = envelope.clone();
        chunk.insert("choices".into(), choices);
        if include_usage {
            chunk.insert("usage".into(), usage.cloned().unwrap_or(Value::Null));
        }
        out.push_str("data: ");
        out.push_str(&Value::Object(chunk).to_string());
        out.push_str("\n\n");
    };
    let choice = |index: &Value, delta: Value, finish: &Value| json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    for c in completion
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let index = c.get("index").cloned().unwrap_or(json!(0));
        let message = c.get("message").cloned().unwrap_or(json!({}));
        let role = message.get("role").cloned().unwrap_or(json!("assistant"));
        // A tool-call-only answer streams `content: null`, as the API does.
        let first = match message.get("content") {
            Some(Value::String(_)) => json!(""),
            _ => Value::Null,
        };
        emit(
            choice(
                &index,
                json!({"role": role, "content": first}),
                &Value::Null,
            ),
            None,
        );
        if let Some(text) = message.get("content").and_then(Value::as_str) {
            if !text.is_empty() {
                emit(choice(&index, json!({"content": text}), &Value::Null), None);
            }
        }
        if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
            let deltas: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, call)| {
                    let mut call = call.clone();
                    if let Value::Object(m) = &mut call {
                        m.insert("index".into(), json!(i));
                    }
                    call
                })
                .collect();
            emit(
                choice(&index, json!({"tool_calls": deltas}), &Value::Null),
                None,
            );
        }
        let finish = c.get("finish_reason").cloned().unwrap_or(json!("stop"));
        emit(choice(&index, json!({}), &finish), None);
    }
    if include_usage {
        emit(json!([]), completion.get("usage"));
    }
    out.push_str("data: [DONE]\n\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::chat::check_response;

    fn stream(events: &[Value]) -> String {
        let mut s: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
        s.push_str("data: [DONE]\n\n");
        s
    }

    fn chunk(delta: Value, finish: Value) -> Value {
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    }

    #[test]
    fn a_stream_split_anywhere_assembles_into_one_completion() {
        let text = stream(&[
            chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            chunk(json!({"content": "Par"}), Value::Null),
            chunk(json!({"content": "is é"}), Value::Null),
            chunk(json!({}), json!("stop")),
            json!({"id": "c1", "choices": [], "usage": {"total_tokens": 9}}),
        ]);
        // Every split point, including inside a multi-byte character.
        for at in 0..text.len() {
            let mut a = Assembler::default();
            a.push(&text.as_bytes()[..at]);
            a.push(&text.as_bytes()[at..]);
            let done = a.finish().unwrap();
            assert_eq!(done["choices"][0]["message"]["content"], "Paris é");
            assert_eq!(done["choices"][0]["finish_reason"], "stop");
            assert_eq!(done["usage"]["total_tokens"], 9);
            assert_eq!(done["object"], "chat.completion");
            assert_eq!(done["id"], "c1");
            check_response(&done).unwrap();
        }
    }

    #[test]
    fn tool_call_deltas_are_joined() {
        let text = stream(&[
            chunk(
                json!({"role": "assistant", "tool_calls": [{"index": 0, "id": "t1", "type": "function", "function": {"name": "get_", "arguments": "{\"ci"}}]}),
                Value::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": "ty\":1}"}}]}),
                Value::Null,
            ),
            chunk(json!({}), json!("tool_calls")),
        ]);
        let mut a = Assembler::default();
        a.push(text.as_bytes());
        let done = a.finish().unwrap();
        let call = &done["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], "{\"city\":1}");
        assert_eq!(call["id"], "t1");
        check_response(&done).unwrap();
        // And it replays as a stream that assembles back to the same completion.
        let mut again = Assembler::default();
        again.push(replay(&done, false).as_bytes());
        assert_eq!(again.finish().unwrap()["choices"], done["choices"]);
    }

    #[test]
    fn incomplete_errored_or_truncated_streams_are_not_stored() {
        let mut cut = Assembler::default();
        cut.push(
            format!(
                "data: {}\n\n",
                chunk(json!({"content": "Par"}), Value::Null)
            )
            .as_bytes(),
        );
        assert!(matches!(cut.finish(), Err(Uncacheable::Incomplete(_))));

        let mut errored = Assembler::default();
        errored.push(stream(&[json!({"error": {"message": "overloaded"}})]).as_bytes());
        assert_eq!(errored.finish(), Err(Uncacheable::ErrorResponse));

        let mut length = Assembler::default();
        length.push(stream(&[chunk(json!({"content": "Par"}), json!("length"))]).as_bytes());
        assert!(check_response(&length.finish().unwrap()).is_err());

        let mut garbage = Assembler::default();
        garbage.push(b"data: {not json\n\ndata: [DONE]\n\n");
        assert!(garbage.finish().is_err());

        let mut binary = Assembler::default();
        binary.push(b"data: \xff\xfe\n\ndata: [DONE]\n\n");
        assert!(binary.finish().is_err());
    }

    #[test]
    fn replay_honours_include_usage() {
        let completion = json!({"id": "c9", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}});
        let with = replay(&completion, true);
        assert!(with.ends_with("data: [DONE]\n\n"));
        let events: Vec<Value> = with
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let last = events.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["total_tokens"], 4);
        assert!(events
            .iter()
            .all(|e| e["object"] == "chat.completion.chunk"));
        assert!(!replay(&completion, false).contains("usage"));
        let mut back = Assembler::default();
        back.push(with.as_bytes());
        let back = back.finish().unwrap();
        assert_eq!(back["choices"][0]["message"]["content"], "Paris");
        assert_eq!(back["usage"], completion["usage"]);
    }
}
