//! What a model call asks for, read from its body before it is made: the model, the most output
//! it may generate, whether it streams, and whether everything it reads is in the body.
//!
//! The bound reserved before a call rests on one fact: every input token stands for at least one
//! byte of the body (plus a fixed allowance for the vendor's own formatting and tool prompts).
//! Content the vendor fetches or looks up itself (a file or an image by id or URL, an earlier
//! response or conversation, a stored prompt, a server-side tool's results) breaks that fact: a
//! few bytes can stand for a million tokens. Such requests are refused (400), never guessed.

use super::{Dialect, MAX_TOKENS};
use crate::wire::json::{self, Value};

/// The most completions one call may ask for (`n`, `best_of`).
pub const MAX_CHOICES: u64 = 128;

/// What the request says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    pub model: String,
    /// The most output tokens of one completion (`None`: it does not say).
    pub max_output: Option<u64>,
    /// How many completions the vendor generates (and bills): OpenAI's `n` or `best_of`.
    pub choices: u64,
    pub stream: bool,
}

/// Read a request body strictly: a top-level JSON object, `model` a string, the output limit a
/// non-negative integer (`max_tokens`, and for OpenAI `max_completion_tokens` or
/// `max_output_tokens`; two that disagree are refused), `stream` a boolean; nothing in it the
/// vendor would fetch or look up; and for an OpenAI completions stream, the usage asked for
/// (`stream_options.include_usage`: without it the stream never says what it cost). `path` is
/// the vendor path, without its query.
pub fn asked(dialect: Dialect, body: &[u8], path: &str) -> Result<Asked, &'static str> {
    let v = json::parse(body).map_err(|_| "the body is not JSON")?;
    if v.as_object().is_none() {
        return Err("the body is not a JSON object");
    }
    let model = match v.get("model") {
        Some(Value::Str(m)) if !m.is_empty() && m.len() <= 256 && !m.chars().any(char::is_control) => m.clone(),
        _ => return Err("the body names no model"),
    };
    let limits: &[&str] = match dialect {
        Dialect::OpenAi => &["max_tokens", "max_completion_tokens", "max_output_tokens"],
        Dialect::Anthropic => &["max_tokens"],
    };
    let mut max_output = None;
    for k in limits {
        let Some(n) = count(v.get(k), MAX_TOKENS).map_err(|_| "an output limit is not a whole number of tokens")? else { continue };
        if max_output.is_some_and(|m| m != n) {
            return Err("two output limits that disagree");
        }
        max_output = Some(n);
    }
    let stream = match v.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("stream is not a boolean"),
    };
    let choices = match dialect {
        Dialect::OpenAi => {
            let n = count(v.get("n"), MAX_CHOICES).map_err(|_| "n is not a number of completions from 1 to 128")?.unwrap_or(1);
            let best_of = count(v.get("best_of"), MAX_CHOICES).map_err(|_| "best_of is not a number of completions from 1 to 128")?.unwrap_or(1);
            n.max(best_of).max(1)
        }
        Dialect::Anthropic => 1,
    };
    if let Some(why) = outside_input(dialect, &v) {
        return Err(why);
    }
    if dialect == Dialect::OpenAi && stream && path.trim_end_matches('/').ends_with("completions") && !include_usage(&v) {
        return Err("a streamed call to this target must ask for its usage: \"stream_options\": {\"include_usage\": true}");
    }
    Ok(Asked { model, max_output, choices, stream })
}

/// A whole number from 0 to `max`, if given (`null` is not given).
fn count(v: Option<&Value>, max: u64) -> Result<Option<u64>, ()> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Int(n)) => u64::try_from(*n).ok().filter(|n| *n <= max).map(Some).ok_or(()),
        Some(_) => Err(()),
    }
}

fn include_usage(v: &Value) -> bool {
    matches!(v.get("stream_options").and_then(|o| o.get("include_usage")), Some(Value::Bool(true)))
}

/// Members that make the vendor read input that is not in the body.
const OUTSIDE: [&str; 7] = ["file_id", "file_url", "file_data", "previous_response_id", "conversation", "container", "mcp_servers"];

/// Why the body makes the vendor read input from elsewhere, if it does.
fn outside_input(dialect: Dialect, v: &Value) -> Option<&'static str> {
    // A stored prompt (the responses API's `prompt` object); a completions `prompt` is text.
    if matches!(v.get("prompt"), Some(Value::Object(_))) {
        return Some("a stored prompt cannot be priced before the call");
    }
    if let Some(Value::Array(tools)) = v.get("tools") {
        for t in tools {
            let kind = t.get("type").and_then(Value::as_str);
            let own = match dialect {
                Dialect::OpenAi => matches!(kind, Some("function" | "custom")),
                Dialect::Anthropic => matches!(kind, None | Some("custom")),
            };
            if !own {
                return Some(
                    "a tool the vendor runs itself (search, files, code, MCP) cannot be priced before the call; only the caller's own tools are allowed here",
                );
            }
        }
    }
    walk(v)
}

fn walk(v: &Value) -> Option<&'static str> {
    match v {
        Value::Object(members) => {
            for (k, m) in members {
                if OUTSIDE.contains(&k.as_str()) && !matches!(m, Value::Null) {
                    return Some("input the vendor looks up (a file, an earlier response or conversation, a container) cannot be priced before the call");
                }
                if (k == "url" || k.ends_with("_url")) && matches!(m, Value::Str(s) if !s.starts_with("data:")) {
                    return Some("content by URL cannot be priced before the call; send it inline (a data: URL or base64)");
                }
                if (k == "media_type" || k == "mime_type") && matches!(m, Value::Str(s) if s.eq_ignore_ascii_case("application/pdf")) {
                    return Some("a PDF document cannot be priced before the call (its pages are read as images)");
                }
                if let Some(why) = walk(m) {
                    return Some(why);
                }
            }
            None
        }
        Value::Array(items) => items.iter().find_map(walk),
        _ => None,
    }
}
