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
