//! Copying one HTTP message body from one side to the other for `forward.rs`, framed as the
//! head said (length, chunked, until close), through the user's budget: bytes read from the
//! sender pass `relay::metered_read`; bytes that arrived with the head and were not charged yet
//! go through `relay::send_prefix`. The framing itself (the chunked state machine) is pure, in
//! `http_framing.rs`.

use crate::flow::limiter::Waiter;
use crate::net::relay::{self, Budget, Direction, End};
use crate::net::stream::Stream;
use crate::wire::http_framing::{Body, ChunkError, ChunkedDecoder};
use std::io;
use std::sync::Arc;

/// Bytes read from a socket at a time.
pub(crate) const READ_CHUNK: usize = 16 * 1024;

/// Why a request body could not be sent.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// The chunked coding was broken (answered 400).
    Chunk(ChunkError),
    /// Reading or writing failed.
    Io(End),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Chunk(c) => write!(f, "{c}"),
            BodyError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<End> for BodyError {
    fn from(e: End) -> Self {
        BodyError::Io(e)
    }
}

/// Sends the request body from `pending` then the client, to the origin; returns the bytes after
/// it (the next request) and the body bytes sent. Runs on the body thread.
pub(crate) fn send_body(
    client: &Stream,
    origin: &Stream,
    pending: Vec<u8>,
    body: Body,
    budget: Option<&Budget>,
    waiter: &Arc<Waiter>,
) -> Result<(Vec<u8>, u64), BodyError> {
    let mut copy = BodyCopy {
        from: client,
        to: origin,
        budget,
        waiter,
        dir: Direction::Up,
        moved: 0,
    };
    let mut rest = pending;
    copy.body(&mut rest, body, false)?;
    Ok((rest, copy.moved))
}

/// Copies one message body from one side to the other through the budget.
pub(crate) struct BodyCopy<'a> {
    /// Where the body comes from.
    pub from: &'a Stream,
    /// Where it goes.
    pub to: &'a Stream,
    /// The user it is charged to, if this proxy limits.
    pub budget: Option<&'a Budget>,
    /// The limiter waiter of this direction.
    pub waiter: &'a Arc<Waiter>,
    /// Which way (for the counters).
    pub dir: Direction,
    /// Body bytes read from `from` (and from the bytes already read with the head).
    pub moved: u64,
}

impl BodyCopy<'_> {
    /// Sends `head` then the body framed as `body`, starting with `rest` (bytes read with the
    /// head). Ok(true) when nothing came after the body (the sender can be reused).
    pub fn run(
        &mut self,
        head: Vec<u8>,
        rest: Vec<u8>,
        body: Body,
        dechunk: bool,
    ) -> Result<bool, BodyError> {
        // The head and the first body bytes in one write where they fit.
        let mut out = head;
        let mut rest = rest;
        match body {
            Body::Length(n) => {
                let k = rest.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                out.extend_from_slice(&rest[..k]);
                rest.drain(..k);
                self.to.write_all(&out).map_err(End::Error)?;
                self.length(n - k as u64)?;
            }
            Body::None => {
                self.to.write_all(&out).map_err(End::Error)?;
            }
            Body::UntilClose => {
                out.append(&mut rest);
                self.to.write_all(&out).map_err(End::Error)?;
                self.until_close()?;
            }
            Body::Chunked => {
                self.to.write_all(&out).map_err(End::Error)?;
                self.chunked(&mut rest, dechunk, false)?;
            }
        }
        Ok(rest.is_empty())
    }

    /// The body alone (no head), from `rest` first; leaves in `rest` what came after it.
    fn body(&mut self, rest: &mut Vec<u8>, body: Body, dechunk: bool) -> Result<(), BodyError> {
        match body {
            Body::None => Ok(()),
            Body::Length(n) => {
                let k = rest.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                relay::send_prefix(self.to, &rest[..k], self.budget, self.dir)?;
                rest.drain(..k);
                self.moved += k as u64;
                self.length(n - k as u64)
            }
            Body::Chunked => self.chunked(rest, dechunk, true),
            Body::UntilClose => {
                relay::send_prefix(self.to, rest, self.budget, self.dir)?;
                rest.clear();
                self.until_close()
            }
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, End> {
        let n = relay::metered_read(self.from, buf, self.budget, self.waiter, self.dir)?;
        self.moved += n as u64;
        Ok(n)
    }

    fn length(&mut self, mut left: u64) -> Result<(), BodyError> {
        let mut buf = vec![0u8; READ_CHUNK];
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = self.read(&mut buf[..want])?;
            if n == 0 {
                return Err(BodyError::Io(End::Error(
                    io::ErrorKind::UnexpectedEof.into(),
                )));
            }
            self.to.write_all(&buf[..n]).map_err(End::Error)?;
            left -= n as u64;
        }
        Ok(())
    }

    fn until_close(&mut self) -> Result<(), BodyError> {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = self.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            self.to.write_all(&buf[..n]).map_err(End::Error)?;
        }
    }

    /// A chunked body, re-encoded (or decoded for an HTTP/1.0 client). `fresh`: the bytes in
    /// `rest` were read with the head without being charged (a request); charge them now.
    fn chunked(&mut self, rest: &mut Vec<u8>, dechunk: bool, fresh: bool) -> Result<(), BodyError> {
        let mut dec = ChunkedDecoder::new(dechunk);
        let mut out = Vec::new();
        let used = dec.feed(rest, &mut out).map_err(BodyError::Chunk)?;
        rest.drain(..used);
        if fresh {
            relay::send_prefix(self.to, &out, self.budget, self.dir)?;
            self.moved += used as u64;
        } else {
            self.to.write_all(&out).map_err(End::Error)?;
        }
        let mut buf = vec![0u8; READ_CHUNK];
        while !dec.is_done() {
            // Inside chunk data, read no further than the chunk (the rest is charged then).
            let left = dec.data_left();
            let want = if left > 0 {
                buf.len().min(usize::try_from(left).unwrap_or(usize::MAX))
            } else {
                buf.len()
            };
            let n = self.read(&mut buf[..want])?;
            if n == 0 {
                return Err(BodyError::Io(End::Error(
                    io::ErrorKind::UnexpectedEof.into(),
                )));
            }
            out.clear();
            let used = dec.feed(&buf[..n], &mut out).map_err(BodyError::Chunk)?;
            self.to.write_all(&out).map_err(End::Error)?;
            rest.extend_from_slice(&buf[used..n]);
        }
        Ok(())
    }
}
