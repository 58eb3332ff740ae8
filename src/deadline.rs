//! A deadline that moves often but is checked rarely.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::time::{Instant, Sleep};

/// A timer made at its first poll and moved only when it fires before the
/// moment asked for: a deadline pushed back per request or per frame costs
/// the caller a field write, not a timer registration.
#[derive(Debug, Default)]
pub(crate) struct LazyDeadline(Option<Pin<Box<Sleep>>>);

impl LazyDeadline {
    /// Ready once `due` has passed, else registers `cx` to be woken no
    /// later than `due`. `due` may be later than at the previous poll
    /// (never earlier): the timer then fires early once and is moved.
    pub(crate) fn poll_until(&mut self, cx: &mut Context<'_>, due: Instant) -> Poll<()> {
        let sleep = self
            .0
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        loop {
            ready!(sleep.as_mut().poll(cx));
            if Instant::now() >= due {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(due);
        }
    }
}
