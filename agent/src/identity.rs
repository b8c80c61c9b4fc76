//! Who is who, from the kernel's point of view: unix users and groups for people, cgroups for
//! workloads. Nothing here trusts what a process says about itself.

use std::{
    collections::HashMap,
    ffi::CString,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use nix::unistd::{Gid, Group, Uid, User};

use crate::{
    config::{Config, Principal},
    gate::cgroup,
    model::Actor,
};

/// The unix name of `uid`, or the number when it has none.
pub fn user_name(uid: u32) -> String {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name)
}

/// The uid of a user name (or of a numeric string).
pub fn uid_of(name: &str) -> Option<u32> {
    if let Ok(uid) = name.parse::<u32>() {
        return Some(uid);
    }
    User::from_name(name).ok().flatten().map(|u| u.uid.as_raw())
}

/// Whether `uid` is a member (primary or supplementary) of group `group`.
pub fn user_in_group(uid: u32, group: &str) -> bool {
    let Some(group) = Group::from_name(group).ok().flatten() else {
        return false;
    };
    let Some(user) = User::from_uid(Uid::from_raw(uid)).ok().flatten() else {
        return false;
    };
    if user.gid == group.gid {
        return true;
    }
    let Ok(name) = CString::new(user.name.clone()) else {
        return false;
    };
    nix::unistd::getgrouplist(&name, user.gid)
        .map(|groups| groups.contains(&group.gid))
        .unwrap_or(false)
        || group.mem.iter().any(|m| m == &user.name)
}

/// Whether `uid` is one of `principals`.
pub fn principal_matches(principals: &[Principal], uid: u32) -> bool {
    let name = user_name(uid);
    principals.iter().any(|p| match p {
        Principal::User(u) => u == &name || uid_of(u) == Some(uid),
        Principal::Group(g) => user_in_group(uid, g),
        // People of the web console are never a unix uid.
        Principal::Oidc(_) | Principal::OidcGroup(_) => false,
    })
}

/// The uid recorded for a person of the web console: `(uid_t)-1`, which names no unix user,
/// so no uid comparison can ever take them for a local account.
pub const WEB_UID: u32 = u32::MAX;

/// A person signed in to the web console, as their identity provider's ID token says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Person {
    /// The configured identity claim's value (by default the verified e-mail address).
    pub id: String,
    /// The configured groups claim's values.
    pub groups: Vec<String>,
    /// Their unix account here (`console.oidc.unix_accounts`): only to recognise their own
    /// requests; it gives them no unix user's rights.
    pub unix_uid: Option<u32>,
    /// That account's name (the same person across hosts, whose uids may differ).
    pub unix_account: Option<String>,
    /// When they last authenticated at the provider (OIDC `auth_time`, seconds since the
    /// epoch), if the ID token said: what `approval_max_age` is measured against.
    pub auth_time: Option<u64>,
    /// How they authenticated (OIDC `acr`), if the ID token said: what `approval_acr` names.
    pub acr: Option<String>,
}

impl Person {
    /// Whether `principals` name this person (`oidc:ID` or `oidc-group:G`).
    pub fn named_in(&self, principals: &[Principal]) -> bool {
        principals.iter().any(|p| match p {
            Principal::Oidc(id) => id == &self.id,
            Principal::OidcGroup(g) => self.groups.iter().any(|mine| mine == g),
            Principal::User(_) | Principal::Group(_) => false,
        })
    }
}

/// A primary gid for a uid, for dropping privileges.
pub fn primary_gid(uid: u32) -> Option<Gid> {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.gid)
}

/// Which workload a cgroup belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attribution {
    pub identity: String,
    /// The `jitgate run` task, when the cgroup is a task cgroup.
    pub task: Option<String>,
}

/// Maps cgroups (by path or by the id the kernel reports) to workloads.
///
/// Task cgroups are `<gate root>/<identity>/<task>`; service cgroups come from
/// `[[workload]] cgroup = ...`. Ids are cached: a cgroup id is never reused while the cgroup
/// exists, and we forget task cgroups when we remove them.
#[derive(Clone)]
pub struct Workloads {
    inner: Arc<RwLock<WorkloadsInner>>,
}

struct WorkloadsInner {
    mount: PathBuf,
    gate_root: String,
    /// Service cgroup path -> identity.
    services: Vec<(String, String)>,
    /// Identities declared in the config.
    identities: Vec<String>,
    /// uid -> identity, for `[[workload]] uid = ...`.
    uids: HashMap<u32, String>,
    by_id: HashMap<u64, Attribution>,
    /// Task cgroups removed recently: events and records about their last moments still
    /// name the right workload.
    ended: std::collections::VecDeque<(u64, Attribution)>,
    /// cgroup ids known to be outside every gated subtree (bounded cache).
    outside: std::collections::HashSet<u64>,
}

/// Where a cgroup id sits relative to the gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Inside a gated subtree, belonging to this workload.
    Gated(Attribution),
    /// Inside a gated subtree, but no configured workload owns it: no rights at all.
    GatedUnknown,
    /// Outside every gated subtree (a uid workload, or an ordinary process).
    Outside,
}

/// Entries kept in the cache of cgroups found outside the gate.
const OUTSIDE_CACHE: usize = 4096;

/// Ended task cgroups remembered for late events.
const ENDED_CACHE: usize = 1024;

impl Workloads {
    pub fn new(mount: &Path, config: &Config) -> Self {
        let mut inner = WorkloadsInner {
            mount: mount.to_owned(),
            gate_root: String::new(),
            services: Vec::new(),
            identities: Vec::new(),
            uids: HashMap::new(),
            by_id: HashMap::new(),
            ended: std::collections::VecDeque::new(),
            outside: std::collections::HashSet::new(),
        };
        inner.configure(config);
        Self {
            inner: Arc::new(RwLock::new(inner)),
        }
    }

    /// Applies a reloaded config (identities or service cgroups may have changed).
    pub fn reconfigure(&self, config: &Config) {
        let mut inner = self.inner.write().expect("workloads lock");
        inner.configure(config);
        inner.by_id.clear();
        inner.outside.clear();
    }

    /// Remembers a task cgroup created by the agent.
    pub fn remember(&self, cgroup_id: u64, attribution: Attribution) {
        self.inner
            .write()
            .expect("workloads lock")
            .by_id
            .insert(cgroup_id, attribution);
    }

    pub fn forget(&self, cgroup_id: u64) {
        let mut inner = self.inner.write().expect("workloads lock");
        if let Some(a) = inner.by_id.remove(&cgroup_id) {
            if inner.ended.len() >= ENDED_CACHE {
                inner.ended.pop_front();
            }
            inner.ended.push_back((cgroup_id, a));
        }
    }

    /// Attributes a cgroup path (relative to the cgroup2 mount).
    pub fn attribute_path(&self, path: &str) -> Option<Attribution> {
        self.inner
            .read()
            .expect("workloads lock")
            .attribute_path(path)
    }

    /// Attributes a connection from what the kernel recorded: its task's cgroup first, then
    /// (outside every gated subtree) its uid.
    pub fn attribute(&self, cgroup_id: u64, uid: u32) -> Option<Attribution> {
        match self.place(cgroup_id) {
            Placement::Gated(a) => Some(a),
            Placement::GatedUnknown => None,
            Placement::Outside => self.attribute_uid(uid),
        }
    }

    /// The uid workload `uid` belongs to.
    pub fn attribute_uid(&self, uid: u32) -> Option<Attribution> {
        self.inner
            .read()
            .expect("workloads lock")
            .uids
            .get(&uid)
            .map(|identity| Attribution {
                identity: identity.clone(),
                task: None,
            })
    }

    /// Where a cgroup id sits relative to the gate.
    pub fn place(&self, cgroup_id: u64) -> Placement {
        {
            let inner = self.inner.read().expect("workloads lock");
            if let Some(a) = inner.by_id.get(&cgroup_id) {
                return Placement::Gated(a.clone());
            }
            if let Some((_, a)) = inner.ended.iter().find(|(id, _)| *id == cgroup_id) {
                return Placement::Gated(a.clone());
            }
            if inner.outside.contains(&cgroup_id) {
                return Placement::Outside;
            }
        }
        // Not known by id yet (a service cgroup, state from before a restart, or a uid
        // workload's cgroup): find the directory with that inode under the gated subtrees.
        let (mount, roots) = {
            let inner = self.inner.read().expect("workloads lock");
            let mut roots = vec![inner.gate_root.clone()];
            roots.extend(inner.services.iter().map(|(p, _)| p.clone()));
            (inner.mount.clone(), roots)
        };
        let found = roots
            .iter()
            .find_map(|root| find_cgroup_by_id(&mount, &mount.join(root), cgroup_id, 4));
        let Some(path) = found else {
            let mut inner = self.inner.write().expect("workloads lock");
            if inner.outside.len() >= OUTSIDE_CACHE {
                inner.outside.clear();
            }
            inner.outside.insert(cgroup_id);
            return Placement::Outside;
        };
        match self.attribute_path(&path) {
            Some(a) => {
                self.remember(cgroup_id, a.clone());
                Placement::Gated(a)
            }
            None => Placement::GatedUnknown,
        }
    }

    /// Whether `path` is inside any gated subtree (even if not attributable).
    pub fn is_gated_path(&self, path: &str) -> bool {
        let inner = self.inner.read().expect("workloads lock");
        under(path, &inner.gate_root) || inner.services.iter().any(|(svc, _)| under(path, svc))
    }
}

fn under(path: &str, root: &str) -> bool {
    path == root || path.starts_with(&format!("{root}/"))
}

impl WorkloadsInner {
    fn configure(&mut self, config: &Config) {
        self.gate_root = config.daemon.gate_cgroup.clone();
        self.services = config
            .workloads
            .iter()
            .filter_map(|w| w.cgroup.clone().map(|c| (c, w.identity.clone())))
            .collect();
        self.identities = config
            .workloads
            .iter()
            .map(|w| w.identity.clone())
            .collect();
        self.uids = config
            .workloads
            .iter()
            .filter_map(|w| w.uid.map(|uid| (uid, w.identity.clone())))
            .collect();
    }

    fn attribute_path(&self, path: &str) -> Option<Attribution> {
        if let Some(rest) = path.strip_prefix(&format!("{}/", self.gate_root)) {
            let mut parts = rest.split('/');
            let identity = parts.next()?.to_owned();
            let task = parts.next().map(str::to_owned);
            if !self.identities.contains(&identity) {
                return None;
            }
            return Some(Attribution { identity, task });
        }
        self.services
            .iter()
            .find(|(svc, _)| under(path, svc))
            .map(|(_, identity)| Attribution {
                identity: identity.clone(),
                task: None,
            })
    }
}

fn find_cgroup_by_id(mount: &Path, dir: &Path, id: u64, depth: usize) -> Option<String> {
    if cgroup::cgroup_id(dir).ok()? == id {
        return dir
            .strip_prefix(mount)
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
    }
    if depth == 0 {
        return None;
    }
    std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
        entry
            .file_type()
            .ok()
            .filter(std::fs::FileType::is_dir)
            .and_then(|_| find_cgroup_by_id(mount, &entry.path(), id, depth - 1))
    })
}

/// A caller of the control API, established from `SO_PEERCRED` and the caller's cgroup.
#[derive(Clone, Debug)]
pub struct Caller {
    pub uid: u32,
    pub pid: u32,
    pub user: String,
    /// Set when the caller runs inside the gate: it is a workload, with a workload's rights.
    pub workload: Option<Attribution>,
    /// Set when the caller runs inside a gated cgroup that maps to no identity. Such a
    /// caller gets no rights at all.
    pub gated_unattributed: bool,
    /// Set for a person signed in to the web console (then `uid` is [`WEB_UID`] and `user`
    /// reads `oidc ID`): they hold only the rights policy gives `oidc:`/`oidc-group:` names.
    pub person: Option<Person>,
    /// Set for a call of the console's HTTP API made with a bearer token: the caller is
    /// the token's unix user (with that user's rights now), limited by the token.
    pub token: Option<TokenUse>,
}

/// The API token a call was made with (see [`Caller::token`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenUse {
    /// `tok_...`: what records name (never the secret).
    pub id: String,
    /// Reads only: every change is refused (`control::authz`).
    pub read_only: bool,
    /// The unix user it acts as, by name (`Caller::user` reads `alice (token tok_...)`).
    pub account: String,
}

impl Caller {
    /// A person signed in to the web console.
    pub fn web(person: Person) -> Self {
        Self {
            uid: WEB_UID,
            pid: 0,
            user: format!("oidc {}", person.id),
            workload: None,
            gated_unattributed: false,
            person: Some(person),
            token: None,
        }
    }

    pub fn is_workload(&self) -> bool {
        self.workload.is_some() || self.gated_unattributed
    }

    /// Root at the control socket. Never a token's caller: no token acts as root.
    pub fn is_root(&self) -> bool {
        self.uid == 0 && !self.is_workload() && self.person.is_none() && self.token.is_none()
    }

    /// The unix account's name: the user, or for a token's caller the user it acts as.
    pub fn unix_name(&self) -> &str {
        self.token.as_ref().map_or(&self.user, |t| &t.account)
    }

    /// Whether `principals` name this caller: a person by their `oidc:` names only, anyone
    /// else by unix user and group only.
    pub fn is_named(&self, principals: &[Principal]) -> bool {
        match &self.person {
            Some(person) => person.named_in(principals),
            None => self.uid != WEB_UID && principal_matches(principals, self.uid),
        }
    }

    /// Whether the caller is whoever filed a request as `by`: the same uid, or for a person
    /// their own unix account; by name too, since in a fleet the request may have been filed
    /// on another host, where the same person can have another uid.
    ///
    /// A person with no `unix_accounts` entry is also taken to be the unix user named like
    /// their identity's local part (`ann` for `ann@example.com`): the mapping is easy to
    /// forget, and without it someone could approve in the console what they filed from a
    /// shell. Wrongly matching only refuses an approval (another approver decides), so the
    /// guess errs the safe way.
    pub fn filed(&self, by: &Actor) -> bool {
        match &self.person {
            Some(person) => {
                person.unix_uid == Some(by.uid)
                    || person.unix_account.as_deref() == Some(by.user.as_str())
                    || by.user == self.user
                    || person
                        .id
                        .split('@')
                        .next()
                        // `ann+ops@` is ann's address too.
                        .map(|local| local.split('+').next().unwrap_or(local))
                        .is_some_and(|local| local.to_lowercase() == by.user.to_lowercase())
            }
            None => self.uid == by.uid || self.user == by.user || self.unix_name() == by.user,
        }
    }

    pub fn actor(&self) -> Actor {
        Actor {
            uid: self.uid,
            user: self.user.clone(),
            identity: self.workload.as_ref().map(|w| w.identity.clone()),
            task: self.workload.as_ref().and_then(|w| w.task.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_toml(
            Path::new("t.toml"),
            r#"
[daemon]
gate_cgroup = "jitgate.slice"
[[workload]]
identity = "ci-bot"
[[workload]]
identity = "svc"
cgroup = "system.slice/agent.service"
"#,
        )
        .unwrap()
    }

    #[test]
    fn attributes_task_and_service_cgroups() {
        let w = Workloads::new(Path::new("/sys/fs/cgroup"), &config());
        assert_eq!(
            w.attribute_path("jitgate.slice/ci-bot/t-abc"),
            Some(Attribution {
                identity: "ci-bot".into(),
                task: Some("t-abc".into())
            })
        );
        assert_eq!(
            w.attribute_path("system.slice/agent.service"),
            Some(Attribution {
                identity: "svc".into(),
                task: None
            })
        );
        assert_eq!(w.attribute_path("jitgate.slice/stranger/t-1"), None);
        assert_eq!(w.attribute_path("jitgate.slice"), None);
        assert_eq!(w.attribute_path("user.slice"), None);
        assert!(w.is_gated_path("jitgate.slice"));
        assert!(w.is_gated_path("jitgate.slice/stranger"));
        assert!(!w.is_gated_path("jitgate.slicey"));
        assert!(w.is_gated_path("system.slice/agent.service/sub"));
    }

    #[test]
    fn root_is_a_user() {
        assert_eq!(user_name(0), "root");
        assert_eq!(uid_of("root"), Some(0));
        assert!(principal_matches(&[Principal::User("root".into())], 0));
        assert!(principal_matches(&[Principal::Group("root".into())], 0));
        assert!(!principal_matches(&[Principal::User("nobody".into())], 0));
    }
}

#[cfg(test)]
mod uid_tests {
    use super::*;

    #[test]
    fn uid_workloads_attribute_outside_the_gate() {
        let config = Config::from_toml(
            Path::new("t.toml"),
            "[[workload]]\nidentity = \"uidbot\"\nuid = 995\n",
        )
        .unwrap();
        assert_eq!(config.workloads[0].uid, Some(995));
        let w = Workloads::new(Path::new("/nonexistent"), &config);
        assert_eq!(
            w.attribute_uid(995),
            Some(Attribution {
                identity: "uidbot".into(),
                task: None
            })
        );
        assert_eq!(
            w.attribute(1, 995).map(|a| a.identity),
            Some("uidbot".into())
        );
        assert_eq!(w.attribute(1, 996), None);
    }
}
