//! The protocol seam: what a protocol (`tcp`, `postgres`, and next `http`) plugs into.
//!
//! The generic proxy ([`crate::proxy`]) accepts, attributes and routes a connection to its
//! resource, then hands it to that resource's protocol with a [`Session`]: who connected,
//! where to, and the agent's services (grants and approval holds, recording, the session's
//! end as one signal, the host-local CA, the masking key). It names no protocol.
//!
//! A protocol is one type implementing [`Protocol`] plus one line in [`PROTOCOLS`]:
//!
//! * its name (the `protocol = "..."` value) and the resource keys it owns ([`Protocol::KEYS`]);
//! * [`Protocol::configure`]: its typed settings, validated from those keys with file, line
//!   and key in errors. A resource carries them as [`Settings`], so a `postgres` resource
//!   without PostgreSQL settings cannot be represented;
//! * [`Protocol::start`]: state every session of the protocol shares for the agent's lifetime
//!   (caches, cancel keys), kept across reloads;
//! * [`Protocol::serve`]: one session, from the client's first byte to how it ended.

pub mod armed;
pub mod buffers;
pub mod conn;
pub mod context;
pub mod hold;
pub mod limits;
pub mod live;
pub mod rate;
pub mod record;
pub mod relay;
pub mod statements;
pub mod tcp;

use std::{
    any::Any, collections::HashMap, fmt, future::Future, marker::PhantomData, pin::Pin, sync::Arc,
};

pub use self::{
    conn::Conn,
    context::{End, Refused, Services, Session, SessionEnd, limit_outcome},
    hold::{Held, Hold, HoldOutcome},
};
use crate::{config::ResourceConfig, model::SessionOutcome};

/// How a session ended: the outcome and a human-readable detail, as recorded.
pub type Outcome = (SessionOutcome, String);

/// An [`Outcome`] that refuses or ends the session.
pub fn refuse(outcome: SessionOutcome, detail: impl Into<String>) -> Outcome {
    (outcome, detail.into())
}

/// A protocol the gate speaks. See the module documentation.
pub trait Protocol: Send + Sync + Sized + 'static {
    /// The `protocol = "..."` value of its resources.
    const NAME: &'static str;
    /// The keys of a `[[resource]]` table that belong to this protocol (the common ones,
    /// `name`, `address`, `on_missing_grant`..., are the config's).
    const KEYS: &'static [&'static str];
    /// One resource's validated settings.
    type Settings: Send + Sync + fmt::Debug + 'static;

    /// Validates the resource's protocol keys; reports problems through `cx` and returns
    /// `None` when the settings cannot be built at all.
    fn configure(cx: &mut ResourceConfig<'_, '_>) -> Option<Self::Settings>;

    /// The protocol's agent-lifetime state, built once at start.
    fn start(host: &Services) -> Self;

    /// What to send a client refused by a limit before the protocol saw a byte of it (the
    /// connection is closed after it). `None`: the client only sees the close.
    fn early_refusal(_limit: &limits::Exceeded) -> Option<Vec<u8>> {
        None
    }

    /// Serves one session to its end. Every refusal is answered in the client's own
    /// protocol where it has one; the returned outcome is what the session record says.
    fn serve<'a>(
        &'a self,
        session: Session<'a>,
        settings: &'a Self::Settings,
        client: Conn,
    ) -> impl Future<Output = Outcome> + Send + 'a;
}

/// Every protocol the gate speaks. Adding one is adding a line here.
pub static PROTOCOLS: &[&dyn Registered] = &[
    &Registration::<tcp::Tcp>::NEW,
    &Registration::<crate::postgres::Postgres>::NEW,
    &Registration::<crate::http::Http>::NEW,
];

/// The registry by name.
pub fn find(name: &str) -> Option<&'static dyn Registered> {
    PROTOCOLS.iter().copied().find(|p| p.name() == name)
}

/// The protocol of a resource that names none.
pub fn tcp_registration() -> &'static dyn Registered {
    &Registration::<tcp::Tcp>::NEW
}

/// `"tcp" or "postgres"`: the names, for error messages.
pub fn names_for_humans() -> String {
    let names: Vec<String> = PROTOCOLS
        .iter()
        .map(|p| format!("\"{}\"", p.name()))
        .collect();
    match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// The protocols that own a resource key, for "only applies to" errors: `"postgres"` or
/// `"postgres" or "http"` (`None`: no protocol has it).
pub fn owners_of(key: &str) -> Option<String> {
    let owners: Vec<String> = PROTOCOLS
        .iter()
        .filter(|p| p.keys().contains(&key))
        .map(|p| format!("\"{}\"", p.name()))
        .collect();
    match owners.split_last() {
        None => None,
        Some((last, [])) => Some(last.clone()),
        Some((last, rest)) => Some(format!("{} or {last}", rest.join(", "))),
    }
}

/// A protocol as the registry holds it: [`Protocol`] without its associated types.
pub trait Registered: Sync {
    fn name(&self) -> &'static str;
    fn keys(&self) -> &'static [&'static str];
    fn configure(&self, cx: &mut ResourceConfig<'_, '_>) -> Option<Settings>;
    fn start(&self, host: &Services) -> Arc<dyn Running>;
    fn early_refusal(&self, limit: &limits::Exceeded) -> Option<Vec<u8>>;
}

/// A started protocol: serves sessions of its resources.
pub trait Running: Send + Sync {
    fn serve<'a>(
        &'a self,
        session: Session<'a>,
        client: Conn,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;
}

/// The erasing adapter between [`Protocol`] and [`Registered`].
pub struct Registration<P>(PhantomData<fn() -> P>);

impl<P> Registration<P> {
    pub const NEW: Self = Self(PhantomData);
}

impl<P: Protocol> Registered for Registration<P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn keys(&self) -> &'static [&'static str] {
        P::KEYS
    }

    fn configure(&self, cx: &mut ResourceConfig<'_, '_>) -> Option<Settings> {
        P::configure(cx).map(|s| Settings {
            protocol: P::NAME,
            value: Arc::new(s),
        })
    }

    fn start(&self, host: &Services) -> Arc<dyn Running> {
        Arc::new(Started(P::start(host)))
    }

    fn early_refusal(&self, limit: &limits::Exceeded) -> Option<Vec<u8>> {
        P::early_refusal(limit)
    }
}

struct Started<P>(P);

impl<P: Protocol> Running for Started<P> {
    fn serve<'a>(
        &'a self,
        session: Session<'a>,
        client: Conn,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>> {
        Box::pin(async move {
            // Settings are built by the same registration that names the protocol, so this
            // holds by construction; should it not, the session is refused, never relayed.
            let Some(settings) = session.resource.settings.get::<P::Settings>() else {
                return refuse(
                    SessionOutcome::Error,
                    format!("resource settings are not {} settings", P::NAME),
                );
            };
            self.0.serve(session, settings, client).await
        })
    }
}

/// A resource's protocol and its validated settings, only made by [`Registered::configure`].
#[derive(Clone)]
pub struct Settings {
    protocol: &'static str,
    value: Arc<dyn AnySettings>,
}

trait AnySettings: Any + Send + Sync + fmt::Debug {}
impl<T: Any + Send + Sync + fmt::Debug> AnySettings for T {}

impl Settings {
    /// The `protocol = "..."` value.
    pub fn protocol(&self) -> &'static str {
        self.protocol
    }

    /// The settings as the protocol's own type.
    pub fn get<T: 'static>(&self) -> Option<&T> {
        let any: &dyn Any = &*self.value;
        any.downcast_ref()
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("protocol", &self.protocol)
            .field("value", &self.value)
            .finish()
    }
}

/// Every protocol, started once for the agent's lifetime.
pub struct Protocols {
    by_name: HashMap<&'static str, Arc<dyn Running>>,
}

impl Protocols {
    pub fn start(host: &Services) -> Self {
        Self {
            by_name: PROTOCOLS
                .iter()
                .map(|p| (p.name(), p.start(host)))
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Running>> {
        self.by_name.get(name)
    }
}
