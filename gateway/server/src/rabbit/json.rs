//! AMQP field tables to and from JSON as RabbitMQ's management API writes and reads
//! them, and the list query parameters it takes (`columns`, `sort`, `name`, paging).

use amq_protocol::types::{AMQPValue, FieldArray, FieldTable};
use serde_json::{json, Map, Value};

/// A field table as JSON (RabbitMQ's `arguments`).
pub(crate) fn table(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), value(v)))
            .collect(),
    )
}

/// Field-table bytes (as the router keeps arguments) as JSON; `{}` when empty or
/// unreadable.
pub(crate) fn table_bytes(b: &[u8]) -> Value {
    if b.is_empty() {
        return json!({});
    }
    match amq_protocol::types::parsing::parse_field_table(b) {
        Ok((_, t)) => table(&t),
        Err(_) => json!({}),
    }
}

fn value(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(d.value as f64 / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table(t),
        AMQPValue::ByteArray(b) => json!(String::from_utf8_lossy(b.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

/// JSON `arguments` as a field table: integers as long-longs, as RabbitMQ converts them.
pub(crate) fn to_table(v: &Value) -> Result<FieldTable, String> {
    let mut t = FieldTable::default();
    match v {
        Value::Null => {}
        Value::Object(m) => {
            for (k, v) in m {
                t.insert(k.as_str().into(), to_value(v)?);
            }
        }
        _ => return Err("arguments must be an object".into()),
    }
    Ok(t)
}

fn to_value(v: &Value) -> Result<AMQPValue, String> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AMQPValue::LongString(s.as_str().into()),
        Value::Array(a) => {
            let mut arr = FieldArray::default();
            for x in a {
                arr.push(to_value(x)?);
            }
            AMQPValue::FieldArray(arr)
        }
        Value::Object(_) => AMQPValue::FieldTable(to_table(v)?),
    })
}

/// The list parameters RabbitMQ's management API takes.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct ListQuery {
    pub(crate) columns: Option<String>,
    pub(crate) sort: Option<String>,
    pub(crate) sort_reverse: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) use_regex: Option<String>,
    pub(crate) page: Option<String>,
    pub(crate) page_size: Option<String>,
}

/// The value at a dotted path (`message_stats.publish_details.rate`).
fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn order(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .unwrap_or(Ordering::Equal),
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        _ => Ordering::Equal,
    }
}

/// Keep only `columns` (dotted paths; the nesting is kept, missing ones stay missing).
fn project(v: &Value, columns: &[&str]) -> Value {
    let mut out = Map::new();
    for c in columns {
        if let Some(x) = at(v, c) {
            put(&mut out, &c.split('.').collect::<Vec<_>>(), x.clone());
        }
    }
    Value::Object(out)
}

fn put(m: &mut Map<String, Value>, path: &[&str], x: Value) {
    match path {
        [] => {}
        [last] => {
            m.insert((*last).to_owned(), x);
        }
        [first, rest @ ..] => {
            let e = m
                .entry((*first).to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(inner) = e {
                put(inner, rest, x);
            }
        }
    }
}

/// Sort, page, filter and project a list as RabbitMQ 3.10 does. A `page` answers with
/// its envelope (`items`, `page`, `page_count`, `page_size`, `filtered_count`,
/// `item_count`, `total_count`) and applies `name` (a case-insensitive substring, or a
/// regex with `use_regex=true`); without it the bare array, unfiltered. Errors are
/// (error, reason) as RabbitMQ names them.
pub(crate) fn list(mut items: Vec<Value>, q: &ListQuery) -> Result<Value, (&'static str, String)> {
    if let Some(sort) = q.sort.as_deref().filter(|s| !s.is_empty()) {
        items.sort_by(|a, b| order(at(a, sort), at(b, sort)));
    }
    if q.sort_reverse.as_deref() == Some("true") {
        items.reverse();
    }
    let columns: Option<Vec<&str>> = q.columns.as_deref().map(|c| {
        c.split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect()
    });
    let shape = |v: Vec<Value>| -> Vec<Value> {
        match &columns {
            Some(c) => v.iter().map(|x| project(x, c)).collect(),
            None => v,
        }
    };
    let Some(page) = q.page.as_deref() else {
        return Ok(Value::Array(shape(items)));
    };
    let page: usize = page.parse().map_err(|_| {
        (
            "bad_request",
            format!("page must be a number, not {page:?}"),
        )
    })?;
    let size = match q.page_size.as_deref() {
        None => 100,
        Some(p) => p.parse().map_err(|_| {
            (
                "bad_request",
                format!("page_size must be a number, not {p:?}"),
            )
        })?,
    };
    if page == 0 || size == 0 || size > 500 {
        return Err((
            "invalid_pagination_parameters",
            "page must be at least 1 and page_size from 1 to 500".into(),
        ));
    }
    let total = items.len();
    if let Some(name) = q.name.as_deref().filter(|n| !n.is_empty()) {
        if q.use_regex.as_deref() == Some("true") {
            let re = regex::RegexBuilder::new(name)
                .case_insensitive(true)
                .build()
                .map_err(|e| ("bad_request", format!("bad name regex: {e}")))?;
            items.retain(|v| v["name"].as_str().is_some_and(|n| re.is_match(n)));
        } else {
            let needle = name.to_lowercase();
            items.retain(|v| {
                v["name"]
                    .as_str()
                    .is_some_and(|n| n.to_lowercase().contains(&needle))
            });
        }
    }
    let filtered = items.len();
    let page_count = filtered.div_ceil(size);
    if page > page_count.max(1) {
        return Err((
            "page_out_of_range",
            format!("page {page} is past the last page {page_count}"),
        ));
    }
    let slice: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * size)
        .take(size)
        .collect();
    let count = slice.len();
    Ok(json!({
        "filtered_count": filtered,
        "item_count": count,
        "items": shape(slice),
        "page": page,
        "page_count": page_count,
        "page_size": size,
        "total_count": total,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip() {
        let v = json!({"x-max-length": 10, "x-queue-type": "classic", "ok": true, "f": 1.5,
                       "list": [1, "a"], "nested": {"a": 1}});
        assert_eq!(table(&to_table(&v).unwrap()), v);
        assert!(to_table(&json!([1])).is_err());
    }

    #[test]
    fn pages_sorts_and_projects() {
        let items: Vec<Value> = (0..5)
            .map(|i| json!({"name": format!("q{i}"), "messages": 10 - i, "message_stats": {"publish": i}}))
            .collect();
        let q = ListQuery {
            sort: Some("messages".into()),
            page: Some("2".into()),
            page_size: Some("2".into()),
            columns: Some("name,message_stats.publish".into()),
            ..Default::default()
        };
        let v = list(items.clone(), &q).unwrap();
        assert_eq!(v["page_count"], 3);
        assert_eq!(v["filtered_count"], 5);
        assert_eq!(
            v["items"],
            json!([{"name": "q2", "message_stats": {"publish": 2}},
                                      {"name": "q1", "message_stats": {"publish": 1}}])
        );
        let q = ListQuery {
            name: Some("^Q[34]$".into()),
            use_regex: Some("true".into()),
            page: Some("1".into()),
            ..Default::default()
        };
        assert_eq!(
            list(items.clone(), &q).unwrap()["items"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        // Without a page, name filters nothing (as RabbitMQ 3.10).
        let q = ListQuery {
            name: Some("q3".into()),
            ..Default::default()
        };
        assert_eq!(list(items, &q).unwrap().as_array().unwrap().len(), 5);
    }
}
