//! A remote's server-sent events passed through to the client, counted as they pass so
//! that what the stream cost is settled however it ends, and the settle guard every granted
//! reservation is held in.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use serde::Deserialize;

use crate::metrics::Metrics;
use crate::openai;
use crate::upstream::error::UpstreamError;
use crate::upstream::gate::{CallGate, RemoteUsage, Reservation, Settlement};
use crate::upstream::{counted_output_tokens, transport_error, ChoiceProbe};

/// Settles a reservation exactly once: explicitly with what was used, or on drop as
/// failed (an attempt that produced no answer).
pub(super) struct Settle {
    gate: Arc<dyn CallGate>,
    reservation: Option<Reservation>,
    settlement: Settlement,
}

impl Settle {
    pub(super) fn new(gate: Arc<dyn CallGate>, reservation: Reservation) -> Self {
        Self {
            gate,
            reservation: Some(reservation),
            settlement: Settlement::Failed,
        }
    }

    pub(super) fn finish(mut self, settlement: Settlement) {
        self.settlement = settlement;
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        let gate = Arc::clone(&self.gate);
        let settlement = self.settlement;
        // Settling may do I/O; it must not be lost when a client goes away,
        // so it runs as its own task.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { gate.settle(reservation, settlement).await });
        }
    }
}

/// A remote's server-sent events, forwarded event by event as they arrive.
///
/// Each event's JSON is checked and its usage noted. A stream that breaks,
/// stalls past the timeout, or sends malformed data ends with an OpenAI-style
/// error event and no `[DONE]`, so clients see the failure instead of a
/// silently truncated answer.
pub struct UpstreamStream {
    upstream: String,
    inner: BoxStream<'static, reqwest::Result<Bytes>>,
    buf: BytesMut,
    pub(super) ready: VecDeque<Bytes>,
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    /// The largest event accepted; a longer one (or a buffer that grows past it without an
    /// event ending) fails the stream.
    max_event_bytes: usize,
    finished: bool,
    usage: Option<RemoteUsage>,
    /// Input tokens charged when the remote reports no usage.
    input_tokens: u64,
    /// Events that carried generated text, and its bytes, for counting without usage.
    text_events: u64,
    text_bytes: u64,
    pub(super) failure: Option<UpstreamError>,
    failed: bool,
    settle: Option<Settle>,
    metrics: Option<Arc<Metrics>>,
}

#[derive(Deserialize)]
struct ChunkProbe {
    #[serde(default)]
    usage: Option<RemoteUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    choices: Vec<ChoiceProbe>,
}

impl UpstreamStream {
    pub(super) fn new(
        upstream: String,
        inner: BoxStream<'static, reqwest::Result<Bytes>>,
        idle_timeout: Duration,
        max_event_bytes: usize,
        settle: Settle,
        input_tokens: u64,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Self {
            upstream,
            inner,
            buf: BytesMut::new(),
            ready: VecDeque::new(),
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            max_event_bytes,
            finished: false,
            usage: None,
            input_tokens,
            text_events: 0,
            text_bytes: 0,
            failure: None,
            failed: false,
            settle: Some(settle),
            metrics,
        }
    }

    /// The usage the remote reported in the stream, if it did.
    pub fn usage(&self) -> Option<RemoteUsage> {
        self.usage
    }

    /// What the stream is charged so far: the reported usage, else the estimated input
    /// and the output tokens counted from the text that arrived (a stream that breaks
    /// or that the client leaves was still generated, and billed, up to there). Nothing,
    /// when nothing billable arrived: the ledger and the budget settlement agree.
    pub fn billed(&self) -> RemoteUsage {
        match self.settlement() {
            Settlement::Used(usage) => usage,
            Settlement::Failed => RemoteUsage::default(),
        }
    }

    /// Nothing billable arrived (no text, no usage) is a failed attempt; anything else
    /// is charged as [`UpstreamStream::billed`].
    fn settlement(&self) -> Settlement {
        if self.usage.is_none() && self.text_events == 0 {
            Settlement::Failed
        } else {
            Settlement::Used(self.usage.unwrap_or(RemoteUsage {
                prompt_tokens: self.input_tokens,
                completion_tokens: counted_output_tokens(self.text_events, self.text_bytes),
            }))
        }
    }

    /// Whether the last event has been handed out.
    pub fn is_done(&self) -> bool {
        self.finished && self.ready.is_empty()
    }

    /// The stream ended with an error event.
    pub fn failed(&self) -> bool {
        self.failed
    }

    fn fail(&mut self, error: UpstreamError) {
        if let Some(m) = &self.metrics {
            m.upstream_errors
                .with_label_values(&[&self.upstream, error.kind()])
                .inc();
        }
        tracing::warn!(upstream = %self.upstream, %error, "upstream stream failed");
        self.ready
            .push_back(openai::sse_error(&error.to_string(), error.kind()));
        self.failure = Some(error);
        self.failed = true;
        self.end();
    }

    fn end(&mut self) {
        self.finished = true;
        if let Some(settle) = self.settle.take() {
            settle.finish(self.settlement());
        }
    }

    /// Checks one complete event and queues it for the client.
    fn inspect(&mut self, event: Bytes) {
        let mut data = Vec::new();
        for line in event.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(rest) = line.strip_prefix(b"data:") {
                if !data.is_empty() {
                    data.push(b'\n');
                }
                data.extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
            }
        }
        if data.is_empty() {
            // Comments and keep-alives carry no data; pass them on.
            self.ready.push_back(event);
            return;
        }
        if data.trim_ascii() == b"[DONE]" {
            self.ready.push_back(event);
            self.end();
            return;
        }
        match serde_json::from_slice::<ChunkProbe>(&data) {
            Ok(probe) => {
                if probe.usage.is_some() {
                    self.usage = probe.usage;
                }
                let text: usize = probe.choices.iter().map(ChoiceProbe::text_len).sum();
                if text > 0 {
                    self.text_events += 1;
                    self.text_bytes += text as u64;
                }
                let is_error = probe.error.is_some();
                self.ready.push_back(event);
                if is_error {
                    self.failed = true;
                    self.end();
                }
            }
            Err(e) => self.fail(UpstreamError::Malformed {
                upstream: self.upstream.clone(),
                detail: format!("bad stream event: {e}"),
            }),
        }
    }
}

impl Drop for UpstreamStream {
    fn drop(&mut self) {
        // A stream the client abandoned was generated, and billed, up to here.
        if let Some(settle) = self.settle.take() {
            settle.finish(self.settlement());
        }
    }
}

/// The end of the first complete event in `buf` (after its blank line).
pub(super) fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(pos) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + pos;
        let rest = &buf[nl + 1..];
        if rest.first() == Some(&b'\n') {
            return Some(nl + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(nl + 3);
        }
        i = nl + 1;
    }
    None
}

impl Stream for UpstreamStream {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let this = &mut *self;
        loop {
            if let Some(event) = this.ready.pop_front() {
                return Poll::Ready(Some(event));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            let end = event_end(&this.buf);
            if end.map_or(this.buf.len(), |e| e) > this.max_event_bytes {
                this.fail(UpstreamError::TooLarge {
                    upstream: this.upstream.clone(),
                    limit: this.max_event_bytes,
                });
                continue;
            }
            if let Some(end) = end {
                let event = this.buf.split_to(end).freeze();
                this.inspect(event);
                continue;
            }
            match this.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.buf.extend_from_slice(&chunk);
                    let deadline = tokio::time::Instant::now() + this.idle_timeout;
                    this.idle.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Err(e))) => {
                    let error = transport_error(&this.upstream, &e);
                    this.fail(error);
                }
                Poll::Ready(None) => this.fail(UpstreamError::Network {
                    upstream: this.upstream.clone(),
                    detail: "the stream ended before [DONE]".into(),
                }),
                Poll::Pending => {
                    if this.idle.as_mut().poll(cx).is_ready() {
                        this.fail(UpstreamError::Timeout {
                            upstream: this.upstream.clone(),
                        });
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}
