//! The ledger's calls to DynamoDB (its JSON API, `x-amz-target: DynamoDB_20120810.*`, signed by
//! the Envoy cluster) and a strict reading of its answers. Every change is one conditional
//! `UpdateItem` on one item, so it works alike on DynamoDB, dynalite and moto.
//!
//! An item: `pk`; `s` and `n`, the spend and count held (granted to live slices plus reported
//! spent); `ttl`; `l_<gateway>`, that gateway's lease (`{i: id, q: grants, s, n, e: end}`), or
//! once given back its end mark (`q` 0, `s` and `n` 0, `e` the second it was given back); and
//! marks `r_<fingerprint>` (a charge with an `Idempotency-Key`) and `x_<receipt>` (a direct
//! charge), each with the second it may be forgotten. Nothing else: an item with any other
//! attribute, or a value of another shape, is not an answer this ledger gave.
//!
//! Every change is made at most once, even when a call is replayed (sent again after its answer
//! was lost, or delayed in the network past its deadline): a top-up and a return only apply to the
//! lease's id and sequence they were counted from; a first lease only where the gateway holds
//! none and its last lease (the end mark) has a smaller id, lease ids growing with time.

use super::{Account, Amounts, Ledger};
use crate::secret::Secret;
use crate::secrets::store::HttpCall;
use crate::wire::json::{self, Value};

/// The largest answer read (an item with its marks).
pub const MAX_ANSWER: usize = 64 * 1024;
/// Marks an item may hold before new charges stop adding retry fingerprints (their retries are
/// then charged again: over-counted, never under-counted).
pub const MAX_MARKS: usize = 512;

/// A gateway's lease as the item records it: its id, how many grants made it (the first, then
/// each top-up), what it grants in all, and when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: u64,
    pub seq: u64,
    pub granted: Amounts,
    pub expires_s: u64,
}

/// What the ledger holds for an account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Item {
    pub held: Amounts,
    /// Live leases by gateway id.
    pub leases: Vec<(String, Lease)>,
    /// End marks by gateway id: the id of the gateway's last lease, and when it was given back.
    pub ended: Vec<(String, u64, u64)>,
    /// Retry fingerprints and receipts (attribute names) with their values (`Mark`).
    pub marks: Vec<(String, u64)>,
    /// Pins (`p_<fingerprint>`): a retry was admitted on that charge, which can no longer be
    /// refunded.
    pub pins: Vec<String>,
}

impl Item {
    pub fn lease_of(&self, gateway: &str) -> Option<&Lease> {
        self.leases.iter().find(|(g, _)| g == gateway).map(|(_, l)| l)
    }
    /// The id of `gateway`'s last lease, given back.
    pub fn ended_of(&self, gateway: &str) -> Option<u64> {
        self.ended.iter().find(|(g, _, _)| g == gateway).map(|(_, id, _)| *id)
    }
    /// Other gateways' end marks older than `before_s` (no replay of their calls can land any
    /// more: DynamoDB refuses a signature that old), to remove.
    pub fn stale_marks(&self, gateway: &str, before_s: u64) -> Vec<String> {
        self.ended.iter().filter(|(g, _, at)| g != gateway && *at < before_s).map(|(g, _, _)| lease_attr(g)).collect()
    }
    pub fn has_mark(&self, name: &str) -> bool {
        self.marks.iter().any(|(m, _)| m == name)
    }
    /// The value of mark `name`, when the item has it.
    pub fn mark_value(&self, name: &str) -> Option<u64> {
        self.marks.iter().find(|(m, _)| m == name).map(|(_, v)| *v)
    }
}

/// What a call came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The change was made (or, for a read, the item as it is; `None`: no such item).
    Done(Option<Item>),
    /// The condition did not hold: no room, a mark already there, or a lease not ours.
    ConditionFailed,
    /// DynamoDB throttled the call (`ProvisionedThroughputExceeded`, `Throttling`, `RequestLimitExceeded`).
    Throttled,
    /// No answer, an error, or an answer this ledger cannot read.
    Failed(String),
}

/// One change to an account's item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Grant `add` more to this gateway: a first lease (`old` `None`: only if it holds none), or
    /// a top-up of the lease it holds (`old`: its id and sequence; only if the ledger's record is
    /// still that, so a top-up asked again is made at most once). `new`: the lease as it will be.
    /// Made only if what is held plus `add` stays within the caps.
    Grant { gateway: String, old: Option<(u64, u64)>, add: Amounts, new: Lease, prune: Vec<String> },
    /// Give back what a lease did not use, and end it (its end mark, dated `at_s`): only while
    /// the ledger's record of it is still `old` (its id and sequence), the state `back` was
    /// counted from.
    Return { gateway: String, old: (u64, u64), back: Amounts, at_s: u64 },
    /// Charge `amounts` at once, with a mark (`r_<fingerprint>` or `x_<receipt>`, its value naming
    /// this charge): refused if the caps would be passed or the mark is there already. `prune`:
    /// marks past their time (and their pins), removed with it.
    Direct { amounts: Amounts, mark: super::Mark, prune: Vec<String> },
    /// Pin a charge: a retry is admitted on it, so it may no longer be refunded. Only while its
    /// mark is there.
    Pin { mark: String },
    /// Release a direct charge, once: only while its mark names this charge and no retry pinned it.
    Refund { amounts: Amounts, mark: super::Mark },
}

fn header(k: &str, v: &str) -> (String, Secret) {
    (k.to_string(), Secret::text(v))
}

fn call(ledger: &Ledger, op: &str, body: String) -> HttpCall {
    let headers = vec![
        header(":method", "POST"),
        header(":path", "/"),
        header(":authority", &ledger.authority),
        header("content-type", "application/x-amz-json-1.0"),
        header("x-amz-target", &format!("DynamoDB_20120810.{op}")),
    ];
    HttpCall { cluster: ledger.cluster.clone(), headers, body: Some(body.into_bytes()), timeout_ms: ledger.timeout_ms }
}

fn num(out: &mut String, n: i128) {
    out.push_str("{\"N\":\"");
    out.push_str(&n.to_string());
    out.push_str("\"}");
}

/// The start of a request on `account`'s item: `{"TableName":..,"Key":{"pk":{"S":..}}`.
fn start(ledger: &Ledger, pk: &str) -> String {
    let mut b = String::with_capacity(512);
    b.push_str("{\"TableName\":");
    json::write_str(&mut b, &ledger.table);
    b.push_str(",\"Key\":{\"pk\":{\"S\":");
    json::write_str(&mut b, pk);
    b.push_str("}}");
    b
}

/// A growing expression with its names and values.
#[derive(Default)]
struct Expr {
    set: Vec<String>,
    remove: Vec<String>,
    cond: Vec<String>,
    names: Vec<(String, String)>,
    values: Vec<(String, String)>,
}

impl Expr {
    fn name(&mut self, attr: &str) -> String {
        if let Some((k, _)) = self.names.iter().find(|(_, v)| v == attr) {
            return k.clone();
        }
        let k = format!("#a{}", self.names.len());
        self.names.push((k.clone(), attr.to_string()));
        k
    }
    fn value(&mut self, v: String) -> String {
        let k = format!(":v{}", self.values.len());
        self.values.push((k.clone(), v));
        k
    }
    fn n(&mut self, n: i128) -> String {
        let mut v = String::new();
        num(&mut v, n);
        self.value(v)
    }
    /// `held + delta` in one dimension, kept within `cap` when the delta grows it.
    fn add(&mut self, attr: &str, delta: i128, cap: Option<u64>) {
        if delta == 0 {
            return;
        }
        let a = self.name(attr);
        let zero = self.n(0);
        let d = self.n(delta);
        self.set.push(format!("{a} = if_not_exists({a}, {zero}) + {d}"));
        if let (Some(cap), true) = (cap, delta > 0) {
            let room = i128::from(cap) - delta;
            let max = self.n(room);
            // A change larger than the cap fits nowhere, not even in an item that holds nothing yet.
            if room < 0 {
                self.cond.push(format!("{a} <= {max}"));
            } else {
                self.cond.push(format!("(attribute_not_exists({a}) OR {a} <= {max})"));
            }
        }
    }
    fn finish(self, mut b: String, returns: bool) -> String {
        let mut update = String::new();
        if !self.set.is_empty() {
            update.push_str("SET ");
            update.push_str(&self.set.join(", "));
        }
        if !self.remove.is_empty() {
            if !update.is_empty() {
                update.push(' ');
            }
            update.push_str("REMOVE ");
            update.push_str(&self.remove.join(", "));
        }
        b.push_str(",\"UpdateExpression\":");
        json::write_str(&mut b, &update);
        if !self.cond.is_empty() {
            b.push_str(",\"ConditionExpression\":");
            json::write_str(&mut b, &self.cond.join(" AND "));
        }
        b.push_str(",\"ExpressionAttributeNames\":{");
        for (i, (k, v)) in self.names.iter().enumerate() {
            if i > 0 {
                b.push(',');
            }
            json::write_str(&mut b, k);
            b.push(':');
            json::write_str(&mut b, v);
        }
        b.push('}');
        if !self.values.is_empty() {
            b.push_str(",\"ExpressionAttributeValues\":{");
            for (i, (k, v)) in self.values.iter().enumerate() {
                if i > 0 {
                    b.push(',');
                }
                json::write_str(&mut b, k);
                b.push(':');
                b.push_str(v);
            }
            b.push('}');
        }
        b.push_str(if returns { ",\"ReturnValues\":\"ALL_NEW\"}" } else { ",\"ReturnValues\":\"NONE\"}" });
        b
    }
}

fn lease_value(l: &Lease) -> String {
    let mut v = String::from("{\"M\":{\"i\":");
    num(&mut v, i128::from(l.id));
    v.push_str(",\"q\":");
    num(&mut v, i128::from(l.seq));
    v.push_str(",\"s\":");
    num(&mut v, i128::from(l.granted.spend));
    v.push_str(",\"n\":");
    num(&mut v, i128::from(l.granted.count));
    v.push_str(",\"e\":");
    num(&mut v, i128::from(l.expires_s));
    v.push_str("}}");
    v
}

/// The lease attribute of `gateway`.
pub fn lease_attr(gateway: &str) -> String {
    format!("l_{gateway}")
}

/// The `UpdateItem` that makes `change` on `account`'s item.
pub fn update(ledger: &Ledger, account: &Account, change: &Change) -> HttpCall {
    let mut x = Expr::default();
    let caps = account.caps;
    let returns = match change {
        Change::Grant { gateway, old, add, new, prune } => {
            x.add("s", i128::from(add.spend), caps.spend);
            x.add("n", i128::from(add.count), caps.count);
            let l = x.name(&lease_attr(gateway));
            match old {
                None => {
                    let lv = x.value(lease_value(new));
                    x.set.push(format!("{l} = {lv}"));
                    let (fi, fq) = (x.name("i"), x.name("q"));
                    let (zero, id) = (x.n(0), x.n(i128::from(new.id)));
                    x.cond.push(format!("(attribute_not_exists({l}) OR ({l}.{fq} = {zero} AND {l}.{fi} < {id}))"));
                }
                Some((id, seq)) => {
                    let (fi, fq, fs, fn_, fe) = (x.name("i"), x.name("q"), x.name("s"), x.name("n"), x.name("e"));
                    let (vi, vq) = (x.n(i128::from(*id)), x.n(i128::from(*seq)));
                    x.cond.push(format!("{l}.{fi} = {vi} AND {l}.{fq} = {vq}"));
                    let (q2, vs, vn, ve) = (x.n(i128::from(new.seq)), x.n(i128::from(add.spend)), x.n(i128::from(add.count)), x.n(i128::from(new.expires_s)));
                    x.set.push(format!("{l}.{fq} = {q2}"));
                    x.set.push(format!("{l}.{fs} = {l}.{fs} + {vs}"));
                    x.set.push(format!("{l}.{fn_} = {l}.{fn_} + {vn}"));
                    x.set.push(format!("{l}.{fe} = {ve}"));
                }
            }
            for p in prune.iter().take(16) {
                let a = x.name(p);
                x.remove.push(a);
            }
            true
        }
        Change::Return { gateway, old, back, at_s } => {
            x.add("s", -i128::from(back.spend), None);
            x.add("n", -i128::from(back.count), None);
            let l = x.name(&lease_attr(gateway));
            let (fi, fq) = (x.name("i"), x.name("q"));
            let (vi, vq) = (x.n(i128::from(old.0)), x.n(i128::from(old.1)));
            let end = Lease { id: old.0, seq: 0, granted: Amounts::default(), expires_s: *at_s };
            let ev = x.value(lease_value(&end));
            x.set.push(format!("{l} = {ev}"));
            x.cond.push(format!("{l}.{fi} = {vi} AND {l}.{fq} = {vq}"));
            false
        }
        Change::Direct { amounts, mark, prune } => {
            x.add("s", i128::from(amounts.spend), caps.spend);
            x.add("n", i128::from(amounts.count), caps.count);
            let m = x.name(&mark.name);
            let u = x.n(i128::from(mark.value));
            x.set.push(format!("{m} = {u}"));
            x.cond.push(format!("attribute_not_exists({m})"));
            let pin = super::Mark::pin_of(&mark.name);
            for p in prune.iter().filter(|p| **p != mark.name && **p != pin && (valid_mark(p) || valid_pin(p))).take(32) {
                let a = x.name(p);
                x.remove.push(a);
            }
            true
        }
        Change::Pin { mark } => {
            let m = x.name(mark);
            let p = x.name(&super::Mark::pin_of(mark));
            let one = x.n(1);
            x.set.push(format!("{p} = {one}"));
            x.cond.push(format!("attribute_exists({m})"));
            false
        }
        Change::Refund { amounts, mark } => {
            x.add("s", -i128::from(amounts.spend), None);
            x.add("n", -i128::from(amounts.count), None);
            let m = x.name(&mark.name);
            let p = x.name(&super::Mark::pin_of(&mark.name));
            let v = x.n(i128::from(mark.value));
            x.remove.push(m.clone());
            x.cond.push(format!("{m} = {v} AND attribute_not_exists({p})"));
            false
        }
    };
    if !matches!(change, Change::Return { .. } | Change::Refund { .. } | Change::Pin { .. }) {
        let t = x.name("ttl");
        let v = x.n(i128::from(account.ttl_s));
        x.set.push(format!("{t} = {v}"));
    }
    call(ledger, "UpdateItem", x.finish(start(ledger, &account.pk), returns))
}

/// The strongly consistent `GetItem` of `account`'s item.
pub fn read(ledger: &Ledger, account: &Account) -> HttpCall {
    let mut b = start(ledger, &account.pk);
    b.push_str(",\"ConsistentRead\":true}");
    call(ledger, "GetItem", b)
}

/// A DynamoDB number that is an integer in range: digits, an optional leading `-`.
fn int(v: &Value) -> Option<i64> {
    let Value::Object(m) = v else { return None };
    let [(k, Value::Str(s))] = m.as_slice() else { return None };
    if k != "N" {
        return None;
    }
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn unsigned(v: &Value) -> Option<u64> {
    int(v).and_then(|n| u64::try_from(n).ok())
}

fn lease(v: &Value) -> Option<Lease> {
    let Value::Object(m) = v else { return None };
    let [(k, Value::Object(fields))] = m.as_slice() else { return None };
    if k != "M" || fields.len() != 5 {
        return None;
    }
    let get = |name: &str| fields.iter().find(|(f, _)| f == name).and_then(|(_, v)| unsigned(v));
    Some(Lease { id: get("i")?, seq: get("q")?, granted: Amounts { spend: get("s")?, count: get("n")? }, expires_s: get("e")? })
}

fn valid_gateway(g: &str) -> bool {
    !g.is_empty() && g.len() <= 32 && g.bytes().all(|b| b.is_ascii_hexdigit())
}

fn valid_pin(m: &str) -> bool {
    m.strip_prefix("p_").is_some_and(|r| r.len() == 32 && r.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn valid_mark(m: &str) -> bool {
    let rest = m.strip_prefix("r_").or_else(|| m.strip_prefix("x_"));
    rest.is_some_and(|r| r.len() == 32 && r.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// An item's attributes, strictly.
fn item(attrs: &[(String, Value)], pk: &str) -> Result<Item, String> {
    let mut out = Item::default();
    let mut keyed = false;
    for (name, v) in attrs {
        match name.as_str() {
            "pk" => match v.get("S").and_then(Value::as_str) {
                Some(p) if p == pk => keyed = true,
                _ => return Err("an item for another key".into()),
            },
            "s" => out.held.spend = unsigned(v).ok_or("the spend held is not a non-negative integer")?,
            "n" => out.held.count = unsigned(v).ok_or("the count held is not a non-negative integer")?,
            "ttl" => {
                unsigned(v).ok_or("ttl is not a number")?;
            }
            n if n.strip_prefix("l_").is_some_and(valid_gateway) => {
                let gateway = n.trim_start_matches("l_").to_string();
                let l = lease(v).ok_or("a lease of another shape")?;
                if l.seq == 0 {
                    if !l.granted.is_zero() {
                        return Err("an end mark that holds something".into());
                    }
                    out.ended.push((gateway, l.id, l.expires_s));
                } else {
                    out.leases.push((gateway, l));
                }
            }
            n if valid_mark(n) => out.marks.push((n.to_string(), unsigned(v).ok_or("a mark is not a number")?)),
            n if valid_pin(n) => {
                unsigned(v).ok_or("a pin is not a number")?;
                out.pins.push(n.to_string());
            }
            _ => return Err("an attribute this ledger never writes".into()),
        }
    }
    if !keyed {
        return Err("an item without its key".into());
    }
    Ok(out)
}

/// Read a call's answer (`status`: `None` when nothing came back).
pub fn answer(account: &Account, status: Option<u32>, body: Option<&[u8]>) -> Answer {
    let Some(status) = status else { return Answer::Failed("no answer (timeout or connection failure)".into()) };
    let Some(body) = body.filter(|b| b.len() <= MAX_ANSWER) else { return Answer::Failed(format!("HTTP {status} with an answer too large to read")) };
    let Ok(v) = json::parse(body) else { return Answer::Failed(format!("HTTP {status} with an answer that is not JSON")) };
    if status != 200 {
        let kind = v.get("__type").and_then(Value::as_str).unwrap_or("").rsplit('#').next().unwrap_or("").to_string();
        return match kind.as_str() {
            "ConditionalCheckFailedException" if status == 400 => Answer::ConditionFailed,
            "ProvisionedThroughputExceededException" | "ThrottlingException" | "RequestLimitExceeded" => Answer::Throttled,
            k => Answer::Failed(format!("HTTP {status} {}", k.chars().filter(|c| c.is_ascii_alphanumeric()).take(80).collect::<String>())),
        };
    }
    let Some(top) = v.as_object() else { return Answer::Failed("an answer that is not an object".into()) };
    let found = top.iter().find(|(k, _)| k == "Attributes" || k == "Item");
    if top.iter().any(|(k, _)| k != "Attributes" && k != "Item" && k != "ConsumedCapacity") {
        return Answer::Failed("an answer with members this ledger never asks for".into());
    }
    match found {
        None => Answer::Done(None),
        Some((_, Value::Object(attrs))) => match item(attrs, &account.pk) {
            Ok(i) => Answer::Done(Some(i)),
            Err(why) => Answer::Failed(why),
        },
        Some(_) => Answer::Failed("item attributes that are not an object".into()),
    }
}

#[cfg(test)]
mod tests;
