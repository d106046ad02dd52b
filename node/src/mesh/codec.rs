//! The request-response codec for bulk transfers: a 4-byte big-endian length, then
//! one CBOR value (ciborium). Sizes are checked before anything is allocated.
//!
//! This module only frames and decodes; what a request means is the event loop's
//! business. (libp2p's own `cbor` codec uses cbor4ii; the workspace speaks ciborium.)
//! One exception, for time's sake: the four stamps of a clock sample are taken here,
//! as its frames go onto and come off the wire, so that neither end's event loop
//! counts as network delay on one leg only (`RunRequest::Clock`).

use std::future::Future;
use std::io;
use std::pin::Pin;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::request_response;
use libp2p::StreamProtocol;
use stampede_protocol::mesh::{
    from_cbor, to_cbor, MeshRequest, MeshResponse, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES,
};
use stampede_protocol::run::{unix_us, RunRequest, RunResponse};

/// The protocol name of bulk transfers.
pub const BULK_PROTOCOL: StreamProtocol = StreamProtocol::new("/stampede/bulk/1");

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// The codec; it holds no state, every stream is framed independently.
#[derive(Debug, Clone, Copy, Default)]
pub struct BulkCodec;

/// Reads one length-prefixed frame of at most `limit` bytes.
pub async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: usize,
) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {limit} bytes"),
        ));
    }
    // The length is the peer's claim: grow with the bytes that actually arrive, so a
    // header claiming 16 MiB followed by silence costs a chunk, not 16 MiB.
    let mut buf = Vec::with_capacity(len.min(FRAME_CHUNK));
    let mut chunk = [0u8; FRAME_CHUNK];
    while buf.len() < len {
        let want = (len - buf.len()).min(FRAME_CHUNK);
        let n = io.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("frame ended after {} of its {len} bytes", buf.len()),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

/// How much of a frame is read (and allocated) at a time.
const FRAME_CHUNK: usize = 64 * 1024;

/// Writes one length-prefixed frame and closes the writing side (a request or an
/// answer is the whole stream).
pub async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    bytes: &[u8],
    limit: usize,
) -> io::Result<()> {
    put_frame(io, bytes, limit).await?;
    io.close().await
}

/// Writes one length-prefixed frame and leaves the stream open for the next one (the
/// direct streams of `mesh::direct`); the caller flushes.
pub async fn put_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    bytes: &[u8],
    limit: usize,
) -> io::Result<()> {
    if bytes.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "frame of {} bytes exceeds the limit of {limit} bytes",
                bytes.len()
            ),
        ));
    }
    io.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    io.write_all(bytes).await
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

// The trait is declared with `#[async_trait]` in libp2p-request-response 0.29; these
// are the same signatures written out, so the workspace needs no async-trait crate.
impl request_response::Codec for BulkCodec {
    type Protocol = StreamProtocol;
    type Request = MeshRequest;
    type Response = MeshResponse;

    fn read_request<'a, 'b, 'c, 'f, T>(
        &'a mut self,
        _: &'b StreamProtocol,
        io: &'c mut T,
    ) -> BoxFut<'f, MeshRequest>
    where
        T: AsyncRead + Unpin + Send + 'f,
        'a: 'f,
        'b: 'f,
        'c: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            let bytes = read_frame(io, MAX_REQUEST_BYTES).await?;
            let mut req: MeshRequest =
                from_cbor(&bytes, MAX_REQUEST_BYTES, "a mesh request").map_err(invalid)?;
            if let MeshRequest::Run(RunRequest::Clock { arrived_us, .. }) = &mut req {
                *arrived_us = Some(unix_us());
            }
            Ok(req)
        })
    }

    fn read_response<'a, 'b, 'c, 'f, T>(
        &'a mut self,
        _: &'b StreamProtocol,
        io: &'c mut T,
    ) -> BoxFut<'f, MeshResponse>
    where
        T: AsyncRead + Unpin + Send + 'f,
        'a: 'f,
        'b: 'f,
        'c: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            let bytes = read_frame(io, MAX_RESPONSE_BYTES).await?;
            let mut res: MeshResponse =
                from_cbor(&bytes, MAX_RESPONSE_BYTES, "a mesh response").map_err(invalid)?;
            if let MeshResponse::Run(RunResponse::Clock { received_us, .. }) = &mut res {
                *received_us = Some(unix_us());
            }
            Ok(res)
        })
    }

    fn write_request<'a, 'b, 'c, 'f, T>(
        &'a mut self,
        _: &'b StreamProtocol,
        io: &'c mut T,
        mut req: MeshRequest,
    ) -> BoxFut<'f, ()>
    where
        T: AsyncWrite + Unpin + Send + 'f,
        'a: 'f,
        'b: 'f,
        'c: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            if let MeshRequest::Run(RunRequest::Clock { t1_us, .. }) = &mut req {
                *t1_us = unix_us();
            }
            write_frame(io, &to_cbor(&req), MAX_REQUEST_BYTES).await
        })
    }

    fn write_response<'a, 'b, 'c, 'f, T>(
        &'a mut self,
        _: &'b StreamProtocol,
        io: &'c mut T,
        mut res: MeshResponse,
    ) -> BoxFut<'f, ()>
    where
        T: AsyncWrite + Unpin + Send + 'f,
        'a: 'f,
        'b: 'f,
        'c: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            if let MeshResponse::Run(RunResponse::Clock { t3_us, .. }) = &mut res {
                *t3_us = unix_us();
            }
            write_frame(io, &to_cbor(&res), MAX_RESPONSE_BYTES).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use libp2p::request_response::Codec;

    fn block<F: Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn request_round_trips() {
        let mut buf = Cursor::new(Vec::new());
        block(BulkCodec.write_request(&BULK_PROTOCOL, &mut buf, MeshRequest::Members)).unwrap();
        let mut rd = Cursor::new(buf.into_inner());
        assert_eq!(
            block(BulkCodec.read_request(&BULK_PROTOCOL, &mut rd)).unwrap(),
            MeshRequest::Members
        );
    }

    /// A clock sample's four times are the wire's: the responder's work between its
    /// receive and send stamps (its event loop, however busy) cancels out of the
    /// offset instead of counting as network delay on the way in.
    #[test]
    fn clock_samples_are_stamped_at_the_wire() {
        use stampede_protocol::run::clock_offset;
        let mut wire = Cursor::new(Vec::new());
        let ask = MeshRequest::Run(RunRequest::Clock {
            t1_us: 0,
            arrived_us: None,
        });
        block(BulkCodec.write_request(&BULK_PROTOCOL, &mut wire, ask)).unwrap();
        let mut rd = Cursor::new(wire.into_inner());
        let MeshRequest::Run(RunRequest::Clock { t1_us, arrived_us }) =
            block(BulkCodec.read_request(&BULK_PROTOCOL, &mut rd)).unwrap()
        else {
            panic!("not a clock sample")
        };
        let t2_us = arrived_us.expect("the codec notes the arrival");
        assert!(t1_us > 0 && t1_us <= t2_us, "{t1_us} {t2_us}");
        // The responder's event loop takes its time (a busy origin: here 40 ms).
        let busy_until = unix_us() + 40_000;
        while unix_us() < busy_until {
            std::hint::spin_loop();
        }
        let answer = MeshResponse::Run(RunResponse::Clock {
            t1_us,
            t2_us,
            t3_us: 0,
            received_us: None,
        });
        let mut wire = Cursor::new(Vec::new());
        block(BulkCodec.write_response(&BULK_PROTOCOL, &mut wire, answer)).unwrap();
        let mut rd = Cursor::new(wire.into_inner());
        let MeshResponse::Run(RunResponse::Clock {
            t3_us, received_us, ..
        }) = block(BulkCodec.read_response(&BULK_PROTOCOL, &mut rd)).unwrap()
        else {
            panic!("not a clock answer")
        };
        let t4_us = received_us.expect("the codec notes the receipt");
        assert!(t3_us >= busy_until && t4_us >= t3_us, "{t3_us} {t4_us}");
        // Stamped in the event loop (after the busy part), the inbound leg would have
        // taken the 40 ms and the offset come out +20 ms on one clock.
        let (offset, rtt) = clock_offset(t1_us, t2_us, t3_us, t4_us);
        assert!(
            offset.unsigned_abs() < 10_000 && rtt < 20_000,
            "offset {offset} us, round trip {rtt} us"
        );
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut rd = Cursor::new(vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        let err = block(BulkCodec.read_request(&BULK_PROTOCOL, &mut rd)).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
    }

    /// A reader that counts how many bytes the frame reader asked for at most at once.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        largest_ask: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.largest_ask = self.largest_ask.max(buf.len());
            let n = buf.len().min(self.data.len() - self.at).min(1000);
            let at = self.at;
            buf[..n].copy_from_slice(&self.data[at..at + n]);
            self.at += n;
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn a_claimed_length_is_not_allocated_before_the_bytes_arrive() {
        // 16 MiB claimed (within the response limit), 10 bytes sent, then the stream ends.
        let mut data = (MAX_RESPONSE_BYTES as u32).to_be_bytes().to_vec();
        data.extend([7u8; 10]);
        let mut rd = Trickle {
            data,
            at: 0,
            largest_ask: 0,
        };
        let err = block(read_frame(&mut rd, MAX_RESPONSE_BYTES)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(
            err.to_string().contains("after 10 of its 16777216 bytes"),
            "{err}"
        );
        assert!(rd.largest_ask <= FRAME_CHUNK, "asked {}", rd.largest_ask);
        // A whole frame arriving in small pieces is read in full.
        let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut data = (payload.len() as u32).to_be_bytes().to_vec();
        data.extend(&payload);
        let mut rd = Trickle {
            data,
            at: 0,
            largest_ask: 0,
        };
        assert_eq!(
            block(read_frame(&mut rd, MAX_RESPONSE_BYTES)).unwrap(),
            payload
        );
    }

    #[test]
    fn garbage_is_an_error() {
        let mut rd = Cursor::new(vec![0, 0, 0, 3, 0xff, 0xfe, 0xfd]);
        assert!(block(BulkCodec.read_request(&BULK_PROTOCOL, &mut rd)).is_err());
        let mut short = Cursor::new(vec![0, 0, 0, 9, 1]);
        assert!(block(BulkCodec.read_response(&BULK_PROTOCOL, &mut short)).is_err());
    }
}
