//! Property tests over the request parsers, the chat fingerprint, the verifier's
//! tokenizer and the collections' payload filters: arbitrary input never panics, and the
//! fingerprint ignores key order.

use proptest::prelude::*;
use semcache::api::entries::{SearchRequest, SetRequest};
use semcache::api::extract::parse_json;
use semcache::api::Limits;
use semcache::cache::chat;
use semcache::cache::verify::{check, Signature, VerifyRules};
use semcache::collections::Filter;
use semcache::store::PointId;
use serde_json::{json, Map, Value};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn chat_request() -> impl Strategy<Value = Value> {
    (
        "[a-z0-9-]{1,12}",
        prop::collection::vec(("(system|user|assistant|tool)", ".{0,30}"), 1..5),
        prop::option::of(0.0f64..2.0),
        json_value(),
    )
        .prop_map(|(model, turns, temperature, extra)| {
            let mut messages: Vec<Value> = turns
                .into_iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect();
            messages.push(json!({"role": "user", "content": "final question"}));
            let mut req = json!({"model": model, "messages": messages, "extra": extra});
            if let Some(t) = temperature {
                req["temperature"] = json!(t);
            }
            req
        })
}

/// The same JSON with every object's keys in reverse order.
fn reversed(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .rev()
                .map(|(k, v)| (k.clone(), reversed(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(reversed).collect()),
        other => other.clone(),
    }
}

/// Filter-shaped JSON: Qdrant's clauses and conditions with arbitrary values where the
/// grammar has them, and some shapes that are wrong.
fn filter_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("a"),
        Just("b.c"),
        Just("items[].x"),
        Just(""),
        Just("a.")
    ]
    .prop_map(Value::from);
    let condition =
        (key, json_value(), json_value(), 0..9u8).prop_map(|(k, v, w, kind)| match kind {
            0 => json!({"key": k, "match": {"value": v}}),
            1 => json!({"key": k, "match": {"any": [v, w]}}),
            2 => json!({"key": k, "match": {"except": v}}),
            3 => json!({"key": k, "range": {"gt": v, "lte": w}}),
            4 => json!({"is_empty": {"key": k}}),
            5 => json!({"is_null": {"key": k}}),
            6 => json!({"has_id": [v, 7, "00000000-0000-4000-8000-000000000001"]}),
            7 => json!({"key": k, "match": v}),
            _ => v,
        });
    condition.prop_recursive(4, 48, 4, |inner| {
        (prop::collection::vec(inner.clone(), 0..4), inner, 0..5u8).prop_map(|(list, one, kind)| {
            match kind {
                0 => json!({"must": list}),
                1 => json!({"should": list, "must_not": one}),
                2 => json!({"nested": {"key": "items", "filter": {"must": list}}}),
                3 => json!({"must": one}),
                _ => json!({"must_not": list}),
            }
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn request_bodies_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_json::<SearchRequest>(&bytes).map(|r| r.into_query(&Limits::default(), false));
        let _ = parse_json::<SetRequest>(&bytes).map(|r| r.into_entry(&Limits::default()));
    }

    #[test]
    fn json_shaped_bodies_never_panic(body in json_value()) {
        let bytes = serde_json::to_vec(&body).unwrap();
        let _ = parse_json::<SearchRequest>(&bytes).map(|r| r.into_query(&Limits::default(), true));
        let _ = parse_json::<SetRequest>(&bytes).map(|r| r.into_entry(&Limits::default()));
        let _ = chat::key(&body, false);
        let _ = chat::check_response(&body);
    }

    #[test]
    fn filters_never_panic(filter in filter_value(), payload in json_value()) {
        if let (Ok(f), Value::Object(p)) = (Filter::parse(&filter), &payload) {
            let _ = f.matches(&PointId::Num(7), p);
        }
        let items = json!({"a": payload, "b": {"c": 1}, "items": [{"x": 1}, {"x": "y"}]});
        if let Ok(f) = Filter::parse(&filter) {
            let _ = f.matches(&PointId::Num(7), items.as_object().unwrap());
        }
    }

    #[test]
    fn fingerprints_ignore_key_order(req in chat_request()) {
        let a = chat::key(&req, true);
        let b = chat::key(&reversed(&req), true);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn the_verifier_never_panics(a in "\\PC{0,80}", b in "\\PC{0,80}") {
        let (sa, sb) = (Signature::of(&a), Signature::of(&b));
        let _ = check(&VerifyRules::default(), &sa, &sb);
        prop_assert!(check(&VerifyRules::default(), &sa, &Signature::of(&a)).is_ok());
    }
}
