//! OpenAI requests as `hat serve device` accepts them: parsed with async-openai's own types, checked
//! field by field (what hat cannot honour is refused with an OpenAI-shaped 400, never ignored), and
//! turned into a prompt and generation options. Also the incremental detokenizer that applies `stop`.

use async_openai::types::chat::{ChatCompletionRequestMessage, CreateChatCompletionRequest, Prompt, StopConfiguration};
use async_openai::types::completions::CreateCompletionRequest;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// An error reply in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>, code: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code,
        }
    }

    pub fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// What a request asks to generate, once checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub model: String,
    pub input: Input,
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// (role, text) turns for the model's chat template.
    Chat(Vec<(String, String)>),
    Text(String),
    Tokens(Vec<u32>),
}

/// Fields hat reads from a chat request. `user` and `safety_identifier` only name the caller.
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "user",
    "safety_identifier",
];

const COMPLETION_FIELDS: &[&str] =
    &["prompt", "model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "user", "echo", "best_of"];

/// Parameters hat does not implement, with the value that means "off", which is accepted.
fn neutral(key: &str, v: &Value) -> bool {
    match key {
        "frequency_penalty" | "presence_penalty" => v.as_f64() == Some(0.0),
        "logprobs" => v == &json!(false),
        "logit_bias" | "metadata" => v.as_object().is_some_and(|o| o.is_empty()),
        "store" | "parallel_tool_calls" => v == &json!(false),
        "tools" | "functions" => v.as_array().is_some_and(|a| a.is_empty()),
        "tool_choice" | "function_call" => v == &json!("none"),
        "response_format" => v.get("type") == Some(&json!("text")),
        "modalities" => v == &json!(["text"]),
        "service_tier" => v == &json!("auto") || v == &json!("default"),
        "suffix" => v == &json!(""),
        _ => false,
    }
}

/// Known OpenAI parameters hat does not implement.
const UNSUPPORTED: &[&str] = &[
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "metadata",
    "store",
    "parallel_tool_calls",
    "tools",
    "functions",
    "tool_choice",
    "function_call",
    "response_format",
    "modalities",
    "audio",
    "prediction",
    "reasoning_effort",
    "verbosity",
    "service_tier",
    "web_search_options",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "moderation",
    "suffix",
];

/// Refuses any field outside `known` unless it is null or set to its "off" value.
fn check_fields(body: &Value, known: &[&str]) -> Result<(), ApiError> {
    let Some(obj) = body.as_object() else {
        return Err(ApiError::bad_request("the request body must be a JSON object", None, None));
    };
    for (key, v) in obj {
        if known.contains(&key.as_str()) || v.is_null() || neutral(key, v) {
            continue;
        }
        let message = if UNSUPPORTED.contains(&key.as_str()) {
            format!(
                "`{key}` is not supported by hat serve device (only text generation with temperature, top_p, seed, stop and max_tokens)"
            )
        } else {
            format!("Unrecognized request argument supplied: {key}")
        };
        return Err(ApiError::bad_request(message, Some(key), Some("unsupported_parameter")));
    }
    Ok(())
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<(Value, T), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}"), None, Some("invalid_json")))?;
    let typed = serde_json::from_value(value.clone()).map_err(|e| ApiError::bad_request(format!("invalid request: {e}"), None, None))?;
    Ok((value, typed))
}

/// Checks the fields every endpoint shares.
#[allow(clippy::too_many_arguments)]
fn common(
    model: String,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<StopConfiguration>,
    n: Option<u8>,
    stream: Option<bool>,
    include_usage: Option<bool>,
    has_stream_options: bool,
    input: Input,
) -> Result<Spec, ApiError> {
    if n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported", Some("n"), Some("unsupported_value")));
    }
    let temperature = f64::from(temperature.unwrap_or(1.0));
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request("temperature must be between 0 and 2", Some("temperature"), Some("invalid_value")));
    }
    let top_p = top_p.map(f64::from);
    if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(ApiError::bad_request("top_p must be above 0 and at most 1", Some("top_p"), Some("invalid_value")));
    }
    if max_tokens == Some(0) {
        return Err(ApiError::bad_request("max_tokens must be at least 1", Some("max_tokens"), Some("invalid_value")));
    }
    let stop = match stop {
        None => Vec::new(),
        Some(StopConfiguration::String(s)) => vec![s],
        Some(StopConfiguration::StringArray(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("stop takes at most 4 non-empty strings", Some("stop"), Some("invalid_value")));
    }
    let stream = stream.unwrap_or(false);
    if has_stream_options && !stream {
        return Err(ApiError::bad_request("stream_options is only allowed when stream is true", Some("stream_options"), None));
    }
    Ok(Spec {
        model,
        input,
        max_tokens: max_tokens.map(|n| n as usize),
        temperature,
        top_p,
        seed: seed.map(|s| s as u64),
        stop,
        stream,
        include_usage: include_usage.unwrap_or(false),
    })
}

/// The text of a message's content: a string, or an array of text parts.
fn text_of(content: Option<&Value>, role: &str) -> Result<String, ApiError> {
    let param = Some("messages");
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::bad_request(
                            format!("only text content is supported; a {role} message has a `{}` part", kind.unwrap_or("?")),
                            param,
                            Some("unsupported_value"),
                        ))
                    }
                }
            }
            Ok(text)
        }
        Some(_) => Err(ApiError::bad_request("message content must be a string or an array of text parts", param, None)),
    }
}

fn turns(messages: &[ChatCompletionRequestMessage]) -> Result<Vec<(String, String)>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages must hold at least one message", Some("messages"), None));
    }
    let mut out = Vec::with_capacity(messages.len());
    for m in messages {
        // Back to JSON: the message variants differ only in their role and content types.
        let v = serde_json::to_value(m).map_err(|e| ApiError::bad_request(e.to_string(), Some("messages"), None))?;
        let role = v.get("role").and_then(Value::as_str).unwrap_or("?").to_string();
        let role = match role.as_str() {
            "developer" => "system".to_string(),
            "system" | "user" | "assistant" => role,
            other => {
                return Err(ApiError::bad_request(
                    format!("`{other}` messages are not supported (no tools or functions)"),
                    Some("messages"),
                    Some("unsupported_value"),
                ))
            }
        };
        if v.get("tool_calls").is_some_and(|t| !t.is_null()) || v.get("audio").is_some_and(|a| !a.is_null()) {
            return Err(ApiError::bad_request(
                "tool calls and audio in messages are not supported",
                Some("messages"),
                Some("unsupported_value"),
            ));
        }
        let text = text_of(v.get("content"), &role)?;
        out.push((role, text));
    }
    Ok(out)
}

#[allow(deprecated)] // `max_tokens` and `seed` are deprecated in the schema, and clients still send them.
pub fn parse_chat(body: &[u8]) -> Result<Spec, ApiError> {
    let (value, req): (Value, CreateChatCompletionRequest) = parse_json(body)?;
    check_fields(&value, CHAT_FIELDS)?;
    let input = Input::Chat(turns(&req.messages)?);
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    let opts = req.stream_options;
    common(
        req.model,
        max_tokens,
        req.temperature,
        req.top_p,
        req.seed,
        req.stop,
        req.n,
        req.stream,
        opts.and_then(|o| o.include_usage),
        opts.is_some(),
        input,
    )
}

pub fn parse_completion(body: &[u8]) -> Result<Spec, ApiError> {
    let (value, req): (Value, CreateCompletionRequest) = parse_json(body)?;
    check_fields(&value, COMPLETION_FIELDS)?;
    if req.echo == Some(true) {
        return Err(ApiError::bad_request("echo is not supported", Some("echo"), Some("unsupported_value")));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::bad_request("only best_of = 1 is supported", Some("best_of"), Some("unsupported_value")));
    }
    let one =
        |what: &str| ApiError::bad_request(format!("send one prompt per request ({what})"), Some("prompt"), Some("unsupported_value"));
    let input = match req.prompt {
        Prompt::String(s) => Input::Text(s),
        Prompt::StringArray(mut v) if v.len() == 1 => Input::Text(v.remove(0)),
        Prompt::StringArray(_) => return Err(one("an array of several strings")),
        Prompt::IntegerArray(ids) => Input::Tokens(ids),
        Prompt::ArrayOfIntegerArray(mut v) if v.len() == 1 => Input::Tokens(v.remove(0)),
        Prompt::ArrayOfIntegerArray(_) => return Err(one("several token arrays")),
    };
    let opts = req.stream_options;
    common(
        req.model,
        req.max_tokens,
        req.temperature,
        req.top_p,
        req.seed,
        req.stop,
        req.n,
        req.stream,
        opts.and_then(|o| o.include_usage),
        opts.is_some(),
        input,
    )
}

/// Turns tokens into text as they arrive: holds back bytes that do not yet form whole characters
/// and any tail that may be the start of a stop string, and ends the text before the first stop
/// string.
pub struct TextDelta<'a> {
    tokenizer: &'a tokenizers::Tokenizer,
    stops: Vec<String>,
    tokens: Vec<u32>,
    text: String,
    sent: usize,
    stopped: bool,
}

impl<'a> TextDelta<'a> {
    pub fn new(tokenizer: &'a tokenizers::Tokenizer, stops: Vec<String>) -> Self {
        Self { tokenizer, stops, tokens: Vec::new(), text: String::new(), sent: 0, stopped: false }
    }

    /// A stop string was found: the reply ends.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a token and returns the text now safe to send, if any.
    pub fn push(&mut self, token: u32) -> Option<String> {
        if self.stopped {
            return None;
        }
        self.tokens.push(token);
        self.text = self.tokenizer.decode(&self.tokens, true).ok()?;
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        if let Some(at) = self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min() {
            self.stopped = true;
            self.text.truncate(at);
            return self.take(at);
        }
        let mut safe = self.text.trim_end_matches('\u{fffd}').len();
        let end = safe;
        for s in &self.stops {
            // The longest proper prefix of `s` the text ends with stays unsent.
            let prefixes: Vec<usize> = s.char_indices().skip(1).map(|(k, _)| k).collect();
            if let Some(k) = prefixes.into_iter().rev().find(|&k| self.text[..end].ends_with(&s[..k])) {
                safe = safe.min(end - k);
            }
        }
        self.take(safe)
    }

    fn take(&mut self, upto: usize) -> Option<String> {
        if upto <= self.sent || !self.text.is_char_boundary(self.sent) || !self.text.is_char_boundary(upto) {
            return None;
        }
        let delta = self.text[self.sent..upto].to_string();
        self.sent = upto;
        Some(delta)
    }

    /// The text not sent yet, at the end of the reply.
    pub fn finish(&mut self) -> Option<String> {
        let end = self.text.len();
        self.take(end)
    }

    /// The whole reply's text.
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_and_unknown_fields_are_refused_by_name() {
        let ok =
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"n":1,"logprobs":false,"frequency_penalty":0}"#;
        let spec = parse_chat(ok).expect("accepted");
        assert_eq!(spec.input, Input::Chat(vec![("user".into(), "hi".into())]));
        assert_eq!(spec.temperature, 0.0);
        for (body, param) in [
            (r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f"}}]}"#, "tools"),
            (r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"logprobs":true}"#, "logprobs"),
            (r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"frobnicate":3}"#, "frobnicate"),
            (r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":2}"#, "n"),
            (r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":3}"#, "temperature"),
            (r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}"#, "stream_options"),
            (r#"{"model":"m","messages":[]}"#, "messages"),
        ] {
            let e = parse_chat(body.as_bytes()).expect_err(param);
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
        }
        let e = parse_chat(b"{not json").expect_err("bad json");
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn text_parts_join_and_images_are_refused() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":[{"type":"text","text":"Be "},{"type":"text","text":"brief."}]},{"role":"user","content":"hi"}]}"#;
        let spec = parse_chat(body).expect("accepted");
        assert_eq!(spec.input, Input::Chat(vec![("system".into(), "Be brief.".into()), ("user".into(), "hi".into())]));
        let img = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"http://x/y.png"}}]}]}"#;
        assert!(parse_chat(img).expect_err("image").message.contains("image_url"));
    }

    /// Words as tokens; decoding joins them with spaces.
    fn words(list: &[&str]) -> tokenizers::Tokenizer {
        let vocab = list.iter().chain(&["[UNK]"]).enumerate().map(|(i, w)| (w.to_string(), i as u32)).collect();
        let model = tokenizers::models::wordlevel::WordLevel::builder().vocab(vocab).unk_token("[UNK]".into()).build().expect("model");
        tokenizers::Tokenizer::new(model)
    }

    #[test]
    fn stop_strings_end_the_text_and_their_starts_are_held_back() {
        let tok = words(&["a", "b", "c", "x", "y", "z"]);
        let mut t = TextDelta::new(&tok, vec!["b c".into()]);
        assert_eq!(t.push(0), Some("a".into()));
        // "a b" ends with "b", the start of "b c": only the space goes out.
        assert_eq!(t.push(1), Some(" ".into()));
        assert_eq!(t.push(2), None);
        assert!(t.stopped());
        assert_eq!(t.finish(), None);
        assert_eq!(t.text(), "a ");
        // The longest start of a stop string is held back, not the shortest.
        let mut t = TextDelta::new(&tok, vec!["x y x z".into()]);
        assert_eq!([t.push(3), t.push(4), t.push(3)], [None, None, None]);
        assert_eq!(t.push(5), None);
        assert_eq!(t.text(), "");
        // Without a stop string everything goes out, and a held-back tail at the end is flushed.
        let mut t = TextDelta::new(&tok, vec!["b q".into()]);
        assert_eq!(t.push(0), Some("a".into()));
        assert_eq!(t.push(1), Some(" ".into()));
        assert_eq!(t.finish(), Some("b".into()));
        assert!(!t.stopped());
    }

    #[test]
    fn completion_prompts_and_token_arrays() {
        let s = parse_completion(br#"{"model":"m","prompt":"Once","max_tokens":5,"stop":["\n"]}"#).expect("text");
        assert_eq!((s.input, s.max_tokens, s.stop), (Input::Text("Once".into()), Some(5), vec!["\n".to_string()]));
        let t = parse_completion(br#"{"model":"m","prompt":[1,2,3]}"#).expect("tokens");
        assert_eq!(t.input, Input::Tokens(vec![1, 2, 3]));
        assert!(parse_completion(br#"{"model":"m","prompt":["a","b"]}"#).is_err());
        assert!(parse_completion(br#"{"model":"m","prompt":"a","echo":true}"#).is_err());
    }
}
