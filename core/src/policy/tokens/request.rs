//! What a model call asks for, read from its body before it is made: the endpoint (from the
//! path), the model, the most output it may generate, how many completions, whether it streams,
//! how many images it carries, and whether everything it reads is in the body.
//!
//! The bound reserved before a call rests on one fact: every input token stands for at least one
//! byte of the body (plus a fixed allowance for the vendor's own formatting and tool prompts, and
//! a configured allowance per image). Content the vendor fetches or looks up itself (a file or an
//! image by id or URL, an earlier response, item or conversation, a stored prompt, a server-side
//! tool's results) breaks that fact: a few bytes can stand for a million tokens. Such requests are
//! refused (400), never guessed.

use super::{Dialect, MAX_TOKENS};
use crate::wire::json::{self, Value};

/// The most completions one call may ask for (`n`, `best_of`, prompts of a completions call).
pub const MAX_CHOICES: u64 = 128;

/// The endpoints a usage price applies to, from the vendor path's last segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// OpenAI's `…/chat/completions`: `max_completion_tokens` (or the older `max_tokens`), `n`.
    Chat,
    /// OpenAI's legacy `…/completions`: `max_tokens`, `n`, `best_of`, a prompt or a list of them.
    Completions,
    /// OpenAI's `…/responses`: `max_output_tokens`.
    Responses,
    /// OpenAI's `…/embeddings`: input only.
    Embeddings,
    /// Anthropic's `…/messages`: `max_tokens`.
    Messages,
}

impl Endpoint {
    /// The endpoint of a vendor path, whatever its case (a vendor may route paths so).
    pub fn of(dialect: Dialect, path: &str) -> Option<Endpoint> {
        let p = path.split('?').next().unwrap_or_default().to_ascii_lowercase();
        match dialect {
            Dialect::OpenAi if p.ends_with("/chat/completions") => Some(Endpoint::Chat),
            Dialect::OpenAi if p.ends_with("/completions") => Some(Endpoint::Completions),
            Dialect::OpenAi if p.ends_with("/responses") => Some(Endpoint::Responses),
            Dialect::OpenAi if p.ends_with("/embeddings") => Some(Endpoint::Embeddings),
            Dialect::Anthropic if p.ends_with("/messages") => Some(Endpoint::Messages),
            _ => None,
        }
    }

    /// The output limits the endpoint reads (all of those given must agree), and the one the
    /// gateway adds to a call that gives none.
    fn limits(self) -> (&'static [&'static str], Option<&'static str>) {
        match self {
            Endpoint::Chat => (&["max_completion_tokens", "max_tokens"], Some("max_completion_tokens")),
            Endpoint::Completions | Endpoint::Messages => (&["max_tokens"], Some("max_tokens")),
            Endpoint::Responses => (&["max_output_tokens"], Some("max_output_tokens")),
            Endpoint::Embeddings => (&[], None),
        }
    }
}

/// What the request says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    pub endpoint: Endpoint,
    pub model: String,
    /// The most output tokens of one completion (`None`: it does not say; `Some(0)` for
    /// embeddings).
    pub max_output: Option<u64>,
    /// The member that states the limit, for a call that states none (the gateway adds it).
    pub limit_field: Option<&'static str>,
    /// How many completions the vendor generates (and bills): `n`, `best_of`, times the prompts
    /// of a completions call.
    pub choices: u64,
    pub stream: bool,
    /// A stream that does not ask for its usage, where the endpoint needs it asked for
    /// (`stream_options.include_usage`): the gateway adds it.
    pub add_include_usage: bool,
    /// Images in the input (their tokens are not bounded by their bytes).
    pub images: u64,
    /// The largest output limit given under any name (a vendor that routes the path otherwise
    /// may read another one): it may not exceed the bound.
    pub largest_limit: u64,
}

/// Every output limit any endpoint reads: whichever a vendor reads, none may exceed the bound.
const ALL_LIMITS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// Read a request body strictly: a top-level JSON object, `model` a string, each output limit the
/// endpoint reads a positive integer (those given must agree; no other limit above them, none
/// `null`), `stream` a boolean, `n`, `best_of` and `service_tier` as the vendor bills them;
/// nothing in it the vendor would fetch or look up, and no string in it that `forbidden` finds
/// (a copy of the caller's credential, however the JSON escapes it). `path` is the vendor path.
pub fn asked(dialect: Dialect, body: &[u8], path: &str, forbidden: &dyn Fn(&str) -> bool) -> Result<Asked, &'static str> {
    let endpoint = Endpoint::of(dialect, path).ok_or(match dialect {
        Dialect::OpenAi => {
            "this path is not priced by usage (chat/completions, completions, responses, embeddings): make it free or call it through another target"
        }
        Dialect::Anthropic => "this path is not priced by usage (messages): make it free or call it through another target",
    })?;
    let v = json::parse(body).map_err(|_| "the body is not JSON")?;
    if v.as_object().is_none() {
        return Err("the body is not a JSON object");
    }
    let model = match v.get("model") {
        Some(Value::Str(m)) if !m.is_empty() && m.len() <= 256 && !m.chars().any(char::is_control) => m.clone(),
        _ => return Err("the body names no model"),
    };
    let (fields, add) = endpoint.limits();
    let mut max_output = (endpoint == Endpoint::Embeddings).then_some(0);
    let mut largest_limit = 0;
    for k in ALL_LIMITS {
        // `null` reads as "the model's own limit" at the vendor; a member the gateway would add
        // must not be there at all.
        if matches!(v.get(k), Some(Value::Null)) {
            return Err("an output limit is null: give a number of tokens, or leave it out");
        }
        let n = count(v.get(k), MAX_TOKENS).map_err(|_| "an output limit is not a whole number of tokens")?;
        largest_limit = largest_limit.max(n.unwrap_or(0));
    }
    for k in fields {
        let Some(n) = count(v.get(k), MAX_TOKENS).map_err(|_| "an output limit is not a whole number of tokens")? else { continue };
        if n == 0 {
            return Err("an output limit of 0 tokens");
        }
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
    let choices = choices(endpoint, &v)?;
    if let Some(why) = outside_input(dialect, &v) {
        return Err(why);
    }
    if dialect == Dialect::OpenAi && !matches!(v.get("service_tier"), None | Some(Value::Null)) {
        match v.get("service_tier").and_then(Value::as_str) {
            Some("auto" | "default" | "flex") => {}
            _ => return Err("a service tier billed above the listed prices (priority, scale) cannot be priced here"),
        }
    }
    let add_include_usage = match (endpoint, stream, v.get("stream_options")) {
        (Endpoint::Chat | Endpoint::Completions, true, None) => true,
        (Endpoint::Chat | Endpoint::Completions, true, Some(o)) if !matches!(o.get("include_usage"), Some(Value::Bool(true))) => {
            return Err("a streamed call to this target must ask for its usage: \"stream_options\": {\"include_usage\": true}");
        }
        _ => false,
    };
    if let Some(Value::Array(m)) = v.get("modalities") {
        if m.iter().any(|x| x.as_str() != Some("text")) {
            return Err("audio output is billed above the text price: it cannot be priced here");
        }
    }
    if !matches!(v.get("prediction"), None | Some(Value::Null)) {
        return Err("a predicted output is billed as output where it is rejected: it cannot be priced here");
    }
    if strings(&v, forbidden) {
        return Err("the body holds a copy of the credential");
    }
    let mut images = 0;
    count_images(&v, &mut images);
    Ok(Asked { endpoint, model, limit_field: add.filter(|_| max_output.is_none()), max_output, choices, stream, add_include_usage, images, largest_limit })
}

/// Is there a key or a string in `v` that `forbidden` finds?
fn strings(v: &Value, forbidden: &dyn Fn(&str) -> bool) -> bool {
    match v {
        Value::Str(s) => forbidden(s),
        Value::Object(members) => members.iter().any(|(k, m)| forbidden(k) || strings(m, forbidden)),
        Value::Array(items) => items.iter().any(|i| strings(i, forbidden)),
        _ => false,
    }
}

/// A whole number from 0 to `max`, if given (`null` is not given).
fn count(v: Option<&Value>, max: u64) -> Result<Option<u64>, ()> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Int(n)) => u64::try_from(*n).ok().filter(|n| *n <= max).map(Some).ok_or(()),
        Some(_) => Err(()),
    }
}

/// How many completions the vendor bills: `n` (chat, completions), `best_of` (completions), times
/// the prompts of a completions call (a list of texts or of token lists is one prompt each).
fn choices(endpoint: Endpoint, v: &Value) -> Result<u64, &'static str> {
    let n = || count(v.get("n"), MAX_CHOICES).map_err(|_| "n is not a number of completions from 1 to 128");
    Ok(match endpoint {
        Endpoint::Chat => n()?.unwrap_or(1).max(1),
        Endpoint::Completions => {
            let best_of = count(v.get("best_of"), MAX_CHOICES).map_err(|_| "best_of is not a number of completions from 1 to 128")?.unwrap_or(1);
            let prompts = match v.get("prompt") {
                Some(Value::Array(items)) if items.iter().any(|i| matches!(i, Value::Str(_) | Value::Array(_))) => items.len() as u64,
                _ => 1,
            };
            let c = n()?.unwrap_or(1).max(best_of).max(1).saturating_mul(prompts.max(1));
            if c > MAX_CHOICES * MAX_CHOICES {
                return Err("too many prompts and completions in one call");
            }
            c
        }
        Endpoint::Responses | Endpoint::Embeddings | Endpoint::Messages => 1,
    })
}

/// Members that make the vendor read input that is not in the body.
const OUTSIDE: [&str; 7] = ["file_id", "file_url", "file_data", "previous_response_id", "conversation", "container", "mcp_servers"];
/// Content types that stand for input kept at the vendor.
const OUTSIDE_TYPES: [&str; 3] = ["item_reference", "input_file", "file"];
/// Content types that are images.
const IMAGE_TYPES: [&str; 3] = ["image_url", "input_image", "image"];

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
            if v.get("type").and_then(Value::as_str).is_some_and(|t| OUTSIDE_TYPES.contains(&t)) {
                return Some("input the vendor looks up (a file, a stored item) cannot be priced before the call");
            }
            for (k, m) in members {
                if OUTSIDE.contains(&k.as_str()) && !matches!(m, Value::Null) {
                    return Some("input the vendor looks up (a file, an earlier response or conversation, a container) cannot be priced before the call");
                }
                if k == "audio" && m.get("id").is_some() {
                    return Some("an earlier answer's audio by id cannot be priced before the call");
                }
                if (k == "url" || k.ends_with("_url")) && matches!(m, Value::Str(s) if !s.starts_with("data:")) {
                    return Some("content by URL cannot be priced before the call; send it inline (a data: URL or base64)");
                }
                if (k == "media_type" || k == "mime_type") && matches!(m, Value::Str(s) if s.trim_start().to_ascii_lowercase().starts_with("application/pdf")) {
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

/// Count the images in the input: content parts typed as images, or carrying an `image_url`.
fn count_images(v: &Value, n: &mut u64) {
    match v {
        Value::Object(members) => {
            if v.get("type").and_then(Value::as_str).is_some_and(|t| IMAGE_TYPES.contains(&t)) || v.get("image_url").is_some() {
                *n += 1;
            }
            for (_, m) in members {
                count_images(m, n);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| count_images(i, n)),
        _ => {}
    }
}

/// The body with members added after its opening brace (`members`: key and JSON value; none of
/// them is in the body, which `asked` read as one object).
pub fn with_members(body: &[u8], members: &[(&str, String)]) -> Option<Vec<u8>> {
    let open = body.iter().position(|b| !b.is_ascii_whitespace()).filter(|i| body.get(*i) == Some(&b'{'))?;
    let empty = body.get(open + 1..)?.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let mut added = String::new();
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            added.push(',');
        }
        json::write_str(&mut added, k);
        added.push(':');
        added.push_str(v);
    }
    if !empty {
        added.push(',');
    }
    let mut out = Vec::with_capacity(body.len() + added.len());
    out.extend_from_slice(body.get(..=open)?);
    out.extend_from_slice(added.as_bytes());
    out.extend_from_slice(body.get(open + 1..)?);
    Some(out)
}
