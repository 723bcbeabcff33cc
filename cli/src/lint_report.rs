//! What `check-envoy` found, and the small readers it uses on an Envoy bootstrap held as JSON
//! values (shared by every lint module).

use serde_json::Value;

#[derive(Default, Debug)]
pub struct Report {
    pub problems: Vec<String>,
    pub notes: Vec<String>,
    pub listeners: usize,
    pub routes: usize,
}

pub fn arr(v: &Value, k: &str) -> Vec<Value> {
    v.get(k).and_then(Value::as_array).cloned().unwrap_or_default()
}
pub fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}
pub fn b(v: &Value, path: &[&str]) -> Option<bool> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_bool()
}
