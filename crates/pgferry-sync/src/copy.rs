//! Moving rows: a source's `COPY … TO STDOUT` forwarded into a target's `COPY … FROM STDIN`
//! without decoding a value.
//!
//! Both sessions use the same text forms (see `pgferry_core::session`), so the text one server
//! writes is read back as the same values by the other, across major versions. Memory stays
//! bounded: chunks are forwarded as they arrive, whatever the number of rows.

use futures_util::{pin_mut, SinkExt, StreamExt};
use tokio_postgres::Transaction;

/// Streams `copy_out` (a `COPY (…) TO STDOUT`) on `from` into `copy_in` (a `COPY … FROM STDIN`)
/// on `to`, and returns the number of rows the target took.
pub async fn pass_through(
    from: &Transaction<'_>,
    copy_out: &str,
    to: &Transaction<'_>,
    copy_in: &str,
) -> Result<u64, tokio_postgres::Error> {
    let sink = to.copy_in::<_, bytes::Bytes>(copy_in).await?;
    let stream = from.copy_out(copy_out).await?;
    pin_mut!(sink);
    pin_mut!(stream);
    while let Some(chunk) = stream.next().await {
        sink.feed(chunk?).await?;
    }
    sink.as_mut().finish().await
}

/// How many buffers of prefetched rows may wait for the target: with buffers of about
/// [`PREFETCH_BUFFER`] bytes, pgferry holds at most ~32 MiB (plus one row) per table in flight.
const PREFETCH_BUFFERS: usize = 512;
/// Prefetched rows are forwarded in buffers of about this many bytes.
const PREFETCH_BUFFER: usize = 64 * 1024;

/// Reads `copy_out` on `from` into a bounded buffer while `prepare` runs on the target (deleting
/// the pending keys), then streams the rows into `copy_in` on `to`: the source's work overlaps
/// the target's. `from` must read at the same snapshot as the round (an imported snapshot).
/// If either side fails, the error is returned and the caller's target transaction, which is
/// not committed, rolls back: a partial COPY never becomes visible.
pub async fn prefetch_through<F>(
    from: &tokio_postgres::Client,
    copy_out: &str,
    to: &Transaction<'_>,
    prepare: F,
    copy_in: &str,
) -> Result<u64, PrefetchError>
where
    F: std::future::Future<Output = Result<(), PrefetchError>>,
{
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<bytes::Bytes>(PREFETCH_BUFFERS);
    let producer = async move {
        let stream = from
            .copy_out(copy_out)
            .await
            .map_err(PrefetchError::Source)?;
        pin_mut!(stream);
        let mut buf = bytes::BytesMut::with_capacity(PREFETCH_BUFFER);
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk.map_err(PrefetchError::Source)?);
            if buf.len() >= PREFETCH_BUFFER {
                let full =
                    std::mem::replace(&mut buf, bytes::BytesMut::with_capacity(PREFETCH_BUFFER));
                if sender.send(full.freeze()).await.is_err() {
                    return Ok(()); // the consumer failed; its error is the one reported
                }
            }
        }
        if !buf.is_empty() {
            let _ = sender.send(buf.freeze()).await;
        }
        Ok::<(), PrefetchError>(())
    };
    let consumer = async move {
        prepare.await?;
        let sink = to
            .copy_in::<_, bytes::Bytes>(copy_in)
            .await
            .map_err(PrefetchError::Target)?;
        pin_mut!(sink);
        while let Some(b) = receiver.recv().await {
            sink.feed(b).await.map_err(PrefetchError::Target)?;
        }
        sink.as_mut().finish().await.map_err(PrefetchError::Target)
    };
    let (produced, consumed) = tokio::join!(producer, consumer);
    produced?;
    consumed
}

/// Which side of a prefetched copy failed.
#[derive(Debug)]
pub enum PrefetchError {
    Source(tokio_postgres::Error),
    Target(tokio_postgres::Error),
    /// An error of the `prepare` step, already wrapped.
    Prepare(crate::SyncError),
}
