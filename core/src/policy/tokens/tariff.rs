//! A target's token prices (`"cost": {"usage": ...}`), and what one call is reserved at before it
//! is made.

use super::{asked, bound, parse_price, with_members, Dialect, Prices, MAX_TOKENS};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Input tokens a call may use beyond its body's bytes: the vendor's own formatting of each
/// message and the system prompt it adds for tools (a few hundred tokens).
pub const DEFAULT_OVERHEAD_TOKENS: u64 = 4096;

/// One model's prices per million tokens, as configured (numbers, in the cap's unit).
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawPrices {
    input: serde_json::Number,
    output: serde_json::Number,
    #[serde(default)]
    cached_input: Option<serde_json::Number>,
    #[serde(default)]
    cache_write: Option<serde_json::Number>,
    #[serde(default)]
    cache_write_1h: Option<serde_json::Number>,
    /// The most input tokens one image may cost (the vendor's rule for this model, at its largest
    /// size and detail). Without it, a call with an image is refused.
    #[serde(default)]
    image_tokens: Option<u64>,
}

/// One model's prices, and the most tokens an image costs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model {
    pub prices: Prices,
    pub image_tokens: Option<u64>,
}

/// A target's compiled token prices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tariff {
    pub dialect: Dialect,
    pub models: BTreeMap<String, Model>,
    /// Prices for a model the list does not name (`None`: such a model is refused).
    pub default: Option<Model>,
    /// The output bound of a request that does not state its own (`None`: it is refused).
    pub max_tokens: Option<u64>,
    pub overhead: u64,
}

/// What one priced call carries from its reservation to its settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    pub dialect: Dialect,
    pub model: String,
    pub prices: Prices,
    pub stream: bool,
    /// The most it may cost: what is reserved before it is made.
    pub bound: u64,
    /// Not one of the models listed (priced by the default): its metric label is `other`.
    pub unlisted: bool,
}

fn price(path: &str, n: &serde_json::Number) -> Result<u64, (String, String)> {
    // A number's shortest decimal form (`2.5`, `0.075`, `15`), read exactly.
    let text = if let Some(i) = n.as_u64() { i.to_string() } else { n.as_f64().map(|f| f.to_string()).unwrap_or_default() };
    parse_price(&text).ok_or_else(|| (path.to_string(), "must be a price from 0 with at most six decimal places".to_string()))
}

fn model(path: &str, dialect: Dialect, raw: &RawPrices) -> Result<Model, (String, String)> {
    let input = price(&format!("{path}.input"), &raw.input)?;
    let output = price(&format!("{path}.output"), &raw.output)?;
    // Unset cache prices are never cheaper than the input (over-counted, never under): a cache
    // read at the input price, a cache write at twice it (Anthropic's dearest write). OpenAI
    // reports no cache writes (its cached input is part of the input count).
    let cached_input = raw.cached_input.as_ref().map(|n| price(&format!("{path}.cached_input"), n)).transpose()?.unwrap_or(input);
    let cache_write = match (dialect, &raw.cache_write) {
        (Dialect::OpenAi, Some(_)) => {
            return Err((format!("{path}.cache_write"), "OpenAI reports no cache writes: price them for an anthropic target only".into()))
        }
        (Dialect::OpenAi, None) => 0,
        (Dialect::Anthropic, Some(n)) => price(&format!("{path}.cache_write"), n)?,
        (Dialect::Anthropic, None) => input.saturating_mul(2),
    };
    let cache_write_1h = match (dialect, &raw.cache_write_1h) {
        (Dialect::OpenAi, Some(_)) => {
            return Err((format!("{path}.cache_write_1h"), "OpenAI reports no cache writes: price them for an anthropic target only".into()))
        }
        (Dialect::OpenAi, None) => 0,
        (Dialect::Anthropic, Some(n)) => price(&format!("{path}.cache_write_1h"), n)?,
        (Dialect::Anthropic, None) => cache_write.max(input.saturating_mul(2)),
    };
    if raw.image_tokens.is_some_and(|n| n == 0 || n > MAX_TOKENS) {
        return Err((format!("{path}.image_tokens"), "must be between 1 and 100000000".into()));
    }
    Ok(Model { prices: Prices { input, output, cached_input, cache_write, cache_write_1h }, image_tokens: raw.image_tokens })
}

fn valid_model(m: &str) -> bool {
    !m.is_empty() && m.len() <= 256 && !m.chars().any(char::is_control)
}

/// Compile a target's token prices (`path` names the `cost` in errors).
pub fn compile_tariff(
    path: &str,
    usage: &str,
    models: Option<&BTreeMap<String, RawPrices>>,
    default: Option<&RawPrices>,
    max_tokens: Option<u64>,
    overhead: Option<u64>,
) -> Result<Tariff, (String, String)> {
    let e = |p: &str, m: &str| Err((format!("{path}{p}"), m.to_string()));
    let dialect = match usage {
        "openai" => Dialect::OpenAi,
        "anthropic" => Dialect::Anthropic,
        _ => return e(".usage", "must be \"openai\" or \"anthropic\""),
    };
    let mut compiled = BTreeMap::new();
    for (m, raw) in models.into_iter().flatten() {
        if !valid_model(m) {
            return e(".models", "a model name must be 1 to 256 characters, none of them control characters");
        }
        compiled.insert(m.clone(), model(&format!("{path}.models.{m}"), dialect, raw)?);
    }
    let default = default.map(|d| model(&format!("{path}.default"), dialect, d)).transpose()?;
    if compiled.is_empty() && default.is_none() {
        return e(".models", "must price at least one model (or set a default)");
    }
    match max_tokens {
        Some(n) if n == 0 || n > MAX_TOKENS => return e(".max_tokens", "must be between 1 and 100000000"),
        _ => {}
    }
    let overhead = match overhead {
        None => DEFAULT_OVERHEAD_TOKENS,
        Some(n) if n <= MAX_TOKENS => n,
        Some(_) => return e(".input_overhead_tokens", "must be at most 100000000"),
    };
    Ok(Tariff { dialect, models: compiled, default, max_tokens, overhead })
}

impl Tariff {
    /// Read a call from its body and bound what it may cost (`path`: the vendor path). Refused (a
    /// message for 400) when it cannot be bounded: an endpoint not priced by usage, an unlisted
    /// model without a default, no output limit in it or the target, an image the model's price
    /// does not bound, input the vendor would fetch. Also returns the body to forward instead
    /// when the gateway adds to it: the target's output limit to a call that states none (the
    /// vendor would otherwise generate up to the model's own), and `stream_options.include_usage`
    /// to a stream that does not ask for its usage.
    pub fn meter(&self, body: &[u8], path: &str, forbidden: &dyn Fn(&str) -> bool) -> Result<(Meter, Option<Vec<u8>>), &'static str> {
        let a = asked(self.dialect, body, path, forbidden)?;
        let listed = self.models.get(&a.model);
        let model = listed.or(self.default.as_ref()).ok_or("this target does not price the model the body names")?;
        let max_output = a.max_output.or(self.max_tokens).ok_or("a call to this target must state its output limit (max_tokens)")?;
        if a.largest_limit > max_output && a.endpoint != super::Endpoint::Embeddings {
            return Err("two output limits that disagree");
        }
        let mut added: Vec<(&str, String)> = Vec::new();
        if let Some(field) = a.limit_field {
            added.push((field, max_output.to_string()));
        }
        if a.add_include_usage {
            added.push(("stream_options", "{\"include_usage\":true}".to_string()));
        }
        let forwarded = if added.is_empty() { None } else { Some(with_members(body, &added).ok_or("the body is not a JSON object")?) };
        let images = if a.images == 0 {
            0
        } else {
            let each = model.image_tokens.ok_or("images sent to this model are not priced here (set the model's image_tokens)")?;
            a.images.saturating_mul(each)
        };
        let bytes = forwarded.as_ref().map_or(body.len(), Vec::len) as u64;
        let output = max_output.saturating_mul(a.choices);
        let input = bytes.saturating_add(self.overhead).saturating_add(images);
        let b = bound(&model.prices, output, input);
        if b > crate::policy::cost::MAX_COST {
            return Err("the most this call could cost is beyond any cap");
        }
        Ok((Meter { dialect: self.dialect, model: a.model, prices: model.prices, stream: a.stream, bound: b, unlisted: listed.is_none() }, forwarded))
    }
}
