//! A DynamoDB table in memory for the lifecycle's unit tests: it runs the `UpdateItem` and
//! `GetItem` calls the ledger sends, evaluating the part of the expression language the ledger
//! writes (`SET` with `if_not_exists` and `+`, `REMOVE`, conditions with `attribute_exists`,
//! `attribute_not_exists`, `=`, `<=`, `AND`, `OR`, parentheses) against items with numbers,
//! strings and maps, and answers as DynamoDB does: `ALL_NEW` attributes, or a 400
//! `ConditionalCheckFailedException`. An expression it cannot read fails the test. The
//! integration tests run the same calls against dynalite and moto.

use crate::lifecycle::Answer;
use crate::secrets::store::HttpCall;
use crate::wire::json::{self, Value};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    N(i128),
    S(String),
    M(BTreeMap<String, Attr>),
}

pub type Item = BTreeMap<String, Attr>;

#[derive(Default)]
pub struct Table {
    pub items: BTreeMap<String, Item>,
    /// Calls served, by operation.
    pub served: Vec<String>,
    /// Every retry mark any item ever held (a mark is visible to every gateway while it is there).
    pub marks_seen: std::collections::BTreeSet<String>,
}

fn attr(v: &Value) -> Attr {
    let Some([(k, inner)]) = v.as_object() else { panic!("not an attribute value: {v:?}") };
    match (k.as_str(), inner) {
        ("N", Value::Str(s)) => Attr::N(s.parse().unwrap_or_else(|e| panic!("number {s}: {e}"))),
        ("S", Value::Str(s)) => Attr::S(s.clone()),
        ("M", Value::Object(m)) => Attr::M(m.iter().map(|(k, v)| (k.clone(), attr(v))).collect()),
        _ => panic!("an attribute type the ledger never writes: {k}"),
    }
}

fn write(out: &mut String, a: &Attr) {
    match a {
        Attr::N(n) => out.push_str(&format!("{{\"N\":\"{n}\"}}")),
        Attr::S(s) => {
            out.push_str("{\"S\":");
            json::write_str(out, s);
            out.push('}');
        }
        Attr::M(m) => {
            out.push_str("{\"M\":");
            write_map(out, m);
            out.push('}');
        }
    }
}

fn write_map(out: &mut String, m: &BTreeMap<String, Attr>) {
    out.push('{');
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json::write_str(out, k);
        out.push(':');
        write(out, v);
    }
    out.push('}');
}

/// One expression's tokens, with its names and values resolved.
struct Parser<'a> {
    toks: Vec<String>,
    at: usize,
    names: &'a BTreeMap<String, String>,
    values: &'a BTreeMap<String, Attr>,
}

fn tokens(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let cs: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '<' && cs.get(i + 1) == Some(&'=') {
            out.push("<=".into());
            i += 2;
        } else if c == '<' {
            out.push("<".into());
            i += 1;
        } else if "(),.=+".contains(c) {
            out.push(c.to_string());
            i += 1;
        } else {
            let start = i;
            while i < cs.len() && (cs[i].is_alphanumeric() || "#:_".contains(cs[i])) {
                i += 1;
            }
            assert!(i > start, "unreadable expression at {:?}", &s[start..]);
            out.push(cs[start..i].iter().collect());
        }
    }
    out
}

impl Parser<'_> {
    fn peek(&self) -> &str {
        self.toks.get(self.at).map_or("", String::as_str)
    }
    fn next(&mut self) -> String {
        let t = self.peek().to_string();
        self.at += 1;
        t
    }
    fn expect(&mut self, t: &str) {
        let got = self.next();
        assert_eq!(got, t, "expression {:?}", self.toks);
    }
    /// `#a` or `#a.#b`: the attribute names.
    fn path(&mut self) -> Vec<String> {
        let mut p = vec![self.name()];
        while self.peek() == "." {
            self.next();
            p.push(self.name());
        }
        p
    }
    fn name(&mut self) -> String {
        let t = self.next();
        self.names.get(&t).cloned().unwrap_or_else(|| panic!("an undeclared name {t}"))
    }
    fn operand(&mut self, item: &Item) -> Option<Attr> {
        let first = if self.peek() == "if_not_exists" {
            self.next();
            self.expect("(");
            let p = self.path();
            self.expect(",");
            let default = self.operand(item);
            self.expect(")");
            get(item, &p).cloned().or(default)
        } else if self.peek().starts_with(':') {
            let t = self.next();
            Some(self.values.get(&t).cloned().unwrap_or_else(|| panic!("an undeclared value {t}")))
        } else {
            let p = self.path();
            get(item, &p).cloned()
        };
        if self.peek() == "+" {
            self.next();
            let rest = self.operand(item);
            return match (first, rest) {
                (Some(Attr::N(a)), Some(Attr::N(b))) => Some(Attr::N(a + b)),
                _ => None, // DynamoDB: a ValidationException; the ledger never sends one
            };
        }
        first
    }
    fn or(&mut self, item: &Item) -> bool {
        let mut v = self.and(item);
        while self.peek() == "OR" {
            self.next();
            v |= self.and(item);
        }
        v
    }
    fn and(&mut self, item: &Item) -> bool {
        let mut v = self.atom(item);
        while self.peek() == "AND" {
            self.next();
            v &= self.atom(item);
        }
        v
    }
    fn atom(&mut self, item: &Item) -> bool {
        match self.peek() {
            "(" => {
                self.next();
                let v = self.or(item);
                self.expect(")");
                v
            }
            f @ ("attribute_exists" | "attribute_not_exists") => {
                let exists = f == "attribute_exists";
                self.next();
                self.expect("(");
                let p = self.path();
                self.expect(")");
                get(item, &p).is_some() == exists
            }
            _ => {
                let a = self.operand(item);
                let op = self.next();
                let b = self.operand(item);
                match (op.as_str(), a, b) {
                    ("=", Some(a), Some(b)) => a == b,
                    ("<=", Some(Attr::N(a)), Some(Attr::N(b))) => a <= b,
                    ("<", Some(Attr::N(a)), Some(Attr::N(b))) => a < b,
                    ("=" | "<=" | "<", _, _) => false,
                    (o, _, _) => panic!("a comparison the ledger never writes: {o}"),
                }
            }
        }
    }
}

fn get<'a>(item: &'a Item, path: &[String]) -> Option<&'a Attr> {
    let (first, rest) = path.split_first()?;
    let mut at = item.get(first)?;
    for p in rest {
        let Attr::M(m) = at else { return None };
        at = m.get(p)?;
    }
    Some(at)
}

fn set(item: &mut Item, path: &[String], v: Attr) {
    match path {
        [one] => {
            item.insert(one.clone(), v);
        }
        [first, rest @ ..] => {
            if let Some(Attr::M(m)) = item.get_mut(first) {
                set(m, rest, v);
            } else {
                panic!("a nested SET on a map that is not there: {path:?}");
            }
        }
        [] => {}
    }
}

fn remove(item: &mut Item, path: &[String]) {
    if let [one] = path {
        item.remove(one);
    }
}

fn condition_failed() -> Answer {
    Answer {
        status: Some(400),
        body: Some(br#"{"__type":"com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException","message":"The conditional request failed"}"#.to_vec()),
    }
}

impl Table {
    /// Serve one ledger call as DynamoDB would.
    pub fn serve(&mut self, call: &HttpCall) -> Answer {
        let op = call.headers.iter().find(|(k, _)| k == "x-amz-target").and_then(|(_, v)| v.expose_str()).unwrap_or("").to_string();
        let body = json::parse(call.body.as_deref().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
        let pk = body.get("Key").and_then(|k| k.get("pk")).and_then(|p| p.get("S")).and_then(Value::as_str).unwrap_or_else(|| panic!("no key")).to_string();
        let op = op.trim_start_matches("DynamoDB_20120810.").to_string();
        self.served.push(op.clone());
        let answer = self.serve_op(&op, &pk, &body);
        let marks: Vec<String> = self.items.values().flat_map(|i| i.keys().filter(|k| k.starts_with("r_")).cloned()).collect();
        self.marks_seen.extend(marks);
        answer
    }

    fn serve_op(&mut self, op: &str, pk: &str, body: &Value) -> Answer {
        let pk = pk.to_string();
        match op {
            "GetItem" => {
                let mut out = String::from("{");
                if let Some(item) = self.items.get(&pk) {
                    out.push_str("\"Item\":");
                    write_map(&mut out, item);
                }
                out.push('}');
                Answer { status: Some(200), body: Some(out.into_bytes()) }
            }
            "UpdateItem" => self.update(&pk, body),
            o => panic!("an operation the ledger never calls: {o}"),
        }
    }

    fn update(&mut self, pk: &str, body: &Value) -> Answer {
        let strings = |k: &str| -> BTreeMap<String, String> {
            body.get(k)
                .and_then(Value::as_object)
                .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect())
                .unwrap_or_default()
        };
        let names = strings("ExpressionAttributeNames");
        let values: BTreeMap<String, Attr> =
            body.get("ExpressionAttributeValues").and_then(Value::as_object).map(|o| o.iter().map(|(k, v)| (k.clone(), attr(v))).collect()).unwrap_or_default();
        let mut item = self.items.get(pk).cloned().unwrap_or_default();
        if let Some(cond) = body.get("ConditionExpression").and_then(Value::as_str) {
            let mut p = Parser { toks: tokens(cond), at: 0, names: &names, values: &values };
            let holds = p.or(&item);
            assert_eq!(p.at, p.toks.len(), "a condition read to its end: {cond}");
            if !holds {
                return condition_failed();
            }
        }
        let update = body.get("UpdateExpression").and_then(Value::as_str).unwrap_or("");
        let mut p = Parser { toks: tokens(update), at: 0, names: &names, values: &values };
        let before = item.clone();
        let mut section = String::new();
        while p.at < p.toks.len() {
            if matches!(p.peek(), "SET" | "REMOVE") {
                section = p.next();
            }
            let path = p.path();
            if section == "SET" {
                p.expect("=");
                // Every operand reads the item as it was before the update, as in DynamoDB.
                let v = p.operand(&before).unwrap_or_else(|| panic!("an operand that is not there in {update}"));
                set(&mut item, &path, v);
            } else {
                remove(&mut item, &path);
            }
            if p.peek() == "," {
                p.next();
            }
        }
        item.insert("pk".into(), Attr::S(pk.into()));
        self.items.insert(pk.into(), item.clone());
        let all_new = body.get("ReturnValues").and_then(Value::as_str) == Some("ALL_NEW");
        let mut out = String::from("{");
        if all_new {
            out.push_str("\"Attributes\":");
            write_map(&mut out, &item);
        }
        out.push('}');
        Answer { status: Some(200), body: Some(out.into_bytes()) }
    }

    /// A number at `path` in `pk`'s item.
    pub fn n(&self, pk: &str, path: &[&str]) -> Option<i128> {
        let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        match get(self.items.get(pk)?, &path)? {
            Attr::N(n) => Some(*n),
            _ => None,
        }
    }
}
