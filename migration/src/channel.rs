//! The byte transport a stream travels over. A file, a serial port or a
//! network connection implements [`ChannelWrite`] on the sending side and
//! [`ChannelRead`] on the receiving side; [`MemChannel`] is the in-memory
//! one (tests, and staging a whole stream before parsing it).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Why a channel could not move bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelError {
    /// The peer closed the channel.
    Closed,
    /// A size limit was reached.
    Full { limit: usize },
    /// A transport error.
    Io(String),
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => f.write_str("channel closed"),
            Self::Full { limit } => write!(f, "channel limit of {limit} bytes reached"),
            Self::Io(m) => write!(f, "channel: {m}"),
        }
    }
}

/// The sending side.
pub trait ChannelWrite {
    /// Writes all of `data` or fails.
    fn write_all(&mut self, data: &[u8]) -> Result<(), ChannelError>;
    /// Pushes buffered bytes to the peer.
    fn flush(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }
}

/// The receiving side.
pub trait ChannelRead {
    /// Reads up to `buf.len()` bytes; `Ok(0)` at the end of the stream.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError>;
}

impl<T: ChannelWrite + ?Sized> ChannelWrite for &mut T {
    fn write_all(&mut self, data: &[u8]) -> Result<(), ChannelError> {
        (**self).write_all(data)
    }
    fn flush(&mut self) -> Result<(), ChannelError> {
        (**self).flush()
    }
}

impl<T: ChannelRead + ?Sized> ChannelRead for &mut T {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        (**self).read(buf)
    }
}

impl ChannelWrite for Vec<u8> {
    fn write_all(&mut self, data: &[u8]) -> Result<(), ChannelError> {
        self.extend_from_slice(data);
        Ok(())
    }
}

/// An in-memory channel: writes append, reads consume from the front.
/// An optional limit makes writes past it fail with [`ChannelError::Full`].
#[derive(Clone, Debug, Default)]
pub struct MemChannel {
    data: Vec<u8>,
    read_at: usize,
    limit: Option<usize>,
}

impl MemChannel {
    pub fn new() -> Self {
        Self::default()
    }

    /// A channel that holds at most `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            limit: Some(limit),
            ..Self::default()
        }
    }

    /// A channel to read `data` from.
    pub fn from_bytes(data: Vec<u8>) -> Self {
        Self {
            data,
            ..Self::default()
        }
    }

    /// Everything written so far (read or not).
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }
}

impl ChannelWrite for MemChannel {
    fn write_all(&mut self, data: &[u8]) -> Result<(), ChannelError> {
        if let Some(limit) = self.limit {
            if self.data.len().saturating_add(data.len()) > limit {
                return Err(ChannelError::Full { limit });
            }
        }
        self.data.extend_from_slice(data);
        Ok(())
    }
}

impl ChannelRead for MemChannel {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        let rest = &self.data[self.read_at..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.read_at += n;
        Ok(n)
    }
}

/// Reads a whole stream from `ch` into memory, refusing more than `max`
/// bytes (the parser works on the bytes of a complete stream).
pub fn read_to_end<R: ChannelRead>(ch: &mut R, max: usize) -> Result<Vec<u8>, ChannelError> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = ch.read(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        let chunk = buf
            .get(..n)
            .ok_or(ChannelError::Io("read overran".into()))?;
        if out.len().saturating_add(n) > max {
            return Err(ChannelError::Full { limit: max });
        }
        out.extend_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_channel_round_trip_and_limits() {
        let mut ch = MemChannel::with_limit(6);
        ch.write_all(b"abcd").unwrap();
        assert_eq!(ch.write_all(b"efg"), Err(ChannelError::Full { limit: 6 }));
        ch.write_all(b"ef").unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(ch.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf, b"abcd");
        assert_eq!(ch.read(&mut buf).unwrap(), 2);
        assert_eq!(ch.read(&mut buf).unwrap(), 0);
        let mut src = MemChannel::from_bytes(alloc::vec![7u8; 10_000]);
        assert_eq!(read_to_end(&mut src, 10_000).unwrap().len(), 10_000);
        let mut src = MemChannel::from_bytes(alloc::vec![7u8; 10_001]);
        assert_eq!(
            read_to_end(&mut src, 10_000),
            Err(ChannelError::Full { limit: 10_000 })
        );
    }
}
