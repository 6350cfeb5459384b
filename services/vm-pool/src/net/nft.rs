//! The nftables rulesets, as JSON for `nft -j -f -` (one transaction per document).
//!
//! In the host's namespace, one table named after vm-pool's namespace ([`host_table`]).
//! Inside the namespace, the table [`NS_TABLE`] ([`ns_base`]) and, per VM of slot `k`
//! (tap `vmtap<k>`), these objects:
//! - chain `vm<k>`, jumped to from the forward chain for packets from the tap (the verdict
//!   map `vms`), evaluating every outgoing packet, so a policy change cuts open connections;
//!   its rules ([`vm_policy`]): ports the policy closes, the VM and link subnets (always
//!   denied), CIDRs inside reserved ranges, the reserved ranges (denied), the other CIDRs,
//!   then `dns<k>`, then `deny<k>`;
//! - set `dns<k>` (`flags timeout`): addresses the DNS forwarder answered for allowed names;
//! - chain `deny<k>`: records the destination in set `denied<k>` (address . port, for a
//!   minute; vm-pool polls and logs it), counts into counter `denied<k>`, and rejects
//!   (TCP reset, else ICMP admin-prohibited) so the guest fails at once.

use std::net::Ipv4Addr;
use std::time::Duration;

use capsa_egress::EgressPolicy;
use serde_json::{Value, json};

use super::addr::Ipv4Net;

/// The table inside vm-pool's namespace.
pub const NS_TABLE: &str = "capsa";
/// The namespace's end of the veth.
pub const UPLINK: &str = "uplink";
/// VM taps are `vmtap<slot>`.
pub const TAP_PREFIX: &str = "vmtap";
/// How long a denied destination stays in `denied<k>` (it is logged once per stay).
pub const DENIED_MEMORY: Duration = Duration::from_secs(60);

pub fn tap_name(k: u32) -> String {
    format!("{TAP_PREFIX}{k}")
}

fn doc(cmds: Vec<Value>) -> Value {
    json!({ "nftables": cmds })
}

fn meta(key: &str) -> Value {
    json!({ "meta": { "key": key } })
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({ "payload": { "protocol": protocol, "field": field } })
}

fn eq(left: Value, right: Value) -> Value {
    json!({ "match": { "op": "==", "left": left, "right": right } })
}

fn ct_replies() -> Value {
    json!({ "match": { "op": "in", "left": { "ct": { "key": "state" } }, "right": ["established", "related"] } })
}

fn accept() -> Value {
    json!({ "accept": null })
}

fn goto(chain: &str) -> Value {
    json!({ "goto": { "target": chain } })
}

fn prefix(net: &Ipv4Net) -> Value {
    if net.prefix == 32 {
        json!(net.addr.to_string())
    } else {
        json!({ "prefix": { "addr": net.addr.to_string(), "len": net.prefix } })
    }
}

/// An anonymous set of networks, nested ones dropped (nft refuses overlapping intervals).
fn net_set(nets: &[Ipv4Net]) -> Value {
    let kept: Vec<&Ipv4Net> = nets
        .iter()
        .enumerate()
        .filter(|(i, n)| {
            !nets.iter().enumerate().any(|(j, m)| {
                j != *i
                    && m.overlaps(n)
                    && (m.prefix < n.prefix || (m.prefix == n.prefix && j < *i))
            })
        })
        .map(|(_, n)| n)
        .collect();
    json!({ "set": kept.into_iter().map(prefix).collect::<Vec<_>>() })
}

/// TCP reset for TCP, ICMP admin-prohibited for the rest: the guest fails at once.
fn reject_rules(family: &str, table: &str, chain: &str, before: Vec<Value>) -> Vec<Value> {
    let mut tcp = before.clone();
    tcp.extend([
        eq(meta("l4proto"), json!("tcp")),
        json!({ "reject": { "type": "tcp reset" } }),
    ]);
    let mut other = before;
    other.push(json!({ "reject": { "type": "icmpx", "expr": "admin-prohibited" } }));
    vec![
        rule(family, table, chain, tcp),
        rule(family, table, chain, other),
    ]
}

fn rule(family: &str, table: &str, chain: &str, expr: Vec<Value>) -> Value {
    json!({ "add": { "rule": { "family": family, "table": table, "chain": chain, "expr": expr } } })
}

fn base_chain(
    family: &str,
    table: &str,
    name: &str,
    kind: &str,
    hook: &str,
    prio: i32,
    policy: &str,
) -> Value {
    json!({ "add": { "chain": {
        "family": family, "table": table, "name": name,
        "type": kind, "hook": hook, "prio": prio, "policy": policy
    } } })
}

/// vm-pool's table in the host's namespace: masquerade what comes from the namespace's
/// address and leaves by another interface; forward for the veth (new from it, replies
/// back to it, nothing else to it); and no packet from the veth reaches the host itself
/// (Redis, Capsa's services, anything listening): rejected, so a guest fails fast.
pub fn host_table(table: &str, host_veth: &str, ns_addr: Ipv4Addr) -> Value {
    let f = "inet";
    let iif = || eq(meta("iifname"), json!(host_veth));
    let oif = || eq(meta("oifname"), json!(host_veth));
    let mut cmds = vec![
        json!({ "add": { "table": { "family": f, "name": table } } }),
        base_chain(f, table, "postrouting", "nat", "postrouting", 100, "accept"),
        rule(
            f,
            table,
            "postrouting",
            vec![
                eq(payload("ip", "saddr"), json!(ns_addr.to_string())),
                json!({ "match": { "op": "!=", "left": meta("oifname"), "right": host_veth } }),
                json!({ "masquerade": null }),
            ],
        ),
        base_chain(f, table, "forward", "filter", "forward", 0, "accept"),
        rule(f, table, "forward", vec![iif(), accept()]),
        rule(f, table, "forward", vec![oif(), ct_replies(), accept()]),
        rule(f, table, "forward", vec![oif(), json!({ "drop": null })]),
        base_chain(f, table, "input", "filter", "input", 0, "accept"),
    ];
    cmds.extend(reject_rules(f, table, "input", vec![iif()]));
    doc(cmds)
}

/// The namespace's table: NAT to the uplink, the forward chain (policy drop; replies to
/// VMs accepted; each tap's packets to its VM's chain), and the input chain (from taps
/// only DNS to the forwarder; from the uplink only replies).
pub fn ns_base() -> Value {
    let (f, t) = ("inet", NS_TABLE);
    let taps = || eq(meta("iifname"), json!(format!("{TAP_PREFIX}*")));
    let uplink = || eq(meta("iifname"), json!(UPLINK));
    let mut cmds = vec![
        json!({ "add": { "table": { "family": f, "name": t } } }),
        base_chain(f, t, "postrouting", "nat", "postrouting", 100, "accept"),
        rule(
            f,
            t,
            "postrouting",
            vec![
                eq(meta("oifname"), json!(UPLINK)),
                json!({ "masquerade": null }),
            ],
        ),
        json!({ "add": { "map": { "family": f, "table": t, "name": "vms", "type": "ifname", "map": "verdict" } } }),
        base_chain(f, t, "forward", "filter", "forward", 0, "drop"),
        rule(f, t, "forward", vec![uplink(), ct_replies(), accept()]),
        rule(
            f,
            t,
            "forward",
            vec![json!({ "vmap": { "key": meta("iifname"), "data": "@vms" } })],
        ),
        base_chain(f, t, "input", "filter", "input", 0, "accept"),
        rule(
            f,
            t,
            "input",
            vec![
                taps(),
                eq(meta("l4proto"), json!({ "set": ["udp", "tcp"] })),
                eq(payload("th", "dport"), json!(53)),
                accept(),
            ],
        ),
        rule(f, t, "input", vec![uplink(), ct_replies(), accept()]),
        rule(f, t, "input", vec![uplink(), json!({ "drop": null })]),
    ];
    cmds.extend(reject_rules(f, t, "input", vec![taps()]));
    doc(cmds)
}

/// A new VM's objects, with deny-all in force (a warm VM's state until it is leased).
pub fn vm_add(k: u32) -> Value {
    let (f, t) = ("inet", NS_TABLE);
    let (vm, deny, dns, denied) = (
        format!("vm{k}"),
        format!("deny{k}"),
        format!("dns{k}"),
        format!("denied{k}"),
    );
    let mut cmds = vec![
        json!({ "add": { "set": { "family": f, "table": t, "name": dns, "type": "ipv4_addr", "flags": ["timeout"] } } }),
        json!({ "add": { "set": {
            "family": f, "table": t, "name": denied, "type": ["ipv4_addr", "inet_service"],
            "flags": ["timeout"], "timeout": DENIED_MEMORY.as_secs(), "size": 1024
        } } }),
        json!({ "add": { "counter": { "family": f, "table": t, "name": denied } } }),
        json!({ "add": { "chain": { "family": f, "table": t, "name": deny } } }),
        json!({ "add": { "chain": { "family": f, "table": t, "name": vm } } }),
        rule(
            f,
            t,
            &deny,
            vec![
                eq(meta("l4proto"), json!({ "set": ["udp", "tcp"] })),
                json!({ "set": { "op": "add", "set": format!("@{denied}"), "elem": {
                "concat": [payload("ip", "daddr"), payload("th", "dport")]
            } } }),
            ],
        ),
    ];
    cmds.extend(reject_rules(
        f,
        t,
        &deny,
        vec![json!({ "counter": denied })],
    ));
    cmds.push(rule(f, t, &vm, vec![goto(&deny)]));
    cmds.push(json!({ "add": { "element": {
        "family": f, "table": t, "name": "vms",
        "elem": [[tap_name(k), { "jump": { "target": vm } }]]
    } } }));
    doc(cmds)
}

/// Replaces VM `k`'s policy in one transaction: its chain is rewritten and its DNS-admitted
/// addresses are forgotten (names the new policy allows are admitted again at the guest's
/// next lookup). `internal` (the VM and link subnets) is never reachable, whatever the
/// policy; `reserved` only through a CIDR inside it ([`EgressPolicy::names_reserved`]).
pub fn vm_policy(
    k: u32,
    policy: &EgressPolicy,
    internal: &[Ipv4Net],
    reserved: &[Ipv4Net],
) -> Value {
    let (f, t) = ("inet", NS_TABLE);
    let (vm, deny, dns) = (format!("vm{k}"), format!("deny{k}"), format!("dns{k}"));
    let mut cmds = vec![
        json!({ "flush": { "chain": { "family": f, "table": t, "name": vm } } }),
        json!({ "flush": { "set": { "family": f, "table": t, "name": dns } } }),
    ];
    let daddr_in = |nets: &[Ipv4Net], verdict: Value| {
        rule(
            f,
            t,
            &vm,
            vec![eq(payload("ip", "daddr"), net_set(nets)), verdict],
        )
    };
    for port in [80u16, 443] {
        if !policy.allows_tcp_port(port) {
            cmds.push(rule(
                f,
                t,
                &vm,
                vec![eq(payload("tcp", "dport"), json!(port)), goto(&deny)],
            ));
        }
    }
    if !internal.is_empty() {
        cmds.push(daddr_in(internal, goto(&deny)));
    }
    // VMs have no IPv6 address: an IPv6 CIDR admits nothing.
    let (named_reserved, public): (Vec<_>, Vec<_>) = policy
        .admitted_cidrs()
        .iter()
        .filter_map(|c| match c.addr {
            std::net::IpAddr::V4(a) => {
                Some((Ipv4Net::containing(a, c.prefix), c.within_reserved()))
            }
            std::net::IpAddr::V6(_) => None,
        })
        .partition(|(_, within_reserved)| *within_reserved);
    let named_reserved: Vec<Ipv4Net> = named_reserved.into_iter().map(|(n, _)| n).collect();
    let public: Vec<Ipv4Net> = public.into_iter().map(|(n, _)| n).collect();
    if !named_reserved.is_empty() {
        cmds.push(daddr_in(&named_reserved, accept()));
    }
    if !policy.deny_all {
        cmds.push(daddr_in(reserved, goto(&deny)));
    }
    if public.iter().any(|c| c.prefix == 0) {
        cmds.push(rule(
            f,
            t,
            &vm,
            vec![eq(meta("nfproto"), json!("ipv4")), accept()],
        ));
    } else if !public.is_empty() {
        cmds.push(daddr_in(&public, accept()));
    }
    if !policy.deny_all {
        cmds.push(rule(
            f,
            t,
            &vm,
            vec![
                eq(payload("ip", "daddr"), json!(format!("@{dns}"))),
                accept(),
            ],
        ));
    }
    cmds.push(rule(f, t, &vm, vec![goto(&deny)]));
    doc(cmds)
}

/// Admits `addrs` for VM `k` for `ttl` (an address already there gets the new timeout).
pub fn admit(k: u32, addrs: &[Ipv4Addr], ttl: Duration) -> Value {
    let (f, t, name) = ("inet", NS_TABLE, format!("dns{k}"));
    let ttl = ttl.as_secs().max(1);
    let with_ttl: Vec<Value> = addrs
        .iter()
        .map(|a| json!({ "elem": { "val": a.to_string(), "timeout": ttl } }))
        .collect();
    let bare: Vec<Value> = addrs.iter().map(|a| json!(a.to_string())).collect();
    // add (no-op if present), delete, add: the element ends with this timeout either way.
    doc(vec![
        json!({ "add": { "element": { "family": f, "table": t, "name": name, "elem": with_ttl } } }),
        json!({ "delete": { "element": { "family": f, "table": t, "name": name, "elem": bare } } }),
        json!({ "add": { "element": { "family": f, "table": t, "name": name, "elem": with_ttl } } }),
    ])
}

/// Removes VM `k`'s objects (the map entry first: it references the chain).
pub fn vm_remove(k: u32) -> Value {
    let (f, t) = ("inet", NS_TABLE);
    let (vm, deny) = (format!("vm{k}"), format!("deny{k}"));
    doc(vec![
        json!({ "delete": { "element": { "family": f, "table": t, "name": "vms", "elem": [tap_name(k)] } } }),
        json!({ "flush": { "chain": { "family": f, "table": t, "name": vm } } }),
        json!({ "delete": { "chain": { "family": f, "table": t, "name": vm } } }),
        json!({ "flush": { "chain": { "family": f, "table": t, "name": deny } } }),
        json!({ "delete": { "chain": { "family": f, "table": t, "name": deny } } }),
        json!({ "delete": { "set": { "family": f, "table": t, "name": format!("dns{k}") } } }),
        json!({ "delete": { "set": { "family": f, "table": t, "name": format!("denied{k}") } } }),
        json!({ "delete": { "counter": { "family": f, "table": t, "name": format!("denied{k}") } } }),
    ])
}

/// From `nft -j list table inet capsa`: per VM slot, its denial count and the denied
/// (address, port) pairs remembered now.
pub fn parse_denials(listing: &Value) -> std::collections::HashMap<u32, (u64, Vec<String>)> {
    let mut out: std::collections::HashMap<u32, (u64, Vec<String>)> = Default::default();
    let Some(items) = listing["nftables"].as_array() else {
        return out;
    };
    let slot = |name: &Value| name.as_str()?.strip_prefix("denied")?.parse::<u32>().ok();
    for item in items {
        if let Some(k) = slot(&item["counter"]["name"]) {
            out.entry(k).or_default().0 = item["counter"]["packets"].as_u64().unwrap_or(0);
        }
        if let Some(k) = slot(&item["set"]["name"]) {
            let dests = out.entry(k).or_default();
            for e in item["set"]["elem"].as_array().into_iter().flatten() {
                let v = if e["elem"].is_object() {
                    &e["elem"]["val"]
                } else {
                    e
                };
                if let [addr, port] = v["concat"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                    dests
                        .1
                        .push(format!("{}:{}", addr.as_str().unwrap_or("?"), port));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsa_egress::{EgressPolicy, PolicyInput};

    fn policy(cidrs: &[&str], http: bool) -> EgressPolicy {
        EgressPolicy::from_input(PolicyInput {
            allow_http: Some(http),
            allowed_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .unwrap()
    }

    fn rules(doc: &Value) -> Vec<String> {
        doc["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.get("add")?.get("rule"))
            .map(|r| r["expr"].to_string())
            .collect()
    }

    fn nets(list: &[&str]) -> Vec<Ipv4Net> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn internal() -> Vec<Ipv4Net> {
        nets(&["100.80.0.0/16", "100.127.0.0/16"])
    }

    fn reserved() -> Vec<Ipv4Net> {
        nets(&[
            "10.0.0.0/8",
            "100.64.0.0/10",
            "127.0.0.0/8",
            "169.254.0.0/16",
        ])
    }

    #[test]
    fn a_policy_is_ports_internal_named_reserved_reserved_cidrs_dns_deny() {
        let doc = vm_policy(
            3,
            &policy(
                &[
                    "198.18.5.0/24",
                    "203.0.113.7",
                    "2001:db8::/32",
                    "169.254.169.254",
                ],
                false,
            ),
            &internal(),
            &reserved(),
        );
        let cmds = doc["nftables"].as_array().unwrap();
        // One transaction that starts from scratch: the chain and the DNS admissions.
        assert_eq!(cmds[0]["flush"]["chain"]["name"], "vm3");
        assert_eq!(cmds[1]["flush"]["set"]["name"], "dns3");
        let r = rules(&doc);
        assert_eq!(r.len(), 7, "{r:#?}");
        assert!(
            r[0].contains(r#""field":"dport""#)
                && r[0].contains("80")
                && r[0].contains(r#""goto":{"target":"deny3"}"#),
            "{}",
            r[0]
        );
        assert!(
            r[1].contains("100.80.0.0") && r[1].contains("100.127.0.0") && r[1].contains("deny3"),
            "other VMs and the node come first, whatever the policy: {}",
            r[1]
        );
        assert!(
            r[2].contains("169.254.169.254") && r[2].contains("accept"),
            "a CIDR inside a reserved range names it: {}",
            r[2]
        );
        assert!(
            r[3].contains("169.254.0.0") && r[3].contains("deny3"),
            "{}",
            r[3]
        );
        assert!(
            r[4].contains(r#"{"prefix":{"addr":"198.18.5.0","len":24}}"#)
                && r[4].contains(r#""203.0.113.7""#)
                && r[4].contains("accept")
                && !r[4].contains("169.254"),
            "{}",
            r[4]
        );
        assert!(!r.concat().contains("2001:db8"), "VMs have no IPv6");
        assert!(
            r[5].contains("@dns3") && r[5].contains("accept"),
            "{}",
            r[5]
        );
        assert_eq!(r[6], r#"[{"goto":{"target":"deny3"}}]"#);
        // Both ports open, no CIDR: internal, reserved, dns, deny.
        let r = rules(&vm_policy(3, &policy(&[], true), &internal(), &reserved()));
        assert_eq!(r.len(), 4, "{r:#?}");
    }

    #[test]
    fn deny_all_and_the_warm_state_admit_nothing() {
        let r = rules(&vm_policy(
            1,
            &EgressPolicy::none(),
            &internal(),
            &reserved(),
        ));
        assert_eq!(r.last().unwrap(), r#"[{"goto":{"target":"deny1"}}]"#);
        assert!(r.iter().all(|r| !r.contains("accept")), "{r:#?}");
        let add = vm_add(1);
        let r = rules(&add);
        assert!(r.iter().any(|r| r.contains("@denied1")));
        assert!(
            r.iter().any(|r| r.contains("tcp reset"))
                && r.iter().any(|r| r.contains("admin-prohibited"))
        );
        assert_eq!(
            r.last().unwrap(),
            r#"[{"goto":{"target":"deny1"}}]"#,
            "a new VM's chain denies everything"
        );
        let text = add.to_string();
        assert!(
            text.contains(r#"["vmtap1",{"jump":{"target":"vm1"}}]"#),
            "{text}"
        );
    }

    #[test]
    fn an_all_addresses_cidr_needs_no_set() {
        let r = rules(&vm_policy(
            2,
            &policy(&["0.0.0.0/0"], true),
            &internal(),
            &reserved(),
        ));
        // "The internet": after the reserved ranges, which it does not name.
        assert!(
            r[1].contains("169.254.0.0") && r[1].contains("deny2"),
            "{r:#?}"
        );
        assert!(
            r[2].contains("nfproto") && r[2].contains("accept"),
            "{r:#?}"
        );
    }

    #[test]
    fn admit_refreshes_and_remove_undoes_add() {
        let a = admit(
            4,
            &["198.18.1.2".parse().unwrap()],
            Duration::from_millis(10),
        );
        let cmds = a["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 3);
        assert_eq!(
            cmds[2]["add"]["element"]["elem"][0]["elem"]["timeout"], 1,
            "at least a second"
        );
        let removed: Vec<String> = vm_remove(4)["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.get("delete"))
            .map(|d| d.to_string())
            .collect();
        for name in ["\"vm4\"", "\"deny4\"", "\"dns4\"", "\"denied4\""] {
            assert!(
                removed.iter().any(|d| d.contains(name)),
                "{name} not removed: {removed:#?}"
            );
        }
    }

    #[test]
    fn host_table_masquerades_forwards_and_shields_the_host() {
        let text = host_table("capsa-1", "cvh1", "100.127.0.2".parse().unwrap()).to_string();
        for want in [
            r#""masquerade":null"#,
            r#""right":"100.127.0.2""#,
            r#""hook":"input""#,
            r#""tcp reset""#,
            r#""right":["established","related"]"#,
        ] {
            assert!(text.contains(want), "missing {want} in {text}");
        }
    }

    #[test]
    fn denials_are_read_per_slot() {
        let listing = json!({ "nftables": [
            { "metainfo": {} },
            { "counter": { "name": "denied2", "packets": 7 } },
            { "set": { "name": "denied2", "elem": [ { "elem": { "val": { "concat": ["198.18.1.9", 80] }, "expires": 40 } } ] } },
            { "set": { "name": "dns2", "elem": ["1.2.3.4"] } },
            { "counter": { "name": "denied5", "packets": 0 } },
        ] });
        let d = parse_denials(&listing);
        assert_eq!(d[&2], (7, vec!["198.18.1.9:80".to_owned()]));
        assert_eq!(d[&5], (0, vec![]));
        assert_eq!(d.len(), 2);
    }
}
