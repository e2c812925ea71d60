//! Qdrant's payload filters: parsed once from their JSON into [`Filter`], then checked
//! against each candidate point.
//!
//! Parsing is by hand rather than by serde's untagged enums so that a malformed filter
//! gets an error naming what is wrong (`match` without `value`/`any`/`except`, …).

use std::collections::HashSet;

use serde_json::{Map, Value};

use crate::store::PointId;

/// `must` (all), `should` (at least one, when any are given), `must_not` (none).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub must: Vec<Condition>,
    pub should: Vec<Condition>,
    pub must_not: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    Match {
        key: Vec<String>,
        matcher: Matcher,
    },
    Range {
        key: Vec<String>,
        range: Range,
    },
    IsEmpty(Vec<String>),
    IsNull(Vec<String>),
    HasId(HashSet<PointId>),
    /// Every condition of the inner filter holds for one element of the array at `key`.
    Nested {
        key: Vec<String>,
        filter: Filter,
    },
    Filter(Filter),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Matcher {
    Value(Value),
    Any(Vec<Value>),
    Except(Vec<Value>),
    /// Full-text match without an index: the value contains the text.
    Text(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Range {
    pub gt: Option<f64>,
    pub gte: Option<f64>,
    pub lt: Option<f64>,
    pub lte: Option<f64>,
}

/// Parses a point id as Qdrant writes it: an unsigned integer or a UUID string.
pub fn parse_point_id(value: &Value) -> Result<PointId, String> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .map(PointId::Num)
            .ok_or_else(|| format!("point id {n} is not an unsigned integer")),
        Value::String(s) => uuid::Uuid::parse_str(s)
            .map(|u| PointId::Uuid(*u.as_bytes()))
            .map_err(|_| format!("point id {s:?} is neither an unsigned integer nor a UUID")),
        other => Err(format!(
            "point id {other} is neither an unsigned integer nor a UUID"
        )),
    }
}

/// A point id as Qdrant returns it.
pub fn point_id_json(id: &PointId) -> Value {
    match id {
        PointId::Num(n) => Value::from(*n),
        PointId::Uuid(u) => Value::from(uuid::Uuid::from_bytes(*u).hyphenated().to_string()),
    }
}

const MAX_DEPTH: usize = 16;

impl Filter {
    pub fn parse(value: &Value) -> Result<Self, String> {
        parse_filter(value, 0)
    }

    /// Whether the point passes.
    pub fn matches(&self, id: &PointId, payload: &Map<String, Value>) -> bool {
        self.check(&|c: &Condition| c.holds(id, payload))
    }

    fn check(&self, holds: &dyn Fn(&Condition) -> bool) -> bool {
        self.must.iter().all(holds)
            && (self.should.is_empty() || self.should.iter().any(holds))
            && !self.must_not.iter().any(holds)
    }

    pub fn is_empty(&self) -> bool {
        self.must.is_empty() && self.should.is_empty() && self.must_not.is_empty()
    }
}

fn parse_filter(value: &Value, depth: usize) -> Result<Filter, String> {
    if depth > MAX_DEPTH {
        return Err(format!("filter nested deeper than {MAX_DEPTH} levels"));
    }
    let Value::Object(map) = value else {
        return Err(format!("a filter is an object, not {value}"));
    };
    let mut filter = Filter::default();
    for (name, part) in map {
        let list = match name.as_str() {
            "must" => &mut filter.must,
            "should" => &mut filter.should,
            "must_not" => &mut filter.must_not,
            "min_should" if part.is_null() => continue,
            "min_should" => return Err("`min_should` is not supported".into()),
            other => {
                return Err(format!(
                    "unknown filter clause `{other}` (expected must, should, must_not)"
                ))
            }
        };
        match part {
            Value::Null => {}
            Value::Array(items) => {
                for item in items {
                    list.push(parse_condition(item, depth + 1)?);
                }
            }
            single => list.push(parse_condition(single, depth + 1)?),
        }
    }
    Ok(filter)
}

fn parse_key(value: Option<&Value>) -> Result<Vec<String>, String> {
    let key = value
        .and_then(Value::as_str)
        .ok_or("a condition needs a string `key`")?;
    if key.is_empty() {
        return Err("a condition's `key` is empty".into());
    }
    Ok(key_path(key))
}

/// A dotted payload key as path segments. `a.b[].c`: arrays are searched wherever they
/// occur, so `[]` adds nothing.
pub(crate) fn key_path(key: &str) -> Vec<String> {
    key.split('.')
        .map(|s| s.trim_end_matches("[]").to_string())
        .collect()
}

fn parse_condition(value: &Value, depth: usize) -> Result<Condition, String> {
    let Value::Object(map) = value else {
        return Err(format!("a condition is an object, not {value}"));
    };
    if let Some(ids) = map.get("has_id") {
        let ids = ids.as_array().ok_or("`has_id` takes a list of point ids")?;
        return Ok(Condition::HasId(
            ids.iter().map(parse_point_id).collect::<Result<_, _>>()?,
        ));
    }
    if let Some(inner) = map.get("is_empty") {
        return Ok(Condition::IsEmpty(parse_key(inner.get("key"))?));
    }
    if let Some(inner) = map.get("is_null") {
        return Ok(Condition::IsNull(parse_key(inner.get("key"))?));
    }
    if let Some(inner) = map.get("nested") {
        let key = parse_key(inner.get("key"))?;
        let filter = parse_filter(
            inner.get("filter").ok_or("`nested` needs a `filter`")?,
            depth + 1,
        )?;
        return Ok(Condition::Nested { key, filter });
    }
    if map.contains_key("key") {
        let key = parse_key(map.get("key"))?;
        if let Some(m) = map.get("match").filter(|m| !m.is_null()) {
            return Ok(Condition::Match {
                key,
                matcher: parse_match(m)?,
            });
        }
        if let Some(r) = map.get("range").filter(|r| !r.is_null()) {
            return Ok(Condition::Range {
                key,
                range: parse_range(r)?,
            });
        }
        for unsupported in [
            "geo_bounding_box",
            "geo_radius",
            "geo_polygon",
            "values_count",
            "datetime_range",
        ] {
            if map.get(unsupported).is_some_and(|v| !v.is_null()) {
                return Err(format!("`{unsupported}` conditions are not supported"));
            }
        }
        return Err("a field condition needs `match` or `range`".into());
    }
    if ["must", "should", "must_not"]
        .iter()
        .any(|k| map.contains_key(*k))
    {
        return Ok(Condition::Filter(parse_filter(value, depth + 1)?));
    }
    Err(format!("unknown condition {value}"))
}

fn match_value(value: &Value) -> Result<Value, String> {
    match value {
        Value::String(_) | Value::Bool(_) => Ok(value.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(value.clone()),
        other => Err(format!(
            "a match value is a string, an integer or a boolean, not {other}"
        )),
    }
}

fn match_list(value: &Value, what: &str) -> Result<Vec<Value>, String> {
    value
        .as_array()
        .ok_or_else(|| format!("`{what}` takes a list"))?
        .iter()
        .map(match_value)
        .collect()
}

fn parse_match(value: &Value) -> Result<Matcher, String> {
    let Value::Object(map) = value else {
        return Err("`match` is an object".into());
    };
    if let Some(v) = map.get("value") {
        return Ok(Matcher::Value(match_value(v)?));
    }
    if let Some(v) = map.get("any") {
        return Ok(Matcher::Any(match_list(v, "any")?));
    }
    if let Some(v) = map.get("except") {
        return Ok(Matcher::Except(match_list(v, "except")?));
    }
    if let Some(v) = map.get("text") {
        let text = v.as_str().ok_or("`match.text` is a string")?;
        return Ok(Matcher::Text(text.to_string()));
    }
    Err("`match` needs `value`, `any`, `except` or `text`".into())
}

fn parse_range(value: &Value) -> Result<Range, String> {
    let Value::Object(map) = value else {
        return Err("`range` is an object".into());
    };
    let mut range = Range::default();
    for (name, bound) in map {
        if bound.is_null() {
            continue;
        }
        let bound = bound
            .as_f64()
            .ok_or_else(|| format!("range bound `{name}` is not a number"))?;
        match name.as_str() {
            "gt" => range.gt = Some(bound),
            "gte" => range.gte = Some(bound),
            "lt" => range.lt = Some(bound),
            "lte" => range.lte = Some(bound),
            other => return Err(format!("unknown range bound `{other}`")),
        }
    }
    Ok(range)
}

/// The values at `path`, arrays flattened at every level (as Qdrant reads `a.b`).
pub(crate) fn values_at<'a>(payload: &'a Map<String, Value>, path: &[String]) -> Vec<&'a Value> {
    let mut current: Vec<&Value> = match payload.get(&path[0]) {
        Some(v) => vec![v],
        None => return Vec::new(),
    };
    for part in &path[1..] {
        let mut next = Vec::new();
        for value in current {
            match value {
                Value::Object(map) => next.extend(map.get(part)),
                Value::Array(items) => next.extend(
                    items
                        .iter()
                        .filter_map(|item| item.as_object().and_then(|m| m.get(part))),
                ),
                _ => {}
            }
        }
        current = next;
    }
    let mut leaves = Vec::new();
    for value in current {
        match value {
            Value::Array(items) => leaves.extend(items.iter()),
            other => leaves.push(other),
        }
    }
    leaves
}

/// Whether any value at `path` (as [`values_at`] finds them) satisfies `pred`, without
/// collecting them: filters run once per candidate point, so this is the hot loop.
fn any_at(
    payload: &Map<String, Value>,
    path: &[String],
    pred: &mut dyn FnMut(&Value) -> bool,
) -> bool {
    payload
        .get(&path[0])
        .is_some_and(|v| any_in(v, &path[1..], pred))
}

fn any_in(value: &Value, rest: &[String], pred: &mut dyn FnMut(&Value) -> bool) -> bool {
    match rest.split_first() {
        None => match value {
            Value::Array(items) => items.iter().any(&mut *pred),
            other => pred(other),
        },
        Some((part, tail)) => match value {
            Value::Object(map) => map.get(part).is_some_and(|v| any_in(v, tail, pred)),
            Value::Array(items) => items.iter().any(|item| {
                item.as_object()
                    .and_then(|m| m.get(part))
                    .is_some_and(|v| any_in(v, tail, pred))
            }),
            _ => false,
        },
    }
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_u64().is_some() && x.as_u64() == y.as_u64(),
        },
        _ => a == b,
    }
}

impl Range {
    fn holds(&self, x: f64) -> bool {
        self.gt.is_none_or(|b| x > b)
            && self.gte.is_none_or(|b| x >= b)
            && self.lt.is_none_or(|b| x < b)
            && self.lte.is_none_or(|b| x <= b)
    }
}

impl Condition {
    fn holds(&self, id: &PointId, payload: &Map<String, Value>) -> bool {
        match self {
            Condition::Match { key, matcher } => match matcher {
                Matcher::Value(v) => any_at(payload, key, &mut |x| same(x, v)),
                Matcher::Any(list) => {
                    any_at(payload, key, &mut |x| list.iter().any(|v| same(x, v)))
                }
                // Qdrant: true when some value is outside the list (a point without the key
                // has no such value).
                Matcher::Except(list) => any_at(payload, key, &mut |x| {
                    !x.is_null() && !list.iter().any(|v| same(x, v))
                }),
                Matcher::Text(text) => any_at(payload, key, &mut |x| {
                    x.as_str().is_some_and(|s| s.contains(text.as_str()))
                }),
            },
            Condition::Range { key, range } => any_at(payload, key, &mut |x| {
                x.as_f64().is_some_and(|x| range.holds(x))
            }),
            Condition::IsEmpty(key) => !any_at(payload, key, &mut |v| !v.is_null()),
            Condition::IsNull(key) => {
                let values = values_at(payload, key);
                !values.is_empty() && values.iter().all(|v| v.is_null())
                    || is_explicit_null(payload, key)
            }
            Condition::HasId(ids) => ids.contains(id),
            Condition::Nested { key, filter } => nested_elements(payload, key)
                .into_iter()
                .any(|element| filter.check(&|c: &Condition| c.holds(id, element))),
            Condition::Filter(filter) => filter.matches(id, payload),
        }
    }
}

/// `key` is present and `null` (not merely missing, and not an empty array).
fn is_explicit_null(payload: &Map<String, Value>, key: &[String]) -> bool {
    let (last, parents) = key.split_last().unwrap_or((&key[0], &[]));
    let mut map = payload;
    for part in parents {
        match map.get(part) {
            Some(Value::Object(inner)) => map = inner,
            _ => return false,
        }
    }
    matches!(map.get(last), Some(Value::Null))
}

/// The objects of the array at `key`, each checked as its own payload.
fn nested_elements<'a>(
    payload: &'a Map<String, Value>,
    key: &[String],
) -> Vec<&'a Map<String, Value>> {
    values_at(payload, key)
        .into_iter()
        .filter_map(Value::as_object)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn payload(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn check(filter: Value, p: Value) -> bool {
        Filter::parse(&filter)
            .unwrap()
            .matches(&PointId::Num(1), &payload(p))
    }

    #[test]
    fn conditions_match_as_qdrant_documents_them() {
        let p = json!({"city": "London", "n": 3, "tags": ["a", "b"], "nested": {"k": "x"},
                       "opt": null, "empty": [], "items": [{"c": "red", "n": 1}, {"c": "blue", "n": 2}]});
        assert!(check(
            json!({"must": [{"key": "city", "match": {"value": "London"}}]}),
            p.clone()
        ));
        assert!(!check(
            json!({"must": [{"key": "city", "match": {"value": "Paris"}}]}),
            p.clone()
        ));
        assert!(check(
            json!({"must": {"key": "tags", "match": {"value": "b"}}}),
            p.clone()
        ));
        assert!(check(
            json!({"must": [{"key": "nested.k", "match": {"any": ["x", "y"]}}]}),
            p.clone()
        ));
        assert!(check(
            json!({"must": [{"key": "city", "match": {"except": ["Paris"]}}]}),
            p.clone()
        ));
        assert!(!check(
            json!({"must": [{"key": "missing", "match": {"except": ["Paris"]}}]}),
            p.clone()
        ));
        assert!(check(
            json!({"must": [{"key": "n", "range": {"gte": 3, "lt": 4}}]}),
            p.clone()
        ));
        assert!(!check(
            json!({"must": [{"key": "n", "range": {"gt": 3}}]}),
            p.clone()
        ));
        assert!(check(
            json!({"must": [{"is_empty": {"key": "empty"}}, {"is_empty": {"key": "missing"}}, {"is_empty": {"key": "opt"}}]}),
            p.clone()
        ));
        assert!(!check(
            json!({"must": [{"is_empty": {"key": "city"}}]}),
            p.clone()
        ));
        assert!(check(
            json!({"must": [{"is_null": {"key": "opt"}}]}),
            p.clone()
        ));
        assert!(!check(
            json!({"must": [{"is_null": {"key": "missing"}}]}),
            p.clone()
        ));
        assert!(!check(
            json!({"must": [{"is_null": {"key": "empty"}}]}),
            p.clone()
        ));
        assert!(check(json!({"must": [{"has_id": [1, 5]}]}), p.clone()));
        assert!(!check(json!({"must_not": [{"has_id": [1]}]}), p.clone()));
        assert!(check(
            json!({"should": [{"key": "city", "match": {"value": "Paris"}}, {"key": "n", "match": {"value": 3}}]}),
            p.clone()
        ));
        assert!(!check(
            json!({"should": [{"key": "city", "match": {"value": "Paris"}}]}),
            p.clone()
        ));
        // Nested: both conditions must hold for the same element.
        assert!(check(
            json!({"must": [{"nested": {"key": "items", "filter": {"must": [
            {"key": "c", "match": {"value": "red"}}, {"key": "n", "match": {"value": 1}}]}}}]}),
            p.clone()
        ));
        assert!(!check(
            json!({"must": [{"nested": {"key": "items", "filter": {"must": [
            {"key": "c", "match": {"value": "red"}}, {"key": "n", "match": {"value": 2}}]}}}]}),
            p.clone()
        ));
        // A filter as a condition.
        assert!(check(
            json!({"must_not": [{"must": [{"key": "city", "match": {"value": "Paris"}}]}]}),
            p
        ));
    }

    #[test]
    fn malformed_filters_say_what_is_wrong() {
        for (filter, says) in [
            (
                json!({"must": [{"key": "x", "match": {"nope": 1}}]}),
                "`match` needs",
            ),
            (json!({"must": [{"key": "x"}]}), "needs `match` or `range`"),
            (json!({"maybe": []}), "unknown filter clause"),
            (
                json!({"must": [{"key": "x", "range": {"gt": "a"}}]}),
                "not a number",
            ),
            (
                json!({"must": [{"has_id": [-1]}]}),
                "not an unsigned integer",
            ),
            (
                json!({"must": [{"key": "x", "match": {"value": 1.5}}]}),
                "a match value",
            ),
            (json!([1]), "a filter is an object"),
        ] {
            let err = Filter::parse(&filter).unwrap_err();
            assert!(err.contains(says), "{filter}: {err}");
        }
        let mut deep = json!({"must": []});
        for _ in 0..40 {
            deep = json!({"must": [deep]});
        }
        assert!(Filter::parse(&deep).unwrap_err().contains("deeper"));
    }
}
