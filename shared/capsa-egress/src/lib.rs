//! A session's egress policy: which destinations its VM may reach.
//!
//! One type, [`EgressPolicy`], shared by session-manager (which validates what a caller sends
//! and stores it) and vm-pool (which enforces it with nftables and its DNS forwarder).
//!
//! Semantics:
//! - `deny_all` admits nothing (DNS answers are refused too); it overrides every other field.
//! - A destination is admitted by an address in `allowed_cidrs`, or by an address that the
//!   node's DNS forwarder answered for a name in `allowed_domains` (or, with
//!   `allow_package_managers`, a name in [`package_manager_rules`]), for that record's TTL.
//! - `allow_http = false` takes TCP port 80 away from every admitted destination,
//!   `allow_https = false` takes 443; both default to true. Other ports follow the
//!   destination alone.
//! - Addresses in [`RESERVED_RANGES`] (private, loopback, link-local, metadata, multicast,
//!   ...) are denied unless an `allowed_cidrs` entry inside that range names them
//!   (`169.254.169.254/32` or `10.0.0.0/8` do; `0.0.0.0/0` does not), even when a name in
//!   `allowed_domains` resolves to one (DNS rebinding).
//! - A policy with no destination admits nothing: the default for a session nobody gave a
//!   policy is [`EgressPolicy::none`].

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// Most entries in `allowed_domains`.
pub const MAX_DOMAINS: usize = 64;
/// Most entries in `allowed_cidrs`.
pub const MAX_CIDRS: usize = 64;
/// Longest domain name (RFC 1035).
pub const MAX_NAME_LEN: usize = 253;

/// What a caller asked for, before validation (the shape of the public message).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyInput {
    pub deny_all: bool,
    pub allow_package_managers: bool,
    /// None: the default (true).
    pub allow_http: Option<bool>,
    /// None: the default (true).
    pub allow_https: Option<bool>,
    pub allowed_domains: Vec<String>,
    pub allowed_cidrs: Vec<String>,
}

/// A validated egress policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressPolicy {
    pub deny_all: bool,
    pub allow_package_managers: bool,
    pub allow_http: bool,
    pub allow_https: bool,
    pub allowed_domains: Vec<DomainRule>,
    pub allowed_cidrs: Vec<Cidr>,
}

/// A field of the input that is not valid. `field` is the path a client can act on, relative
/// to the policy message (`allowed_domains[2]`); the caller prefixes its own field name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {message}")]
pub struct PolicyError {
    pub field: String,
    pub message: String,
}

impl PolicyError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> PolicyError {
        PolicyError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl EgressPolicy {
    /// No egress at all.
    pub fn none() -> EgressPolicy {
        EgressPolicy {
            deny_all: true,
            allow_package_managers: false,
            allow_http: true,
            allow_https: true,
            allowed_domains: Vec::new(),
            allowed_cidrs: Vec::new(),
        }
    }

    /// Validates what a caller sent. Duplicates are removed; order is kept.
    pub fn from_input(input: PolicyInput) -> Result<EgressPolicy, PolicyError> {
        if input.allowed_domains.len() > MAX_DOMAINS {
            return Err(PolicyError::new(
                "allowed_domains",
                format!(
                    "{} entries; at most {MAX_DOMAINS}",
                    input.allowed_domains.len()
                ),
            ));
        }
        if input.allowed_cidrs.len() > MAX_CIDRS {
            return Err(PolicyError::new(
                "allowed_cidrs",
                format!("{} entries; at most {MAX_CIDRS}", input.allowed_cidrs.len()),
            ));
        }
        let mut allowed_domains: Vec<DomainRule> = Vec::new();
        for (i, raw) in input.allowed_domains.iter().enumerate() {
            let rule = DomainRule::parse(raw)
                .map_err(|message| PolicyError::new(format!("allowed_domains[{i}]"), message))?;
            if !allowed_domains.contains(&rule) {
                allowed_domains.push(rule);
            }
        }
        let mut allowed_cidrs: Vec<Cidr> = Vec::new();
        for (i, raw) in input.allowed_cidrs.iter().enumerate() {
            let cidr = Cidr::parse(raw)
                .map_err(|message| PolicyError::new(format!("allowed_cidrs[{i}]"), message))?;
            if !allowed_cidrs.contains(&cidr) {
                allowed_cidrs.push(cidr);
            }
        }
        Ok(EgressPolicy {
            deny_all: input.deny_all,
            allow_package_managers: input.allow_package_managers,
            allow_http: input.allow_http.unwrap_or(true),
            allow_https: input.allow_https.unwrap_or(true),
            allowed_domains,
            allowed_cidrs,
        })
    }

    /// The policy as the public message carries it (for GetEgressPolicy).
    pub fn to_input(&self) -> PolicyInput {
        PolicyInput {
            deny_all: self.deny_all,
            allow_package_managers: self.allow_package_managers,
            allow_http: Some(self.allow_http),
            allow_https: Some(self.allow_https),
            allowed_domains: self
                .allowed_domains
                .iter()
                .map(ToString::to_string)
                .collect(),
            allowed_cidrs: self.allowed_cidrs.iter().map(ToString::to_string).collect(),
        }
    }

    /// Whether the DNS forwarder may answer `name` (any case, trailing dot or not).
    pub fn allows_name(&self, name: &str) -> bool {
        if self.deny_all {
            return false;
        }
        let name = normalize_name(name);
        self.allowed_domains.iter().any(|rule| rule.matches(&name))
            || (self.allow_package_managers
                && package_manager_rules()
                    .iter()
                    .any(|rule| rule.matches(&name)))
    }

    /// Whether TCP traffic to `port` of an admitted destination is allowed.
    pub fn allows_tcp_port(&self, port: u16) -> bool {
        match port {
            80 => self.allow_http,
            443 => self.allow_https,
            _ => true,
        }
    }

    /// The CIDRs this policy admits (none under `deny_all`).
    pub fn admitted_cidrs(&self) -> &[Cidr] {
        if self.deny_all {
            &[]
        } else {
            &self.allowed_cidrs
        }
    }

    /// Whether `ip`, an address in [`RESERVED_RANGES`], is named by this policy: an allowed
    /// CIDR that lies inside a reserved range contains it. A CIDR that merely spans one
    /// (`0.0.0.0/0`, "the internet") names none: reaching the metadata service or a private
    /// network takes a CIDR that says so.
    pub fn names_reserved(&self, ip: IpAddr) -> bool {
        self.admitted_cidrs()
            .iter()
            .any(|c| c.within_reserved() && c.contains(ip))
    }

    /// Whether any DNS name can be admitted (the forwarder refuses everything otherwise).
    pub fn admits_names(&self) -> bool {
        !self.deny_all && (self.allow_package_managers || !self.allowed_domains.is_empty())
    }
}

fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// `example.com` (that name only) or `*.example.com` (every name below it, not the apex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DomainRule {
    Exact(String),
    Below(String),
}

impl DomainRule {
    /// Parses a rule; the error says what is wrong with it.
    pub fn parse(raw: &str) -> Result<DomainRule, String> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err("empty domain".into());
        }
        if !trimmed.is_ascii() {
            return Err(format!(
                "{raw:?} is not ASCII: give the punycode form (xn--...)"
            ));
        }
        let (below, name) = match trimmed.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        let name = normalize_name(name);
        if name.len() > MAX_NAME_LEN {
            return Err(format!("{raw:?} is longer than {MAX_NAME_LEN} characters"));
        }
        let labels: Vec<&str> = name.split('.').collect();
        if labels.len() < 2 {
            return Err(format!(
                "{raw:?} has a single label: give a full name like example.com or *.example.com"
            ));
        }
        for label in &labels {
            let valid_chars = label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if label.is_empty()
                || label.len() > 63
                || !valid_chars
                || label.starts_with('-')
                || label.ends_with('-')
            {
                return Err(format!(
                    "{raw:?} is not a domain name (label {label:?}); a wildcard may only be \
                     the whole first label, as in *.example.com"
                ));
            }
        }
        Ok(if below {
            DomainRule::Below(name)
        } else {
            DomainRule::Exact(name)
        })
    }

    /// Whether `name` (already lowercase, no trailing dot) matches.
    fn matches(&self, name: &str) -> bool {
        match self {
            DomainRule::Exact(rule) => name == rule,
            DomainRule::Below(rule) => {
                name.len() > rule.len() + 1
                    && name.ends_with(rule.as_str())
                    && name.as_bytes()[name.len() - rule.len() - 1] == b'.'
            }
        }
    }
}

impl fmt::Display for DomainRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainRule::Exact(name) => f.write_str(name),
            DomainRule::Below(name) => write!(f, "*.{name}"),
        }
    }
}

impl TryFrom<String> for DomainRule {
    type Error = String;
    fn try_from(raw: String) -> Result<DomainRule, String> {
        DomainRule::parse(&raw)
    }
}

impl From<DomainRule> for String {
    fn from(rule: DomainRule) -> String {
        rule.to_string()
    }
}

/// An IPv4 or IPv6 network: `198.51.100.0/24`, `2001:db8::/32`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` or a bare address; host bits must be zero.
    pub fn parse(raw: &str) -> Result<Cidr, String> {
        let raw = raw.trim();
        let (addr, prefix) = match raw.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (raw, None),
        };
        let addr = IpAddr::from_str(addr)
            .map_err(|_| format!("{raw:?} is not an address or CIDR (like 198.51.100.0/24)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{raw:?}: the prefix length must be 0 to {max}"))?,
        };
        let cidr = Cidr { addr, prefix };
        let network = cidr.network();
        if network != addr {
            return Err(format!(
                "{raw:?} has host bits set: did you mean {network}/{prefix}?"
            ));
        }
        Ok(cidr)
    }

    /// The address with the host bits cleared.
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }

    /// Whether the whole network lies inside one of [`RESERVED_RANGES`].
    pub fn within_reserved(&self) -> bool {
        reserved_ranges()
            .iter()
            .any(|r| r.prefix <= self.prefix && r.contains(self.addr))
    }

    /// Whether `ip` is in one of [`RESERVED_RANGES`].
    pub fn is_reserved(ip: IpAddr) -> bool {
        reserved_ranges().iter().any(|r| r.contains(ip))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let other = Cidr {
            addr: ip,
            prefix: self.prefix,
        };
        ip.is_ipv4() == self.addr.is_ipv4() && other.network() == self.addr
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(raw: String) -> Result<Cidr, String> {
        Cidr::parse(&raw)
    }
}

impl From<Cidr> for String {
    fn from(cidr: Cidr) -> String {
        cidr.to_string()
    }
}

/// Ranges no session reaches unless its `allowed_cidrs` names them: this host's and its
/// networks' private space, loopback, link-local (the cloud metadata service at
/// 169.254.169.254), shared address space, multicast and reserved blocks.
pub const RESERVED_RANGES: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// [`RESERVED_RANGES`], parsed.
pub fn reserved_ranges() -> &'static [Cidr] {
    static PARSED: OnceLock<Vec<Cidr>> = OnceLock::new();
    PARSED.get_or_init(|| {
        RESERVED_RANGES
            .iter()
            .map(|raw| Cidr::parse(raw).expect("RESERVED_RANGES are valid"))
            .collect()
    })
}

/// The registries `allow_package_managers` admits, from `package-managers.txt`.
pub fn package_manager_rules() -> &'static [DomainRule] {
    static PARSED: OnceLock<Vec<DomainRule>> = OnceLock::new();
    PARSED.get_or_init(|| {
        include_str!("package-managers.txt")
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| DomainRule::parse(line).expect("package-managers.txt is valid"))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(domains: &[&str], cidrs: &[&str]) -> PolicyInput {
        PolicyInput {
            allowed_domains: domains.iter().map(|s| s.to_string()).collect(),
            allowed_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            ..PolicyInput::default()
        }
    }

    #[test]
    fn domain_rules_match_exact_names_and_names_below() {
        let policy =
            EgressPolicy::from_input(input(&["Example.COM.", "*.pkg.example.org"], &[])).unwrap();
        assert!(policy.allows_name("example.com"));
        assert!(policy.allows_name("EXAMPLE.com."));
        assert!(!policy.allows_name("www.example.com"));
        assert!(!policy.allows_name("badexample.com"));
        assert!(policy.allows_name("a.pkg.example.org"));
        assert!(policy.allows_name("a.b.pkg.example.org"));
        assert!(
            !policy.allows_name("pkg.example.org"),
            "the apex needs its own entry"
        );
        assert!(!policy.allows_name("xpkg.example.org"));
    }

    #[test]
    fn bad_domains_name_the_entry() {
        for (bad, says) in [
            ("", "empty"),
            ("localhost", "single label"),
            ("*", "single label"),
            ("a.*.example.com", "not a domain name"),
            ("exa mple.com", "not a domain name"),
            ("-a.example.com", "not a domain name"),
            ("bücher.de", "punycode"),
        ] {
            let err = EgressPolicy::from_input(input(&["ok.example", bad], &[])).unwrap_err();
            assert_eq!(err.field, "allowed_domains[1]", "{bad:?}");
            assert!(err.message.contains(says), "{bad:?}: {err}");
        }
        let long = format!("{}.com", "a.".repeat(130));
        assert!(
            DomainRule::parse(&long)
                .unwrap_err()
                .contains("longer than")
        );
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let net = Cidr::parse("198.18.0.0/15").unwrap();
        assert!(net.contains("198.19.255.1".parse().unwrap()));
        assert!(!net.contains("198.20.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let one = Cidr::parse("203.0.113.7").unwrap();
        assert_eq!(one.to_string(), "203.0.113.7/32");
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(
            Cidr::parse("2001:db8::/32")
                .unwrap()
                .contains("2001:db8::9".parse().unwrap())
        );
        assert!(
            Cidr::parse("10.0.0.1/8")
                .unwrap_err()
                .contains("did you mean 10.0.0.0/8")
        );
        assert!(Cidr::parse("10.0.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(
            Cidr::parse("example.com")
                .unwrap_err()
                .contains("not an address")
        );
        let err = EgressPolicy::from_input(input(&[], &["10.0.0.0/8", "nope"])).unwrap_err();
        assert_eq!(err.field, "allowed_cidrs[1]");
    }

    #[test]
    fn counts_are_bounded_and_duplicates_dropped() {
        let many: Vec<String> = (0..=MAX_DOMAINS)
            .map(|i| format!("h{i}.example.com"))
            .collect();
        let err = EgressPolicy::from_input(PolicyInput {
            allowed_domains: many,
            ..PolicyInput::default()
        })
        .unwrap_err();
        assert_eq!(err.field, "allowed_domains");
        let policy = EgressPolicy::from_input(input(
            &["a.example", "A.example."],
            &["1.2.3.4", "1.2.3.4/32"],
        ))
        .unwrap();
        assert_eq!(policy.allowed_domains.len(), 1);
        assert_eq!(policy.allowed_cidrs.len(), 1);
    }

    #[test]
    fn deny_all_overrides_and_ports_follow_the_flags() {
        let mut raw = input(&["example.com"], &["198.18.0.0/15"]);
        raw.allow_http = Some(false);
        let policy = EgressPolicy::from_input(raw.clone()).unwrap();
        assert!(!policy.allows_tcp_port(80));
        assert!(policy.allows_tcp_port(443));
        assert!(policy.allows_tcp_port(5432));
        assert_eq!(policy.admitted_cidrs().len(), 1);
        raw.deny_all = true;
        let denied = EgressPolicy::from_input(raw).unwrap();
        assert!(!denied.allows_name("example.com"));
        assert!(denied.admitted_cidrs().is_empty());
        assert!(!denied.admits_names());
        assert!(!EgressPolicy::none().admits_names());
    }

    #[test]
    fn package_managers_are_admitted_only_with_the_flag() {
        assert!(!package_manager_rules().is_empty());
        let mut raw = PolicyInput::default();
        assert!(
            !EgressPolicy::from_input(raw.clone())
                .unwrap()
                .allows_name("pypi.org")
        );
        raw.allow_package_managers = true;
        let policy = EgressPolicy::from_input(raw).unwrap();
        for name in [
            "pypi.org",
            "files.pythonhosted.org",
            "registry.npmjs.org",
            "deb.debian.org",
        ] {
            assert!(policy.allows_name(name), "{name}");
        }
        assert!(!policy.allows_name("evil.example"));
    }

    #[test]
    fn policies_round_trip_through_json_and_input() {
        let policy = EgressPolicy::from_input(input(&["*.example.com"], &["10.1.0.0/16"])).unwrap();
        let json = serde_json::to_string(&policy).unwrap();
        assert!(
            json.contains("\"*.example.com\"") && json.contains("\"10.1.0.0/16\""),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<EgressPolicy>(&json).unwrap(), policy);
        assert_eq!(EgressPolicy::from_input(policy.to_input()).unwrap(), policy);
        assert!(serde_json::from_str::<Cidr>("\"10.0.0.1/8\"").is_err());
    }

    #[test]
    fn only_a_cidr_inside_a_reserved_range_names_it() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let open = EgressPolicy::from_input(input(&[], &["0.0.0.0/0", "10.0.0.0/7"])).unwrap();
        assert!(!open.names_reserved(ip("169.254.169.254")));
        assert!(
            !open.names_reserved(ip("10.1.2.3")),
            "10.0.0.0/7 spans 10/8 and 11/8"
        );
        let named =
            EgressPolicy::from_input(input(&[], &["169.254.169.254", "10.20.0.0/16"])).unwrap();
        assert!(named.names_reserved(ip("169.254.169.254")));
        assert!(named.names_reserved(ip("10.20.3.4")));
        assert!(!named.names_reserved(ip("10.21.3.4")));
        assert!(Cidr::is_reserved(ip("127.0.0.53")) && !Cidr::is_reserved(ip("198.18.0.1")));
        let mut denied = input(&[], &["10.20.0.0/16"]);
        denied.deny_all = true;
        assert!(
            !EgressPolicy::from_input(denied)
                .unwrap()
                .names_reserved(ip("10.20.3.4"))
        );
    }

    #[test]
    fn reserved_ranges_cover_the_metadata_service_and_private_space() {
        let reserved = |ip: &str| {
            reserved_ranges()
                .iter()
                .any(|c| c.contains(ip.parse().unwrap()))
        };
        for ip in [
            "169.254.169.254",
            "127.0.0.1",
            "10.9.8.7",
            "192.168.1.1",
            "172.31.0.1",
            "::1",
        ] {
            assert!(reserved(ip), "{ip}");
        }
        for ip in ["198.18.0.10", "151.101.0.223", "2a04:4e42::223"] {
            assert!(!reserved(ip), "{ip}");
        }
    }
}

/// The policy on the wire (`capsa.common.v1.EgressPolicy`).
pub mod proto {
    use capsa_proto::common::v1 as pb;

    use super::{EgressPolicy, PolicyError, PolicyInput};

    /// Validates a policy from a request; errors name the field under `egress.`.
    pub fn from_proto(message: pb::EgressPolicy) -> Result<EgressPolicy, PolicyError> {
        EgressPolicy::from_input(PolicyInput {
            deny_all: message.deny_all,
            allow_package_managers: message.allow_package_managers,
            allow_http: message.allow_http,
            allow_https: message.allow_https,
            allowed_domains: message.allowed_domains,
            allowed_cidrs: message.allowed_cidrs,
        })
        .map_err(|e| PolicyError {
            field: format!("egress.{}", e.field),
            message: e.message,
        })
    }

    pub fn to_proto(policy: &EgressPolicy) -> pb::EgressPolicy {
        let input = policy.to_input();
        pb::EgressPolicy {
            deny_all: input.deny_all,
            allow_package_managers: input.allow_package_managers,
            allow_http: input.allow_http,
            allow_https: input.allow_https,
            allowed_domains: input.allowed_domains,
            allowed_cidrs: input.allowed_cidrs,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trips_and_names_fields_under_egress() {
            let message = pb::EgressPolicy {
                allowed_domains: vec!["*.example.com".into()],
                allowed_cidrs: vec!["198.18.0.0/15".into()],
                allow_http: Some(false),
                ..Default::default()
            };
            let policy = from_proto(message.clone()).unwrap();
            assert!(!policy.allow_http && policy.allow_https);
            let back = to_proto(&policy);
            assert_eq!(back.allowed_domains, message.allowed_domains);
            assert_eq!(back.allow_https, Some(true));
            let err = from_proto(pb::EgressPolicy {
                allowed_cidrs: vec!["300.1.1.1".into()],
                ..Default::default()
            })
            .unwrap_err();
            assert_eq!(err.field, "egress.allowed_cidrs[0]");
            assert!(
                err.to_string()
                    .starts_with("invalid `egress.allowed_cidrs[0]`"),
                "{err}"
            );
        }
    }
}
