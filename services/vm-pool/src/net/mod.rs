//! VM networking: one network namespace per vm-pool, holding every VM's tap, joined to the
//! host by one veth pair, with nftables doing NAT and each VM's egress policy.
//!
//! On the host (the only changes vm-pool makes in the host's namespace):
//! - the namespace `<netns>` (`/run/netns/<netns>`) and the veth `cvh<hash>` (host end,
//!   the near address of a /30 from `--link-subnet`; `uplink` inside, the far address,
//!   default route via the near one);
//! - `net.ipv4.ip_forward=1` (global, like Docker; replies to VMs come in on the uplink
//!   interface, and a forwarding decision follows the input interface's setting, so the
//!   veth's own `forwarding=1`, also set, is not enough). It is left on at shutdown: other
//!   users of forwarding (another vm-pool) may rely on it;
//! - the nftables table `inet <netns>` ([`nft::host_table`]): masquerade of the namespace's
//!   address, forward for the veth, and nothing from the veth to the host's own addresses.
//!
//! Inside the namespace, each VM gets a tap `vmtap<k>` (owned by the VMM user) with a /30
//! of `--vm-subnet`: the namespace holds `.1` (the guest's gateway and DNS server), the
//! guest `.2`; VMs share no L2 and reach one another through no rule. The table
//! [`nft::NS_TABLE`] masquerades to the uplink and filters every VM's outgoing packets
//! by its policy ([`nft`]). A warm VM denies everything until leased.
//!
//! Everything is named after `<netns>` (by default derived from the state dir), so a
//! restart after a crash finds and removes what its predecessor left ([`reap`]) before
//! building afresh, and a clean shutdown removes it all.
//!
//! DNS: the forwarder ([`dns`]) listens on port 53 of every address in the namespace (the
//! guests' gateways); upstream queries leave from vm-pool's own namespace.
//!
//! Denials: each VM's chain records denied (address, port) pairs for a minute and counts
//! every denied packet; a poller logs each newly denied destination with the VM and lease.

pub mod addr;
pub mod dns;
pub mod nft;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsa_egress::EgressPolicy;
use capsa_vmm::NetSpec;
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use addr::{Ipv4Net, Slots, fnv32};

/// How often the denied destinations are polled and logged.
const DENIAL_POLL: Duration = Duration::from_secs(2);

/// What vm-pool's network objects are called; all derive from the namespace's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub netns: String,
    pub host_veth: String,
    /// vm-pool's nftables table in the host's namespace (family inet).
    pub table: String,
}

impl Names {
    pub fn new(netns: &str) -> Names {
        Names {
            netns: netns.to_owned(),
            host_veth: format!("cvh{:08x}", fnv32(netns.as_bytes())),
            table: netns.to_owned(),
        }
    }

    /// The default namespace name of a state dir: one per state dir, stable across
    /// restarts (so a crashed run's objects are found), distinct between vm-pools.
    pub fn default_netns(state_dir: &Path) -> String {
        let dir = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
        format!("capsa-{:08x}", fnv32(dir.as_os_str().as_encoded_bytes()))
    }

    pub fn ns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }
}

/// Start-up settings of the network.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub names: Names,
    pub vm_subnet: Ipv4Net,
    pub link_subnet: Ipv4Net,
    /// Owner of the taps (the VMM user).
    pub tap_owner: u32,
    pub dns: dns::DnsConfig,
}

pub struct Network {
    names: Names,
    vm_subnet: Ipv4Net,
    /// Never reachable: the VM and link subnets (other VMs, the node's side of the veth).
    internal: Vec<Ipv4Net>,
    /// Reachable only through a CIDR inside them (capsa_egress::RESERVED_RANGES, IPv4).
    reserved: Vec<Ipv4Net>,
    tap_owner: u32,
    state: Mutex<NetState>,
    /// Serialises policy changes, so the rules in force are the last policy recorded.
    policy_lock: tokio::sync::Mutex<()>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("names", &self.names)
            .finish()
    }
}

struct NetState {
    slots: Slots,
    vms: HashMap<String, VmNet>,
}

struct VmNet {
    slot: u32,
    guest: Ipv4Addr,
    policy: Arc<EgressPolicy>,
    lease: Option<String>,
    denied_names: u64,
    denied_packets: u64,
    /// Denied destinations logged and still remembered by the VM's `denied` set.
    logged: HashSet<String>,
}

impl Network {
    /// Removes what a previous run left under these names, then builds the namespace, the
    /// veth, the sysctls and both tables. On failure nothing is left behind.
    pub async fn start(config: NetConfig) -> Result<Arc<Network>, Error> {
        let names = config.names.clone();
        if reap(&names).await? {
            tracing::warn!(netns = %names.netns, "removed the network of a previous run");
        }
        let (routes, link) = host_networks().await?;
        check_subnets(&config, &routes)?;
        let (link_net, host_addr, ns_addr) = pick_link(&config.link_subnet, &names, &link)?;
        let reserved = capsa_egress::reserved_ranges()
            .iter()
            .filter_map(|c| match c.addr {
                IpAddr::V4(a) => Some(Ipv4Net::containing(a, c.prefix)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let network = Arc::new(Network {
            names: names.clone(),
            vm_subnet: config.vm_subnet,
            internal: vec![config.vm_subnet, config.link_subnet],
            reserved,
            tap_owner: config.tap_owner,
            state: Mutex::new(NetState {
                slots: Slots::new(&config.vm_subnet),
                vms: HashMap::new(),
            }),
            policy_lock: tokio::sync::Mutex::new(()),
            stop: CancellationToken::new(),
        });
        let built = async {
            network.build(host_addr, ns_addr).await?;
            network.serve_dns(config.dns)
        }
        .await;
        if let Err(e) = built {
            network.stop.cancel();
            let _ = reap(&names).await;
            return Err(e);
        }
        tracing::info!(netns = %names.netns, link = %link_net, vm_subnet = %config.vm_subnet, "vm network ready");
        tokio::spawn(network.clone().poll_denials());
        Ok(network)
    }

    async fn build(&self, host_addr: Ipv4Addr, ns_addr: Ipv4Addr) -> Result<(), Error> {
        let n = &self.names;
        let ns = n.netns.as_str();
        run("ip", &["netns", "add", ns], None).await?;
        run(
            "ip",
            &[
                "link",
                "add",
                &n.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                nft::UPLINK,
                "netns",
                ns,
            ],
            None,
        )
        .await?;
        let host_cidr = format!("{host_addr}/30");
        run(
            "ip",
            &["addr", "add", &host_cidr, "dev", &n.host_veth],
            None,
        )
        .await?;
        run("ip", &["link", "set", &n.host_veth, "up"], None).await?;
        let batch = format!(
            "link set lo up\naddr add {ns_addr}/30 dev {up}\nlink set {up} up\nroute add default via {host_addr}\n",
            up = nft::UPLINK
        );
        run("ip", &["-n", ns, "-batch", "-"], Some(&batch)).await?;
        enable_forwarding(&n.host_veth)?;
        tun_for_everyone()?;
        // Inside the namespace, through a thread that joined it (/proc/sys/net is per
        // namespace of the opener).
        let ns_path = n.ns_path();
        // IPv4 only: without IPv6 the taps send the guests no router solicitations or MLD
        // reports, so a session that moves nothing is metered at 0 bytes.
        capsa_vmm::netns::run_in(&ns_path, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
            std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1")?;
            std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")
        })
        .map_err(|e| Error::Command {
            command: format!("ip_forward=1, disable_ipv6=1 in {}", ns_path.display()),
            stderr: e.to_string(),
        })?;
        nft_apply(None, &nft::host_table(&n.table, &n.host_veth, ns_addr)).await?;
        nft_apply(Some(ns), &nft::ns_base()).await?;
        Ok(())
    }

    /// Binds port 53 (UDP and TCP) on every address of the namespace and serves it.
    fn serve_dns(self: &Arc<Network>, config: dns::DnsConfig) -> Result<(), Error> {
        let ns_path = self.names.ns_path();
        let any = std::net::SocketAddr::from(([0, 0, 0, 0], 53));
        let (udp, tcp) = capsa_vmm::netns::run_in(&ns_path, || {
            let udp = std::net::UdpSocket::bind(any)?;
            udp.set_nonblocking(true)?;
            let tcp = std::net::TcpListener::bind(any)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, tcp))
        })
        .and_then(|(udp, tcp)| {
            Ok((
                tokio::net::UdpSocket::from_std(udp)?,
                tokio::net::TcpListener::from_std(tcp)?,
            ))
        })
        .map_err(|e| Error::Command {
            command: format!("bind port 53 in {}", ns_path.display()),
            stderr: e.to_string(),
        })?;
        tracing::info!(upstreams = ?config.upstreams, "dns forwarder listening in the vm namespace");
        tokio::spawn(dns::serve(
            udp,
            tcp,
            config,
            self.clone(),
            self.stop.child_token(),
        ));
        Ok(())
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Gives VM `vm_id` a tap and an address, with deny-all in force.
    pub async fn attach(&self, vm_id: &str) -> Result<NetSpec, Error> {
        let k = self.lock().slots.take().ok_or_else(|| {
            Error::ResourceExhausted(format!(
                "no free address left in --vm-subnet {}",
                self.vm_subnet
            ))
        })?;
        let (_, gateway, guest) = self.vm_subnet.slot(k);
        let tap = nft::tap_name(k);
        let batch = format!(
            "tuntap add dev {tap} mode tap user {uid} vnet_hdr\naddr add {gateway}/30 dev {tap}\nlink set {tap} up\n",
            uid = self.tap_owner
        );
        let made = async {
            run(
                "ip",
                &["-n", &self.names.netns, "-batch", "-"],
                Some(&batch),
            )
            .await?;
            nft_apply(Some(&self.names.netns), &nft::vm_add(k)).await
        }
        .await;
        if let Err(e) = made {
            self.remove_slot(k).await;
            self.lock().slots.release(k);
            return Err(e);
        }
        self.lock().vms.insert(
            vm_id.to_owned(),
            VmNet {
                slot: k,
                guest,
                policy: Arc::new(EgressPolicy::none()),
                lease: None,
                denied_names: 0,
                denied_packets: 0,
                logged: HashSet::new(),
            },
        );
        Ok(NetSpec {
            tap,
            mac: format!(
                "52:54:00:{:02x}:{:02x}:{:02x}",
                (k >> 16) & 0xff,
                (k >> 8) & 0xff,
                k & 0xff
            ),
            guest_ip: guest,
            prefix: 30,
            gateway,
            netns: Some(self.names.ns_path()),
        })
    }

    /// Removes VM `vm_id`'s tap and rules (nothing if it has none).
    pub async fn detach(&self, vm_id: &str) {
        let Some(vm) = self.lock().vms.remove(vm_id) else {
            return;
        };
        self.remove_slot(vm.slot).await;
        self.lock().slots.release(vm.slot);
    }

    async fn remove_slot(&self, k: u32) {
        let ns = self.names.netns.as_str();
        if let Err(e) = nft_apply(Some(ns), &nft::vm_remove(k)).await {
            tracing::debug!(slot = k, error = %e, "vm rules not removed (may never have been made)");
        }
        if let Err(e) = run("ip", &["-n", ns, "link", "del", &nft::tap_name(k)], None).await {
            tracing::debug!(slot = k, error = %e, "tap not removed (may never have been made)");
        }
    }

    /// Puts `policy` in force for VM `vm_id` (one nft transaction), recording its lease
    /// for the logs. Returns once the kernel has it.
    pub async fn set_policy(
        &self,
        vm_id: &str,
        policy: EgressPolicy,
        lease: Option<&str>,
    ) -> Result<(), Error> {
        let _serial = self.policy_lock.lock().await;
        let policy = Arc::new(policy);
        // Recorded first: the DNS forwarder stops admitting what the new policy forbids
        // before the rules (and the set of admitted addresses) are replaced.
        let (k, old) = {
            let mut st = self.lock();
            let vm = st.vms.get_mut(vm_id).ok_or_else(|| {
                Error::NotFound(format!("vm_id {vm_id:?} has no network on this node"))
            })?;
            if let Some(lease) = lease {
                vm.lease = Some(lease.to_owned());
            }
            (vm.slot, std::mem::replace(&mut vm.policy, policy.clone()))
        };
        let applied = nft_apply(
            Some(&self.names.netns),
            &nft::vm_policy(k, &policy, &self.internal, &self.reserved),
        )
        .await;
        if applied.is_err()
            && let Some(vm) = self.lock().vms.get_mut(vm_id)
        {
            vm.policy = old;
        }
        applied
    }

    async fn poll_denials(self: Arc<Network>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(DENIAL_POLL) => {}
                _ = self.stop.cancelled() => return,
            }
            let listing = match run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &self.names.netns,
                    "nft",
                    "-j",
                    "list",
                    "table",
                    "inet",
                    nft::NS_TABLE,
                ],
                None,
            )
            .await
            {
                Ok(out) => serde_json::from_str::<Value>(&out).unwrap_or_default(),
                Err(e) => {
                    tracing::debug!(error = %e, "denials not read");
                    continue;
                }
            };
            let by_slot = nft::parse_denials(&listing);
            let mut st = self.lock();
            for (id, vm) in st.vms.iter_mut() {
                let Some((packets, dests)) = by_slot.get(&vm.slot) else {
                    continue;
                };
                vm.denied_packets = *packets;
                for dest in dests {
                    if vm.logged.insert(dest.clone()) {
                        tracing::warn!(vm = %id, lease = vm.lease.as_deref().unwrap_or(""), destination = %dest, denied_packets = packets, "egress denied");
                    }
                }
                vm.logged.retain(|d| dests.contains(d));
            }
        }
    }

    /// Removes everything: the namespace (with every tap in it), the veth and the table.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        match reap(&self.names).await {
            Ok(_) => tracing::info!(netns = %self.names.netns, "vm network removed"),
            Err(e) => {
                tracing::error!(netns = %self.names.netns, error = %e, "vm network not fully removed")
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl dns::Admit for Network {
    /// The policy of the VM whose guest address is `src`.
    fn policy_for(&self, src: IpAddr) -> Option<Arc<EgressPolicy>> {
        let st = self.lock();
        st.vms
            .values()
            .find(|v| IpAddr::V4(v.guest) == src)
            .map(|v| v.policy.clone())
    }

    /// Admits `addrs` (IPv4 only: VMs have no IPv6) for the VM at `src`, for `ttl`.
    async fn admit(&self, src: IpAddr, addrs: Vec<IpAddr>, ttl: Duration) -> Result<(), String> {
        let k = {
            let st = self.lock();
            st.vms
                .values()
                .find(|v| IpAddr::V4(v.guest) == src)
                .map(|v| v.slot)
                .ok_or_else(|| format!("no vm has address {src}"))?
        };
        let v4: Vec<Ipv4Addr> = addrs
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .collect();
        if v4.is_empty() {
            return Ok(());
        }
        nft_apply(Some(&self.names.netns), &nft::admit(k, &v4, ttl))
            .await
            .map_err(|e| e.to_string())
    }

    /// Counts and logs a name the DNS forwarder refused to the VM at `src`.
    fn denied_name(&self, src: IpAddr, name: &str) {
        let mut st = self.lock();
        if let Some((id, vm)) = st.vms.iter_mut().find(|(_, v)| IpAddr::V4(v.guest) == src) {
            vm.denied_names += 1;
            tracing::warn!(vm = %id, lease = vm.lease.as_deref().unwrap_or(""), name, denied_names = vm.denied_names, "egress denied: dns name");
        }
    }
}

/// A VM's hold on its tap and rules: dropping it (with the VM's record) removes them.
pub struct VmNetGuard {
    network: Arc<Network>,
    vm_id: String,
}

impl VmNetGuard {
    pub fn new(network: Arc<Network>, vm_id: &str) -> VmNetGuard {
        VmNetGuard {
            network,
            vm_id: vm_id.to_owned(),
        }
    }
}

impl Drop for VmNetGuard {
    fn drop(&mut self) {
        let (network, vm_id) = (self.network.clone(), std::mem::take(&mut self.vm_id));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { network.detach(&vm_id).await });
        }
    }
}

/// Removes the namespace, veth and host table named by `names`, whichever exist; true if
/// any did. Run at start-up (after a crash) and at shutdown; the VMMs in the namespace
/// must be gone first (a namespace lives as long as a process in it).
pub async fn reap(names: &Names) -> Result<bool, Error> {
    let mut found = false;
    if names.ns_path().exists() {
        run("ip", &["netns", "delete", &names.netns], None).await?;
        found = true;
    }
    if Path::new("/sys/class/net").join(&names.host_veth).exists() {
        // Usually gone with its peer's namespace.
        match run("ip", &["link", "del", &names.host_veth], None).await {
            Ok(_) => found = true,
            Err(e) if Path::new("/sys/class/net").join(&names.host_veth).exists() => return Err(e),
            Err(_) => {}
        }
    }
    let tables = run("nft", &["-j", "list", "tables", "inet"], None).await?;
    let listed: Value = serde_json::from_str(&tables).unwrap_or_default();
    let ours = listed["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| t["table"]["name"] == names.table.as_str());
    if ours {
        run("nft", &["delete", "table", "inet", &names.table], None).await?;
        found = true;
    }
    Ok(found)
}

/// The unprivileged VMM opens `/dev/net/tun` to attach to its tap: the device must be
/// 0666, as udev makes it on most distributions (safe: attaching needs the tap's owner,
/// creating a tap needs CAP_NET_ADMIN). A host without udev may have it 0600.
fn tun_for_everyone() -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let tun = "/dev/net/tun";
    let mode = std::fs::metadata(tun)
        .map_err(|e| Error::Command {
            command: format!("stat {tun}"),
            stderr: e.to_string(),
        })?
        .permissions()
        .mode();
    if mode & 0o666 != 0o666 {
        tracing::info!(
            mode = format!("{:o}", mode & 0o7777),
            "making /dev/net/tun 0666 (as udev does) so the vmm user can open its tap"
        );
        std::fs::set_permissions(tun, std::fs::Permissions::from_mode(0o666)).map_err(|e| {
            Error::Command {
                command: format!("chmod 0666 {tun}"),
                stderr: e.to_string(),
            }
        })?;
    }
    Ok(())
}

/// Global forwarding (see the module doc) and the veth's own.
fn enable_forwarding(veth: &str) -> Result<(), Error> {
    let global = "/proc/sys/net/ipv4/ip_forward";
    let write = |path: &str| {
        std::fs::write(path, "1").map_err(|e| Error::Command {
            command: format!("write 1 to {path}"),
            stderr: e.to_string(),
        })
    };
    if std::fs::read_to_string(global).is_ok_and(|v| v.trim() == "0") {
        tracing::info!(
            "enabling net.ipv4.ip_forward (replies to the VMs are forwarded from the uplink)"
        );
        write(global)?;
    }
    write(&format!("/proc/sys/net/ipv4/conf/{veth}/forwarding"))
}

/// The host's IPv4 routes (every table, the default route left out) and its addresses.
async fn host_networks() -> Result<(Vec<(Ipv4Net, String)>, Vec<Ipv4Net>), Error> {
    let routes: Value = serde_json::from_str(
        &run("ip", &["-j", "-4", "route", "show", "table", "all"], None).await?,
    )
    .unwrap_or_default();
    let parse = |dst: &str| -> Option<Ipv4Net> {
        match dst.split_once('/') {
            Some((a, p)) => Some(Ipv4Net::containing(a.parse().ok()?, p.parse().ok()?)),
            None => Some(Ipv4Net::containing(dst.parse().ok()?, 32)),
        }
    };
    let routes: Vec<(Ipv4Net, String)> = routes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let net = parse(r["dst"].as_str()?)?;
            Some((net, r["dev"].as_str().unwrap_or("?").to_owned()))
        })
        .collect();
    let addrs: Value = serde_json::from_str(&run("ip", &["-j", "-4", "addr", "show"], None).await?)
        .unwrap_or_default();
    let addrs = addrs
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|link| link["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| {
            let ip: Ipv4Addr = a["local"].as_str()?.parse().ok()?;
            Some(Ipv4Net::containing(ip, a["prefixlen"].as_u64()? as u8))
        })
        .collect();
    Ok((routes, addrs))
}

/// The VM subnet must not overlap the link subnet nor any host route: the VMs' traffic
/// to such a network would be ambiguous (and a collision is a configuration mistake).
fn check_subnets(config: &NetConfig, routes: &[(Ipv4Net, String)]) -> Result<(), Error> {
    if config.vm_subnet.slots() == 0 || config.link_subnet.slots() == 0 {
        return Err(Error::Config(
            "--vm-subnet and --link-subnet must be /30 or larger".into(),
        ));
    }
    if config.vm_subnet.overlaps(&config.link_subnet) {
        return Err(Error::Config(format!(
            "--vm-subnet {} overlaps --link-subnet {}",
            config.vm_subnet, config.link_subnet
        )));
    }
    if let Some((net, dev)) = routes.iter().find(|(n, _)| n.overlaps(&config.vm_subnet)) {
        return Err(Error::Config(format!(
            "--vm-subnet {} overlaps this host's route to {net} (dev {dev}); choose another subnet",
            config.vm_subnet
        )));
    }
    Ok(())
}

/// A /30 of the link subnet no host address or route touches; the search starts at an
/// offset from the namespace's name, so parallel vm-pools rarely race for the same one.
fn pick_link(
    subnet: &Ipv4Net,
    names: &Names,
    taken: &[Ipv4Net],
) -> Result<(Ipv4Net, Ipv4Addr, Ipv4Addr), Error> {
    let n = subnet.slots();
    let start = fnv32(names.netns.as_bytes()) % n;
    (0..n)
        .map(|i| subnet.slot((start + i) % n))
        .find(|(net, _, _)| !taken.iter().any(|t| t.overlaps(net)))
        .ok_or_else(|| {
            Error::Config(format!(
                "--link-subnet {subnet} has no free /30 left on this host"
            ))
        })
}

/// Runs `program args` (feeding `input` on stdin); its stdout, or an error naming the
/// command and its stderr.
async fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, Error> {
    let command = || format!("{program} {}", args.join(" "));
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| Error::Command {
        command: command(),
        stderr: e.to_string(),
    })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .await
            .map_err(|e| Error::Command {
                command: command(),
                stderr: format!("writing stdin: {e}"),
            })?;
    }
    let out = child.wait_with_output().await.map_err(|e| Error::Command {
        command: command(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: command(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies a JSON ruleset (one transaction) in the host's namespace or in `ns`.
async fn nft_apply(ns: Option<&str>, doc: &Value) -> Result<(), Error> {
    let text = doc.to_string();
    match ns {
        Some(ns) => {
            run(
                "ip",
                &["netns", "exec", ns, "nft", "-j", "-f", "-"],
                Some(&text),
            )
            .await
        }
        None => run("nft", &["-j", "-f", "-"], Some(&text)).await,
    }
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_state_dir_and_fit_interface_limits() {
        let a = Names::new(&Names::default_netns(Path::new("/var/lib/capsa-a")));
        let b = Names::new(&Names::default_netns(Path::new("/var/lib/capsa-b")));
        assert_ne!(a, b);
        assert_eq!(
            a,
            Names::new(&Names::default_netns(Path::new("/var/lib/capsa-a")))
        );
        assert!(
            a.netns.starts_with("capsa-") && a.host_veth.len() <= 15,
            "{a:?}"
        );
        assert_eq!(a.ns_path(), Path::new("/run/netns").join(&a.netns));
    }

    fn config(vm: &str, link: &str) -> NetConfig {
        NetConfig {
            names: Names::new("capsa-t"),
            vm_subnet: vm.parse().unwrap(),
            link_subnet: link.parse().unwrap(),
            tap_owner: 1000,
            dns: dns::DnsConfig::default(),
        }
    }

    #[test]
    fn a_vm_subnet_on_a_host_route_is_refused_naming_both() {
        let routes = vec![("192.0.2.0/24".parse().unwrap(), "eth0".to_owned())];
        check_subnets(&config("100.80.0.0/16", "100.127.0.0/16"), &routes).unwrap();
        let err = check_subnets(&config("192.0.2.0/25", "100.127.0.0/16"), &routes)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("192.0.2.0/25") && err.contains("eth0"),
            "{err}"
        );
        let err = check_subnets(&config("100.127.0.0/24", "100.127.0.0/16"), &routes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--link-subnet"), "{err}");
    }

    #[test]
    fn the_link_avoids_taken_30s() {
        let subnet: Ipv4Net = "100.127.0.0/29".parse().unwrap();
        let names = Names::new("capsa-t");
        let (first, near, far) = pick_link(&subnet, &names, &[]).unwrap();
        assert_eq!(first.prefix, 30);
        assert_eq!(u32::from(near), u32::from(first.addr) + 1);
        assert_eq!(u32::from(far), u32::from(first.addr) + 2);
        let (second, _, _) = pick_link(&subnet, &names, &[first]).unwrap();
        assert_ne!(first, second);
        assert!(pick_link(&subnet, &names, &[first, second]).is_err());
    }
}
