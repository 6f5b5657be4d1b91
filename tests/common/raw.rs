//! The wire spoken by hand: one frame is a 4-byte big-endian length, then
//! the payload. Tests that must send what no real agency sends (a frame cut
//! short, a lie in the header, a request out of turn) drive a connection
//! with [`Raw`], or with [`write_frame`] and [`read_frame`] from async code.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::PATIENCE;

/// `payload` as one frame: its length, then itself.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    frame
}

/// A hand-driven connection over a plain socket or any other byte stream
/// (a TLS session, say).
pub struct Raw<S = TcpStream> {
    pub stream: S,
}

impl Raw<TcpStream> {
    /// A connection to `address` whose reads give up after [`PATIENCE`].
    pub fn connect(address: &str) -> Raw {
        Self::connect_within(address, PATIENCE)
    }

    /// A connection to `address` whose reads give up after `limit`.
    pub fn connect_within(address: &str, limit: Duration) -> Raw {
        let stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(limit)).unwrap();
        Raw { stream }
    }

    /// The local address, as the server's log lines name this peer.
    pub fn peer(&self) -> String {
        format!("peer: {}", self.stream.local_addr().unwrap())
    }
}

impl<S: Read + Write> Raw<S> {
    pub fn new(stream: S) -> Raw<S> {
        Raw { stream }
    }

    /// Writes `bytes` as they are, framed or not.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
        self.stream.flush().unwrap();
    }

    /// Writes one frame holding `payload`.
    pub fn send(&mut self, payload: impl AsRef<[u8]>) {
        self.send_bytes(&frame(payload.as_ref()));
    }

    /// The next frame's payload; `None` once the peer has closed (or the
    /// read timed out).
    pub fn recv(&mut self) -> Option<String> {
        let mut header = [0u8; 4];
        self.stream.read_exact(&mut header).ok()?;
        let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
        self.stream.read_exact(&mut payload).ok()?;
        Some(String::from_utf8(payload).unwrap())
    }

    /// The next frame's payload; fails the test when none comes.
    pub fn reply(&mut self) -> String {
        self.recv()
            .expect("a reply before the read timeout and the close")
    }
}

/// Writes one frame holding `payload` on an async stream.
pub async fn write_frame(stream: &mut (impl AsyncWrite + Unpin), payload: impl AsRef<[u8]>) {
    stream.write_all(&frame(payload.as_ref())).await.unwrap();
}

/// The next frame's payload on an async stream; fails the test when none
/// comes within [`PATIENCE`].
pub async fn read_frame(stream: &mut (impl AsyncRead + Unpin)) -> String {
    tokio::time::timeout(PATIENCE, async {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).await.unwrap();
        let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
        stream.read_exact(&mut payload).await.unwrap();
        String::from_utf8(payload).unwrap()
    })
    .await
    .expect("a reply")
}
