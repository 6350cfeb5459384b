//! Which node a new session goes to: among the live nodes that offer its template and have
//! room for its VM (guest memory plus the node's VMM overhead, vCPUs, a VM slot), the one
//! left least full in its fullest resource (the most free memory or vCPUs as a share of
//! the node's, whichever is scarcer after this VM), ties to the most free memory, then
//! the node id. Capacity is what each node's heartbeat announced (see
//! `capsa_store::NodeResources`), so nodes of different sizes and sessions of different
//! shapes are weighed by what they take, not counted as VMs. A node too old to announce
//! its resources is weighed by its free VM slots.
//!
//! The announcements are at most a heartbeat old (a node announces a lease within 100 ms):
//! creates issued together, before any of their leases is announced, may land on one
//! node; the node's own admission check still refuses a VM that does not fit.

use capsa_store::NodeRecord;

use crate::error::Error;

/// The VM a create asks for; 0 takes the template's own.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub template: &'a str,
    pub vcpus: u32,
    pub memory_mib: u32,
}

/// The node for a session wanting `wanted`, among `nodes` (which all offer its template);
/// RESOURCE_EXHAUSTED when none has room.
pub fn place(nodes: Vec<NodeRecord>, wanted: Wanted<'_>) -> Result<NodeRecord, Error> {
    let count = nodes.len();
    nodes
        .into_iter()
        .filter_map(|node| score(&node, wanted).map(|score| (score, node)))
        .max_by(|(a, na), (b, nb)| {
            a.share
                .total_cmp(&b.share)
                .then(a.free_memory_mib.cmp(&b.free_memory_mib))
                .then(nb.node_id.cmp(&na.node_id))
        })
        .map(|(_, node)| node)
        .ok_or_else(|| {
            Error::ResourceExhausted(format!(
                "no node has room for a session of {} ({count} nodes offer template {:?}, none with room)",
                describe(wanted),
                wanted.template
            ))
        })
}

/// How free `node` stays after taking `wanted`; `None` if it does not fit.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Score {
    /// Free share (0 to 1) of the scarcer resource once the VM is placed.
    share: f64,
    free_memory_mib: u64,
}

fn score(node: &NodeRecord, wanted: Wanted<'_>) -> Option<Score> {
    let Some(res) = &node.resources else {
        // An older node: its free VM slots of its default shape are all it tells.
        return (node.free() > 0).then(|| Score {
            share: f64::from(node.free()) / f64::from(node.capacity.max(1)),
            free_memory_mib: 0,
        });
    };
    let shape = res.shapes.get(wanted.template);
    let vcpus = match wanted.vcpus {
        0 => shape?.vcpus,
        v => v,
    };
    let memory = match wanted.memory_mib {
        0 => shape?.memory_mib,
        m => m,
    };
    let memory = u64::from(memory) + u64::from(res.vm_overhead_mib);
    if res.free_vms == 0 || memory > res.free_memory_mib || vcpus > res.free_vcpus {
        return None;
    }
    let share = |free: u64, total: u64| free as f64 / total.max(1) as f64;
    let memory_share = share(res.free_memory_mib - memory, res.memory_mib);
    let vcpu_share = share(u64::from(res.free_vcpus - vcpus), u64::from(res.vcpus));
    Some(Score {
        share: memory_share.min(vcpu_share),
        free_memory_mib: res.free_memory_mib - memory,
    })
}

fn describe(wanted: Wanted<'_>) -> String {
    let vcpus = match wanted.vcpus {
        0 => "the template's vcpus".to_string(),
        v => format!("{v} vcpus"),
    };
    let memory = match wanted.memory_mib {
        0 => "the template's memory".to_string(),
        m => format!("{m} MiB"),
    };
    format!("{vcpus} and {memory}")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use capsa_store::{NodeResources, VmSize};

    use super::*;

    const OVERHEAD: u32 = 320;

    /// A node of `memory_mib` and `vcpus` already running VMs of the given (vcpus, MiB).
    fn node(id: &str, memory_mib: u64, vcpus: u32, running: &[(u32, u32)]) -> NodeRecord {
        let used_memory: u64 = running
            .iter()
            .map(|(_, m)| u64::from(*m) + u64::from(OVERHEAD))
            .sum();
        let used_vcpus: u32 = running.iter().map(|(v, _)| v).sum();
        NodeRecord {
            node_id: id.into(),
            vmpool_url: format!("http://{id}:1"),
            executor_url: format!("http://{id}:2"),
            engine: "qemu-tcg".into(),
            // What older nodes count: VMs of the default shape. Placement must not use it.
            capacity: 16,
            leased: running.len() as u32,
            warm: 1,
            templates: vec!["default".into()],
            resources: Some(NodeResources {
                memory_mib,
                vcpus,
                free_memory_mib: memory_mib - used_memory,
                free_vcpus: vcpus - used_vcpus,
                free_vms: 16 - running.len() as u32,
                vm_overhead_mib: OVERHEAD,
                shapes: BTreeMap::from([(
                    "default".to_string(),
                    VmSize {
                        vcpus: 1,
                        memory_mib: 512,
                    },
                )]),
            }),
            heartbeat_ms: 1,
        }
    }

    fn want(vcpus: u32, memory_mib: u32) -> Wanted<'static> {
        Wanted {
            template: "default",
            vcpus,
            memory_mib,
        }
    }

    fn placed(nodes: &[NodeRecord], wanted: Wanted<'_>) -> String {
        place(nodes.to_vec(), wanted).unwrap().node_id
    }

    #[test]
    fn weighs_memory_not_vm_counts() {
        // a runs one 4 GiB VM, b three small ones: by VM count a is emptier, by memory b.
        let nodes = [
            node("a", 8192, 16, &[(2, 4096)]),
            node("b", 8192, 16, &[(1, 512), (1, 512), (1, 512)]),
        ];
        assert_eq!(placed(&nodes, want(0, 0)), "b");
        assert_eq!(placed(&nodes, want(1, 2048)), "b");
    }

    #[test]
    fn weighs_vcpus_when_they_are_scarcer() {
        // Both have memory to spare; a has 1 of 8 vcpus left, b 5.
        let nodes = [
            node("a", 16384, 8, &[(7, 512)]),
            node("b", 16384, 8, &[(1, 512), (1, 512), (1, 512)]),
        ];
        assert_eq!(placed(&nodes, want(1, 512)), "b");
    }

    #[test]
    fn compares_shares_so_a_bigger_node_takes_more() {
        // a (32 GiB) has 24 GiB free, b (8 GiB) has 6 GiB free: both 3/4 free; a keeps
        // the larger share after a 2 GiB VM.
        let nodes = [
            node("a", 32768, 32, &[(4, 8192 - OVERHEAD)]),
            node("b", 8192, 8, &[(1, 2048 - OVERHEAD)]),
        ];
        assert_eq!(placed(&nodes, want(1, 2048 - OVERHEAD)), "a");
    }

    #[test]
    fn skips_nodes_the_vm_does_not_fit() {
        // b is emptier by share but has only 2 GiB free: a 3 GiB VM goes to a.
        let nodes = [
            node("a", 16384, 16, &[(1, 8192)]),
            node("b", 4096, 16, &[(1, 2048 - OVERHEAD)]),
        ];
        assert_eq!(placed(&nodes, want(1, 3072)), "a");
        // Counting the overhead: exactly b's free memory fits, a MiB more does not.
        let b = [node("b", 4096, 16, &[(1, 2048 - OVERHEAD)])];
        assert_eq!(placed(&b, want(1, 2048 - OVERHEAD)), "b");
        let err = place(b.to_vec(), want(1, 2048 - OVERHEAD + 1)).unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err:?}");
        assert!(err.to_string().contains("1 vcpus and 1729 MiB"), "{err}");
    }

    #[test]
    fn spreads_equal_nodes_and_breaks_ties_by_id() {
        let mut nodes = vec![
            node("c", 4096, 4, &[]),
            node("a", 4096, 4, &[]),
            node("b", 4096, 4, &[]),
        ];
        let mut order = Vec::new();
        for _ in 0..3 {
            let id = placed(&nodes, want(0, 0));
            let n = nodes.iter_mut().find(|n| n.node_id == id).unwrap();
            let res = n.resources.as_mut().unwrap();
            res.free_memory_mib -= 512 + u64::from(OVERHEAD);
            res.free_vcpus -= 1;
            order.push(id);
        }
        assert_eq!(order, ["a", "b", "c"]);
    }

    #[test]
    fn a_full_node_is_skipped_by_vm_slots_too() {
        let mut a = node("a", 65536, 64, &[]);
        a.resources.as_mut().unwrap().free_vms = 0;
        let b = node("b", 4096, 4, &[(1, 512)]);
        assert_eq!(placed(&[a.clone(), b], want(0, 0)), "b");
        assert!(place(vec![a], want(0, 0)).is_err());
    }

    #[test]
    fn older_nodes_are_weighed_by_free_slots() {
        let mut a = node("a", 0, 0, &[]);
        a.resources = None;
        a.leased = 12;
        let mut b = a.clone();
        b.node_id = "b".into();
        b.leased = 4;
        assert_eq!(placed(&[a.clone(), b], want(2, 2048)), "b");
        a.leased = 16;
        assert!(place(vec![a], want(0, 0)).is_err());
    }
}
