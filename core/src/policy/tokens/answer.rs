//! The usage a vendor reports, read strictly from an OpenAI-compatible or an Anthropic answer:
//! a whole JSON body, or server-sent events read as they pass (in any split).

use super::{Dialect, Usage, MAX_TOKENS};
use crate::wire::json::{self, Value};

fn tokens(v: Option<&Value>) -> Result<u64, &'static str> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Int(n)) => u64::try_from(*n).ok().filter(|n| *n <= MAX_TOKENS).ok_or("a token count is not a whole number"),
        Some(_) => Err("a token count is not a number"),
    }
}

/// The usage object of an OpenAI-compatible answer (chat/completions: `prompt_tokens`,
/// `completion_tokens`, `prompt_tokens_details.cached_tokens`; responses: `input_tokens`,
/// `output_tokens`, `input_tokens_details.cached_tokens`). Cached tokens are part of the input
/// count there: they are taken out of `input` and billed at the cached price.
pub fn openai_usage(u: &Value) -> Result<Usage, &'static str> {
    if u.as_object().is_none() {
        return Err("usage is not an object");
    }
    let (inp, out, details) = if u.get("prompt_tokens").is_some() || u.get("completion_tokens").is_some() {
        (tokens(u.get("prompt_tokens"))?, tokens(u.get("completion_tokens"))?, u.get("prompt_tokens_details"))
    } else if u.get("input_tokens").is_some() || u.get("output_tokens").is_some() {
        (tokens(u.get("input_tokens"))?, tokens(u.get("output_tokens"))?, u.get("input_tokens_details"))
    } else {
        return Err("usage reports no tokens");
    };
    let cached = tokens(details.and_then(|d| d.get("cached_tokens")))?;
    if cached > inp {
        return Err("more cached tokens than input tokens");
    }
    Ok(Usage { input: inp - cached, cached_input: cached, output: out, ..Usage::default() })
}

/// The usage object of an Anthropic answer (`input_tokens`, `output_tokens`,
/// `cache_creation_input_tokens`, `cache_read_input_tokens`; the three inputs are separate there).
pub fn anthropic_usage(u: &Value) -> Result<Usage, &'static str> {
    if u.as_object().is_none() {
        return Err("usage is not an object");
    }
    if u.get("input_tokens").is_none() && u.get("output_tokens").is_none() {
        return Err("usage reports no tokens");
    }
    // Writes for an hour are dearer: the breakdown says how many of all the writes they are (a
    // breakdown larger than the total is charged as written for an hour).
    let written = tokens(u.get("cache_creation_input_tokens"))?;
    let hour = tokens(u.get("cache_creation").and_then(|c| c.get("ephemeral_1h_input_tokens")))?;
    Ok(Usage {
        input: tokens(u.get("input_tokens"))?,
        cached_input: tokens(u.get("cache_read_input_tokens"))?,
        cache_write: written.saturating_sub(hour),
        cache_write_1h: hour,
        output: tokens(u.get("output_tokens"))?,
    })
}

/// The usage in a whole JSON answer: its top-level `usage`.
pub fn answer_usage(d: Dialect, body: &[u8]) -> Result<Usage, &'static str> {
    let v = json::parse(body).map_err(|_| "the answer is not JSON")?;
    let u = v.get("usage").ok_or("the answer has no usage")?;
    match d {
        Dialect::OpenAi => openai_usage(u),
        Dialect::Anthropic => anthropic_usage(u),
    }
}

/// The longest server-sent-event line read: the responses API's completed event repeats the whole
/// answer and its instructions (content chunks are passed through, only their lines are scanned).
pub const MAX_EVENT_LINE: usize = 4 * 1024 * 1024;

/// The usage of a streamed answer (server-sent events), read as the stream passes: OpenAI's
/// final chunk with a non-null `usage` and no choices (chat/completions, asked for with
/// `stream_options.include_usage`) or the responses API's `response.completed` (or
/// `.incomplete`, `.failed`) event; Anthropic's `message_start` (input and cache counts) and
/// `message_delta` (cumulative counts). Known only once the stream has said all of it: OpenAI's
/// usage, or Anthropic's `message_stop` after a delta with usage.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        let mut parts = bytes.split(|b| *b == b'\n').peekable();
        while let Some(part) = parts.next() {
            if self.broken {
                return;
            }
            if self.line.len() + part.len() > MAX_EVENT_LINE {
                self.broken = true;
                return;
            }
            self.line.extend_from_slice(part);
            // Every part but the last ended with a newline: a whole line.
            if parts.peek().is_some() {
                let line = std::mem::take(&mut self.line);
                self.event_line(&line);
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
            Dialect::OpenAi => self.openai_event(&v),
            Dialect::Anthropic => self.anthropic_event(&v),
        };
        if read.is_err() {
            self.broken = true;
        }
    }

    fn openai_event(&mut self, v: &Value) -> Result<(), &'static str> {
        let usage = match v.get("type").and_then(Value::as_str) {
            Some("response.completed" | "response.incomplete" | "response.failed") => v.get("response").and_then(|r| r.get("usage")),
            _ => v.get("usage"),
        };
        // The final count comes in a chunk of its own (no choices left); a running count in
        // content chunks (vLLM's continuous usage) is not yet the whole call's.
        let last = match v.get("choices") {
            None | Some(Value::Null) => true,
            Some(Value::Array(c)) => c.is_empty(),
            Some(_) => false,
        };
        match usage {
            None | Some(Value::Null) => Ok(()),
            Some(u) => openai_usage(u).map(|u| {
                self.usage = u;
                self.complete = last;
            }),
        }
    }

    fn anthropic_event(&mut self, v: &Value) -> Result<(), &'static str> {
        match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                let u = anthropic_usage(v.get("message").and_then(|m| m.get("usage")).ok_or("message_start without usage")?)?;
                self.usage = u;
                self.seen_start = true;
                Ok(())
            }
            Some("message_delta") if self.seen_start => {
                // Counts here are cumulative; input counts appear when server tools added input.
                let u = v.get("usage").ok_or("message_delta without its usage")?;
                let out = u.get("output_tokens").ok_or("message_delta without its usage")?;
                self.usage.output = tokens(Some(out))?;
                self.usage.input = self.usage.input.max(tokens(u.get("input_tokens"))?);
                self.usage.cached_input = self.usage.cached_input.max(tokens(u.get("cache_read_input_tokens"))?);
                self.usage.cache_write = self.usage.cache_write.max(tokens(u.get("cache_creation_input_tokens"))?);
                self.seen_delta = true;
                Ok(())
            }
            Some("message_delta") => Err("message_delta before message_start"),
            Some("message_stop") => {
                self.complete = self.seen_start && self.seen_delta;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The stream's whole usage, once it has said all of it and nothing in it was unreadable.
    pub fn usage(&self) -> Option<Usage> {
        (self.complete && !self.broken).then_some(self.usage)
    }
}
