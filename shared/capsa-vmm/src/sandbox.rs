//! What confines a VM's host process (the VMM): an unprivileged user, the
//! VM's cgroup, a private mount view, and a seccomp filter.
//!
//! vm-pool runs as root; every VMM process it starts drops to the VMM user before it runs
//! a single instruction of the VMM. In the child, between fork and exec ([`Confinement`]):
//! 1. join the VM's cgroup (write 0 to each `cgroup.procs`), so every byte and cycle the
//!    VMM ever uses is counted and limited;
//! 2. a private mount namespace: a tmpfs is mounted over `<state>/vms` with only this VM's
//!    own dir mounted back (a detached clone of it, `open_tree` + `move_mount`) (all VMMs share one user, so this is what keeps one VMM
//!    away from another VM's sockets and disk), and every other mount is made read-only
//!    (`mount_setattr(AT_RECURSIVE)`), so the VMM can write nowhere but its VM dir;
//! 3. drop to the VMM user: `setgroups` (only the group of `/dev/kvm` when the engine uses
//!    KVM), `setgid`, `setuid`; the parent-death signal is set after that (a uid change
//!    clears it);
//! 4. `no_new_privs` and a seccomp filter that refuses (EPERM) what no VMM needs and an
//!    escape would: ptrace and cross-process memory access (all VMMs share one uid),
//!    mount, namespaces, module loading, kexec, bpf, perf, keyrings, uid/gid changes. QEMU
//!    adds its own (`-sandbox on,...`), Cloud Hypervisor keeps its default one.
//!
//! The binary is exec'd through an fd opened by vm-pool (`/proc/self/fd/N`), so it may
//! live where the VMM user cannot reach (`~root/.cargo/bin`); argv\[0\] stays its path.
//! The guest image (kernel, rootfs, initrd) must be readable by the VMM user: checked
//! before each boot with a message naming the file.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::VmmError;
use crate::cgroup::{CgroupRoot, VmCgroup, VmLimits};

/// An empty VM cgroup older than this is a leftover (see `CgroupRoot::reap_stale`).
const STALE_CGROUP_AGE: std::time::Duration = std::time::Duration::from_secs(300);

/// The VMM user and where the per-VM cgroups go.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// A system user with no other purpose (`useradd --system capsa-vmm`).
    pub user: String,
    /// Parent cgroup of the VMs (relative to the hierarchy's root).
    pub cgroup_parent: String,
    /// Added to guest RAM for a VM's memory limit: the VMM's own memory (for TCG its
    /// translation cache; see README).
    pub memory_overhead_mib: u32,
    /// Tasks (threads count) per VM.
    pub pids_max: u32,
}

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl VmmUser {
    pub fn lookup(name: &str) -> Result<VmmUser, VmmError> {
        let c = CString::new(name)
            .map_err(|_| VmmError::InvalidSpec(format!("vmm user {name:?} has a NUL")))?;
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0u8; 16 * 1024];
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: getpwnam_r with a valid C string and a buffer we own; `out` points into
        // `pwd` or is null.
        let rc = unsafe {
            libc::getpwnam_r(
                c.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut out,
            )
        };
        if rc != 0 || out.is_null() {
            return Err(VmmError::NoEngine(format!(
                "vmm user {name:?} does not exist: create it (useradd --system --no-create-home \
                 --shell /usr/sbin/nologin {name}, as deploy/scripts/install-deps.sh does)"
            )));
        }
        if pwd.pw_uid == 0 {
            return Err(VmmError::InvalidSpec(format!(
                "vmm user {name:?} is root: the VMM must run unprivileged"
            )));
        }
        Ok(VmmUser {
            name: name.to_owned(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }
}

/// Confinement of every VM's processes; shared by a driver.
#[derive(Debug)]
pub struct Sandbox {
    pub user: VmmUser,
    pub cgroups: CgroupRoot,
    config: SandboxConfig,
    /// Supplementary groups of the VMM: the group of `/dev/kvm` when KVM is used.
    groups: Vec<u32>,
    filter: Vec<libc::sock_filter>,
}

impl Sandbox {
    /// Resolves the user and sets up the parent cgroup. `kvm`: the engine opens `/dev/kvm`.
    pub fn new(config: SandboxConfig, kvm: bool) -> Result<Sandbox, VmmError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(VmmError::NoEngine(
                "confining VMMs (cgroups, user switch, mount namespace) needs root".into(),
            ));
        }
        let user = VmmUser::lookup(&config.user)?;
        let cgroups = CgroupRoot::detect(&config.cgroup_parent)?;
        let stale = cgroups.reap_stale(STALE_CGROUP_AGE);
        if !stale.is_empty() {
            tracing::warn!(count = stale.len(), "removed empty vm cgroups left behind");
        }
        let mut groups = vec![];
        if kvm {
            match std::fs::metadata("/dev/kvm") {
                Ok(m) if m.gid() != 0 => groups.push(m.gid()),
                // The VMM will fail to open it, saying so in its log.
                _ => {
                    tracing::warn!(user = %user.name, "/dev/kvm has no non-root group; the vmm user may not open it")
                }
            }
        }
        Ok(Sandbox {
            user,
            cgroups,
            config,
            groups,
            filter: seccomp_filter(),
        })
    }

    /// The memory limit of a VM with `guest_mib` of RAM.
    pub fn memory_limit_bytes(&self, guest_mib: u32) -> u64 {
        (u64::from(guest_mib) + u64::from(self.config.memory_overhead_mib)) << 20
    }

    /// Creates the VM's cgroup, records it in the VM dir and hands the dir to the user.
    pub(crate) fn prepare(
        &self,
        vm_id: &str,
        dir: &Path,
        vcpus: u32,
        memory_mib: u32,
    ) -> Result<VmCgroup, VmmError> {
        let cg = self.cgroups.create_vm(
            vm_id,
            VmLimits {
                memory_bytes: self.memory_limit_bytes(memory_mib),
                vcpus,
                pids: self.config.pids_max,
            },
        )?;
        // The VMM user walks from / down to its VM dir: the vms dir and the state dir above
        // it (vm-pool's own) get o+x when they lack it; anything higher up is the operator's.
        for d in dir.ancestors().skip(1).take(2) {
            if let Ok(m) = std::fs::metadata(d)
                && m.uid() == 0
                && m.permissions().mode() & 0o001 == 0
            {
                let mode = m.permissions().mode() | 0o011;
                tracing::info!(dir = %d.display(), mode = format!("{:o}", mode & 0o7777), "letting the vmm user traverse the state dir");
                let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode));
            }
        }
        let file = dir.join(crate::layout::CGROUP);
        let handed = std::fs::write(&file, cg.to_file())
            .map_err(|e| VmmError::io("write cgroup file", &file, e))
            .and_then(|()| self.give(dir))
            // Only root and the VMM user reach the VM's sockets and disk.
            .and_then(|()| {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| VmmError::io("chmod vm dir", dir, e))
            })
            .and_then(|()| self.check_readable("vm dir", dir));
        if let Err(e) = handed {
            cg.remove_now();
            return Err(e);
        }
        Ok(cg)
    }

    /// Makes `path` (in a VM dir) the VMM user's.
    pub(crate) fn give(&self, path: &Path) -> Result<(), VmmError> {
        std::os::unix::fs::chown(path, Some(self.user.uid), Some(self.user.gid))
            .map_err(|e| VmmError::io("chown to the vmm user", path, e))
    }

    /// Fails, naming the file, unless the VMM user can read `file`.
    pub(crate) fn check_readable(&self, what: &str, file: &Path) -> Result<(), VmmError> {
        let real = std::fs::canonicalize(file).map_err(|e| VmmError::io("resolve", file, e))?;
        let mut at = PathBuf::from("/");
        let parts: Vec<_> = real.components().skip(1).collect();
        for (i, part) in parts.iter().enumerate() {
            at.push(part);
            let m = std::fs::metadata(&at).map_err(|e| VmmError::io("stat", &at, e))?;
            let last = i + 1 == parts.len();
            let need = if last { 4 } else { 1 }; // r for the file, x for the dirs
            if !self.may(&m, need) {
                return Err(VmmError::InvalidSpec(format!(
                    "{what} {} is not readable by the vmm user {} (uid {}): {} has mode {:o}",
                    file.display(),
                    self.user.name,
                    self.user.uid,
                    at.display(),
                    m.permissions().mode() & 0o7777
                )));
            }
        }
        Ok(())
    }

    fn may(&self, m: &std::fs::Metadata, bit: u32) -> bool {
        let mode = m.permissions().mode();
        if m.uid() == self.user.uid {
            mode & (bit << 6) != 0
        } else if m.gid() == self.user.gid || self.groups.contains(&m.gid()) {
            mode & (bit << 3) != 0
        } else {
            mode & bit != 0
        }
    }

    /// Everything the child does before exec, prepared here (no allocation after fork),
    /// and the path to exec (`/proc/self/fd/N` of `binary`).
    pub(crate) fn confinement(
        &self,
        binary: &Path,
        vm_dir: &Path,
        cgroup: &VmCgroup,
        netns: Option<&Path>,
    ) -> Result<(Confinement, PathBuf), VmmError> {
        let open = |p: &Path, flags: libc::c_int| -> Result<OwnedFd, VmmError> {
            let c = cstr(p)?;
            // SAFETY: open(2) on a valid C string; the fd is owned at once.
            let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(VmmError::io("open", p, std::io::Error::last_os_error()));
            }
            // SAFETY: a fresh fd nobody else owns.
            Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
        };
        let exe = open(binary, libc::O_RDONLY)?;
        let netns = netns.map(|ns| open(ns, libc::O_RDONLY)).transpose()?;
        let vms_dir = vm_dir.parent().ok_or_else(|| {
            VmmError::InvalidSpec(format!("vm dir {} has no parent", vm_dir.display()))
        })?;
        let exec_path = PathBuf::from(format!("/proc/self/fd/{}", exe.as_raw_fd()));
        let c = Confinement {
            procs: cgroup
                .procs_files()
                .iter()
                .map(|p| cstr(p))
                .collect::<Result<_, _>>()?,
            vms_dir: cstr(vms_dir)?,
            vm_dir: cstr(vm_dir)?,
            uid: self.user.uid,
            gid: self.user.gid,
            groups: self.groups.clone(),
            filter: self.filter.clone(),
            exe,
            netns,
        };
        Ok((c, exec_path))
    }
}

/// A command for `binary` that runs confined in the VM of `dir` when `sandbox` is set
/// (else as this process's user, for tests and embedding without root), inside the
/// network namespace `netns` when given (only with a sandbox: joining one takes the
/// privileges the sandbox then drops).
pub(crate) fn vmm_command(
    binary: &Path,
    sandbox: Option<(&Sandbox, &VmCgroup)>,
    dir: &Path,
    netns: Option<&Path>,
) -> Result<(tokio::process::Command, Option<Confinement>), VmmError> {
    match sandbox {
        Some((sb, cgroup)) => {
            let (confinement, exec) = sb.confinement(binary, dir, cgroup, netns)?;
            let mut cmd = tokio::process::Command::new(exec);
            // What ps, orphan reaping and operators see.
            cmd.arg0(binary);
            Ok((cmd, Some(confinement)))
        }
        None if netns.is_some() => Err(VmmError::InvalidSpec(
            "net.netns needs a sandbox (joining a namespace takes root)".into(),
        )),
        None => Ok((tokio::process::Command::new(binary), None)),
    }
}

fn cstr(p: &Path) -> Result<CString, VmmError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| VmmError::InvalidSpec(format!("path {} has a NUL", p.display())))
}

/// The child's side of the sandbox; see the module doc for the order and why.
pub(crate) struct Confinement {
    procs: Vec<CString>,
    vms_dir: CString,
    vm_dir: CString,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    filter: Vec<libc::sock_filter>,
    /// The binary, exec'd through `/proc/self/fd/N`.
    exe: OwnedFd,
    /// The network namespace to join, if any.
    netns: Option<OwnedFd>,
}

const AT_RECURSIVE: libc::c_uint = 0x8000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

impl Confinement {
    /// Runs in the child between fork and exec: only async-signal-safe calls, no allocation.
    pub(crate) fn apply(&self) -> std::io::Result<()> {
        let check = |rc: libc::c_long| {
            if rc < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY (whole block): raw syscalls on C strings and buffers owned by `self`, which
        // outlives them; nothing here allocates or takes a lock.
        unsafe {
            if let Some(ns) = &self.netns {
                check(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) as _)?;
            }
            for p in &self.procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                check(fd as _)?;
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                check(n as _)?;
            }
            check(libc::unshare(libc::CLONE_NEWNS) as _)?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) as _)?;
            // A detached copy of the VM dir's mount, taken before the tmpfs hides the dir and
            // untouched by the read-only pass; attached back below.
            let tree = libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                self.vm_dir.as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            );
            check(tree)?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.vms_dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"mode=0755,size=64k".as_ptr().cast(),
            ) as _)?;
            check(libc::mkdir(self.vm_dir.as_ptr(), 0o700) as _)?;
            let attr = MountAttr {
                attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID,
                attr_clr: 0,
                propagation: 0,
                userns_fd: 0,
            };
            check(libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                c"/".as_ptr(),
                AT_RECURSIVE,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            ))?;
            check(libc::syscall(
                libc::SYS_move_mount,
                tree as libc::c_int,
                c"".as_ptr(),
                libc::AT_FDCWD,
                self.vm_dir.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            ))?;
            libc::close(tree as libc::c_int);
            check(libc::setgroups(self.groups.len(), self.groups.as_ptr()) as _)?;
            check(libc::setgid(self.gid) as _)?;
            check(libc::setuid(self.uid) as _)?;
            // Kept open across exec: a script (a test's fake VMM) is re-opened by its
            // interpreter through this path.
            check(libc::fcntl(self.exe.as_raw_fd(), libc::F_SETFD, 0) as _)?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as _)?;
            let prog = libc::sock_fprog {
                len: self.filter.len() as u16,
                filter: self.filter.as_ptr().cast_mut(),
            };
            check(libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) as _)?;
        }
        Ok(())
    }
}

/// Syscalls refused to every VMM process (EPERM).
const DENIED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_open_by_handle_at,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_setgroups,
];

/// Namespace flags refused in clone(2): a VMM makes threads, not containers.
const CLONE_NS_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u32;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// The BPF program of the filter (classic BPF over `struct seccomp_data`).
fn seccomp_filter() -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const JGE_K: u16 = 0x35;
    const JSET_K: u16 = 0x45;
    const RET_K: u16 = 0x06;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let eperm = SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let mut f = vec![
        // Another architecture's syscall numbers mean other syscalls: kill.
        op(LD_W_ABS, 0, 0, 4),
        op(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        op(RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        op(LD_W_ABS, 0, 0, 0),
        // x32 numbers alias the 64-bit ones.
        op(JGE_K, 0, 1, X32_SYSCALL_BIT),
        op(RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        // clone3 passes its flags in memory, out of a filter's reach: ENOSYS makes libc
        // fall back to clone, whose flags are checked below.
        op(JEQ_K, 0, 1, libc::SYS_clone3 as u32),
        op(RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        op(JEQ_K, 0, 3, libc::SYS_clone as u32),
        op(LD_W_ABS, 0, 0, 16), // args[0], low half: the flags
        op(JSET_K, 0, 1, CLONE_NS_FLAGS),
        op(RET_K, 0, 0, eperm),
        op(LD_W_ABS, 0, 0, 0),
    ];
    for &nr in DENIED {
        f.push(op(JEQ_K, 0, 1, nr as u32));
        f.push(op(RET_K, 0, 0, eperm));
    }
    f.push(op(RET_K, 0, 0, SECCOMP_RET_ALLOW));
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_checks_the_arch_first_and_ends_allowing() {
        let f = seccomp_filter();
        assert_eq!((f[0].code, f[0].k), (0x20, 4));
        assert_eq!(f[1].k, AUDIT_ARCH_X86_64);
        assert_eq!(f.last().unwrap().k, SECCOMP_RET_ALLOW);
        assert!(f.len() < 4096, "BPF programs are at most 4096 instructions");
        for nr in [libc::SYS_ptrace, libc::SYS_mount, libc::SYS_setuid] {
            assert!(f.iter().any(|i| i.code == 0x15 && i.k == nr as u32));
        }
    }

    #[test]
    fn a_missing_user_is_named_with_the_fix() {
        let err = VmmUser::lookup("capsa-no-such-user")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("capsa-no-such-user") && err.contains("useradd"),
            "{err}"
        );
        let err = VmmUser::lookup("root").unwrap_err().to_string();
        assert!(err.contains("root"), "{err}");
    }
}
