//! What a model call costs, from its token usage: prices per million tokens per model, in the
//! cap's unit (US cents, say), with exact integer arithmetic, rounded up; the most a call may cost
//! before it is made (what it may generate, and a bound on what it reads); and the usage a vendor
//! reports, read strictly from an OpenAI-compatible or an Anthropic answer (JSON or server-sent
//! events).
//!
//! A price is a decimal with at most six places (0.075 cents per million tokens is `0.075`), held
//! as millionths, so that `tokens × price` is exact in `u128` and one division rounds it up.

use crate::wire::json::{self, Value};

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
    /// Input written to the prompt cache (Anthropic's `cache_creation_input_tokens`).
    pub cache_write: u64,
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
    pub output: u64,
}

/// `tokens × price`, summed, in the cap's unit, rounded up.
pub fn cost(prices: &Prices, u: &Usage) -> u64 {
    let sum = u128::from(u.input) * u128::from(prices.input)
        + u128::from(u.cached_input) * u128::from(prices.cached_input)
        + u128::from(u.cache_write) * u128::from(prices.cache_write)
        + u128::from(u.output) * u128::from(prices.output);
    let d = PRICE_SCALE * PER;
    u64::try_from(sum.div_ceil(d)).unwrap_or(u64::MAX)
}

/// The most a call may cost before it is made: every output token it may generate at the output
/// price, and every byte of its body as an input token at the dearest input price (a token is at
/// least one byte of the text it stands for; an image's tokens are far fewer than its bytes).
pub fn bound(prices: &Prices, max_output: u64, body_bytes: u64) -> u64 {
    let dearest_input = prices.input.max(prices.cache_write).max(prices.cached_input);
    let u = Usage { input: 0, cached_input: 0, cache_write: 0, output: max_output };
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

/// What the request says of itself: its model and the most output it asks for (`None`: it does
/// not say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    pub model: String,
    pub max_output: Option<u64>,
    pub stream: bool,
}

/// Read a request body's model, output limit and `stream` flag, strictly: a top-level JSON
/// object, `model` a string, the limit a non-negative integer (`max_tokens`, and for OpenAI
/// `max_completion_tokens` or `max_output_tokens`; two that disagree are refused).
pub fn asked(body: &[u8]) -> Result<Asked, &'static str> {
    let v = json::parse(body).map_err(|_| "the body is not JSON")?;
    if v.as_object().is_none() {
        return Err("the body is not a JSON object");
    }
    let get = |k: &str| v.get(k);
    let model = match get("model") {
        Some(Value::Str(m)) if !m.is_empty() && m.len() <= 256 && !m.chars().any(char::is_control) => m.clone(),
        _ => return Err("the body names no model"),
    };
    let mut max_output = None;
    for k in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
        let Some(v) = get(k) else { continue };
        let n = match v {
            Value::Int(n) => u64::try_from(*n).ok().filter(|n| *n <= MAX_TOKENS).ok_or("an output limit is not a whole number of tokens")?,
            Value::Null => continue,
            _ => return Err("an output limit is not a number"),
        };
        if max_output.is_some_and(|m| m != n) {
            return Err("two output limits that disagree");
        }
        max_output = Some(n);
    }
    let stream = match get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("stream is not a boolean"),
    };
    Ok(Asked { model, max_output, stream })
}

fn tokens(v: Option<&Value>) -> Result<u64, &'static str> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Int(n)) => u64::try_from(*n).ok().filter(|n| *n <= MAX_TOKENS).ok_or("a token count is not a whole number"),
        Some(_) => Err("a token count is not a number"),
    }
}

fn member<'a>(v: &'a Value, k: &str) -> Option<&'a Value> {
    v.get(k)
}

/// The usage object of an OpenAI-compatible answer (chat/completions: `prompt_tokens`,
/// `completion_tokens`, `prompt_tokens_details.cached_tokens`; responses: `input_tokens`,
/// `output_tokens`, `input_tokens_details.cached_tokens`). Cached tokens are part of the input
/// count there: they are taken out of `input` and billed at the cached price.
pub fn openai_usage(u: &Value) -> Result<Usage, &'static str> {
    if u.as_object().is_none() {
        return Err("usage is not an object");
    }
    let (inp, out, details) = if member(u, "prompt_tokens").is_some() || member(u, "completion_tokens").is_some() {
        (tokens(member(u, "prompt_tokens"))?, tokens(member(u, "completion_tokens"))?, member(u, "prompt_tokens_details"))
    } else if member(u, "input_tokens").is_some() || member(u, "output_tokens").is_some() {
        (tokens(member(u, "input_tokens"))?, tokens(member(u, "output_tokens"))?, member(u, "input_tokens_details"))
    } else {
        return Err("usage reports no tokens");
    };
    let cached = tokens(details.and_then(|d| member(d, "cached_tokens")))?;
    if cached > inp {
        return Err("more cached tokens than input tokens");
    }
    Ok(Usage { input: inp - cached, cached_input: cached, cache_write: 0, output: out })
}

/// The usage object of an Anthropic answer (`input_tokens`, `output_tokens`,
/// `cache_creation_input_tokens`, `cache_read_input_tokens`; the three inputs are separate there).
pub fn anthropic_usage(u: &Value) -> Result<Usage, &'static str> {
    if u.as_object().is_none() {
        return Err("usage is not an object");
    }
    if member(u, "input_tokens").is_none() && member(u, "output_tokens").is_none() {
        return Err("usage reports no tokens");
    }
    Ok(Usage {
        input: tokens(member(u, "input_tokens"))?,
        cached_input: tokens(member(u, "cache_read_input_tokens"))?,
        cache_write: tokens(member(u, "cache_creation_input_tokens"))?,
        output: tokens(member(u, "output_tokens"))?,
    })
}

/// The usage in a whole JSON answer: its top-level `usage`.
pub fn answer_usage(d: Dialect, body: &[u8]) -> Result<Usage, &'static str> {
    let v = json::parse(body).map_err(|_| "the answer is not JSON")?;
    let u = member(&v, "usage").ok_or("the answer has no usage")?;
    match d {
        Dialect::OpenAi => openai_usage(u),
        Dialect::Anthropic => anthropic_usage(u),
    }
}

/// The longest server-sent-event line read (a usage event is a few hundred bytes; content chunks
/// are passed through, only their lines are scanned).
pub const MAX_EVENT_LINE: usize = 256 * 1024;

/// The usage of a streamed answer (server-sent events), read as the stream passes: OpenAI's
/// final chunk with a non-null `usage` (the request asks for it with
/// `stream_options.include_usage`); Anthropic's `message_start` (input and cache counts) and
/// `message_delta` (the output count so far). Known only once the stream has said all of it:
/// OpenAI's usage chunk, or Anthropic's `message_stop` after a delta with usage.
#[derive(Debug, Clone)]
pub struct StreamUsage {
    dialect: Dialect,
    line: Vec<u8>,
    usage: Usage,
    seen_start: bool,
    seen_delta: bool,
    complete: bool,
    broken: bool,
}

impl StreamUsage {
    pub fn new(dialect: Dialect) -> StreamUsage {
        StreamUsage { dialect, line: Vec::new(), usage: Usage::default(), seen_start: false, seen_delta: false, complete: false, broken: false }
    }

    /// Read the next bytes of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.broken {
                return;
            }
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.event_line(&line);
            } else if self.line.len() >= MAX_EVENT_LINE {
                self.broken = true;
            } else {
                self.line.push(b);
            }
        }
    }

    fn event_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else { return };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            return;
        }
        let Ok(v) = json::parse(data) else {
            self.broken = true;
            return;
        };
        let read = match self.dialect {
            Dialect::OpenAi => match member(&v, "usage") {
                None | Some(Value::Null) => Ok(()),
                Some(u) => openai_usage(u).map(|u| {
                    self.usage = u;
                    self.complete = true;
                }),
            },
            Dialect::Anthropic => match member(&v, "type").and_then(Value::as_str) {
                Some("message_start") => match member(&v, "message").and_then(|m| member(m, "usage")) {
                    Some(u) => anthropic_usage(u).map(|u| {
                        self.usage = u;
                        self.seen_start = true;
                    }),
                    None => Err("message_start without usage"),
                },
                Some("message_delta") => match member(&v, "usage").map(|u| tokens(member(u, "output_tokens"))) {
                    Some(Ok(out)) if self.seen_start => {
                        self.usage.output = out;
                        self.seen_delta = true;
                        Ok(())
                    }
                    _ => Err("message_delta without its usage"),
                },
                Some("message_stop") => {
                    self.complete = self.seen_start && self.seen_delta;
                    Ok(())
                }
                _ => Ok(()),
            },
        };
        if read.is_err() {
            self.broken = true;
        }
    }

    /// The stream's whole usage, once it has said all of it and nothing in it was unreadable.
    pub fn usage(&self) -> Option<Usage> {
        (self.complete && !self.broken).then_some(self.usage)
    }
}

#[cfg(test)]
mod tests;
