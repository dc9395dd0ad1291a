//! A reply's body as the client receives it: JSON, a local answer written as a stream, a
//! local answer streamed as it is generated, or a remote's stream passed through; each commits
//! the request's ledger record before its last event.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, BoxStream};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::cascade::context::RequestContext;
use crate::cascade::local::LiveEvent;
use crate::cascade::signals::Aggregate;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::openai::{self, ChunkWriter, LocalAnswer};
use crate::upstream::UpstreamStream;

/// What the gateway answers; the handler writes it out.
pub enum Reply {
    /// A complete JSON body (local answer or the remote's, byte for byte).
    Json(Bytes),
    /// A local answer known in full, written as a stream.
    LocalStream {
        writer: ChunkWriter,
        answer: LocalAnswer,
    },
    /// A local answer streamed token by token as it is generated.
    LiveLocal {
        writer: ChunkWriter,
        events: mpsc::UnboundedReceiver<LiveEvent>,
    },
    /// A remote's stream, passed through event by event.
    Upstream(Box<UpstreamStream>),
}

/// The body of a response.
pub type BodyStream = BoxStream<'static, Result<Bytes, Infallible>>;

impl Reply {
    /// Whether the body is a stream of server-sent events.
    pub fn is_stream(&self) -> bool {
        !matches!(self, Reply::Json(_))
    }

    /// The response body. The context goes with it: a stream commits the request's ledger
    /// record before its last event (so a client that saw the end has a durable record), and
    /// its metrics are recorded when the body is finished or dropped (client gone). A JSON
    /// body's record is committed by the caller before the response is sent.
    pub fn into_body(
        self,
        ctx: RequestContext,
        metrics: Arc<Metrics>,
        aggregate: Aggregate,
    ) -> BodyStream {
        match self {
            Reply::Json(bytes) => {
                drop(ctx);
                stream::once(async move { Ok(bytes) }).boxed()
            }
            Reply::LocalStream { writer, answer } => {
                let mut chunks: Vec<Bytes> = writer.start().into_iter().collect();
                if !answer.text.is_empty() {
                    chunks.push(writer.delta(&answer.text));
                }
                let last = writer.finish(
                    answer.finish_reason,
                    answer.prompt_tokens,
                    answer.completion_tokens,
                );
                stream::iter(chunks.into_iter().map(Ok))
                    .chain(stream::once(async move {
                        let mut ctx = ctx;
                        Ok(last_or_ledger_error(ctx.commit().await, last))
                    }))
                    .boxed()
            }
            Reply::Upstream(upstream) => {
                stream::unfold(Some((upstream, ctx)), |state| async move {
                    let (mut upstream, mut ctx) = state?;
                    let event = upstream.next().await;
                    // Kept current so that a client leaving mid-stream is recorded with
                    // what the stream was charged up to then.
                    ctx.remote_billed = Some(upstream.billed());
                    ctx.stream_failed = upstream.failed();
                    match event {
                        Some(event) if !upstream.is_done() => {
                            Some((Ok(event), Some((upstream, ctx))))
                        }
                        Some(event) => {
                            let last = last_or_ledger_error(ctx.commit().await, event);
                            Some((Ok(last), None))
                        }
                        None => match ctx.commit().await {
                            Ok(()) => None,
                            Err(e) => Some((Ok(ledger_error_event(&e)), None)),
                        },
                    }
                })
                .boxed()
            }
            Reply::LiveLocal { writer, events } => live_local_body(Live {
                writer,
                events,
                ctx,
                metrics,
                aggregate,
                streamed: 0,
                started: false,
            }),
        }
    }
}

/// State of a live local stream.
struct Live {
    writer: ChunkWriter,
    events: mpsc::UnboundedReceiver<LiveEvent>,
    ctx: RequestContext,
    metrics: Arc<Metrics>,
    aggregate: Aggregate,
    streamed: usize,
    started: bool,
}

fn live_local_body(live: Live) -> BodyStream {
    stream::unfold(Some(live), |state| async move {
        let mut live = state?;
        if !live.started {
            live.started = true;
            if let Some(start) = live.writer.start() {
                return Some((Ok(start), Some(live)));
            }
        }
        match live.events.recv().await {
            Some(LiveEvent::Delta(text)) => {
                live.streamed += text.len();
                let chunk = live.writer.delta(&text);
                Some((Ok(chunk), Some(live)))
            }
            Some(LiveEvent::Done(Ok(run))) => {
                let generation = &run.output.generation;
                live.ctx
                    .note_local_run(&live.aggregate, &run, &live.metrics);
                // Deltas are a prefix of the final text: text held back while
                // it might have begun a stop sequence is released now.
                let mut out = Vec::new();
                if let Some(rest) = generation
                    .text
                    .get(live.streamed..)
                    .filter(|r| !r.is_empty())
                {
                    out.extend_from_slice(&live.writer.delta(rest));
                }
                out.extend_from_slice(&live.writer.finish(
                    openai::finish_reason(generation.finish_reason),
                    generation.usage.prompt_tokens,
                    generation.usage.completion_tokens,
                ));
                let last = last_or_ledger_error(live.ctx.commit().await, Bytes::from(out));
                Some((Ok(last), None))
            }
            Some(LiveEvent::Done(Err(e))) => {
                live.ctx.stream_failed = true;
                // The stream ends with an error event either way.
                let _ = live.ctx.commit().await;
                Some((
                    Ok(openai::sse_error(&e.to_string(), "local_model_error")),
                    None,
                ))
            }
            None => None,
        }
    })
    .boxed()
}

/// A stream's last event, or, when its ledger record could not be written and the ledger
/// fails closed, an error event in its place: the client never sees a stream end normally
/// without a record (the text before it has gone out already; see docs/reliability.md).
fn last_or_ledger_error(committed: Result<(), ApiError>, last: Bytes) -> Bytes {
    match committed {
        Ok(()) => last,
        Err(e) => ledger_error_event(&e),
    }
}

fn ledger_error_event(error: &ApiError) -> Bytes {
    openai::sse_error(&error.to_string(), error.code())
}
