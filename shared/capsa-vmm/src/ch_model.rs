//! The typed side of Cloud Hypervisor's REST API: the request bodies Capsa sends, the
//! version it needs, and the config it keeps for restore.
//!
//! Bodies are built with the models of the `cloud-hypervisor-client` crate (0.6), generated
//! from Cloud Hypervisor's OpenAPI document version [`API_SPEC_VERSION`], so a renamed or
//! mistyped field fails to compile instead of being ignored by the VMM: Cloud Hypervisor
//! does not reject unknown fields, it drops them. For the same reason a VMM older than the
//! fields we send would accept `vm.create` and quietly run without them, so every VMM is
//! checked at start-up ([`check_ping`] on `GET vmm.ping`) against [`MIN_VMM_VERSION`], and
//! after `vm.create` the config it reports (`GET vm.info`) must still hold every field we
//! sent ([`check_kept`]).
//!
//! What the VMM writes (`vm.info`'s config, a snapshot's `config.json`) is read as a
//! [`Preserved`] value: the model gives typed access, the JSON as written is kept beside it,
//! and writing it back changes only what the typed side changed. A field the model does not
//! know (a newer VMM's, or one the spec never described) survives a snapshot and restore.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use cloud_hypervisor_client::models::{
    BalloonConfig, ConsoleConfig, ConsoleMode, CpusConfig, DiskConfig, ImageType, MemoryConfig,
    NetConfig, PayloadConfig, RestoreConfig, SerialConfig, VmConfig, VmSnapshotConfig,
    VmmPingResponse, VsockConfig,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{VmSpec, VmmError};

/// The version of Cloud Hypervisor's OpenAPI document (`info.version` in
/// `vmm/src/api/openapi/cloud-hypervisor.yaml`) the `cloud-hypervisor-client` 0.6 models
/// were generated from. The REST paths are `/api/v1/...` for every version of it. The spec's
/// version has stayed 0.3.0 while fields were added (v50.0 and v53.0 both say 0.3.0, and
/// only v51.0 on knows the disk fields we send), and `vmm.ping` does not report it, so the
/// VMM's release ([`MIN_VMM_VERSION`]) is what start-up checks.
pub const API_SPEC_VERSION: &str = "0.3.0";

/// The oldest Cloud Hypervisor that knows every field of our `vm.create`: v51.0 added the
/// disk's `image_type` and `backing_files`. Without them an older VMM (which ignores
/// unknown fields) would open the qcow2 overlay without its base image.
pub const MIN_VMM_VERSION: VmmVersion = VmmVersion {
    major: 51,
    minor: 0,
};

/// The guest's vsock context id (any value above 2 works; every VM has its own socket).
const GUEST_CID: i64 = 3;

/// A Cloud Hypervisor release, as `vmm.ping` reports it: `version` is the cargo package
/// version ("53.0.0"), `build_version` its `git describe` ("v53.0", "v53.0-dirty").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct VmmVersion {
    pub major: u32,
    pub minor: u32,
}

impl VmmVersion {
    /// "53.0.0", "v53.0", "v53.0-12-g1234abc-dirty", "53" → 53.0; anything else is `None`.
    pub fn parse(text: &str) -> Option<VmmVersion> {
        let text = text.trim();
        let text = text.strip_prefix('v').unwrap_or(text);
        let numeric = text.split(['-', '+']).next()?;
        let mut parts = numeric.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = match parts.next() {
            Some(m) => m.parse().ok()?,
            None => 0,
        };
        Some(VmmVersion { major, minor })
    }
}

impl fmt::Display for VmmVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}", self.major, self.minor)
    }
}

/// Accepts a `vmm.ping` reply from a VMM at least [`MIN_VMM_VERSION`]; the error names
/// both versions.
pub(crate) fn check_ping(ping: &VmmPingResponse) -> Result<VmmVersion, VmmError> {
    let reported = match &ping.build_version {
        Some(build) if build != &ping.version => format!("{} (build {build})", ping.version),
        _ => ping.version.clone(),
    };
    let unsupported = |why: String| VmmError::UnsupportedVmm {
        found: reported.clone(),
        required: MIN_VMM_VERSION.to_string(),
        why,
    };
    let version = VmmVersion::parse(&ping.version)
        .ok_or_else(|| unsupported("its version cannot be read".into()))?;
    if version < MIN_VMM_VERSION {
        return Err(unsupported(format!(
            "older releases ignore the disk fields image_type and backing_files of API spec \
             {API_SPEC_VERSION}, which the qcow2 overlay needs"
        )));
    }
    Ok(version)
}

/// The `vm.create` body: `vcpus` and memory from the spec, the kernel (the spec's unless
/// overridden), the qcow2 overlay over its base, hybrid vsock on the VM's own socket, the
/// serial console on the VMM's stdout (which [`crate::console`] reads).
pub(crate) fn vm_config(
    spec: &VmSpec,
    kernel: &Path,
    overlay: Option<&Path>,
) -> Result<VmConfig, VmmError> {
    let vcpus = i32::try_from(spec.vcpus)
        .map_err(|_| VmmError::InvalidSpec(format!("vcpus {} is too large", spec.vcpus)))?;
    let mut payload = PayloadConfig::new();
    payload.kernel = Some(path_text("kernel", kernel)?);
    payload.cmdline = Some(spec.cmdline.clone());
    payload.initramfs = spec
        .initrd
        .as_deref()
        .map(|p| path_text("initrd", p))
        .transpose()?;
    let mut config = VmConfig::new(payload);
    config.cpus = Some(CpusConfig::new(vcpus, vcpus));
    config.memory = Some(MemoryConfig::new(i64::from(spec.memory_mib) << 20));
    let disks = overlay
        .map(|overlay| {
            let mut disk = DiskConfig::new();
            disk.path = Some(path_text("overlay", overlay)?);
            // image_type explicitly: a VMM (v53) that has to detect the qcow2 itself turns
            // backing_files off in the config it keeps, so a restore of that config would
            // open the overlay without its base.
            disk.image_type = Some(ImageType::Qcow2);
            disk.backing_files = Some(true);
            Ok::<_, VmmError>(disk)
        })
        .transpose()?;
    config.disks = disks.map(|disk| vec![disk]);
    config.vsock = Some(VsockConfig::new(
        GUEST_CID,
        path_text("vsock socket", &spec.vsock_path())?,
    ));
    // The tap and MAC only: without ip/mask the VMM configures nothing on the host side,
    // so it needs no CAP_NET_ADMIN (the tap exists and belongs to the VMM user).
    config.net = spec.net.as_ref().map(|net| {
        let mut n = NetConfig::new();
        n.tap = Some(net.tap.clone());
        n.mac = Some(net.mac.clone());
        vec![n]
    });
    // Free page reporting: the guest hands pages it frees back to the host (as QEMU's
    // virtio-balloon-device does); the balloon itself stays empty (size 0).
    let mut balloon = BalloonConfig::new(0);
    balloon.free_page_reporting = Some(true);
    config.balloon = Some(balloon);
    config.serial = Some(SerialConfig::new(ConsoleMode::Tty));
    config.console = Some(ConsoleConfig::new(ConsoleMode::Off));
    Ok(config)
}

/// The `vm.snapshot` body: write the snapshot into the directory `dest`.
pub(crate) fn snapshot_config(dest: &Path) -> Result<VmSnapshotConfig, VmmError> {
    let mut config = VmSnapshotConfig::new();
    config.destination_url = Some(file_url("snapshot destination", dest)?);
    Ok(config)
}

/// The `vm.restore` body: restore from the directory `source` and run the VM at once.
pub(crate) fn restore_config(source: &Path) -> Result<RestoreConfig, VmmError> {
    let mut config = RestoreConfig::new(file_url("snapshot source", source)?);
    config.resume = Some(true);
    Ok(config)
}

/// `GET vm.counters`: per device (`_disk0`, `_net0`, ...), counter name → value. The spec
/// types the values as int64; Cloud Hypervisor counts in u64, which this keeps.
pub(crate) type Counters = HashMap<String, HashMap<String, u64>>;

/// Paths go to the VMM as JSON strings, so they must be UTF-8.
fn path_text(what: &str, path: &Path) -> Result<String, VmmError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| VmmError::InvalidSpec(format!("{what} path {path:?} is not UTF-8")))
}

fn file_url(what: &str, path: &Path) -> Result<String, VmmError> {
    Ok(format!("file://{}", path_text(what, path)?))
}

/// Every leaf of `sent` must be in `kept` with the same value; the error names the first
/// that is not, as a path (`disks[0].image_type`). Cloud Hypervisor drops the fields it
/// does not know, so this is how a VMM that ignored part of `vm.create` is caught.
pub(crate) fn check_kept(sent: &Value, kept: &Value) -> Result<(), String> {
    fn walk(path: &mut String, sent: &Value, kept: Option<&Value>) -> Result<(), String> {
        match (sent, kept) {
            (Value::Object(s), Some(Value::Object(k))) => {
                for (key, value) in s {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                    walk(path, value, k.get(key))?;
                    path.truncate(len);
                }
                Ok(())
            }
            (Value::Array(s), Some(Value::Array(k))) if s.len() == k.len() => {
                for (i, (value, kept)) in s.iter().zip(k).enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    walk(path, value, Some(kept))?;
                    path.truncate(len);
                }
                Ok(())
            }
            (s, Some(k)) if s == k => Ok(()),
            (s, Some(k)) => Err(format!("{path}: sent {s}, the vmm has {k}")),
            (s, None) => Err(format!("{path}: sent {s}, the vmm dropped it")),
        }
    }
    walk(&mut String::new(), sent, Some(kept))
}

/// A model value read from the VMM together with the JSON it was read from.
///
/// [`Preserved::to_json`] writes the original JSON with the typed value laid over it: the
/// fields the model knows come from [`Preserved::typed`] (so edits there are written), every
/// other field, at any depth, is written back as the VMM wrote it. Fields can be changed or
/// added through `typed`, not removed (an absent `Option` keeps the original).
#[derive(Debug, Clone)]
pub(crate) struct Preserved<T> {
    pub typed: T,
    raw: Value,
}

impl<T: Serialize + DeserializeOwned> Preserved<T> {
    pub fn from_json(raw: Value) -> Result<Preserved<T>, serde_json::Error> {
        Ok(Preserved {
            typed: T::deserialize(&raw)?,
            raw,
        })
    }

    pub fn to_json(&self) -> Value {
        let mut out = self.raw.clone();
        overlay(
            &mut out,
            serde_json::to_value(&self.typed).expect("a model serialises"),
        );
        out
    }
}

impl<'de, T: Serialize + DeserializeOwned> Deserialize<'de> for Preserved<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Preserved::from_json(Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl<T: Serialize + DeserializeOwned> Serialize for Preserved<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

/// Lays `typed` over `raw`: objects merge key by key, arrays element by element (taking
/// `typed`'s length), anything else is replaced.
fn overlay(raw: &mut Value, typed: Value) {
    match (raw, typed) {
        (Value::Object(raw), Value::Object(typed)) => {
            for (key, value) in typed {
                match raw.get_mut(&key) {
                    Some(slot) => overlay(slot, value),
                    None => {
                        raw.insert(key, value);
                    }
                }
            }
        }
        (Value::Array(raw), Value::Array(typed)) => {
            raw.truncate(typed.len());
            for (i, value) in typed.into_iter().enumerate() {
                match raw.get_mut(i) {
                    Some(slot) => overlay(slot, value),
                    None => raw.push(value),
                }
            }
        }
        (raw, typed) => *raw = typed,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use cloud_hypervisor_client::models::VmInfo;
    use serde_json::json;

    /// `body` read into the model `M` and written back is `body` again: the model knows
    /// every field, with these types (the crate's models accept and drop unknown fields, so
    /// deserialising alone would prove nothing).
    pub(crate) fn assert_is_model<M: Serialize + DeserializeOwned>(body: &Value) {
        let model: M = serde_json::from_value(body.clone())
            .unwrap_or_else(|e| panic!("{body} is not a {}: {e}", std::any::type_name::<M>()));
        assert_eq!(
            &serde_json::to_value(&model).unwrap(),
            body,
            "{} drops or changes part of the body",
            std::any::type_name::<M>()
        );
    }

    fn spec(initrd: Option<&str>) -> VmSpec {
        VmSpec {
            id: "vm-c1".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: "/img/vmlinux".into(),
            cmdline: "console=ttyS0 root=/dev/vda".into(),
            rootfs_base: None,
            initrd: initrd.map(Into::into),
            dir: "/state/vms/vm-c1".into(),
            net: None,
        }
    }

    #[test]
    fn vm_create_body_is_the_openapi_vm_config() {
        let s = spec(None);
        let body = serde_json::to_value(
            vm_config(
                &s,
                Path::new("/pvm/vmlinux"),
                Some(Path::new("/state/vms/vm-c1/overlay.qcow2")),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            body,
            json!({
                "balloon": {"size": 0, "free_page_reporting": true},
                "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
                "memory": {"size": 512u64 << 20},
                "payload": {"kernel": "/pvm/vmlinux", "cmdline": "console=ttyS0 root=/dev/vda"},
                "disks": [{
                    "path": "/state/vms/vm-c1/overlay.qcow2",
                    "image_type": "Qcow2",
                    "backing_files": true,
                }],
                "vsock": {"cid": 3, "socket": "/state/vms/vm-c1/vsock.sock"},
                "serial": {"mode": "Tty"},
                "console": {"mode": "Off"},
            })
        );
        assert_is_model::<VmConfig>(&body);
    }

    #[test]
    fn vm_create_without_a_disk_and_with_an_initramfs() {
        let s = spec(Some("/img/initrd.cpio"));
        let body = serde_json::to_value(vm_config(&s, &s.kernel, None).unwrap()).unwrap();
        assert_eq!(body["payload"]["initramfs"], "/img/initrd.cpio");
        assert!(body.get("disks").is_none(), "{body}");
        assert_is_model::<VmConfig>(&body);
    }

    #[test]
    fn paths_that_are_not_utf8_are_refused_not_mangled() {
        use std::os::unix::ffi::OsStrExt as _;
        let mut s = spec(None);
        s.kernel = std::ffi::OsStr::from_bytes(b"/img/\xffvmlinux").into();
        let err = vm_config(&s, &s.kernel, None).unwrap_err().to_string();
        assert!(
            err.contains("kernel path") && err.contains("UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn snapshot_and_restore_bodies_are_the_openapi_shapes() {
        let snap = snapshot_config(Path::new("/state/snap")).unwrap();
        let snap = serde_json::to_value(snap).unwrap();
        assert_eq!(snap, json!({"destination_url": "file:///state/snap"}));
        assert_is_model::<VmSnapshotConfig>(&snap);
        let restore = restore_config(Path::new("/s/vms/vm-b/snapshot")).unwrap();
        let restore = serde_json::to_value(restore).unwrap();
        assert_eq!(
            restore,
            json!({"source_url": "file:///s/vms/vm-b/snapshot", "resume": true})
        );
        assert_is_model::<RestoreConfig>(&restore);
    }

    #[test]
    fn versions_parse_from_every_form_vmm_ping_has_used() {
        let v = |major, minor| Some(VmmVersion { major, minor });
        assert_eq!(VmmVersion::parse("53.0.0"), v(53, 0));
        assert_eq!(VmmVersion::parse("v51.1"), v(51, 1));
        assert_eq!(VmmVersion::parse("v53.0-246-gae44c2971-dirty"), v(53, 0));
        assert_eq!(VmmVersion::parse("60"), v(60, 0));
        assert_eq!(VmmVersion::parse("main"), None);
        assert_eq!(VmmVersion::parse(""), None);
        assert!(VmmVersion::parse("50.9.0") < Some(MIN_VMM_VERSION));
        assert_eq!(MIN_VMM_VERSION.to_string(), "v51.0");
    }

    #[test]
    fn ping_check_refuses_a_vmm_too_old_for_the_fields_we_send() {
        let ping = |reply: Value| {
            let ping: VmmPingResponse = serde_json::from_value(reply).unwrap();
            check_ping(&ping)
        };
        let ok = ping(
            json!({"build_version": "v53.0", "version": "53.0.0", "pid": 7,
                             "features": ["kvm", "io_uring"]}),
        );
        assert_eq!(
            ok.unwrap(),
            VmmVersion {
                major: 53,
                minor: 0
            }
        );
        assert!(ping(json!({"version": "51.0.0"})).is_ok());

        let old = ping(json!({"build_version": "v50.2", "version": "50.2.0"}));
        let err = old.unwrap_err().to_string();
        assert!(
            err.contains("50.2.0 (build v50.2)")
                && err.contains("v51.0 or later")
                && err.contains("image_type"),
            "{err}"
        );
        let err = ping(json!({"version": "dev"})).unwrap_err().to_string();
        assert!(
            err.contains("dev") && err.contains("cannot be read"),
            "{err}"
        );
    }

    #[test]
    fn kept_config_must_hold_every_field_sent() {
        let sent =
            json!({"disks": [{"path": "/o", "image_type": "Qcow2"}], "cpus": {"boot_vcpus": 1}});
        let kept = json!({
            "disks": [{"path": "/o", "image_type": "Qcow2", "id": "_disk0", "readonly": false}],
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "rng": {"src": "/dev/urandom"},
        });
        check_kept(&sent, &kept).unwrap();

        let changed =
            json!({"disks": [{"path": "/o", "image_type": "Raw"}], "cpus": {"boot_vcpus": 1}});
        assert_eq!(
            check_kept(&sent, &changed).unwrap_err(),
            r#"disks[0].image_type: sent "Qcow2", the vmm has "Raw""#
        );
        let dropped = json!({"disks": [{"path": "/o"}], "cpus": {"boot_vcpus": 1}});
        assert_eq!(
            check_kept(&sent, &dropped).unwrap_err(),
            r#"disks[0].image_type: sent "Qcow2", the vmm dropped it"#
        );
        let fewer = json!({"disks": [], "cpus": {"boot_vcpus": 1}});
        assert!(
            check_kept(&sent, &fewer)
                .unwrap_err()
                .starts_with("disks: ")
        );
    }

    #[test]
    fn preserved_config_writes_back_what_the_model_does_not_know() {
        let written = json!({
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "future_cpu_knob": [1, 2]},
            "memory": {"size": 536870912, "hotplug_method": "Acpi"},
            "payload": {"kernel": "/img/vmlinux", "cmdline": "x", "fw_cfg_config": null},
            "disks": [{"path": "/old/overlay.qcow2", "backing_files": true,
                       "image_type": "Qcow2", "queue_affinity": null, "future_disk_knob": 9}],
            "vsock": {"cid": 3, "socket": "/old/vsock.sock", "iommu": false, "pci_segment": 0},
            "serial": {"mode": "Tty", "file": null},
            "future_section": {"a": {"b": true}},
            "preserved_fds": null,
        });
        let mut config: Preserved<VmConfig> = serde_json::from_value(written.clone()).unwrap();
        assert_eq!(
            config.to_json(),
            written,
            "unchanged, it writes what it read"
        );

        let disks = config.typed.disks.as_mut().unwrap();
        disks[0].path = Some("/new/overlay.qcow2".into());
        config.typed.vsock.as_mut().unwrap().socket = "/new/vsock.sock".into();
        let out = serde_json::to_value(&config).unwrap();
        let mut expected = written;
        expected["disks"][0]["path"] = json!("/new/overlay.qcow2");
        expected["vsock"]["socket"] = json!("/new/vsock.sock");
        assert_eq!(out, expected);
    }

    #[test]
    fn preserved_refuses_json_that_is_not_the_model() {
        let err = serde_json::from_value::<Preserved<VmConfig>>(json!({"cpus": {}}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("payload") || err.contains("boot_vcpus"),
            "{err}"
        );
        let info: Preserved<VmInfo> = serde_json::from_value(json!({
            "config": {"payload": {"kernel": "/k"}},
            "state": "Created",
            "memory_actual_size": 1,
        }))
        .unwrap();
        assert_eq!(
            info.typed.state,
            cloud_hypervisor_client::models::VmState::Created
        );
    }

    /// `vm.info` as a real cloud-hypervisor v53.0 answered it after our `vm.create` (paths
    /// renamed). Its config is what the same VMM writes as a snapshot's `config.json`.
    const V53_VM_INFO: &str = include_str!("../testdata/cloud-hypervisor-v53.0-vm-info.json");

    #[test]
    fn a_real_v53_config_reads_as_the_model_and_keeps_what_the_model_lacks() {
        let raw: Value = serde_json::from_str(V53_VM_INFO).unwrap();
        // The model alone loses fields v53 writes (cpus.profile, memory.reserve,
        // disks[].disable_io_uring, ...): what Preserved is for.
        let model_only = serde_json::to_value(VmInfo::deserialize(&raw).unwrap()).unwrap();
        assert!(check_kept(&raw, &model_only).is_err());

        let mut info: Preserved<VmInfo> = serde_json::from_value(raw.clone()).unwrap();
        assert_eq!(info.to_json(), raw);
        let disks = info.typed.config.disks.as_mut().unwrap();
        disks[0].path = Some("/state/vms/vm-b/overlay.qcow2".into());
        let out = info.to_json();
        assert_eq!(
            out["config"]["disks"][0]["path"],
            "/state/vms/vm-b/overlay.qcow2"
        );
        assert_eq!(out["config"]["disks"][0]["disable_io_uring"], false);
        assert_eq!(out["config"]["cpus"]["profile"], "Host");

        // And the body we sent is all there (what the driver checks after vm.create).
        let spec = VmSpec {
            id: "vm-a".into(),
            vcpus: 1,
            memory_mib: 256,
            kernel: "/state/vms/vm-a/vmlinux".into(),
            cmdline: "console=ttyS0".into(),
            rootfs_base: None,
            initrd: None,
            dir: "/state/vms/vm-a".into(),
            net: None,
        };
        let sent = vm_config(
            &spec,
            &spec.kernel,
            Some(Path::new("/state/vms/vm-a/overlay.qcow2")),
        )
        .unwrap();
        // The capture predates the balloon: v53 keeps it as its BalloonConfig serializes
        // (every field, defaults included).
        let mut kept = raw["config"].clone();
        kept["balloon"] = json!({"size": 0, "deflate_on_oom": false, "free_page_reporting": true});
        check_kept(&serde_json::to_value(sent).unwrap(), &kept).unwrap();
    }

    #[test]
    fn counters_keep_u64_values() {
        let reply = json!({"_disk0": {"read_bytes": u64::MAX, "write_ops": 1}});
        let counters: Counters = serde_json::from_value(reply).unwrap();
        assert_eq!(counters["_disk0"]["read_bytes"], u64::MAX);
    }
}
