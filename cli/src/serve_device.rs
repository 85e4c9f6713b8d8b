//! `hat serve device`: the device side as a local OpenAI-compatible server. Apps send text to
//! localhost; each request gets its own cloud session, and only hidden states go to the cloud.
//! Generation runs on the blocking pool, one task per request, tokens flowing to the HTTP side
//! through a channel; a client that goes away cancels its generation, which closes its cloud session.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use async_openai::types::chat::{
    ChatChoice, ChatChoiceStream, ChatCompletionResponseMessage, ChatCompletionStreamResponseDelta, Choice, CompletionFinishReason,
    CompletionUsage, CreateChatCompletionResponse, CreateChatCompletionStreamResponse, FinishReason, Role,
};
use async_openai::types::completions::CreateCompletionResponse;
use async_openai::types::models::{ListModelResponse, Model};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::{Args, ValueEnum};
use futures_util::StreamExt;
use hat_runtime::link::LinkEstimate;
use hat_runtime::metrics::{DeviceMetrics, CONTENT_TYPE};
use hat_runtime::package::DEVICE_DIR;
use hat_runtime::{Chunking, CloudOptions, DeviceRuntime, DeviceSession, GenerateOptions, Generation, Mode, RemoteMiddle, SamplingOptions};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Semaphore};

use crate::common::{chunking, read_token, CloudConnArgs, DraftArgs};
use crate::openai_req::{parse_chat, parse_completion, ApiError, Input, Spec, TextDelta};

/// Serve the device side as an OpenAI-compatible HTTP endpoint.
///
/// Apps and SDKs talk to it as to OpenAI (base URL http://LISTEN/v1): `POST /v1/chat/completions`
/// and `POST /v1/completions` (streaming or not), `GET /v1/models`, `GET /health` (503 while the
/// cloud is unreachable) and `GET /metrics` (Prometheus). The text stays here: each request opens
/// its own session on `hat serve cloud` at --cloud, and only hidden states cross the network.
/// Replies carry hat's timings in an extra `timings` field. Without `temperature` a request samples
/// at 1.0, as OpenAI does; pass 0 for greedy, which gives exactly `hat generate --mode local`'s text.
#[derive(Args, Debug)]
pub struct DeviceArgs {
    /// The directory `hat split --out` wrote (its device/ half is served).
    #[arg(long)]
    artifacts: PathBuf,
    /// Address to listen on, host:port (port 0 picks a free one and prints it). Requests carry the
    /// user's text in the clear: keep this on loopback or a trusted network.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// `hat` drafts on the device and verifies in the cloud; `ushape` makes one round trip per token.
    #[arg(long, value_enum, default_value_t = ServeMode::Hat)]
    mode: ServeMode,
    /// File holding the API key clients must send (`Authorization: Bearer KEY`); without it any
    /// client that reaches the port is served.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Requests generating at once; more wait for a free slot.
    #[arg(long, default_value_t = 4)]
    max_concurrent: usize,
    /// The model id in /v1/models and replies (default: the split's source file name).
    #[arg(long)]
    model_name: Option<String>,
    /// Cloud sessions kept open and unused, so a request does not wait for the handshake (two
    /// round trips). Each is used by one request only and closed after it; a new one replaces it.
    #[arg(long, default_value_t = 2)]
    warm_sessions: usize,
    #[command(flatten)]
    link: CloudConnArgs,
    #[command(flatten)]
    draft: DraftArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum ServeMode {
    Hat,
    Ushape,
}

/// What the handlers share.
struct App {
    device: DeviceRuntime,
    cloud: CloudOptions,
    mode: Mode,
    chunking: Chunking,
    model: String,
    created: u32,
    api_key: Option<[u8; 32]>,
    slots: Arc<Semaphore>,
    metrics: DeviceMetrics,
    /// The link as the last session measured it; later sessions start from it instead of probing.
    link: Mutex<Option<LinkEstimate>>,
    /// Fresh sessions, connected ahead of need.
    warm: Mutex<Vec<DeviceSession>>,
    warm_target: usize,
    /// The last health probe: when, and what it found.
    health: tokio::sync::Mutex<Option<(Instant, std::result::Result<(), String>)>>,
    log: bool,
}

pub fn run(args: DeviceArgs, quiet: bool) -> Result<()> {
    args.link.check()?;
    let Some(addr) = args.link.cloud.as_deref() else {
        bail!("hat serve device needs --cloud HOST:PORT (start the cloud with `hat serve cloud`)");
    };
    if args.max_concurrent == 0 {
        bail!("--max-concurrent must be at least 1");
    }
    if args.mode == ServeMode::Hat && args.draft.draft_len == 0 {
        bail!("--draft-len must be at least 1");
    }
    let api_key = args.api_key_file.as_deref().map(read_token).transpose().context("--api-key-file")?;
    let device = args.draft.apply(DeviceRuntime::open(&args.artifacts.join(DEVICE_DIR))?);
    let mode = match args.mode {
        ServeMode::Hat => Mode::Hat { draft_len: args.draft.draft_len },
        ServeMode::Ushape => Mode::UShape,
    };
    if args.mode == ServeMode::Hat && !quiet {
        if let Some(note) = device.draft_note() {
            eprintln!("note: {note}");
        }
    }
    let chunking = if args.mode == ServeMode::Hat { chunking(args.draft.chunk_size, &device, quiet)? } else { Chunking::Whole };
    let model = args.model_name.clone().unwrap_or_else(|| model_id(&device.package.manifest.source));
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as u32);
    let app = Arc::new(App {
        cloud: args.link.options(addr)?,
        device,
        mode,
        chunking,
        model,
        created,
        api_key: api_key.as_deref().map(digest),
        slots: Arc::new(Semaphore::new(args.max_concurrent)),
        metrics: DeviceMetrics::default(),
        link: Mutex::new(None),
        warm: Mutex::new(Vec::new()),
        warm_target: args.warm_sessions,
        health: tokio::sync::Mutex::new(None),
        log: !quiet,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hat-device")
        .max_blocking_threads(args.max_concurrent + 4)
        .build()
        .context("cannot start the server runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
        let local = listener.local_addr()?;
        if !local.ip().is_loopback() && app.api_key.is_none() && !quiet {
            eprintln!("warning: serving {local} without --api-key-file: anyone who reaches this port can use the model");
        }
        if app.log {
            eprintln!(
                "hat-device: serving {} ({}) at http://{local}/v1, cloud {}, up to {} requests at once",
                app.model,
                app.mode.name(),
                app.cloud.addr,
                args.max_concurrent
            );
        }
        println!("listening on {local}");
        app.refill();
        axum::serve(listener, router(app))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving HTTP")
    })
}

/// `SmolLM2-135M-Instruct.Q4_1` from `/x/SmolLM2-135M-Instruct.Q4_1.gguf`; a Hugging Face id as is.
fn model_id(source: &str) -> String {
    let path = std::path::Path::new(source);
    if path.exists() {
        let stem = if path.is_dir() { path.file_name() } else { path.file_stem() };
        if let Some(s) = stem.and_then(|s| s.to_str()) {
            return s.to_string();
        }
    }
    source.to_string()
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint".into(),
                kind: "invalid_request_error",
                param: None,
                code: None,
            }
        })
        .with_state(app)
}

impl App {
    /// Checks the `Authorization: Bearer KEY` header when a key is set.
    fn authorize(&self, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
        let Some(expected) = &self.api_key else { return Ok(()) };
        let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        // Digests compare in constant time with respect to the key's content.
        if given.map(digest).as_ref() == Some(expected) {
            return Ok(());
        }
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: if given.is_some() { "Incorrect API key provided" } else { "Missing API key: send Authorization: Bearer KEY" }.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        })
    }

    fn check_model(&self, model: &str) -> std::result::Result<(), ApiError> {
        if model == self.model {
            return Ok(());
        }
        Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist; this server serves `{}` (see /v1/models)", self.model),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        })
    }

    /// The prompt's token ids and the generation options, or the 400 that says why not.
    fn prepare(&self, spec: &Spec) -> std::result::Result<(Vec<u32>, GenerateOptions), ApiError> {
        self.check_model(&spec.model)?;
        let package = &self.device.package;
        let prompt = match &spec.input {
            Input::Chat(turns) => hat_runtime::chat::chat_prompt_ids(package, turns),
            Input::Text(text) => hat_runtime::chat::prompt_ids(package, text, false),
            Input::Tokens(ids) => Ok(ids.clone()),
        }
        .map_err(|e| {
            ApiError::bad_request(e.to_string(), Some(if matches!(spec.input, Input::Chat(_)) { "messages" } else { "prompt" }), None)
        })?;
        let vocab = package.config.vocab_size as u32;
        if prompt.is_empty() || prompt.iter().any(|&t| t >= vocab) {
            return Err(ApiError::bad_request(format!("the prompt is empty or holds token ids outside 0..{vocab}"), Some("prompt"), None));
        }
        let context = package.config.max_position_embeddings;
        if prompt.len() >= context {
            return Err(ApiError::bad_request(
                format!("This model's maximum context length is {context} tokens; the prompt has {} tokens", prompt.len()),
                Some("messages"),
                Some("context_length_exceeded"),
            ));
        }
        let max_tokens = spec.max_tokens.unwrap_or(usize::MAX).min(context - prompt.len());
        let seed = spec.seed.unwrap_or_else(rand::random);
        let opts = GenerateOptions {
            max_tokens,
            sampling: SamplingOptions { temperature: spec.temperature, top_p: spec.top_p, seed },
            eos: self.device.eos_ids(),
            prefill_chunk: None,
            cancel: Some(Arc::new(AtomicBool::new(false))),
        };
        Ok((prompt, opts))
    }

    /// Starts generating; events arrive on the returned channel. Dropping it cancels the generation.
    fn start(self: &Arc<Self>, id: String, prompt: Vec<u32>, opts: GenerateOptions, stop: Vec<String>) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        let app = self.clone();
        tokio::spawn(async move {
            app.metrics.requests_waiting.inc();
            let permit = app.slots.clone().acquire_owned().await;
            app.metrics.requests_waiting.dec();
            if tx.is_closed() {
                return;
            }
            app.metrics.requests_running.inc();
            let worker = app.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                worker.generate(&id, &prompt, &opts, stop, &tx);
            })
            .await;
            app.metrics.requests_running.dec();
        });
        rx
    }

    /// A fresh session: a warm one when there is one (then another is opened in the background),
    /// else a new connection.
    fn session(self: &Arc<Self>) -> hat_runtime::Result<DeviceSession> {
        let warm = self.warm.lock().unwrap_or_else(|e| e.into_inner()).pop();
        self.refill();
        match warm {
            Some(s) => Ok(s),
            None => self.device.connect(self.cloud.clone()),
        }
    }

    /// Opens warm sessions in the background up to the target. Failures are dropped: requests then
    /// connect themselves and report the error.
    fn refill(self: &Arc<Self>) {
        let missing = self.warm_target.saturating_sub(self.warm.lock().unwrap_or_else(|e| e.into_inner()).len());
        if missing == 0 {
            return;
        }
        let app = self.clone();
        std::thread::spawn(move || {
            for _ in 0..missing {
                let Ok(s) = app.device.connect(app.cloud.clone()) else { return };
                let mut warm = app.warm.lock().unwrap_or_else(|e| e.into_inner());
                if warm.len() >= app.warm_target {
                    return;
                }
                warm.push(s);
            }
        });
    }

    /// One reply, on the blocking pool: its own cloud session, closed when it returns.
    fn generate(self: &Arc<Self>, id: &str, prompt: &[u32], opts: &GenerateOptions, stop: Vec<String>, tx: &mpsc::UnboundedSender<Event>) {
        let cancel = opts.cancel.clone().expect("prepare sets a cancel flag");
        let mut gone = false;
        let mut text = TextDelta::new(&self.device.package.tokenizer, stop);
        let result = (|| -> hat_runtime::Result<(Generation, String)> {
            let mut session = self.session()?;
            session.set_chunking(self.chunking.clone());
            let known = *self.link.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(est) = known {
                session.set_link_estimate(est);
            }
            let gen = session.generate(prompt, opts, self.mode, |t| {
                let delta = text.push(t);
                let sent = delta.is_none_or(|d| tx.send(Event::Delta(d)).is_ok());
                gone |= !sent || tx.is_closed();
                if text.stopped() || gone {
                    cancel.store(true, Ordering::Relaxed);
                }
            })?;
            if let Some(est) = session.link_estimate() {
                *self.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(est);
            }
            Ok((gen, session.drafter().describe()))
        })();
        match result {
            Ok((gen, draft_head)) => {
                self.metrics.record(&gen);
                if gone {
                    self.metrics.client_disconnects.inc();
                }
                let finish = if text.stopped() || gen.stopped_by_eos { FinishReason::Stop } else { FinishReason::Length };
                if self.log {
                    eprintln!(
                        "hat-device: {id}: {} prompt + {} tokens, TTFT {:.0} ms, TBT {:.1} ms, {:.2} tokens per round trip, {}",
                        gen.prompt_tokens,
                        gen.tokens.len(),
                        gen.ttft.as_secs_f64() * 1e3,
                        gen.tbt.as_secs_f64() * 1e3,
                        gen.accept_len(),
                        if gone { "client went away: cloud session closed".to_string() } else { format!("{finish:?}").to_lowercase() }
                    );
                }
                if let Some(rest) = text.finish() {
                    let _ = tx.send(Event::Delta(rest));
                }
                let timings = timings(&gen, self.mode, &draft_head);
                let _ = tx.send(Event::Done(Box::new(Finished { text: text.text().to_string(), finish, gen, timings })));
            }
            Err(e) => {
                if self.log {
                    eprintln!("hat-device: {id}: failed: {e}");
                }
                let _ = tx.send(Event::Failed(e.to_string()));
            }
        }
    }
}

fn usage(gen: &Generation) -> CompletionUsage {
    let (p, c) = (gen.prompt_tokens as u32, gen.tokens.len() as u32);
    CompletionUsage { prompt_tokens: p, completion_tokens: c, total_tokens: p + c, ..Default::default() }
}

/// A chunk of a streamed chat reply; the usage chunk has no choices.
#[allow(deprecated)] // the deprecated fields stay unset
fn chat_chunk(
    id: &str,
    model: &str,
    created: u32,
    choices: Vec<ChatChoiceStream>,
    usage: Option<CompletionUsage>,
) -> CreateChatCompletionStreamResponse {
    CreateChatCompletionStreamResponse {
        id: id.to_string(),
        choices,
        created,
        model: model.to_string(),
        object: "chat.completion.chunk".into(),
        usage,
        ..Default::default()
    }
}

/// A text completion, whole or one chunk of a stream; the usage chunk has no choices.
fn completion(id: &str, model: &str, created: u32, choices: Vec<Choice>, usage: Option<CompletionUsage>) -> CreateCompletionResponse {
    CreateCompletionResponse {
        id: id.to_string(),
        choices,
        created,
        model: model.to_string(),
        system_fingerprint: None,
        object: "text_completion".into(),
        usage,
    }
}

/// What a generation sends to its request.
enum Event {
    Delta(String),
    Done(Box<Finished>),
    Failed(String),
}

struct Finished {
    text: String,
    finish: FinishReason,
    gen: Generation,
    timings: Value,
}

/// hat's own numbers for a reply, in the extra `timings` field (llama.cpp's server has one too).
fn timings(gen: &Generation, mode: Mode, draft_head: &str) -> Value {
    json!({
        "mode": mode.name(),
        "prompt_n": gen.prompt_tokens,
        "predicted_n": gen.tokens.len(),
        "ttft_ms": gen.ttft.as_secs_f64() * 1e3,
        "tbt_ms": gen.tbt.as_secs_f64() * 1e3,
        "predicted_per_second": gen.decode_tokens_per_s(),
        "accept_len": gen.accept_len(),
        "rounds": gen.rounds,
        "drafted": gen.drafted,
        "accepted": gen.accepted,
        "bytes_up": gen.traffic.bytes_up,
        "bytes_down": gen.traffic.bytes_down,
        "reconnects": gen.traffic.reconnects,
        "draft_head": if matches!(mode, Mode::Hat { .. }) { Value::from(draft_head) } else { Value::Null },
    })
}

fn with_timings<T: serde::Serialize>(body: &T, timings: Option<&Value>) -> Value {
    let mut v = serde_json::to_value(body).unwrap_or(Value::Null);
    if let (Some(t), Some(obj)) = (timings, v.as_object_mut()) {
        obj.insert("timings".into(), t.clone());
    }
    v
}

fn upstream_error(message: String) -> ApiError {
    ApiError { status: StatusCode::BAD_GATEWAY, message, kind: "server_error", param: None, code: Some("cloud_unavailable") }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

fn now_secs() -> u32 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as u32)
}

/// The chunks of a reply as server-sent events, in OpenAI's order. `chunk(delta, finish)` builds one
/// chunk; `usage_chunk` the usage chunk (empty choices).
fn sse_stream(
    rx: mpsc::UnboundedReceiver<Event>,
    first: Option<Value>,
    chunk: impl Fn(Option<String>, Option<FinishReason>, Option<&Value>) -> Value + Send + 'static,
    usage_chunk: Option<impl Fn(&Generation) -> Value + Send + 'static>,
) -> Response {
    let events = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    let body = futures_util::stream::iter(first.map(|v| SseEvent::default().data(v.to_string())))
        .chain(events.flat_map(move |e| {
            let out: Vec<SseEvent> = match e {
                Event::Delta(d) => vec![SseEvent::default().data(chunk(Some(d), None, None).to_string())],
                Event::Done(f) => {
                    let mut v = vec![SseEvent::default().data(chunk(None, Some(f.finish), Some(&f.timings)).to_string())];
                    if let Some(u) = &usage_chunk {
                        v.push(SseEvent::default().data(u(&f.gen).to_string()));
                    }
                    v.push(SseEvent::default().data("[DONE]"));
                    v
                }
                Event::Failed(message) => vec![SseEvent::default().data(upstream_error(message).body().to_string())],
            };
            futures_util::stream::iter(out)
        }))
        .map(Ok::<_, std::convert::Infallible>);
    Sse::new(body).keep_alive(KeepAlive::default()).into_response()
}

/// Waits for the whole reply.
async fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> std::result::Result<Finished, ApiError> {
    while let Some(e) = rx.recv().await {
        match e {
            Event::Delta(_) => {}
            Event::Done(f) => return Ok(*f),
            Event::Failed(message) => return Err(upstream_error(message)),
        }
    }
    Err(upstream_error("the generation ended without a reply".into()))
}

fn respond(app: &App, endpoint: &str, r: std::result::Result<Response, ApiError>) -> Response {
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    app.metrics.request(endpoint, resp.status().as_u16());
    resp
}

async fn chat_completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let r = chat_inner(&app, &headers, &body).await;
    respond(&app, "/v1/chat/completions", r)
}

async fn chat_inner(app: &Arc<App>, headers: &HeaderMap, body: &[u8]) -> std::result::Result<Response, ApiError> {
    app.authorize(headers)?;
    let spec = parse_chat(body)?;
    let (prompt, opts) = app.prepare(&spec)?;
    let id = new_id("chatcmpl");
    let created = now_secs();
    let model = app.model.clone();
    let rx = app.start(id.clone(), prompt, opts, spec.stop.clone());
    #[allow(deprecated)] // the deprecated fields stay unset
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |content: Option<String>, finish: Option<FinishReason>, timings: Option<&Value>| {
            let first = content.is_none() && finish.is_none();
            let delta = ChatCompletionStreamResponseDelta {
                content: if first { Some(String::new()) } else { content },
                role: first.then_some(Role::Assistant),
                ..Default::default()
            };
            let choice = ChatChoiceStream { index: 0, delta, finish_reason: finish, logprobs: None };
            let chunk = chat_chunk(&id, &model, created, vec![choice], None);
            with_timings(&chunk, timings)
        }
    };
    if spec.stream {
        let usage_chunk = spec.include_usage.then(|| {
            let (id, model) = (id.clone(), model.clone());
            move |gen: &Generation| with_timings(&chat_chunk(&id, &model, created, vec![], Some(usage(gen))), None)
        });
        let first = chunk(None, None, None);
        return Ok(sse_stream(rx, Some(first), chunk, usage_chunk));
    }
    let f = collect(rx).await?;
    let reply = CreateChatCompletionResponse {
        id,
        choices: vec![ChatChoice {
            index: 0,
            message: ChatCompletionResponseMessage { content: Some(f.text.clone()), role: Role::Assistant, ..Default::default() },
            finish_reason: Some(f.finish),
            logprobs: None,
        }],
        created,
        model,
        object: "chat.completion".into(),
        usage: Some(usage(&f.gen)),
        ..Default::default()
    };
    Ok(Json(with_timings(&reply, Some(&f.timings))).into_response())
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let r = completions_inner(&app, &headers, &body).await;
    respond(&app, "/v1/completions", r)
}

fn completion_finish(f: FinishReason) -> CompletionFinishReason {
    match f {
        FinishReason::Length => CompletionFinishReason::Length,
        _ => CompletionFinishReason::Stop,
    }
}

async fn completions_inner(app: &Arc<App>, headers: &HeaderMap, body: &[u8]) -> std::result::Result<Response, ApiError> {
    app.authorize(headers)?;
    let spec = parse_completion(body)?;
    let (prompt, opts) = app.prepare(&spec)?;
    let id = new_id("cmpl");
    let created = now_secs();
    let model = app.model.clone();
    let rx = app.start(id.clone(), prompt, opts, spec.stop.clone());
    let choice = |text: String, finish: Option<FinishReason>| Choice {
        text,
        index: 0,
        logprobs: None,
        finish_reason: finish.map(completion_finish),
    };
    if spec.stream {
        let usage_chunk = spec.include_usage.then(|| {
            let (id, model) = (id.clone(), model.clone());
            move |gen: &Generation| with_timings(&completion(&id, &model, created, vec![], Some(usage(gen))), None)
        });
        let chunk = move |text: Option<String>, finish: Option<FinishReason>, timings: Option<&Value>| {
            with_timings(&completion(&id, &model, created, vec![choice(text.unwrap_or_default(), finish)], None), timings)
        };
        return Ok(sse_stream(rx, None, chunk, usage_chunk));
    }
    let f = collect(rx).await?;
    let reply = completion(&id, &model, created, vec![choice(f.text.clone(), Some(f.finish))], Some(usage(&f.gen)));
    Ok(Json(with_timings(&reply, Some(&f.timings))).into_response())
}

fn model_entry(app: &App) -> Model {
    Model { id: app.model.clone(), object: "model".into(), created: app.created, owned_by: "hat".into(), ..Default::default() }
}

async fn list_models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let r =
        app.authorize(&headers).map(|()| Json(ListModelResponse { object: "list".into(), data: vec![model_entry(&app)] }).into_response());
    respond(&app, "/v1/models", r)
}

async fn get_model(State(app): State<Arc<App>>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    let r = app.authorize(&headers).and_then(|()| app.check_model(&id)).map(|()| Json(model_entry(&app)).into_response());
    respond(&app, "/v1/models", r)
}

/// 200 when the cloud answers a hello for this model, 503 when not. Probes at most once a second.
async fn health(State(app): State<Arc<App>>) -> Response {
    let mut last = app.health.lock().await;
    let fresh = last.as_ref().is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(1));
    if !fresh {
        let probe = app.clone();
        let result = tokio::task::spawn_blocking(move || {
            RemoteMiddle::check_cloud(&probe.cloud, &probe.device.package.manifest.fingerprint, Duration::from_secs(2))
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        *last = Some((Instant::now(), result));
    }
    match last.as_ref().map(|(_, r)| r) {
        Some(Ok(())) => (StatusCode::OK, Json(json!({ "status": "ok" }))).into_response(),
        Some(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "error", "error": e }))).into_response(),
        None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], app.metrics.encode()).into_response()
}

/// `hat serve cloud --metrics-listen`: the cloud's metrics on their own HTTP port.
pub fn serve_metrics(listen: &str, metrics: Arc<hat_runtime::metrics::CloudMetrics>) -> Result<std::net::SocketAddr> {
    let std_listener = std::net::TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen} for metrics"))?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    std::thread::Builder::new().name("hat-metrics".into()).spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else { return };
            let app = Router::new().route(
                "/metrics",
                get(move || {
                    let m = metrics.clone();
                    async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], m.encode()) }
                }),
            );
            let _ = axum::serve(listener, app).await;
        });
    })?;
    Ok(addr)
}
