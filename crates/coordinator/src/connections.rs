//! The accept loop: every connection admitted under a permit (`http.max_connections`),
//! served by hyper's HTTP/1 with a deadline on each wait for the client, and closed
//! gracefully on shutdown. Body deadlines are the handlers' (`http::read_body`).
//!
//! The deadlines on a connection:
//! - its next request's head, `http.header_timeout_ms`: hyper's `header_read_timeout`.
//!   In the hyper of Cargo.lock (1.12), that timer is armed whenever the connection
//!   waits for a request head (`Conn::poll_read_head`): at the open, and after every
//!   reply, since `Conn::idle` sets `notify_read` when the timeout is set so the
//!   dispatcher reads (and arms the timer) again. Hyper has no idle timeout of its own,
//!   so this one deadline is also the idle limit of a new or kept-alive connection; a
//!   head sent a byte at a time gets no more time than a silent socket.
//! - a reply the client takes no bytes of, `http.send_timeout_ms`: [`SendDeadline`].
//!   Hyper waits on a blocked write for as long as the socket stays full.
//!
//! At the cap, new connections are left in the kernel's accept queue rather than
//! accepted and closed: one waiting there costs no descriptor and none of our memory,
//! an honest client sees a slow connect instead of an error it would count as the
//! coordinator being down, and a flood gains nothing from retrying. Every admitted
//! connection leaves within its deadlines, so the queue drains in bounded time.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::config::HttpLimits;

/// Largest request head (line and headers), in bytes; a larger one is refused with 431.
/// Hyper's own bound is its read buffer (about 400 KB), which times `max_connections` is
/// more memory than heads deserve.
const HEAD_BYTES_MAX: usize = 64 * 1024;

/// Descriptors kept for everything but connections (the store, blobs being written,
/// the listener, the runtime).
const DESCRIPTORS_RESERVED: u64 = 256;

/// The connection settings of a running server.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectionLimits {
    pub(crate) max_connections: usize,
    pub(crate) header_timeout: Duration,
    pub(crate) send_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits of `http`, with the connection cap lowered to what the process's
    /// descriptor limit allows once raised (see [`raise_descriptor_limit`]).
    pub(crate) fn new(http: &HttpLimits) -> ConnectionLimits {
        let wanted = u64::from(http.max_connections);
        let room = raise_descriptor_limit(wanted + DESCRIPTORS_RESERVED)
            .saturating_sub(DESCRIPTORS_RESERVED)
            .max(1);
        if room < wanted {
            tracing::warn!(
                "the descriptor limit allows {room} connections, not http.max_connections = {wanted}; raise `ulimit -n` for more"
            );
        }
        ConnectionLimits {
            max_connections: usize::try_from(room.min(wanted)).unwrap_or(usize::MAX),
            header_timeout: Duration::from_millis(http.header_timeout_ms),
            send_timeout: Duration::from_millis(http.send_timeout_ms),
        }
    }
}

/// Raises the soft limit on open descriptors towards the hard limit, as far as `wanted`
/// (many servers raise it to the hard limit; raising it only as far as needed leaves
/// the process as it was when the default 1,024 suffices). Returns the soft limit now.
fn raise_descriptor_limit(wanted: u64) -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft >= wanted {
        return soft;
    }
    let target = limit.maximum.map_or(wanted, |hard| hard.min(wanted));
    let raised = rustix::process::Rlimit {
        current: Some(target),
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => target,
        Err(_) => soft,
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting, asks
/// every open connection to finish its request in flight and close, and returns once
/// all have closed. Not cancel-safe: dropped, it drops the accept loop (the connection
/// tasks end with the runtime).
pub(crate) async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stopping, stop) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        // A permit first: at the cap, the next connection stays in the accept queue.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit,
            () = &mut shutdown => break,
        };
        let Ok(permit) = permit else { break };
        let stream = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        match stream {
            Ok((stream, _)) => {
                let (app, stop) = (app.clone(), stop.clone());
                tokio::spawn(async move {
                    serve_connection(stream, app, limits, stop).await;
                    drop(permit);
                });
            }
            // The peer left before it was accepted: nothing to do.
            Err(e) if is_connection_error(&e) => {}
            Err(e) => {
                // Out of descriptors or memory: wait for some to be freed rather than spin.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    drop(listener);
    let _ = stopping.send(true);
    // Every connection holds a permit until it closes.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// One connection, HTTP/1 with keep-alive, until the client or a deadline closes it, or
/// `stop` asks it to finish its request in flight and close.
async fn serve_connection(
    stream: TcpStream,
    app: axum::Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) {
    let io = TokioIo::new(SendDeadline::new(stream, limits.send_timeout));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(HEAD_BYTES_MAX)
        .keep_alive(true);
    let mut connection = pin!(builder.serve_connection(io, TowerToHyperService::new(app)));
    tokio::select! {
        // An error here is the client's (gone, a bad head, a deadline): nothing to log.
        _ = connection.as_mut() => return,
        _ = stop.wait_for(|stopping| *stopping) => connection.as_mut().graceful_shutdown(),
    }
    let _ = connection.await;
}

/// A TCP stream whose writes fail with `TimedOut` once one has waited `timeout` on a
/// client that takes no bytes; any progress starts the wait again. Hyper then closes
/// the connection.
struct SendDeadline {
    stream: TcpStream,
    timeout: Duration,
    /// Made at the first blocked write and kept for the next.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether `timer` runs for the write blocked now.
    armed: bool,
}

impl SendDeadline {
    fn new(stream: TcpStream, timeout: Duration) -> SendDeadline {
        SendDeadline {
            stream,
            timeout,
            timer: None,
            armed: false,
        }
    }

    /// `polled`, or `TimedOut` when it is still blocked past the deadline.
    fn deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        let until = tokio::time::Instant::now() + self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
        if !self.armed {
            timer.as_mut().reset(until);
            self.armed = true;
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took none of the reply's bytes before the send deadline",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for SendDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendDeadline {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.deadline(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.deadline(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        this.deadline(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_leaves_descriptors_for_the_rest() {
        let http = HttpLimits {
            max_connections: u32::MAX,
            ..HttpLimits::default()
        };
        let limits = ConnectionLimits::new(&http);
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let soft = nofile.current.unwrap_or(u64::MAX);
        assert!(
            limits.max_connections as u64 + DESCRIPTORS_RESERVED <= soft,
            "{} connections under a limit of {soft}",
            limits.max_connections
        );
        // Raised to the hard limit (when that is within the kernel's default `nr_open`).
        if let Some(hard) = nofile.maximum.filter(|&hard| hard <= 1 << 20) {
            assert_eq!(soft, hard);
        }
        let few = ConnectionLimits::new(&HttpLimits::default());
        assert_eq!(few.max_connections, 512);
    }
}
