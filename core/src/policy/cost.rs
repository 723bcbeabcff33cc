//! What a request costs: a target's `cost`, counted against a credential's `lim.spend`.
//!
//! A cost is fixed per request (`per_request`), or read from the request body: a form field
//! (`form_field`, Stripe's `amount`) or a top-level JSON member (`json_field`), an integer in the
//! target's cost unit (US cents for Stripe), optionally with a currency checked against a list.
//! Reading the body is strict, because the vendor reads the same bytes and charges what *it*
//! reads (`body`): a name is compared after percent-decoding (as the vendor decodes it), a field
//! given twice, in bracket form (`amount[]`) or spelt so that some parser reads it as the field
//! (` amount`, `Amount`, `amount.`) is refused, the query string may not carry it, and only digits
//! make an amount. A `_method` field in the body is a method override, like the override headers.
//! Whatever cannot be read exactly is refused (400), never guessed.

use crate::policy::rules::RouteRule;
use crate::policy::tokens::{compile_tariff, Meter, RawPrices, Tariff};
use crate::wire::pct;
use body::{BodyKind, Value};
use serde::Deserialize;
use std::collections::BTreeMap;

pub mod body;

/// The largest cost or cap accepted (10^15 units: ten trillion dollars in cents), so sums of
/// costs never overflow and every value is exact in JSON.
pub const MAX_COST: u64 = 1_000_000_000_000_000;
/// The body buffered to read a cost, unless the target says otherwise.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;
/// The most a target may ask to buffer.
pub const MAX_MAX_BODY: usize = 1024 * 1024;
/// The body buffered for a model call priced from its usage, unless the target says otherwise
/// (prompts are long; inline images longer).
pub const DEFAULT_MAX_USAGE_BODY: usize = 1024 * 1024;
/// The most a target priced from usage may ask to buffer.
pub const MAX_MAX_USAGE_BODY: usize = 16 * 1024 * 1024;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawCost {
    #[serde(default)]
    per_request: Option<u64>,
    #[serde(default)]
    form_field: Option<String>,
    #[serde(default)]
    json_field: Option<String>,
    #[serde(default)]
    currency_field: Option<String>,
    #[serde(default)]
    currencies: Option<Vec<String>>,
    #[serde(default)]
    max_body_bytes: Option<u64>,
    #[serde(default)]
    free: Vec<String>,
    #[serde(default = "yes")]
    body_method_override: bool,
    /// Priced from the vendor's reported token usage: `"openai"` or `"anthropic"`.
    #[serde(default)]
    usage: Option<String>,
    #[serde(default)]
    models: Option<BTreeMap<String, RawPrices>>,
    #[serde(default)]
    default: Option<RawPrices>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    input_overhead_tokens: Option<u64>,
}

fn yes() -> bool {
    true
}

/// Where a request's cost comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    PerRequest(u64),
    Form(String),
    Json(String),
    /// From the vendor's reported token usage: a bound reserved from the request body, the
    /// usage charged after the answer.
    Usage(Box<Tariff>),
}

/// A target's compiled `cost`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cost {
    pub source: Source,
    /// The currency field and the currencies allowed (lower case).
    pub currency: Option<(String, Vec<String>)>,
    pub max_body: usize,
    /// Requests that cost nothing (reads, say). Every other request to the target is priced: a
    /// path the list does not foresee (a trailing slash, a new endpoint) must carry a readable
    /// amount, never passes free.
    pub free: Vec<RouteRule>,
    /// The vendor may run a `_method` field of a body (Rails, Laravel, Symfony do): a free
    /// request's form or JSON body is read for one too. `false` for vendors that never do.
    pub body_method_override: bool,
}

/// What a request costs, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    pub cost: u64,
    /// The currency it is in, lower case (when the target checks one).
    pub currency: Option<String>,
    /// A model call: `cost` is its bound, settled from its usage after the answer.
    pub meter: Option<Meter>,
    /// The body to forward instead (a model call the gateway adds an output limit to, or the
    /// request for its usage).
    pub body: Option<Vec<u8>>,
}

impl Priced {
    pub fn fixed(cost: u64) -> Priced {
        Priced { cost, currency: None, meter: None, body: None }
    }
}

/// Why a request's cost could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// 400 `bad_request`, with this message.
    Bad(&'static str),
    /// 413: the body is larger than the target buffers.
    TooLarge,
}

/// The request headers a body cost depends on, read while they can be (Envoy hands a wasm filter
/// the request headers only until they go on; the body comes after).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyHeaders {
    pub content_type: Option<Vec<u8>>,
    pub content_encoding: Option<Vec<u8>>,
    pub content_length: Option<Vec<u8>>,
    /// The query string (after `?`), if any.
    pub query: Option<String>,
}

fn valid_field(f: &str) -> bool {
    !f.is_empty() && f.len() <= 64 && f.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Compile a target's `cost` (`path` names it in errors: `(path, message)`).
pub fn compile(path: &str, raw: &RawCost) -> Result<Cost, (String, String)> {
    let e = |p: &str, m: &str| Err((format!("{path}{p}"), m.to_string()));
    if let Some(usage) = &raw.usage {
        return compile_usage(path, usage, raw);
    }
    if raw.models.is_some() || raw.default.is_some() || raw.max_tokens.is_some() || raw.input_overhead_tokens.is_some() {
        return e(".usage", "models, default, max_tokens and input_overhead_tokens price a target by its usage: set usage");
    }
    let source = match (raw.per_request, &raw.form_field, &raw.json_field) {
        (Some(n), None, None) if n <= MAX_COST => Source::PerRequest(n),
        (Some(_), None, None) => return e(".per_request", "must be at most 10^15"),
        (None, Some(f), None) if valid_field(f) => Source::Form(f.clone()),
        (None, None, Some(f)) if valid_field(f) => Source::Json(f.clone()),
        (None, Some(_), None) => return e(".form_field", "must be 1 to 64 of [A-Za-z0-9_.-]"),
        (None, None, Some(_)) => return e(".json_field", "must be 1 to 64 of [A-Za-z0-9_.-]"),
        _ => return e("", "set exactly one of per_request, form_field and json_field"),
    };
    let body = !matches!(source, Source::PerRequest(_));
    let currency = match (&raw.currency_field, &raw.currencies) {
        (None, None) => None,
        (Some(_), _) | (_, Some(_)) if !body => return e(".currency_field", "a per_request cost has no currency to check"),
        (Some(f), Some(list)) => {
            if !valid_field(f) || Some(f.as_str()) == field(&source) {
                return e(".currency_field", "must be 1 to 64 of [A-Za-z0-9_.-], other than the amount's field");
            }
            if list.is_empty() {
                return e(".currencies", "must list at least one currency");
            }
            let mut out = Vec::with_capacity(list.len());
            for (i, c) in list.iter().enumerate() {
                let c = c.to_ascii_lowercase();
                if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_lowercase()) {
                    return e(&format!(".currencies[{i}]"), "must be a three-letter currency code");
                }
                out.push(c);
            }
            Some((f.clone(), out))
        }
        (Some(_), None) => return e(".currencies", "currency_field needs the currencies allowed"),
        (None, Some(_)) => return e(".currency_field", "currencies needs the currency_field to read"),
    };
    let max_body = match raw.max_body_bytes {
        None => DEFAULT_MAX_BODY,
        Some(_) if !body => return e(".max_body_bytes", "a per_request cost reads no body"),
        Some(n) if n >= 1 && n <= MAX_MAX_BODY as u64 => n as usize,
        Some(_) => return e(".max_body_bytes", "must be between 1 and 1048576"),
    };
    let mut free = Vec::with_capacity(raw.free.len());
    for (i, r) in raw.free.iter().enumerate() {
        free.push(RouteRule::parse(r).map_err(|m| (format!("{path}.free[{i}]"), m))?);
    }
    if !body && !raw.body_method_override {
        return e(".body_method_override", "a per_request cost reads no body");
    }
    Ok(Cost { source, currency, max_body, free, body_method_override: raw.body_method_override })
}

/// Compile a `cost` priced from the vendor's reported token usage.
fn compile_usage(path: &str, usage: &str, raw: &RawCost) -> Result<Cost, (String, String)> {
    if raw.per_request.is_some() || raw.form_field.is_some() || raw.json_field.is_some() || raw.currency_field.is_some() || raw.currencies.is_some() {
        return Err((format!("{path}.usage"), "a cost priced by usage has no per_request, form_field, json_field or currency".into()));
    }
    let tariff = compile_tariff(path, usage, raw.models.as_ref(), raw.default.as_ref(), raw.max_tokens, raw.input_overhead_tokens)?;
    let max_body = match raw.max_body_bytes {
        None => DEFAULT_MAX_USAGE_BODY,
        Some(n) if n >= 1 && n <= MAX_MAX_USAGE_BODY as u64 => n as usize,
        Some(_) => return Err((format!("{path}.max_body_bytes"), "must be between 1 and 16777216".into())),
    };
    let mut free = Vec::with_capacity(raw.free.len());
    for (i, r) in raw.free.iter().enumerate() {
        free.push(RouteRule::parse(r).map_err(|m| (format!("{path}.free[{i}]"), m))?);
    }
    Ok(Cost { source: Source::Usage(Box::new(tariff)), currency: None, max_body, free, body_method_override: raw.body_method_override })
}

fn field(s: &Source) -> Option<&str> {
    match s {
        Source::PerRequest(_) | Source::Usage(_) => None,
        Source::Form(f) | Source::Json(f) => Some(f),
    }
}

/// Compile a target's `refund_on`: statuses 400 to 599 (a vendor's success is never refunded).
pub fn compile_refunds(path: &str, raw: &[u16]) -> Result<Vec<u16>, (String, String)> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        if !(400..=599).contains(s) {
            return Err((format!("{path}.refund_on[{i}]"), "must be an HTTP status from 400 to 599".into()));
        }
        if !out.contains(s) {
            out.push(*s);
        }
    }
    Ok(out)
}

impl Cost {
    /// Does a request running `method` on `path` cost anything?
    pub fn applies(&self, method: &str, path: &str) -> bool {
        !self.free.iter().any(|r| r.matches(method, path))
    }

    /// The cost is in the body: the request's body is buffered and read before it goes on.
    pub fn reads_body(&self) -> bool {
        !matches!(self.source, Source::PerRequest(_))
    }

    /// A fixed cost, known from the headers.
    pub fn fixed(&self) -> Option<u64> {
        match self.source {
            Source::PerRequest(n) => Some(n),
            _ => None,
        }
    }

    /// What can be refused from the headers alone, before anything is fetched or buffered: the
    /// body's type and encoding, a declared length over the bound, and the cost's fields in the
    /// query string (a vendor may read parameters from either).
    pub fn check_headers(&self, h: &BodyHeaders) -> Result<(), Unreadable> {
        if self.body_kind().is_none() {
            return Ok(());
        }
        if BodyKind::of(h.content_type.as_deref())? != self.body_kind() {
            return Err(Unreadable::Bad(match self.source {
                Source::Json(_) | Source::Usage(_) => "a request to this target needs content-type: application/json (its cost is read from the body)",
                _ => "a request to this target needs content-type: application/x-www-form-urlencoded (its cost is read from the body)",
            }));
        }
        if h.content_encoding.as_deref().is_some_and(|v| !v.eq_ignore_ascii_case(b"identity")) {
            return Err(Unreadable::Bad("an encoded request body cannot be priced; send it without content-encoding"));
        }
        if let Some(len) = &h.content_length {
            let n = std::str::from_utf8(len).ok().and_then(|s| s.trim().parse::<u64>().ok());
            match n {
                Some(n) if n > self.max_body as u64 => return Err(Unreadable::TooLarge),
                Some(_) => {}
                None => return Err(Unreadable::Bad("content-length is not a number")),
            }
        }
        if let (Some(q), Some(amount)) = (&h.query, field(&self.source)) {
            let names: Vec<&str> = [Some(amount), self.currency.as_ref().map(|(f, _)| f.as_str())].into_iter().flatten().collect();
            for pair in q.split('&') {
                let name = pct::decode(pair.split('=').next().unwrap_or_default().as_bytes(), true);
                if names.iter().any(|f| body::names(&name, f)) {
                    return Err(Unreadable::Bad("the query string may not carry the amount or currency: they are read from the body"));
                }
            }
        }
        Ok(())
    }

    /// Read the cost from the whole body (`None` for a fixed cost).
    pub fn read(&self, body: &[u8]) -> Result<Priced, Unreadable> {
        self.read_all(body).map(|(p, _)| p)
    }

    /// Read the cost and the methods the body asks the vendor to run instead (its `_method`)
    /// from the whole body, the strictest way a vendor could read it (`body::scan`).
    pub fn read_all(&self, body: &[u8]) -> Result<(Priced, Vec<String>), Unreadable> {
        if body.len() > self.max_body {
            return Err(Unreadable::TooLarge);
        }
        let (kind, amount_field) = match &self.source {
            Source::PerRequest(n) => return Ok((Priced::fixed(*n), Vec::new())),
            Source::Usage(_) => return Err(Unreadable::Bad("a model call is priced by `price_call`")),
            Source::Form(f) => (BodyKind::Form, f.as_str()),
            Source::Json(f) => (BodyKind::Json, f.as_str()),
        };
        let currency_field = self.currency.as_ref().map(|(c, _)| c.as_str());
        let mut wanted = vec![amount_field, body::METHOD_FIELD];
        wanted.extend(currency_field);
        let mut found = body::scan(kind, body, &wanted)?.into_iter();
        let (amount, method, currency) = (found.next().flatten(), found.next().flatten(), found.next().flatten());
        let amount = match amount {
            None => return Err(Unreadable::Bad("the body has no amount")),
            Some(Value::Text(t)) if kind == BodyKind::Form => parse_amount(&t)?,
            Some(Value::Int(n)) if n < 0 => return Err(Unreadable::Bad("the amount is negative")),
            Some(Value::Int(n)) if (n as u64) <= MAX_COST => n as u64,
            Some(Value::Int(_)) => return Err(Unreadable::Bad("the amount is too large")),
            Some(_) => return Err(Unreadable::Bad("the amount is not an integer")),
        };
        let overrides: Vec<String> = method.as_ref().map(body::method).transpose()?.into_iter().collect();
        let currency = match &self.currency {
            None => None,
            Some((_, allowed)) => {
                let c = match currency {
                    None => return Err(Unreadable::Bad("the body has no currency")),
                    Some(Value::Text(t)) => t,
                    Some(_) => return Err(Unreadable::Bad("the currency is not a string")),
                };
                let c = String::from_utf8(c).map(|c| c.to_ascii_lowercase()).map_err(|_| Unreadable::Bad("the currency is not allowed here"))?;
                if !allowed.contains(&c) {
                    return Err(Unreadable::Bad("the currency is not allowed here"));
                }
                Some(c)
            }
        };
        Ok((Priced { cost: amount, currency, meter: None, body: None }, overrides))
    }

    /// Read a request's cost and method overrides from its whole body: a model call's bound from
    /// its usage tariff (`path`: the vendor path; `forbidden`: what no string of a model call's
    /// body may hold), anything else as `read_all` does.
    pub fn price_call(&self, body: &[u8], path: &str, forbidden: &dyn Fn(&str) -> bool) -> Result<(Priced, Vec<String>), Unreadable> {
        let Source::Usage(t) = &self.source else { return self.read_all(body) };
        if body.len() > self.max_body {
            return Err(Unreadable::TooLarge);
        }
        let overrides = if self.body_method_override { body::overrides(BodyKind::Json, body)? } else { Vec::new() };
        let (meter, forwarded) = t.meter(body, path, forbidden).map_err(Unreadable::Bad)?;
        Ok((Priced { cost: meter.bound, currency: None, meter: Some(meter), body: forwarded }, overrides))
    }

    /// Priced from the vendor's reported usage (a model call).
    pub fn metered(&self) -> bool {
        matches!(self.source, Source::Usage(_))
    }

    /// How the cost's body is encoded (`None` for a fixed cost).
    pub fn body_kind(&self) -> Option<BodyKind> {
        match self.source {
            Source::PerRequest(_) => None,
            Source::Form(_) => Some(BodyKind::Form),
            Source::Json(_) | Source::Usage(_) => Some(BodyKind::Json),
        }
    }
}

/// An amount: decimal digits only (no sign, space, fraction or exponent), at most `MAX_COST`.
fn parse_amount(v: &[u8]) -> Result<u64, Unreadable> {
    if v.first() == Some(&b'-') {
        return Err(Unreadable::Bad("the amount is negative"));
    }
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return Err(Unreadable::Bad("the amount is not an integer"));
    }
    let digits = v.iter().skip_while(|b| **b == b'0').count();
    if digits > 16 {
        return Err(Unreadable::Bad("the amount is too large"));
    }
    let n = v.iter().fold(0u64, |n, d| n.saturating_mul(10).saturating_add(u64::from(d - b'0')));
    if n > MAX_COST {
        return Err(Unreadable::Bad("the amount is too large"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests;
