//! Taking the gate from under a running agent: the proxy's port across a restart, the pinned
//! links, a second agent on the same pin directory, a changed gate root. Each test asserts
//! on what a gated workload can reach afterwards.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use jitgate_e2e::{Gate, echo_body, servers};

/// A network namespace of its own, removed on drop: the squatting test narrows the ephemeral
/// port range, which must not touch the host's.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new(tag: &str) -> Self {
        let name = format!("jge2e-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        for args in [
            vec!["netns", "add", &name],
            vec!["-n", &name, "link", "set", "lo", "up"],
        ] {
            let status = Command::new("ip").args(&args).status().expect("running ip");
            assert!(status.success(), "ip {args:?} failed");
        }
        Self { name }
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Writes a sysctl of this namespace (`/proc/sys/net` follows the writer's namespace).
    fn sysctl(&self, key: &str, value: &str) {
        let status = Command::new("nsenter")
            .arg(format!("--net={}", self.path()))
            .args(["sh", "-c", &format!("echo '{value}' > /proc/sys/{key}")])
            .status()
            .expect("nsenter");
        assert!(status.success(), "setting {key}");
    }

    fn read(&self, key: &str) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.path()))
            .args(["cat", &format!("/proc/sys/{key}")])
            .output()
            .expect("nsenter");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Starts `args` (a shell word list) as an unprivileged process in cgroup `bot/<task>` of the
/// gate directly, without `jitgate run`: what a process already inside the gate does while
/// the agent is down. `prefix` runs first (e.g. `nsenter --net=...`).
fn inside_gate(gate: &Gate, task: &str, prefix: &str, args: &str) -> std::process::Child {
    let cg = gate.cgroup_root().join("bot").join(task);
    std::fs::create_dir_all(&cg).expect("task cgroup");
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {prefix} runuser -u nobody -- {} {args}",
            cg.display(),
            gate.bins().probe.display(),
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the probe")
}

fn output_of(child: std::process::Child) -> String {
    let out = child.wait_with_output().expect("probe output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn no_workload_is_handed_the_proxy_port_across_a_restart() {
    jitgate_e2e::root_or_skip!();
    // A 64-port ephemeral range with the proxy port inside it: a workload that lets the
    // kernel pick ports takes every free one within milliseconds, so without a reservation
    // it is handed the proxy port as soon as the agent dies.
    let ns = NetNs::new("squat");
    ns.sysctl("net/ipv4/ip_local_port_range", "40000 40063");
    let port = 40031;
    let enter = format!("nsenter --net={}", ns.path());
    let mut gate = Gate::start_custom(
        "squat",
        "",
        &echo_body("127.0.0.1:9"),
        enter.split(' ').map(str::to_owned).collect(),
        Some(port),
    );
    // Squatters started while the agent runs, kept going across its death and restart.
    let squatters: Vec<_> = (0..2)
        .map(|i| {
            inside_gate(
                &gate,
                &format!("squat-{i}"),
                &enter,
                &format!("squat {port} 6"),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    gate.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    // launch() panics, with the log, when the restart fails ("Address already in use").
    gate.launch();
    for squatter in squatters {
        let out = output_of(squatter);
        assert!(
            out.contains("never handed") && !out.contains("ok got"),
            "a workload was handed the proxy port: {out}"
        );
    }
    // The same ways, with the agent up and after the restart.
    let out = output_of(inside_gate(
        &gate,
        "squat-late",
        &enter,
        &format!("squat {port} 1"),
    ));
    assert!(out.contains("never handed"), "{out}");
    // An explicit bind is refused by the kernel program.
    let out = output_of(inside_gate(
        &gate,
        "bind",
        &enter,
        &format!("bind 0.0.0.0:{port}"),
    ));
    assert!(
        out.starts_with("err 1 "),
        "explicit bind of the proxy port: {out}"
    );
    assert!(gate.cli(&["status"]).stdout.contains("health         ok"));
    let reserved = ns.read("net/ipv4/ip_local_reserved_ports");
    assert!(
        reserved.split(',').any(|p| p.trim() == port.to_string()),
        "proxy port not reserved: {reserved:?}"
    );
}

fn pins(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// What a root user does to the pins, by name.
type Attack<'a> = (&'static str, Box<dyn Fn() + 'a>);

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn removed_pins_detach_nothing_and_are_put_back_at_once() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let other = servers::echo_server("127.0.0.1:0");
    let gate = Gate::start("pins", "", &echo_body(&echo.addr.to_string()));
    let root = gate.pin_dir.join("links/root");
    let before = pins(&root);
    assert_eq!(before.len(), 10, "{before:?}");
    let elsewhere = other.addr.to_string();

    // Three ways to take the pins away: one link, one renamed away, the whole directory.
    let attacks: [Attack<'_>; 3] = [
        (
            "rm one link",
            Box::new(|| std::fs::remove_file(root.join("jg_connect4")).expect("rm")),
        ),
        (
            "mv one link",
            Box::new(|| {
                std::fs::rename(root.join("jg_connect4"), gate.pin_dir.join("moved")).expect("mv");
            }),
        ),
        (
            "rm -r links",
            Box::new(|| std::fs::remove_dir_all(gate.pin_dir.join("links")).expect("rm -r")),
        ),
    ];
    for (what, attack) in &attacks {
        attack();
        // The agent holds the links: the very next connect is still refused.
        let out = gate.probe("bot", &["connect", &elsewhere]);
        assert!(
            out.stdout.contains("err 1 "),
            "{what}: a gated workload reached a non-resource: {}",
            out.stdout
        );
        wait_until(
            &format!("{what}: pins back"),
            Duration::from_secs(3),
            || pins(&root) == before,
        );
        let _ = std::fs::remove_file(gate.pin_dir.join("moved"));
    }
    assert!(gate.log().contains("pinned again"), "{}", gate.log());
    let status = gate.cli(&["status"]);
    assert!(
        status.stdout.contains("health         ok"),
        "{}",
        status.stdout
    );
}

#[test]
fn a_second_agent_on_the_same_pin_dir_is_refused_and_detach_waits_for_the_first() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let other = servers::echo_server("127.0.0.1:0");
    let first = Gate::start("pinlock", "", &echo_body(&echo.addr.to_string()));
    let elsewhere = other.addr.to_string();

    // A second agent, its own state, socket, proxy port and gate root, the first one's pin
    // directory, egress open: were it to start, the first one's workloads would reach
    // anything.
    let dir = PathBuf::from(format!("{}-second", first.dir.display()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("jitgate.toml");
    let text = std::fs::read_to_string(&first.config)
        .expect("config")
        .replace(&first.dir.display().to_string(), &dir.display().to_string())
        .replace(&first.gate_cgroup, "jge2e-pinlock-second.slice")
        .replace(
            &format!(":{}\"", first.proxy_port),
            &format!(":{}\"", jitgate_e2e::free_port()),
        )
        .replacen("[daemon]\n", "[daemon]\negress = \"allow\"\n", 1);
    std::fs::write(&config, text).expect("config");
    let mut second = Command::new(&first.bins().jitgated)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("jitgated");
    let deadline = Instant::now() + Duration::from_secs(15);
    while second.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = second.kill();
            let out = second.wait_with_output().expect("output");
            let probe = first.probe("bot", &["connect", &elsewhere]);
            panic!(
                "a second agent started on the first one's pin directory (the first one's workload then got: {}): {}",
                probe.stdout,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = second.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second agent started: {stderr}");
    let pid = first.daemon_pid().expect("first pid").to_string();
    assert!(
        stderr.contains("holds the pin directory") && stderr.contains(&format!("pid {pid}")),
        "the refusal does not name the holder: {stderr}"
    );
    let probe = first.probe("bot", &["connect", &elsewhere]);
    assert!(
        probe.stdout.contains("err 1 "),
        "the first agent's gate opened: {}",
        probe.stdout
    );

    // `gate detach` aimed at the pin directory while its agent lives (but does not answer on
    // the socket given) refuses, unless forced; the gate stays closed either way.
    let detach = Command::new(&first.bins().jitgate)
        .args([
            "--socket",
            "/nonexistent/jitgate.sock",
            "gate",
            "detach",
            "--pin-dir",
        ])
        .arg(&first.pin_dir)
        .output()
        .expect("jitgate");
    let stderr = String::from_utf8_lossy(&detach.stderr);
    assert_eq!(detach.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains(&format!("pid {pid}")), "{stderr}");
    assert_eq!(pins(&first.pin_dir.join("links/root")).len(), 10);
    let probe = first.probe("bot", &["connect", &elsewhere]);
    assert!(probe.stdout.contains("err 1 "), "{}", probe.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir(
        jitgate::gate::cgroup::cgroup2_mount()
            .expect("cgroup2")
            .join("jge2e-pinlock-second.slice"),
    );
}

#[test]
fn a_new_gate_root_keeps_the_old_ones_processes_gated() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let other = servers::echo_server("127.0.0.1:0");
    let mut gate = Gate::start("newroot", "", &echo_body(&echo.addr.to_string()));
    let elsewhere = other.addr.to_string();
    let old_root = gate.cgroup_root();
    // A long-lived process in the old root: it waits, then tries a non-resource.
    let cg = old_root.join("bot/lingering");
    std::fs::create_dir_all(&cg).expect("cgroup");
    let lingering = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && sleep 4 && exec runuser -u nobody -- {} connect {elsewhere}",
            cg.display(),
            gate.bins().probe.display()
        ))
        .stdout(Stdio::piped())
        .spawn()
        .expect("lingering workload");

    gate.stop();
    let old = gate.gate_cgroup.clone();
    let new = old.replace(".slice", "-new.slice");
    let text = std::fs::read_to_string(&gate.config)
        .expect("config")
        .replace(
            &format!("gate_cgroup = \"{old}\""),
            &format!("gate_cgroup = \"{new}\""),
        );
    std::fs::write(&gate.config, text).expect("config");
    gate.gate_cgroup = new;
    gate.launch();
    let out = output_of(lingering);
    assert!(
        out.contains("err 1 "),
        "a process of the old gate root reached a non-resource: {out}"
    );
    assert!(gate.log().contains("they stay gated"), "{}", gate.log());

    // Once the old root is empty and gone, its links go too.
    let _ = std::fs::remove_dir(&cg);
    let _ = std::fs::remove_dir(old_root.join("bot"));
    let _ = std::fs::remove_dir(&old_root);
    wait_until(
        "the former root's links to go",
        Duration::from_secs(5),
        || {
            !pins(&gate.pin_dir.join("links"))
                .iter()
                .any(|p| p.to_string_lossy().contains("former-"))
        },
    );
}
