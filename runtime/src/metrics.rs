//! Prometheus metrics of `hat serve cloud`, in the text format Prometheus scrapes, named after the
//! field's conventions (vLLM's `vllm:*`, llama.cpp's `llamacpp:*`): `hat:cloud_*`. The server updates
//! them as it works; `hat serve cloud --metrics-listen` serves [`CloudMetrics::encode`].

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The content type of [`CloudMetrics::encode`]'s text (OpenMetrics, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn text(registry: &Registry) -> String {
    let mut out = String::new();
    encode(&mut out, registry).expect("writing to a String cannot fail");
    out
}

/// Label set of the error counter: the error class.
pub type CodeLabel = Vec<(&'static str, String)>;

#[derive(Debug)]
pub struct CloudMetrics {
    registry: Registry,
    pub sessions_open: Gauge,
    pub sessions: Counter,
    pub positions: Counter,
    pub forward_seconds: Histogram,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub errors: Family<CodeLabel, Counter>,
    pub tls_failures: Counter,
    pub batch_sessions: Histogram,
    pub batch_rows: Histogram,
}

impl Default for CloudMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let sessions_open = Gauge::default();
        let sessions = Counter::default();
        let positions = Counter::default();
        // 0.5 ms .. ~16 s: one decode position to a long prompt chunk on a slow CPU.
        let forward_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let bytes_in = Counter::default();
        let bytes_out = Counter::default();
        let errors = Family::<CodeLabel, Counter>::default();
        let tls_failures = Counter::default();
        // 1 .. 128 sessions, 1 .. 1024 rows per batch.
        let batch_sessions = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        let batch_rows = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register("hat:cloud_sessions_open", "Device sessions open now", sessions_open.clone());
        registry.register("hat:cloud_sessions", "Device sessions opened", sessions.clone());
        registry.register("hat:cloud_positions_computed", "Positions the middle submodel computed", positions.clone());
        registry.register("hat:cloud_forward_seconds", "Middle submodel time per forward message", forward_seconds.clone());
        registry.register("hat:cloud_bytes_in", "Bytes received from devices, framing included", bytes_in.clone());
        registry.register("hat:cloud_bytes_out", "Bytes sent to devices, framing included", bytes_out.clone());
        registry.register("hat:cloud_errors", "Error replies sent to devices, by error class", errors.clone());
        registry.register("hat:cloud_tls_handshake_failures", "Device connections refused in the TLS handshake", tls_failures.clone());
        registry.register("hat:cloud_batch_sessions", "Sessions per batched middle forward", batch_sessions.clone());
        registry.register("hat:cloud_batch_rows", "Hidden-state rows per batched middle forward", batch_rows.clone());
        Self {
            registry,
            sessions_open,
            sessions,
            positions,
            forward_seconds,
            bytes_in,
            bytes_out,
            errors,
            tls_failures,
            batch_sessions,
            batch_rows,
        }
    }
}

impl CloudMetrics {
    pub fn error(&self, code: crate::protocol::ErrorCode) {
        self.errors.get_or_create(&vec![("code", format!("{code:?}").to_lowercase())]).inc();
    }

    /// The metrics as Prometheus text ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        text(&self.registry)
    }
}

/// Label set of the device server's request counter.
pub type RequestLabel = Vec<(&'static str, String)>;

/// Prometheus metrics of `hat serve device`: `hat:*`, the names vLLM and llama.cpp give the same
/// quantities where they have one.
#[derive(Debug)]
pub struct DeviceMetrics {
    registry: Registry,
    pub requests: Family<RequestLabel, Counter>,
    pub requests_running: Gauge,
    pub requests_waiting: Gauge,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub time_to_first_token_seconds: Histogram,
    pub inter_token_latency_seconds: Histogram,
    pub draft_tokens: Counter,
    pub draft_accepted_tokens: Counter,
    pub cloud_round_trips: Counter,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
    pub cloud_reconnects: Counter,
    pub client_disconnects: Counter,
}

impl Default for DeviceMetrics {
    fn default() -> Self {
        let mut r = Registry::default();
        let m = Self {
            requests: Family::default(),
            requests_running: Gauge::default(),
            requests_waiting: Gauge::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            // 10 ms .. ~80 s.
            time_to_first_token_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            // 1 ms .. ~8 s; tokens of one speculative round arrive together, so many gaps are tiny.
            inter_token_latency_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            draft_tokens: Counter::default(),
            draft_accepted_tokens: Counter::default(),
            cloud_round_trips: Counter::default(),
            bytes_up: Counter::default(),
            bytes_down: Counter::default(),
            cloud_reconnects: Counter::default(),
            client_disconnects: Counter::default(),
            registry: Registry::default(),
        };
        r.register("hat:requests", "Requests answered, by endpoint and HTTP status", m.requests.clone());
        r.register("hat:requests_running", "Requests generating now", m.requests_running.clone());
        r.register("hat:requests_waiting", "Requests waiting for a free slot (--max-concurrent)", m.requests_waiting.clone());
        r.register("hat:prompt_tokens", "Prompt tokens processed", m.prompt_tokens.clone());
        r.register("hat:generation_tokens", "Tokens generated", m.generation_tokens.clone());
        r.register("hat:time_to_first_token_seconds", "Time from request to first token", m.time_to_first_token_seconds.clone());
        r.register("hat:inter_token_latency_seconds", "Time between consecutive tokens of a reply", m.inter_token_latency_seconds.clone());
        r.register("hat:draft_tokens", "Tokens drafted on the device (HAT mode)", m.draft_tokens.clone());
        r.register("hat:draft_accepted_tokens", "Drafted tokens the cloud's verification accepted", m.draft_accepted_tokens.clone());
        r.register("hat:cloud_round_trips", "Decode rounds that went to the cloud", m.cloud_round_trips.clone());
        r.register("hat:bytes_up", "Bytes sent to the cloud", m.bytes_up.clone());
        r.register("hat:bytes_down", "Bytes received from the cloud", m.bytes_down.clone());
        r.register("hat:cloud_reconnects", "Cloud connections re-established mid-reply", m.cloud_reconnects.clone());
        r.register("hat:client_disconnects", "Replies cut short because the client went away", m.client_disconnects.clone());
        Self { registry: r, ..m }
    }
}

impl DeviceMetrics {
    /// Counts one finished generation.
    pub fn record(&self, g: &crate::generate::Generation) {
        self.prompt_tokens.inc_by(g.prompt_tokens as u64);
        self.generation_tokens.inc_by(g.tokens.len() as u64);
        if !g.tokens.is_empty() {
            self.time_to_first_token_seconds.observe(g.ttft.as_secs_f64());
        }
        for gap in &g.gaps {
            self.inter_token_latency_seconds.observe(gap.as_secs_f64());
        }
        self.draft_tokens.inc_by(g.drafted as u64);
        self.draft_accepted_tokens.inc_by(g.accepted as u64);
        self.cloud_round_trips.inc_by(g.rounds as u64);
        self.bytes_up.inc_by(g.traffic.bytes_up);
        self.bytes_down.inc_by(g.traffic.bytes_down);
        self.cloud_reconnects.inc_by(u64::from(g.traffic.reconnects));
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests.get_or_create(&vec![("endpoint", endpoint.to_string()), ("status", status.to_string())]).inc();
    }

    /// The metrics as Prometheus text ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        text(&self.registry)
    }
}
