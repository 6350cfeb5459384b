//! Reidentify: gives a guest restored from a snapshot an identity of its own. Every VM
//! restored from one snapshot wakes with the same address, MAC, machine-id, RNG state and
//! a clock that stopped when it was saved; vm-pool calls Reidentify right after the
//! restore, before the VM is handed out.
//!
//! The steps run in this order, each within [`STEP_TIMEOUT`], and an error names its step:
//! 1. `network`: eth0's MAC (the link goes down and up for it, and only if it changes),
//!    its address, neighbour table (the gateway is now another tap with another MAC) and
//!    default route, in one `ip -batch` exec as `capsa-init` does at boot; then
//!    /etc/resolv.conf names the gateway as resolver, as at boot.
//! 2. `machine-id`: a new /etc/machine-id, derived from the request's entropy so the same
//!    request twice leaves the same guest.
//! 3. `entropy`: the host's bytes mixed into the guest kernel's pool and credited
//!    (RNDADDENTROPY), then the kernel's RNG reseeded (RNDRESEEDCRNG).
//! 4. `clock`: the wall clock stepped to the host's ([`crate::clock`]).
//!
//! Every field is checked before the first step. The steps change the whole machine, so
//! they run only in a VM: the agent run as a plain process on the host (the test seam)
//! answers FAILED_PRECONDITION after the checks. One call runs at a time.

use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

use crate::clock;
use crate::error::Error;

/// How long one step may take; an `ip` that hangs must not hang the call.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds of the request's entropy, in bytes.
pub const MIN_ENTROPY: usize = 32;
pub const MAX_ENTROPY: usize = 512;

/// The guest's only network device.
const DEVICE: &str = "eth0";
const MACHINE_ID: &str = "/etc/machine-id";
const RESOLV_CONF: &str = "/etc/resolv.conf";
const RANDOM: &str = "/dev/random";
/// Longest `ip` error kept in a status.
const MAX_STDERR: usize = 512;

/// A checked Reidentify request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `None` for a VM without a network device.
    pub network: Option<Network>,
    pub entropy: Vec<u8>,
    pub host_time: SystemTime,
}

/// eth0's new settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    address: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
    /// Six lowercase hex pairs; `None` keeps the current MAC.
    mac: Option<String>,
}

impl Network {
    /// Checks the request's network fields; all three empty is a VM without a network.
    pub fn parse(address: &str, gateway: &str, mac: &str) -> Result<Option<Network>, Error> {
        if address.is_empty() {
            if !gateway.is_empty() {
                return Err(Error::invalid("gateway", "is set without `address`"));
            }
            if !mac.is_empty() {
                return Err(Error::invalid("mac", "is set without `address`"));
            }
            return Ok(None);
        }
        let bad_address =
            || Error::invalid("address", format!("{address:?} is not <ipv4>/<1..=31>"));
        let (ip, prefix) = address.split_once('/').ok_or_else(bad_address)?;
        let address: Ipv4Addr = ip.parse().map_err(|_| bad_address())?;
        // Digits only: `u8::from_str` would take "+24".
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad_address());
        }
        let prefix: u8 = prefix.parse().map_err(|_| bad_address())?;
        if !(1..=31).contains(&prefix) {
            return Err(bad_address());
        }
        let gateway: Ipv4Addr = gateway.parse().map_err(|_| {
            Error::invalid("gateway", format!("{gateway:?} is not an IPv4 address"))
        })?;
        let mask = u32::MAX << (32 - prefix);
        if u32::from(gateway) & mask != u32::from(address) & mask || gateway == address {
            return Err(Error::invalid(
                "gateway",
                format!("{gateway} is not another address of {address}/{prefix}"),
            ));
        }
        let mac = match mac {
            "" => None,
            m if is_unicast_mac(m) => Some(m.to_string()),
            m => {
                return Err(Error::invalid(
                    "mac",
                    format!("{m:?} is not a unicast MAC of six lowercase hex pairs"),
                ));
            }
        };
        Ok(Some(Network {
            address,
            prefix,
            gateway,
            mac,
        }))
    }

    /// The `ip -batch` script; `set_mac` when eth0's MAC must change.
    fn batch(&self, set_mac: bool) -> String {
        let d = DEVICE;
        let mut script = String::new();
        if let (true, Some(mac)) = (set_mac, &self.mac) {
            // Not every NIC takes a new MAC while up.
            script += &format!("link set dev {d} down\nlink set dev {d} address {mac}\n");
        }
        let (address, prefix, gateway) = (self.address, self.prefix, self.gateway);
        script += &format!(
            "addr flush dev {d}\nneigh flush dev {d}\naddr add {address}/{prefix} dev {d}\n\
             link set dev {d} up\nroute replace default via {gateway} dev {d}\n"
        );
        script
    }

    /// /etc/resolv.conf: the gateway is vm-pool's DNS forwarder. Same text as at boot.
    fn resolv_conf(&self) -> String {
        format!(
            "nameserver {}\noptions timeout:2 attempts:2\n",
            self.gateway
        )
    }
}

/// "xx:xx:xx:xx:xx:xx" in lowercase hex, neither multicast nor all zeros.
fn is_unicast_mac(mac: &str) -> bool {
    let pairs: Vec<&str> = mac.split(':').collect();
    let well_formed = pairs.len() == 6
        && pairs.iter().all(|p| {
            p.len() == 2
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
    if !well_formed {
        return false;
    }
    let first = u8::from_str_radix(pairs[0], 16).unwrap_or(1);
    first & 1 == 0 && pairs.iter().any(|p| *p != "00")
}

/// The request's entropy must be [`MIN_ENTROPY`]..=[`MAX_ENTROPY`] bytes.
pub fn check_entropy(entropy: &[u8]) -> Result<(), Error> {
    if !(MIN_ENTROPY..=MAX_ENTROPY).contains(&entropy.len()) {
        return Err(Error::invalid(
            "entropy",
            format!(
                "is {} bytes; it must be {MIN_ENTROPY} to {MAX_ENTROPY}",
                entropy.len()
            ),
        ));
    }
    Ok(())
}

/// What Reidentify did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Guest minus host before the step, in nanoseconds; 0 when within tolerance.
    pub clock_offset_nanos: i64,
    pub machine_id: String,
}

/// Runs Reidentify, one call at a time, and only in a VM.
pub struct Identity {
    in_vm: bool,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Identity {
    /// `in_vm` is false for the test seam (the agent as a plain process on the host), where
    /// no step may run.
    pub fn new(in_vm: bool) -> Identity {
        Identity {
            in_vm,
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    pub async fn reidentify(&self, request: Request) -> Result<Outcome, Error> {
        if !self.in_vm {
            return Err(Error::Precondition(
                "not running in a VM: Reidentify would change this machine's network, \
                 machine-id, RNG and clock"
                    .into(),
            ));
        }
        // The host's clock moves on while the steps before the clock run (an `ip` exec
        // alone is ~0.1 s under TCG): the clock step adds the time spent here.
        let received = Instant::now();
        let _one = self.one_at_a_time.lock().await;
        if let Some(net) = &request.network {
            bounded("network", STEP_TIMEOUT, configure_network(net)).await?;
        }
        let machine_id = machine_id(&request.entropy);
        let contents = format!("{machine_id}\n");
        bounded(
            "machine-id",
            STEP_TIMEOUT,
            blocking(move || write_atomically(Path::new(MACHINE_ID), contents.as_bytes(), 0o444)),
        )
        .await?;
        let entropy = request.entropy;
        bounded("entropy", STEP_TIMEOUT, blocking(move || reseed(&entropy))).await?;
        let host_time = request.host_time;
        let clock_offset_nanos = bounded(
            "clock",
            STEP_TIMEOUT,
            blocking(move || clock::step_to(host_time + received.elapsed())),
        )
        .await?;
        tracing::info!(
            address = ?request.network.as_ref().map(|n| n.address),
            clock_offset_ms = clock_offset_nanos / 1_000_000,
            "reidentified"
        );
        Ok(Outcome {
            clock_offset_nanos,
            machine_id,
        })
    }
}

/// Runs one step within `limit`, naming it in the error.
async fn bounded<T>(
    step: &'static str,
    limit: Duration,
    work: impl Future<Output = io::Result<T>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(Error::Reidentify { step, source }),
        Err(_) => Err(Error::ReidentifyTimeout { step, after: limit }),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

async fn configure_network(net: &Network) -> io::Result<()> {
    let current = tokio::fs::read_to_string(format!("/sys/class/net/{DEVICE}/address")).await;
    // Unreadable: let `ip` try, and say what is wrong.
    let set_mac = match (&net.mac, current) {
        (Some(wanted), Ok(current)) => current.trim_end() != wanted,
        (Some(_), Err(_)) => true,
        (None, _) => false,
    };
    run_batch(
        Command::new("ip").args(["-batch", "-"]),
        &net.batch(set_mac),
    )
    .await?;
    let resolv = net.resolv_conf();
    blocking(move || write_atomically(Path::new(RESOLV_CONF), resolv.as_bytes(), 0o644)).await
}

/// Feeds `script` to `command` on stdin; a failure carries the command's stderr. The child
/// is killed if the caller gives up on it (a step timeout).
async fn run_batch(command: &mut Command, script: &str) -> io::Result<()> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // A command that fails early closes its stdin: its exit status says more than EPIPE.
    let written = stdin.write_all(script.as_bytes()).await;
    drop(stdin);
    let output = child.wait_with_output().await?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr: String = stderr.trim().chars().take(MAX_STDERR).collect();
        return Err(io::Error::other(format!("{}: {stderr}", output.status)));
    }
    written
}

/// 32 lowercase hex digits, a version 4 UUID like systemd's, from a hash of the entropy:
/// new for every restore (the host sends fresh bytes), the same for a repeated request.
/// The hash is one-way, so the id says nothing about the bytes credited to the RNG.
fn machine_id(entropy: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"capsa machine-id\0")
        .chain_update(entropy)
        .finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    hex::encode(id)
}

/// Replaces `path` so that no reader ever sees a partial file: a temporary file beside
/// it, written and synced, then renamed over it.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut file = tempfile::Builder::new()
        .prefix(".capsa-")
        .tempfile_in(dir)?;
    file.write_all(contents)?;
    file.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// `struct rand_pool_info` of linux/random.h, with room for [`MAX_ENTROPY`] bytes.
#[repr(C)]
struct RandPoolInfo {
    /// Bits credited.
    entropy_count: libc::c_int,
    /// Bytes in `buf`.
    buf_size: libc::c_int,
    buf: [u8; MAX_ENTROPY],
}

impl RandPoolInfo {
    /// All of `entropy` (at most [`MAX_ENTROPY`] bytes, checked before), fully credited:
    /// it comes from the host's RNG.
    fn new(entropy: &[u8]) -> RandPoolInfo {
        let mut buf = [0u8; MAX_ENTROPY];
        buf[..entropy.len()].copy_from_slice(entropy);
        RandPoolInfo {
            entropy_count: (entropy.len() * 8) as libc::c_int,
            buf_size: entropy.len() as libc::c_int,
            buf,
        }
    }
}

const RNDADDENTROPY: libc::Ioctl = libc::_IOW::<[libc::c_int; 2]>(b'R' as u32, 0x03);
const RNDRESEEDCRNG: libc::Ioctl = libc::_IO(b'R' as u32, 0x07);

/// Mixes `entropy` into the kernel's pool, credited, then reseeds the kernel's RNG so
/// the next random number already depends on it.
fn reseed(entropy: &[u8]) -> io::Result<()> {
    let random = std::fs::OpenOptions::new().write(true).open(RANDOM)?;
    let info = RandPoolInfo::new(entropy);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info and its `buf_size` bytes of `buf`, all
    // inside `info`, which outlives the call.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &info) } != 0 {
        return Err(io::Error::other(format!(
            "RNDADDENTROPY: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::other(format!(
            "RNDRESEEDCRNG: {}",
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field<T: std::fmt::Debug>(r: Result<T, Error>) -> &'static str {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    fn net(address: &str, gateway: &str, mac: &str) -> Network {
        Network::parse(address, gateway, mac).unwrap().unwrap()
    }

    #[test]
    fn network_fields_are_checked_and_named() {
        assert!(Network::parse("", "", "").unwrap().is_none());
        let n = net("10.0.0.2/30", "10.0.0.1", "52:54:00:0a:0b:0c");
        assert_eq!(
            (n.address, n.prefix, n.gateway, n.mac.as_deref()),
            (
                Ipv4Addr::new(10, 0, 0, 2),
                30,
                Ipv4Addr::new(10, 0, 0, 1),
                Some("52:54:00:0a:0b:0c")
            )
        );
        assert_eq!(net("10.0.0.2/31", "10.0.0.3", "").mac, None);
        assert_eq!(field(Network::parse("", "10.0.0.1", "")), "gateway");
        assert_eq!(field(Network::parse("", "", "52:54:00:0a:0b:0c")), "mac");
        for address in [
            "10.0.0.2",
            "10.0.0.2/",
            "10.0.0.2/0",
            "10.0.0.2/32",
            "10.0.0.2/+24",
            "10.0.0.2/30/1",
            "10.0.0.256/30",
            "010.0.0.2/30",
            "::1/64",
            " 10.0.0.2/30",
            "10.0.0.2/30\nlink set eth0 down",
        ] {
            assert_eq!(
                field(Network::parse(address, "10.0.0.1", "")),
                "address",
                "{address:?}"
            );
        }
        for gateway in ["", "10.0.0.1/30", "gw", "10.0.0.5", "10.0.0.2"] {
            assert_eq!(
                field(Network::parse("10.0.0.2/30", gateway, "")),
                "gateway",
                "{gateway:?}"
            );
        }
        for mac in [
            "52:54:00:0A:0B:0C",
            "52-54-00-0a-0b-0c",
            "52:54:00:0a:0b",
            "52:54:00:0a:0b:0c:0d",
            "52:54:00:0a:0b:c",
            "52:54:00:0a:0b:0g",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
        ] {
            assert_eq!(
                field(Network::parse("10.0.0.2/30", "10.0.0.1", mac)),
                "mac",
                "{mac:?}"
            );
        }
    }

    #[test]
    fn entropy_is_32_to_512_bytes() {
        assert_eq!(field(check_entropy(&[])), "entropy");
        assert_eq!(field(check_entropy(&[7; 31])), "entropy");
        assert!(check_entropy(&[7; 32]).is_ok());
        assert!(check_entropy(&[7; 512]).is_ok());
        assert_eq!(field(check_entropy(&[7; 513])), "entropy");
    }

    #[test]
    fn the_batch_flushes_then_sets_address_link_and_route() {
        let n = net("10.0.0.6/30", "10.0.0.5", "52:54:00:00:00:02");
        assert_eq!(
            n.batch(false),
            "addr flush dev eth0\n\
             neigh flush dev eth0\n\
             addr add 10.0.0.6/30 dev eth0\n\
             link set dev eth0 up\n\
             route replace default via 10.0.0.5 dev eth0\n"
        );
        assert_eq!(
            n.batch(true),
            "link set dev eth0 down\n\
             link set dev eth0 address 52:54:00:00:00:02\n\
             addr flush dev eth0\n\
             neigh flush dev eth0\n\
             addr add 10.0.0.6/30 dev eth0\n\
             link set dev eth0 up\n\
             route replace default via 10.0.0.5 dev eth0\n"
        );
        // No MAC in the request: nothing to set, whatever the caller thinks.
        assert!(
            !net("10.0.0.6/30", "10.0.0.5", "")
                .batch(true)
                .contains("address")
        );
        assert_eq!(
            n.resolv_conf(),
            "nameserver 10.0.0.5\noptions timeout:2 attempts:2\n"
        );
    }

    #[test]
    fn machine_ids_are_v4_uuids_in_lowercase_hex_one_per_entropy() {
        let a = machine_id(&[1; 32]);
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{a}"
        );
        assert_eq!(&a[12..13], "4", "{a}");
        assert!("89ab".contains(&a[16..17]), "{a}");
        assert_eq!(machine_id(&[1; 32]), a);
        assert_ne!(machine_id(&[2; 32]), a);
        assert_ne!(machine_id(&[1; 33]), a);
    }

    #[test]
    fn rand_pool_info_is_the_kernel_layout() {
        assert_eq!(std::mem::offset_of!(RandPoolInfo, entropy_count), 0);
        assert_eq!(std::mem::offset_of!(RandPoolInfo, buf_size), 4);
        assert_eq!(std::mem::offset_of!(RandPoolInfo, buf), 8);
        assert_eq!(std::mem::align_of::<RandPoolInfo>(), 4);
        let info = RandPoolInfo::new(&[0xab; 40]);
        assert_eq!((info.entropy_count, info.buf_size), (320, 40));
        assert!(info.buf[..40].iter().all(|&b| b == 0xab));
        assert!(info.buf[40..].iter().all(|&b| b == 0));
        // linux/random.h on the architectures Capsa's guests run.
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        assert_eq!((RNDADDENTROPY, RNDRESEEDCRNG), (0x4008_5203, 0x5207));
    }

    #[test]
    fn a_file_is_replaced_whole_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machine-id");
        std::fs::write(&path, "old\n").unwrap();
        write_atomically(&path, b"new\n", 0o444).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
        // Again over the read-only file (Reidentify twice), and nothing left beside it.
        write_atomically(&path, b"newer\n", 0o444).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "newer\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn a_batch_reaches_the_command_and_its_failure_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("script");
        let copy = format!("cat >{}", out.display());
        run_batch(
            Command::new("sh").args(["-c", &copy]),
            "addr flush dev eth0\n",
        )
        .await
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "addr flush dev eth0\n"
        );
        let fail = "read line; echo \"Error: bad $line\" >&2; exit 1";
        let e = run_batch(Command::new("sh").args(["-c", fail]), "x\n")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("Error: bad x"), "{e}");
        assert!(e.to_string().contains("exit status: 1"), "{e}");
    }

    #[tokio::test]
    async fn a_hung_step_times_out_naming_it() {
        let started = std::time::Instant::now();
        // `sleep` itself, not under a shell: the kill on timeout reaches the hung process.
        let mut sleep = Command::new("sleep");
        let hang = run_batch(sleep.arg("30"), "");
        let e = bounded("network", Duration::from_millis(200), hang)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::ReidentifyTimeout {
                    step: "network",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("network"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let failed = bounded("entropy", STEP_TIMEOUT, async {
            Err::<(), _>(io::Error::other("EPERM"))
        })
        .await
        .unwrap_err();
        assert!(failed.to_string().contains("entropy"), "{failed}");
    }

    #[tokio::test]
    async fn outside_a_vm_nothing_is_touched() {
        let request = Request {
            network: Network::parse("10.0.0.2/30", "10.0.0.1", "52:54:00:0a:0b:0c").unwrap(),
            entropy: vec![9; 64],
            host_time: SystemTime::UNIX_EPOCH,
        };
        let e = Identity::new(false).reidentify(request).await.unwrap_err();
        assert!(
            matches!(e, Error::Precondition(ref m) if m.contains("not running in a VM")),
            "{e:?}"
        );
    }
}
