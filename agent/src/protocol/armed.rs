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
//! it costs the task waker's registration (no clone for the same task) and a flag.

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
    /// The inner future has been polled and left its waits registered: from then on no
    /// source fires without calling this signal.
    registered: AtomicBool,
    /// A source has fired at least once (sticky; see [`News`]).
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Whether an [`Armed`] wait may have news, read without polling it: for a check that must
/// run between two messages (is the session still allowed?) yet costs locks to make.
#[derive(Clone)]
pub struct News(Arc<Signal>);

impl News {
    /// Nothing the wait listens to has fired since it was registered: a check of the state
    /// its sources guard would find it as it was. False before the wait's first poll (its
    /// sources could fire unheard) and forever after any source fired.
    pub fn quiet(&self) -> bool {
        self.0.registered.load(Ordering::Acquire) && !self.0.fired.load(Ordering::Acquire)
    }
}

/// `inner`, polled at its first poll and then only when something it waits on has fired.
///
/// Fused: once it returned `Ready` it stays pending (re-arm with a new `Armed`). The inner
/// future is polled outside tokio's cooperative budget: a wait that returned `Pending` for
/// want of budget would not have registered its sources, and [`News`] would read as quiet
/// with nothing listening.
pub struct Armed<F> {
    inner: Pin<Box<tokio::task::Unconstrained<F>>>,
    done: bool,
    signal: Arc<Signal>,
    waker: Waker,
}

impl<F: Future> Armed<F> {
    pub fn new(inner: F) -> Self {
        let signal = Arc::new(Signal {
            // Polled at the first poll: the inner future registers its waits then.
            woken: AtomicBool::new(true),
            registered: AtomicBool::new(false),
            fired: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(signal.clone());
        Self {
            inner: Box::pin(tokio::task::unconstrained(inner)),
            done: false,
            signal,
            waker,
        }
    }

    /// A reader of whether this wait may have news, for code that does not poll it.
    pub fn news(&self) -> News {
        News(self.signal.clone())
    }
}

impl<F: Future> Future for Armed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if this.done {
            return Poll::Pending;
        }
        // Registered at every poll (it does not clone the same task's waker again), before
        // the flag is read: a source firing after the read wakes this task. Skipping it when
        // nothing seemed to have fired would trust a waker a wake still in flight may take.
        this.signal.task.register(cx.waker());
        if !this.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let polled = this
            .inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker));
        if polled.is_pending() {
            this.signal.registered.store(true, Ordering::Release);
        } else {
            this.done = true;
        }
        polled
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
    async fn news_is_quiet_only_while_registered_and_unfired() {
        let token = CancellationToken::new();
        let mut armed = Armed::new(token.clone().cancelled_owned());
        let news = armed.news();
        assert!(!news.quiet(), "not registered before its first poll");
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut armed).poll(&mut cx).is_pending());
        assert!(news.quiet(), "registered, nothing fired");
        token.cancel();
        assert!(!news.quiet(), "the cancel is seen without a poll");
        assert!(Pin::new(&mut armed).poll(&mut cx).is_ready());
        assert!(!news.quiet(), "sticky once fired");
    }

    /// A source that can fire any number of times, waking whoever polled it last.
    #[derive(Default)]
    struct Source(std::sync::Mutex<Option<Waker>>);

    impl Source {
        fn fire(&self) {
            if let Some(w) = self.0.lock().expect("source").as_ref() {
                w.wake_by_ref();
            }
        }
    }

    struct Listen(Arc<Source>);

    impl Future for Listen {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            *self.0.0.lock().expect("source") = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// A task waker that counts its wakes and can run a hook when it is cloned (as the
    /// signal's registration clones it): a source firing in the middle of a registration.
    struct Hooked {
        wakes: AtomicUsize,
        on_clone: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    static HOOKED: std::task::RawWakerVTable =
        std::task::RawWakerVTable::new(hooked_clone, hooked_wake, hooked_wake, hooked_drop);

    unsafe fn hooked_clone(p: *const ()) -> std::task::RawWaker {
        // SAFETY: `p` is the leaked `Hooked` the waker was made from.
        let h = unsafe { &*p.cast::<Hooked>() };
        let hook = h.on_clone.lock().expect("hook").take();
        if let Some(hook) = hook {
            hook();
        }
        std::task::RawWaker::new(p, &HOOKED)
    }

    unsafe fn hooked_wake(p: *const ()) {
        // SAFETY: as above.
        unsafe { &*p.cast::<Hooked>() }
            .wakes
            .fetch_add(1, Ordering::SeqCst);
    }

    unsafe fn hooked_drop(_: *const ()) {}

    #[test]
    fn a_wake_during_registration_is_not_lost_at_the_next_fire() {
        let source = Arc::new(Source::default());
        let hooked: &'static Hooked = Box::leak(Box::new(Hooked {
            wakes: AtomicUsize::new(0),
            on_clone: std::sync::Mutex::new(None),
        }));
        // SAFETY: the vtable's functions treat the pointer as the leaked `Hooked`.
        let task = unsafe {
            Waker::from_raw(std::task::RawWaker::new(
                std::ptr::from_ref(hooked).cast(),
                &HOOKED,
            ))
        };
        let mut cx = Context::from_waker(&task);
        let mut armed = Armed::new(Listen(source.clone()));
        // Armed (the inner future polled), then registered with nothing fired.
        assert!(Pin::new(&mut armed).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut armed).poll(&mut cx).is_pending());
        source.fire();
        assert_eq!(hooked.wakes.load(Ordering::SeqCst), 1);
        // The next poll registers the task again; the source fires in the middle of it.
        let again = source.clone();
        *hooked.on_clone.lock().expect("hook") = Some(Box::new(move || again.fire()));
        assert!(Pin::new(&mut armed).poll(&mut cx).is_pending());
        assert_eq!(hooked.wakes.load(Ordering::SeqCst), 2);
        assert!(Pin::new(&mut armed).poll(&mut cx).is_pending());
        // A later fire must still reach the task.
        source.fire();
        assert_eq!(hooked.wakes.load(Ordering::SeqCst), 3, "a wake was lost");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_inner_future_woken_many_times_from_another_thread_completes() {
        // The inner wait is woken once per message, from another thread, racing the task's
        // polls; a wake lost between two polls would leave it waiting for ever.
        for round in 0..50 {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
            let armed = Armed::new(async move {
                for _ in 0..200 {
                    rx.recv().await.expect("sender alive");
                }
            });
            let t = std::thread::spawn(move || {
                for i in 0..200 {
                    tx.send(i).expect("receiver alive");
                    if i % 7 == round % 7 {
                        std::thread::yield_now();
                    }
                }
            });
            tokio::time::timeout(Duration::from_secs(10), armed)
                .await
                .expect("every wake reaches the task");
            t.join().expect("sender thread");
        }
    }

    #[test]
    fn stays_pending_once_it_was_ready() {
        let token = CancellationToken::new();
        token.cancel();
        let mut armed = Armed::new(async move { token.cancelled().await });
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut armed).poll(&mut cx).is_ready());
        // A late wake from a source: a completed async block would panic if polled again.
        Waker::from(armed.signal.clone()).wake_by_ref();
        assert!(Pin::new(&mut armed).poll(&mut cx).is_pending());
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
