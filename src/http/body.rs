//! Response bodies: a buffer for every JSON answer, or a byte range of a
//! file streamed in chunks, so a firmware image is never read whole into
//! memory.

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::Bytes;

/// A response body: a buffer (every JSON answer) or a byte range of a file
/// streamed in chunks (firmware images: never read whole into memory).
pub enum Body {
    Full(Full<Bytes>),
    File(FileBody),
}

impl Body {
    pub(super) fn full(b: impl Into<Bytes>) -> Body {
        Body::Full(Full::new(b.into()))
    }

    /// The next `len` bytes of `file`, read a chunk at a time.
    pub(super) fn file(file: smol::fs::File, len: u64) -> Body {
        Body::File(FileBody {
            file,
            remaining: len,
            buf: vec![0u8; FILE_CHUNK.min(len.max(1) as usize)].into_boxed_slice(),
        })
    }
}

pub struct FileBody {
    file: smol::fs::File,
    remaining: u64,
    buf: Box<[u8]>,
}

/// Read size per frame when streaming a file.
const FILE_CHUNK: usize = 64 << 10;

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        use std::task::Poll;
        match self.get_mut() {
            Body::Full(f) => std::pin::Pin::new(f)
                .poll_frame(cx)
                .map_err(|never: Infallible| match never {}),
            Body::File(f) => {
                if f.remaining == 0 {
                    return Poll::Ready(None);
                }
                let n = (f.remaining as usize).min(f.buf.len());
                let FileBody { file, buf, .. } = f;
                match smol::io::AsyncRead::poll_read(std::pin::Pin::new(file), cx, &mut buf[..n]) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                    Poll::Ready(Ok(0)) => {
                        Poll::Ready(Some(Err(std::io::ErrorKind::UnexpectedEof.into())))
                    }
                    Poll::Ready(Ok(k)) => {
                        f.remaining -= k as u64;
                        Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::copy_from_slice(
                            &f.buf[..k],
                        )))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(f) => f.is_end_stream(),
            Body::File(f) => f.remaining == 0,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Body::Full(f) => f.size_hint(),
            Body::File(f) => hyper::body::SizeHint::with_exact(f.remaining),
        }
    }
}
