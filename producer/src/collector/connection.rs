//! One TCP connection: HTTP/1.1 through hyper, watched for the collector's header, idle and
//! write timeouts (the body timeout is the route's: see `routes.rs`).
//!
//! hyper's own header timeout starts whenever a connection waits for a request head, so it would
//! also close every idle keep-alive connection after the header timeout. Here a watchdog tells
//! the two apart. The socket is wrapped so that the first byte of a request head is noticed, and
//! the service marks when a request begins (its head was read) and ends (its answer is ready):
//! - before the first request, and from the first byte of any later one, the head must arrive
//!   within the header timeout, or the connection is dropped at once;
//! - between requests, a connection with nothing sent for the idle timeout is shut down
//!   gracefully (hyper closes it, or finishes an answer under way first);
//! - when the server shuts down, every connection is shut down gracefully the same way;
//! - at any time, a write to the socket that cannot go on (the client reads nothing and the
//!   socket's buffers are full) for the write timeout drops the connection: a client that never
//!   reads its answers cannot hold a connection and its answer forever.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use metrics::counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, watch};
use tokio::time::Instant;
use tracing::debug;

/// Largest request head (request line and headers) read, and hyper's read buffer (at least 8 KiB);
/// a larger head is answered 431. nginx reads heads of up to 4 × 8 KiB by default.
const MAX_HEAD_BYTES: usize = 32 * 1024;

#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    pub(super) header: Duration,
    pub(super) idle: Duration,
    pub(super) write: Duration,
}

/// What the watchdog knows of its connection.
#[derive(Debug)]
struct Activity {
    state: Mutex<State>,
    /// Woken when a head starts, a request begins or one ends.
    changed: Notify,
}

#[derive(Debug, Clone, Copy)]
struct State {
    /// A request's head has been read and its answer is not ready yet.
    in_request: bool,
    /// At least one answer was given on this connection.
    answered: bool,
    /// When the connection began waiting for a request (opened, or the last answer ready).
    waiting_since: Instant,
    /// When the first byte of the awaited request arrived.
    head_started: Option<Instant>,
    /// Since when a write has been waiting for room in the socket's send buffer.
    write_blocked_since: Option<Instant>,
}

/// What a watchdog does when its deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// The head is too slow: drop the connection.
    Header,
    /// Nothing was sent between requests for too long: shut down gracefully.
    Idle,
    /// The client has not taken what is written to it for too long: drop the connection.
    Write,
}

impl Activity {
    fn new() -> Arc<Self> {
        let state = State {
            in_request: false,
            answered: false,
            waiting_since: Instant::now(),
            head_started: None,
            write_blocked_since: None,
        };
        Arc::new(Activity { state: Mutex::new(state), changed: Notify::new() })
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_one();
    }

    fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes came in: the first one while waiting for a request starts its head's clock.
    fn bytes_read(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !state.in_request && state.head_started.is_none() {
            state.head_started = Some(Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }

    fn request_began(&self) {
        self.update(|state| state.in_request = true);
    }

    fn request_ended(&self) {
        self.update(|state| {
            *state = State {
                in_request: false,
                answered: true,
                waiting_since: Instant::now(),
                head_started: None,
                write_blocked_since: state.write_blocked_since,
            };
        });
    }

    /// A write found the socket's send buffer full (`blocked`), or went through.
    fn write_polled(&self, blocked: bool) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match (blocked, state.write_blocked_since) {
            (true, None) => state.write_blocked_since = Some(Instant::now()),
            (false, Some(_)) => state.write_blocked_since = None,
            _ => return,
        }
        drop(state);
        self.changed.notify_one();
    }

    /// The next deadline and what happens then: a blocked write's, else the head's or the idle
    /// one's; `None` while a request is handled and its answer is not stuck (its body has its own
    /// timeout, and the watchdog is woken when it ends).
    fn deadline(&self, timeouts: Timeouts) -> Option<(Instant, Expiry)> {
        let state = self.state();
        let waiting = match (state.in_request, state.head_started, state.answered) {
            (true, _, _) => None,
            (false, Some(started), _) => Some((started + timeouts.header, Expiry::Header)),
            (false, None, false) => Some((state.waiting_since + timeouts.header, Expiry::Header)),
            (false, None, true) => Some((state.waiting_since + timeouts.idle, Expiry::Idle)),
        };
        let write = state.write_blocked_since.map(|since| (since + timeouts.write, Expiry::Write));
        match (waiting, write) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

/// The socket, telling [`Activity`] when bytes arrive.
#[derive(Debug)]
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl Watched {
    /// Tells [`Activity`] whether a write waits for room.
    fn noting<T>(&self, polled: Poll<T>) -> Poll<T> {
        self.activity.write_polled(polled.is_pending());
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.noting(polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.noting(polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.noting(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Serves one connection until it closes, times out, or (after `stopping` turns true) finishes
/// its request under way. `_permit` is the connection's place under the connection cap.
pub(super) async fn serve_connection(
    stream: TcpStream,
    router: Router,
    timeouts: Timeouts,
    mut stopping: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let activity = Activity::new();
    let routes = TowerToHyperService::new(router);
    let watched = activity.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        watched.request_began();
        let answer = hyper::service::Service::call(&routes, request);
        let watched = watched.clone();
        async move {
            let answer = answer.await;
            watched.request_ended();
            answer
        }
    });
    let io = TokioIo::new(Watched { stream, activity: activity.clone() });
    let connection = http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let mut closing = *stopping.borrow();
    if closing {
        connection.as_mut().graceful_shutdown();
    }
    loop {
        let changed = activity.changed.notified();
        let deadline = activity.deadline(timeouts);
        let expired = async {
            match deadline {
                Some((at, expiry)) => {
                    tokio::time::sleep_until(at).await;
                    expiry
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(e) = served {
                    debug!("connection ended: {e}");
                }
                return;
            }
            stop = stopping.changed(), if !closing => {
                // A dropped sender means the server is gone: stop too.
                if stop.is_err() || *stopping.borrow() {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
            () = changed => {}
            expiry = expired => match expiry {
                Expiry::Header => {
                    counter!("collector_connections_timed_out", "phase" => "header").increment(1);
                    return;
                }
                Expiry::Idle if !closing => {
                    counter!("collector_connections_timed_out", "phase" => "idle").increment(1);
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
                Expiry::Idle => {
                    // Already closing and still silent: nothing is under way; drop it.
                    return;
                }
                Expiry::Write => {
                    counter!("collector_connections_timed_out", "phase" => "write").increment(1);
                    return;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts =
        Timeouts { header: Duration::from_secs(10), idle: Duration::from_secs(60), write: Duration::from_secs(5) };

    #[tokio::test(start_paused = true)]
    async fn the_header_clock_runs_from_the_opening_then_the_idle_one_between_requests() {
        let activity = Activity::new();
        let opened = Instant::now();
        assert_eq!(activity.deadline(TIMEOUTS), Some((opened + TIMEOUTS.header, Expiry::Header)));
        tokio::time::advance(Duration::from_secs(2)).await;
        activity.bytes_read();
        activity.request_began();
        assert_eq!(activity.deadline(TIMEOUTS), None, "a request under way has its body timeout only");
        tokio::time::advance(Duration::from_secs(5)).await;
        activity.request_ended();
        let ended = Instant::now();
        assert_eq!(activity.deadline(TIMEOUTS), Some((ended + TIMEOUTS.idle, Expiry::Idle)));
        tokio::time::advance(Duration::from_secs(30)).await;
        activity.bytes_read();
        let started = Instant::now();
        assert_eq!(activity.deadline(TIMEOUTS), Some((started + TIMEOUTS.header, Expiry::Header)));
        tokio::time::advance(Duration::from_secs(1)).await;
        activity.bytes_read();
        assert_eq!(activity.deadline(TIMEOUTS), Some((started + TIMEOUTS.header, Expiry::Header)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_blocked_write_has_its_own_deadline_even_during_a_request() {
        let activity = Activity::new();
        activity.bytes_read();
        activity.request_began();
        activity.write_polled(true);
        let blocked = Instant::now();
        assert_eq!(activity.deadline(TIMEOUTS), Some((blocked + TIMEOUTS.write, Expiry::Write)));
        tokio::time::advance(Duration::from_secs(1)).await;
        activity.write_polled(true);
        assert_eq!(
            activity.deadline(TIMEOUTS),
            Some((blocked + TIMEOUTS.write, Expiry::Write)),
            "still the first block"
        );
        activity.write_polled(false);
        assert_eq!(activity.deadline(TIMEOUTS), None, "the write went through");
        activity.request_ended();
        let ended = Instant::now();
        activity.write_polled(true);
        let blocked = Instant::now();
        assert_eq!(activity.deadline(TIMEOUTS), Some((blocked + TIMEOUTS.write, Expiry::Write)), "sooner than idle");
        activity.write_polled(false);
        assert_eq!(activity.deadline(TIMEOUTS), Some((ended + TIMEOUTS.idle, Expiry::Idle)));
    }
}
