//! The OpenAI wire format: validating requests into what the gateway needs,
//! and building responses and stream chunks for local answers.
//!
//! The request's JSON object is kept whole so that an escalated request goes
//! upstream with every parameter the client sent, even ones this gateway
//! does not know.

use bytes::Bytes;
use local_model::{ChatMessage, Prompt, Sampling};
use serde_json::{json, Map, Value};

use policies::decision::RequestFeatures;

/// The two generation endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
        }
    }

    /// Path below an OpenAI base URL (`…/v1`).
    pub fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completions => "/completions",
        }
    }
}

/// A validated generation request.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub endpoint: Endpoint,
    /// The body as sent, forwarded upstream with only `model` replaced.
    pub body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// The text prompt, `None` when the local model cannot read the request.
    pub prompt: Option<Prompt>,
    pub features: RequestFeatures,
    pub max_tokens: Option<usize>,
    pub sampling: Sampling,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// `response_format: {"type": "json_object"}`.
    pub json_object: bool,
    /// Size of the body as received: an upper bound on its prompt's tokens.
    pub body_bytes: usize,
    /// `n`: choices asked for (1 when absent).
    pub n: u64,
    /// `best_of` (completions): sequences generated server-side to return the best `n`.
    pub best_of: Option<u64>,
    /// Prompts of a completion request (a `prompt` array of strings is one prompt each).
    pub prompts: u64,
    /// Bytes of what goes upstream besides the messages: `tools`, `functions`,
    /// `tool_choice`, `response_format` (schemas), all billed as input.
    pub schema_bytes: usize,
}

/// Output tokens per sequence the gateway assumes, and sets on the upstream request, when a
/// request sets no `max_tokens`: the cost estimate's bound (docs/api.md, budgets).
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 4096;

/// The largest `n` and `best_of` accepted (OpenAI's own limit for `n`).
pub const MAX_CHOICES: u64 = 128;

impl CompletionRequest {
    /// How many output sequences an upstream may generate and bill for this request: the
    /// larger of `n` and `best_of`, for every prompt.
    pub fn output_sequences(&self) -> u64 {
        self.n
            .max(self.best_of.unwrap_or(1))
            .max(1)
            .saturating_mul(self.prompts.max(1))
    }
}

/// Why a request body is refused (400): the API's error body is made from it by
/// `RequestError`'s `From`, so the wire format has one place.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("We could not parse the JSON body of your request: {0}")]
    MalformedJson(String),
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
}

fn bad(message: impl Into<String>, param: &str) -> RequestError {
    RequestError::InvalidRequest {
        message: message.into(),
        param: Some(param.to_string()),
    }
}

/// Parses and validates a request body for `endpoint`.
pub fn parse_request(endpoint: Endpoint, body: &[u8]) -> Result<CompletionRequest, RequestError> {
    let body_bytes = body.len();
    let value: Value =
        serde_json::from_slice(body).map_err(|e| RequestError::MalformedJson(e.to_string()))?;
    let Value::Object(body) = value else {
        return Err(RequestError::InvalidRequest {
            message: "the request body must be a JSON object".into(),
            param: None,
        });
    };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => return Err(bad("`model` must be a non-empty string", "model")),
        None => return Err(bad("you must provide a model parameter", "model")),
    };
    let stream = optional_bool(&body, "stream")?.unwrap_or(false);
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(bad(
                    "`include_usage` must be a boolean",
                    "stream_options.include_usage",
                ))
            }
        },
        Some(_) => return Err(bad("`stream_options` must be an object", "stream_options")),
    };
    let mut features = RequestFeatures::default();
    let prompt = match endpoint {
        Endpoint::Chat => parse_messages(&body, &mut features)?,
        Endpoint::Completions => parse_prompt(&body, &mut features)?,
    };
    let max_tokens = match body.get("max_completion_tokens").filter(|v| !v.is_null()) {
        Some(_) => optional_count(&body, "max_completion_tokens")?,
        None => optional_count(&body, "max_tokens")?,
    };
    if max_tokens == Some(0) {
        return Err(bad("`max_tokens` must be at least 1", "max_tokens"));
    }
    let temperature = optional_number(&body, "temperature")?;
    if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(bad("`temperature` must be between 0 and 2", "temperature"));
    }
    let top_p = optional_number(&body, "top_p")?;
    if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(bad("`top_p` must be greater than 0 and at most 1", "top_p"));
    }
    let n = optional_count(&body, "n")?;
    if n == Some(0) {
        return Err(bad("`n` must be at least 1", "n"));
    }
    if n.is_some_and(|n| n as u64 > MAX_CHOICES) {
        return Err(bad(format!("`n` must be at most {MAX_CHOICES}"), "n"));
    }
    features.multiple_choices |= n.is_some_and(|n| n > 1);
    let best_of = optional_count(&body, "best_of")?;
    if best_of == Some(0) {
        return Err(bad("`best_of` must be at least 1", "best_of"));
    }
    if best_of.is_some_and(|b| b as u64 > MAX_CHOICES) {
        return Err(bad(
            format!("`best_of` must be at most {MAX_CHOICES}"),
            "best_of",
        ));
    }
    // Several sequences generated to return one: the local model generates one.
    features.multiple_choices |= best_of.is_some_and(|b| b > 1);
    let prompts = match (endpoint, body.get("prompt")) {
        (Endpoint::Completions, Some(Value::Array(items)))
            if items.iter().all(Value::is_string) =>
        {
            items.len() as u64
        }
        _ => 1,
    };
    let schema_bytes = ["tools", "functions", "tool_choice", "response_format"]
        .iter()
        .filter_map(|key| body.get(*key))
        .map(|v| v.to_string().len())
        .sum();
    let seed = match body.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .map(|s| s as u64)
                .ok_or_else(|| bad("`seed` must be an integer", "seed"))?,
        ),
    };
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`stop` must be a string or an array of strings", "stop"))?,
        Some(_) => {
            return Err(bad(
                "`stop` must be a string or an array of strings",
                "stop",
            ))
        }
    };
    if stop.len() > 4 {
        return Err(bad("`stop` takes at most 4 sequences", "stop"));
    }
    let mut json_object = false;
    match body.get("response_format") {
        None | Some(Value::Null) => {}
        Some(Value::Object(f)) => match f.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => json_object = true,
            Some("json_schema") => features.wants_json_schema = true,
            _ => {
                return Err(bad(
                    "`response_format.type` must be text, json_object or json_schema",
                    "response_format.type",
                ))
            }
        },
        Some(_) => {
            return Err(bad(
                "`response_format` must be an object",
                "response_format",
            ))
        }
    }
    for key in ["tools", "functions"] {
        match body.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) => features.has_tools |= !a.is_empty(),
            Some(_) => return Err(bad(format!("`{key}` must be an array"), key)),
        }
    }
    let sampling = match temperature {
        Some(t) if t > 0.0 => Sampling::Sample {
            temperature: t,
            top_p: top_p.unwrap_or(1.0),
        },
        // OpenAI's default temperature is 1; the local model answers greedily
        // unless asked otherwise, because its confidence is most meaningful
        // for its most likely answer.
        _ => Sampling::Greedy,
    };
    Ok(CompletionRequest {
        endpoint,
        body,
        model,
        stream,
        include_usage,
        prompt,
        features,
        max_tokens,
        sampling,
        seed,
        stop,
        json_object,
        body_bytes,
        n: n.map_or(1, |n| n as u64),
        best_of: best_of.map(|b| b as u64),
        prompts,
        schema_bytes,
    })
}

fn optional_bool(body: &Map<String, Value>, key: &str) -> Result<Option<bool>, RequestError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(bad(format!("`{key}` must be a boolean"), key)),
    }
}

fn optional_number(body: &Map<String, Value>, key: &str) -> Result<Option<f64>, RequestError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| bad(format!("`{key}` must be a number"), key)),
    }
}

fn optional_count(body: &Map<String, Value>, key: &str) -> Result<Option<usize>, RequestError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(usize::try_from(n).unwrap_or(usize::MAX)))
            .ok_or_else(|| bad(format!("`{key}` must be a non-negative integer"), key)),
    }
}

/// Validates `messages`; returns the text conversation when the local model
/// can read it.
fn parse_messages(
    body: &Map<String, Value>,
    features: &mut RequestFeatures,
) -> Result<Option<Prompt>, RequestError> {
    let messages = match body.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => return Err(bad("`messages` must not be empty", "messages")),
        Some(_) => return Err(bad("`messages` must be an array", "messages")),
        None => return Err(bad("you must provide `messages`", "messages")),
    };
    let mut chat = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        let param = |field: &str| format!("messages[{i}].{field}");
        let Value::Object(m) = message else {
            return Err(bad(
                "each message must be an object",
                &format!("messages[{i}]"),
            ));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => r.as_str(),
            _ => return Err(bad("each message needs a string `role`", &param("role"))),
        };
        if !matches!(
            role,
            "system" | "developer" | "user" | "assistant" | "tool" | "function"
        ) {
            return Err(bad(format!("unknown role `{role}`"), &param("role")));
        }
        if matches!(role, "tool" | "function") || m.get("tool_calls").is_some_and(|t| !t.is_null())
        {
            features.has_tools = true;
        }
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) if role == "assistant" => String::new(),
            Some(Value::Array(parts)) => content_parts_text(parts, features, &param("content"))?,
            _ => {
                return Err(bad(
                    "`content` must be a string or an array of content parts",
                    &param("content"),
                ))
            }
        };
        // Local chat templates know system/user/assistant; OpenAI's newer
        // `developer` role means the same as `system`.
        let role = if role == "developer" { "system" } else { role };
        chat.push(ChatMessage::new(role, content));
    }
    let readable = !(features.has_images || features.has_other_media);
    Ok(readable.then_some(Prompt::Chat(chat)))
}

/// Joins the text parts; notes images and other media.
fn content_parts_text(
    parts: &[Value],
    features: &mut RequestFeatures,
    param: &str,
) -> Result<String, RequestError> {
    let mut text = String::new();
    for part in parts {
        let kind = part.get("type").and_then(Value::as_str);
        match kind {
            Some("text") | Some("input_text") => {
                let t = part
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("a text part needs a string `text`", param))?;
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(t);
            }
            Some("image_url") | Some("input_image") | Some("image") => features.has_images = true,
            Some("input_audio") | Some("audio") | Some("file") | Some("input_file") => {
                features.has_other_media = true
            }
            Some("refusal") => {}
            _ => return Err(bad("each content part needs a known `type`", param)),
        }
    }
    Ok(text)
}

/// Validates `prompt`; one text prompt is what the local model serves.
fn parse_prompt(
    body: &Map<String, Value>,
    features: &mut RequestFeatures,
) -> Result<Option<Prompt>, RequestError> {
    match body.get("prompt") {
        Some(Value::String(s)) => Ok(Some(Prompt::Text(s.clone()))),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            Ok(items[0].as_str().map(|s| Prompt::Text(s.to_string())))
        }
        Some(Value::Array(items)) if !items.is_empty() => {
            // Several prompts, or token-id prompts: valid OpenAI, but the
            // local path answers one text prompt only.
            features.multiple_choices = true;
            Ok(None)
        }
        Some(_) => Err(bad(
            "`prompt` must be a string or a non-empty array",
            "prompt",
        )),
        None => Err(bad("you must provide `prompt`", "prompt")),
    }
}

/// The body of the request sent upstream: the client's, with `model` replaced by the
/// remote's model name, and, when the client set no output limit, `max_tokens` set to
/// [`DEFAULT_MAX_OUTPUT_TOKENS`], the bound the cost estimate reserved for.
pub fn upstream_body(
    request: &CompletionRequest,
    remote_model: &str,
) -> Result<Bytes, serde_json::Error> {
    let mut body = request.body.clone();
    body.insert("model".into(), Value::String(remote_model.to_string()));
    if request.max_tokens.is_none() {
        body.insert("max_tokens".into(), Value::from(DEFAULT_MAX_OUTPUT_TOKENS));
    }
    serde_json::to_vec(&body).map(Bytes::from)
}

/// A finished local answer, ready to be written in OpenAI's format.
#[derive(Debug, Clone)]
pub struct LocalAnswer {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub text: String,
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl LocalAnswer {
    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }

    /// The non-streamed response body.
    pub fn to_response(&self, endpoint: Endpoint) -> Value {
        match endpoint {
            Endpoint::Chat => json!({
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text, "refusal": null},
                    "logprobs": null,
                    "finish_reason": self.finish_reason,
                }],
                "usage": self.usage(),
            }),
            Endpoint::Completions => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "text": self.text,
                    "logprobs": null,
                    "finish_reason": self.finish_reason,
                }],
                "usage": self.usage(),
            }),
        }
    }
}

/// Writes stream chunks in OpenAI's format for one local answer.
#[derive(Debug, Clone)]
pub struct ChunkWriter {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
}

impl ChunkWriter {
    fn chunk(&self, delta: Option<&str>, role: bool, finish_reason: Option<&str>) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut d = Map::new();
                if role {
                    d.insert("role".into(), json!("assistant"));
                }
                if let Some(text) = delta {
                    d.insert("content".into(), json!(text));
                }
                json!({"index": 0, "delta": d, "logprobs": null, "finish_reason": finish_reason})
            }
            Endpoint::Completions => {
                json!({"index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": finish_reason})
            }
        };
        let mut chunk = json!({
            "id": self.id,
            "object": self.object(),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    fn object(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        }
    }

    /// The opening chunk (chat: the assistant role).
    pub fn start(&self) -> Option<Bytes> {
        match self.endpoint {
            Endpoint::Chat => Some(sse_data(&self.chunk(Some(""), true, None))),
            Endpoint::Completions => None,
        }
    }

    /// A chunk carrying text.
    pub fn delta(&self, text: &str) -> Bytes {
        sse_data(&self.chunk(Some(text), false, None))
    }

    /// The closing chunks: finish reason, usage when asked for, `[DONE]`.
    pub fn finish(
        &self,
        finish_reason: &str,
        prompt_tokens: usize,
        completion_tokens: usize,
    ) -> Bytes {
        let mut out = Vec::new();
        out.extend_from_slice(&sse_data(&self.chunk(None, false, Some(finish_reason))));
        if self.include_usage {
            let usage = json!({
                "id": self.id,
                "object": self.object(),
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            });
            out.extend_from_slice(&sse_data(&usage));
        }
        out.extend_from_slice(SSE_DONE);
        Bytes::from(out)
    }
}

/// The stream terminator.
pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// One `data:` event.
pub fn sse_data(value: &Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    // Serialising a `Value` cannot fail.
    let _ = serde_json::to_writer(&mut out, value);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// An error event for a stream that cannot go on; OpenAI's clients raise it.
pub fn sse_error(message: &str, code: &str) -> Bytes {
    sse_data(
        &json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": code}}),
    )
}

/// The OpenAI `finish_reason` of a local generation.
pub fn finish_reason(reason: local_model::FinishReason) -> &'static str {
    match reason {
        local_model::FinishReason::Length => "length",
        // An aborted generation that is still served ended for the client's
        // purposes: it asked for no more.
        local_model::FinishReason::Stop | local_model::FinishReason::Aborted => "stop",
    }
}

/// A fresh response id in OpenAI's form (`chatcmpl-…`, `cmpl-…`).
pub fn completion_id(endpoint: Endpoint) -> String {
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Now, in the whole seconds of a response's `created` field.
pub fn unix_seconds() -> u64 {
    u64::try_from(crate::clock::now_unix_ms() / 1000).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn parse(endpoint: Endpoint, body: &str) -> Result<CompletionRequest, RequestError> {
        parse_request(endpoint, body.as_bytes())
    }

    fn param_of(r: Result<CompletionRequest, RequestError>) -> Option<String> {
        match r {
            Err(RequestError::InvalidRequest { param, .. }) => param,
            other => panic!("expected an invalid request, got {other:?}"),
        }
    }

    #[test]
    fn choices_prompts_and_schemas_are_counted_for_the_cost_estimate() {
        let r = parse(
            Endpoint::Completions,
            r#"{"model":"m","prompt":["a","b","c"],"n":2,"best_of":5,"max_tokens":7}"#,
        )
        .unwrap();
        // best_of (5) sequences for each of 3 prompts.
        assert_eq!(r.output_sequences(), 15);
        assert!(r.features.multiple_choices);
        let r = parse(
            Endpoint::Chat,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":64,
                "tools":[{"type":"function","function":{"name":"f"}}]}"#,
        )
        .unwrap();
        assert_eq!(r.output_sequences(), 64);
        assert_eq!(
            r.schema_bytes,
            r#"[{"type":"function","function":{"name":"f"}}]"#.len()
        );
        // No output limit from the client: the upstream gets the one the estimate assumed.
        let sent: Value =
            serde_json::from_slice(&upstream_body(&r, "remote-model").unwrap()).unwrap();
        assert_eq!(sent["max_tokens"], DEFAULT_MAX_OUTPUT_TOKENS);
        assert_eq!(sent["model"], "remote-model");
        for (body, param) in [
            (r#"{"model":"m","prompt":"x","n":129}"#, "n"),
            (r#"{"model":"m","prompt":"x","best_of":0}"#, "best_of"),
            (r#"{"model":"m","prompt":"x","best_of":1000}"#, "best_of"),
        ] {
            let e = parse(Endpoint::Completions, body).unwrap_err();
            assert!(
                matches!(&e, RequestError::InvalidRequest { param: Some(p), .. } if p == param),
                "{body}: {e:?}"
            );
        }
    }

    #[test]
    fn chat_request_becomes_a_text_conversation() {
        let r = parse(
            Endpoint::Chat,
            r#"{"model":"cascade","messages":[{"role":"developer","content":"Be brief."},
               {"role":"user","content":[{"type":"text","text":"Hi"}]}],
               "max_tokens":5,"stream":true,"stream_options":{"include_usage":true},"stop":"\n"}"#,
        )
        .unwrap();
        assert_eq!(
            r.prompt,
            Some(Prompt::Chat(vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi")
            ]))
        );
        assert!(r.stream && r.include_usage);
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!(r.stop, vec!["\n".to_string()]);
        assert_eq!(r.features, RequestFeatures::default());
    }

    #[test]
    fn images_tools_and_schemas_are_noted_for_routing() {
        let r = parse(
            Endpoint::Chat,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"What is this?"},
               {"type":"image_url","image_url":{"url":"data:image/png;base64,AA=="}}]}]}"#,
        )
        .unwrap();
        assert!(r.features.has_images && r.prompt.is_none());
        let r = parse(
            Endpoint::Chat,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}]}"#,
        )
        .unwrap();
        assert!(r.features.has_tools);
        let r = parse(
            Endpoint::Chat,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}"#,
        )
        .unwrap();
        assert!(r.json_object);
    }

    #[test]
    fn invalid_fields_name_their_param() {
        assert!(matches!(
            parse(Endpoint::Chat, "{not json"),
            Err(RequestError::MalformedJson(_))
        ));
        assert_eq!(
            param_of(parse(Endpoint::Chat, r#"{"messages":[]}"#)).as_deref(),
            Some("model")
        );
        assert_eq!(
            param_of(parse(Endpoint::Chat, r#"{"model":"m","messages":[]}"#)).as_deref(),
            Some("messages")
        );
        assert_eq!(
            param_of(parse(
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#
            ))
            .as_deref(),
            Some("temperature")
        );
        assert_eq!(
            param_of(parse(
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#
            ))
            .as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            param_of(parse(
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#
            ))
            .as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            param_of(parse(Endpoint::Completions, r#"{"model":"m"}"#)).as_deref(),
            Some("prompt")
        );
    }

    #[test]
    fn upstream_body_keeps_every_parameter_and_swaps_the_model() {
        let r = parse(
            Endpoint::Completions,
            r#"{"model":"cascade","prompt":"Hi","logit_bias":{"50256":-100},"user":"u1"}"#,
        )
        .unwrap();
        let body: Value = serde_json::from_slice(&upstream_body(&r, "gpt-x").unwrap()).unwrap();
        assert_eq!(body["model"], "gpt-x");
        assert_eq!(body["user"], "u1");
        assert_eq!(body["logit_bias"]["50256"], -100);
    }

    #[test]
    fn local_stream_ends_with_usage_and_done() {
        let w = ChunkWriter {
            endpoint: Endpoint::Chat,
            id: "chatcmpl-1".into(),
            created: 1,
            model: "local".into(),
            include_usage: true,
        };
        let end = String::from_utf8(w.finish("stop", 3, 2).to_vec()).unwrap();
        assert!(end.contains("\"finish_reason\":\"stop\""));
        assert!(end.contains("\"total_tokens\":5"));
        assert!(end.ends_with("data: [DONE]\n\n"));
    }
}
