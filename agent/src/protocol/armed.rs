//! A long-lived wait that a pump's `select!` keeps across wake-ups, polled only when one of
//! its own sources has woken it.
//!
//! A session's pump waits on the data and, at once, on the session's end (the grant's state,
//! the resource's removal, the agent's shutdown, the other pump's end). Those end signals
//! fire once in a session's life, yet `select!` polls every branch at every wake-up, and
//! polling a `Notify`-based wait (cancellation tokens, `watch`) takes a lock each time: with
//! the waits built anew per message it was also a waiter registered and removed per signal,
//! several percent of the agent's CPU per statement. [`Armed`] polls its inner future under a
//! waker of its own, and polls it again only after that waker was called: at other wake-ups
//! it costs two atomic operations.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

use futures_util::task::AtomicWaker;

/// Set by the inner future's sources; wakes the task that polls the [`Armed`].
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// `inner`, polled at its first poll and then only when something it waits on has fired.
///
/// Like any future, an `Armed` must not be polled again once it returned `Ready` unless its
/// inner future allows it (re-arm with a new `Armed` instead).
pub struct Armed<F> {
    inner: Pin<Box<F>>,
    signal: Arc<Signal>,
    waker: Waker,
}

impl<F: Future> Armed<F> {
    pub fn new(inner: F) -> Self {
        let signal = Arc::new(Signal {
            // Polled at the first poll: the inner future registers its waits then.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(signal.clone());
        Self {
            inner: Box::pin(inner),
            signal,
            waker,
        }
    }
}

impl<F: Future> Future for Armed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // Registered before the flag is read: a source firing after the read wakes this task.
        this.signal.task.register(cx.waker());
        if !this.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::AtomicUsize, time::Duration};

    use tokio_util::sync::CancellationToken;

    use super::*;

    /// Counts its polls; ready once the token is cancelled.
    struct Counted<'a> {
        polls: &'a AtomicUsize,
        inner: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    }

    impl Future for Counted<'_> {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            self.inner.as_mut().poll(cx)
        }
    }

    #[tokio::test]
    async fn polls_its_inner_future_only_when_that_future_was_woken() {
        let token = CancellationToken::new();
        let polls = AtomicUsize::new(0);
        let mut armed = Armed::new(Counted {
            polls: &polls,
            inner: Box::pin(token.clone().cancelled_owned()),
        });
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(8);
        let sender = tokio::spawn(async move {
            for i in 0..100 {
                tx.send(i).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        // A hundred wake-ups by the channel: the armed wait is polled once, at the first.
        let mut got = 0;
        while got < 100 {
            tokio::select! {
                biased;
                () = &mut armed => panic!("not cancelled"),
                Some(_) = rx.recv() => got += 1,
            }
        }
        sender.await.unwrap();
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        // Its source fires: the next wake-up polls it, and it is ready.
        let cancel = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            cancel.cancel();
        });
        tokio::time::timeout(Duration::from_secs(5), &mut armed)
            .await
            .expect("the cancellation reaches the armed wait");
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn ready_at_once_when_its_source_fired_before_the_first_poll() {
        let token = CancellationToken::new();
        token.cancel();
        let armed = Armed::new(token.cancelled());
        tokio::time::timeout(Duration::from_secs(1), armed)
            .await
            .expect("ready at the first poll");
    }

    #[tokio::test]
    async fn a_wake_from_another_thread_is_never_lost() {
        // Many rounds of a cancel racing the first park: every one completes.
        for _ in 0..500 {
            let token = CancellationToken::new();
            let armed = Armed::new(token.clone().cancelled_owned());
            let t = std::thread::spawn(move || token.cancel());
            tokio::time::timeout(Duration::from_secs(5), armed)
                .await
                .expect("the wake is not lost");
            t.join().unwrap();
        }
    }
}
