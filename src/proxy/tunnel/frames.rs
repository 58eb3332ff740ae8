//! Frame boundaries of the worker's side of a WebSocket (RFC 6455 5.2).
//!
//! tether does not read messages; it only follows frame headers (FIN and
//! opcode, 7/16/64-bit payload length, mask bit) of the bytes it copies
//! from the worker to the client, so that it can write a Close frame of its
//! own *between* two frames when the worker's side dies or tether stops. A
//! control frame may sit between the fragments of a message, so any frame
//! boundary will do.

/// The Close opcode.
const CLOSE: u8 = 0x8;

/// `1001 going away`: tether is stopping.
pub(crate) const GOING_AWAY: u16 = 1001;
/// `1011 internal error`: the worker's side ended without a Close frame.
pub(crate) const WORKER_LOST: u16 = 1011;

/// Where the byte stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a frame header, `have` bytes of it read (0: between frames).
    Head { have: usize },
    /// In a payload, `left` bytes to go.
    Payload { left: u64 },
}

/// Follows the frames of one direction of a WebSocket.
#[derive(Debug)]
pub(crate) struct Frames {
    state: State,
    head: [u8; 14],
    closed: bool,
}

impl Frames {
    /// A stream that starts between frames (right after the 101).
    pub(crate) fn new() -> Frames {
        Frames {
            state: State::Head { have: 0 },
            head: [0; 14],
            closed: false,
        }
    }

    /// Whether the bytes so far end exactly between two frames.
    pub(crate) fn at_boundary(&self) -> bool {
        self.state == State::Head { have: 0 }
    }

    /// Whether this side has started a Close frame (then tether must not
    /// send one of its own).
    pub(crate) fn closed(&self) -> bool {
        self.closed
    }

    /// How many bytes can be read without passing the end of the current
    /// frame (at least 1): reading no more than this reaches a boundary.
    pub(crate) fn to_boundary(&self) -> usize {
        match self.state {
            State::Payload { left } => usize::try_from(left).unwrap_or(usize::MAX),
            State::Head { have } if have < 2 => 2 - have,
            State::Head { have } => header_len(&self.head) - have,
        }
    }

    /// Follows `bytes`, the next bytes of the stream.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                State::Payload { left } => {
                    let n = bytes.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    bytes = &bytes[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::Head { have: 0 }
                    } else {
                        State::Payload { left }
                    };
                }
                State::Head { have } => {
                    let need = if have < 2 { 2 } else { header_len(&self.head) };
                    let take = (need - have).min(bytes.len());
                    self.head[have..have + take].copy_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    let have = have + take;
                    self.state = State::Head { have };
                    if have < 2 || have < header_len(&self.head) {
                        continue;
                    }
                    if self.head[0] & 0x0f == CLOSE {
                        self.closed = true;
                    }
                    self.state = match payload_len(&self.head) {
                        0 => State::Head { have: 0 },
                        left => State::Payload { left },
                    };
                }
            }
        }
    }
}

/// The length of a header whose first two bytes are in `head`.
fn header_len(head: &[u8; 14]) -> usize {
    let ext = match head[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if head[1] & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

/// The payload length of a complete header.
fn payload_len(head: &[u8; 14]) -> u64 {
    match head[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([head[2], head[3]])),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[2..10]);
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    }
}

/// A server's (unmasked) Close frame with `code` and a short `reason`.
pub(crate) fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    // A control frame's payload is at most 125 bytes.
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut f = vec![0x80 | CLOSE, (2 + reason.len()) as u8];
    f.extend_from_slice(&code.to_be_bytes());
    f.extend_from_slice(reason);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, fin: bool, len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        let m = if masked { 0x80 } else { 0 };
        match len {
            0..=125 => f.push(m | len as u8),
            126..=65535 => {
                f.push(m | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(m | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.resize(f.len() + len, b'x');
        f
    }

    /// Feeds `stream` in chunks of `chunk` bytes; returns the offsets at
    /// which the tracker said "between frames".
    fn boundaries(stream: &[u8], chunk: usize) -> Vec<usize> {
        let mut f = Frames::new();
        let mut at = vec![];
        let mut pos = 0;
        while pos < stream.len() {
            // Never read past the next boundary, as a stopping tunnel does.
            let n = chunk.min(f.to_boundary()).min(stream.len() - pos);
            f.feed(&stream[pos..pos + n]);
            pos += n;
            if f.at_boundary() {
                at.push(pos);
            }
        }
        at
    }

    #[test]
    fn finds_every_boundary_whatever_the_chunking() {
        let frames = [
            frame(0x1, true, 5, false),
            frame(0x2, false, 300, false),
            frame(0x9, true, 0, false),
            frame(0x0, true, 70_000, false),
            frame(0x1, true, 126, true),
        ];
        let mut stream = vec![];
        let mut want = vec![];
        for f in &frames {
            stream.extend_from_slice(f);
            want.push(stream.len());
        }
        for chunk in [1, 2, 3, 7, 13, 1000, 1 << 20] {
            assert_eq!(boundaries(&stream, chunk), want, "chunk {chunk}");
        }
    }

    #[test]
    fn a_partial_header_or_payload_is_not_a_boundary() {
        let mut f = Frames::new();
        assert!(f.at_boundary());
        let data = frame(0x1, true, 200, false);
        f.feed(&data[..1]);
        assert!(!f.at_boundary());
        assert_eq!(f.to_boundary(), 1);
        f.feed(&data[1..3]);
        assert_eq!(f.to_boundary(), 1, "16-bit length half read");
        f.feed(&data[3..10]);
        assert_eq!(f.to_boundary(), 200 - 6);
        f.feed(&data[10..]);
        assert!(f.at_boundary());
    }

    #[test]
    fn notices_the_workers_close_frame() {
        let mut f = Frames::new();
        f.feed(&frame(0x1, true, 3, false));
        assert!(!f.closed());
        f.feed(&close_frame(1000, "bye"));
        assert!(f.closed());
        assert!(f.at_boundary());
    }

    #[test]
    fn close_frames_are_well_formed() {
        assert_eq!(close_frame(1001, ""), vec![0x88, 2, 0x03, 0xe9]);
        let long = "x".repeat(300);
        let f = close_frame(1011, &long);
        assert_eq!(f.len(), 2 + 125);
        assert_eq!(f[1], 125);
    }
}
