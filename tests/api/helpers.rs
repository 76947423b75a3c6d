//! Test support: a real `redis-server` on a free port, the fake upstream and
//! gateway processes as real binaries, and a small HTTP client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const TOKEN: &str = "tok-alpha-0123456789";
pub const TOKEN_B: &str = "tok-bravo-0123456789";

pub fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("AIzaFakeKey{i:02}-abcdefghijklmnop"))
        .collect()
}

pub fn key_id(key: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(key.as_bytes())[..6])
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Redis {
    pub port: u16,
    proc: Option<Proc>,
    /// Extra server arguments, given again on a restart.
    args: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(&[])
    }

    /// A server started with `extra` arguments, and restarted with them.
    pub fn start_with(extra: &[&str]) -> Redis {
        for _ in 0..5 {
            let port = free_port();
            if let Some(proc) = Self::spawn_with(port, extra) {
                return Redis {
                    port,
                    proc: Some(proc),
                    args: extra.iter().map(|a| a.to_string()).collect(),
                };
            }
        }
        panic!("redis-server did not start");
    }

    /// A server that keeps its data across restarts: every write is in its
    /// append-only file in `dir` before it answers.
    pub fn start_durable(dir: &TempDir) -> Redis {
        let dir = dir.0.to_string_lossy();
        Self::start_with(&[
            "--dir",
            &dir,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
    }

    /// `redis-server` on `port` with `extra` arguments, once it answers PING.
    pub fn spawn_with(port: u16, extra: &[&str]) -> Option<Proc> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (the test command installs it)");
        let proc = Proc { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if redis_cmd(port, &["PING"])
                .is_some_and(|r| r.contains("PONG") || r.contains("NOAUTH"))
            {
                return Some(proc);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A server that also listens with TLS (this PKI's certificate) on
    /// `tls_port`; its plain port stays for the test's own inspection.
    pub fn start_tls(pki: &Pki, tls_port: u16) -> Redis {
        let port = free_port();
        let tls_port = tls_port.to_string();
        let (cert, key) = (pki.path("cert.pem"), pki.path("key.pem"));
        let proc = Self::spawn_with(
            port,
            &[
                "--tls-port",
                &tls_port,
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-auth-clients",
                "no",
            ],
        )
        .expect("redis-server with TLS did not start");
        Redis {
            port,
            proc: Some(proc),
            args: Vec::new(),
        }
    }

    /// Kills the server (its data is gone with it).
    /// Sends a signal (`-STOP`, `-CONT`) to the server: a stopped server
    /// keeps its port open but never answers.
    pub fn signal(&self, sig: &str) {
        let pid = self.proc.as_ref().expect("running").child.id().to_string();
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// A new server on the same port, with the same arguments (a durable
    /// one finds its data again).
    pub fn restart(&mut self) {
        self.proc = None;
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.proc =
            Some(Self::spawn_with(self.port, &args).expect("redis-server restarts on its port"));
    }

    /// One command's raw reply. Fails the test when the server does not
    /// answer: a negative check ("nothing was written") must never pass
    /// because Redis was unreachable.
    pub fn cmd(&self, args: &[&str]) -> String {
        redis_cmd(self.port, args)
            .unwrap_or_else(|| panic!("redis-server on port {} did not answer {args:?}", self.port))
    }
}

/// The three ways the gateway can be deployed on Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Standalone,
    Cluster,
    Sentinel,
}

/// A running Redis deployment: what a gateway is given to reach it, and a
/// way for a test to look at its data.
pub trait RedisEnv {
    /// `GB_REDIS_*` variables for a gateway.
    fn gateway_env(&self) -> Vec<(String, String)>;
    /// One command, sent where its key lives; the raw reply.
    fn cmd(&self, args: &[&str]) -> String;
    /// Every key of every master.
    fn all_keys(&self) -> Vec<String>;
}

impl RedisEnv for Redis {
    fn gateway_env(&self) -> Vec<(String, String)> {
        vec![("GB_REDIS_URL".into(), self.url())]
    }
    fn cmd(&self, args: &[&str]) -> String {
        Redis::cmd(self, args)
    }
    fn all_keys(&self) -> Vec<String> {
        resp_strings(&Redis::cmd(self, &["KEYS", "*"]))
    }
}

/// Any of the three deployments, started by the test.
pub enum Deployment {
    Standalone(Redis),
    Cluster(RedisCluster),
    Sentinel(RedisSentinel),
}

impl Deployment {
    pub fn start(mode: Mode) -> Deployment {
        match mode {
            Mode::Standalone => Deployment::Standalone(Redis::start()),
            Mode::Cluster => Deployment::Cluster(RedisCluster::start()),
            Mode::Sentinel => Deployment::Sentinel(RedisSentinel::start()),
        }
    }

    fn inner(&self) -> &dyn RedisEnv {
        match self {
            Deployment::Standalone(r) => r,
            Deployment::Cluster(c) => c,
            Deployment::Sentinel(s) => s,
        }
    }

    /// Kills every server of the deployment.
    pub fn stop_all(&mut self) {
        match self {
            Deployment::Standalone(r) => r.stop(),
            Deployment::Cluster(c) => c.nodes.iter_mut().for_each(|n| n.proc = None),
            Deployment::Sentinel(s) => {
                s.data.iter_mut().for_each(|n| n.proc = None);
                s.sentinels.iter_mut().for_each(|n| n.proc = None);
            }
        }
    }
}

impl Deployment {
    /// Starts every server again on its port (empty: no persistence).
    pub fn restart_all(&mut self) {
        match self {
            Deployment::Standalone(r) => r.restart(),
            Deployment::Cluster(c) => {
                c.nodes.iter_mut().for_each(Node::restart);
                c.wait_healthy(60);
            }
            Deployment::Sentinel(s) => {
                s.data.iter_mut().for_each(Node::restart);
                s.sentinels.iter_mut().for_each(Node::restart);
                let master = s.data[0].port;
                wait_until(30, "the sentinels naming the master", || {
                    s.master_port() == Some(master)
                });
            }
        }
    }
}

impl RedisEnv for Deployment {
    fn gateway_env(&self) -> Vec<(String, String)> {
        self.inner().gateway_env()
    }
    fn cmd(&self, args: &[&str]) -> String {
        self.inner().cmd(args)
    }
    fn all_keys(&self) -> Vec<String> {
        self.inner().all_keys()
    }
}

/// The bulk strings of a RESP reply, in order.
pub fn resp_strings(raw: &str) -> Vec<String> {
    raw.lines()
        .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
        .map(str::to_string)
        .collect()
}

/// One field of an `INFO`-style reply.
pub fn info_field(raw: &str, name: &str) -> Option<String> {
    raw.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}

/// A server of a multi-server deployment.
pub struct Node {
    pub port: u16,
    pub proc: Option<Proc>,
    /// The server's `requirepass`, if any.
    pub password: Option<String>,
    launch: Launch,
}

/// How a node is started (again).
enum Launch {
    /// `redis-server` with these arguments besides the port.
    Server(Vec<String>),
    /// `redis-server CONF --sentinel`.
    Sentinel(String),
}

impl Node {
    /// Starts a node; `None` if it did not answer.
    fn start(port: u16, launch: Launch, password: Option<&str>) -> Option<Node> {
        let mut node = Node {
            port,
            proc: None,
            password: password.map(str::to_string),
            launch,
        };
        node.proc = Some(node.spawn()?);
        Some(node)
    }

    fn spawn(&self) -> Option<Proc> {
        match &self.launch {
            Launch::Server(args) => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Redis::spawn_with(self.port, &args)
            }
            Launch::Sentinel(conf) => {
                let child = Command::new("redis-server")
                    .arg(conf)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server --sentinel");
                let proc = Proc { child };
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if redis_cmd(self.port, &["PING"])
                        .is_some_and(|r| r.contains("PONG") || r.contains("NOAUTH"))
                    {
                        return Some(proc);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                None
            }
        }
    }

    /// Starts a killed node again on its port, with its files.
    pub fn restart(&mut self) {
        self.proc = None;
        self.proc = Some(self.spawn().expect("the node restarts"));
    }

    pub fn alive(&self) -> bool {
        self.proc.is_some()
    }
    pub fn cmd(&self, args: &[&str]) -> String {
        redis_cmd_auth(self.port, self.password.as_deref(), args).unwrap_or_default()
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("gb-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
    pub fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free port whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Polls `cond` every 50 ms until it holds or `secs` pass.
pub fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        if Instant::now() >= deadline {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Redis Cluster of three masters and three replicas, each node on a free
/// port with its files in a temporary directory. A node's failure is
/// noticed after one second (`cluster-node-timeout`), so a replica is
/// promoted within a few seconds of its master's death.
pub struct RedisCluster {
    pub nodes: Vec<Node>,
    dir: TempDir,
    /// Nodes stopped with SIGSTOP: their ports take connections that are
    /// never answered, as a host that vanished from the network does.
    frozen: Vec<Proc>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        for _ in 0..3 {
            if let Some(c) = Self::try_start() {
                return c;
            }
        }
        panic!("the Redis Cluster did not form");
    }

    fn try_start() -> Option<RedisCluster> {
        let dir = TempDir::new("cluster");
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = free_cluster_port();
            let conf = dir.path(&format!("nodes-{port}.conf"));
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--cluster-node-timeout",
                "1000",
                "--repl-diskless-sync-delay",
                "0",
                "--dir",
                &dir.path(""),
                "--logfile",
                &dir.path(&format!("{port}.log")),
            ];
            nodes.push(Node::start(
                port,
                Launch::Server(args.iter().map(|a| a.to_string()).collect()),
                None,
            )?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()?;
        if !created.success() {
            return None;
        }
        let c = RedisCluster {
            nodes,
            dir,
            frozen: Vec::new(),
        };
        c.wait_healthy(30);
        // A replica can take over only once it has its master's data.
        wait_until(30, "every cluster replica in sync", || {
            c.nodes.iter().all(|n| {
                let info = n.cmd(&["INFO", "replication"]);
                info_field(&info, "role").as_deref() == Some("master")
                    || info_field(&info, "master_link_status").as_deref() == Some("up")
            })
        });
        Some(c)
    }

    /// Every live node says `cluster_state:ok`, sees every slot served, and
    /// there are three masters.
    pub fn wait_healthy(&self, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let healthy = self.nodes.iter().filter(|n| n.alive()).all(|n| {
                let info = n.cmd(&["CLUSTER", "INFO"]);
                info_field(&info, "cluster_state").as_deref() == Some("ok")
                    && info_field(&info, "cluster_slots_ok").as_deref() == Some("16384")
            }) && self.masters().len() == 3;
            if healthy {
                return;
            }
            if Instant::now() >= deadline {
                let views: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|n| n.alive())
                    .map(|n| {
                        format!(
                            "{}:\n{}\n{}",
                            n.port,
                            n.cmd(&["CLUSTER", "INFO"]),
                            n.cmd(&["CLUSTER", "NODES"])
                        )
                    })
                    .collect();
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| {
                        std::fs::read_to_string(self.dir.path(&format!("{}.log", n.port)))
                            .unwrap_or_default()
                    })
                    .collect();
                panic!(
                    "the cluster did not become healthy:\n{}\n{}",
                    views.join("\n"),
                    logs.join("\n----\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ports of the live masters, as the live nodes see them.
    pub fn masters(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.alive())
            .filter(|n| {
                info_field(&n.cmd(&["INFO", "replication"]), "role").as_deref() == Some("master")
            })
            .map(|n| n.port)
            .collect()
    }

    fn any_live(&self) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.alive())
            .expect("a live cluster node")
    }

    /// The port of the master serving `key`.
    pub fn master_of(&self, key: &str) -> u16 {
        let slot: u16 = resp_strings(&self.any_live().cmd(&["CLUSTER", "KEYSLOT", key]))
            .first()
            .and_then(|l| l.trim_start_matches(':').parse().ok())
            .or_else(|| {
                self.any_live()
                    .cmd(&["CLUSTER", "KEYSLOT", key])
                    .trim()
                    .trim_start_matches(':')
                    .parse()
                    .ok()
            })
            .expect("CLUSTER KEYSLOT");
        self.slot_owner(slot)
    }

    /// The port of the master serving `slot`, per `CLUSTER NODES`.
    pub fn slot_owner(&self, slot: u16) -> u16 {
        self.node_table()
            .into_iter()
            .find(|n| n.master && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .map(|n| n.port)
            .expect("a master serves the slot")
    }

    /// `CLUSTER NODES`, parsed.
    pub fn node_table(&self) -> Vec<ClusterNode> {
        let raw = self.any_live().cmd(&["CLUSTER", "NODES"]);
        raw.lines()
            .filter(|l| l.contains("127.0.0.1:"))
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let port = f.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                let flags = f.get(2)?;
                let slots = f
                    .iter()
                    .skip(8)
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| {
                        let (a, b) = s.split_once('-').unwrap_or((s, s));
                        Some((a.parse().ok()?, b.parse().ok()?))
                    })
                    .collect();
                Some(ClusterNode {
                    id: f[0].to_string(),
                    port,
                    master: flags.contains("master") && !flags.contains("fail"),
                    slots,
                })
            })
            .collect()
    }

    /// Kills one node.
    pub fn kill(&mut self, port: u16) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.port == port) {
            n.proc = None;
        }
    }

    /// Stops one node without closing anything (SIGSTOP): connections to it
    /// hang instead of being refused, as when its host is gone.
    pub fn freeze(&mut self, port: u16) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.port == port) {
            if let Some(proc) = n.proc.take() {
                let pid = proc.child.id().to_string();
                let ok = Command::new("kill")
                    .args(["-STOP", &pid])
                    .status()
                    .expect("kill runs")
                    .success();
                assert!(ok, "kill -STOP {pid}");
                self.frozen.push(proc);
            }
        }
    }

    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub master: bool,
    pub slots: Vec<(u16, u16)>,
}

impl RedisEnv for RedisCluster {
    fn gateway_env(&self) -> Vec<(String, String)> {
        vec![
            ("GB_REDIS_MODE".into(), "cluster".into()),
            ("GB_REDIS_URL".into(), self.seeds()),
        ]
    }

    /// Sent to a live node; a `MOVED` answer is followed (test-side only:
    /// the gateway leaves that to the redis crate).
    fn cmd(&self, args: &[&str]) -> String {
        let mut port = self.any_live().port;
        for _ in 0..5 {
            let reply = redis_cmd(port, args).unwrap_or_default();
            match reply.strip_prefix("-MOVED ") {
                Some(rest) => {
                    port = rest
                        .split_whitespace()
                        .nth(1)
                        .and_then(|a| a.rsplit(':').next())
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(port);
                }
                None => return reply,
            }
        }
        String::new()
    }

    fn all_keys(&self) -> Vec<String> {
        self.masters()
            .into_iter()
            .flat_map(|p| resp_strings(&redis_cmd(p, &["KEYS", "*"]).unwrap_or_default()))
            .collect()
    }
}

/// One master, one replica and three sentinels on free ports, their files in
/// a temporary directory. The sentinels call a master down after one second.
pub struct RedisSentinel {
    /// Master first, at start.
    pub data: Vec<Node>,
    pub sentinels: Vec<Node>,
    /// Required by every server, sentinels included, when set.
    password: Option<String>,
    dir: TempDir,
}

impl RedisSentinel {
    pub const MASTER: &'static str = "gb-test-master";

    pub fn start() -> RedisSentinel {
        Self::start_inner(None)
    }

    /// Every server, sentinels included, requires `password`.
    pub fn start_with_password(password: &str) -> RedisSentinel {
        Self::start_inner(Some(password))
    }

    fn start_inner(password: Option<&str>) -> RedisSentinel {
        let dir = TempDir::new("sentinel");
        let auth: Vec<&str> = match password {
            Some(p) => vec!["--requirepass", p, "--masterauth", p],
            None => Vec::new(),
        };
        // The master's files (the snapshot a replica syncs from) stay in the
        // temporary directory.
        let server = |extra: &[&str]| -> Launch {
            Launch::Server(
                ["--dir", &dir.path(""), "--repl-diskless-sync-delay", "0"]
                    .iter()
                    .chain(extra)
                    .chain(&auth)
                    .map(|a| a.to_string())
                    .collect(),
            )
        };
        let master = Node::start(free_port(), server(&[]), password).expect("master starts");
        let replica_port = free_port();
        let replica = Node::start(
            replica_port,
            server(&["--replicaof", "127.0.0.1", &master.port.to_string()]),
            password,
        )
        .expect("replica starts");
        let mut s = RedisSentinel {
            data: vec![master, replica],
            sentinels: Vec::new(),
            password: password.map(str::to_string),
            dir,
        };
        wait_until(20, "the replica in sync", || {
            info_field(
                &s.data[1].cmd(&["INFO", "replication"]),
                "master_link_status",
            )
            .as_deref()
                == Some("up")
        });
        for _ in 0..3 {
            let port = free_port();
            let conf = s.sentinel_conf(port);
            s.sentinels
                .push(Node::start(port, Launch::Sentinel(conf), password).expect("a sentinel"));
        }
        wait_until(
            30,
            "every sentinel knowing the replica and the others",
            || {
                s.sentinels.iter().all(|n| {
                    let replicas = n.cmd(&["SENTINEL", "REPLICAS", Self::MASTER]);
                    let others = n.cmd(&["SENTINEL", "SENTINELS", Self::MASTER]);
                    replicas.contains(&replica_port.to_string()) && others.starts_with("*2")
                })
            },
        );
        s
    }

    /// Writes a sentinel's configuration file; its path.
    fn sentinel_conf(&self, port: u16) -> String {
        let conf = self.dir.path(&format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {name} 127.0.0.1 {master} 2\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 5000\n{auth}",
                auth = self
                    .password
                    .as_ref()
                    .map(|p| format!("sentinel auth-pass {} {p}\nrequirepass {p}\n", Self::MASTER))
                    .unwrap_or_default(),
                dir = self.dir.path(""),
                name = Self::MASTER,
                master = self.data[0].port,
            ),
        )
        .expect("sentinel conf");
        conf
    }

    /// The master's port as the sentinels report it.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().filter(|n| n.alive()).find_map(|n| {
            resp_strings(&n.cmd(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::MASTER]))
                .get(1)
                .and_then(|p| p.parse().ok())
        })
    }

    /// Asks the sentinels for a failover and waits until the other data
    /// node is the master, as both the sentinels and itself say.
    pub fn failover(&self) -> u16 {
        let before = self.master_port().expect("a master");
        let reply = self.sentinels[0].cmd(&["SENTINEL", "FAILOVER", Self::MASTER]);
        assert!(reply.starts_with("+OK"), "SENTINEL FAILOVER: {reply}");
        self.wait_new_master(before)
    }

    /// Waits until a master other than `before` is reported and says so itself.
    pub fn wait_new_master(&self, before: u16) -> u16 {
        let mut now = before;
        wait_until(30, "a new master", || {
            now = self.master_port().unwrap_or(before);
            now != before
                && info_field(&self.cmd_on(now, &["INFO", "replication"]), "role").as_deref()
                    == Some("master")
        });
        now
    }

    /// One command on the server at `port`.
    pub fn cmd_on(&self, port: u16, args: &[&str]) -> String {
        redis_cmd_auth(port, self.password.as_deref(), args).unwrap_or_default()
    }

    pub fn kill_data(&mut self, port: u16) {
        if let Some(n) = self.data.iter_mut().find(|n| n.port == port) {
            n.proc = None;
        }
    }

    pub fn urls(&self) -> String {
        let auth = self
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        self.sentinels
            .iter()
            .map(|n| format!("redis://{auth}127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl RedisEnv for RedisSentinel {
    fn gateway_env(&self) -> Vec<(String, String)> {
        vec![
            ("GB_REDIS_MODE".into(), "sentinel".into()),
            ("GB_REDIS_URL".into(), self.urls()),
            ("GB_REDIS_SENTINEL_MASTER".into(), Self::MASTER.into()),
        ]
    }

    fn cmd(&self, args: &[&str]) -> String {
        self.master_port()
            .map(|p| self.cmd_on(p, args))
            .unwrap_or_default()
    }

    fn all_keys(&self) -> Vec<String> {
        resp_strings(&self.cmd(&["KEYS", "*"]))
    }
}

/// Runs `async fn NAME(mode: Mode)` once per Redis mode, as the tests
/// `NAME::standalone`, `NAME::cluster` and `NAME::sentinel`.
macro_rules! in_every_redis_mode {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            use crate::helpers::Mode;
            #[actix_rt::test]
            async fn standalone() {
                super::$name(Mode::Standalone).await
            }
            #[actix_rt::test]
            async fn cluster() {
                super::$name(Mode::Cluster).await
            }
            #[actix_rt::test]
            async fn sentinel() {
                super::$name(Mode::Sentinel).await
            }
        }
    )+};
}
pub(crate) use in_every_redis_mode;

/// One raw RESP command; the raw reply text.
pub fn redis_cmd(port: u16, args: &[&str]) -> Option<String> {
    redis_cmd_auth(port, None, args)
}

/// One raw RESP command after `AUTH password` when one is given.
pub fn redis_cmd_auth(port: u16, password: Option<&str>, args: &[&str]) -> Option<String> {
    fn send(s: &mut TcpStream, args: &[&str]) -> Option<String> {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{}\r\n", a.len(), a));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut buf = vec![0u8; 1 << 16];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    if let Some(p) = password {
        send(&mut s, &["AUTH", p])?;
    }
    send(&mut s, args)
}

/// A tool of the workspace's `dev/` crates (`fake-gemini`, `test-proxy`).
/// Cargo hands integration tests only their own package's binaries, so the
/// tool is looked up next to the gateway's, in the same target directory;
/// plain `cargo build` or `cargo test` at the root builds it there.
/// `cargo test --test api` alone does not, hence the checks that it exists
/// and is not older than its sources.
fn dev_tool(name: &str) -> std::path::PathBuf {
    let gateway = std::path::Path::new(env!("CARGO_BIN_EXE_gemini-balancer"));
    let path = gateway.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let build = match gateway.parent().and_then(|d| d.file_name()) {
        Some(dir) if dir != "debug" => format!(
            "run `cargo build --profile {}` at the workspace root",
            dir.to_string_lossy()
        ),
        _ => "run `cargo build` at the workspace root".to_string(),
    };
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: {build}", path.display()));
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("dev")
        .join(name)
        .join("src");
    let mut dirs = vec![src];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let file = entry.path();
            if file.is_dir() {
                dirs.push(file);
            } else if entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|m| m > built)
            {
                panic!(
                    "{} is older than {}: {build}",
                    path.display(),
                    file.display()
                );
            }
        }
    }
    path
}

fn read_url_line(reader: &mut impl BufRead, what: &str) -> (String, Vec<String>) {
    let mut seen = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("{what} exited before listening:\n{}", seen.join(""));
        }
        seen.push(line.clone());
        if let Some(at) = line.find("listening on ") {
            let url = line[at + "listening on ".len()..]
                .split(|c: char| c.is_whitespace() || c == '"')
                .next()
                .unwrap_or("")
                .to_string();
            return (url, seen);
        }
    }
}

pub struct FakeUpstream {
    pub url: String,
    /// Where the control endpoints answer in plain HTTP (same as `url`
    /// unless the fake serves TLS).
    pub control: String,
    pub keys: Vec<String>,
    _proc: Proc,
}

impl FakeUpstream {
    pub fn start(keys: &[String]) -> FakeUpstream {
        Self::start_with(keys, &[])
    }

    pub fn start_with(keys: &[String], env: &[(&str, String)]) -> FakeUpstream {
        let mut cmd = Command::new(dev_tool("fake-gemini"));
        cmd.env("FAKE_KEYS", keys.join(","))
            .env("FAKE_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("fake-gemini starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let (url, seen) = read_url_line(&mut reader, "fake-gemini");
        let control = seen
            .iter()
            .find_map(|l| l.strip_prefix("control on ").map(|u| u.trim().to_string()))
            .unwrap_or_else(|| url.clone());
        std::thread::spawn(move || for _ in reader.lines() {});
        FakeUpstream {
            url,
            control,
            keys: keys.to_vec(),
            _proc: Proc { child },
        }
    }

    pub async fn get(&self, path: &str) -> Value {
        let mut resp = client()
            .get(format!("{}{path}", self.control))
            .send()
            .await
            .expect("fake control");
        resp.json().limit(64 << 20).await.expect("fake json")
    }

    pub async fn post(&self, path: &str, body: Value) {
        let resp = client()
            .post(format!("{}{path}", self.control))
            .send_json(&body)
            .await
            .expect("fake control");
        assert!(resp.status().is_success(), "fake control {path}");
    }

    pub async fn requests(&self) -> Vec<Value> {
        self.get("/_fake/requests")
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Successful model calls per key id.
    pub async fn served(&self) -> std::collections::HashMap<String, u64> {
        let v = self.get("/_fake/served").await;
        v.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (key_id(k), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub async fn set_mode(&self, key: &str, mode: Value) {
        self.post(&format!("/_fake/keys/{key}"), mode).await;
    }

    /// The raw key (of `self.keys`) that owns a file.
    pub async fn owner_key(&self, name: &str) -> String {
        let owner_id = self.file_owners().await[name].clone();
        self.keys
            .iter()
            .find(|k| key_id(k) == owner_id)
            .expect("the owner is one of the fake's keys")
            .clone()
    }

    /// file name → owner key id.
    pub async fn file_owners(&self) -> std::collections::HashMap<String, String> {
        let v = self.get("/_fake/files").await;
        v.as_object()
            .map(|m| {
                m.iter()
                    .map(|(n, k)| (n.clone(), key_id(k.as_str().unwrap_or(""))))
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub struct Gateway {
    pub url: String,
    pub log: Arc<Mutex<Vec<String>>>,
    pub proc: Proc,
}

impl Gateway {
    pub fn start(
        upstream: &FakeUpstream,
        redis: Option<&dyn RedisEnv>,
        extra: &[(&str, &str)],
    ) -> Gateway {
        Self::start_for(&upstream.url, &upstream.keys, redis, extra)
    }

    /// A gateway with its own key list (keys the fake may not know).
    pub fn start_for(
        url: &str,
        keys: &[String],
        redis: Option<&dyn RedisEnv>,
        extra: &[(&str, &str)],
    ) -> Gateway {
        let mut env: Vec<(String, String)> = vec![
            ("GB_API_KEYS".into(), keys.join(",")),
            ("GB_AUTH_TOKENS".into(), format!("{TOKEN},{TOKEN_B}")),
            ("GB_UPSTREAM_URL".into(), url.to_string()),
        ];
        if let Some(r) = redis {
            env.extend(r.gateway_env());
        }
        for (k, v) in extra {
            env.push((k.to_string(), v.to_string()));
        }
        Self::start_env(&env)
    }

    pub fn start_env(env: &[(String, String)]) -> Gateway {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gemini-balancer"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GB_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("gateway starts");
        let stderr = child.stderr.take().expect("stderr");
        let mut reader = BufReader::new(stderr);
        let (url, seen) = read_url_line(&mut reader, "gemini-balancer");
        let log = Arc::new(Mutex::new(seen));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                sink.lock().expect("log").push(line);
            }
        });
        Gateway {
            url,
            log,
            proc: Proc { child },
        }
    }

    /// Waits (bounded) until a log line contains `needle`: the gateway's
    /// stderr is read by another thread, so a line about an answer the test
    /// already has may not have been collected yet.
    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no log line containing {needle:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// No configured key or client token in anything the replica logged.
    pub fn assert_no_secrets_logged(&self, keys: &[String]) {
        let log = self.log_text();
        for secret in keys.iter().map(String::as_str).chain([TOKEN, TOKEN_B]) {
            assert!(!log.contains(secret), "a secret was logged:\n{log}");
        }
    }
}

/// Every replica any test starts is checked when the test lets it go: no
/// client token and no pool key (the test keys all start `AIzaFakeKey`) in
/// anything it logged, whatever the test was about.
impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let log = self.log_text();
        for secret in [TOKEN, TOKEN_B, "AIzaFakeKey"] {
            assert!(
                !log.contains(secret),
                "a replica logged a secret ({secret}…):\n{log}"
            );
        }
    }
}

/// Runs the gateway binary to completion (configuration errors).
pub fn run_gateway_expecting_exit(env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gemini-balancer"));
    cmd.env_clear().env("GB_LISTEN", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return (status.code().unwrap_or(-1), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("gateway did not exit on bad configuration");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn client() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .disable_redirects()
        .finish()
}

/// The Prometheus text a replica serves at `/metrics`.
pub async fn metrics_text(base_url: &str) -> String {
    let body = client()
        .get(format!("{base_url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .body()
        .await
        .expect("metrics body");
    String::from_utf8_lossy(&body).into_owned()
}

pub fn generate_body() -> Value {
    serde_json::json!({"contents": [{"parts": [{"text": "hello"}]}]})
}

pub fn file_body(uris: &[&str]) -> Value {
    let parts: Vec<Value> = uris
        .iter()
        .map(|u| serde_json::json!({"fileData": {"fileUri": u, "mimeType": "text/plain"}}))
        .chain(std::iter::once(serde_json::json!({"text": "use these"})))
        .collect();
    serde_json::json!({"contents": [{"parts": parts}]})
}

/// POST JSON with the gateway token; status and parsed body.
pub async fn post_json(url: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = client().post(url).insert_header(("x-goog-api-key", TOKEN));
    for (k, v) in headers {
        req = req.insert_header((*k, *v));
    }
    let mut resp = req.send_json(body).await.expect("request");
    let status = resp.status().as_u16();
    let bytes = resp.body().limit(64 << 20).await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A resumable upload through the gateway: start on `start_url`, one
/// upload+finalize chunk on the returned URL (optionally re-hosted to
/// another replica). Returns the file name.
pub async fn upload_file(
    start_url: &str,
    chunk_base: Option<&str>,
    headers: &[(&str, &str)],
    data: &[u8],
) -> String {
    let mut req = client()
        .post(start_url)
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("x-goog-upload-protocol", "resumable"))
        .insert_header(("x-goog-upload-command", "start"))
        .insert_header((
            "x-goog-upload-header-content-length",
            data.len().to_string(),
        ));
    for (k, v) in headers {
        req = req.insert_header((*k, *v));
    }
    let meta = serde_json::json!({"file": {"display_name": "t", "mime_type": "text/plain", "size_bytes": data.len()}});
    let resp = req.send_json(&meta).await.expect("start");
    assert_eq!(resp.status().as_u16(), 200, "upload start");
    let url = resp
        .headers()
        .get("x-goog-upload-url")
        .and_then(|v| v.to_str().ok())
        .expect("upload url")
        .to_string();
    let url = match chunk_base {
        Some(base) => rehost(&url, base),
        None => url,
    };
    let mut resp = client()
        .post(&url)
        .insert_header(("x-goog-upload-command", "upload, finalize"))
        .insert_header(("x-goog-upload-offset", "0"))
        .send_body(data.to_vec())
        .await
        .expect("chunk");
    assert_eq!(
        resp.status().as_u16(),
        200,
        "finalize: {:?}",
        resp.body().await
    );
    let v: Value = resp.json().await.expect("file json");
    v["file"]["name"].as_str().expect("file name").to_string()
}

/// The same path and query on another base URL (another replica).
pub fn rehost(url: &str, base: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, r)| r);
    let path = after_scheme.find('/').map_or("", |i| &after_scheme[i..]);
    format!("{base}{path}")
}

/// A test CA and a certificate for localhost / 127.0.0.1 signed by it.
pub struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("gb-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// The fake upstream over TLS with this PKI's certificate.
    pub fn fake(&self, keys: &[String]) -> FakeUpstream {
        FakeUpstream::start_with(
            keys,
            &[
                ("FAKE_TLS_CERT", self.path("cert.pem")),
                ("FAKE_TLS_KEY", self.path("key.pem")),
            ],
        )
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `test-proxy` binary: an HTTP CONNECT or SOCKS5 proxy that prints a
/// line per tunnel.
pub struct TestProxy {
    pub port: u16,
    pub tunnels: Arc<Mutex<Vec<String>>>,
    _proc: Proc,
}

impl TestProxy {
    pub fn start(kind: &str, bind_ip: &str, auth: Option<&str>, port: u16) -> TestProxy {
        let mut cmd = Command::new(dev_tool("test-proxy"));
        cmd.env("PROXY_KIND", kind)
            .env("PROXY_LISTEN", format!("127.0.0.1:{port}"))
            .env("PROXY_BIND_IP", bind_ip)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(a) = auth {
            cmd.env("PROXY_AUTH", a);
        }
        let mut child = cmd.spawn().expect("test-proxy starts");
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        let (url, _) = read_url_line(&mut reader, "test-proxy");
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let sink = tunnels.clone();
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                sink.lock().expect("tunnels").push(line);
            }
        });
        TestProxy {
            port,
            tunnels,
            _proc: Proc { child },
        }
    }

    pub fn tunnel_count(&self) -> usize {
        self.tunnels.lock().expect("tunnels").len()
    }
}
