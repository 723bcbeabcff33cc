//! What a model call costs, from its token usage: prices per million tokens per model, in the
//! cap's unit (US cents, say), with exact integer arithmetic, rounded up; the most a call may cost
//! before it is made (what it may generate, and a bound on what it reads); and the usage a vendor
//! reports, read strictly from an OpenAI-compatible or an Anthropic answer (JSON or server-sent
//! events).
//!
//! A price is a decimal with at most six places (0.075 cents per million tokens is `0.075`), held
//! as millionths, so that `tokens × price` is exact in `u128` and one division rounds it up.

/// A price's unit: millionths of the cap's unit per million tokens.
const PRICE_SCALE: u128 = 1_000_000;
/// Tokens per price ("per million tokens").
const PER: u128 = 1_000_000;
/// The most tokens of each kind a usage report may claim (a report above is not a usage).
pub const MAX_TOKENS: u64 = 100_000_000;

/// A model's prices, in millionths of the cap's unit per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Prices {
    pub input: u64,
    pub output: u64,
    /// Input read from the vendor's prompt cache (cheaper), when the vendor reports it.
    pub cached_input: u64,
    /// Input written to the prompt cache (Anthropic's `cache_creation_input_tokens`), and written
    /// for an hour (its `ephemeral_1h_input_tokens`, dearer).
    pub cache_write: u64,
    pub cache_write_1h: u64,
}

/// A decimal price (`"2.5"`, `"0.075"`, `"15"`) as millionths; `None` for anything else.
pub fn parse_price(s: &str) -> Option<u64> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() || whole.len() > 12 || frac.len() > 6 || !whole.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.ends_with('.') {
        return None;
    }
    let w: u64 = whole.parse().ok()?;
    let mut f: u64 = if frac.is_empty() { 0 } else { frac.parse().ok()? };
    for _ in frac.len()..6 {
        f *= 10;
    }
    w.checked_mul(1_000_000)?.checked_add(f)
}

/// What a model call used, as its vendor reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Input tokens billed at the input price (cached and cache-write ones excluded).
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub cache_write_1h: u64,
    pub output: u64,
}

/// `tokens × price`, summed, in the cap's unit, rounded up.
pub fn cost(prices: &Prices, u: &Usage) -> u64 {
    let part = |n: u64, p: u64| u128::from(n).saturating_mul(u128::from(p));
    let sum = part(u.input, prices.input)
        .saturating_add(part(u.cached_input, prices.cached_input))
        .saturating_add(part(u.cache_write, prices.cache_write))
        .saturating_add(part(u.cache_write_1h, prices.cache_write_1h))
        .saturating_add(part(u.output, prices.output));
    let d = PRICE_SCALE * PER;
    u64::try_from(sum.div_ceil(d)).unwrap_or(u64::MAX)
}

/// The most a call may cost before it is made: every output token it may generate at the output
/// price, and every byte of its body as an input token at the dearest input price (a token is at
/// least one byte of the text it stands for; an image's tokens are far fewer than its bytes).
pub fn bound(prices: &Prices, max_output: u64, body_bytes: u64) -> u64 {
    let dearest_input = prices.input.max(prices.cache_write).max(prices.cache_write_1h).max(prices.cached_input);
    let u = Usage { output: max_output, ..Usage::default() };
    let out = cost(prices, &u);
    let inp = cost(&Prices { input: dearest_input, ..Prices::default() }, &Usage { input: body_bytes, ..Usage::default() });
    out.saturating_add(inp)
}

/// Which vendor's shapes a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI's chat/completions and responses, and the many compatible APIs.
    OpenAi,
    Anthropic,
}

mod answer;
mod request;
mod tariff;

pub use answer::{answer_usage, anthropic_usage, openai_usage, StreamUsage, MAX_EVENT_LINE};
pub use request::{asked, with_members, Asked, Endpoint, MAX_CHOICES};
pub use tariff::{compile_tariff, Meter, Model, RawPrices, Tariff, DEFAULT_OVERHEAD_TOKENS};

#[cfg(test)]
mod tests;
